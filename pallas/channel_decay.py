"""Kimi Delta Attention's decayed in-chunk products on Pallas's Triton backend, and back through them.

With a decay per key channel (cumulative in-chunk log decays ``G [C, d_k]``), the gated delta rule's
``Q Kᵀ`` and ``K Kᵀ`` inside a chunk carry the decay between the two tokens inside the sum: ``P_ij = sum_c q_ic
k_jc exp(G_ic - G_jc)`` (``j <= i``), the same for ``K Kᵀ``. No matmul forms them and splitting the exponent
(``exp(G_i) exp(-G_j)``) overflows once a channel decays fast, so each program builds them column by column:
token ``j``'s key and decays against the chunk's ``[C, d_k]`` tile, exponents ``<= 0`` (the entries above the
diagonal, clamped and zeroed). They depend on no state, so they run here, before the recurrence
(:mod:`jaxattn.pallas.gated_delta` reads them, keeping its registers for the state), and their gradients are
linear in ``dP`` and ``d(K Kᵀ)``: the recurrence's backward writes those (per value-column block, summed in XLA)
and :func:`decayed_products_grads` takes them back to q, k and ``G`` (``dG_i = q_i dq_i + k_i dk_i`` on the left
token, ``- k_j dk_j`` on the right one). One program per (batch row, value head, 64 tokens). Gated linear attention
(no delta rule) needs ``P`` alone: ``keys=False`` skips ``K Kᵀ`` both ways.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common

__all__ = ["decayed_products", "decayed_products_grads"]

TOKENS = 64  # tokens per program (the sequence comes padded to a multiple of 64)
_WARPS = 4


def _specs(n: int, h: int, hk: int, dk: int, t: int):
    qk = pl.BlockSpec((None, t, None, dk), lambda bi, hi, ti: (bi, ti, hi // (h // hk), 0))
    per_head = lambda w: pl.BlockSpec((None, t, None, w), lambda bi, hi, ti: (bi, ti, hi, 0))  # noqa: E731
    return qk, per_head


def _tile(ref, m: int, c: int):
    return ref[pl.ds(pl.multiple_of(m * c, c), c), :].astype(jnp.float32)


def _token(k_ref, g_ref, gcum, row):
    """Token ``row``'s key ``[1, d_k]`` and its decays to the chunk's tokens, ``exp(min(G_i - G_row, 0))`` ``[c,
    d_k]`` (the clamp: no overflow above the diagonal, where the entries are zeroed)."""
    return (k_ref[pl.ds(row, 1), :].astype(jnp.float32),
            jnp.exp(jnp.minimum(gcum - g_ref[pl.ds(row, 1), :], 0.0)))


def _column(x, cols, j):
    """Column ``j`` of ``x [c, c]`` as ``[c, 1]``."""
    return jnp.sum(jnp.where(cols == j, x, 0.0), axis=1, keepdims=True)


def _products_kernel(q_ref, k_ref, g_ref, *out_refs, c: int):
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    incl = lax.broadcasted_iota(jnp.int32, (c, c), 0) >= cols

    def chunk(m, _):
        lhs = [_tile(q_ref, m, c), _tile(k_ref, m, c)][:len(out_refs)]  # (Q, and K for K Kᵀ)
        gcum = _tile(g_ref, m, c)

        def column(j, carry):
            kj, dec = _token(k_ref, g_ref, gcum, m * c + j)
            dec = dec * kj
            return tuple(jnp.where(cols == j, jnp.sum(x * dec, axis=1, keepdims=True), acc)
                         for x, acc in zip(lhs, carry))

        products = lax.fori_loop(0, c, column, (jnp.zeros((c, c), jnp.float32),) * len(out_refs))
        sl = pl.ds(pl.multiple_of(m * c, c), c)
        for ref, x in zip(out_refs, products):
            ref[sl, :] = jnp.where(incl, x, 0.0)
        return 0

    lax.fori_loop(0, q_ref.shape[0] // c, chunk, 0)


def decayed_products(q: jax.Array, k: jax.Array, gcum: jax.Array, chunk: int, interpret: bool | None,
                     keys: bool = True) -> tuple[jax.Array, ...]:
    """``(P, K Kᵀ)`` (``keys=False``: ``(P,)``), fp32 ``[b, n, h, chunk]`` (row ``i`` of a chunk: its products with
    the chunk's tokens, zero past the diagonal), of ``q, k [b, n, h_k, d_k]`` and in-chunk cumulative log decays
    ``gcum [b, n, h, d_k]`` (fp32); ``n`` a multiple of 64, value head ``i`` reading q / k head ``i // (h / h_k)``."""
    b, n, hk, dk = q.shape
    h = gcum.shape[2]
    t = min(TOKENS, n)
    qk, per_head = _specs(n, h, hk, dk, t)
    out = jax.ShapeDtypeStruct((b, n, h, chunk), jnp.float32)
    return tuple(_common.pallas_call(
        functools.partial(_products_kernel, c=chunk), out_shape=[out] * (2 if keys else 1), grid=(b, h, n // t),
        in_specs=[qk, qk, per_head(dk)], out_specs=[per_head(chunk)] * (2 if keys else 1), num_warps=_WARPS,
        num_stages=1,
        interpret=interpret, name="jaxattn_kda_products")(q, k, gcum))


def _grads_kernel(q_ref, k_ref, g_ref, dp_ref, *refs, c: int, keys: bool):
    dab_ref, (dq_ref, dk_ref, dg_ref) = (refs[0], refs[1:]) if keys else (None, refs)
    rows = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)

    def chunk(m, _):
        qf, kf, gcum = _tile(q_ref, m, c), _tile(k_ref, m, c), _tile(g_ref, m, c)
        dp = _tile(dp_ref, m, c)
        dab = _tile(dab_ref, m, c) if keys else None

        def column(j, carry):
            dq_l, dk_l, dk_r = carry
            kj, dec = _token(k_ref, g_ref, gcum, m * c + j)
            dpj = _column(dp, cols, j)
            right = dpj * qf
            if keys:  # (K Kᵀ: token j's key on both sides)
                dabj = _column(dab, cols, j)
                dk_l = dk_l + dabj * dec * kj
                right = right + dabj * kf
            return (dq_l + dpj * dec * kj, dk_l,
                    jnp.where(rows == j, jnp.sum(right * dec, axis=0, keepdims=True), dk_r))

        dq_l, dk_l, dk_r = lax.fori_loop(0, c, column, (jnp.zeros(qf.shape, jnp.float32),) * 3)
        sl = pl.ds(pl.multiple_of(m * c, c), c)
        dq_ref[sl, :] = dq_l
        dk_ref[sl, :] = dk_l + dk_r
        dg_ref[sl, :] = qf * dq_l + kf * (dk_l - dk_r)
        return 0

    lax.fori_loop(0, q_ref.shape[0] // c, chunk, 0)


def decayed_products_grads(q: jax.Array, k: jax.Array, gcum: jax.Array, dp: jax.Array, dab: jax.Array | None,
                           interpret: bool | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Back through :func:`decayed_products`: given the gradients ``dp, dab [b, n, h, chunk]`` (fp32, zero
    outside the products' support) of ``P`` and ``K Kᵀ`` (``dab`` None: ``P`` alone), ``(dq, dk, dG)``, fp32
    ``[b, n, h, d_k]`` (per value head: the caller sums the heads sharing a q / k head)."""
    b, n, hk, dk = q.shape
    h, chunk = dp.shape[2:]
    t = min(TOKENS, n)
    qk, per_head = _specs(n, h, hk, dk, t)
    out = jax.ShapeDtypeStruct((b, n, h, dk), jnp.float32)
    return tuple(_common.pallas_call(
        functools.partial(_grads_kernel, c=chunk, keys=dab is not None), out_shape=[out] * 3, grid=(b, h, n // t),
        in_specs=[qk, qk, per_head(dk), *[per_head(chunk)] * (1 if dab is None else 2)], out_specs=[per_head(dk)] * 3,
        num_warps=_WARPS, num_stages=1, interpret=interpret,
        name="jaxattn_kda_products_bwd")(q, k, gcum, dp, *(() if dab is None else (dab,))))
