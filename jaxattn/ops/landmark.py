"""``jaxattn.landmark_attention``: Landmark attention (Mohtashami & Jaggi 2023), training path,
and ``jaxattn.landmark_retrieval_attention``: its top-k block-retrieval inference form.

Layout ``[batch, seq, heads, head_dim]``. The sequence is cut into blocks of ``block_len``
tokens whose last token is the block's landmark (``block_len - 1`` regular tokens, then the
landmark; a trailing partial block has no landmark). Query ``i`` in block ``c`` attends with one
softmax over its own block's regular keys ``j <= i`` and the landmarks of earlier blocks; the
probability of landmark ``L_g`` is spread over block ``g``'s regular keys by their own softmax.
Landmark keys never receive weight. See ``jaxattn.reference.landmark`` for the explicit formula.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import _common

_HP = lax.Precision.HIGHEST


def _check_block_len(block_len: int, name: str = "block_len") -> int:
    if isinstance(block_len, bool) or not isinstance(block_len, (int, np.integer)) or block_len < 2:
        raise ValueError(f"{name} must be an int >= 2 (regular tokens + 1 landmark per block), "
                         f"got {block_len!r}")
    return int(block_len)


def landmark_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_len: int,
    scale: float | None = None,
    impl: Literal["auto", "pallas", "xla"] = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Landmark attention (causal self-attention with the grouped softmax).

    Args:
      q: ``[B, S, H, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, E]`` (Hkv divides H, GQA),
        one float dtype (fp32/bf16/fp16). RoPE, if any, is already applied.
      block_len: tokens per landmark block including the landmark (``mem_freq + 1``); the token at
        position ``p`` is a landmark iff ``p % block_len == block_len - 1``.
      scale: logit scale, default ``D ** -0.5``.
      impl: ``"pallas"`` (Triton-backend kernels; interpret mode without a GPU), ``"xla"`` (dense
        blocked jnp, autodiff backward) or ``"auto"`` (the kernel on GPU, else xla).
      interpret: kernel interpret mode; None picks it when no GPU is present.

    Returns:
      ``[B, S, H, E]`` in q's dtype.
    """
    _checks.check_impl(impl)
    batch, s_len, kv_len, hq, hkv, d = _checks.check_qkv(q, k, v)
    if kv_len != s_len:
        raise ValueError(f"k has length {kv_len}; landmark attention is self-attention and needs q's "
                         f"length {s_len}")
    block_len = _check_block_len(block_len)
    scale = _checks.check_scale(scale)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    use_kernel = (impl == "pallas" or (impl == "auto" and _common.targets_gpu())) and not _checks.empty(q, k, v)
    if use_kernel:
        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        return _spmd.per_batch_shard(
            lambda q, k, v, batch_offset=None: _pallas_path(q, k, v, block_len, scale, interpret), dict(q=q, k=k, v=v))
    return _xla_path(q, k, v, block_len, scale)


def _to_blocks(x: jax.Array, block_len: int, n_blocks: int) -> jax.Array:
    """``[B, S, h, d]`` -> ``[B, nb, block_len, h, d]`` (zero padded)."""
    x = _common.pad_axis(x, 1, n_blocks * block_len)
    return x.reshape(x.shape[0], n_blocks, block_len, *x.shape[2:])


