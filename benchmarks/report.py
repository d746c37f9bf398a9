"""Targets, the Markdown table and the plots, computed from one run's records (never from older files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORIGINAL = "scbert-original"
CONTENTION_WARNING = 0.05  # share of the CPUs used by other processes above which the table carries a warning
GENEFORMER = "geneformer"
SCBERT2_FAMILIES = ("scbert2-small", "scbert2-moe")

# (description, task, metric, threshold), each checked for every scBERT 2.0 preset.
TARGETS = (
    ("inference cells/s >= 5", "inference", "cells_per_s", 5.0),
    ("inference speed-up vs original scBERT >= 75x", "inference", "vs_original", 75.0),
    ("inference speed-up vs Geneformer-size >= 2x", "inference", "vs_geneformer", 2.0),
    ("training speed-up vs original scBERT >= 10x", "training", "vs_original", 10.0),
    ("inference matmul efficiency >= 40% of peak", "inference", "fraction_of_peak", 0.40),
)


# ------------------------------------------------------------------------------------------------ selection
def _measurements(records: list[dict], task: str):
    for record in records:
        for m in record.get("measurements", []):
            if m["task"] == task:
                yield record, m


def best(records: list[dict], family: str, task: str) -> tuple[dict, dict] | tuple[None, None]:
    """The fastest (cells/s) measurement of a family for a task, over its variants and batch sizes."""
    candidates = [(r, m) for r, m in _measurements(records, task) if r["family"] == family and r["device"] == "cpu"]
    return max(candidates, key=lambda rm: rm[1]["cells_per_s"], default=(None, None))


def compute_targets(records: list[dict], matmul_peak: float) -> list[dict]:
    rows = []
    for family in SCBERT2_FAMILIES:
        for description, task, metric, threshold in TARGETS:
            record, m = best(records, family, task)
            reference_family = {"vs_original": ORIGINAL, "vs_geneformer": GENEFORMER}.get(metric)
            ref_record, ref = best(records, reference_family, task) if reference_family else (None, None)
            if m is None or (reference_family and ref is None):
                value = None
            elif metric == "cells_per_s":
                value = m["cells_per_s"]
            elif metric == "fraction_of_peak":
                value = m["achieved_gflops_per_s"] / matmul_peak
            else:
                value = m["cells_per_s"] / ref["cells_per_s"]
            rows.append({
                "family": family,
                "target": description,
                "threshold": threshold,
                "value": value,
                "met": None if value is None else value >= threshold,
                "model": record and f"{record['name']} (batch {m['batch_size']})",
                "reference": ref_record and f"{ref_record['name']} (batch {ref['batch_size']})",
            })
    return rows


# ------------------------------------------------------------------------------------------------ table
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _speed_table(records: list[dict], task: str, matmul_peak: float) -> list[str]:
    original = best(records, ORIGINAL, task)[1]
    per_cell = "GFLOP/cell (fwd)" if task == "inference" else "GFLOP/cell (fwd+bwd)"
    lines = [
        f"| model | batch | tokens/cell: real (computed, with padding) | cells/s | s/cell | x original scBERT (its best) | peak RSS delta (MB) "
        f"| {per_cell} | GFLOP/s | % matmul peak | CPU used by others (%) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record, m in _measurements(records, task):
        ratio = m["cells_per_s"] / original["cells_per_s"] if original else None
        # The peak is the CPU's: a fraction of it means nothing for GPU rows.
        share = f"{100 * m['achieved_gflops_per_s'] / matmul_peak:.1f}" if record["device"] == "cpu" else "n/a"
        lines.append(
            f"| {record['name']} | {m['batch_size']} | {m['tokens_per_cell']:,.0f} ({m['padded_tokens_per_cell']:,.0f}) "
            f"| {_fmt(m['cells_per_s'])} | {_fmt(m['s_per_cell'])} | {_fmt(ratio)} "
            f"| {m['memory']['peak_delta_mb']:,.0f} | {_fmt(m['flops_per_cell'] / 1e9)} "
            f"| {_fmt(m['achieved_gflops_per_s'])} | {share} | {100 * m['other_cpu_share']:.0f} |"
        )
    return lines


# (from variant, to variant, what changed), compared within each scBERT 2.0 preset
VARIANT_CHANGES = (
    ("eager", "sdpa", "fused SDPA attention (torch's flash kernel for CPU) instead of eager softmax(QK^T)V"),
    ("sdpa", "compile", "torch.compile (inductor) on top of SDPA"),
)


def optimisation_rows(records: list[dict], scaling: list[dict]) -> list[dict]:
    """What each change bought, both sides measured in this run: attention backend and compilation per preset,
    task and batch size, and length-grouped batches in the scaling run."""
    by_name = {r["name"]: r for r in records}
    rows = []
    for family in SCBERT2_FAMILIES:
        for before_variant, after_variant, change in VARIANT_CHANGES:
            before, after = by_name.get(f"{family}-{before_variant}"), by_name.get(f"{family}-{after_variant}")
            if not before or not after:
                continue
            after_by_key = {(m["task"], m["batch_size"]): m for m in after.get("measurements", [])}
            for m in before.get("measurements", []):
                other = after_by_key.get((m["task"], m["batch_size"]))
                if other:
                    rows.append({"change": change, "where": f"{family}, {m['task']}, batch {m['batch_size']}",
                                 "before": m["cells_per_s"], "after": other["cells_per_s"],
                                 "memory_before": m["memory"]["peak_delta_mb"],
                                 "memory_after": other["memory"]["peak_delta_mb"]})
    done = [s for s in scaling if "error" not in s]
    for unsorted in (s for s in done if s["sort_window"] == 1):
        grouped = [s for s in done if s["num_cells"] == unsorted["num_cells"] and s["sort_window"] > 1]
        for s in grouped:
            rows.append({"change": f"batches regrouped by length (windows of {s['sort_window']} batches) instead "
                                   "of file order",
                         "where": f"{s['preset']}, annotating {s['num_cells']:,} cells from disk, batch "
                                  f"{s['batch_size']}, <= {s['max_length']} tokens",
                         "before": unsorted["cells_per_s"], "after": s["cells_per_s"],
                         "memory_before": unsorted["peak_rss_mb"], "memory_after": s["peak_rss_mb"]})
    return rows


def _optimisation_table(rows: list[dict]) -> list[str]:
    lines = ["| change | where | cells/s before | cells/s after | speed-up | peak memory before -> after (MB) |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['change']} | {row['where']} | {_fmt(row['before'])} | {_fmt(row['after'])} "
                     f"| {row['after'] / row['before']:.2f}x | {row['memory_before']:,.0f} -> "
                     f"{row['memory_after']:,.0f} |")
    return lines


def markdown(run: dict, records: list[dict], scaling: list[dict], targets: list[dict]) -> str:
    machine, peak = run["machine"], run["matmul_peak"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{run['command']}` on {run['started']} in {run['wall_s'] / 60:.1f} min (of which "
        f"{run['waited_for_idle_s'] / 60:.1f} min waiting for other processes to leave the CPUs). Raw repeat timings, "
        "settings and the machine are in the JSON files next to this one; the plots are the PNG files.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpus_available']} CPUs available, {machine['memory_gb']} GB, "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, transformers {machine['transformers']}, "
        f"GPU: {machine['cuda'] or 'none'}. fp32 matmul peak ({peak['size']}x{peak['size']} torch.mm, best repeat): "
        f"{run['matmul_peak_start']['gflops_per_s']:.1f} GFLOP/s at the start, "
        f"{run['matmul_peak_end']['gflops_per_s']:.1f} at the end; {peak['gflops_per_s']:.1f} is used. "
        f"Other processes (and the hypervisor's steal time) took {100 * run['other_cpu_share']:.1f}% of the CPU "
        f"capacity during the run; load average at the start {run['load_start']}, at the end {run['load_end']}.",
    ]
    if run["other_cpu_share"] > CONTENTION_WARNING:
        lines += ["", f"**Other processes were using the CPUs during this run.** With {machine['torch_threads']} "
                      "threads on as many cores, a busy core stalls every parallel op: rows whose 'CPU used by "
                      "others' is high are pessimistic and noisy."]
    lines += ["", "## Targets (scBERT 2.0, best CPU variant and batch size of each preset)", "",
              "| preset | target | measured | met | scBERT 2.0 measurement | reference |", "|---|---|---:|---|---|---|"]
    for t in targets:
        shown = f"{100 * t['value']:.1f}%" if t["target"].endswith("of peak") and t["value"] is not None else _fmt(t["value"])
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['family']} | {t['target']} | {shown} | {met} | {t['model'] or 'n/a'} | {t['reference'] or '-'} |")
    for task, title in (("inference", "Inference (annotation forward pass)"),
                        ("training", "Training step (forward + backward + AdamW)")):
        lines += ["", f"## {title}", ""] + _speed_table(records, task, peak["gflops_per_s"])
    if scaling:
        lines += ["", "## Scaling: annotating cells streamed from an on-disk Arrow dataset", "",
                  "| cells | batches grouped by length | tokens/cell: real (computed, with padding) | seconds "
                  "| cells/s | read + collate (s) | model (s) | peak RSS (MB) | Arrow size (MB) "
                  "| CPU used by others (%) |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in scaling:
            if "error" in s:
                lines.append(f"| {s['num_cells']:,} | {s['error']} | | | | | | | | |")
                continue
            grouped = f"in windows of {s['sort_window']} batches" if s["sort_window"] > 1 else "no (file order)"
            lines.append(f"| {s['num_cells']:,} | {grouped} "
                         f"| {s['tokens_per_cell']:,.0f} ({s['computed_tokens_per_cell']:,.0f}) "
                         f"| {s['seconds']:.1f} | {s['cells_per_s']:.2f} "
                         f"| {s['read_and_collate_s']:.1f} | {s['model_s']:.1f} | {s['peak_rss_mb']:,.0f} "
                         f"| {s['dataset_mb']:,.0f} | {100 * s['other_cpu_share']:.0f} |")
    changes = optimisation_rows(records, scaling)
    if changes:
        lines += ["", "## What each optimisation bought (both sides measured in this run)", "",
                  "Memory: peak RSS above the loaded model for the model rows, the process's peak RSS for "
                  "annotation from disk."] + [""] + _optimisation_table(changes)
    notes = [f"- {r['name']}: skipped, {r['skipped']}." for r in records if "skipped" in r]
    notes += [f"- {r['name']}: failed, {r['error']}." for r in records if "error" in r]
    if notes:
        lines += ["", "## Not measured", ""] + notes
    lines += ["", "## Models", "", "| model | parameters | attention | description |", "|---|---:|---|---|"]
    for r in records:
        if "parameters" in r:
            lines.append(f"| {r['name']} | {r['parameters']:,} | {r['attn_implementation'] or '-'} | {r['description']} |")
    lines += ["", METHOD]
    return "\n".join(lines) + "\n"


METHOD = """## Method

