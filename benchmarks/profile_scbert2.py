"""Where scBERT 2.0's inference time goes: `python benchmarks/profile_scbert2.py [--output PATH]`.

For each preset (sdpa attention, real Baron cells, batch 1 = one cell and batch 32, both from run.py's sample) it
writes to one Markdown file:
- time per module kind (embeddings, attention, FFN / MoE, norms, head, and the rest: mask building, pooling),
  measured with forward hooks over repeated calls;
- torch.profiler's top aten ops by self CPU time;
- the cost of padding: the same 32 cells as one padded batch, and sorted by length into 4 batches of 8;
- the cost of the attention mask's shape, sdpa alone at the batch of 32's shapes.
Run it on an otherwise idle machine: the tables say how much CPU other processes took.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # as in run.py: import the benchmarks package, not its modules by file name

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.data import Cells, scbert2_inputs, token_counts  # noqa: E402
from benchmarks.measure import other_cpu_share, peak_memory  # noqa: E402
from benchmarks.models import scbert2  # noqa: E402

PRESETS = ("scbert2-small", "scbert2-moe")


def module_kind(name: str) -> str | None:
    """Top-level kinds the time is attributed to (their children are inside them)."""
    parts = name.split(".")
    if name == "model.embeddings":
        return "embeddings (gene + value)"
    if len(parts) == 4 and parts[1] == "layers":
        return {"self_attn": "attention (q/k/v/o + sdpa)", "mlp": "FFN / MoE",
                "input_layernorm": "RMSNorm", "post_attention_layernorm": "RMSNorm"}.get(parts[3])
    if name in ("model.norm",):
        return "RMSNorm"
    if name == "classifier":
        return "classifier head"
    return None


def time_by_module(model, inputs: dict, repeats: int) -> dict[str, float]:
    """Seconds per call spent in each module kind; 'other' is the rest of the forward (masks, pooling, glue)."""
    totals: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        kind = module_kind(name)
        if kind is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, n=name, k=kind: totals.__setitem__(k, totals[k] + time.perf_counter() - starts[n])))
    with torch.inference_mode():
        model(**inputs)
        totals.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            model(**inputs)
        total = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    breakdown = {kind: seconds / repeats for kind, seconds in totals.items()}
    breakdown["other (mask building, pooling, glue)"] = total / repeats - sum(breakdown.values())
    breakdown["total"] = total / repeats
    return breakdown


def top_ops(model, inputs: dict, rows: int) -> str:
    with torch.inference_mode():
        model(**inputs)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            model(**inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)


def _timed_median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def padding_cost(model, cells: Cells, repeats: int) -> list[str]:
    """Same 32 cells: one padded batch versus 4 length-sorted batches of 8 (less padding, smaller masks)."""
    rows = cells.sample_rows(32)
    order = rows[np.argsort(cells.expressed_genes()[rows], kind="stable")]
    layouts = {"1 x 32, random order": [rows], "4 x 8, sorted by length": np.array_split(order, 4)}
    lines = ["| layout | computed / real tokens | seconds for 32 cells | peak RSS delta (MB) | own CPU in kernel "
             "| CPU used by others |", "|---|---:|---:|---:|---:|---:|"]
    for label, batches in layouts.items():
        batch_inputs = [scbert2_inputs(cells, b) for b in batches]
        real, padded = token_counts(batch_inputs)

        def run_all():
            with torch.inference_mode():
                for b in batch_inputs:
                    model(**b)

        with other_cpu_share() as cpu, peak_memory("cpu") as memory:
            seconds = _timed_median(run_all, repeats)
        lines.append(f"| {label} | {padded / real:.2f} | {seconds:.2f} | {memory['peak_delta_mb']:,.0f} "
                     f"| {cpu['own_kernel_share']:.0%} | {cpu['other_cpu_share']:.0%} |")
    return lines


def mask_cost(model, cells: Cells, repeats: int) -> list[str]:
    """sdpa alone at the model's attention shapes for the batch of 32: an expanded [B, 1, L, L] boolean mask (what
    transformers' create_bidirectional_mask gives, which the model used at first) versus the [B, 1, 1, L] key-padding
    mask the model builds now, which gives the same outputs for every real token."""
    config = model.config
    padding = scbert2_inputs(cells, cells.sample_rows(32))["attention_mask"].bool()  # [B, L]
    batch, length = padding.shape
    q, k, v = (torch.randn(batch, config.num_attention_heads, length, config.head_dim) for _ in range(3))
    masks = {"[B, 1, L, L] bool (expanded, as first built)": padding[:, None, :, None] & padding[:, None, None, :],
             "[B, 1, 1, L] bool key padding (as built now)": padding[:, None, None, :]}
    lines = ["| mask | ms per layer | own CPU in kernel |", "|---|---:|---:|"]
    for label, mask in masks.items():
        with other_cpu_share() as cpu:
            seconds = _timed_median(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats)
        lines.append(f"| {label} | {1e3 * seconds:,.0f} | {cpu['own_kernel_share']:.0%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "profile_scbert2.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = Cells.load()
    lines = [f"# scBERT 2.0 inference profile ({args.threads} threads, torch {torch.__version__})", ""]
    for preset in PRESETS:
        torch.manual_seed(0)
        model = scbert2(cells, preset, "sdpa").eval()
        for batch_size in (1, 32):
            inputs = scbert2_inputs(cells, cells.sample_rows(batch_size))
            shape = tuple(inputs["input_ids"].shape)
            with other_cpu_share() as cpu:
                breakdown = time_by_module(model, inputs, args.repeats)
            lines += [f"## {preset}, batch {batch_size} (input {shape[0]} x {shape[1]})", "",
                      f"CPU used by other processes meanwhile: {cpu['other_cpu_share']:.0%}; this process's CPU time "
                      f"in the kernel: {cpu['own_kernel_share']:.0%}.", "",
                      "| part | ms per call | share |", "|---|---:|---:|"]
            for kind, seconds in sorted(breakdown.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {kind} | {1e3 * seconds:,.1f} | {seconds / breakdown['total']:.0%} |")
            lines += ["", "```", top_ops(model, inputs, rows=15), "```", ""]
        lines += [f"### {preset}: padding", ""] + padding_cost(model, cells, args.repeats) + [""]
        if preset == PRESETS[0]:  # same attention shapes in both presets
            lines += ["### Attention mask (sdpa alone, batch of 32)", ""] + mask_cost(model, cells, args.repeats) + [""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(args.output)


if __name__ == "__main__":
    main()
