"""Inference precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the hardware runs it natively).

bf16 is native on CUDA GPUs of compute capability 8.0+ (the given device's capability; ``torch.cuda.
is_bf16_supported()`` also says yes where bf16 is only emulated, e.g. on 7.x) and on x86 CPUs with
AVX512-BF16 or AMX-BF16; elsewhere bf16 is emulated and slower than fp32, so ``"auto"`` picks fp32 there.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch

__all__ = ["Precision", "cpu_has_native_bf16", "emulates_bf16", "resolve_precision", "autocast", "in_autocast"]

Precision = Literal["auto", "fp32", "bf16"]


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_LIGHTNING_BF16 = ("bf16-mixed", "bf16", "bf16-true")


def emulates_bf16(trainer_precision: object, device: torch.device | str) -> bool:
    """True when a Lightning Trainer ``precision`` asks for bf16 on a CPU that only emulates it (about 16x slower
    than fp32: no AVX512-BF16 / AMX-BF16)."""
    return (str(trainer_precision) in _LIGHTNING_BF16 and torch.device(device).type == "cpu"
            and not cpu_has_native_bf16())


def resolve_precision(precision: Precision, device: torch.device | str) -> Literal["fp32", "bf16"]:
    """Turn ``"auto"`` into ``"bf16"`` or ``"fp32"`` for ``device``; check the other values."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, _ = torch.cuda.get_device_capability(index)
        return "bf16" if major >= 8 else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """An autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def in_autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cpu"``, ``"cuda"``, ...) here."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
