"""HaloNet blocked local attention on Pallas's Triton backend.

The wrapper (``jaxattn.ops.halo``) gathers each query block's ``win x win`` key/value window
and the per-row relative-position projections ``A[i, jy] = q_i . R_h[jy - iy + win - 1]``,
``B[i, jx] = q_i . R_w[jx - ix + win - 1]``; JAX differentiates those gathers. This kernel
fuses the rest for one (block, batch, head): ``s = scale q k^T + [A | B] E^T``, where ``E`` is a
constant one-hot map from window key ``j = jy * win + jx`` to its row and column (a second
tensor-core dot accumulated onto the first), masked softmax over the window, ``p v``;
``d[A | B] = ds E``. Both kernels walk the window in chunks of ``KEY_CHUNK`` keys (an online
softmax in the forward; the backward recomputes ``p`` from the saved log-sum-exp, writes each
chunk's dk, dv and accumulates dq, d[A | B]), so the live fp32 tiles are ``[R, KEY_CHUNK]``: at the
benchmark shapes every kernel compiles for sm_90a without register spills.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot


KEY_CHUNK = 64  # window keys per step of the kernels' key loop


@dataclasses.dataclass(frozen=True)
class HaloConfig:
    """Launch parameters of both kernels (``num_warps`` None: 8 from head dim 128, else 4)."""

    key_chunk: int = KEY_CHUNK
    num_warps: int | None = None
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    key_chunk: int  # window keys per step
    chunks: int
    num_warps: int
    num_stages: int
    interpret: bool | None
    precision: object


def _keys(st: _Static, c):
    return pl.ds(pl.multiple_of(c * st.key_chunk, st.key_chunk), st.key_chunk)


def _chunk(st: _Static, c, k_ref, e_ref, valid_ref):
    """Key chunk ``c``: its rows of the window keys, the relative map and the valid flags."""
    rows = _keys(st, c)
    return k_ref[rows, :], e_ref[rows, :], valid_ref[rows]


def _logits(st: _Static, q, k, ab, emap, valid):
    # the relative term is a second dot accumulated onto the first (one fp32 tile live)
    s = dot(q, k, trans_b=True, precision=st.precision) * st.scale
    s = s + dot(ab, emap, trans_b=True, precision=st.precision)
    return jnp.where(valid[None, :] != 0, s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, ab_ref, e_ref, valid_ref, o_ref, lse_ref, *, st: _Static):
    """Online softmax over key chunks (keeps the live logits tile to ``[R, key_chunk]``)."""
    q, ab = q_ref[...], ab_ref[...]
    rows = q.shape[0]
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    acc = jnp.zeros((rows, o_ref.shape[-1]), jnp.float32)
    def body(c, carry):
        m, l, acc = carry
        k, emap, valid = _chunk(st, c, k_ref, e_ref, valid_ref)
        v = v_ref[_keys(st, c), :]
        s = _logits(st, q, k, ab, emap, valid)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a chunk of padding keys only
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        return m_new, l, acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision=st.precision)

    m, l, acc = lax.fori_loop(0, st.chunks, body, (m, l, acc))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _bwd_kernel(q_ref, k_ref, v_ref, ab_ref, e_ref, valid_ref, o_ref, lse_ref, do_ref,
                dq_ref, dk_ref, dv_ref, dab_ref, *, st: _Static):
    """Per key chunk: recompute p, write that chunk's dk and dv, accumulate dq and d[A | B]."""
    q, ab, do = q_ref[...], ab_ref[...], do_ref[...]
    lse = lse_ref[...]
    delta = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1)
    dq = jnp.zeros(q.shape, jnp.float32)
    dab = jnp.zeros(ab.shape, jnp.float32)
    def body(c, carry):
        dq, dab = carry
        keys = _keys(st, c)
        k, emap, valid = _chunk(st, c, k_ref, e_ref, valid_ref)
        v = v_ref[keys, :]
        p = jnp.exp(_logits(st, q, k, ab, emap, valid) - lse[:, None])
        dv_ref[keys, :] = dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision).astype(dv_ref.dtype)
        dp = dot(do, v, trans_b=True, precision=st.precision)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        dk_ref[keys, :] = (dot(ds, q, trans_a=True, precision=st.precision) * st.scale).astype(dk_ref.dtype)
        return dq + dot(ds, k, precision=st.precision), dab + dot(ds, emap, precision=st.precision)

    dq, dab = lax.fori_loop(0, st.chunks, body, (dq, dab))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)
    dab_ref[...] = dab.astype(dab_ref.dtype)


def _spec(rows: int, cols: int):
    return pl.BlockSpec((None, None, rows, None, cols), lambda n, b, h: (b, n, 0, h, 0))


