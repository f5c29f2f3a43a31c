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

A decay per key channel (Kimi Delta Attention, ``G [n, d_k]``): the gammas become ``[C, d_k]`` tiles and
``gamma_C`` a column over the state's rows; ``Q Kᵀ`` and ``K Kᵀ`` with the decays inside their sums come from
:mod:`jaxattn.pallas.channel_decay`'s kernel (no state needed), and the backward writes their gradients (per
value block) for that module's backward kernel, which takes them to q, k and ``G``.

Variable-length documents (``documents``: flash-linear-attention's ``cu_seqlens`` laid on chunk boundaries by
:mod:`jaxattn.ops.gated_delta_varlen`): both kernels scan document by document over each one's chunk range, each
from its own initial state (its final state's gradient) to its own final state (its initial state's gradient).
``delta=False`` is gated linear attention, ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ`` (Mamba-2's SSD, GLA): ``U = V``, no
triangular system and no ``K Kᵀ`` (:mod:`jaxattn.ops.gated_linear`).
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

from jaxattn.pallas import _common, channel_decay
from jaxattn.pallas._common import dot

__all__ = ["gated_delta_kernel", "GatedDeltaConfig", "CHANNEL_CONFIG", "GATED_LINEAR_CHANNEL_CONFIG", "kernel_ok",
           "kernel_config", "CHUNK"]

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


# A decay per key channel (Kimi Delta Attention): the gammas are [C, d_k] tiles, not [C] vectors. sm_90a at d_k =
# 128, bf16 (Triton 3.9): the forward spills 32 B per thread at 64 columns, none at 32 (2 stages, saving the states
# too; 1 stage spilled 80); the backward spills 136 B at 16 columns, 8 warps, 2-3 stages (144-2256 B at every
# other column count, warp count and stage count tried; XLA's own Triton pipeline (jax 0.10): 536 B).
CHANNEL_CONFIG = GatedDeltaConfig(block_v=32, saving_num_stages=2)
# Gated linear attention (delta=False) per key channel: its backward at 16 columns spilled 1.3-2.8 KB per thread
# (both pipelines, 1-3 stages); at 32 columns, 8 warps, 3 stages none under Triton 3.9's pipeline (72 B under XLA's;
# 64 columns: 32 and 392 B; 4 warps: over 1.3 KB).
GATED_LINEAR_CHANNEL_CONFIG = GatedDeltaConfig(block_v=32, saving_num_stages=2, bwd_block_v=32)


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
    channel: bool = False  # a decay per key channel (Kimi Delta Attention): G [n, d_k]
    varlen: bool = False  # documents on chunk boundaries, each with its own initial and final state
    delta: bool = True  # the delta rule; False: gated linear attention, S_t = exp(g_t) S_{t-1} + k_t v_tᵀ (beta unread)


def _masks(c: int):
    rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return rows >= cols, rows > cols, jnp.where(rows == cols, 1.0, 0.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Decays:
    """One chunk's decays: vectors over the tokens with one decay per head, ``[c, d_k]`` tiles per key channel
    (:meth:`tile` broadcasts either against ``[c, d_k]``)."""
    gam: jax.Array  # [c] | [c, d_k]: gamma = exp(G), the decay from the incoming state to each token
    e: jax.Array  # [c] | [c, d_k]: gamma_C / gamma, from each token to the chunk's end
    decay: jax.Array  # [1] | [1, d_k]: gamma_C, the incoming state's decay through the chunk
    keep: jax.Array  # [c, c] bool: j <= i in one document
    gam_ij: jax.Array | None  # [c, c]: Gamma_ij = gamma_i / gamma_j on keep (one decay per head only)

    @staticmethod
    def tile(x: jax.Array) -> jax.Array:
        return x[:, None] if x.ndim == 1 else x

    def rows(self, dkd: int) -> jax.Array:
        """gamma_C as a column over the state's rows (``[d_k, 1]``; ``[1, 1]`` with one decay per head)."""
        return self.decay[:, None] if self.decay.ndim == 1 else jnp.reshape(self.decay, (dkd, 1))


def _chunk_decays(g_ref, seg_ref, i, st: _Static, masks) -> _Decays:
    """Chunk ``i``'s decays; with packed documents, zero across a document start (a token sees the chunk's
    incoming state, an earlier token or the chunk's last token only inside its own document)."""
    incl = masks[0]
    c = st.chunk
    sl = pl.ds(pl.multiple_of(i * c, c), c)
    if st.channel:
        gcum, g_last = g_ref[sl, :], g_ref[pl.ds(i * c + c - 1, 1), :]  # [c, d_k], [1, d_k]
    else:
        gcum, g_last = g_ref[sl], g_ref[pl.ds(i * c + c - 1, 1)]  # [c], [1]
    gam, e, decay = jnp.exp(gcum), jnp.exp(g_last - gcum), jnp.exp(g_last)
    keep = incl
    if st.segments:
        seg = seg_ref[sl]
        prev = seg_ref[pl.ds(jnp.maximum(i * c - 1, 0), 1)]  # (the incoming state's document; the first chunk: its own)
        last = seg_ref[pl.ds(i * c + c - 1, 1)]
        keep = incl & (seg[:, None] == seg[None, :])
        fit = (lambda m: m[:, None]) if st.channel else (lambda m: m)  # noqa: E731  (masks over the tokens)
        gam = jnp.where(fit(seg == prev), gam, 0.0)
        e = jnp.where(fit(seg == last), e, 0.0)
        decay = jnp.where(fit(last == prev), decay, 0.0)
    gam_ij = None if st.channel else jnp.where(keep, jnp.exp(jnp.where(incl, gcum[:, None] - gcum[None, :], 0.0)),
                                               0.0)
    return _Decays(gam, e, decay, keep, gam_ij)


def _decayed(a, b, pk_refs, which: int, i, d: _Decays, st: _Static):
    """The chunk's ``A Bᵀ`` with the decays between the tokens, zero outside ``keep`` (fp32): ``P = Q Kᵀ``
    (``which`` 0; ``P_ij = sum_c q_ic k_jc exp(G_ic - G_jc)``) or ``K Kᵀ`` (1). Per key channel they come in
    precomputed (:mod:`jaxattn.pallas.channel_decay`, ``pk_refs``)."""
    if st.channel:
        return jnp.where(d.keep, pk_refs[which][pl.ds(pl.multiple_of(i * st.chunk, st.chunk), st.chunk), :], 0.0)
    return dot(a, b, trans_b=True, precision=st.precision) * d.gam_ij


def _pair_grads(dp, dab, q, k, p, kk, d: _Decays, st: _Static):
    """Back through the decayed products (one decay per head), given ``dp`` (``P``'s gradient) and ``dab``
    (``K Kᵀ``'s, on keep; None: no ``K Kᵀ``, gated linear attention): ``(dq, dk, dG [c])``."""
    prec, dt = st.precision, q.dtype
    dp_gam = (dp * d.gam_ij).astype(dt)
    dq = dot(dp_gam, k, precision=prec)
    dk = dot(dp_gam, q, trans_a=True, precision=prec)
    dgg = dp * p  # the gradient of G_i - G_j
    if dab is not None:
        dab_gam = (dab * d.gam_ij).astype(dt)
        dk += dot(dab_gam, k, precision=prec) + dot(dab_gam, k, trans_a=True, precision=prec)
        dgg += dab * kk
    return dq, dk, jnp.sum(dgg, axis=1) - jnp.sum(dgg, axis=0)


def _triangle(kk, beta, masks):
    """``(I + A)^{-1}`` (fp32) of ``A = beta_i (K Kᵀ)_ij`` below the diagonal (decayed ``K Kᵀ``)."""
    _, strict, eye = masks
    c = kk.shape[0]
    a = jnp.where(strict, beta[:, None] * kk, 0.0)
    inv, p = eye - a, dot(a, a, precision=_HP)
    for _ in range(int(math.log2(c)) - 1):  # (I - A)(I + A^2)(I + A^4)...: the Neumann series of (I + A)^-1
        inv = dot(inv, eye + p, precision=_HP)
        p = dot(p, p, precision=_HP)
    return inv


def _split_refs(refs, st: _Static):
    """``(segment ids' ref or None, the documents' chunk range refs (begin, end) or (), the decayed products' refs
    (per key channel) or (), the rest)``."""
    seg_ref, refs = (refs[0], refs[1:]) if st.segments else (None, refs)
    doc_refs, refs = (refs[:2], refs[2:]) if st.varlen else ((), refs)
    n_pk = (2 if st.delta else 1) if st.channel else 0  # (P, and K Kᵀ with the delta rule)
    return (seg_ref, doc_refs, refs[:n_pk], refs[n_pk:])


def _scan(body, n_chunks: int, doc_refs, s_in_ref, s_out_ref, rows: int, reverse: bool = False) -> None:
    """``body(i, s) -> s`` over the chunks (in reverse: ``i = n_chunks - 1 - j``) from ``s_in_ref``'s state, the
    last into ``s_out_ref``; varlen (``doc_refs``: each document's chunk range): document by document, each from
    its own rows of ``s_in_ref`` (``[documents * rows, block_v]``) to its rows of ``s_out_ref`` (an empty document
    passes its state through; chunks past the last document are not visited)."""
    if not doc_refs:
        step = (lambda j, s: body(n_chunks - 1 - j, s)) if reverse else body  # noqa: E731
        s_out_ref[...] = lax.fori_loop(0, n_chunks, step, s_in_ref[...].astype(jnp.float32))
        return
    begin_ref, end_ref = doc_refs

    def document(d, carry):
        lo, hi = begin_ref[d], end_ref[d]
        sl = pl.ds(pl.multiple_of(d * rows, rows), rows)
        step = (lambda j, s: body(hi - 1 - (j - lo), s)) if reverse else body  # noqa: E731
        s_out_ref[sl, :] = lax.fori_loop(lo, hi, step, s_in_ref[sl, :].astype(jnp.float32)).astype(s_out_ref.dtype)
        return carry

    lax.fori_loop(0, begin_ref.shape[0], document, 0)


def _kernel(q_ref, k_ref, v_ref, g_ref, b_ref, *refs, st: _Static):
    seg_ref, doc_refs, pk_refs, (s0_ref, o_ref, s_ref, *states_ref) = _split_refs(refs, st)
    c = st.chunk
    masks = _masks(c)
    dk = k_ref.shape[-1]

    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        beta = b_ref[sl] if st.delta else None  # [c] fp32
        d = _chunk_decays(g_ref, seg_ref, i, st, masks)
        inv = _triangle(_decayed(k, k, pk_refs, 1, i, d, st), beta, masks) if st.delta else None
        # U = T (V - gamma K S): the state's prediction first ([c, block_v]), never T gamma K ([c, d_k]); the
        # state's matmuls on the tensor cores in the inputs' dtype (fp32 accumulation), as Lightning's
        dt = q.dtype
        s_lo = s.astype(dt)
        if states_ref:  # (for the backward: the state each chunk starts from, as the matmuls read it)
            states_ref[0][pl.ds(pl.multiple_of(i * dk, dk), dk), :] = s_lo
        if st.delta:
            pred = dot((k.astype(jnp.float32) * d.tile(d.gam)).astype(dt), s_lo, precision=st.precision)
            u_lo = dot(inv * beta[None, :], v.astype(jnp.float32) - pred, precision=_HP).astype(dt)
        else:  # gated linear attention: the values enter the state as they are
            u_lo = v
        p = _decayed(q, k, pk_refs, 0, i, d, st).astype(dt)
        o = dot((q.astype(jnp.float32) * d.tile(d.gam)).astype(dt), s_lo, precision=st.precision) \
            + dot(p, u_lo, precision=st.precision)
        o_ref[sl, :] = (o * st.scale).astype(o_ref.dtype)
        k_dec = (k.astype(jnp.float32) * d.tile(d.e)).astype(dt)
        return d.rows(dk) * s + dot(k_dec, u_lo, trans_a=True, precision=st.precision)

    _scan(body, st.n // c, doc_refs, s0_ref, s_ref, dk)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, *refs, st: _Static):
    """The chunks in reverse, the state's gradient ``dS [d_k, block_v]`` (fp32) carried; each chunk's forward
    recomputed from the state it started from (``h_ref``). The gradients of q, k, the log decays and beta are
    this program's value columns' share (summed over the column blocks outside)."""
    seg_ref, doc_refs, pk_refs, refs = _split_refs(refs, st)
    h_ref, do_ref, dsn_ref, dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, *dpk_refs = refs
    c = st.chunk
    masks = _masks(c)
    _, strict, _ = masks
    dkd = k_ref.shape[-1]
    f32 = jnp.float32
    last = lax.broadcasted_iota(jnp.int32, (c, 1) if st.channel else (c,), 0) == c - 1
    # per head, the decays' gradient terms summed over the key channels as they form
    red = (lambda x: x) if st.channel else (lambda x: jnp.sum(x, axis=1))  # noqa: E731

    def body(i, ds):  # ds: the gradient of the state after chunk i
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        beta = b_ref[sl] if st.delta else None
        d = _chunk_decays(g_ref, seg_ref, i, st, masks)
        if st.delta:
            kk = _decayed(k, k, pk_refs, 1, i, d, st)
            inv = _triangle(kk, beta, masks)
        s = h_ref[pl.ds(pl.multiple_of(i * dkd, dkd), dkd), :]  # [d_k, block_v], the inputs' dtype
        dt, prec = q.dtype, st.precision
        kf = k.astype(f32)
        gam, e = d.tile(d.gam), d.tile(d.e)
        if st.delta:
            k_gam = (kf * gam).astype(dt)
            t = inv * beta[None, :]  # T = (I + A)^{-1} diag(beta)
            w = v.astype(f32) - dot(k_gam, s, precision=prec)  # U = T W
            u_lo = dot(t, w, precision=_HP).astype(dt)
        else:  # gated linear attention: U = V
            u_lo = v
        do = (do_ref[sl, :].astype(f32) * st.scale).astype(dt)
        # O = (gamma Q) S + P U: the query side first (its tensors die early; per key channel, stored as they form)
        p = _decayed(q, k, pk_refs, 0, i, d, st)
        dp = jnp.where(d.keep, dot(do, u_lo, trans_b=True, precision=prec), 0.0)
        dq_gam = dot(do, s, trans_b=True, precision=prec)  # [c, d_k]
        dq = dq_gam * gam
        if st.channel:  # (the products' gradients go to channel_decay's backward, after the value blocks' sum)
            dpk_refs[0][sl, :] = dp
            dq_ref[sl, :] = dq
        qf = q.astype(f32)
        dgc = red(dq_gam * qf) * d.gam  # the gradient of G, accumulated
        ds_prev = d.rows(dkd) * ds + dot((qf * gam).astype(dt), do, trans_a=True, precision=prec)
        # S' = gamma_C S + K_decᵀ U
        ds_lo = ds.astype(dt)
        dk_dec = dot(u_lo, ds_lo, trans_b=True, precision=prec)
        dk = dk_dec * e  # the gradient of k, accumulated
        de = red(dk_dec * kf) * d.e
        dgc -= de
        de_sum = jnp.sum(de, axis=0, keepdims=True)  # (the chunk's last token's)
        du = dot(p.astype(dt), do, trans_a=True, precision=prec) + dot((kf * e).astype(dt), ds_lo, precision=prec)
        if st.delta:  # U = T W, W = V - (gamma K) S
            dw = dot(t, du, trans_a=True, precision=_HP)
            dtm = dot(du, w, trans_b=True, precision=_HP)
            dv_ref[sl, :] = dw.astype(dv_ref.dtype)
            dw_lo = dw.astype(dt)
            dk_gam = -dot(dw_lo, s, trans_b=True, precision=prec)
            dk += dk_gam * gam
            dgc += red(dk_gam * kf) * d.gam
        dgam_last = red(jnp.sum(s.astype(f32) * ds, axis=1)[None, :])  # [1] | [1, d_k]
        dgc += jnp.where(last, de_sum + dgam_last * d.decay, 0.0)
        if not st.delta:  # gated linear attention: U = V
            dv_ref[sl, :] = du.astype(dv_ref.dtype)
        if st.channel:
            dk_ref[sl, :] = dk
            dg_ref[sl, :] = dgc
        dab, dbeta = None, jnp.zeros((c,), f32)  # (gated linear attention: no K Kᵀ, no beta)
        if st.delta:
            ds_prev -= dot(k_gam, dw_lo, trans_a=True, precision=prec)
            # T = M diag(beta), M = (I + A)^{-1}: dA = -Mᵀ dM Mᵀ; A = beta_i (K Kᵀ)_ij below the diagonal
            dbeta = jnp.sum(inv * dtm, axis=0)
            da = jnp.where(strict & d.keep, -dot(dot(inv, dtm * beta[None, :], trans_a=True, precision=_HP), inv,
                                                 trans_b=True, precision=_HP), 0.0)
            dbeta += jnp.sum(da * kk, axis=1)
            dab = da * beta[:, None]
            if st.channel:
                dpk_refs[1][sl, :] = dab
        if not st.channel:
            dq_p, dk_p, dg_p = _pair_grads(dp, dab, q, k, p, kk if st.delta else None, d, st)
            dq_ref[sl, :] = dq + dq_p
            dk_ref[sl, :] = dk + dk_p
            dg_ref[sl] = dgc + dg_p
        db_ref[sl] = dbeta
        return ds_prev

    _scan(body, st.n // c, doc_refs, dsn_ref, ds0_ref, dkd, reverse=True)


def _segment_spec(n: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, n), lambda bi, hi, vi: (bi, 0))


def _decay_spec(n: int, dk: int, st: _Static) -> pl.BlockSpec:
    if st.channel:
        return pl.BlockSpec((None, n, None, dk), lambda bi, hi, vi: (bi, 0, hi, 0))
    return pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi))


def _static(q, gcum, seg, n, scale, cfg: GatedDeltaConfig, interpret, delta: bool) -> _Static:
    """``seg``: segment ids ``[b, n]``, or a varlen pair ``(begin, end) [documents]`` (each document's chunks), or
    None."""
    return _Static(n, scale, interpret, _HP if jnp.dtype(q.dtype) == jnp.float32 else None, cfg.chunk,
                   seg is not None and not isinstance(seg, tuple), gcum.ndim == 4, isinstance(seg, tuple), delta)


def _doc_inputs(seg, n: int, st: _Static):
    """The segment ids' or the varlen chunk ranges' (arrays, block specs)."""
    if st.segments:
        return [seg], [_segment_spec(n)]
    if st.varlen:
        return list(seg), [_common.whole_block(seg[0].shape)] * 2
    return [], []


def _forward(q, k, v, gcum, beta, seg, s0, scale, cfg: GatedDeltaConfig, interpret, delta: bool,
             save_states: bool = False):
    b, n, hk, dk = q.shape
    h, dv = v.shape[2:]
    bv = min(cfg.block_v, dv)
    st = _static(q, gcum, seg, n, scale, cfg, interpret, delta)
    seq = lambda width: pl.BlockSpec((None, n, None, width), lambda bi, hi, vi: (bi, 0, hi // (h // hk), 0))  # noqa: E731
    vblock = lambda rows: pl.BlockSpec((None, None, rows, bv), lambda bi, hi, vi: (bi, hi, 0, vi))  # noqa: E731
    srows = s0.shape[2]  # d_k, or (varlen) documents * d_k
    out_shape = [jax.ShapeDtypeStruct((b, n, h, dv), q.dtype), jax.ShapeDtypeStruct((b, h, srows, dv), jnp.float32)]
    out_specs = [pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)), vblock(srows)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, n // cfg.chunk * dk, dv), q.dtype))
        out_specs.append(vblock(n // cfg.chunk * dk))
    pk = channel_decay.decayed_products(q, k, gcum, cfg.chunk, interpret, keys=delta) if st.channel else ()
    chunk_rows = pl.BlockSpec((None, n, None, cfg.chunk), lambda bi, hi, vi: (bi, 0, hi, 0))
    docs, doc_specs = _doc_inputs(seg, n, st)
    call = _common.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=out_shape,
        grid=(b, h, dv // bv),
        in_specs=[seq(dk), seq(dk), pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
                  _decay_spec(n, dk, st), pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi)),
                  *doc_specs, *[chunk_rows] * len(pk), vblock(srows)],
        out_specs=out_specs,
        num_warps=cfg.num_warps, num_stages=cfg.saving_num_stages if save_states else cfg.num_stages,
        interpret=interpret, name="jaxattn_gated_delta_fwd")
    return call(q, k, v, gcum, beta, *docs, *pk, s0)


def _backward(q, k, v, gcum, beta, seg, states, do, ds_final, scale, cfg: GatedDeltaConfig, interpret, delta: bool):
    b, n, hk, dk = q.shape
    h, dv = v.shape[2:]
    bv = min(cfg.bwd_block_v, dv)
    nvb = dv // bv
    st = _static(q, gcum, seg, n, scale, cfg, interpret, delta)
    seq = lambda width: pl.BlockSpec((None, n, None, width), lambda bi, hi, vi: (bi, 0, hi // (h // hk), 0))  # noqa: E731
    cols = pl.BlockSpec((None, n, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi))
    tok = pl.BlockSpec((None, n, None), lambda bi, hi, vi: (bi, 0, hi))
    vblock = lambda rows: pl.BlockSpec((None, None, rows, bv), lambda bi, hi, vi: (bi, hi, 0, vi))  # noqa: E731
    part = lambda *w: pl.BlockSpec((None, None, n, None, *w), lambda bi, hi, vi: (vi, bi, 0, hi) + (0,) * len(w))  # noqa: E731
    f32 = jnp.float32
    pk = channel_decay.decayed_products(q, k, gcum, cfg.chunk, interpret, keys=delta) if st.channel else ()  # (recomputed)
    chunk_rows = pl.BlockSpec((None, n, None, cfg.chunk), lambda bi, hi, vi: (bi, 0, hi, 0))
    dpk = [jax.ShapeDtypeStruct((nvb, b, n, h, cfg.chunk), f32)] * len(pk)
    srows = ds_final.shape[2]  # d_k, or (varlen) documents * d_k
    docs, doc_specs = _doc_inputs(seg, n, st)
    call = _common.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((nvb, b, n, h, dk), f32), jax.ShapeDtypeStruct((nvb, b, n, h, dk), f32),
                   jax.ShapeDtypeStruct((b, n, h, dv), f32), jax.ShapeDtypeStruct((nvb, *gcum.shape), f32),
                   jax.ShapeDtypeStruct((nvb, b, n, h), f32), jax.ShapeDtypeStruct((b, h, srows, dv), f32), *dpk],
        grid=(b, h, nvb),
        in_specs=[seq(dk), seq(dk), cols, _decay_spec(n, dk, st), tok, *doc_specs,
                  *[chunk_rows] * len(pk), vblock(n // cfg.chunk * dk), cols, vblock(srows)],
        out_specs=[part(dk), part(dk), cols, part(dk) if st.channel else part(), part(), vblock(srows),
                   *[part(cfg.chunk)] * len(pk)],
        num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages, interpret=interpret,
        name="jaxattn_gated_delta_bwd")
    dq, dkey, dval, dg, db, ds0, *dpk = call(q, k, v, gcum, beta, *docs, *pk, states, do, ds_final)
    dq, dkey, dg = dq.sum(0), dkey.sum(0), dg.sum(0)
    if st.channel:  # back through the decayed products, their gradients summed over the value blocks first
        dq_p, dk_p, dg_p = channel_decay.decayed_products_grads(q, k, gcum, dpk[0].sum(0),
                                                                dpk[1].sum(0) if delta else None, interpret)
        dq, dkey, dg = dq + dq_p, dkey + dk_p, dg + dg_p
    per_key_head = lambda x: x.reshape(b, n, hk, h // hk, dk).sum(3)  # noqa: E731  (value heads sharing q, k)
    return per_key_head(dq), per_key_head(dkey), dval, dg, db.sum(0), ds0


def _in_chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    b, n = g.shape[:2]
    return jnp.cumsum(g.astype(jnp.float32).reshape(b, n // chunk, chunk, *g.shape[2:]), axis=2).reshape(g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _gated_delta(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret, delta):
    return tuple(_forward(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret, delta))


def _fwd(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret, delta):
    o, s, states = _forward(q, k, v, gcum, beta, seg, s0, scale, cfg, interpret, delta, save_states=True)
    return (o, s), (q, k, v, gcum, beta, seg, states)


def _bwd(scale, cfg, interpret, delta, res, cts):
    q, k, v, gcum, beta, seg, states = res
    do, ds = cts
    dq, dk, dv, dg, db, ds0 = _backward(q, k, v, gcum, beta, seg, states, do.astype(q.dtype), ds.astype(jnp.float32),
                                        scale, cfg, interpret, delta)
    dseg = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), seg)  # (integer ids: no gradient)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, db, dseg, ds0


_gated_delta.defvjp(_fwd, _bwd)


def kernel_config(g, delta: bool = True) -> GatedDeltaConfig:
    """The default config for log decays ``g`` (``[.., heads]`` or, per key channel, ``[.., heads, d_k]``), with the
    delta rule or without (gated linear attention)."""
    if g.ndim == 4:
        return CHANNEL_CONFIG if delta else GATED_LINEAR_CHANNEL_CONFIG
    return GatedDeltaConfig()


def gated_delta_kernel(q, k, v, g, beta, *, scale: float, initial_state=None, segment_ids=None, documents=None,
                       config: GatedDeltaConfig | None = None, interpret: bool | None = None, delta: bool = True
                       ) -> tuple[jax.Array, jax.Array]:
    """``(o, final state)`` of validated inputs whose sequence is a multiple of :data:`CHUNK` (padded by
    :func:`jaxattn.gated_delta_rule`; q and k may have fewer heads than v, each shared by ``h_v / h_k``
    consecutive value heads; ``g [batch, seq, heads]``, or ``[batch, seq, heads, d_k]`` for a decay per key channel
    (Kimi Delta Attention: :data:`CHANNEL_CONFIG` by default); ``segment_ids [batch, seq]``: packed documents, each
    starting from a zero state, the initial state the first one's); differentiable in every float input (the
    backward kernels). ``documents``: variable-length documents laid on the config's chunk boundaries (batch 1),
    a pair of int32 ``[documents]``, each document's first chunk and the chunk past its last (chunks in no
    document are not visited: their outputs are left unwritten); ``initial_state`` is then ``[documents, heads,
    d_k, d_v]`` (required) and so is the final state (an empty document's: its initial one). ``delta=False``:
    gated linear attention, ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ`` (``beta`` None; no triangular solve)."""
    b, _, _, dk = q.shape
    h, dv = v.shape[2:]
    cfg = config or kernel_config(g, delta)
    if documents is not None:  # [D, H, d_k, d_v] -> [1, H, D * d_k, d_v]: each program's column block whole
        docs = initial_state.shape[0]
        s0 = initial_state.astype(jnp.float32).transpose(1, 0, 2, 3).reshape(1, h, docs * dk, dv)
        seg = tuple(jnp.asarray(x, jnp.int32) for x in documents)
    else:
        s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
        seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    beta = jnp.zeros(v.shape[:3], jnp.float32) if beta is None else beta.astype(jnp.float32)  # (unread without delta)
    o, s = _gated_delta(q, k, v, _in_chunk_cumsum(g, cfg.chunk), beta, seg, s0, scale, cfg, interpret, bool(delta))
    if documents is not None:
        s = s.reshape(h, docs, dk, dv).transpose(1, 0, 2, 3)
    return o, s
