"""Measures one model variant: inference at each batch size, then one training configuration."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.data import Cells, token_counts
from benchmarks.measure import (
    flop_counter,
    median,
    other_cpu_share,
    peak_memory,
    repeat_timings,
    synchronizer,
    timed,
    wait_for_idle,
)
from benchmarks.models import ModelSpec

logger = logging.getLogger("benchmarks")


@dataclass
class Settings:
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 10
    budget_s: float = 12.0  # time per measurement that decides how many repeats above the minimum
    slow_call_s: float = 10.0  # calls slower than this (the Performers, eager attention at batch 32) ...
    min_repeats_slow: int = 2  # ... get this minimum instead, to keep the full run within ~25 minutes
    max_batch_size: int | None = None  # --quick caps batch sizes
    # Shared machines: wait (up to idle_timeout_s) until other processes use at most max_other_cpu_share of the
    # CPUs before each measurement, and measure again (up to max_attempts) if they took more meanwhile.
    max_other_cpu_share: float = 0.05
    idle_timeout_s: float = 300.0
    max_attempts: int = 3
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def _to_device(inputs: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    moved = {}
    for key, value in inputs.items():
        value = value.to(spec.device)
        moved[key] = value.to(spec.dtype) if value.is_floating_point() else value
    return moved


def _batch_sizes(spec: ModelSpec, settings: Settings) -> list[int]:
    sizes = spec.batch_sizes if settings.max_batch_size is None else [min(b, settings.max_batch_size) for b in spec.batch_sizes]
    return sorted(set(sizes))


def _measure(step, counted_step, spec: ModelSpec, settings: Settings, extra_warmup: int) -> dict:
    """One FLOP-counted call, `extra_warmup` more warm-up calls, then the timed repeats, all inside the
    peak-memory window. Without compile the counted call is the same step, so it is the first warm-up call."""
    sync = synchronizer(spec.device)
    with other_cpu_share() as contention, peak_memory(spec.device) as memory:
        with flop_counter() as counter:
            warmup_s = [timed(counted_step, sync)]
        warmup_s += [timed(step, sync) for _ in range(extra_warmup)]
        min_repeats = settings.min_repeats
        if warmup_s[-1] > settings.slow_call_s:
            min_repeats = min(min_repeats, settings.min_repeats_slow)
        repeats_s = repeat_timings(step, sync, warmup_s[-1], min_repeats, settings.max_repeats, settings.budget_s)
    return {"warmup_s": warmup_s, "repeats_s": repeats_s, "flops": counter.get_total_flops(), "memory": memory,
            **contention}


def _measure_quietly(step, counted_step, spec: ModelSpec, settings: Settings, extra_warmup: int) -> dict:
    """`_measure` on an idle machine: the attempt least disturbed by other processes is kept."""
    attempts, waited = [], 0.0
    for _ in range(settings.max_attempts):
        waited += wait_for_idle(settings.max_other_cpu_share, settings.idle_timeout_s)
        attempts.append(_measure(step, counted_step, spec, settings, extra_warmup))
        if attempts[-1]["other_cpu_share"] <= settings.max_other_cpu_share:
            break
    best = min(attempts, key=lambda a: a["other_cpu_share"])
    return {**best, "attempts": len(attempts), "waited_for_idle_s": waited}


def _summarise(raw: dict, task: str, batch_size: int, batches: list[dict[str, torch.Tensor]]) -> dict:
    seconds = median(raw["repeats_s"])
    num_cells = sum(b["input_ids"].shape[0] for b in batches)
    real, padded = token_counts(batches)
    return {
        "task": task,
        "batch_size": batch_size,
        "cells_per_call": num_cells,
        "tokens_per_cell": real / num_cells,
        "padded_tokens_per_cell": padded / num_cells,
        "median_s": seconds,
        "cells_per_s": num_cells / seconds,
        "s_per_cell": seconds / num_cells,
        "flops_per_cell": raw["flops"] / num_cells,
        "achieved_gflops_per_s": raw["flops"] / seconds / 1e9,
        "memory": raw["memory"],
        "other_cpu_share": raw["other_cpu_share"],
        "own_kernel_share": raw["own_kernel_share"],
        "attempts": raw["attempts"],
        "waited_for_idle_s": raw["waited_for_idle_s"],
        "warmup_s": raw["warmup_s"],
        "repeats_s": raw["repeats_s"],
    }


def _extra_warmup(model, runner, settings: Settings) -> int:
    # An eager runner was warmed up by the counted call. A compiled one compiles in its first call (and recompiles
    # for new shapes), so it gets one more call, whose time then sizes the repeats.
    return settings.warmup + 1 if runner is not model else max(settings.warmup - 1, 0)


def inference_batches(spec: ModelSpec, cells: Cells, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batch 1 is `spec.single_cells` cells one after the other (cost depends on each cell's length, so one cell
    would not be representative); larger batches are one batch."""
    if batch_size == 1:
        rows = cells.sample_rows(spec.single_cells)
        return [_to_device(spec.input_fn(cells, rows[i:i + 1]), spec) for i in range(len(rows))]
    return [_to_device(spec.input_fn(cells, cells.sample_rows(batch_size)), spec)]


