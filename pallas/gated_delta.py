"""The gated delta rule's chunked forward and backward on Pallas's Triton backend (:mod:`jaxattn.ops.gated_delta` has the math).

One program per (batch row, head, block of ``block_v`` value columns): the delta rule is separable over the
state's value columns, so each program carries its ``[d_k, block_v]`` slice of the state (fp32, in registers)
through the chunks of ``C`` tokens (16 by default), in order. Per chunk: ``A = beta Gamma * (K Kᵀ)`` (strictly
lower), ``(I + A)^{-1} = (I - A)(I + A^2)(I + A^4)(I + A^8)`` (``A`` is nilpotent: ``log2 C`` factors, no
triangular solve), ``U = (I + A)^{-1} diag(beta) (V - gamma K S)``, ``O = gamma Q S + (Q Kᵀ * Gamma) U``, ``S <-
gamma_C S + (gamma_C / gamma K)ᵀ U``. The in-chunk cumulative log decays ``G`` come in precomputed (a cumsum in
XLA). The inverse's matmuls run in full fp32 (it would not survive TF32); the state's run on the tensor cores
in the inputs' dtype with fp32 accumulation (fp32 inputs: exact), as the Lightning kernel's do.

Backward (a second kernel, the same grid with ``bwd_block_v`` columns): under differentiation the forward also
writes the state each chunk starts from (in the inputs' dtype, as its matmuls read it: ``d_k / C`` times the
values' size); the backward walks the chunks in reverse with the state's gradient ``dS`` in registers (fp32),
recomputes each chunk's ``(I + A)^{-1}``, ``U`` and ``Q Kᵀ * Gamma`` from that state, and goes back through
``O``, ``S'``, ``U = T W``, the inverse (``dA = -Mᵀ dM Mᵀ``) and the decays. ``dv`` and the initial state's
gradient are each program's own; the gradients of q, k, ``G`` and beta are summed over the column blocks in XLA
(fp32 partials), and ``G``'s into the log decays' by the cumsum's transpose (XLA's autodiff). Packed documents
(segment ids): both kernels zero the decays across a document start (``Gamma_ij`` between documents, ``gamma_i``
for tokens past a start in the chunk, the state's carry through one). Head dims: powers of two from 16 to 256.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
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
    and 64-token ones 9-25 KB, at every column block and warp count tried. The backward is spill-free with 16
    columns, 8 warps and 3 stages at d_k = 128 and 64 (XLA's Triton; 2 stages spilled 192 B per thread, 32
    columns 212 B, 64 columns 632 B, 16 warps 1.8-2 KB). With packed documents (segment ids) the backward
    spills 184 B per thread at d_k = 128 (96-300 B at every stage and warp count tried). Under differentiation
    the forward also stores each chunk's starting state, and runs with ``saving_num_stages``: at 2 stages it
    spilled 8-16 B per thread at d_k = 128 (Triton 3.9's own pipeline), at 1 none."""

    block_v: int = 64
    num_warps: int = 8
    num_stages: int = 2
    saving_num_stages: int = 1
    chunk: int = 16
    bwd_block_v: int = 16
    bwd_num_warps: int = 8
    bwd_num_stages: int = 3


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
    segments: bool = False  # packed documents: segment ids come after beta


def _masks(c: int):
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return rows >= cols, rows > cols, jnp.where(rows == cols, 1.0, 0.0).astype(jnp.float32)


def _chunk_decays(gcum, g_last, seg_ref, i: int, st: _Static, masks):
    """A chunk's decays ``(gamma [c], Gamma [c, c], gamma_C / gamma [c], gamma_C [1])``; with packed documents,
    zero across a document start (a token sees the chunk's incoming state, an earlier token or the chunk's
    last token only inside its own document)."""
    incl = masks[0]
    c = st.chunk
    gam = jnp.exp(gcum)
    keep = incl
    e, decay = jnp.exp(g_last - gcum), jnp.exp(g_last)
    if st.segments:
        seg = seg_ref[pl.ds(pl.multiple_of(i * c, c), c)]
        prev = seg_ref[pl.ds(jnp.maximum(i * c - 1, 0), 1)]  # (the incoming state's document; the first chunk: its own)
        last = seg_ref[pl.ds(i * c + c - 1, 1)]
        keep = incl & (seg[:, None] == seg[None, :])
        gam = jnp.where(seg == prev, gam, 0.0)
        e = jnp.where(seg == last, e, 0.0)
        decay = jnp.where(last == prev, decay, 0.0)
    gam_ij = jnp.where(keep, jnp.exp(jnp.where(incl, gcum[:, None] - gcum[None, :], 0.0)), 0.0)
    return gam, gam_ij, e, decay


