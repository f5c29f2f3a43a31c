"""Landmark attention oracle (Mohtashami & Jaggi 2023), written from the math in fp32.

Layout convention: the sequence is cut into blocks of ``block_len`` tokens (``block_len - 1``
regular tokens followed by one landmark token, the last of the block); a trailing partial block
holds only regular tokens. For query ``i`` in block ``c``::

    G_i = {regular j <= i in block c}  U  {landmark L_g : g < c}
    p_i = softmax over G_i of s_ij = scale * q_i . k_j
    w_ij = p_ij                                           (regular j in block c)
    w_ij = p_{i,L_g} * softmax_{j' in block g, regular}(s_ij')[j]   (regular j in block g < c)
    w_ij = 0                                              (every landmark)
    o_i = sum_j w_ij v_j

``allowed_blocks`` (optional) restricts which earlier landmarks each query may use (the
retrieval oracle: top-k blocks only). The explicit weight matrix is built row by row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_HP = jax.lax.Precision.HIGHEST


def landmark_weights(scores: np.ndarray | jax.Array, block_len: int,
                     allowed_blocks: jax.Array | None = None) -> jax.Array:
    """Explicit landmark weights ``w [..., Sq, Sk]`` from fp32 logits ``scores [..., Sq, Sk]``
    for queries at positions ``Sk - Sq .. Sk - 1``. ``allowed_blocks [..., Sq, n_blocks]`` bool."""
    s = jnp.asarray(scores, jnp.float32)
    sq, sk = s.shape[-2:]
    n_blocks = -(-sk // block_len)
    pos = np.arange(sk)
    qpos = np.arange(sk - sq, sk)
    blk, qblk = pos // block_len, qpos // block_len
    is_lm = pos % block_len == block_len - 1
    # Outer group G_i: own-block regular keys j <= i (first Sk entries) and the landmarks of
    # earlier blocks g < c (last n_blocks entries, one per block).
    own = (blk[None] == qblk[:, None]) & ~is_lm[None] & (pos[None] <= qpos[:, None])  # [Sq, Sk]
    lm_pos = np.minimum((np.arange(n_blocks) + 1) * block_len - 1, sk - 1)
    earlier = np.arange(n_blocks)[None] < qblk[:, None]  # [Sq, n_blocks]
    lm_ok = jnp.asarray(earlier)
    if allowed_blocks is not None:
        lm_ok = lm_ok & allowed_blocks
    outer = jnp.concatenate([jnp.where(own, s, -jnp.inf),
                             jnp.where(lm_ok, s[..., lm_pos], -jnp.inf)], axis=-1)
    p = jax.nn.softmax(outer, axis=-1)
    w = p[..., :sk]
    for g in range(n_blocks):
        members = (blk == g) & ~is_lm
        inner = jax.nn.softmax(jnp.where(members, s, -jnp.inf), axis=-1)  # softmax within block g
        w = w + p[..., sk + g, None] * jnp.where(members, inner, 0.0)
    return w


def landmark_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, block_len: int,
                       scale: float | None = None, allowed_blocks: jax.Array | None = None,
                       return_weights: bool = False):
    """Landmark attention, ``q [B, Sq, H, D]``, ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, E]``
    (queries are the last ``Sq`` positions; GQA by repeating kv heads). fp32 output
    ``[B, Sq, H, E]``, plus the weights ``[B, H, Sq, Sk]`` when ``return_weights``.
    ``allowed_blocks [B, H, Sq, n_blocks]`` bool restricts the usable earlier landmarks."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = q.shape[2] // k.shape[2]
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    k32, v32 = jnp.repeat(k32, g, axis=2), jnp.repeat(v32, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q32, k32, precision=_HP) * scale
    w = landmark_weights(s, block_len, allowed_blocks)
    o = jnp.einsum("bhqk,bkhe->bqhe", w, v32, precision=_HP)
    return (o, w) if return_weights else o
