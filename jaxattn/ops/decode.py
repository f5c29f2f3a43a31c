"""``jaxattn.decode_attention``: attention of new tokens to a KV cache (flash-decoding on GPU),
and ``jaxattn.append_kv`` to write them into the cache."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.ops import _checks
from jaxattn.pallas import decode as _decode
from jaxattn.reference.decode import decode_reference

_NO_GRAD = ("decode_attention's kernel is inference-only (no gradient). Differentiate "
            "jaxattn.attention, or decode_attention(..., impl='xla').")


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array | int | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    impl: Literal["auto", "pallas", "xla"] = "auto",
    num_splits: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of ``Sq`` new queries per batch row to the first ``lengths[b]`` cache entries.

    Args:
      q: ``[batch, Sq, heads, head_dim]``, the new tokens (Sq = 1 for plain decoding; a few
        for speculative decoding or chunked prefill).
      k: ``[batch, S, kv_heads, head_dim]`` key cache (``kv_heads`` divides ``heads``).
      v: ``[batch, S, kv_heads, v_head_dim]`` value cache.
      lengths: int ``[batch]`` (or one int): valid cache entries per row, the new tokens
        included (write them first, e.g. with :func:`append_kv`); default ``S``. Values are
        clipped to ``[0, S]``.
      causal: query i sits at position ``lengths[b] - Sq + i`` and sees keys up to it;
        False: every query sees all ``lengths[b]`` keys.
      scale: logit scale, default ``1/sqrt(head_dim)``.
      local_window_size: ``(left, right)`` or one int, as in :func:`jaxattn.attention`: keys
        ``p - left .. p + right`` around each query's position p (sliding-window decoding reads
        only the window's cache blocks).
      logits_soft_cap: c > 0 caps the scaled logits as ``c * tanh(x / c)``.
      alibi_slopes: ``[heads]`` or ``[batch, heads]``: ALiBi, ``slope * |p - j|`` subtracted from
        the logits of the query at position p (as :func:`jaxattn.attention`).
      impl: ``"pallas"`` (split-KV kernel; interpret mode without a GPU), ``"xla"`` (the dense
        fp32 reference, differentiable), ``"auto"`` (the kernel on GPU).
      num_splits: KV chunks per (batch, kv head) for the kernel; default: enough to fill the GPU.
      return_lse: also return the fp32 log-sum-exp ``[batch, Sq, heads]``.

    A row with no visible key returns zeros (``lse = -inf``). The kernel path has no gradient.

    Returns:
      ``out [batch, Sq, heads, v_head_dim]`` in q's dtype (and ``lse``).
    """
    _checks.check_impl(impl)
    batch, q_len, kv_len, hq, hkv, d = _checks.check_qkv(q, k, v)
    lengths = _check_lengths(lengths, batch, kv_len)
    scale = _checks.check_scale(scale)
    extra = dict(local_window_size=_checks.check_window(local_window_size),
                 logits_soft_cap=_checks.check_soft_cap(logits_soft_cap),
                 alibi_slopes=_checks.check_alibi(alibi_slopes, batch, q.shape[2]))
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    kernel_ok = max(d, v.shape[-1]) <= _decode.MAX_HEAD_DIM
    if impl == "pallas" and not kernel_ok:
        raise ValueError(f"impl='pallas' supports head dims up to {_decode.MAX_HEAD_DIM}; got q/k "
                         f"head_dim={d}, v head_dim={v.shape[-1]}")
    if impl == "pallas" or (impl == "auto" and kernel_ok and jax.default_backend() == "gpu"):
        q, k, v = (_checks.no_grad(x, _NO_GRAD) for x in (q, k, v))
        out, lse = _decode.decode_attention_kernel(q, k, v, lengths, causal=causal, scale=scale,
                                                   num_splits=num_splits, **extra)
    else:
        out, lse = decode_reference(q, k, v, lengths, causal=causal, scale=scale, **extra)
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def append_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
              lengths: jax.Array | int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes ``k``/``v [batch, n, kv_heads, d]`` into the caches ``[batch, S, kv_heads, d]`` at
    rows ``lengths[b] .. lengths[b] + n`` of each batch row; returns the caches and
    ``lengths + n``. The caller keeps ``lengths + n <= S`` (a traced value cannot be checked:
    XLA would clamp the write position)."""
    for name, cache, new in (("k", k_cache, k), ("v", v_cache, v)):
        _checks.check_rank(f"{name}_cache", cache, 4, "[batch, S, kv_heads, head_dim]")
        _checks.check_rank(name, new, 4, "[batch, n, kv_heads, head_dim]")
        if new.shape[0] != cache.shape[0] or new.shape[2:] != cache.shape[2:]:
            raise ValueError(f"{name} has shape {tuple(new.shape)}; expected [batch, n, kv_heads, head_dim] "
                             f"matching {name}_cache {tuple(cache.shape)} in batch, kv_heads and head_dim")
    if k.shape[1] != v.shape[1] or k.shape[1] > k_cache.shape[1]:
        raise ValueError(f"k and v must hold the same n <= S new rows; got {k.shape[1]} and {v.shape[1]}, "
                         f"S = {k_cache.shape[1]}")
    lengths = _check_lengths(lengths, k_cache.shape[0], k_cache.shape[1])

    def write(cache, new, start):
        return lax.dynamic_update_slice(cache, new.astype(cache.dtype), (start, 0, 0))

    k_cache = jax.vmap(write)(k_cache, k, lengths)
    v_cache = jax.vmap(write)(v_cache, v, lengths)
    return k_cache, v_cache, lengths + k.shape[1]


def _check_lengths(lengths, batch: int, kv_len: int) -> jax.Array:
    if lengths is None:
        return jnp.full((batch,), kv_len, jnp.int32)
    if isinstance(lengths, int):
        return jnp.full((batch,), lengths, jnp.int32)
    _checks.check_array("lengths", lengths, "[batch]")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must have an integer dtype, got {jnp.dtype(lengths.dtype).name}")
    if lengths.ndim == 0:
        return jnp.broadcast_to(lengths.astype(jnp.int32), (batch,))
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [batch] = ({batch},), got {tuple(lengths.shape)}")
    return lengths.astype(jnp.int32)
