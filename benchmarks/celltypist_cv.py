"""CellTypist next to scBERT 2.0 and L1 logistic regression, on the very folds of benchmarks/annotation_cv.py.

    python -m benchmarks.celltypist_cv                 # Baron mouse pancreas and pbmc68k_reduced, 5 folds each

CellTypist's published models download from the web, which this machine cannot do, so it is trained here with
`celltypist.train` on each fold's training cells (its defaults: logistic regression on log1p expression normalised
to 10,000 counts per cell; multinomial, see `default_solver_on_new_scikit_learn`) and scored on the fold's test cells
with `celltypist.annotate` (no majority voting).

The folds are rebuilt with `train.finetune.split_cells` and finetune's own defaults (seed, sizes, baseline C grid),
exactly as each CV fold's `scbert finetune --kfold 5 --fold i` built them; the L1 baseline is refitted on them, with
numpy's global RNG seeded as finetune seeds it, as a check: its per-fold macro-F1 must match the one stored in the
committed CV results, and the split sizes too, or the script stops. The scBERT 2.0 numbers are read from those results
(benchmarks/results/annotation/). CellTypist's cells/s: test cells over its `annotate` seconds (scBERT's are measured
end to end by benchmarks/annotate_speed.py). Writes benchmarks/results/annotation/celltypist_cv.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.annotation_cv import BARON, write_bundled_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "annotation"
# data set -> (path or None for bundled, label key, the committed CV of the fine-tuning defaults)
DATASETS = {
    "baron_mouse_pancreas": (str(BARON), "cell_type1", "annotation_cv_baron_mouse_pancreas_logit_adjustment.json"),
    "pbmc68k_reduced": (None, "bulk_labels", "annotation_cv_pbmc68k_reduced_logit_adjustment.json"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "celltypist_cv"))
    parser.add_argument("--results_dir", default=str(RESULTS))
    return parser.parse_args(argv)


def fold_args(path: str, label_key: str, kfold: int) -> list:
    """Each CV fold's `scbert finetune` arguments, finetune's defaults for everything the CV did not pass."""
    from train import finetune

    return [finetune.parse_args(["--data", path, "--label_key", label_key, "--kfold", str(kfold), "--fold", str(fold),
                                 "--output_dir", "unused"]) for fold in range(kfold)]


def cv_baseline(features, labels: np.ndarray, names: list[str], split: dict, args) -> dict:
    """finetune's L1 baseline as the CV fitted it. Liblinear draws the seed of its coordinate descent from numpy's
    global RNG (the baseline passes no random_state); `scbert finetune` seeds that RNG with --seed (set_seed) and
    nothing draws from it before the baseline. Unseeded, pbmc68k's 56 validation cells per fold pick C = 0.1 or 1 at
    random (fold 0: test macro-F1 0.571 or 0.659)."""
    from train.finetune import logistic_regression_baseline

    np.random.seed(args.seed)
    return logistic_regression_baseline(features, labels, names, split, tuple(args.baseline_C))


def celltypist_fold(adata, labels: np.ndarray, names: list[str], split: dict) -> dict:
    """CellTypist trained on the fold's training cells, scored on its test cells."""
    import celltypist
    import scanpy as sc

    from train.metrics import classification_metrics

    cells = adata.copy()
    # Raw counts (Baron) get CellTypist's expected input; pbmc68k_reduced's .raw already is log1p of 10,000 per cell.
    if np.all(np.mod(cells.X[:200].data if hasattr(cells.X, "data") else cells.X[:200], 1) == 0):
        sc.pp.normalize_total(cells, target_sum=1e4)
        sc.pp.log1p(cells)
    train, test = cells[split["train"]].copy(), cells[split["test"]].copy()
    start = time.perf_counter()
    with default_solver_on_new_scikit_learn():
        model = celltypist.train(train, labels=np.array(names)[labels[split["train"]]], check_expression=False,
                                 n_jobs=2)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = celltypist.annotate(test, model=model, majority_voting=False).predicted_labels["predicted_labels"]
    predict_seconds = time.perf_counter() - start
    codes = np.searchsorted(names, predicted.astype(str).to_numpy())
    return {**classification_metrics(labels[split["test"]], codes, names), "train_seconds": train_seconds,
            "predict_seconds": predict_seconds, "cells_per_second": len(split["test"]) / predict_seconds}


@contextlib.contextmanager
def default_solver_on_new_scikit_learn():
    """CellTypist 1.7.1's default path builds LogisticRegression(multi_class="ovr"), an argument scikit-learn 1.8
    removed; without it the same solver fits the multinomial model, which scikit-learn made the only choice. (Its
    other path, use_SGD=True, runs but overfits here: macro-F1 0.33 on Baron fold 0 against 0.96.)"""
    import inspect

    from sklearn.linear_model import LogisticRegression

    module = sys.modules["celltypist.train"]  # `celltypist.train` the attribute is the function
    if "multi_class" in inspect.signature(LogisticRegression).parameters:
        yield
        return
    module.LogisticRegression = lambda multi_class=None, **kwargs: LogisticRegression(**kwargs)
    try:
        yield
    finally:
        module.LogisticRegression = LogisticRegression


