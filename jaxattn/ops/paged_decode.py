"""``jaxattn.paged_decode_attention``: decode attention from a paged KV cache (vLLM's layout), and
``jaxattn.append_paged_kv`` to write new tokens into their pages.

A page pool ``k_pages [num_pages, page_size, kv_heads, head_dim]`` (and ``v_pages``) is shared by
all sequences; ``block_tables [batch, max_pages]`` lists, per batch row, the pages holding its
positions ``0 .. page_size - 1``, ``page_size ..``, and so on. Sequences grow a page at a time and
free pages go back to the pool, so memory follows the real lengths instead of ``batch x max_len``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from typing import Literal

import jax
import jax.numpy as jnp

from jaxattn.ops import _checks
from jaxattn.ops.decode import _NO_GRAD, _check_lengths, _quantize_new, decode_options, no_grad_tables, reference_on
from jaxattn.pallas import decode as _decode
from jaxattn.pallas._common import targets_gpu as _targets_gpu

PAGES_LAYOUT = "[num_pages, page_size, kv_heads, head_dim]"


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """The dense cache ``[batch, max_pages * page_size, kv_heads, d]`` a table describes."""
    g = pages[block_tables]  # [batch, max_pages, page_size, kv_heads, d]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


def _check_paged(q, k_pages, v_pages, block_tables, scaled: bool = False) -> tuple[int, int, int]:
    """Validates shapes and dtypes; returns ``(batch, page_size, max_pages)``."""
    _checks.check_rank("q", q, 4, "[batch, Sq, heads, head_dim]")
    _checks.check_rank("k_pages", k_pages, 4, PAGES_LAYOUT)
    _checks.check_rank("v_pages", v_pages, 4, "[num_pages, page_size, kv_heads, v_head_dim]")
    _checks.check_float_dtype("q", q)
    if scaled:
        _checks.check_same_dtype(k_pages=k_pages, v_pages=v_pages)
    else:
        _checks.check_same_dtype(q=q, k_pages=k_pages, v_pages=v_pages)
    batch, q_len, hq, d = q.shape
    _checks.check_dim("k_pages", k_pages, 3, d, "head dim", "q")
    for axis, what in ((0, "num_pages"), (1, "page_size"), (2, "kv_heads")):
        _checks.check_dim("v_pages", v_pages, axis, k_pages.shape[axis], what, "k_pages")
    hkv = k_pages.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k_pages has {hkv} kv heads, which must divide q's {hq} heads (GQA/MQA)")
    if q_len == 0 or k_pages.shape[0] == 0 or k_pages.shape[1] == 0:
        raise ValueError(f"need q_len, num_pages and page_size >= 1; got q {tuple(q.shape)}, "
                         f"k_pages {tuple(k_pages.shape)}")
    check_block_tables(block_tables, batch)
    return batch, k_pages.shape[1], block_tables.shape[1]


def check_block_tables(block_tables, batch: int | None) -> None:
    """``block_tables`` must be int ``[batch, max_pages]`` (``batch`` None: any), ``max_pages >= 1``."""
    _checks.check_array("block_tables", block_tables, "[batch, max_pages]")
    if block_tables.ndim != 2 or (batch is not None and block_tables.shape[0] != batch) or block_tables.shape[1] == 0:
        raise ValueError(f"block_tables must have shape [batch, max_pages] with "
                         f"{'' if batch is None else f'batch = {batch} and '}max_pages >= 1, got "
                         f"{tuple(block_tables.shape)}")
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must have an integer dtype, got {jnp.dtype(block_tables.dtype).name}")


def write_pages(pool: jax.Array, block_tables: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """``pool`` with ``new [batch, n, ...]`` written at positions ``lengths[b] ..`` through the tables."""
    pos = lengths[:, None] + jnp.arange(new.shape[1])[None, :]  # [batch, n]
    page = pool.shape[1]
    pages = jnp.take_along_axis(block_tables.astype(jnp.int32), pos // page, axis=1, mode="clip")
    return pool.at[pages, pos % page].set(new.astype(pool.dtype))


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array | int,
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
    """:func:`jaxattn.decode_attention` with the cache in pages.

    Args:
      q: ``[batch, Sq, heads, head_dim]``, the new tokens.
      k_pages: ``[num_pages, page_size, kv_heads, head_dim]``; v_pages: ``[num_pages, page_size,
        kv_heads, v_head_dim]``. The kernel needs ``page_size`` a power of two >= 16.
      block_tables: int ``[batch, max_pages]``: page of each batch row's ``i``-th ``page_size``
        positions; entries past a row's length are ignored (may hold anything in range).
      lengths: int ``[batch]`` (or one int): valid cache positions per row, the new tokens
        included (write them first with :func:`append_paged_kv`).
      causal, scale, local_window_size, logits_soft_cap, alibi_slopes, k_scale, v_scale, num_splits,
        return_lse, score_mod, score_mod_tables, sinks: as :func:`jaxattn.decode_attention` (quantized pages:
        :func:`jaxattn.quantize_kv`).
      impl: ``"pallas"`` (split-KV kernel reading pages through the table; interpret mode without a
        GPU), ``"xla"`` (gathers the pages and runs the dense fp32 reference), ``"auto"``.

    Returns ``out [batch, Sq, heads, v_head_dim]`` in q's dtype (and the fp32 ``lse``).
    """
    _checks.check_impl(impl)
    causal = _checks.check_flag("causal", causal)
    batch, page, max_pages = _check_paged(q, k_pages, v_pages, block_tables, scaled=k_scale is not None)
    lengths = _check_lengths(lengths, batch, max_pages * page)
    extra = decode_options(batch, q.shape[2], k_pages.shape[2], scale=scale, local_window_size=local_window_size,
                           logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes, k_scale=k_scale,
                           v_scale=v_scale, num_splits=num_splits, score_mod=score_mod,
                           score_mod_tables=score_mod_tables, sinks=sinks)
    dims_ok = max(q.shape[-1], v_pages.shape[-1]) <= _decode.MAX_HEAD_DIM
    page_ok = page >= 16 and page & (page - 1) == 0
    if impl == "pallas" and not (dims_ok and page_ok):
        raise ValueError(f"impl='pallas' needs page_size a power of two >= 16 (got {page}) and head dims "
                         f"<= {_decode.MAX_HEAD_DIM} (got {q.shape[-1]}, {v_pages.shape[-1]})")
    kernel = impl == "pallas" or (impl == "auto" and dims_ok and page_ok and _targets_gpu())
    if kernel and not _checks.empty(q, block_tables):
        q, k_pages, v_pages = (_checks.no_grad(x, _NO_GRAD) for x in (q, k_pages, v_pages))
        extra = no_grad_tables(extra)
        out, lse = _decode.paged_decode_attention_kernel(q, k_pages, v_pages, block_tables, lengths, causal=causal,
                                                         **extra)
    else:
        k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
        out, lse = reference_on(q, k, v, lengths, causal, extra)
    return (out, lse) if return_lse else out


def append_paged_kv(k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, k: jax.Array,
                    v: jax.Array, lengths: jax.Array | int, *, k_scale=None,
                    v_scale=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes ``k``/``v [batch, n, kv_heads, d]`` at positions ``lengths[b] .. lengths[b] + n`` of
    each batch row, into the pages its table names; returns the pools and ``lengths + n``. The
    caller owns the tables (allocating a page before a row crosses into it) and keeps the pages
    of different rows distinct. Quantized pools take their scales (as :func:`jaxattn.append_kv`)."""
    _checks.check_rank("k_pages", k_pages, 4, PAGES_LAYOUT)
    _checks.check_rank("v_pages", v_pages, 4, "[num_pages, page_size, kv_heads, v_head_dim]")
    batch, page, max_pages = block_tables.shape[0], k_pages.shape[1], block_tables.shape[1]
    for name, pool, new in (("k", k_pages, k), ("v", v_pages, v)):
        _checks.check_rank(name, new, 4, "[batch, n, kv_heads, head_dim]")
        if new.shape[0] != batch or new.shape[2:] != pool.shape[2:]:
            raise ValueError(f"{name} has shape {tuple(new.shape)}; expected [batch={batch}, n, kv_heads, head_dim] "
                             f"matching {name}_pages {tuple(pool.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must hold the same number of new rows; got {k.shape[1]} and {v.shape[1]}")
    lengths = _check_lengths(lengths, batch, max_pages * page)
    k, v = _quantize_new(k_pages, k, k_scale, "k"), _quantize_new(v_pages, v, v_scale, "v")
    return (write_pages(k_pages, block_tables, k, lengths), write_pages(v_pages, block_tables, v, lengths),
            lengths + k.shape[1])
