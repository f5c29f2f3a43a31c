"""Softmax attention, dense, in fp32: the oracle for every softmax kernel."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.pallas import _dropout


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    local_window_size: tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    score_mod: Callable | None = None,
    score_mod_tables: tuple = (),
    position_offset: tuple | None = None,
    sinks: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: jax.Array | None = None,
    dropout_shared: bool = False,
    dropout_offset: tuple = (0, 0, 0),
) -> tuple[jax.Array, jax.Array]:
    """``softmax(softcap(scale * q k^T) + bias) v`` over visible keys, in fp32.

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` (Hkv divides Hq).
    Query i sits at position ``p = i + Sk - Sq``. Key j is visible when ``j <= p`` (if
    causal), ``p - left <= j <= p + right`` (``local_window_size = (left, right)``, None for
    an unbounded side), the segment ids match (if given), and a boolean ``mask``
    (broadcastable to ``[B, Hq, Sq, Sk]``) is True; a floating ``mask`` is added to the
    logits. ``logits_soft_cap`` c maps the scaled logits x to ``c * tanh(x / c)`` (before the bias).
    ``alibi_slopes`` ``[Hq]`` or ``[B, Hq]`` subtracts ``slope * |p - j|`` (ALiBi, after the cap).
    ``score_mod(x, b, h, i, j)`` maps each (capped) logit before ALiBi and the
    bias (broadcast over ``[B, Hq, Sq, Sk]`` index arrays), with the arrays ``score_mod_tables``
    as further arguments (differentiable). ``position_offset = (q0, k0)`` (ints, or int arrays that
    broadcast against ``[B, Hq, Sq, Sk]``, e.g. per batch row): query i sits at position ``q0 + i`` and
    key j at ``k0 + j`` (``p = i + q0 - k0`` among the keys, replacing the bottom-right alignment);
    score_mod then sees ``q0 + i`` and ``k0 + j``. ``sinks [Hq]``: a learned logit per
    head in every row's softmax (gpt-oss's attention sinks) that carries no value: the weights sum to
    less than one, and a row with no visible key gives zeros and ``lse = sink``.
    ``dropout_rate`` r zeroes each softmax weight where ``jaxattn.pallas._dropout.keep_mask``
    (from ``dropout_seed``; one mask for every batch and head with ``dropout_shared``) says so and
    scales the others by ``1 / (1 - r)``; ``lse`` is that of the undropped weights. ``dropout_offset``
    ``(batch, query row, key)`` takes the mask's block at that offset (a shard's part of a larger
    problem's mask).
    Returns fp32 ``out [B, Sq, Hq, Dv]`` and ``lse [B, Sq, Hq]``; a row with no
    visible key gives zeros and ``lse = -inf``.
    """
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    sq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = jnp.repeat(k, hq // hkv, axis=2)
    v = jnp.repeat(v, hq // hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=lax.Precision.HIGHEST) * scale
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    q0, k0 = (0, 0) if position_offset is None else position_offset
    align = sk - sq if position_offset is None else q0 - k0  # key position of query row 0
    if score_mod is not None:
        b_, h_, i_, j_ = (lax.broadcasted_iota(jnp.int32, s.shape, axis) for axis in range(4))
        s = jnp.broadcast_to(score_mod(s, b_, h_, i_ + q0, j_ + k0, *score_mod_tables),
                             s.shape).astype(jnp.float32)
    if alibi_slopes is not None:  # [Hq] or [B, Hq]: - slope * |p - j|, p = i + align
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, hq)[:, :, None, None]
        dist = jnp.abs(jnp.arange(sq)[:, None] + align - jnp.arange(sk)[None, :])
        s = s - slopes * dist.astype(jnp.float32)
    visible = jnp.ones(s.shape, bool)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.dtype == jnp.bool_:
            visible = visible & mask
        else:
            s = s + mask.astype(jnp.float32)
    if causal:
        i = jnp.arange(sq)[:, None]
        j = jnp.arange(sk)[None, :]
        visible = visible & (j <= i + align)
    if local_window_size is not None:
        left, right = local_window_size
        pos = jnp.arange(sq)[:, None] + align
        j = jnp.arange(sk)[None, :]
        if left is not None:
            visible = visible & (j >= pos - left)
        if right is not None:
            visible = visible & (j <= pos + right)
    if q_segment_ids is not None:
        visible = visible & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    s = jnp.where(visible, s, -jnp.inf)
    sink = None
    if sinks is not None:  # one more logit per row, with no value
        sink = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32).reshape(1, hq, 1, 1), (*s.shape[:3], 1))
    m = lax.stop_gradient(jnp.max(s if sink is None else jnp.concatenate([s, sink], -1), axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    if sink is not None:
        l = l + jnp.exp(sink - m)
    w = p / jnp.where(l == 0, 1.0, l)
    if dropout_rate:
        b0, q0, k0 = dropout_offset
        keep = _dropout.keep_mask(dropout_seed, 1 if dropout_shared else q.shape[0], 1 if dropout_shared else hq,
                                  sq, sk, dropout_rate, offset=(0 if dropout_shared else b0, q0, k0))
        w = jnp.where(keep, w / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=lax.Precision.HIGHEST)
    lse = jnp.where(l[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
    return out, jnp.swapaxes(lse, 1, 2)
