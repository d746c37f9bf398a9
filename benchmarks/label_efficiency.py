"""Label efficiency: fine-tuned from the pretrained checkpoint vs the same model from scratch vs L1 logistic
regression, with k labelled cells per type and every other cell as the test set.

    python -m benchmarks.label_efficiency                                    # Baron mouse, k = 3 5 10 25, 3 draws
    python -m benchmarks.label_efficiency --k 3 10 --draws 2 --data pbmc68k_reduced

Each (k, draw) runs `python -m train.finetune --labelled_per_class k --seed draw` twice, once from the checkpoint and
once from scratch (same labelled cells: the draw is seeded), so the three methods see the same cells
(`--reuse_scratch` takes the from-scratch arm from earlier results instead, `--pretrained_args` adds flags to the
pretrained arm only; `--continue_pretraining EPOCHS` first pretrains the checkpoint further on the data's cells,
without their labels, and starts the pretrained arm from that). Every run trains for about --steps optimizer steps
(k labelled cells give few batches per epoch). Writes benchmarks/results/label_efficiency/label_efficiency_<name>.json,
.md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.annotation_cv import class_counts, resolve_data
from benchmarks.measure import machine_info

ROOT = Path(__file__).resolve().parents[1]
BARON = ROOT.parent / "shared" / "data" / "celltype" / "baron_mouse_pancreas.h5ad"
CHECKPOINT = ROOT / "checkpoints" / "scbert2-small"
METHODS = ("pretrained", "scratch", "baseline")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(BARON))
    parser.add_argument("--label_key", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--pretrained", default=str(CHECKPOINT))
    parser.add_argument("--architecture", default=None, help="from scratch: default the checkpoint's preset")
    parser.add_argument("--scratch", choices=["architecture", "checkpoint"], default="architecture",
                        help="the from-scratch model: --architecture with a tokenizer of the data's own genes, or the "
                             "checkpoint's architecture and genes freshly initialised (finetune --from_scratch; the "
                             "fair one for a scBERT v1 panel)")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5, 10, 25])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first_draw", type=int, default=0,
                        help="seed of the first draw (draws first_draw, first_draw + 1, ...): more draws of a k later")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run, about")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "label_efficiency"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "label_efficiency"))
    parser.add_argument("--pretrained_args", default="",
                        help="train.finetune flags for the pretrained arm only, one string (e.g. "
                             "'--encoder_learning_rate_scale 0.1'); the flags after '--' go to both arms")
    parser.add_argument("--reuse_scratch", nargs="+", default=None, metavar="JSON",
                        help="take the from-scratch arm of every (k, draw) from these earlier results of this "
                             "benchmark on the same data instead of training it again (its cells are the same: the "
                             "draw is seeded); for comparing pretrained-arm settings")
    parser.add_argument("--continue_pretraining", type=int, default=0, metavar="EPOCHS",
                        help="first pretrain the checkpoint further on every cell of --data, without labels, as "
                             "`scbert main --pretrain_epochs EPOCHS` does, and fine-tune the pretrained arm from that")
    parser.add_argument("--continue_pretraining_args", default="",
                        help="more train.pretrain flags for --continue_pretraining, one string")
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after '--': extra train.finetune flags")
    return parser.parse_args(argv)


def earlier_scratch_runs(paths: list[str], data: str, needed: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
    """The from-scratch results of earlier runs of this benchmark on ``data``, by (k, draw); each of ``needed``
    must be among them."""
    runs = {}
    for path in paths:
        summary = json.loads(Path(path).read_text())
        if Path(summary["data"]).name != Path(data).name:
            raise ValueError(f"--reuse_scratch {path} holds results on {Path(summary['data']).name}, not on "
                             f"{Path(data).name}: the from-scratch arm must have seen the same cells.")
        runs.update({(run["k"], run["draw"]): {**run["scratch"], "reused_from": str(path)} for run in summary["runs"]})
    for k, draw in needed:
        if (k, draw) not in runs:
            raise ValueError(f"--reuse_scratch has no from-scratch run for k = {k}, draw {draw} (it has "
                             f"{sorted(runs)}); run those files' k and draws, or drop --reuse_scratch.")
    return runs


def continue_pretraining(args, out: Path) -> dict:
    """The checkpoint pretrained further on the data's cells (labels unused), with the learning rate and seed of
    `scbert main`'s pretraining stage; its folder and what it took."""
    from train.main import parse_args as main_defaults

    defaults = main_defaults([])
    command = [sys.executable, "-m", "train.pretrain", "--data", args.data, "--model", args.pretrained,
               "--num_epochs", str(args.continue_pretraining), "--seed", str(defaults.seed),
               "--per_device_batch_size", str(defaults.batch_size), "--learning_rate", str(defaults.learning_rate),
               "--output_dir", str(out), "--no_progress_bar", *shlex.split(args.continue_pretraining_args)]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return {"folder": str(out / "model"), "epochs": args.continue_pretraining,
            "extra_args": args.continue_pretraining_args, "seconds": time.perf_counter() - start,
            "summary": json.loads((out / "pretrain_summary.json").read_text())}


def scratch_run(args, k: int, draw: int, out: Path, epochs: int, extra: list[str], reused: dict | None) -> dict:
    if reused is not None:
        return reused[(k, draw)]
    architecture = (["--model", args.pretrained, "--from_scratch"] if args.scratch == "checkpoint"
                    else ["--architecture", args.architecture])
    return run(args, k, draw, [*architecture, "--no_baseline"], out / "scratch", epochs, extra)["model"]