def _call(kernel, st, args, outs, name):
    qb = args[0]
    batch, nb, _, heads, _ = qb.shape
    in_specs = [_spec(x.shape[2], x.shape[4]) if x.ndim == 5 else
                pl.BlockSpec((None, x.shape[1]), lambda n, b, h: (n, 0)) if x.ndim == 2 else
                pl.BlockSpec((None, *x.shape[1:]), lambda n, b, h: (0, 0, 0)) if x.ndim == 3 else
                pl.BlockSpec((None, None, None, x.shape[3]), lambda n, b, h: (b, n, h, 0))
                for x in args]
    out_specs = [_spec(o.shape[2], o.shape[4]) if len(o.shape) == 5 else
                 pl.BlockSpec((None, None, None, o.shape[3]), lambda n, b, h: (b, n, h, 0)) for o in outs]
    return _common.pallas_call(
        functools.partial(kernel, st=st), out_shape=outs, grid=(nb, batch, heads), in_specs=in_specs,
        out_specs=out_specs, num_warps=st.num_warps, num_stages=st.num_stages, interpret=st.interpret,
        name=name)(*args)


def _fwd(st, qb, kw, vw, ab, emap, valid):
    batch, nb, rows, heads, _ = qb.shape
    outs = [jax.ShapeDtypeStruct((batch, nb, rows, heads, vw.shape[-1]), qb.dtype),
            jax.ShapeDtypeStruct((batch, nb, heads, rows), jnp.float32)]
    return _call(_fwd_kernel, st, [qb, kw, vw, ab, emap, valid], outs, "jaxattn_halo_fwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _halo(st, qb, kw, vw, ab, emap, valid):
    return _fwd(st, qb, kw, vw, ab, emap, valid)[0]


def _halo_fwd(st, qb, kw, vw, ab, emap, valid):
    o, lse = _fwd(st, qb, kw, vw, ab, emap, valid)
    return o, (qb, kw, vw, ab, emap, valid, o, lse)


def _halo_bwd(st, res, do):
    qb, kw, vw, ab, emap, valid, o, lse = res
    outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qb, kw, vw, ab)]
    dq, dk, dv, dab = _call(_bwd_kernel, st, [qb, kw, vw, ab, emap, valid, o, lse, do.astype(o.dtype)],
                            outs, "jaxattn_halo_bwd")
    return dq, dk, dv, dab, None, None


_halo.defvjp(_halo_fwd, _halo_bwd)


def relative_map(win: int, t: int, keys: int) -> np.ndarray:
    """``E [keys, 2t]``: window key ``j = jy * win + jx`` (``j < win^2``) -> one-hot of ``jy`` in
    columns ``[0, t)`` and of ``jx`` in ``[t, 2t)``, so that ``[A | B] E^T`` adds
    ``A[i, jy] + B[i, jx]`` to every key's logit."""
    j = np.arange(win * win)
    e = np.zeros((keys, 2 * t), np.float32)
    e[j, j // win] = 1.0
    e[j, t + j % win] = 1.0
    return e


def halo_blocks_kernel(qb, kw, vw, ab, emap, valid, *, scale: float, config: HaloConfig | None = None,
                       interpret: bool | None = None) -> jax.Array:
    """Fused attention over pre-gathered windows (every tile dim a power of two):
    qb ``[B, nB, R, heads, d]``, kw ``[B, nB, Wp, heads, d]``, vw ``[B, nB, Wp, heads, e]``,
    ab ``[B, nB, R, heads, 2T]`` (q's dtype): the row and column relative logits ``[A | B]``,
    emap ``[1, Wp, 2T]`` (q's dtype, from :func:`relative_map`), valid ``[nB, Wp]`` int8 (1 = key
    used). Returns ``[B, nB, R, heads, e]``."""
    if ab.dtype != qb.dtype or emap.dtype != qb.dtype:
        raise ValueError(f"ab and emap must have q's dtype {qb.dtype}, got {ab.dtype}, {emap.dtype}")
    cfg = config or HaloConfig()
    chunk = min(kw.shape[2], cfg.key_chunk)
    warps = cfg.num_warps or (8 if max(qb.shape[-1], vw.shape[-1]) >= 128 else 4)
    st = _Static(scale=float(scale), key_chunk=chunk, chunks=kw.shape[2] // chunk,
                 num_warps=warps, num_stages=cfg.num_stages,
                 interpret=interpret,
                 precision=lax.Precision.HIGHEST if qb.dtype == jnp.float32 else None)
    return _halo(st, qb, kw, vw, ab, emap, valid)

