"""The gated delta rule's chunked forward on Pallas's Triton backend (:mod:`jaxattn.ops.gated_delta` has the math).

One program per (batch row, head, block of ``block_v`` value columns): the delta rule is separable over the
state's value columns, so each program carries its ``[d_k, block_v]`` slice of the state (fp32, in registers)
through the chunks of ``C`` tokens (16 by default), in order. Per chunk: ``A = beta Gamma * (K Kᵀ)`` (strictly
lower), ``(I + A)^{-1} = (I - A)(I + A^2)(I + A^4)(I + A^8)`` (``A`` is nilpotent: ``log2 C`` factors, no
triangular solve), ``U = (I + A)^{-1} diag(beta) (V - gamma K S)``, ``O = gamma Q S + (Q Kᵀ * Gamma) U``, ``S <-
gamma_C S + (gamma_C / gamma K)ᵀ U``. The in-chunk cumulative log decays ``G`` come in precomputed (a cumsum in
XLA). The inverse's matmuls run in full fp32 (it would not survive TF32); the state's run on the tensor cores
in the inputs' dtype with fp32 accumulation (fp32 inputs: exact), as the Lightning kernel's do.

The backward is the XLA chunked path's (``jax.vjp`` of it, recomputing from the inputs): a kernel backward is
future work. Head dims: powers of two from 16 to 256.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot

__all__ = ["gated_delta_kernel", "GatedDeltaConfig", "kernel_ok", "CHUNK"]

CHUNK = 64
_HP = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GatedDeltaConfig:
    """Value columns per program, warps, pipeline stages, and tokens per chunk (a power of two dividing
    :data:`CHUNK`, to which the sequence comes padded). On sm_90a at d_k = 128, bf16: 16-token chunks with 64
    columns and 8 warps compile spill-free (233 registers); 32-token chunks spilled 176-1816 B per thread
    and 64-token ones 9-25 KB, at every column block and warp count tried."""

    block_v: int = 64
    num_warps: int = 8
    num_stages: int = 2
    chunk: int = 16


def kernel_ok(dk: int, dv: int) -> bool:
    """Whether the kernel takes these head dims (powers of two from 16 to 256)."""
    return all(16 <= d <= 256 and d & (d - 1) == 0 for d in (dk, dv))


@dataclasses.dataclass(frozen=True)
class _Static:
    n: int  # tokens (a multiple of CHUNK)
    scale: float
    interpret: bool | None
    precision: object = None  # the input-dtype dots' (fp32 inputs: exact)
    chunk: int = CHUNK


def _kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s0_ref, o_ref, s_ref, *, st: _Static):
    c = st.chunk
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    incl, strict = rows >= cols, rows > cols
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(jnp.float32)

    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        gcum, beta = g_ref[sl], b_ref[sl]  # [c] fp32
        g_last = g_ref[pl.ds(i * c + c - 1, 1)]  # [1]
        gam = jnp.exp(gcum)
        gam_ij = jnp.where(incl, jnp.exp(jnp.where(incl, gcum[:, None] - gcum[None, :], 0.0)), 0.0)
        a = jnp.where(strict, beta[:, None] * dot(k, k, trans_b=True, precision=st.precision) * gam_ij, 0.0)
        inv, p = eye - a, dot(a, a, precision=_HP)
        for _ in range(int(math.log2(c)) - 1):  # (I - A)(I + A^2)(I + A^4)...: the Neumann series of (I + A)^-1
            inv = dot(inv, eye + p, precision=_HP)
            p = dot(p, p, precision=_HP)
        # U = T (V - gamma K S): the state's prediction first ([c, block_v]), never T gamma K ([c, d_k]); the
        # state's matmuls on the tensor cores in the inputs' dtype (fp32 accumulation), as Lightning's
        dt = q.dtype
        s_lo = s.astype(dt)
        pred = dot((k.astype(jnp.float32) * gam[:, None]).astype(dt), s_lo, precision=st.precision)
        u = dot(inv * beta[None, :], v.astype(jnp.float32) - pred, precision=_HP)
        u_lo = u.astype(dt)
        qk = (dot(q, k, trans_b=True, precision=st.precision) * gam_ij).astype(dt)
        o = dot((q.astype(jnp.float32) * gam[:, None]).astype(dt), s_lo, precision=st.precision) \
            + dot(qk, u_lo, precision=st.precision)
        o_ref[sl, :] = (o * st.scale).astype(o_ref.dtype)
        decay = jnp.exp(g_last)  # [1]
        k_dec = (k.astype(jnp.float32) * jnp.exp(g_last - gcum)[:, None]).astype(dt)
        return decay[:, None] * s + dot(k_dec, u_lo, trans_a=True, precision=st.precision)

    s_ref[...] = lax.fori_loop(0, st.n // c, body, s0_ref[...].astype(jnp.float32))


def _forward(q, k, v, gcum, beta, s0, scale, cfg: GatedDeltaConfig, interpret):
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    bv = min(cfg.block_v, dv)
    st = _Static(n, scale, interpret, _HP if jnp.dtype(q.dtype) == jnp.float32 else None, cfg.chunk)
    seq = lambda width: pl.BlockSpec((None, n, None, width), lambda bi, hi, vi: (bi, 0, hi, 0))  # noqa: E731
    call = _common.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((b, n, h, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
        grid=(b, h, dv // bv),
        in_specs=[seq(dk), seq(dk), pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
                  pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi)),
                  pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi)),
                  pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi: (bi, hi, 0, vi))],
        out_specs=[pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
                   pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi: (bi, hi, 0, vi))],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=interpret, name="jaxattn_gated_delta_fwd")
    return call(q, k, v, gcum, beta, s0)


def _in_chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    b, n, h = g.shape
    return jnp.cumsum(g.astype(jnp.float32).reshape(b, n // chunk, chunk, h), axis=2).reshape(b, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gated_delta(q, k, v, g, beta, s0, scale, cfg, interpret):
    return _forward(q, k, v, _in_chunk_cumsum(g, cfg.chunk), beta.astype(jnp.float32), s0, scale, cfg, interpret)


def _fwd(q, k, v, g, beta, s0, scale, cfg, interpret):
    return _gated_delta(q, k, v, g, beta, s0, scale, cfg, interpret), (q, k, v, g, beta, s0)


def _bwd(scale, cfg, interpret, res, cts):
    from jaxattn.ops.gated_delta import _xla  # (the XLA chunked path, recomputed: its VJP)

    q, k, v, g, beta, s0 = res
    _, vjp = jax.vjp(lambda q, k, v, g, beta, s0: _xla(q, k, v, g, beta, scale, s0), q, k, v, g, beta, s0)
    return vjp((cts[0].astype(q.dtype), cts[1]))


_gated_delta.defvjp(_fwd, _bwd)


def gated_delta_kernel(q, k, v, g, beta, *, scale: float, initial_state=None, config: GatedDeltaConfig | None = None,
                       interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """``(o, final state)`` of validated inputs whose sequence is a multiple of :data:`CHUNK` (padded by
    :func:`jaxattn.gated_delta_rule`); differentiable in every input (the backward: XLA's)."""
    b, _, h, dk = q.shape
    s0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    return _gated_delta(q, k, v, g, beta, s0, scale, config or GatedDeltaConfig(), interpret)
