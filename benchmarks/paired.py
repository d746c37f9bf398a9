"""Speed ratios against a reference model, timed in alternation: `python benchmarks/paired.py`.

run.py measures the models one after another, so a ratio between two of them also carries whatever the machine did
in the minutes between (other tenants, frequency changes): the MoE vs Geneformer-size ratio at batch 1 ranged from
1.79x to 2.39x across full runs. Here every round times each model once on the same batch-1 cells, in rotating
order, and a round's ratio is reference time / model time, so slow spells hit both sides of a ratio alike. Reports
the median ratio over the rounds and its range. Writes benchmarks/results/paired/paired.json and paired.md (a folder
of its own: run.py clears the JSON files of benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # as in run.py: the package imports need the repository root, not benchmarks/

import torch  # noqa: E402

from benchmarks.data import Cells  # noqa: E402
from benchmarks.harness import Settings, inference_batches, inference_step  # noqa: E402
from benchmarks.measure import machine_info, other_cpu_share, synchronizer, timed, wait_for_idle  # noqa: E402
from benchmarks.models import SPECS  # noqa: E402
from benchmarks.report import TARGETS  # noqa: E402

logger = logging.getLogger("benchmarks")
TARGET_RATIO = next(threshold for _, _, metric, threshold in TARGETS if metric == "vs_geneformer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="geneformer-10m-sdpa")
    parser.add_argument("--models", default="scbert2-small-sdpa,scbert2-moe-sdpa,scbert2-moe-compile")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model (torch.compile compiles here)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--idle-timeout", type=float, default=120.0,
                        help="seconds to wait for other processes to leave the CPUs first (0: do not wait)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results" / "paired")
    args = parser.parse_args(argv)
    names = [args.reference, *args.models.split(",")]
    unknown = [name for name in names if name not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(SPECS)}")
    missing = [f"{name} ({SPECS[name].missing_requirement()})" for name in names if SPECS[name].missing_requirement()]
    if missing:
        parser.error(f"not measurable on this machine: {', '.join(missing)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def batch1_step(spec, cells: Cells):
    """The model's forward over the same batch-1 cells as run.py's, and how many cells one call covers."""
    torch.manual_seed(0)
    model = spec.build(cells).to(device=spec.device, dtype=spec.dtype).eval()
    runner = torch.compile(model) if spec.compile else model
    batches = inference_batches(spec, cells, batch_size=1)
    return inference_step(runner, batches), len(batches)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cells = Cells.load()
    names = [args.reference, *args.models.split(",")]
    steps, num_cells = {}, {}
    for name in names:
        logger.info("building and warming up %s", name)
        steps[name], num_cells[name] = batch1_step(SPECS[name], cells)
        for _ in range(args.warmup):
            steps[name]()
    waited = wait_for_idle(Settings().max_other_cpu_share, timeout_s=args.idle_timeout)
    seconds = {name: [] for name in names}
    with other_cpu_share() as cpu:
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                seconds[name].append(timed(steps[name], synchronizer(SPECS[name].device)))
    models = {}
    for name in names:
        per_cell = [s / num_cells[name] for s in seconds[name]]
        entry = {"cells_per_s": 1.0 / statistics.median(per_cell), "seconds_per_call": seconds[name],
                 "cells_per_call": num_cells[name]}
        if name != args.reference:
            ratios = [ref / own for ref, own in zip(seconds[args.reference], seconds[name])]
            entry["ratio_vs_reference"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                           "rounds_at_target": sum(r >= TARGET_RATIO for r in ratios)}
        models[name] = entry
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "threads": args.threads, "rounds": args.rounds, "reference": args.reference, "target_ratio": TARGET_RATIO,
            "waited_for_idle_s": waited,
            "other_cpu_share": cpu["other_cpu_share"], "models": models}


def render(result: dict) -> str:
    reference = result["reference"]
    rows = [f"### Batch-1 inference timed in alternation with {reference} ({result['rounds']} rounds, "
            f"{result['date'][:16].replace('T', ' ')} UTC)", "",
            "| model | cells/s (median) | x reference (median of rounds) | range over rounds | "
            f"rounds >= {TARGET_RATIO:g}x |",
            "|---|---:|---:|---|---:|"]
    for name, entry in result["models"].items():
        ratio = entry.get("ratio_vs_reference")
        if ratio is None:
            rows.append(f"| {name} (reference) | {entry['cells_per_s']:.2f} | 1 | - | - |")
        else:
            rows.append(f"| {name} | {entry['cells_per_s']:.2f} | {ratio['median']:.2f} | "
                        f"{ratio['min']:.2f}-{ratio['max']:.2f} | {ratio['rounds_at_target']}/{result['rounds']} |")
    rows += ["", f"{result['threads']} threads; other processes took {100 * result['other_cpu_share']:.1f}% of the "
                 "CPUs meanwhile."]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    start = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - start
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "paired.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    (args.output_dir / "paired.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