def _triangle(k, gam_ij, beta, masks, precision):
    """A chunk's ``K Kᵀ`` and ``(I + A)^{-1}`` (fp32)."""
    incl, strict, eye = masks
    c = gam_ij.shape[0]
    kk = dot(k, k, trans_b=True, precision=precision)
    a = jnp.where(strict, beta[:, None] * kk * gam_ij, 0.0)
    inv, p = eye - a, dot(a, a, precision=_HP)
    for _ in range(int(math.log2(c)) - 1):  # (I - A)(I + A^2)(I + A^4)...: the Neumann series of (I + A)^-1
        inv = dot(inv, eye + p, precision=_HP)
        p = dot(p, p, precision=_HP)
    return kk, inv


def _kernel(q_ref, k_ref, v_ref, g_ref, b_ref, *refs, st: _Static):
    seg_ref, (s0_ref, o_ref, s_ref, *states_ref) = (refs[0], refs[1:]) if st.segments else (None, refs)
    c = st.chunk
    masks = _masks(c)
    dk = k_ref.shape[-1]

    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        gcum, beta = g_ref[sl], b_ref[sl]  # [c] fp32
        g_last = g_ref[pl.ds(i * c + c - 1, 1)]  # [1]
        gam, gam_ij, e, decay = _chunk_decays(gcum, g_last, seg_ref, i, st, masks)
        _, inv = _triangle(k, gam_ij, beta, masks, st.precision)
        # U = T (V - gamma K S): the state's prediction first ([c, block_v]), never T gamma K ([c, d_k]); the
        # state's matmuls on the tensor cores in the inputs' dtype (fp32 accumulation), as Lightning's
        dt = q.dtype
        s_lo = s.astype(dt)
        if states_ref:  # (for the backward: the state each chunk starts from, as the matmuls read it)
            states_ref[0][pl.ds(pl.multiple_of(i * dk, dk), dk), :] = s_lo
        pred = dot((k.astype(jnp.float32) * gam[:, None]).astype(dt), s_lo, precision=st.precision)
        u = dot(inv * beta[None, :], v.astype(jnp.float32) - pred, precision=_HP)
        u_lo = u.astype(dt)
        qk = (dot(q, k, trans_b=True, precision=st.precision) * gam_ij).astype(dt)
        o = dot((q.astype(jnp.float32) * gam[:, None]).astype(dt), s_lo, precision=st.precision) \
            + dot(qk, u_lo, precision=st.precision)
        o_ref[sl, :] = (o * st.scale).astype(o_ref.dtype)
        k_dec = (k.astype(jnp.float32) * e[:, None]).astype(dt)
        return decay[:, None] * s + dot(k_dec, u_lo, trans_a=True, precision=st.precision)

    s_ref[...] = lax.fori_loop(0, st.n // c, body, s0_ref[...].astype(jnp.float32))


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, *refs, st: _Static):
    """The chunks in reverse, the state's gradient ``dS [d_k, block_v]`` (fp32) carried; each chunk's forward
    recomputed from the state it started from (``h_ref``). The gradients of q, k, the log decays and beta are
    this program's value columns' share (summed over the column blocks outside)."""
    seg_ref, refs = (refs[0], refs[1:]) if st.segments else (None, refs)
    h_ref, do_ref, dsn_ref, dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref = refs
    c = st.chunk
    masks = _masks(c)
    incl, strict, _ = masks
    dkd = k_ref.shape[-1]
    f32 = jnp.float32
    last = lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1

    def body(j, ds):  # ds: the gradient of the state after chunk i
        i = st.n // c - 1 - j
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        gcum, beta = g_ref[sl], b_ref[sl]
        g_last = g_ref[pl.ds(i * c + c - 1, 1)]  # [1]
        gam, gam_ij, e, decay = _chunk_decays(gcum, g_last, seg_ref, i, st, masks)
        kk, inv = _triangle(k, gam_ij, beta, masks, st.precision)
        s = h_ref[pl.ds(pl.multiple_of(i * dkd, dkd), dkd), :]  # [d_k, block_v], the inputs' dtype
        dt, prec = q.dtype, st.precision
        kf = k.astype(f32)
        k_gam = (kf * gam[:, None]).astype(dt)
        t = inv * beta[None, :]  # T = (I + A)^{-1} diag(beta)
        w = v.astype(f32) - dot(k_gam, s, precision=prec)  # U = T W
        u_lo = dot(t, w, precision=_HP).astype(dt)
        do = (do_ref[sl, :].astype(f32) * st.scale).astype(dt)
        # O = (gamma Q) S + P U with P = Q Kᵀ * Gamma: the query side first (its tensors die early)
        qk = dot(q, k, trans_b=True, precision=prec)
        dp = jnp.where(incl, dot(do, u_lo, trans_b=True, precision=prec), 0.0)
        dp_gam = (dp * gam_ij).astype(dt)
        dq_gam = dot(do, s, trans_b=True, precision=prec)  # [c, d_k]
        dq_ref[sl, :] = dot(dp_gam, k, precision=prec) + dq_gam * gam[:, None]
        qf = q.astype(f32)
        dgam = jnp.sum(dq_gam * qf, axis=1)  # the gradient of gamma, accumulated
        ds_prev = decay[:, None] * ds + dot((qf * gam[:, None]).astype(dt), do, trans_a=True, precision=prec)
        dk = dot(dp_gam, q, trans_a=True, precision=prec)  # the gradient of k, accumulated
        dgg = dp * qk * gam_ij  # the gradient of G_i - G_j, accumulated
        # S' = gamma_C S + K_decᵀ U
        ds_lo = ds.astype(dt)
        dk_dec = dot(u_lo, ds_lo, trans_b=True, precision=prec)
        dk += dk_dec * e[:, None]
        de = jnp.sum(dk_dec * kf, axis=1) * e
        dgam_last = jnp.sum(s.astype(f32) * ds)
        du = dot((qk * gam_ij).astype(dt), do, trans_a=True, precision=prec) \
            + dot((kf * e[:, None]).astype(dt), ds_lo, precision=prec)
        # U = T W, W = V - (gamma K) S
        dw = dot(t, du, trans_a=True, precision=_HP)
        dtm = dot(du, w, trans_b=True, precision=_HP)
        dv_ref[sl, :] = dw.astype(dv_ref.dtype)
        dw_lo = dw.astype(dt)
        dk_gam = -dot(dw_lo, s, trans_b=True, precision=prec)
        dk += dk_gam * gam[:, None]
        dgam += jnp.sum(dk_gam * kf, axis=1)
        ds_prev -= dot(k_gam, dw_lo, trans_a=True, precision=prec)
        # T = M diag(beta), M = (I + A)^{-1}: dA = -Mᵀ dM Mᵀ; A = beta_i Gamma_ij (K Kᵀ)_ij below the diagonal
        dbeta = jnp.sum(inv * dtm, axis=0)
        da = jnp.where(strict, -dot(dot(inv, dtm * beta[None, :], trans_a=True, precision=_HP), inv, trans_b=True,
                                    precision=_HP), 0.0)
        dbeta += jnp.sum(da * gam_ij * kk, axis=1)
        dkk = (da * beta[:, None] * gam_ij).astype(dt)
        dgg += da * beta[:, None] * kk * gam_ij
        dk += dot(dkk, k, precision=prec) + dot(dkk, k, trans_a=True, precision=prec)
        dgc = dgam * gam + jnp.sum(dgg, axis=1) - jnp.sum(dgg, axis=0) - de
        dgc += jnp.where(last, jnp.sum(de) + dgam_last * decay, 0.0)
        dk_ref[sl, :] = dk
        dg_ref[sl] = dgc
        db_ref[sl] = dbeta
        return ds_prev

    ds0_ref[...] = lax.fori_loop(0, st.n // c, body, dsn_ref[...])


def _segment_spec(n: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, n), lambda bi, hi, vi: (bi, 0))


