"""Timing helpers: warm-up, ``block_until_ready``, median over many runs."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    runs: int


def time_jax(fn: Callable[..., Any], *args: Any, warmup: int = 3, runs: int = 20) -> Timing:
    """Times a (jit-compiled) function: ``warmup`` calls first (compilation
    included), then the median of ``runs`` calls, each synchronised."""
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), runs)


def time_torch(fn: Callable[[], Any], *, warmup: int = 3, runs: int = 20) -> Timing:
    """Same protocol for a PyTorch CUDA callable (synchronised with CUDA events)."""
    import torch

    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return Timing(statistics.median(times), min(times), runs)


def device_summary() -> dict[str, str]:
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
