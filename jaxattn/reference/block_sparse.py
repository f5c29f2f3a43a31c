"""Oracles for block-sparse attention, written from the formulas (numpy, element-wise).

Each ``*_mask`` builds the dense ``[q_len, kv_len]`` bool mask straight from a pattern's
definition (query row ``i`` at absolute position ``p = i + q_offset``, key ``j``),
independently of ``jaxattn.BlockMask``; ``block_sparse_reference`` is the dense fp32
masked softmax over it.

PowerAttention (arXiv 2503.03588, Algorithm 1 / §4.1): block size ``B``, block distance
``D = p // B - j // B``; key ``j`` is visible iff
``j <= p and (j < sink or D < W or D & (D - 1) == 0)`` (the paper: one sink block,
``sink = B``; ``W`` local blocks). Query block ``P`` (when the lists' block equals ``B``
and ``sink = B``) visits key blocks ``{0} U {P - D : 0 <= D < W} U {P - 2^k >= 0}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.reference.attention import attention_reference


def _grid(q_len: int, kv_len: int | None, q_offset: int | None):
    kv_len = q_len if kv_len is None else kv_len
    q_offset = kv_len - q_len if q_offset is None else q_offset
    p = np.arange(q_len)[:, None] + q_offset
    j = np.arange(kv_len)[None, :]
    return p, j


def causal_mask(q_len: int, kv_len: int | None = None, *, q_offset: int | None = None) -> np.ndarray:
    p, j = _grid(q_len, kv_len, q_offset)
    return j <= p


def sliding_window_mask(q_len: int, kv_len: int | None = None, *, window: int, sink: int = 0,
                        q_offset: int | None = None) -> np.ndarray:
    """``j <= p and (p - j < window or j < sink)``."""
    p, j = _grid(q_len, kv_len, q_offset)
    return (j <= p) & ((p - j < window) | (j < sink))


def dilated_mask(q_len: int, kv_len: int | None = None, *, block: int, window_blocks: int,
                 dilation: int, sink: int = 0, q_offset: int | None = None) -> np.ndarray:
    """``j <= p and (j < sink or (D % dilation == 0 and D < window_blocks))``."""
    p, j = _grid(q_len, kv_len, q_offset)
    dist = p // block - j // block
    return (j <= p) & ((j < sink) | ((dist % dilation == 0) & (dist < window_blocks)))


def power_mask(q_len: int, kv_len: int | None = None, *, block: int, window_blocks: int,
               sink: int | None = None, q_offset: int | None = None) -> np.ndarray:
    """PowerAttention's element mask (``sink`` defaults to one block)."""
    p, j = _grid(q_len, kv_len, q_offset)
    sink = block if sink is None else sink
    dist = p // block - j // block
    is_pow2 = (dist & (dist - 1)) == 0  # includes D = 0
    return (j <= p) & ((j < sink) | (dist < window_blocks) | is_pow2)


def power_block_sets(n_blocks: int, window_blocks: int) -> list[set[int]]:
    """The paper's per-query-block key-block sets: ``{0} U {P - D : D < W} U {P - 2^k}``."""
    out = []
    for qb in range(n_blocks):
        s = {0} | {qb - d for d in range(window_blocks) if qb - d >= 0}
        s |= {qb - (1 << e) for e in range(qb.bit_length() + 1) if qb - (1 << e) >= 0}
        out.append(s)
    return out


def block_sparse_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask, *,
                           scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Dense fp32 masked softmax; ``mask`` is bool ``[q_len, kv_len]`` (or broadcastable to
    ``[batch, heads, q_len, kv_len]``). Rows with no visible key give zeros, ``lse = -inf``."""
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return attention_reference(q, k, v, scale=scale, mask=mask)
