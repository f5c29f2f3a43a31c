"""Runs a sweep: every case with every peer, one record per (case, peer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax

from jaxattn.bench.timing import Timing, time_jax, time_torch


def jax_mode_fn(op: Callable[..., Any], mode: str, n_diff: int = 3) -> Callable[..., Any]:
    """jit of ``op(*args)`` (mode "fwd") or of forward + VJP w.r.t. the first ``n_diff``
    args with a fixed cotangent passed last (mode "fwd+bwd")."""
    if mode == "fwd":
        return jax.jit(lambda *a: op(*a[:-1]))

    def fwd_bwd(*a):
        diff, rest, ct = a[:n_diff], a[n_diff:-1], a[-1]
        out, vjp = jax.vjp(lambda *d: op(*d, *rest), *diff)
        return out, vjp(ct)

    return jax.jit(fwd_bwd)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def run(
    cases: Iterable[Any],
    *,
    inputs: Callable[[Any], tuple],
    peers: Callable[[Any], dict[str, Callable[..., Any]]],
    torch_peers: Callable[[Any], dict[str, Callable[[], Any]]] | None = None,
    warmup: int,
    runs: int,
    progress: bool = True,
    desc: str = "bench",
) -> list[dict]:
    """``peers(case)`` gives jitted JAX callables on ``inputs(case)``; ``torch_peers(case)``
    gives argument-less CUDA callables. Failures are recorded with their reason."""
    from tqdm import tqdm

    records = []
    for case in tqdm(list(cases), desc=desc, disable=not progress, unit="case"):
        args = inputs(case)
        timers: list[tuple[str, Callable[[], Timing]]] = [
            (name, lambda fn=fn: time_jax(fn, *args, warmup=warmup, runs=runs))
            for name, fn in peers(case).items()
        ]
        if torch_peers is not None:
            timers += [(name, lambda fn=fn: time_torch(fn, warmup=warmup, runs=runs))
                       for name, fn in torch_peers(case).items()]
        for name, timer in timers:
            rec = {**dataclasses.asdict(case), "impl": name}
            try:
                t = timer()
                rec.update(ms=t.median_ms, tflops=case.flops / (t.median_ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run this case
                rec.update(ms=None, tflops=None, error=_error(e))
            records.append(rec)
        del args
    return records