def _forward(q, k, v, gcum, beta, seg, s0, scale, cfg: GatedDeltaConfig, interpret, save_states: bool = False):
    b, n, hk, dk = q.shape
    h, dv = v.shape[2:]
    bv = min(cfg.block_v, dv)
    st = _Static(n, scale, interpret, _HP if jnp.dtype(q.dtype) == jnp.float32 else None, cfg.chunk, seg is not None)
    seq = lambda width: pl.BlockSpec((None, n, None, width), lambda bi, hi, vi: (bi, 0, hi // (h // hk), 0))  # noqa: E731
    vblock = lambda rows: pl.BlockSpec((None, None, rows, bv), lambda bi, hi, vi: (bi, hi, 0, vi))  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((b, n, h, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)]
    out_specs = [pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)), vblock(dk)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, n // cfg.chunk * dk, dv), q.dtype))
        out_specs.append(vblock(n // cfg.chunk * dk))
    call = _common.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=out_shape,
        grid=(b, h, dv // bv),
        in_specs=[seq(dk), seq(dk), pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
                  pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi)),
                  pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi)),
                  *([_segment_spec(n)] if st.segments else []), vblock(dk)],
        out_specs=out_specs,
        num_warps=cfg.num_warps, num_stages=cfg.saving_num_stages if save_states else cfg.num_stages,
        interpret=interpret, name="jaxattn_gated_delta_fwd")
    return call(q, k, v, gcum, beta, *([seg] if st.segments else []), s0)


