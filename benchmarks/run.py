"""Benchmarks of the scBERT family and its peers on real cells: `python benchmarks/run.py [--quick] [--models ...]`.

Writes to the output folder (default benchmarks/results): one JSON per model (machine, settings, raw timings),
scaling.json, summary.json (targets and run information), README.md (the tables) and PNG plots. The folder's previous
JSON/PNG files and README.md are removed first, so it always holds exactly one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python benchmarks/run.py` puts benchmarks/ first on sys.path, where data.py or models.py could shadow other
# modules; the package imports need the repository root instead.
sys.path[0] = str(REPO)

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.data import ANNOTATION_MAX_LENGTH, Cells  # noqa: E402
from benchmarks.harness import Settings, benchmark_model  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    load_average,
    machine_info,
    matmul_peak_gflops,
    other_cpu_share,
    peak_rss_supported,
    wait_for_idle,
)
from benchmarks.models import REGISTRY, SPECS  # noqa: E402
from benchmarks.scaling import run_scaling  # noqa: E402

logger = logging.getLogger("benchmarks")

FULL = {"settings": Settings(), "matmul_size": 4096, "scaling_sizes": "1000,10000,100000"}
# --quick does not wait for an idle machine: it checks that everything runs, not how fast.
QUICK = {"settings": Settings(min_repeats=1, max_repeats=2, budget_s=1.0, max_batch_size=4, idle_timeout_s=0.0,
                              max_attempts=1), "matmul_size": 1024, "scaling_sizes": "64"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1-2 repeats, batch sizes capped at 4, small matmul and scaling sizes")
    parser.add_argument("--models", help="comma-separated model names (default: every CPU/GPU model of the registry "
                                         "except the smoke-test size; see --list)")
    parser.add_argument("--list", action="store_true", help="print the registry and exit")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--scaling-sizes", help=f"comma-separated cell counts, '' to skip (default "
                                                f"{FULL['scaling_sizes']}; --quick {QUICK['scaling_sizes']}); e.g. "
                                                "100,1000 for a short run")
    parser.add_argument("--scaling-preset", default="scbert2-small")
    parser.add_argument("--scaling-batch-size", type=int, default=32)
    parser.add_argument("--scaling-max-length", type=int, default=ANNOTATION_MAX_LENGTH,
                        help="tokens per cell (CLS included) when annotating, as the fine-tuned models are trained; "
                             "0: every expressed gene")
    parser.add_argument("--scaling-sort-window", type=int, default=16,
                        help="batches read at once and regrouped by length (1: file order)")
    return parser.parse_args(argv)


def select_models(names: str | None) -> list:
    if not names:
        return [spec for spec in REGISTRY if spec.in_default_run]
    unknown = [n for n in names.split(",") if n not in SPECS]
    if unknown:
        raise SystemExit(f"Unknown model(s) {unknown}; known: {', '.join(SPECS)}")
    return [SPECS[n] for n in names.split(",")]


def clean_output_dir(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in [*out.glob("*.json"), *out.glob("*.png"), out / "README.md"]:
        path.unlink(missing_ok=True)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def measure_all(args: argparse.Namespace, run: dict, out: Path) -> tuple[list[dict], list[dict]]:
    """Matmul peak, every selected model, then the scaling runs; fills `run` with the machine-level figures."""
    mode = QUICK if args.quick else FULL
    settings: Settings = mode["settings"]
    cells = Cells.load(seed=settings.seed)
    run["data"] = {"cells": cells.num_cells, "genes": cells.adata.n_vars, "labels": cells.num_labels}
    wait_for_idle(settings.max_other_cpu_share, settings.idle_timeout_s)
    run["matmul_peak_start"] = matmul_peak_gflops(mode["matmul_size"], repeats=5)
    logger.info("fp32 matmul peak: %.1f GFLOP/s", run["matmul_peak_start"]["gflops_per_s"])

    records = []
    for spec in select_models(args.models):
        logger.info("== %s", spec.name)
        record = benchmark_model(spec, cells, settings)
        records.append(record)
        write_json(out / f"{spec.name}.json", {**record, "machine": run["machine"], "settings": run["settings"]})

    scaling = []
    if run["settings"]["scaling_sizes"]:
        scaling = run_scaling(cells, run["settings"]["scaling_sizes"], out / "raw", args.scaling_preset,
                              args.scaling_batch_size, args.scaling_max_length or None, args.scaling_sort_window,
                              args.threads, settings)
        write_json(out / "scaling.json", {"results": scaling, "machine": run["machine"], "settings": run["settings"]})

    wait_for_idle(settings.max_other_cpu_share, settings.idle_timeout_s)
    run["matmul_peak_end"] = matmul_peak_gflops(mode["matmul_size"], repeats=5)
    run["matmul_peak"] = max(run["matmul_peak_start"], run["matmul_peak_end"], key=lambda p: p["gflops_per_s"])
    return records, scaling


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for spec in REGISTRY:
            print(f"{spec.name:28s} {spec.device:5s} {spec.description}")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not peak_rss_supported():
        raise SystemExit("Peak-memory measurement needs Linux's /proc/self/clear_refs.")
    torch.set_num_threads(args.threads)
    mode = QUICK if args.quick else FULL
    sizes_arg = mode["scaling_sizes"] if args.scaling_sizes is None else args.scaling_sizes
    select_models(args.models)  # fail on unknown names before clearing anything
    out = args.output_dir.resolve()
    clean_output_dir(out)

    run = {
        "command": " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "settings": {**mode["settings"].to_json(), "quick": args.quick,
                     "scaling_sizes": [int(n) for n in sizes_arg.split(",") if n],
                     "scaling_preset": args.scaling_preset, "scaling_batch_size": args.scaling_batch_size,
                     "scaling_max_length": args.scaling_max_length, "scaling_sort_window": args.scaling_sort_window},
        "load_start": load_average(),
    }
    start = time.perf_counter()
    with other_cpu_share() as contention:
        records, scaling = measure_all(args, run, out)
    waits = [m["waited_for_idle_s"] for r in records for m in r["measurements"]] + [
        s.get("waited_for_idle_s", 0.0) for s in scaling]
    run.update(wall_s=time.perf_counter() - start, waited_for_idle_s=sum(waits), load_end=load_average(),
               **contention)
    targets = report.compute_targets(records, run["matmul_peak"]["gflops_per_s"])
    run["plots"] = report.plots(records, scaling, run["matmul_peak"]["gflops_per_s"], out)
    write_json(out / "summary.json", {**run, "targets": targets})
    (out / "README.md").write_text(report.markdown(run, records, scaling, targets))
    logger.info("done in %.1f min: %s", run["wall_s"] / 60, out / "README.md")


if __name__ == "__main__":
    main()
