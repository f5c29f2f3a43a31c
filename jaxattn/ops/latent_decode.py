"""``jaxattn.latent_decode_attention``: decoding against a multi-head latent attention cache (DeepSeek's MLA with
the up-projection absorbed, :mod:`jaxattn.models.mla`): every query head attends to one key head whose first
``value_dim`` columns are also the value (the latent). The cache is dense ``[batch, S, 1, D]`` or a pool of pages
``[num_pages, page_size, 1, D]`` read through ``block_tables`` (FlashMLA's layout); :func:`append_paged_latent`
writes new rows into their pages."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxattn.ops import _checks, _spmd
from jaxattn.ops.decode import CACHE_DTYPES, _NO_GRAD, _check_lengths, _quantize_new, check_kv_scale, reference_on
from jaxattn.ops.paged_decode import check_block_tables, gather_pages, write_pages
from jaxattn.pallas import decode as _decode
from jaxattn.pallas._common import targets_gpu

__all__ = ["latent_decode_attention", "append_paged_latent"]


def latent_decode_attention(q: jax.Array, cache: jax.Array, lengths: jax.Array | int | None = None, *,
                            value_dim: int, block_tables: jax.Array | None = None,
                            cache_scale: jax.Array | float | None = None, causal: bool = True,
                            scale: float | None = None, impl: Literal["auto", "pallas", "xla"] = "auto",
                            num_splits: int | None = None,
                            return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of ``Sq`` new queries ``q [batch, Sq, heads, D]`` to the first ``lengths[b]`` rows of a latent
    cache: keys are its rows, values their first ``value_dim`` columns.

    Args:
      q: ``[batch, Sq, heads, D]``, the new tokens (``D``: latent + RoPE widths; DeepSeek-V3's 512 + 64).
      cache: ``[batch, S, 1, D]``; or, with ``block_tables``, a page pool ``[num_pages, page_size, 1, D]``
        (FlashMLA's paged cache; the kernel needs ``page_size`` a power of two >= 16).
      lengths: int ``[batch]`` (or one int; None: all ``S`` rows): valid cache rows, the new tokens included.
      value_dim: the latent's width, the values' columns.
      block_tables: int ``[batch, max_pages]``: the page holding each row's ``i``-th ``page_size`` positions
        (entries past a row's length are never read); the cache then has ``max_pages * page_size`` rows.
      cache_scale: ``[1]`` or a scalar: a quantized cache (float8_e4m3fn, float8_e5m2 or int8, from
        :func:`jaxattn.quantize_kv`) holding ``latent / cache_scale``; the kernel upcasts each tile to q's dtype
        as it loads it and scales the logits and the output (half the bytes of a bf16 cache for FP8).
      causal, scale, num_splits, return_lse: as :func:`jaxattn.decode_attention`.
      impl: ``"pallas"``: the decode kernel's latent mode (each cache block read once, as a ``value_dim``-wide
        and a ``D - value_dim``-wide tile: both powers of two >= 16, at most 512 and 128; pages read through the
        table in place), ``"xla"`` the dense reference (differentiable; pages gathered first), ``"auto"`` the
        kernel on a GPU when the widths (and page size) fit it.

    Returns ``out [batch, Sq, heads, value_dim]`` in q's dtype (and the fp32 lse)."""
    _checks.check_impl(impl)
    causal = _checks.check_flag("causal", causal)
    _checks.check_rank("q", q, 4, "[batch, Sq, heads, D]")
    layout = "[batch, S, 1, D]" if block_tables is None else "[num_pages, page_size, 1, D]"
    _checks.check_rank("cache", cache, 4, layout)
    _checks.check_float_dtype("q", q)
    quantized = jnp.dtype(cache.dtype) in map(jnp.dtype, CACHE_DTYPES)
    if cache_scale is None and quantized:
        raise ValueError(f"cache is {jnp.dtype(cache.dtype).name}: a quantized cache needs cache_scale "
                         "(see jaxattn.quantize_kv)")
    if not quantized:
        _checks.check_same_dtype(q=q, cache=cache)
    if cache_scale is not None:
        cache_scale = check_kv_scale("cache_scale", cache_scale, 1)
    batch, _, _, d = q.shape
    if (block_tables is None and cache.shape[0] != batch) or cache.shape[2] != 1 or cache.shape[3] != d:
        want = f"[{batch}, S, 1, {d}]" if block_tables is None else f"[num_pages, page_size, 1, {d}]"
        raise ValueError(f"cache must be {layout} = {want} like q {tuple(q.shape)}, got {tuple(cache.shape)}")
    if not isinstance(value_dim, int) or not 0 < value_dim <= d:
        raise ValueError(f"value_dim must be an int in [1, D = {d}] (the latent's width), got {value_dim!r}")
    page = 0
    if block_tables is not None:
        if cache.shape[0] == 0 or cache.shape[1] == 0:
            raise ValueError(f"cache (a page pool) needs num_pages and page_size >= 1, got {tuple(cache.shape)}")
        page = cache.shape[1]
        check_block_tables(block_tables, batch)
    rows = cache.shape[1] if block_tables is None else block_tables.shape[1] * page
    lengths = _check_lengths(lengths, batch, rows)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    scale = _checks.check_scale(scale)
    widths_ok = _decode.latent_kernel_ok(d, value_dim)
    page_ok = not page or (page >= 16 and page & (page - 1) == 0)
    if impl == "pallas" and not widths_ok:
        raise ValueError(f"impl='pallas': the latent decode kernel takes value_dim and D - value_dim powers of two "
                         f">= 16, at most {_decode.LATENT_MAX}; got value_dim={value_dim}, D={d}")
    if impl == "pallas" and not page_ok:
        raise ValueError(f"impl='pallas': the latent decode kernel takes a page_size (cache.shape[1]) that is a power "
                         f"of two >= 16, got {page}")
    kernel = impl == "pallas" or (impl == "auto" and widths_ok and page_ok and targets_gpu())
    if kernel and not _checks.empty(q, cache):
        q, cache = (_checks.no_grad(x, _NO_GRAD) for x in (q, cache))
        run = lambda batch_offset=None, **a: _decode.latent_decode_attention_kernel(  # noqa: E731
            value_dim=value_dim, causal=causal, scale=scale, num_splits=num_splits, **a)
        if block_tables is None:  # (under jaxattn.batch_parallel per device on its batch shard)
            out, lse = _spmd.per_batch_shard(run, dict(q=q, cache=cache, lengths=lengths), dict(cache_scale=cache_scale))
        else:  # (a page pool is shared by the batch rows)
            out, lse = run(q=q, cache=cache, lengths=lengths, block_tables=block_tables, cache_scale=cache_scale)
    else:
        if block_tables is not None:
            cache = gather_pages(cache, block_tables)
        out, lse = reference_on(q, cache, cache[..., :value_dim], lengths, causal,
                                dict(scale=scale, local_window_size=None, logits_soft_cap=None, alibi_slopes=None,
                                     num_splits=num_splits, score_mod=None, score_mod_tables=(),
                                     k_scale=cache_scale, v_scale=cache_scale))
    return (out, lse) if return_lse else out


