"""The performance suite runs end to end (tiny model, quick settings) and writes its JSON, table and plots."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_writes_results(tmp_path, baron):
    out = tmp_path / "bench"
    command = [sys.executable, "benchmarks/run.py", "--quick", "--models", "scbert2-tiny-sdpa",
               "--scaling-preset", "scbert2-tiny", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "scbert2-tiny-sdpa.json").read_text())
    tasks = {m["task"] for m in measured["measurements"]}
    assert tasks == {"inference", "training"}
    assert all(m["cells_per_s"] > 0 and m["flops_per_cell"] > 0 for m in measured["measurements"])
    assert measured["machine"]["cpu_count"] >= 1
    assert (out / "README.md").read_text().count("scbert2-tiny-sdpa") >= 2
    assert (out / "inference_cells_per_s.png").stat().st_size > 0