def check_same_fold(name: str, fold: int, split: dict, baseline: dict, stored: dict) -> None:
    """The rebuilt fold must have the committed fold's sizes and baseline score (seeded as in the CV, the refit
    reproduces it to the last digit on every fold of both data sets; another fold moves it by far more than 0.005)."""
    sizes = {part: len(rows) for part, rows in split.items()}
    stored_f1 = stored["baseline_logistic_regression_l1"]["macro_f1"]
    if sizes != {part: stored["split"][part] for part in sizes} or abs(baseline["macro_f1"] - stored_f1) > 0.005:
        raise RuntimeError(f"{name} fold {fold}: rebuilt split {sizes} with L1 macro-F1 {baseline['macro_f1']:.4f}, "
                           f"the committed CV {stored['split']} with {stored_f1:.4f}: these are not the CV's folds.")


def load_labelled_cells(name: str, output_dir: Path):
    """One of DATASETS: its path, label key, AnnData, sorted class names, each cell's class index and the baseline's
    features as `scbert finetune` builds them from scratch (log2-normalised expression of every gene)."""
    import anndata

    from tokenization import GeneExpressionTokenizer

    path, label_key, _ = DATASETS[name]
    path = str(path or write_bundled_dataset(name, output_dir))
    adata = anndata.read_h5ad(path)
    names = sorted(adata.obs[label_key].astype(str).unique())
    labels = np.searchsorted(names, adata.obs[label_key].astype(str).to_numpy())
    features = GeneExpressionTokenizer.from_adata(adata, mode="scbert2").encode_matrix(adata)  # [cells, genes]
    return path, label_key, adata, names, labels, features


def run_dataset(name: str, output_dir: Path) -> dict:
    from train import finetune

    path, label_key, adata, names, labels, features = load_labelled_cells(name, output_dir)
    cv_file = DATASETS[name][2]
    cv = json.loads((RESULTS / cv_file).read_text())
    folds = []
    for fold, args in enumerate(fold_args(path, label_key, cv["kfold"])):
        split = finetune.split_cells(labels, names, args)
        baseline = cv_baseline(features, labels, names, split, args)
        check_same_fold(name, fold, split, baseline, cv["folds"][fold])
        folds.append({"celltypist": celltypist_fold(adata, labels, names, split),
                      "baseline_logistic_regression_l1": baseline,
                      "scbert2": {k: cv["folds"][fold]["model"][k] for k in ("accuracy", "macro_f1")}})
        print(f"{name} fold {fold}: CellTypist {folds[-1]['celltypist']['macro_f1']:.4f}, L1 {baseline['macro_f1']:.4f}, "
              f"scBERT 2.0 {folds[-1]['scbert2']['macro_f1']:.4f}", flush=True)
    summary = {tool: {metric: float(np.mean([f[tool][metric] for f in folds])) for metric in ("accuracy", "macro_f1")}
               for tool in folds[0]}
    for tool in summary:
        summary[tool]["macro_f1_std"] = float(np.std([f[tool]["macro_f1"] for f in folds]))
    summary["celltypist"]["cells_per_second"] = float(np.median([f["celltypist"]["cells_per_second"] for f in folds]))
    return {"data": path, "label_key": label_key, "scbert2_cv_results": cv_file, "folds": folds, "mean": summary}


def render(results: dict) -> str:
    labels = {"scbert2": "scBERT 2.0 fine-tuned (from the committed CV)", "baseline_logistic_regression_l1":
              "L1 logistic regression (refitted, equal to the CV's)", "celltypist": "CellTypist (celltypist.train)"}
    lines = []
    for name, block in results.items():
        lines += [f"### {name}: 5-fold CV, the same folds for every tool", "",
                  "| tool | accuracy | macro-F1 (mean ± sd) | per-fold macro-F1 |", "|---|---:|---:|---|"]
        for tool, label in labels.items():
            mean = block["mean"][tool]
            per_fold = ", ".join(f"{f[tool]['macro_f1']:.3f}" for f in block["folds"])
            lines.append(f"| {label} | {mean['accuracy']:.4f} | {mean['macro_f1']:.4f} ± {mean['macro_f1_std']:.4f} "
                         f"| {per_fold} |")
        lines += ["", f"CellTypist prediction: {block['mean']['celltypist']['cells_per_second']:,.0f} cells/s "
                      "(median over folds, test cells only, model in memory).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    existing = results_dir / "celltypist_cv.json"  # the other data sets' results stay
    results = json.loads(existing.read_text()) if existing.exists() else {}
    results.update({name: run_dataset(name, Path(args.output_dir)) for name in args.datasets})
    (results_dir / "celltypist_cv.json").write_text(json.dumps(results, indent=2))
    (results_dir / "celltypist_cv.md").write_text(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
