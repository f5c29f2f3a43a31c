"""``jaxattn.decode_attention``: attention of new tokens to a KV cache (flash-decoding on GPU),
and ``jaxattn.append_kv`` to write them into the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import decode as _decode
from jaxattn.pallas._common import targets_gpu as _targets_gpu
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
    k_scale: jax.Array | float | None = None,
    v_scale: jax.Array | float | None = None,
    impl: Literal["auto", "pallas", "xla"] = "auto",
    num_splits: int | None = None,
    return_lse: bool = False,
    score_mod: Callable | None = None,
    score_mod_tables: Sequence[jax.Array] = (),
    sinks: jax.Array | None = None,
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
      k_scale, v_scale: ``[kv_heads]`` or scalars, for a quantized cache (float8_e4m3fn,
        float8_e5m2 or int8, from :func:`quantize_kv`) holding ``k / k_scale``, ``v / v_scale``: the
        kernel upcasts its tiles and applies the scales (FP8 halves the bytes decoding reads).
      impl: ``"pallas"`` (split-KV kernel; interpret mode without a GPU), ``"xla"`` (the dense
        fp32 reference, differentiable), ``"auto"`` (the kernel on GPU).
      num_splits: KV chunks per (batch, kv head) for the kernel; default: enough to fill the GPU.
      return_lse: also return the fp32 log-sum-exp ``[batch, Sq, heads]``.
      score_mod: ``(x, batch, head, q_pos, kv_idx) -> x'``, :func:`jaxattn.attention`'s logit transform,
        with each query's cache position ``q_pos = lengths[b] - Sq + i`` (what ``q_idx`` is in a full
        causal forward over the sequence), so decoding reproduces such a forward.
      score_mod_tables: arrays ``score_mod`` reads by indexing, after its index arguments (as
        :func:`jaxattn.attention`'s).
      sinks: ``[heads]``: attention sinks, as :func:`jaxattn.attention`'s (gpt-oss decoding).

    A row with no visible key returns zeros (``lse = -inf``, or the sink). The kernel path has no gradient.

    Returns:
      ``out [batch, Sq, heads, v_head_dim]`` in q's dtype (and ``lse``).
    """
    _checks.check_impl(impl)
    causal = _checks.check_flag("causal", causal)
    batch, q_len, kv_len, hq, hkv, d = check_cache_qkv(q, k, v, k_scale, v_scale)
    lengths = _check_lengths(lengths, batch, kv_len)
    extra = decode_options(batch, hq, hkv, scale=scale, local_window_size=local_window_size,
                           logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                           v_scale=v_scale, num_splits=num_splits, score_mod=score_mod,
                           score_mod_tables=score_mod_tables, sinks=sinks)
    kernel_ok = max(d, v.shape[-1]) <= _decode.MAX_HEAD_DIM
    if impl == "pallas" and not kernel_ok:
        raise ValueError(f"impl='pallas' supports head dims up to {_decode.MAX_HEAD_DIM}; got q/k "
                         f"head_dim={d}, v head_dim={v.shape[-1]}")
    if (impl == "pallas" or (impl == "auto" and kernel_ok and _targets_gpu())) and not _checks.empty(q, k, v):
        q, k, v = (_checks.no_grad(x, _NO_GRAD) for x in (q, k, v))
        extra = no_grad_tables(extra)
        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        shared = {n: x for n, x in extra.items() if _spmd.has_arrays(x)}
        per_row = getattr(shared.get("alibi_slopes"), "ndim", 0) == 2  # ([batch, heads] slopes split with the rows)
        rows = {"alibi_slopes": shared.pop("alibi_slopes")} if per_row else {}
        out, lse = _spmd.per_batch_shard(
            lambda batch_offset=None, **a: _decode.decode_attention_kernel(causal=causal, **{**extra, **a}),
            dict(q=q, k=k, v=v, lengths=lengths, **rows), shared)
    else:
        out, lse = reference_on(q, k, v, lengths, causal, extra)
    return (out, lse) if return_lse else out


def decode_options(batch: int, heads: int, kv_heads: int, *, scale, local_window_size, logits_soft_cap,
                   alibi_slopes, k_scale, v_scale, num_splits, score_mod=None, score_mod_tables=(),
                   sinks=None) -> dict:
    """The validated keyword options both decode ops pass to their kernel (or the reference)."""
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale (a quantized cache) or neither")
    extra = dict(scale=_checks.check_scale(scale), local_window_size=_checks.check_window(local_window_size),
                 logits_soft_cap=_checks.check_soft_cap(logits_soft_cap), num_splits=num_splits,
                 alibi_slopes=_checks.check_alibi(alibi_slopes, batch, heads))
    if k_scale is not None:
        extra.update(k_scale=check_kv_scale("k_scale", k_scale, kv_heads),
                     v_scale=check_kv_scale("v_scale", v_scale, kv_heads))
    extra["score_mod"], extra["score_mod_tables"] = _checks.check_score_mod(score_mod, score_mod_tables)
    if sinks is not None:
        extra["sinks"] = _checks.check_sinks(sinks, heads)
    return extra


def no_grad_tables(options: dict) -> dict:
    """``options`` with the score_mod tables and the sinks marked forward-only (the decode kernels have no
    backward)."""
    options = dict(options)
    if options.get("score_mod_tables"):
        options["score_mod_tables"] = tuple(_checks.no_grad(t, _NO_GRAD) for t in options["score_mod_tables"])
    if options.get("sinks") is not None:
        options["sinks"] = _checks.no_grad(options["sinks"], _NO_GRAD)
    return options


