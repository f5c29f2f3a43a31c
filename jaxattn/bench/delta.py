"""Gated delta rule benchmark (:func:`jaxattn.gated_delta_rule`, Gated DeltaNet): the chunked Pallas forward kernel
and its backward kernel ("jaxattn"), the XLA chunked path ("xla-chunked": triangular solves and a
scan over chunks), the token-by-token recurrence ("scan"), and flash-linear-attention's
``chunk_gated_delta_rule`` (PyTorch, Triton) when importable. With several batch rows, "jaxattn-varlen" runs the
same rows as documents packed in one row (``cu_seqlens``, each from its own state; fla's ``cu_seqlens`` form
beside it): the cost of the varlen layout. "jaxattn-gla" is gated linear attention on the same inputs without the
delta rule (:func:`jaxattn.gated_linear_attention`: Mamba-2's SSD, or GLA per key channel; fla's ``chunk_simple_gla``
/ ``chunk_gla`` beside it as "fla-gla"; with one decay per head, mamba_ssm's ``mamba_chunk_scan_combined`` as
"mamba-ssd", the same recurrence as Mamba-2's SSD). L2-normalized q and k, as Gated DeltaNet's. Cases
with ``decay="channel"`` give each key channel its own decay (Kimi Delta Attention, ``g [B, N, H, d_k]``; the peer:
fla's ``chunk_kda``).

FLOPs (chunk C = 64, counted as the chunked form does them): forward ``B*H*N*(2*C*(2*d + e) + 6*d*e)`` (the
in-chunk ``K Kᵀ``, ``Q Kᵀ`` and their products with the values, the state's reads and update); forward+backward
3x that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import runner
from jaxattn.reference.gated_delta import gated_delta_reference


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    dtype: str
    mode: str
    decay: str = "head"  # "head": g [B, N, H] (Gated DeltaNet); "channel": g [B, N, H, d_k] (Kimi Delta Attention)

    @property
    def flops(self) -> float:
        d = e = self.head_dim
        f = self.batch * self.heads * self.seq * (2 * 64 * (2 * d + e) + 6 * d * e)
        return f * (3.0 if self.mode == "fwd+bwd" else 1.0)


def gpu_cases(seqs, head_dims, dtypes, modes, tokens: int = 65536, model_dim: int = 2048,
              decays=("head", "channel")):
    for decay in decays:
        for case in runner.seq_sweep(Case, seqs, head_dims, dtypes, modes, tokens, model_dim):
            yield dataclasses.replace(case, decay=decay)


def smoke_cases():
    for m in ("fwd", "fwd+bwd"):
        for decay in ("head", "channel"):
            yield Case(1, 128, 2, 32, "float32", m, decay)
    yield Case(2, 64, 2, 32, "float32", "fwd")  # (two rows: the varlen peer)


def _decay_shape(case: Case) -> tuple[int, ...]:
    shape = (case.batch, case.seq, case.heads)
    return shape + (case.head_dim,) if case.decay == "channel" else shape


def inputs(case: Case) -> tuple:
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    dt = jnp.dtype(case.dtype)
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = (unit(jax.random.normal(key, shape)).astype(dt) for key in ks[:2])
    v = jax.random.normal(ks[2], shape).astype(dt)
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], _decay_shape(case)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], shape[:3]))
    return q, k, v, g, beta, jax.random.normal(ks[5], shape).astype(dt)


def peers(case: Case) -> dict[str, Callable[..., Any]]:
    ops = {"jaxattn": lambda q, k, v, g, b: jaxattn.gated_delta_rule(q, k, v, g, b, impl="pallas"),
           "xla-chunked": lambda q, k, v, g, b: jaxattn.gated_delta_rule(q, k, v, g, b, impl="xla"),
           "jaxattn-gla": lambda q, k, v, g, b: jaxattn.gated_linear_attention(q, k, v, g, impl="pallas")}
    if case.batch > 1:  # the rows as packed documents (cu_seqlens)
        ops["jaxattn-varlen"] = lambda q, k, v, g, b: _as_documents(q, k, v, g, b)
    if case.seq <= 8192:  # (one step per token)
        ops["scan"] = lambda q, k, v, g, b: gated_delta_reference(q, k, v, g, b)[0].astype(q.dtype)
    return {name: runner.jax_mode_fn(op, case.mode, n_diff=5) for name, op in ops.items()}


def _as_documents(q, k, v, g, beta):
    batch, n = q.shape[:2]
    one = lambda x: x.reshape(1, batch * n, *x.shape[2:])  # noqa: E731
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * n
    o = jaxattn.gated_delta_rule(one(q), one(k), one(v), one(g), one(beta), cu_seqlens=cu, impl="pallas")
    return o.reshape(q.shape[:2] + o.shape[2:])


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """flash-linear-attention's ``chunk_gated_delta_rule`` (``chunk_kda`` with a decay per key channel), when
    installed with CUDA."""
    if (found := runner.cuda_torch(case.dtype)) is None:
        return {}
    torch, dt = found
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    bwd = case.mode == "fwd+bwd"
    try:
        if case.decay == "channel":
            from fla.ops.kda import chunk_kda as chunk_gated_delta_rule
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001
        return {}
    try:
        if case.decay == "channel":
            from fla.ops.gla import chunk_gla
        else:
            from fla.ops.simple_gla import chunk_simple_gla as chunk_gla
    except Exception:  # noqa: BLE001
        chunk_gla = None
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001
        mamba_chunk_scan_combined = None
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    q, k = (unit(torch.randn(shape, device="cuda")).to(dt).requires_grad_(bwd) for _ in range(2))
    v, do = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=bwd) for _ in range(2))
    g = (-0.1 * torch.nn.functional.softplus(torch.randn(_decay_shape(case), device="cuda"))).requires_grad_(bwd)
    beta = torch.sigmoid(torch.randn(shape[:3], device="cuda")).to(dt).requires_grad_(bwd)

    def run(packed: bool = False):
        if packed:  # the rows as documents of one row (fla's cu_seqlens)
            one = lambda x: x.reshape(1, -1, *x.shape[2:])  # noqa: E731
            cu = torch.arange(case.batch + 1, device="cuda", dtype=torch.long) * case.seq
            o, _ = chunk_gated_delta_rule(one(q), one(k), one(v), one(g), one(beta), cu_seqlens=cu)
            o = o.reshape(do.shape)
        else:
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
        if bwd:
            torch.autograd.grad(o, (q, k, v, g, beta), do)
        return o

    def gla():
        o, _ = chunk_gla(q, k, v, g)
        if bwd:
            torch.autograd.grad(o, (q, k, v, g), do)
        return o

    def ssd():  # (g_t = dt_t A with A = -1: dt = -g; the values enter times dt, as v does here)
        dt = (-g).detach().requires_grad_(bwd)
        y = mamba_chunk_scan_combined(v, dt, -torch.ones(case.heads, device="cuda"), k, q, chunk_size=64)
        if bwd:
            torch.autograd.grad(y, (v, dt, k, q), do)
        return y

    name = "fla-kda" if case.decay == "channel" else "fla-gated-delta"
    return {name: run, **({f"{name}-varlen": lambda: run(True)} if case.batch > 1 else {}),
            **({"fla-gla": gla} if chunk_gla is not None else {}),
            **({"mamba-ssd": ssd} if mamba_chunk_scan_combined is not None and case.decay == "head" else {})}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    del interpret  # (impl="pallas" runs in interpret mode without a GPU)
    return runner.run(cases, inputs=inputs, peers=peers, torch_peers=torch_peers, warmup=warmup, runs=runs,
                      progress=progress, desc="delta", **kw)