def epochs_for(k: int, counts: dict[str, int], steps: int, batch_size: int) -> int:
    labelled = sum(min(k, n // 2) for n in counts.values())
    return max(1, math.ceil(steps / math.ceil(labelled / batch_size)))


def run(args, k: int, draw: int, source: list[str], out: Path, epochs: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "train.finetune", "--data", args.data, "--label_key", args.label_key,
               "--labelled_per_class", str(k), "--seed", str(draw), "--num_epochs", str(epochs),
               "--per_device_batch_size", str(args.batch_size), "--output_dir", str(out), "--no_progress_bar",
               *source, *extra]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads((out / "results.json").read_text())


def summarise(runs: list[dict]) -> dict:
    table = {}
    for k in sorted({r["k"] for r in runs}):
        table[k] = {}
        for method in METHODS:
            for metric in ("macro_f1", "accuracy"):
                values = np.array([r[method][metric] for r in runs if r["k"] == k])
                table[k][f"{method}_{metric}"] = {"mean": float(values.mean()), "std": float(values.std()),
                                                  "values": values.tolist()}
    return table


def write_report(summary: dict, results: Path, stem: str) -> None:
    arms = ("its architecture and genes" if summary.get("scratch") == "checkpoint"
            else summary["architecture_from_scratch"])
    if summary.get("scratch_reused_from"):
        arms += f" (taken from {', '.join(summary['scratch_reused_from'])})"
    if summary.get("pretrained_args"):
        arms += f"; pretrained arm: `{summary['pretrained_args']}`"
    if summary.get("continued_pretraining"):
        continued = summary["continued_pretraining"]
        arms += (f"; pretrained arm from the checkpoint pretrained {continued['epochs']} more epoch(s) on all of "
                 f"these cells, without labels ({continued['seconds'] / 60:.1f} min)")
    lines = [f"# Label efficiency: {Path(summary['data']).name}", "",
             f"k labelled cells per type (at most half of a type), every other cell tested; {summary['draws']} draws "
             f"(seeds {summary['first_draw']} to {summary['first_draw'] + summary['draws'] - 1}) "
             f"each; checkpoint `{summary['pretrained']}`; from scratch: {arms}"
             f"; {summary['wall_seconds'] / 60:.1f} min on "
             f"{summary['machine']['cpu_model']} ({summary['machine']['cpu_capability']}).", "",
             "| k | pretrained macro-F1 | from scratch | logistic regression | pretrained accuracy | scratch | LR |",
             "|---|---|---|---|---|---|---|"]
    for k, row in summary["table"].items():
        cells = [f"{row[f'{m}_macro_f1']['mean']:.3f} ± {row[f'{m}_macro_f1']['std']:.3f}" for m in METHODS]
        cells += [f"{row[f'{m}_accuracy']['mean']:.3f}" for m in METHODS]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ks = [int(k) for k in summary["table"]]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for method, label in zip(METHODS, ("pretrained + fine-tuned", "from scratch", "L1 logistic regression")):
        means = np.array([summary["table"][k][f"{method}_macro_f1"]["mean"] for k in summary["table"]])
        stds = np.array([summary["table"][k][f"{method}_macro_f1"]["std"] for k in summary["table"]])
        axis.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=label)
    axis.set(xscale="log", xlabel="labelled cells per type", ylabel="macro-F1 (test cells)",
             title=Path(summary["data"]).stem)
    axis.set_xticks(ks, [str(k) for k in ks], minor=False)
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(results / f"{stem}.png", dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.continue_pretraining < 0:
        raise ValueError(f"--continue_pretraining takes a number of epochs >= 0 (0: start from the checkpoint as it "
                         f"is), got {args.continue_pretraining}.")
    name = args.name or Path(args.data).stem
    resolve_data(args)
    args.architecture = args.architecture or json.loads((Path(args.pretrained) / "release.json").read_text()).get(
        "architecture", "scbert2-small")
    extra = [a for a in args.finetune_args if a != "--"]
    draws = range(args.first_draw, args.first_draw + args.draws)
    reused = (earlier_scratch_runs(args.reuse_scratch, args.data, [(k, d) for k in args.k for d in draws])
              if args.reuse_scratch else None)
    counts = class_counts(args.data, args.label_key)
    start, runs = time.perf_counter(), []
    continued = (continue_pretraining(args, Path(args.output_dir) / name / "continued") if args.continue_pretraining
                 else None)
    start_from = continued["folder"] if continued else args.pretrained
    for k in args.k:
        epochs = epochs_for(k, counts, args.steps, args.batch_size)
        for draw in draws:
            out = Path(args.output_dir) / name / f"k{k}" / f"draw{draw}"
            pretrained = run(args, k, draw, ["--model", start_from, *shlex.split(args.pretrained_args)],
                             out / "pretrained", epochs, extra)
            scratch = scratch_run(args, k, draw, out, epochs, extra, reused)
            runs.append({"k": k, "draw": draw, "epochs": epochs, "train_cells": pretrained["split"]["train"],
                         "test_cells": pretrained["split"]["test"], "pretrained": pretrained["model"],
                         "scratch": scratch, "baseline": pretrained["baseline_logistic_regression_l1"]})
    summary = {"data": args.data, "label_key": args.label_key, "pretrained": args.pretrained,
               "architecture_from_scratch": args.architecture, "scratch": args.scratch, "draws": args.draws,
               "first_draw": args.first_draw, "steps": args.steps, "finetune_args": extra,
               "pretrained_args": args.pretrained_args, "scratch_reused_from": args.reuse_scratch,
               "continued_pretraining": continued,
               "class_counts": counts, "wall_seconds": time.perf_counter() - start,
               "machine": machine_info(), "runs": runs}
    summary["table"] = summarise(runs)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"label_efficiency_{name}"
    (results / f"{stem}.json").write_text(json.dumps(summary, indent=2))
    write_report(summary, results, stem)
    print((results / f"{stem}.md").read_text())
    return summary


if __name__ == "__main__":
    main()
