"""`scbert annotate` end to end (read, tokenize, model, write) on 1k / 10k / 100k real cells streamed from disk.

    python -m benchmarks.annotate_speed --model outputs/main/model          # scbert2-small fine-tuned by `scbert main`
    python -m benchmarks.annotate_speed --model RUN/model --sizes 1000 10000

The cells are Baron mouse pancreas cells drawn with replacement (real profiles, resampled), written as a CSR .h5ad
chunk by chunk. Each size runs the command in a fresh process (`python -m train.cli annotate`), which reports its
own peak resident memory (ru_maxrss); wall time is measured around the process, so it includes starting Python and
loading the model. Writes benchmarks/results/annotate_speed/annotate_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.annotation_cv import BARON
from benchmarks.measure import machine_info
from train.annotate import BATCH_SIZE

ROOT = Path(__file__).resolve().parents[1]
# Runs the command as `scbert annotate` does (train.cli sets the process's memory policy first, unless the first
# argument says glibc's defaults) and prints its own peak RSS: RUSAGE_CHILDREN would be the maximum over every size
# run so far.
RUNNER = ("import json, resource, sys; from train.cli import keep_freed_memory; "
          "keep_freed_memory() if sys.argv[1] == 'keep' else None; "
          "from train.annotate import main; summary = main(sys.argv[2:]); "
          "print('RESULT ' + json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
          "'annotate_seconds': summary['seconds'], 'unassigned': summary['unassigned']}))")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "outputs" / "main" / "model"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="default: the command's")
    parser.add_argument("--glibc_defaults", action="store_true",
                        help="run without the memory policy `scbert` sets (train.cli.keep_freed_memory), to measure it")
    parser.add_argument("--name", default=None, help="results file name (default: the model folder's parent name)")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "annotate_speed"))
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "annotate_speed"))
    return parser.parse_args(argv)


def write_resampled_cells(n_cells: int, path: Path, seed: int = 0, chunk: int = 10000) -> None:
    """``n_cells`` Baron cells drawn with replacement, written as CSR under /X without holding them all at once."""
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    source = anndata.read_h5ad(BARON)
    X = sp.csr_matrix(source.X, dtype=np.float32)
    rows = np.random.default_rng(seed).integers(0, X.shape[0], n_cells)
    with h5py.File(path, "w") as handle:
        handle.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(handle, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        write_elem(handle, "var", pd.DataFrame(index=source.var_names))
        for group in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(handle, group, {})
        group = handle.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": np.array([n_cells, X.shape[1]])})
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 16,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 16,))
        indptr = [0]
        for start in range(0, n_cells, chunk):
            part = X[rows[start:start + chunk]]
            end = data.shape[0]
            data.resize((end + part.nnz,))
            indices.resize((end + part.nnz,))
            data[end:], indices[end:] = part.data, part.indices
            indptr.extend((end + part.indptr[1:]).tolist())
        group.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64))


def run_size(model: str, n_cells: int, folder: Path, batch_size: int, glibc_defaults: bool) -> dict:
    cells = folder / f"cells_{n_cells}.h5ad"
    if not cells.exists():
        write_resampled_cells(n_cells, cells)
    output = folder / f"annotated_{n_cells}.h5ad"
    policy = "glibc_defaults" if glibc_defaults else "keep"
    command = [sys.executable, "-c", RUNNER, policy, str(cells), "--model", model, "--output", str(output),
               "--overwrite", "--batch-size", str(batch_size), "--no-progress-bar", "--device", "cpu"]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    measured = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(done.stdout.split("RESULT ")[0].strip().splitlines()[-1], flush=True)
    return {"cells": n_cells, "wall_seconds": wall, "cells_per_second": n_cells / wall,
            "cells_per_second_annotate_only": n_cells / measured["annotate_seconds"], **measured,
            "input_mb": cells.stat().st_size / 2**20}


def render(results: dict) -> str:
    policy = ", glibc's malloc defaults" if results.get("glibc_defaults") else ""
    lines = [f"### `scbert annotate` end to end, {results['model']} (2 CPU cores{policy})", "",
             "| cells | wall s | cells/s end to end | cells/s (read to write, no start-up) | peak RSS MB | input MB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in results["runs"]:
        lines.append(f"| {row['cells']:,} | {row['wall_seconds']:.1f} | {row['cells_per_second']:.1f} | "
                     f"{row['cells_per_second_annotate_only']:.1f} | {row['peak_rss_mb']:.0f} | {row['input_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.model).resolve().parent.name
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    # Sizes run by an earlier invocation with the same model and batch size stay, unless run again.
    existing = results_dir / f"annotate_speed_{name}.json"
    earlier = json.loads(existing.read_text()) if existing.exists() else {}
    setting = (args.model, args.batch_size, args.glibc_defaults)
    kept = [row for row in earlier.get("runs", []) if row["cells"] not in args.sizes
            and (earlier["model"], earlier["batch_size"], earlier.get("glibc_defaults", False)) == setting]
    runs = sorted(kept + [run_size(args.model, n, folder, args.batch_size, args.glibc_defaults) for n in args.sizes],
                  key=lambda r: r["cells"])
    results = {"model": args.model, "batch_size": args.batch_size, "glibc_defaults": args.glibc_defaults,
               "machine": machine_info(), "runs": runs}
    (results_dir / f"annotate_speed_{name}.json").write_text(json.dumps(results, indent=2))
    (results_dir / f"annotate_speed_{name}.md").write_text(render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    main()
