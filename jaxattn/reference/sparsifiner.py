"""Sparsifiner oracles in plain fp32 jnp, written from the math (attention-variants.md §8):
the low-rank connectivity prediction, the top-k mask (by a stable sort, not ``lax.top_k``) and
dense masked softmax attention with that mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def topk_mask_reference(scores: jax.Array, k: int) -> jax.Array:
    """Bool mask of the ``k`` largest entries per row (last axis); ties go to the lower index."""
    order = jnp.argsort(-jnp.asarray(scores, jnp.float32), axis=-1, stable=True)[..., :k]
    return jax.nn.one_hot(order, scores.shape[-1], dtype=jnp.int32).sum(-2) > 0


def connectivity_reference(q: jax.Array, k: jax.Array, wq: jax.Array, bq: jax.Array, wk: jax.Array,
                           bk: jax.Array, p_n: jax.Array, p_back: jax.Array, *, stage: str = "sparse",
                           threshold: float = 0.02, coef_topk: int = 8, has_cls: bool = True) -> jax.Array:
    """``Â [B, H, N - has_cls, N]`` from ``q, k [B, N, H, d]``, the two projections ``w [d, c], b [c]``
    and ``P_n, P_back [N, n_r]``: ``coef = softmax((q W_q + b_q)((k W_k + b_k)^T P_n) / sqrt(H))``
    without the class-token row; recon: ``coef P_back^T``; sparse: top-``coef_topk`` of ``coef``
    times ``|P_back^T|`` with entries ``<= threshold`` zeroed."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    q, k, wq, bq, wk, bk, p_n, p_back = map(f32, (q, k, wq, bq, wk, bk, p_n, p_back))
    heads = q.shape[2]
    qc = jnp.einsum("bnhd,dc->bhnc", q, wq) + bq
    kc = jnp.einsum("bnhd,dc->bhnc", k, wk) + bk
    kr = jnp.einsum("bhnc,nr->bhcr", kc, p_n)
    logits = jnp.einsum("bhnc,bhcr->bhnr", qc, kr) / math.sqrt(heads)
    if has_cls:
        logits = logits[:, :, 1:]
    coef = jnp.exp(logits - logits.max(-1, keepdims=True))
    coef = coef / coef.sum(-1, keepdims=True)
    if stage == "recon":
        return jnp.einsum("bhnr,mr->bhnm", coef, p_back)
    coef = jnp.where(topk_mask_reference(coef, min(coef_topk, coef.shape[-1])), coef, 0.0)
    basis = jnp.abs(p_back)
    basis = jnp.where(basis > threshold, basis, 0.0)
    return jnp.einsum("bhnr,mr->bhnm", coef, basis)


def sparsifiner_mask_reference(approx: jax.Array, k: int, *, has_cls: bool = True) -> jax.Array:
    """``[B, H, N, N]`` bool: top-``k`` of each ``approx`` row, an all-True class row first when ``has_cls``."""
    mask = topk_mask_reference(approx, k)
    if has_cls:
        b, h, _, n = approx.shape
        mask = jnp.concatenate([jnp.ones((b, h, 1, n), bool), mask], axis=2)
    return mask


def sparsifiner_reference(q: jax.Array, k: jax.Array, v: jax.Array, approx: jax.Array, keep: int, *,
                          has_cls: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(out [B, N, H, d] fp32, mask)``: softmax of ``q k^T / sqrt(d)`` over the top-``keep`` keys
    of each ``approx`` row (every key for the class-token query), times ``v``."""
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    mask = jax.lax.stop_gradient(sparsifiner_mask_reference(approx, keep, has_cls=has_cls))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v), mask
