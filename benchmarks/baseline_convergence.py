"""How much of the L1 logistic-regression baseline is the solver's shuffle? The baseline of the committed CVs, refitted
on their very folds with five seeds, next to the same fit run to convergence.

    python -m benchmarks.baseline_convergence          # Baron mouse pancreas and pbmc68k_reduced, 5 folds each

`scbert finetune`'s baseline is liblinear's L1 logistic regression at scikit-learn's default tolerance (1e-4). Its
coordinate descent visits the features in an order drawn from numpy's global RNG (no random_state is passed), and
at that tolerance it stops at different points for different orders: the C picked on the validation cells, and the
test score, move with the seed and with the columns' layout. Run to a tolerance of 1e-6 it reached one answer
whatever the order where checked (pbmc68k fold 0 at C = 1: four seeds, both layouts). The folds are
rebuilt as benchmarks/celltypist_cv.py rebuilds them (finetune's own split and defaults), on every gene of the data
(the features of a fine-tuning from scratch, and of one from a checkpoint that adds the data's own genes). Writes
benchmarks/results/annotation/baseline_convergence.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.celltypist_cv import DATASETS, RESULTS, ROOT, fold_args, load_labelled_cells
from train.genes import add_data_genes

CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"
SEEDS = range(5)
CONVERGED_TOLERANCE = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "baseline_convergence"))
    parser.add_argument("--results_dir", default=str(RESULTS))
    return parser.parse_args(argv)


def fit_baseline(features, labels, names, split, grid, seed: int | None, tolerance: float) -> dict:
    """finetune's baseline (C picked on the validation cells), with liblinear's shuffle seeded and its tolerance set."""
    from train.finetune import logistic_regression_baseline

    fit = logistic_regression_baseline(features, labels, names, split, grid, max_iter=100_000, tol=tolerance,
                                       random_state=seed)
    return {key: fit[key] for key in ("accuracy", "macro_f1", "C", "validation_macro_f1")}


def run_dataset(name: str, output_dir: Path) -> dict:
    from tokenization import GeneExpressionTokenizer
    from train import finetune

    path, label_key, adata, names, labels, features = load_labelled_cells(name, output_dir)
    # The same genes laid out as a fine-tuning from the checkpoint lays them out: its vocabulary plus the data's own
    # genes, with a zero column for every vocabulary gene the data lacks.
    checkpoint = GeneExpressionTokenizer.from_pretrained(CHECKPOINT)
    add_data_genes(checkpoint, adata)
    checkpoint_layout = checkpoint.encode_matrix(adata)  # [cells, vocabulary genes]
    folds = []
    for fold, args in enumerate(fold_args(path, label_key, 5)):
        split = finetune.split_cells(labels, names, args)
        grid = tuple(args.baseline_C)
        default = [fit_baseline(features, labels, names, split, grid, seed, 1e-4) for seed in SEEDS]
        layout = [fit_baseline(checkpoint_layout, labels, names, split, grid, seed, 1e-4) for seed in SEEDS]
        converged = fit_baseline(features, labels, names, split, grid, 0, CONVERGED_TOLERANCE)
        folds.append({"default_tolerance_by_seed": default, "checkpoint_layout_by_seed": layout, "converged": converged})
        print(f"{name} fold {fold}: default tolerance, seeds {list(SEEDS)}: "
              f"{[round(d['macro_f1'], 3) for d in default]}; checkpoint layout {[round(d['macro_f1'], 3) for d in layout]}; "
              f"converged {converged['macro_f1']:.3f}", flush=True)
    by_seed = {key: [float(np.mean([f[key][s]["macro_f1"] for f in folds])) for s in SEEDS]
               for key in ("default_tolerance_by_seed", "checkpoint_layout_by_seed")}
    return {"data": path, "label_key": label_key, "genes": int(features.shape[1]),
            "checkpoint_layout_columns": int(checkpoint_layout.shape[1]), "folds": folds,
            "mean_macro_f1": {**by_seed, "converged": float(np.mean([f["converged"]["macro_f1"] for f in folds]))}}


def render(results: dict) -> str:
    lines = ["| data set | default tolerance (1e-4), CV mean by seed | the checkpoint's column layout, by seed | "
             "converged (1e-6) | converged, per fold |", "|---|---|---|---:|---|"]
    for name, block in results.items():
        means = block["mean_macro_f1"]
        seeds = {key: ", ".join(f"{m:.3f}" for m in means[key])
                 for key in ("default_tolerance_by_seed", "checkpoint_layout_by_seed")}
        per_fold = ", ".join(f"{f['converged']['macro_f1']:.3f}" for f in block["folds"])
        lines.append(f"| {name} ({block['genes']:,} genes; {block['checkpoint_layout_columns']:,} columns laid out as "
                     f"the checkpoint's) | {seeds['default_tolerance_by_seed']} | {seeds['checkpoint_layout_by_seed']} "
                     f"| {means['converged']:.3f} | {per_fold} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {name: run_dataset(name, Path(args.output_dir)) for name in args.datasets}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "baseline_convergence.json").write_text(json.dumps(results, indent=2))
    (results_dir / "baseline_convergence.md").write_text(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