def inference_step(module, batches: list[dict[str, torch.Tensor]]):
    """One timed call: the forward pass over every batch."""
    def step():
        with torch.inference_mode():
            for inputs in batches:
                module(**inputs)
    return step


def _inference(model, runner, spec: ModelSpec, cells: Cells, settings: Settings, batch_size: int) -> dict:
    batches = inference_batches(spec, cells, batch_size)
    model.eval()
    raw = _measure_quietly(inference_step(runner, batches), inference_step(model, batches), spec, settings,
                           _extra_warmup(model, runner, settings))
    return _summarise(raw, "inference", batch_size, batches)


def _training(model, runner, spec: ModelSpec, cells: Cells, settings: Settings, batch_size: int) -> dict:
    """Forward + backward + AdamW step on a fixed batch; the peak includes gradients and the optimizer state,
    which the first step allocates."""
    rows = cells.sample_rows(batch_size)
    inputs = _to_device(spec.input_fn(cells, rows), spec)
    inputs["labels"] = torch.as_tensor(cells.labels[rows], device=spec.device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step_of(module):
        def step():
            optimizer.zero_grad(set_to_none=True)
            module(**inputs).loss.backward()
            optimizer.step()
        return step

    raw = _measure_quietly(step_of(runner), step_of(model), spec, settings, _extra_warmup(model, runner, settings))
    return _summarise(raw, "training", batch_size, [inputs])


def benchmark_model(spec: ModelSpec, cells: Cells, settings: Settings) -> dict:
    """All figures of one variant; a failure is recorded, not raised, so one broken variant does not stop a run."""
    record = {"name": spec.name, "family": spec.family, "description": spec.description, "compile": spec.compile,
              "device": spec.device, "dtype": str(spec.dtype).removeprefix("torch."), "measurements": []}
    missing = spec.missing_requirement()
    if missing:
        record["skipped"] = missing
        return record
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    try:
        model = spec.build(cells)
        if not getattr(model, "is_quantized", False):
            model = model.to(device=spec.device, dtype=spec.dtype)
        record["parameters"] = sum(p.numel() for p in model.parameters())
        record["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
        runner = torch.compile(model) if spec.compile else model
        for batch_size in _batch_sizes(spec, settings):
            logger.info("%s: inference, batch %d", spec.name, batch_size)
            record["measurements"].append(_inference(model, runner, spec, cells, settings, batch_size))
        if spec.train_batch_size is not None:
            batch_size = spec.train_batch_size if settings.max_batch_size is None else min(
                spec.train_batch_size, settings.max_batch_size)
            logger.info("%s: training, batch %d", spec.name, batch_size)
            record["measurements"].append(_training(model, runner, spec, cells, settings, batch_size))
    except Exception as error:  # noqa: BLE001  (reported in the results and the table)
        logger.exception("%s failed", spec.name)
        record["error"] = f"{type(error).__name__}: {error}"
    finally:
        record["wall_s"] = time.perf_counter() - start
        model = runner = None
        gc.collect()
        if spec.compile:
            torch._dynamo.reset()
    return record
