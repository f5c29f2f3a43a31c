"""Block-sparse flash attention on Pallas's Triton backend (forward and backward).

This is not a separate kernel: it runs the FlashAttention-2 forward, dq and dk/dv kernels
of ``jaxattn.pallas.flash`` with a sparse layout (``flash.SparseSpec``), in the spirit of
splash attention and FlexAttention block masks:

* the query axis is cut into mask blocks of ``block_q`` rows and the key axis into mask
  blocks of ``block_k`` keys (powers of two >= 16); kernel tiles are the flash config's,
  shrunk to divide the mask blocks, so one mask block may span several kernel tiles;
* the lists are in CSR form: for query block ``r``, ``(start, n_full, n_visit) =
  kv_index[r]`` and ``kv_blocks[start : start + n_visit]`` are the key blocks to visit,
  the ``n_full`` *full* ones first (every element visible: no mask at all), then the
  *partial* ones, whose elements are masked by ``mask_fn(q_pos, k_pos)`` traced into the
  kernel from iotas (``q_pos`` absolute: row + ``q_offset``), so no dense mask exists;
* the dk/dv kernel walks the transposed lists ``q_index``/``q_blocks`` (per key block,
  the query blocks that visit it, full ones first);
* the lists are plain int32 arrays read as scalars inside the kernel loops (the Triton
  backend has no scalar prefetch); a query block with no entry writes zeros and
  ``lse = -inf``.

The lists themselves come from ``jaxattn.BlockMask`` (host-side numpy, or jnp for a traced
decode position).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxattn.pallas import _common, _dropout, flash_mgpu
from jaxattn.pallas import flash as _flash
from jaxattn.pallas.flash import FlashConfig, SparseSpec

# Block-sparse entries that differ from the flash table's, (padded head dim, bytes) -> FlashConfig
# (``python -m jaxattn.bench tune sparse`` on a GPU). Empty: every layout runs flash's tiles. The
# H200 run of 2026-12-04 spent 1.5x the dense kernel's time per visited block; its full-block loop
# then kept one K/V tile in flight where the dense loop keeps two (the block-id read took a pipeline
# stage; fixed by ``_common.listed_loop``). Scattered blocks (PowerAttention's power-of-two
# distances) may also hit L2 less often than the dense kernel's sequential walk.
CONFIGS: dict[tuple[int, int], FlashConfig] = {}


def sparse_config(head_dim: int, dtype) -> FlashConfig:
    """The block-sparse kernel's tiles for ``head_dim`` and ``dtype``: :data:`CONFIGS`, else flash's."""
    key = _common.table_key(head_dim, dtype, min_dim=32)
    return CONFIGS[key] if key in CONFIGS else _flash.flash_config(head_dim, dtype)


def block_sparse_attention_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_fn: Callable[[jax.Array, jax.Array], jax.Array],
    block_q: int,
    block_k: int,
    kv_index: jax.Array,
    kv_blocks: jax.Array,
    q_index: jax.Array,
    q_blocks: jax.Array,
    q_offset: jax.Array,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: jax.Array | None = None,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
    backend: str = "triton",
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    score_mod: Callable | None = None,
    score_mod_tables: tuple = (),
    sinks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention on already-validated inputs.

    Args:
      q: ``[B, Sq, Hq, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, Dv]`` (GQA: Hkv
        divides Hq); one floating dtype.
      mask_fn: element mask ``(q_pos, k_pos) -> bool`` (broadcasting int32 positions),
        traceable with jnp; hashable (it is part of the compiled kernel's identity).
      block_q, block_k: mask block sizes (powers of two >= 16).
      kv_index: int32 ``[ceil(Sq / block_q), 3]``: (start, n_full, n_visit) per query block.
      kv_blocks: int32 ``[nnz]``: the key blocks of every query block, full ones first.
      q_index, q_blocks: the transposed lists, ``[ceil(Sk / block_k), 3]`` / ``[nnz']``.
      q_offset: int or int32 scalar: absolute position of query row 0 (what ``mask_fn`` sees).
      dropout_rate, dropout_seed: attention dropout, as ``flash.flash_attention`` (the mask is
        indexed by query rows of ``q``, not by ``q_offset`` positions).
      config: tile sizes; defaults to :func:`sparse_config` (the flash table's entry for (head
        dim, dtype) unless :data:`CONFIGS` has one).
      backend: ``"triton"``, or ``"mosaic"``: the forward on the warp-specialized Mosaic GPU kernel
        (``flash_mgpu``, Hopper; its producer warpgroup walks the lists and streams the listed blocks
        with TMA), the backward on the Triton kernels; mask blocks of at least 128 x 128, head dims
        64/128, bf16/fp16, no dropout.
      q_segment_ids, kv_segment_ids: int ``[B, Sq]`` / ``[B, Sk]`` (both or neither; Triton backend):
        packed sequences, keys visible only within the same segment, on top of the layout (masked
        inside every visited tile, full blocks too, as the flash kernels do).
      score_mod: ``(x, batch, head, q_pos, k_pos) -> x'`` on the scaled logits (``mask_fn``'s absolute
        positions), as ``flash.flash_attention``'s (Triton backend), reading ``score_mod_tables``.
      sinks: fp32 ``[Hq]``: attention sinks, as ``flash.flash_attention``'s (Triton backend).

    A *full* block must be fully visible (and hold no padded key); a *partial* block is
    masked element-wise (padded keys included).

    Returns:
      ``out [B, Sq, Hq, Dv]`` in the input dtype and ``lse [B, Sq, Hq]`` (fp32, natural
      log, ``-inf`` for rows with no visible key, whose output is zero).
    """
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    _, q_len, hq, d = q.shape
    kv_len, hkv = k.shape[1], k.shape[2]
    cfg = config or sparse_config(max(d, v.shape[-1]), q.dtype)
    n_qb, n_kb = -(-q_len // block_q), -(-kv_len // block_k)
    for name, x, rows in (("kv_index", kv_index, n_qb), ("q_index", q_index, n_kb)):
        if tuple(x.shape) != (rows, 3):
            raise ValueError(f"{name} must have shape [{rows}, 3], got {tuple(x.shape)}")
    for name, x in (("kv_blocks", kv_blocks), ("q_blocks", q_blocks)):
        if x.ndim != 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must have shape [nnz] with nnz >= 1, got {tuple(x.shape)}")
    mosaic = None
    has_seg = q_segment_ids is not None
    if has_seg != (kv_segment_ids is not None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")
    if backend == "mosaic":
        _flash.check_mosaic(q, k, v, q_segment_ids=q_segment_ids, dropout_rate=dropout_rate, score_mod=score_mod,
                            sinks=sinks)
        mosaic = flash_mgpu.mosaic_config(d)
        if block_q % (2 * mosaic.block_q) or block_k % mosaic.block_kv:
            raise ValueError(f"impl='mosaic' needs mask blocks of a multiple of {2 * mosaic.block_q} query rows "
                             f"and {mosaic.block_kv} keys; got block_q={block_q}, block_k={block_k}")
    elif backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'mosaic', got {backend!r}")
    st = _flash._Static(
        scale=float(1.0 / math.sqrt(d) if scale is None else scale), causal=False,
        q_len=q_len, kv_len=kv_len, q_pad=n_qb * block_q, kv_pad=n_kb * block_k,
        groups=hq // hkv, heads=hq, has_seg=has_seg, bias_kind=None, bias_bcast=(True, True, True, True),
        cfg=cfg, interpret=interpret, precision=_flash.precision_for(q.dtype),
        sparse=SparseSpec(mask_fn=mask_fn, block_q=block_q, block_k=block_k), dropout=float(dropout_rate),
        mosaic=mosaic, score_mod=score_mod, mod_tables=len(score_mod_tables), sinks=sinks is not None,
    )
    layout = tuple(jnp.asarray(x, jnp.int32) for x in (kv_index, kv_blocks, q_index, q_blocks))
    layout += (jnp.asarray(q_offset, jnp.int32).reshape(1),)
    seed = _dropout.kernel_seed(dropout_seed, q.shape[2]) if dropout_rate else None
    qseg = kseg = None
    if has_seg:
        qseg, kseg = _flash.pad_segment_ids(q_segment_ids, kv_segment_ids, st.q_pad, st.kv_pad)
    return _flash.run_padded(st, q, k, v, None, qseg, kseg, layout, None, seed, tuple(score_mod_tables), sinks=sinks)
