"""Perturb-seq effect prediction on Papalexi 2021 (THP-1, 25 knock-out targets): held-out perturbations, 5 folds.

    python -m benchmarks.perturb                                   # ~20 min on 2 cores
    python -m benchmarks.perturb --folds 0 --models pretrained -- --max_steps 20

Each fold holds out a group of targets entirely (train.perturb.fold_targets); `scbert perturb train` (its own process)
trains the head on checkpoints/scbert2-small (`pretrained`) or on a randomly initialised encoder of the same shape
(`scratch`, `--from_scratch`) and scores it with the baselines on the same split: no change, mean shift, and a ridge
regression from the target's gene-table embedding (`linear_gene_table`, fitted with the pretrained table; the
scratch runs' own baselines use their random table and are not reported). Metrics (GEARS): MSE and Pearson of the
mean profile, Pearson of the deltas, the same on each target's top-20 DE genes, the share of those changed in the right
direction; averaged over the test targets of all folds, and separately over the 9 targets that are measured genes
(whose own knock-down the model sees). Writes benchmarks/results/perturb/perturb.json, perturb.md and perturb.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "perturbseq" / "papalexi2021_thp1_lowmoi.h5ad"
CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"
MODELS = ("pretrained", "scratch")
METRICS = ("mse", "pearson", "pearson_delta", "mse_top20_de", "pearson_delta_top20_de", "direction_top20_de")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default=str(CHECKPOINT))
    parser.add_argument("--folds", nargs="+", type=int, default=list(range(5)))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "perturb"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "perturb"))
    parser.add_argument("perturb_args", nargs=argparse.REMAINDER, help="after '--': `scbert perturb train` flags")
    return parser.parse_args(argv)


def fold_run(args, fold: int, model: str) -> Path:
    """`scbert perturb train` for one fold (skipped when its results exist); its run folder."""
    folder = Path(args.output_dir) / f"fold{fold}_{model}"
    if not (folder / "results.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "train.perturb", "train", "--data", args.data, "--model", args.model,
                   "--output_dir", str(folder), "--test_fold", str(fold), "--no_progress_bar",
                   *(["--from_scratch"] if model == "scratch" else []), *[a for a in args.perturb_args if a != "--"]]
        with open(folder / "log.txt", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return folder


def collect(folders: dict[tuple[int, str], Path]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """method -> target -> metrics over every fold; the model's rows named by run kind, baselines from the
    pretrained runs; and the measured targets."""
    per_method, measured = {}, []
    for (fold, kind), folder in folders.items():
        results = json.loads((folder / "results.json").read_text())
        measured = results["measured_targets"]
        for method, by_target in results["test"].items():
            if method == "model":
                per_method.setdefault(f"scbert2_{kind}", {}).update(by_target)
            elif kind == "pretrained":
                per_method.setdefault(method, {}).update(by_target)
    return per_method, measured


def average(by_target: dict[str, dict], targets: list[str] | None = None) -> dict[str, float | None]:
    chosen = [by_target[t] for t in (targets if targets is not None else by_target) if t in by_target]
    out = {}
    for metric in METRICS:
        values = [row[metric] for row in chosen if row[metric] is not None]
        out[metric] = float(np.mean(values)) if values else None
    return out | {"targets": len(chosen)}


def render(summary: dict) -> str:
    lines = []
    for subset, methods in summary.items():
        lines += [f"\n**{subset}**\n", "| method | " + " | ".join(METRICS) + " | targets |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        for method, metrics in methods.items():
            cells = ["n/a" if metrics[m] is None else f"{metrics[m]:.3f}" for m in METRICS]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {metrics['targets']} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def plot(folders: dict[tuple[int, str], Path], path: Path) -> None:
    """Predicted vs observed deltas on each test target's top-20 DE genes, all folds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("model", "linear_gene_table", "mean_shift")
    figure, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4.2), sharex=True, sharey=True)
    points = {m: ([], []) for m in methods}
    for (fold, kind), folder in folders.items():
        if kind != "pretrained":
            continue
        table = ad.read_h5ad(folder / "test_profiles.h5ad")
        control = table.varm["control_mean"][:, 0]
        for target, de in table.uns["top20_de"].items():
            observed = table[f"observed:{target}"].X[0] - control
            for method in methods:
                points[method][0].extend(observed[de])
                points[method][1].extend(table[f"{method}:{target}"].X[0][de] - control[de])
    for axis, method in zip(axes, methods):
        observed, predicted = map(np.asarray, points[method])
        axis.scatter(observed, predicted, s=6, alpha=0.5)
        low, high = min(observed.min(), predicted.min()), max(observed.max(), predicted.max())
        axis.plot([low, high], [low, high], color="grey", lw=0.8)
        axis.set_title({"model": "scbert2_pretrained"}.get(method, method))
        axis.set_xlabel("observed delta (log2), top-20 DE genes")
    axes[0].set_ylabel("predicted delta")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    folders = {}
    for fold in args.folds:
        for model in args.models:
            folders[(fold, model)] = fold_run(args, fold, model)
            print(f"fold {fold} {model}: done", flush=True)
    per_method, measured = collect(folders)
    summary = {"all test targets": {m: average(rows) for m, rows in per_method.items()},
               f"the {len(measured)} measured targets": {m: average(rows, measured) for m, rows in per_method.items()},
               "the other targets": {m: average(rows, [t for t in rows if t not in measured])
                                     for m, rows in per_method.items()}}
    results = {"data": args.data, "checkpoint": args.model, "perturb_args": args.perturb_args,
               "machine": platform.platform(), "seconds": time.perf_counter() - start, "measured_targets": measured,
               "summary": summary, "per_target": per_method}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perturb.json").write_text(json.dumps(results, indent=2))
    (out / "perturb.md").write_text(render(summary))
    plot(folders, out / "perturb.png")
    print(render(summary))
    return results


if __name__ == "__main__":
    main()