def _pallas_path(q, k, v, block_len: int, scale: float, interpret: bool | None) -> jax.Array:
    from jaxattn.pallas.landmark import landmark_attention_padded

    b, s_len, h, d = q.shape
    e = v.shape[-1]
    nb = -(-s_len // block_len)
    tile = max(16, _common.next_pow2(block_len))
    d_pad, e_pad = max(16, _common.next_pow2(d)), max(16, _common.next_pow2(e))

    def relayout(x, width):
        x = _common.pad_axis(_to_blocks(x, block_len, nb), 2, tile)
        x = _common.pad_axis(x, 4, width)
        return x.reshape(b, nb * tile, x.shape[3], width)

    o = landmark_attention_padded(relayout(q, d_pad), relayout(k, d_pad), relayout(v, e_pad),
                                  block_len=block_len, tile=tile, seq_len=s_len, scale=scale,
                                  interpret=interpret)
    o = o.reshape(b, nb, tile, h, e_pad)[:, :, :block_len, :, :e]
    return o.reshape(b, nb * block_len, h, e)[:, :s_len]


def _xla_path(q, k, v, block_len: int, scale: float) -> jax.Array:
    """Dense blocked computation of the effective logits (see ``jaxattn.pallas.landmark``)."""
    b, s_len, h, d = q.shape
    hkv, e = k.shape[2], v.shape[-1]
    g = h // hkv
    nb = -(-s_len // block_len)
    L = block_len
    qb = _to_blocks(q, L, nb).reshape(b, nb, L, hkv, g, d)
    kb, vb = _to_blocks(k, L, nb), _to_blocks(v, L, nb)
    s = jnp.einsum("bcihgd,bejhd->bhgciej", qb, kb, precision=_HP,
                   preferred_element_type=jnp.float32) * scale
    j = np.arange(L)
    reg = j < L - 1
    lse_in = jax.nn.logsumexp(jnp.where(reg, s, -jnp.inf), axis=-1)  # [.., c, i, e]
    t_earlier = s + (s[..., L - 1] - lse_in)[..., None]
    c_idx = np.arange(nb)[:, None, None, None]
    i_idx = np.arange(L)[None, :, None, None]
    e_idx = np.arange(nb)[None, None, :, None]
    j_idx = j[None, None, None, :]
    earlier = (e_idx < c_idx) & reg
    own = (e_idx == c_idx) & reg & (j_idx <= i_idx) & (e_idx * L + j_idx < s_len)
    t = jnp.where(earlier, t_earlier, jnp.where(own, s, -jnp.inf))
    shape = t.shape
    w = jax.nn.softmax(t.reshape(*shape[:-2], nb * L), axis=-1).reshape(shape)
    o = jnp.einsum("bhgciej,bejhf->bcihgf", w, vb.astype(jnp.float32), precision=_HP)
    return o.reshape(b, nb * L, h, e)[:, :s_len].astype(q.dtype)


# ----------------------------------------------------------------------------
# Inference with top-k block retrieval.
# ----------------------------------------------------------------------------


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE of ``x [..., d]`` at ``positions`` (broadcast against ``x.shape[:-1]``), halves
    rotated as in ``jaxattn.models.gpt.rope``; fp32."""
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    ang = jnp.asarray(positions, jnp.float32)[..., None] * freq
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)



def landmark_retrieval_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_len: int,
    top_k: int,
    q_offset: int | None = None,
    scale: float | None = None,
    rope_theta: float | None = None,
    memory_positions: Literal["absolute", "contiguous"] = "absolute",
    return_blocks: bool = False,
):
    """Landmark attention at inference: each query and head retrieves its ``top_k`` earlier blocks.

    ``k``/``v`` ``[B, Sk, Hkv, D|E]`` are the cache of positions ``0 .. Sk - 1`` (landmark
    structured as in ``landmark_attention``); ``q [B, Sq, H, D]`` holds the queries at positions
    ``q_offset .. q_offset + Sq - 1`` (default ``Sk - Sq``: a decode step or the last chunk).
    For query ``i`` in block ``c`` and each head, the earlier blocks ``g < c`` are ranked by
    ``q_i . k_{L_g}``; the ``top_k`` best are gathered and the grouped softmax runs over their
    landmarks plus the own block's regular keys ``j <= i``. With ``top_k >= c`` this equals
    ``landmark_attention``.

    ``rope_theta``: when given, q and k are *un-rotated* and RoPE (halves rotated, as
    ``jaxattn.models.gpt.rope``) is applied here: queries and own-block keys at their absolute
    positions; retrieved blocks at their absolute positions (``memory_positions="absolute"``) or,
    with ``"contiguous"``, re-placed in their original order in the ``K`` block slots right
    before the query's block (so query-key distances stay below ``(K + 1) * block_len``, within a
    short training context; our reading of the paper's retrieval-time position handling).

    Returns ``out [B, Sq, H, E]`` (q's dtype), and with ``return_blocks`` also the chosen block ids
    ``[B, H, Sq, K]`` (int32, ``-1`` where fewer than ``K`` earlier blocks exist).
    """
    batch, sq, sk, h, hkv, d = _checks.check_qkv(q, k, v)
    block_len = _check_block_len(block_len)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    q_offset = sk - sq if q_offset is None else q_offset
    if not isinstance(q_offset, (int, np.integer)) or q_offset < 0 or q_offset + sq > sk:
        raise ValueError(f"q_offset must be an int with 0 <= q_offset and q_offset + q_len <= kv_len "
                         f"({sk}), got q_offset={q_offset!r} with q_len={sq}")
    scale = _checks.check_scale(scale)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if memory_positions not in ("absolute", "contiguous"):
        raise ValueError(f"memory_positions must be 'absolute' or 'contiguous', got {memory_positions!r}")
    if rope_theta is not None and d % 2:
        raise ValueError(f"rope_theta needs an even head dim, got q head dim {d}")
    rot = (lambda x, pos: x) if rope_theta is None else (  # noqa: E731
        lambda x, pos: rotate(x, pos, rope_theta))
    L, g = block_len, h // hkv
    qpos = q_offset + np.arange(sq)
    qblk = qpos // L
    q32 = rot(q.astype(jnp.float32), jnp.asarray(qpos)[None, :, None])
    head_kv = np.arange(h) // g

    # Own block: regular keys j <= i of block c (gathered by position).
    own_pos = qblk[:, None] * L + np.arange(L - 1)[None]  # [Sq, L-1]
    own_ok = own_pos <= qpos[:, None]
    own_pos = np.minimum(own_pos, sk - 1)
    k_own = k[:, own_pos][:, :, :, head_kv].astype(jnp.float32)  # [B, Sq, L-1, H, D]
    k_own = rot(k_own, jnp.asarray(own_pos)[None, :, :, None])
    v_own = v[:, own_pos][:, :, :, head_kv].astype(jnp.float32)
    s_own = jnp.einsum("bqhd,bqjhd->bhqj", q32, k_own, precision=_HP) * scale
    s_own = jnp.where(own_ok[None, None], s_own, -jnp.inf)

    n_mem = sk // L  # complete blocks in the cache
    parts_t, parts_v = [s_own.reshape(batch, h, sq, L - 1)], [v_own]
    kk = min(top_k, n_mem)
    idx = jnp.full((batch, h, sq, max(kk, 1)), -1, jnp.int32)
    if kk > 0:
        lm_pos = np.arange(n_mem) * L + L - 1
        k_lm = k[:, lm_pos][:, :, head_kv].astype(jnp.float32)  # [B, n_mem, H, D]
        if memory_positions == "absolute" or rope_theta is None:
            k_lm = rot(k_lm, jnp.asarray(lm_pos)[None, :, None])
        else:  # ranked as if the block sat right before the query's block
            k_lm = rot(k_lm[:, None], jnp.asarray((qblk * L - 1)[None, :, None, None]))  # [B, Sq, n_mem, H, D]
        eq = "bqhd,bghd->bhqg" if k_lm.ndim == 4 else "bqhd,bqghd->bhqg"
        s_lm = jnp.einsum(eq, q32, k_lm, precision=_HP) * scale
        earlier = np.arange(n_mem)[None] < qblk[:, None]  # [Sq, n_mem]
        val, idx = lax.top_k(jnp.where(earlier[None, None], s_lm, -jnp.inf), kk)
        valid = val > -jnp.inf  # fewer than K earlier blocks
        idx = jnp.where(valid, idx, -1).astype(jnp.int32)
        if memory_positions == "contiguous":  # original order -> slot order (invalid first)
            idx = jnp.sort(idx, axis=-1)
            valid = idx >= 0
        kb = k[:, : n_mem * L].reshape(batch, n_mem, L, hkv, d).transpose(0, 3, 1, 2, 4)
        vb = v[:, : n_mem * L].reshape(batch, n_mem, L, hkv, v.shape[-1]).transpose(0, 3, 1, 2, 4)
        bi = np.arange(batch)[:, None, None, None]
        hi = head_kv[None, :, None, None]
        safe = jnp.maximum(idx, 0)
        k_mem = kb[bi, hi, safe].astype(jnp.float32)  # [B, H, Sq, K, L, D]
        if rope_theta is not None:
            if memory_positions == "absolute":
                mpos = safe[..., None] * L + np.arange(L)  # [B, H, Sq, K, L]
            else:
                slot = (qblk[:, None] - kk + np.arange(kk)[None]) * L  # [Sq, K] slot starts
                mpos = jnp.asarray(slot[None, None, :, :, None] + np.arange(L))
            k_mem = rot(k_mem, mpos)
        v_mem = vb[bi, hi, safe].astype(jnp.float32)
        s_mem = jnp.einsum("bqhd,bhqkjd->bhqkj", q32, k_mem, precision=_HP) * scale
        lse_in = jax.nn.logsumexp(s_mem[..., : L - 1], axis=-1)
        t_mem = s_mem[..., : L - 1] + (s_mem[..., L - 1] - lse_in)[..., None]
        t_mem = jnp.where(valid[..., None], t_mem, -jnp.inf)
        parts_t.append(t_mem.reshape(batch, h, sq, kk * (L - 1)))
        parts_v.append(v_mem[..., : L - 1, :])
    w = jax.nn.softmax(jnp.concatenate(parts_t, axis=-1), axis=-1)
    o = jnp.einsum("bhqj,bqjhe->bqhe", w[..., : L - 1], v_own, precision=_HP)
    if kk > 0:
        w_mem = w[..., L - 1:].reshape(batch, h, sq, kk, L - 1)
        o = o + jnp.einsum("bhqkj,bhqkje->bqhe", w_mem, parts_v[1], precision=_HP)
    o = o.astype(q.dtype)
    return (o, idx) if return_blocks else o
