"""Attention of new queries to a KV cache with per-row lengths, dense, in fp32: the oracle
of the decode kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.reference.attention import attention_reference


def decode_mask(lengths: jax.Array, q_len: int, kv_len: int, *, causal: bool,
                local_window_size: tuple[int | None, int | None] | None = None) -> jax.Array:
    """Bool ``[B, 1, q_len, kv_len]``: query i of batch row b sits at position
    ``p = lengths[b] - q_len + i``; key j is visible iff ``j < lengths[b]``, ``j <= p`` (if
    causal) and ``p - left <= j <= p + right`` (``local_window_size``, None: unbounded side)."""
    j = jnp.arange(kv_len)[None, None, :]
    n = lengths.astype(jnp.int32)[:, None, None]
    p = n - q_len + jnp.arange(q_len)[None, :, None]
    visible = j < n
    if causal:
        visible = visible & (j <= p)
    left, right = local_window_size or (None, None)
    if left is not None:
        visible = visible & (j >= p - left)
    if right is not None:
        visible = visible & (j <= p + right)
    return visible[:, None]


def decode_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     causal: bool = True, scale: float | None = None,
                     local_window_size: tuple[int | None, int | None] | None = None,
                     logits_soft_cap: float | None = None,
                     alibi_slopes: jax.Array | None = None,
                     score_mod=None, score_mod_tables: tuple = (),
                     sinks: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """fp32 ``out [B, Sq, Hq, Dv]`` and ``lse [B, Sq, Hq]`` of q against the first
    ``lengths[b]`` cache entries (zeros / ``-inf`` where no key is visible). ``alibi_slopes``
    ``[Hq]`` or ``[B, Hq]`` subtracts ``slope * |p - j|``, p the query's position
    ``lengths[b] - Sq + i``; ``score_mod(x, b, h, p, j)`` maps the (capped) logits first; ``sinks [Hq]``
    as :func:`attention_reference`'s."""
    lengths = jnp.clip(lengths, 0, k.shape[1])
    mask = decode_mask(lengths, q.shape[1], k.shape[1], causal=causal, local_window_size=local_window_size)
    if alibi_slopes is not None:
        b, sq, hq = q.shape[:3]
        p = lengths.astype(jnp.int32)[:, None, None] - sq + jnp.arange(sq)[None, :, None]  # [B, Sq, 1]
        dist = jnp.abs(p - jnp.arange(k.shape[1])[None, None, :]).astype(jnp.float32)  # [B, Sq, S]
        slopes = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, hq), (b, hq))
        bias = -slopes[:, :, None, None] * dist[:, None]  # [B, Hq, Sq, S]
        mask = jnp.where(mask, bias, -jnp.inf)
    mod = {}
    if score_mod is not None:
        mod = dict(score_mod=score_mod, score_mod_tables=tuple(score_mod_tables),
                   position_offset=((lengths.astype(jnp.int32) - q.shape[1])[:, None, None, None], 0))
    return attention_reference(q, k, v, scale=scale, mask=mask, logits_soft_cap=logits_soft_cap, sinks=sinks, **mod)
