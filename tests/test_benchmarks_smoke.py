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


def test_paired_timing_writes_ratios_per_round(tmp_path, baron):
    out = tmp_path / "paired"
    command = [sys.executable, "benchmarks/paired.py", "--reference", "scbert2-tiny-sdpa", "--models",
               "scbert2-small-sdpa", "--rounds", "3", "--warmup", "1", "--idle-timeout", "0", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((out / "paired.json").read_text())
    small = measured["models"]["scbert2-small-sdpa"]
    assert len(small["seconds_per_call"]) == 3 and small["cells_per_s"] > 0
    ratio = small["ratio_vs_reference"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "ratio_vs_reference" not in measured["models"]["scbert2-tiny-sdpa"]
    assert "| scbert2-small-sdpa |" in (out / "paired.md").read_text()

    unknown = subprocess.run([*command[:3], "no-such-model"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "unknown model(s) ['no-such-model']" in unknown.stderr
