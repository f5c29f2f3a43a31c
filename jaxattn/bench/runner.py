"""Runs a sweep: every case with every peer, one record per (case, peer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn.bench.timing import Timing, time_jax, time_torch


@dataclasses.dataclass(frozen=True)
class Shape:
    """The ``[batch, seq, heads, head_dim]`` fields every sweep case starts with (cases subclass it)."""

    batch: int
    seq: int
    heads: int
    head_dim: int


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


def normal_inputs(case: Any, n: int = 4) -> tuple[jax.Array, ...]:
    """``n`` standard-normal ``[batch, seq, heads, head_dim]`` arrays in ``case.dtype`` (q, k, v, dO)."""
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    dt = jnp.dtype(case.dtype)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dt) for k in jax.random.split(jax.random.PRNGKey(0), n))


def cudnn_attention(causal: bool, head_dim: int) -> Callable[..., jax.Array]:
    """``jax.nn.dot_product_attention`` through cuDNN (GPU only)."""
    scale = head_dim ** -0.5
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                        implementation="cudnn")


def torch_dtype(torch: Any, name: str) -> Any:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


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
            (name, lambda fn=fn, args=args: time_jax(fn, *args, warmup=warmup, runs=runs))
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
