"""Landmark attention on Pallas's Triton backend: forward, dq and dk/dv kernels.

One kv tile is one landmark block (``block_len`` tokens: regular ones then the landmark),
padded to ``P = next_pow2(block_len)`` rows; a query tile is one block as well. The grouped
softmax is rewritten as a plain softmax over *effective logits*::

    t_ij = s_ij + s_{i,L_g} - lse_{j' in g, regular}(s_ij')   (regular j in an earlier block g)
    t_ij = s_ij                                                (regular j <= i in the own block)
    t_ij = -inf                                                (landmarks, later keys, padding)

since ``sum_{j in g} exp(t_ij) = exp(s_{i,L_g})``, ``softmax_j(t_i)`` equals the landmark weights
``w_ij``. The inner per-block log-sum-exp is computed inside the tile, the outer softmax is an
online (flash) softmax over the tiles. One exponent per score, as flash attention: with ``e_ij =
exp(s_ij - max_g s)`` on an earlier tile's regular keys (``Z = sum e``), ``t``'s row max is
``s_{i,L_g} - log Z``, the inner softmax is ``pi = e / Z`` and every weight is ``e`` times a
per-row factor; the kernels work in base 2 (``exp2`` of one FMA on the unscaled ``q k^T``).
Backward: with ``dt = w * (dO v^T - delta)`` (delta = rowsum(dO * O)), the chain rule through
``t`` gives, per earlier tile, ``ds = dt - pi * r`` on regular keys and ``ds = r`` on the
landmark, where ``r = rowsum(dt)`` and ``pi`` is the inner softmax; in the own tile ``ds = dt``.
dq/dk follow from ``ds``, dv from ``w``.

Entry point ``landmark_attention_padded`` takes inputs already re-laid-out to ``[B, n_blocks * P,
H, D]`` (see ``jaxattn.ops.landmark``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot
from jaxattn.pallas.flash import LOG2E, online_softmax_init, online_softmax_step

NEG_INF = float("-inf")
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class LandmarkConfig:
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 1


def landmark_config(tile: int, head_dim: int, dtype: Any) -> LandmarkConfig:
    """Launch parameters for a (padded block ``tile``, padded head dim, dtype) triple."""
    size = tile * head_dim * jnp.dtype(dtype).itemsize
    big = size >= 128 * 128 * 2
    # backward: 8 warps and 2 stages from 64 x 128 bf16 tiles on (sm_90a, `python -m jaxattn.bench
    # compile --families landmark`: the dk/dv kernel spills ~0.4 KB per thread, ~0.7 KB on 4 warps)
    mid = size >= 64 * 128 * 2
    # fp32 (IEEE FMA dots, no tensor cores): 8 warps, 1 stage cut the forward's spill from 67 KB to
    # 3.5 KB per thread at 64 x 64 tiles; the backward kernels spill 3-8 KB (dq) and 30-55 KB
    # (dk/dv) at any launch: fp32 landmark attention is for checking, not speed
    fp32 = jnp.dtype(dtype) == jnp.float32
    return LandmarkConfig(num_warps=8 if big or fp32 else 4, num_stages=1 if big or fp32 else 2,
                          num_warps_bwd=8 if mid else 4, num_stages_bwd=2 if mid and not big else 1)


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    block_len: int  # true block length (landmark at index block_len - 1)
    tile: int  # padded block length P
    n_blocks: int
    seq_len: int  # true sequence length (tokens beyond it are padding)
    groups: int  # q heads per kv head
    cfg: LandmarkConfig
    interpret: bool | None
    precision: Any


# Tiles are [queries, keys], or [keys, queries] with ``tr`` (the dk/dv kernel's transposed scores).
def _keys(st: _Static, tr: bool):
    """Key index within the tile, shaped to broadcast along the tile's key axis."""
    i = jnp.arange(st.tile)
    return i[:, None] if tr else i[None, :]


def _per_query(x, tr: bool):
    """A per-query vector broadcast along the key axis."""
    return x[None, :] if tr else x[:, None]