def _backward(q, k, v, gcum, beta, seg, states, do, ds_final, scale, cfg: GatedDeltaConfig, interpret):
    b, n, hk, dk = q.shape
    h, dv = v.shape[2:]
    bv = min(cfg.bwd_block_v, dv)
    nvb = dv // bv
    st = _Static(n, scale, interpret, _HP if jnp.dtype(q.dtype) == jnp.float32 else None, cfg.chunk, seg is not None)
    seq = lambda width: pl.BlockSpec((None, n, None, width), lambda bi, hi, vi: (bi, 0, hi // (h // hk), 0))  # noqa: E731
    cols = pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi))
    tok = pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi))
    vblock = lambda rows: pl.BlockSpec((None, None, rows, bv), lambda bi, hi, vi: (bi, hi, 0, vi))  # noqa: E731
    part = lambda *w: pl.BlockSpec((None, None, n, None, *w), lambda bi, hi, vi: (vi, bi, 0, hi) + (0,) * len(w))  # noqa: E731
    f32 = jnp.float32
    call = _common.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((nvb, b, n, h, dk), f32), jax.ShapeDtypeStruct((nvb, b, n, h, dk), f32),
                   jax.ShapeDtypeStruct((b, n, h, dv), f32), jax.ShapeDtypeStruct((nvb, b, n, h), f32),
                   jax.ShapeDtypeStruct((nvb, b, n, h), f32), jax.ShapeDtypeStruct((b, h, dk, dv), f32)],
        grid=(b, h, nvb),
        in_specs=[seq(dk), seq(dk), cols, tok, tok, *([_segment_spec(n)] if st.segments else []),
                  vblock(n // cfg.chunk * dk), cols, vblock(dk)],
        out_specs=[part(dk), part(dk), cols, part(), part(), vblock(dk)],
        num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages, interpret=interpret,
        name="jaxattn_gated_delta_bwd")
    dq, dkey, dval, dg, db, ds0 = call(q, k, v, gcum, beta, *([seg] if st.segments else []), states, do, ds_final)
    per_key_head = lambda x: x.sum(0).reshape(b, n, hk, h // hk, dk).sum(3)  # noqa: E731  (value heads sharing q, k)
    return per_key_head(dq), per_key_head(dkey), dval, dg.sum(0), db.sum(0), ds0


def _in_chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    b, n, h = g.shape
    return jnp.cumsum(g.astype(jnp.float32).reshape(b, n // chunk, chunk, h), axis=2).reshape(b, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _gated_delta(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret):
    return tuple(_forward(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret))


def _fwd(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret):
    o, s, states = _forward(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret, save_states=True)
    return (o, s), (q, k, v, gcum, beta, seg, states)


def _bwd(scale, cfg, interpret, res, cts):
    q, k, v, gcum, beta, seg, states = res
    do, ds = cts
    dq, dk, dv, dg, db, ds0 = _backward(q, k, v, gcum, beta, seg, states, do.astype(q.dtype), ds.astype(jnp.float32),
                                        scale, cfg, interpret)
    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)  # (integer ids: no gradient)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, db, dseg, ds0


_gated_delta.defvjp(_fwd, _bwd)


def gated_delta_kernel(q, k, v, g, beta, *, scale: float, initial_state=None, segment_ids=None,
                       config: GatedDeltaConfig | None = None, interpret: bool | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """``(o, final state)`` of validated inputs whose sequence is a multiple of :data:`CHUNK` (padded by
    :func:`jaxattn.gated_delta_rule`; q and k may have fewer heads than v, each shared by ``h_v / h_k``
    consecutive value heads; ``segment_ids [batch, seq]``: packed documents, each starting from a zero state, the
    initial state the first one's); differentiable in every float input (the backward kernel)."""
    b, _, _, dk = q.shape
    s0 = jnp.zeros((b, v.shape[2], dk, v.shape[-1]), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    cfg = config or GatedDeltaConfig()
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _gated_delta(q, k, v, _in_chunk_cumsum(g, cfg.chunk), beta.astype(jnp.float32), seg, s0, scale, cfg,
                        interpret)