def reference_on(q, k, v, lengths, causal: bool, options: dict) -> tuple[jax.Array, jax.Array]:
    """The dense fp32 reference on a (dequantized) dense cache with :func:`decode_options`."""
    opts = dict(options)
    k_scale, v_scale = opts.pop("k_scale", None), opts.pop("v_scale", None)
    opts.pop("num_splits")
    hkv = k.shape[2]
    k, v = dequantize_kv(k, k_scale, hkv), dequantize_kv(v, v_scale, hkv)
    out, lse = decode_reference(q, k, v, lengths, causal=causal, **opts)
    return out.astype(q.dtype), lse


CACHE_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int8)
_QMAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.float8_e5m2): 57344.0, jnp.dtype(jnp.int8): 127.0}


def check_cache_qkv(q, k, v, k_scale, v_scale) -> tuple[int, int, int, int, int, int]:
    """:func:`_checks.check_qkv` where k and v may be a quantized cache (given with its scales;
    :func:`decode_options` checks that both are)."""
    if k_scale is None and v_scale is None:
        for name, x in (("k", k), ("v", v)):
            if hasattr(x, "dtype") and jnp.dtype(x.dtype) in map(jnp.dtype, CACHE_DTYPES):
                raise ValueError(f"{name} is {jnp.dtype(x.dtype).name}: a quantized cache needs k_scale and v_scale "
                                 "(see jaxattn.quantize_kv)")
        return _checks.check_qkv(q, k, v)
    _checks.check_same_dtype(k=k, v=v)
    if jnp.dtype(k.dtype) not in map(jnp.dtype, CACHE_DTYPES) and jnp.dtype(k.dtype) != jnp.dtype(q.dtype):
        raise ValueError(f"a scaled cache must be float8_e4m3fn, float8_e5m2, int8 or q's dtype, got "
                         f"{jnp.dtype(k.dtype).name}")
    like_q = [jax.ShapeDtypeStruct(x.shape, q.dtype) if hasattr(x, "shape") else x for x in (k, v)]
    return _checks.check_qkv(q, *like_q)


def check_kv_scale(name: str, scale, kv_heads: int) -> jax.Array:
    scale = jnp.asarray(scale)
    if scale.shape not in ((), (kv_heads,)) or not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float or a floating array [kv_heads] = ({kv_heads},), got "
                         f"{jnp.dtype(scale.dtype).name} {tuple(scale.shape)}")
    return jnp.broadcast_to(scale.astype(jnp.float32), (kv_heads,))


def dequantize_kv(x: jax.Array, scale, kv_heads: int) -> jax.Array:
    """``x * scale`` in fp32 (``scale`` per kv head, axis 2); ``x`` itself when ``scale`` is None."""
    if scale is None:
        return x
    return x.astype(jnp.float32) * jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (kv_heads,))[:, None]


def quantize_kv(x: jax.Array, scale: jax.Array | float | None = None,
                dtype=jnp.float8_e4m3fn) -> tuple[jax.Array, jax.Array]:
    """``(x / scale)`` rounded to ``dtype`` (saturating), and the fp32 scale per kv head: from the
    max magnitude over everything but the heads axis (axis -2) when ``scale`` is None, so that it
    fills the format's range. ``x``: ``[..., kv_heads, head_dim]`` (a cache, new tokens, or pages).
    Decode with ``decode_attention(..., k_scale=, v_scale=)``; append with ``append_kv(...,
    k_scale=, v_scale=)`` (which reuses the scales: new tokens beyond them saturate)."""
    dtype = jnp.dtype(dtype)
    if dtype not in _QMAX:
        raise ValueError(f"dtype must be one of {[d.name for d in _QMAX]}, got {dtype.name}")
    qmax = _QMAX[dtype]
    h = x.shape[-2]
    xf = x.astype(jnp.float32)
    if scale is None:
        amax = jnp.max(jnp.abs(xf).reshape(-1, h, x.shape[-1]), axis=(0, 2))
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
    scale = check_kv_scale("scale", scale, h)
    y = jnp.clip(xf / scale[:, None], -qmax, qmax)
    return (jnp.round(y) if dtype == jnp.dtype(jnp.int8) else y).astype(dtype), scale


def append_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
              lengths: jax.Array | int, *, k_scale=None, v_scale=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes ``k``/``v [batch, n, kv_heads, d]`` into the caches ``[batch, S, kv_heads, d]`` at
    rows ``lengths[b] .. lengths[b] + n`` of each batch row; returns the caches and
    ``lengths + n``. The caller keeps ``lengths + n <= S`` (a traced value cannot be checked:
    XLA would clamp the write position). A quantized cache takes its scales (``k_scale``,
    ``v_scale``, as :func:`quantize_kv` returned them) and gets ``quantize_kv(new, scale)``."""
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
    k, v = _quantize_new(k_cache, k, k_scale, "k"), _quantize_new(v_cache, v, v_scale, "v")

    def write(cache, new, start):
        return lax.dynamic_update_slice(cache, new.astype(cache.dtype), (start, 0, 0))

    k_cache = jax.vmap(write)(k_cache, k, lengths)
    v_cache = jax.vmap(write)(v_cache, v, lengths)
    return k_cache, v_cache, lengths + k.shape[1]


def _quantize_new(cache: jax.Array, new: jax.Array, scale, name: str) -> jax.Array:
    """New rows in the cache's representation: quantized with the cache's scale if it is one."""
    quantized = jnp.dtype(cache.dtype) in map(jnp.dtype, CACHE_DTYPES)
    if scale is None:
        if quantized:
            raise ValueError(f"{name}_cache is {jnp.dtype(cache.dtype).name}: pass {name}_scale (from quantize_kv)")
        return new
    if quantized:
        return quantize_kv(new, scale, cache.dtype)[0]
    scale = check_kv_scale(f"{name}_scale", scale, new.shape[-2])
    return (new.astype(jnp.float32) / scale[:, None]).astype(cache.dtype)


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
