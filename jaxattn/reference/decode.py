"""Attention of new queries to a KV cache with per-row lengths, dense, in fp32: the oracle
of the decode kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.reference.attention import attention_reference


def decode_mask(lengths: jax.Array, q_len: int, kv_len: int, *, causal: bool) -> jax.Array:
    """Bool ``[B, 1, q_len, kv_len]``: key j is visible to query i of batch row b iff
    ``j < lengths[b]`` and, if causal, ``j <= lengths[b] - q_len + i`` (the query's position)."""
    j = jnp.arange(kv_len)[None, None, :]
    n = lengths.astype(jnp.int32)[:, None, None]
    visible = j < n
    if causal:
        i = jnp.arange(q_len)[None, :, None]
        visible = visible & (j <= n - q_len + i)
    return visible[:, None]


def decode_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                     causal: bool = True, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """fp32 ``out [B, Sq, Hq, Dv]`` and ``lse [B, Sq, Hq]`` of q against the first
    ``lengths[b]`` cache entries (zeros / ``-inf`` where no key is visible)."""
    mask = decode_mask(jnp.clip(lengths, 0, k.shape[1]), q.shape[1], k.shape[1], causal=causal)
    return attention_reference(q, k, v, scale=scale, mask=mask)