- All models run in one process on the same real cells (Baron mouse pancreas, raw counts normalised to 1e4 per
  cell and log2(1 + x) by the project tokenizer), at random initialisation (speed does not depend on the weights),
  as cell-type classifiers (13 classes). Cells come from one seeded random permutation: batch 1 runs its first 8
  cells one at a time (cost depends on each cell's length; the Performers see the same length for every cell, so
  one cell), batch B is its first B cells padded to the longest, so the samples are nested.
- Inputs: the original scBERT and the port take the binned full panel (16,906 genes + 1; the 2,029 panel genes
  Baron lacks get bin 0), `scbert-original-native` Baron's own 14,877 genes + 1; scBERT 2.0 takes CLS + the expressed
  genes (at most 2,047, the most expressed); the Geneformer-size BERT takes the expressed genes ordered by normalised
  expression (an approximation of Geneformer's rank-value encoding, which also divides by per-gene medians of its
  pretraining corpus), at most 2,048. The original scBERT (performer-pytorch 1.0.6) uses a learned absolute positional
  table in place of scBERT's frozen gene2vec table (same shape, same compute).
- Time: median of timed repeats after warm-up (a compiled model gets two warm-up calls: compilation, then one
  steady call); the number of repeats is what fits in the per-measurement budget, at least 3 (2 for calls over
  10 s). The largest batches of the Performer models are small because one cell takes seconds.
