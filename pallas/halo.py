"""HaloNet blocked local attention on Pallas's Triton backend.

The wrapper (``jaxattn.ops.halo``) gathers each query block's ``win x win`` key/value window
and the per-row relative-position projections ``A[i, jy] = q_i . R_h[jy - iy + win - 1]``,
``B[i, jx] = q_i . R_w[jx - ix + win - 1]``; JAX differentiates those gathers. This kernel
fuses the rest for one (block, batch, head): ``s = scale q k^T + A E_y + B E_x`` (``E`` are
one-hot maps from window key ``j = jy * win + jx`` to its row/column, built in-kernel),
masked softmax over the window, ``p v``. The backward kernel recomputes ``p`` from the
saved log-sum-exp and returns dq, dk, dv, dA, dB. Every window fits in one tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    win: int
    num_warps: int
    num_stages: int
    interpret: bool | None
    precision: object


def _one_hots(st: _Static, t: int, wp: int):
    """``E_y[t, j] = [j // win == t]``, ``E_x[t, j] = [j % win == t]`` for real keys ``j``."""
    j = lax.broadcasted_iota(jnp.int32, (t, wp), 1)
    r = lax.broadcasted_iota(jnp.int32, (t, wp), 0)
    real = j < st.win * st.win
    ey = jnp.where(real & (lax.div(j, st.win) == r), 1.0, 0.0)
    ex = jnp.where(real & (lax.rem(j, st.win) == r), 1.0, 0.0)
    return ey, ex


def _logits(st: _Static, q, k, a, b, valid):
    ey, ex = _one_hots(st, a.shape[-1], k.shape[0])
    s = dot(q, k, trans_b=True, precision=st.precision) * st.scale
    s += dot(a, ey, precision=st.precision) + dot(b, ex, precision=st.precision)
    return jnp.where(valid[None, :] != 0, s, -jnp.inf), ey, ex


def _fwd_kernel(q_ref, k_ref, v_ref, a_ref, b_ref, valid_ref, o_ref, lse_ref, *, st: _Static):
    v = v_ref[...]
    s, _, _ = _logits(st, q_ref[...], k_ref[...], a_ref[...], b_ref[...], valid_ref[...])
    m = jnp.max(s, axis=1)
    p = jnp.exp(s - m[:, None])
    l = jnp.sum(p, axis=1)
    o = dot(p.astype(v.dtype), v, precision=st.precision) / l[:, None]
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _bwd_kernel(q_ref, k_ref, v_ref, a_ref, b_ref, valid_ref, o_ref, lse_ref, do_ref,
                dq_ref, dk_ref, dv_ref, da_ref, db_ref, *, st: _Static):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, ey, ex = _logits(st, q, k, a_ref[...], b_ref[...], valid_ref[...])
    p = jnp.exp(s - lse_ref[...][:, None])
    delta = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1)
    dv_ref[...] = dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision).astype(dv_ref.dtype)
    dp = dot(do, v, trans_b=True, precision=st.precision)
    ds = p * (dp - delta[:, None])
    dq_ref[...] = (dot(ds.astype(k.dtype), k, precision=st.precision) * st.scale).astype(dq_ref.dtype)
    dk_ref[...] = (dot(ds.astype(q.dtype), q, trans_a=True, precision=st.precision) * st.scale
                   ).astype(dk_ref.dtype)
    da_ref[...] = dot(ds, ey, trans_b=True, precision=st.precision)
    db_ref[...] = dot(ds, ex, trans_b=True, precision=st.precision)


def _spec(rows: int, cols: int):
    return pl.BlockSpec((None, None, rows, None, cols), lambda n, b, h: (b, n, 0, h, 0))


def _call(kernel, st, args, outs, name):
    qb = args[0]
    batch, nb, _, heads, _ = qb.shape
    in_specs = [_spec(x.shape[2], x.shape[4]) if x.ndim == 5 else
                pl.BlockSpec((None, x.shape[1]), lambda n, b, h: (n, 0)) if x.ndim == 2 else
                pl.BlockSpec((None, None, None, x.shape[3]), lambda n, b, h: (b, n, h, 0))
                for x in args]
    out_specs = [_spec(o.shape[2], o.shape[4]) if len(o.shape) == 5 else
                 pl.BlockSpec((None, None, None, o.shape[3]), lambda n, b, h: (b, n, h, 0)) for o in outs]
    return _common.pallas_call(
        functools.partial(kernel, st=st), out_shape=outs, grid=(nb, batch, heads), in_specs=in_specs,
        out_specs=out_specs, num_warps=st.num_warps, num_stages=st.num_stages, interpret=st.interpret,
        name=name)(*args)


def _fwd(st, qb, kw, vw, a, b, valid):
    batch, nb, rows, heads, _ = qb.shape
    outs = [jax.ShapeDtypeStruct((batch, nb, rows, heads, vw.shape[-1]), qb.dtype),
            jax.ShapeDtypeStruct((batch, nb, heads, rows), jnp.float32)]
    return _call(_fwd_kernel, st, [qb, kw, vw, a, b, valid], outs, "jaxattn_halo_fwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _halo(st, qb, kw, vw, a, b, valid):
    return _fwd(st, qb, kw, vw, a, b, valid)[0]


def _halo_fwd(st, qb, kw, vw, a, b, valid):
    o, lse = _fwd(st, qb, kw, vw, a, b, valid)
    return o, (qb, kw, vw, a, b, valid, o, lse)


def _halo_bwd(st, res, do):
    qb, kw, vw, a, b, valid, o, lse = res
    outs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (qb, kw, vw, a, b)]
    dq, dk, dv, da, db = _call(_bwd_kernel, st, [qb, kw, vw, a, b, valid, o, lse, do.astype(o.dtype)],
                               outs, "jaxattn_halo_bwd")
    return dq, dk, dv, da, db, None


_halo.defvjp(_halo_fwd, _halo_bwd)


def halo_blocks_kernel(qb, kw, vw, a, b, valid, *, scale: float, win: int,
                       interpret: bool | None = None) -> jax.Array:
    """Fused attention over pre-gathered windows (shapes already padded to powers of two):
    qb ``[B, nB, R, heads, d]``, kw ``[B, nB, Wp, heads, d]``, vw ``[B, nB, Wp, heads, e]``,
    a, b ``[B, nB, R, heads, T]`` fp32 (T >= win), valid ``[nB, Wp]`` int8 (1 = key used).
    Returns ``[B, nB, R, heads, e]``."""
    big = max(qb.shape[-1], vw.shape[-1]) * kw.shape[2]
    st = _Static(scale=float(scale), win=win, num_warps=8 if big >= 256 * 128 else 4, num_stages=1,
                 interpret=interpret,
                 precision=lax.Precision.HIGHEST if qb.dtype == jnp.float32 else None)
    return _halo(st, qb, kw, vw, a, b, valid)