def _logits(st: _Static, a, b):
    """``(x, c)``: a tile's base-2 logits are ``c * x`` with ``c > 0``: ``x = a b^T`` unscaled (so
    each exponent is one FMA, ``exp2(fma(x, c, -m))``) unless the scale is not positive."""
    x = dot(a, b, trans_b=True, precision=st.precision)
    c = st.scale * LOG2E
    return (x, c) if c > 0 else (x * c, 1.0)


def _exp2_minus(st: _Static, x, c: float, m, tr: bool):
    """``exp2(c x - m)`` (``m`` per query) as one FMA and one ``ex2`` per score on a GPU."""
    return jnp.exp2(_common.fma(x, c, -_per_query(m, tr), interpret=_common.resolve_interpret(st.interpret)))


def _earlier_tile(st: _Static, x, c: float, tr: bool = False):
    """An earlier block's tile from its logits ``c * x``: ``e`` (``exp2`` of the regular keys' logits
    less their row max, 0 elsewhere), its row sum ``z`` and ``t``'s base-2 row max ``s_L - log2 z``
    (``s_L`` the landmark's logit); the effective logits are ``t = log2(e) + t_max`` (see the
    module docstring), the inner softmax ``pi = e / z``."""
    ax = 0 if tr else 1
    cols = _keys(st, tr)
    x_reg = jnp.where(cols < st.block_len - 1, x, NEG_INF)  # (an earlier block is whole: >= 1 key)
    e = _exp2_minus(st, x_reg, c, jnp.max(x_reg, axis=ax) * c, tr)
    z = jnp.sum(e, axis=ax)
    s_lm = jnp.sum(jnp.where(cols == st.block_len - 1, x, 0.0), axis=ax) * c
    return e, z, s_lm - jnp.log2(z)


def _own_tile(st: _Static, x, blk, tr: bool = False):
    """Logits ``x`` of the query's own block ``blk``, -inf but on regular keys j <= i inside the sequence."""
    rows = _per_query(jnp.arange(st.tile), tr)
    cols = _keys(st, tr)
    keep = (cols < st.block_len - 1) & (cols <= rows) & (blk * st.block_len + cols < st.seq_len)
    return jnp.where(keep, x, NEG_INF)


# ----------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
    blk = st.n_blocks - 1 - pl.program_id(0)  # heaviest query blocks first
    q = q_ref[...]
    P = st.tile

    def body(g, carry):  # an earlier block: t = log2(e) + t_max, t_max its row max
        acc, m, l = carry
        ks = pl.ds(pl.multiple_of(g * P, P), P)
        e, z, t_max = _earlier_tile(st, *_logits(st, q, k_ref[ks, :]))
        m_new = jnp.maximum(m, t_max)
        alpha = jnp.exp2(m - m_new)
        f = jnp.exp2(t_max - m_new)  # per row: the weights are e * f
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + dot((e * f[:, None]).astype(v.dtype), v, precision=st.precision)
        return acc, m_new, l * alpha + z * f

    carry = lax.fori_loop(0, blk, body, online_softmax_init(P, v_ref.shape[-1]))
    ks = pl.ds(pl.multiple_of(blk * P, P), P)
    x, c = _logits(st, q, k_ref[ks, :])
    acc, m, l = online_softmax_step(carry, _own_tile(st, x, blk), v_ref[ks, :], st.precision, scale=c,
                                    interpret=_common.resolve_interpret(st.interpret))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)  # every row sees >= 1 key
    lse_ref[...] = (m + jnp.log2(l)) * LN2


