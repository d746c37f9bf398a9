"""How things are measured: wall time, peak memory, FLOPs, the machine's matmul peak and its description."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

CLEAR_REFS = "/proc/self/clear_refs"


# ------------------------------------------------------------------------------------------------ time
def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def repeat_timings(fn: Callable[[], object], sync: Callable[[], None], first_call_s: float, min_repeats: int,
                   max_repeats: int, budget_s: float) -> list[float]:
    """Timed calls after warm-up: as many as fit in `budget_s` (judged by the last warm-up call), clamped to
    [min_repeats, max_repeats], so slow models get the minimum and fast ones a steadier median."""
    n = max(min_repeats, min(max_repeats, int(budget_s / max(first_call_s, 1e-9))))
    return [timed(fn, sync) for _ in range(n)]


def median(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------------------ memory
def _read_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon ... of this process in bytes (Linux /proc/self/status)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _release_free_heap() -> None:
    """Frees Python garbage and returns glibc's cached free heap to the OS, so the baseline RSS is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_supported() -> bool:
    return os.path.exists(CLEAR_REFS) and os.access(CLEAR_REFS, os.W_OK)


@contextmanager
def peak_memory(device: str) -> Iterator[dict]:
    """Peak memory of a block above the memory in use when it starts (filled in on exit).

    CPU: the kernel's resident-set high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so the
    peak covers exactly this block, including allocations that torch's allocator makes outside Python. CUDA:
    torch.cuda.max_memory_allocated over the block.
    """
    result: dict = {}
    _release_free_heap()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        yield result
        peak = torch.cuda.max_memory_allocated()
        result.update(method="torch.cuda.max_memory_allocated", baseline_mb=baseline / 2**20, peak_mb=peak / 2**20)
    else:
        with open(CLEAR_REFS, "w") as handle:
            handle.write("5")
        baseline = _read_status()["VmRSS"]
        yield result
        peak = _read_status()["VmHWM"]
        result.update(method="VmHWM after reset via /proc/self/clear_refs", baseline_mb=baseline / 2**20,
                      peak_mb=peak / 2**20)
    result["peak_delta_mb"] = result["peak_mb"] - result["baseline_mb"]


def process_peak_rss_mb() -> float:
    return _read_status()["VmHWM"] / 2**20


# ------------------------------------------------------------------------------------------------ contention
def _cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds: the whole machine busy or stolen by the hypervisor (/proc/stat), this process and its finished
    children (getrusage), and of that the part spent in the kernel."""
    with open("/proc/stat") as handle:
        ticks = [int(x) for x in handle.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    system = sum(u.ru_stime for u in usages)
    return busy, sum(u.ru_utime for u in usages) + system, system


@contextmanager
def other_cpu_share() -> Iterator[dict]:
    """Filled in on exit: the share of the machine's CPU capacity taken by other processes (or other VMs, as steal
    time) during the block, 0 meaning the benchmark had the machine to itself (with 2 threads on 2 cores anything
    else running stalls every parallel op); and the share of this process's CPU time spent in the kernel, mostly
    page faults of freshly allocated large tensors."""
    result: dict = {}
    busy, own, system = _cpu_seconds()
    start = time.perf_counter()
    yield result
    busy_end, own_end, system_end = _cpu_seconds()
    capacity = (time.perf_counter() - start) * (os.cpu_count() or 1)
    result["other_cpu_share"] = max(0.0, (busy_end - busy) - (own_end - own)) / capacity
    result["own_kernel_share"] = (system_end - system) / max(own_end - own, 1e-9)


def wait_for_idle(max_other_share: float, timeout_s: float, probe_s: float = 3.0) -> float:
    """Sleeps until other processes use at most `max_other_share` of the CPUs over a `probe_s` window (or until
    `timeout_s`); returns the seconds waited. On a shared machine this keeps other jobs out of the measurements."""
    if timeout_s <= 0:
        return 0.0
    start = time.perf_counter()
    while True:
        with other_cpu_share() as probe:
            time.sleep(probe_s)
        if probe["other_cpu_share"] <= max_other_share or time.perf_counter() - start >= timeout_s:
            return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ FLOPs
def _attention_flops(query_shape, key_shape, value_shape) -> int:
    """QK^T and PV matmuls; key heads may be fewer than query heads (grouped-query attention)."""
    *batch_heads, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    count = 1
    for size in batch_heads:
        count *= size
    return 2 * count * q_len * k_len * (head_dim + v_dim)


def _sdpa_cpu_forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    # dV, dP, dQ, dK: twice the forward's two matmuls.
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that sdpa uses here.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
}


@contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """Counts matmul/conv/attention FLOPs (a multiply-add is 2) of the aten ops run in the block; elementwise ops
    (exp, softmax, norms, activations) are not counted, as is usual for achieved-FLOP/s figures."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        yield counter


# ------------------------------------------------------------------------------------------------ machine
def matmul_peak_gflops(size: int, repeats: int, device: str = "cpu") -> dict:
    """Achievable fp32 matmul throughput: GFLOP/s of the fastest of `repeats` size x size torch.mm after a warm-up
    (the fastest, because a peak is what the machine can do; other processes only ever slow a repeat down)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    sync = synchronizer(device)
    timed(lambda: a @ b, sync)
    times = [timed(lambda: a @ b, sync) for _ in range(repeats)]
    return {"size": size, "repeats_s": times, "gflops_per_s": 2 * size**3 / min(times) / 1e9}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict:
    import transformers

    return {
        "cpu_model": _cpu_model(),
        # The vector instructions PyTorch's kernels use (AVX2, AVX512, ...): one model name covers both kinds of this
        # project's machines, whose speeds differ (bfloat16 is native on one only).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_average() -> list[float]:
    """1/5/15-minute load: other processes sharing the cores slow every figure down, so runs record it."""
    return [round(x, 2) for x in os.getloadavg()]
