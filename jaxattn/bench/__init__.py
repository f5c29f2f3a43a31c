"""Benchmark harness: ``python -m jaxattn.bench <op> ...`` times jit-compiled ops
and their peers in one process and prints ms and TFLOP/s."""

from jaxattn.bench.timing import Timing, device_summary, time_jax

__all__ = ["Timing", "device_summary", "time_jax"]