def append_paged_latent(pages: jax.Array, block_tables: jax.Array, latent: jax.Array,
                        lengths: jax.Array | int, *, cache_scale=None) -> tuple[jax.Array, jax.Array]:
    """Writes ``latent [batch, n, 1, D]`` (the new tokens' cache rows) at positions ``lengths[b] ..
    lengths[b] + n`` of each batch row, into the pages of ``pages [num_pages, page_size, 1, D]`` its table
    names; returns the pool and ``lengths + n`` (as :func:`jaxattn.append_paged_kv`: the caller allocates
    the pages and keeps different rows' pages distinct). A quantized pool takes its ``cache_scale`` (the rows
    are quantized with it)."""
    _checks.check_rank("pages", pages, 4, "[num_pages, page_size, 1, D]")
    check_block_tables(block_tables, None)
    batch = block_tables.shape[0]
    _checks.check_rank("latent", latent, 4, "[batch, n, 1, D]")
    if latent.shape[0] != batch or latent.shape[2:] != pages.shape[2:]:
        raise ValueError(f"latent has shape {tuple(latent.shape)}; expected [batch={batch}, n, 1, D] matching pages "
                         f"{tuple(pages.shape)}")
    lengths = _check_lengths(lengths, batch, block_tables.shape[1] * pages.shape[1])
    if cache_scale is None and jnp.dtype(pages.dtype) in map(jnp.dtype, CACHE_DTYPES):
        raise ValueError(f"pages is {jnp.dtype(pages.dtype).name}: pass cache_scale (from jaxattn.quantize_kv)")
    latent = _quantize_new(pages, latent, cache_scale, "cache")
    return write_pages(pages, block_tables, latent, lengths), lengths + latent.shape[1]