- Contention: "CPU used by others" is the machine's busy + steal CPU time (/proc/stat) minus this process's own
  (getrusage) over the measurement, as a share of all cores; anything above a few percent slows the row down.
  Before each measurement (and each scaling size) the run waits, at most 5 minutes, until other processes use at
  most 5% of the CPUs, and measures again, up to 3 attempts, if they took more meanwhile; the least disturbed
  attempt is kept. `--quick` does not wait.
- Memory: peak resident memory (RSS) during warm-up + repeats minus the RSS just before (the kernel's high-water mark
  VmHWM, reset through /proc/self/clear_refs after freeing the allocator's cached heap). It is the extra memory the
  computation needs on top of the loaded model; for training it includes gradients and the AdamW state.
- FLOPs: torch.utils.flop_counter on one forward (inference) or forward + backward (training) call of the
  uncompiled module, counting matmul, convolution and attention (sdpa's CPU kernel registered by hand) FLOPs, padding
  included; elementwise work is not counted. Achieved GFLOP/s = FLOPs / median time; the peak is the best repeat of
  a large fp32 torch.mm measured at the start and at the end of the run (the higher of the two).
- Scaling: N cells resampled from the real cells, written as an Arrow dataset (`datasets` save_to_disk of the
  tokenizer's sparse rows), then streamed from disk through a scBERT 2.0 classifier in a fresh process per size:
  record batches of 16 x 32 cells are read, regrouped by length into batches of 32 (predictions go back to file
  order) and cut to the annotation length (`--scaling-max-length`, default finetune.py's `--max_length`, the most
  expressed genes); seconds cover reading, collating and the model, and peak RSS is the process's during annotation.
"""


# ------------------------------------------------------------------------------------------------ plots
def _bar_plot(records: list[dict], task: str, value, xlabel: str, path: Path, log: bool, lines=()) -> None:
    rows = [(f"{r['name']} (b{m['batch_size']})", value(m)) for r, m in _measurements(records, task)]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ax.barh([label for label, _ in rows], [v for _, v in rows], color="tab:blue")
    for x, label, color in lines:
        ax.axvline(x, color=color, linestyle="--", label=label)
    if lines:
        ax.legend(loc="lower right", fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(records: list[dict], scaling: list[dict], matmul_peak: float, out: Path) -> list[str]:
    written = []
    for task in ("inference", "training"):
        path = out / f"{task}_cells_per_s.png"
        lines = [(5.0, "target 5 cells/s", "tab:red")] if task == "inference" else []
        _bar_plot(records, task, lambda m: m["cells_per_s"], f"{task}: cells/s (log scale)", path, True, lines)
        path_mem = out / f"{task}_peak_memory.png"
        _bar_plot(records, task, lambda m: m["memory"]["peak_delta_mb"], f"{task}: peak RSS above baseline (MB)",
                  path_mem, False)
        written += [path.name, path_mem.name]
    path = out / "inference_gflops.png"
    _bar_plot(records, "inference", lambda m: m["achieved_gflops_per_s"], "inference: achieved GFLOP/s", path, False,
              [(matmul_peak, "fp32 matmul peak", "black"), (0.4 * matmul_peak, "40% of peak", "tab:red")])
    written.append(path.name)
    done = [s for s in scaling if "error" not in s]
    window = max((s["sort_window"] for s in done), default=1)
    done = [s for s in done if s["sort_window"] == window]  # one curve: the grouped runs
    if done:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        sizes = [s["num_cells"] for s in done]
        left.loglog(sizes, [s["seconds"] for s in done], "o-", label="measured")
        largest = done[-1]  # the reference line goes through the largest run, the one least dominated by start-up
        left.loglog(sizes, [largest["seconds"] * n / largest["num_cells"] for n in sizes], "k--", label="linear")
        left.set_xlabel("cells")
        left.set_ylabel("seconds")
        left.legend()
        right.semilogx(sizes, [s["peak_rss_mb"] / 1024 for s in done], "o-")
        right.axhline(3.0, color="tab:red", linestyle="--", label="3 GB")
        right.set_ylim(0, max(3.5, max(s["peak_rss_mb"] for s in done) / 1024 * 1.1))
        right.set_xlabel("cells")
        right.set_ylabel("peak RSS (GB)")
        right.legend()
        fig.suptitle(f"Annotating cells streamed from disk ({largest['preset']}, batch {largest['batch_size']}, "
                     f"<= {largest['max_length']} tokens)")
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=120)
        plt.close(fig)
        written.append("scaling.png")
    return written