def _fwd_call(st: _Static, q, k, v):
    batch, n, hq, d = q.shape
    e = v.shape[-1]
    P, g, nb = st.tile, st.groups, st.n_blocks
    qb = lambda i: nb - 1 - i  # noqa: E731
    call = _common.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((batch, n, hq, e), q.dtype),
                   jax.ShapeDtypeStruct((batch, hq, n), jnp.float32)],
        grid=(nb, batch, hq),
        in_specs=[pl.BlockSpec((None, P, None, d), lambda i, b, h: (b, qb(i), h, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, b, h: (b, 0, h // g, 0)),
                  pl.BlockSpec((None, n, None, e), lambda i, b, h: (b, 0, h // g, 0))],
        out_specs=[pl.BlockSpec((None, P, None, e), lambda i, b, h: (b, qb(i), h, 0)),
                   pl.BlockSpec((None, None, P), lambda i, b, h: (b, h, qb(i)))],
        num_warps=st.cfg.num_warps, num_stages=st.cfg.num_stages, interpret=st.interpret,
        name="jaxattn_landmark_fwd")
    return call(q, k, v)


# ----------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------


def _earlier_grads(st: _Static, x, c: float, lse2, dp, delta, tr: bool = False):
    """Weights ``w`` and logit cotangents ``ds`` of an earlier-block tile (``lse2``: base 2)."""
    e, z, t_max = _earlier_tile(st, x, c, tr)
    f = jnp.exp2(t_max - lse2)  # w = e * f (base 2: t - lse = log2(e) + t_max - lse)
    w = e * _per_query(f, tr)
    dt = w * (dp - _per_query(delta, tr))
    r = jnp.sum(dt, axis=0 if tr else 1)
    # ds = dt - pi r on regular keys (pi = e / z; e is 0 elsewhere), r on the landmark
    ds = dt - e * _per_query(r / z, tr) + jnp.where(_keys(st, tr) == st.block_len - 1, _per_query(r, tr), 0.0)
    return w, ds


def _own_grads(st: _Static, x, c: float, blk, lse2, dp, delta, tr: bool = False):
    w = _exp2_minus(st, _own_tile(st, x, blk, tr), c, lse2, tr)
    return w, w * (dp - _per_query(delta, tr))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static):
    P = st.tile
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * LOG2E, delta_ref[...]

    def tile(g):
        ks = pl.ds(pl.multiple_of(g * P, P), P)
        k, v = k_ref[ks, :], v_ref[ks, :]
        return _logits(st, q, k), k, dot(do, v, trans_b=True, precision=st.precision)

    def body(g, dq):
        (x, c), k, dp = tile(g)
        _, ds = _earlier_grads(st, x, c, lse2, dp, delta)
        return dq + dot(ds.astype(k.dtype), k, precision=st.precision)

    blk = st.n_blocks - 1 - pl.program_id(0)
    dq = lax.fori_loop(0, blk, body, jnp.zeros(q.shape, jnp.float32))
    (x, c), k, dp = tile(blk)
    _, ds = _own_grads(st, x, c, blk, lse2, dp, delta)
    dq = dq + dot(ds.astype(k.dtype), k, precision=st.precision)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dq_call(st: _Static, q, k, v, do, lse, delta):
    batch, n, hq, d = q.shape
    e = v.shape[-1]
    P, g, nb = st.tile, st.groups, st.n_blocks
    qb = lambda i: nb - 1 - i  # noqa: E731
    call = _common.pallas_call(
        functools.partial(_dq_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        grid=(nb, batch, hq),
        in_specs=[pl.BlockSpec((None, P, None, d), lambda i, b, h: (b, qb(i), h, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, b, h: (b, 0, h // g, 0)),
                  pl.BlockSpec((None, n, None, e), lambda i, b, h: (b, 0, h // g, 0)),
                  pl.BlockSpec((None, P, None, e), lambda i, b, h: (b, qb(i), h, 0)),
                  pl.BlockSpec((None, None, P), lambda i, b, h: (b, h, qb(i))),
                  pl.BlockSpec((None, None, P), lambda i, b, h: (b, h, qb(i)))],
        out_specs=[pl.BlockSpec((None, P, None, d), lambda i, b, h: (b, qb(i), h, 0))],
        num_warps=st.cfg.num_warps_bwd, num_stages=st.cfg.num_stages_bwd, interpret=st.interpret,
        name="jaxattn_landmark_dq")
    return call(q, k, v, do, lse, delta)[0]


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: _Static):
    j = pl.program_id(0)  # this kv block
    P = st.tile
    k, v = k_ref[...], v_ref[...]

    # Transposed tiles [keys, queries] (as the flash dk/dv kernel): no register tile is
    # transposed between the dots (fewer registers on sm_90a).
    def tile(blk, gi):
        qs = pl.ds(pl.multiple_of(blk * P, P), P)
        q, do = q_ref[qs, gi, :], do_ref[qs, gi, :]
        x, c = _logits(st, k, q)
        dp = dot(v, do, trans_b=True, precision=st.precision)
        return q, do, x, c, dp, lse_ref[gi, qs] * LOG2E, delta_ref[gi, qs]

    def accumulate(carry, q, do, w, ds):
        dk, dv = carry
        dv = dv + dot(w.astype(do.dtype), do, precision=st.precision)
        dk = dk + dot(ds.astype(q.dtype), q, precision=st.precision)
        return dk, dv

    def group_body(gi, carry):
        q, do, x, c, dp, lse2, delta = tile(j, gi)
        carry = accumulate(carry, q, do, *_own_grads(st, x, c, j, lse2, dp, delta, tr=True))

        def body(blk, carry):
            q, do, x, c, dp, lse2, delta = tile(blk, gi)
            return accumulate(carry, q, do, *_earlier_grads(st, x, c, lse2, dp, delta, tr=True))

        return lax.fori_loop(j + 1, st.n_blocks, body, carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, st.groups, group_body, carry)
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkdv_call(st: _Static, q, k, v, do, lse, delta):
    batch, n, hkv, d = k.shape
    e = v.shape[-1]
    P, g = st.tile, st.groups
    call = _common.pallas_call(
        functools.partial(_dkdv_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(st.n_blocks, batch, hkv),
        in_specs=[pl.BlockSpec((None, n, g, d), lambda j, b, h: (b, 0, h, 0)),
                  pl.BlockSpec((None, P, None, d), lambda j, b, h: (b, j, h, 0)),
                  pl.BlockSpec((None, P, None, e), lambda j, b, h: (b, j, h, 0)),
                  pl.BlockSpec((None, n, g, e), lambda j, b, h: (b, 0, h, 0)),
                  pl.BlockSpec((None, g, n), lambda j, b, h: (b, h, 0)),
                  pl.BlockSpec((None, g, n), lambda j, b, h: (b, h, 0))],
        out_specs=[pl.BlockSpec((None, P, None, d), lambda j, b, h: (b, j, h, 0)),
                   pl.BlockSpec((None, P, None, e), lambda j, b, h: (b, j, h, 0))],
        num_warps=st.cfg.num_warps_bwd, num_stages=st.cfg.num_stages_bwd, interpret=st.interpret,
        name="jaxattn_landmark_dkdv")
    return call(q, k, v, do, lse, delta)


# ----------------------------------------------------------------------------
# custom_vjp.
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _landmark(st: _Static, q, k, v):
    return _fwd_call(st, q, k, v)[0]


def _landmark_fwd(st, q, k, v):
    o, lse = _fwd_call(st, q, k, v)
    return o, (q, k, v, o, lse)


def _landmark_bwd(st, res, do):
    q, k, v, o, lse = res
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    do = do.astype(q.dtype)
    dq = _dq_call(st, q, k, v, do, lse, delta)
    dk, dv = _dkdv_call(st, q, k, v, do, lse, delta)
    return dq, dk, dv


_landmark.defvjp(_landmark_fwd, _landmark_bwd)


def landmark_attention_padded(q: jax.Array, k: jax.Array, v: jax.Array, *, block_len: int, tile: int,
                              seq_len: int, scale: float, config: LandmarkConfig | None = None,
                              interpret: bool | None = None) -> jax.Array:
    """Differentiable landmark attention on block-padded inputs ``q [B, nb * tile, H, D]``,
    ``k/v [B, nb * tile, Hkv, D|E]`` (each landmark block's ``block_len`` tokens at the start
    of its ``tile`` rows; head dims powers of two >= 16). Returns ``[B, nb * tile, H, E]``;
    rows of padding are unspecified but finite."""
    from jaxattn.pallas.flash import precision_for

    n = q.shape[1]
    st = _Static(scale=float(scale), block_len=int(block_len), tile=int(tile), n_blocks=n // tile,
                 seq_len=int(seq_len), groups=q.shape[2] // k.shape[2],
                 cfg=config or landmark_config(tile, max(q.shape[-1], v.shape[-1]), q.dtype),
                 interpret=interpret, precision=precision_for(q.dtype))
    return _landmark(st, q, k, v)
