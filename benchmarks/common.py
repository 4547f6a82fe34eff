"""Timing helpers shared by the benchmark scripts.

Reference and samtune runs are interleaved (ref, ours, ref, ours, ...) so that background load on a shared
machine affects both sides alike; the median of the repetitions is reported.
"""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    """One line naming the hardware and the software versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {torch.get_num_threads()} threads; {gpu}; torch {torch.__version__}"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times after ``warmup``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory in GiB while running ``fn``: CUDA allocator peak on GPU, process max RSS growth on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 2**20
