"""Flash-decoding on Pallas's Triton backend: attention of a few new queries to a KV cache.

Decoding reads the whole cache for one (or a few) query tokens, so it is bound by memory
bandwidth and has too little work per (batch, head) to fill a GPU. Two things fix that:

- **GQA packing.** The ``Sq * groups`` query rows that share a kv head form one tile of
  ``block_m`` rows, so each cache tile is read once per kv head, not once per query head.
- **Split-KV.** The cache is cut into ``num_splits`` chunks; a program per (chunk, batch,
  kv head, row tile) runs the online softmax over its chunk and writes its partial result
  (normalised within the chunk) and log-sum-exp; the chunks are merged exactly by their
  log-sum-exps afterwards (XLA, tiny).

Each batch row has its own cache length ``lengths[b]``: a program visits only the key blocks
below it, so a ragged batch costs what its real lengths cost. With ``causal``, query ``i`` of
``Sq`` sits at position ``lengths[b] - Sq + i`` and sees keys up to it (the new tokens are
already in the cache); otherwise every query sees all ``lengths[b]`` keys. Rows with no
visible key give zeros and ``lse = -inf``. Forward only (inference).

**Paged caches** (vLLM's layout): keys and values live in a pool of pages ``[num_pages,
page_size, Hkv, D]`` and ``block_tables[b, i]`` names the page holding row ``b``'s positions
``i * page_size ...``. The same kernel reads key block ``j`` from page ``block_tables[b, j //
sub]`` at offset ``(j % sub) * block_k`` (``sub = page_size / block_k``; pages smaller than the
block size are read one page per step), so nothing is gathered into a dense cache.

**Latent caches** (multi-head latent attention, DeepSeek's MLA decoded with the up-projection absorbed):
one array ``[B, S, 1, L + R]`` is both: keys are its whole rows, values their first ``L`` columns (the
latent). The kernel reads each block once, as two tiles (``L`` and ``R`` wide: 512 and 64 in
DeepSeek-V3, each a power of two), so the 576-wide key is two dots and the value is the first tile. A latent
cache may be paged too (FlashMLA's layout, ``[num_pages, page_size, 1, L + R]``).

**Quantized caches** (FP8 / int8 with a scale per kv head): tiles are upcast to q's dtype as they
are loaded; ``k_scale`` multiplies the logits and ``v_scale`` the output. **ALiBi**: per packed row,
``slope * |position - key position|`` is subtracted from the logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot
from jaxattn.pallas.flash import (LOG2E, NEG_INF, _bounds, base2_logits, online_softmax_finish, online_softmax_init,
                                  online_softmax_step, precision_for, score_mod_logits)

MAX_HEAD_DIM = 256
# Programs to aim for when choosing the split count: a few waves of an H100's 132 SMs.
TARGET_PROGRAMS = 528


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles and launch parameters: ``block_k`` keys per loop step, at most ``block_m``
    packed query rows per program."""

    block_k: int = 64
    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 2


# (padded head dim, bytes per element) -> config; other pairs fall back to the default.
CONFIGS: dict[tuple[int, int], DecodeConfig] = {
    (64, 2): DecodeConfig(128, 64, 4, 3),
    (128, 2): DecodeConfig(64, 64, 4, 3),
    (256, 2): DecodeConfig(32, 32, 4, 2),
    (128, 4): DecodeConfig(32, 32, 8, 2),  # 4 warps spilled ~0.5-0.9 KB per thread on sm_90a
    (256, 4): DecodeConfig(16, 16, 4, 1),
}
# latent caches: (latent width L, bytes per element) -> config (a [block_m, L] fp32 accumulator). On sm_90a,
# L = 512: 32 rows and 8 warps keep it spill-free with a 3-stage pipeline (64 rows, for wgmma, spilled
# 56-660 B per thread at every block_k and stage count tried; 4 warps spilled 56 B)
LATENT_CONFIGS: dict[tuple[int, int], DecodeConfig] = {
    (512, 2): DecodeConfig(32, 32, 8, 3),
    (256, 2): DecodeConfig(32, 32, 4, 3),
}
# the widest latent (L) and RoPE part (R) the latent mode takes
LATENT_MAX = (512, 128)


def decode_config(head_dim: int, dtype) -> DecodeConfig:
    return CONFIGS.get(_common.table_key(head_dim, dtype), DecodeConfig())


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    causal: bool
    q_len: int  # Sq (new tokens per batch row)
    groups: int  # q heads per kv head
    rows: int  # Sq * groups packed rows
    block_m: int
    block_k: int
    n_rb: int  # row tiles
    per_split: int  # key blocks per split
    num_splits: int
    precision: object
    window: tuple[int | None, int | None] = (None, None)  # (left, right) around each query's position
    softcap: float | None = None
    blocks_per_page: int = 0  # paged cache: key blocks per page (0: a dense cache)
    alibi: bool = False  # per-row ALiBi slopes: logits -= slope * |position - key position|
    kv_scales: bool = False  # a quantized cache: k = k_stored * k_scale, v = v_stored * v_scale per kv head
    score_mod: object = None  # (x, batch, head, position, key) -> x' on the (capped) logits (flash's score_mod)
    mod_tables: int = 0  # arrays score_mod reads, the last inputs
    # the cache as it is (no padded copy): its rows (a dense cache's last key block may run past
    # them) and head dims; the tiles are powers of two as wide, their extra columns masked
    cache_rows: int = 0
    head_dim: int = 0
    value_dim: int = 0
    latent: int = 0  # a latent cache: values are the keys' first `latent` columns (0: a separate value cache)


def choose_splits(batch: int, kv_heads: int, row_tiles: int, kv_blocks: int) -> int:
    """Enough splits to launch about ``TARGET_PROGRAMS`` programs, at most one per key block."""
    base = batch * kv_heads * row_tiles
    return int(max(1, min(kv_blocks, -(-TARGET_PROGRAMS // base))))


def _kernel(q_ref, k_ref, *rest, st: _Static):
    v_ref, len_ref, *rest = (None, *rest) if st.latent else rest
    table_ref, *rest = rest if st.blocks_per_page else (None, *rest)
    slope_ref, *rest = rest if st.alibi else (None, *rest)
    scale_ref, *rest = rest if st.kv_scales else (None, *rest)
    tables, (o_ref, lse_ref) = rest[:st.mod_tables], rest[st.mod_tables:]
    split = lax.div(pl.program_id(0), st.n_rb)
    rb = lax.rem(pl.program_id(0), st.n_rb)
    length = len_ref[pl.program_id(1)]
    bm, bk = st.block_m, st.block_k

    rows = rb * bm + jnp.arange(bm)
    pos = length - st.q_len + lax.div(rows, st.groups)  # position of each packed row's query
    first = length - st.q_len + lax.div(rb * bm, st.groups)  # positions of the tile's first/last rows
    last = length - st.q_len + lax.div(rb * bm + bm - 1, st.groups)
    left, right = _bounds(st)  # key offsets around each query's position (causal: right <= 0)
    if right is None:  # every row sees up to the end of its cache
        lim = jnp.broadcast_to(length - 1, (bm,))
        lo_lim = hi_lim = length - 1
    else:
        lim = jnp.minimum(pos + right, length - 1)  # last visible key per row
        lo_lim, hi_lim = jnp.minimum(first + right, length - 1), jnp.minimum(last + right, length - 1)
    s0 = split * st.per_split
    hi = jnp.clip(lax.div(jnp.maximum(hi_lim + 1, 0) + bk - 1, bk), s0, s0 + st.per_split)
    if left is None:
        start = free_lo = s0
    else:  # row r sees keys >= pos_r - left: skip blocks below the tile's window
        start = jnp.clip(lax.div(jnp.maximum(first - left, 0), bk), s0, hi)
        free_lo = jnp.clip(lax.div(jnp.maximum(last - left, 0) + bk - 1, bk), start, hi)
    n_free = jnp.clip(lax.div(jnp.maximum(lo_lim + 1, 0), bk), free_lo, hi)  # blocks every row sees whole

    lat, rope = st.latent, st.head_dim - st.latent
    if lat:  # [latent | rope] columns, each tile a power of two
        q, q_rope = q_ref[:, pl.ds(0, lat)], q_ref[:, pl.ds(lat, rope)]
    else:
        q = q_ref[...]
    slope = slope_ref[...] * LOG2E if st.alibi else None  # [bm]: each packed row's head's slope
    batch = pl.program_id(1)
    heads = pl.program_id(2) * st.groups + lax.rem(rows, st.groups)  # each packed row's q head
    k_scale = scale_ref[0] if st.kv_scales else None

    def body(j, page, carry, masked: bool):
        k_start = pl.multiple_of(j * bk, bk)
        if st.blocks_per_page:  # block j: part (j % sub) of page block_tables[b, j // sub]
            first = pl.multiple_of(lax.rem(j, st.blocks_per_page) * bk, bk)
            idx, ragged = (page, pl.ds(first, bk), slice(None)), False  # (pages hold whole key blocks)
        else:  # (blocks past the cache's rows are always masked ones)
            first = k_start
            idx, ragged = (pl.ds(k_start, bk), slice(None)), masked and st.cache_rows % bk != 0
        if lat:  # the latent tile is the value too; the keys add the RoPE tile
            v = _common.load_tile(k_ref, (*idx[:-1], pl.ds(0, lat)), first, st.cache_rows, ragged, lat)
            k_rope = _common.load_tile(k_ref, (*idx[:-1], pl.ds(lat, rope)), first, st.cache_rows, ragged, rope)
            if st.kv_scales:  # dequantise: the stored latent (e.g. fp8) in q's dtype; its scale below
                v, k_rope = v.astype(q.dtype), k_rope.astype(q.dtype)
            qk = dot(q, v, trans_b=True, precision=st.precision) + dot(q_rope, k_rope, trans_b=True,
                                                                       precision=st.precision)
        else:
            k = _common.load_tile(k_ref, idx, first, st.cache_rows, ragged, st.head_dim)
            v = _common.load_tile(v_ref, idx, first, st.cache_rows, ragged, st.value_dim)
            if st.kv_scales:  # dequantise: the stored values (e.g. fp8) in q's dtype; scales below
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            qk = dot(q, k, trans_b=True, precision=st.precision)
        if st.kv_scales:
            qk = qk * k_scale
        s, _ = base2_logits(qk, st.scale, st.softcap)
        if st.score_mod is not None:  # (no gradient here)
            s, _, _ = score_mod_logits(st.score_mod, s, batch, heads[:, None], pos[:, None],
                                       (k_start + jnp.arange(bk))[None, :], tables=tables)
        if st.alibi:
            dist = jnp.abs(pos[:, None] - (k_start + jnp.arange(bk))[None, :]).astype(jnp.float32)
            s = s - dist * slope[:, None]
        if masked:
            k_pos = (k_start + jnp.arange(bk))[None, :]
            keep = k_pos <= lim[:, None]
            if left is not None:
                keep = jnp.logical_and(keep, k_pos >= pos[:, None] - left)
            s = jnp.where(keep, s, NEG_INF)
        return online_softmax_step(carry, s, v, st.precision)

    def loop(lo, hi_, carry, masked: bool):
        if not st.blocks_per_page:
            return lax.fori_loop(lo, hi_, lambda j, c: body(j, None, c, masked), carry)
        # the page of each block read one iteration ahead (_common.listed_loop)
        last = table_ref.shape[0] - 1
        return _common.listed_loop(lo, hi_, lambda j: table_ref[jnp.minimum(lax.div(j, st.blocks_per_page), last)],
                                   functools.partial(body, masked=masked), carry)

    carry = online_softmax_init(bm, lat or v_ref.shape[-1])
    if left is not None:
        carry = loop(start, free_lo, carry, masked=True)
    carry = loop(free_lo, n_free, carry, masked=False)
    carry = loop(n_free, hi, carry, masked=True)
    o, lse = online_softmax_finish(*carry)
    o_ref[...], lse_ref[...] = (o * scale_ref[1] if st.kv_scales else o), lse


def _launch(q, k, v, lengths, table, *, s_max: int, cfg: DecodeConfig, bk: int, blocks_per_page: int,
            causal=True, scale=None, local_window_size=None, logits_soft_cap=None, num_splits=None,
            interpret=None, alibi_slopes=None, k_scale=None, v_scale=None, score_mod=None, score_mod_tables=(),
            sinks=None, latent: int = 0):
    """Packs the queries, runs the split-KV kernel over ``s_max`` logical cache rows (the dense
    cache ``k``/``v [B, s_max, Hkv, *]`` or a page pool with ``table``, both read as they are; ``latent``:
    ``v`` is None, the values ``k``'s first ``latent`` columns) and merges the splits. Options as
    :func:`decode_attention_kernel`."""
    batch, q_len, hq, d = q.shape
    hkv, dv = k.shape[2], latent or v.shape[-1]
    kv_scale = _kv_scale(k_scale, v_scale, hkv)
    g = hq // hkv
    rows = q_len * g
    bm = min(cfg.block_m, max(16, _common.next_pow2(rows)))
    n_rb = -(-rows // bm)
    n_kb = -(-s_max // bk)
    splits = num_splits or choose_splits(batch, hkv, n_rb, n_kb)
    splits = int(max(1, min(splits, n_kb)))
    per = -(-n_kb // splits)
    splits = -(-n_kb // per)  # no split without blocks
    st = _Static(scale=float(1.0 / math.sqrt(d) if scale is None else scale), causal=bool(causal),
                 q_len=q_len, groups=g, rows=rows, block_m=bm, block_k=bk, n_rb=n_rb, per_split=per,
                 num_splits=splits, precision=precision_for(q.dtype),
                 window=tuple(local_window_size) if local_window_size is not None else (None, None),
                 softcap=None if logits_soft_cap is None else float(logits_soft_cap),
                 blocks_per_page=blocks_per_page, alibi=alibi_slopes is not None, kv_scales=kv_scale is not None,
                 cache_rows=0 if blocks_per_page else k.shape[1], head_dim=d, value_dim=dv, score_mod=score_mod,
                 mod_tables=len(score_mod_tables), latent=latent)
    # (a latent cache's rows are read as they are: two power-of-two tiles, latent and RoPE)
    dp, dvp = (d, dv) if latent else (_common.tile_width(d), _common.tile_width(dv))
    # pack: [B, Sq, Hkv, g, D] -> [B, Hkv, Sq * g, D], rows padded to the row tiles
    qg = q.reshape(batch, q_len, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(batch, hkv, rows, d)
    qg = _common.pad_axis(_common.pad_axis(qg, 2, n_rb * bm), 3, dp)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s_max)
    widths = (dp,) if latent else (dp, dvp)  # (a latent cache: k alone)
    if blocks_per_page:  # the whole pool; programs index pages through the table
        n_pages, page = k.shape[:2]
        kv_specs = [pl.BlockSpec((n_pages, page, None, x), lambda i, b, h: (0, 0, h, 0)) for x in widths]
        extra_specs = [pl.BlockSpec((None, table.shape[1]), lambda i, b, h: (b, 0))]
        extra = [table]
    else:
        s_pad = n_kb * bk  # (whole key blocks: the last may run past the cache's rows)
        kv_specs = [pl.BlockSpec((None, s_pad, None, x), lambda i, b, h: (b, 0, h, 0)) for x in widths]
        extra_specs, extra = [], []
    if alibi_slopes is not None:  # per packed row (row = s * g + head in group): [B, Hkv, rows padded]
        sl = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, hq), (batch, hq))
        sl = jnp.broadcast_to(sl.reshape(batch, hkv, 1, g), (batch, hkv, q_len, g)).reshape(batch, hkv, rows)
        extra_specs.append(pl.BlockSpec((None, None, bm), lambda i, b, h: (b, h, lax.rem(i, n_rb))))
        extra.append(_common.pad_axis(sl, 2, n_rb * bm))
    if kv_scale is not None:  # [Hkv, 2]: (k scale, v scale) per kv head
        extra_specs.append(pl.BlockSpec((None, 2), lambda i, b, h: (h, 0)))
        extra.append(kv_scale)
    for x in score_mod_tables:  # whole: the kernel gathers from them
        extra_specs.append(_common.whole_block(x.shape))
        extra.append(x)
    call = _common.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((batch, splits, hkv, n_rb * bm, dvp), jnp.float32),
                   jax.ShapeDtypeStruct((batch, splits, hkv, n_rb * bm), jnp.float32)],
        grid=(splits * n_rb, batch, hkv),
        in_specs=[
            pl.BlockSpec((None, None, bm, dp), lambda i, b, h: (b, h, lax.rem(i, n_rb), 0)),
            *kv_specs,
            pl.BlockSpec((batch,), lambda i, b, h: (0,)),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, bm, dvp), lambda i, b, h: (b, lax.div(i, n_rb), h, lax.rem(i, n_rb), 0)),
            pl.BlockSpec((None, None, None, bm), lambda i, b, h: (b, lax.div(i, n_rb), h, lax.rem(i, n_rb))),
        ],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=interpret, name="jaxattn_decode")
    o_parts, lse_parts = call(qg, k, *(() if latent else (v,)), lengths, *extra)
    out, lse = _common.merge_partials(o_parts[..., :rows, :dv], lse_parts[..., :rows])
    # unpack: [B, Hkv, Sq * g, ...] -> [B, Sq, Hq, ...]
    out = out.reshape(batch, hkv, q_len, g, dv).transpose(0, 2, 1, 3, 4).reshape(batch, q_len, hq, dv)
    lse = lse.reshape(batch, hkv, q_len, g).transpose(0, 2, 1, 3).reshape(batch, q_len, hq)
    if sinks is not None:  # (the merged splits are fp32: one more partial, exact)
        out, lse = _common.with_sinks(out, lse, sinks)
    return out.astype(q.dtype), lse


def _kv_scale(k_scale, v_scale, hkv: int):
    if k_scale is None and v_scale is None:
        return None
    one = lambda x: jnp.broadcast_to(jnp.asarray(1.0 if x is None else x, jnp.float32), (hkv,))  # noqa: E731
    return jnp.stack([one(k_scale), one(v_scale)], axis=1)


def decode_attention_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    config: DecodeConfig | None = None,
    causal: bool = True,
    scale: float | None = None,
    local_window_size: tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
    alibi_slopes: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    score_mod=None,
    score_mod_tables: tuple = (),
    sinks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV decode attention on validated inputs.

    Args:
      q: ``[B, Sq, Hq, D]`` (Sq small: the new tokens); k: ``[B, S, Hkv, D]``, v:
        ``[B, S, Hkv, Dv]`` the cache (``Hkv`` divides ``Hq``); one floating dtype.
      lengths: int ``[B]``, valid cache entries per batch row (clipped to ``[0, S]``).
      local_window_size: ``(left, right)`` keys around each query's position (None: unbounded
        side); cache blocks below the window are skipped.
      logits_soft_cap: c > 0 maps the scaled logits x to ``c * tanh(x / c)``.
      num_splits: KV chunks per (batch, kv head); None picks enough to fill the GPU.
      alibi_slopes: ``[Hq]`` or ``[B, Hq]``: ALiBi, ``slope * |p - j|`` subtracted from the logits.
      k_scale, v_scale: ``[Hkv]`` (or scalars): a quantized cache (e.g. float8_e4m3fn) holding
        ``k / k_scale``, ``v / v_scale``; tiles are upcast to q's dtype in the kernel, ``k_scale``
        scales the logits and ``v_scale`` the output (half the cache bytes of bf16 for FP8).
      score_mod: ``(x, batch, head, q_pos, kv_idx) -> x'`` on the (capped) logits before ALiBi, with each
        query's cache position ``q_pos = lengths[b] - Sq + i`` (the row index of a full forward),
        reading ``score_mod_tables`` (flash's; no gradient here).
      sinks: ``[Hq]``: attention sinks (a value-less logit per head in the softmax), merged with the
        splits' partial results.

    Returns:
      ``out [B, Sq, Hq, Dv]`` in q's dtype and ``lse [B, Sq, Hq]`` (fp32, natural log).
    """
    d, s_max, dv = q.shape[-1], k.shape[1], v.shape[-1]
    cfg = config or decode_config(max(d, dv), q.dtype)
    bk = min(cfg.block_k, max(16, _common.next_pow2(s_max)))
    return _launch(q, k, v, lengths, None, s_max=s_max, cfg=cfg, bk=bk, blocks_per_page=0, causal=causal,
                   scale=scale, local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                   num_splits=num_splits, interpret=interpret, alibi_slopes=alibi_slopes, k_scale=k_scale,
                   v_scale=v_scale, score_mod=score_mod, score_mod_tables=tuple(score_mod_tables), sinks=sinks)


def latent_decode_attention_kernel(q: jax.Array, cache: jax.Array, lengths: jax.Array, *, value_dim: int,
                                   config: DecodeConfig | None = None, causal: bool = True, scale: float | None = None,
                                   num_splits: int | None = None, interpret: bool | None = None,
                                   block_tables: jax.Array | None = None, cache_scale: jax.Array | None = None
                                   ) -> tuple[jax.Array, jax.Array]:
    """Split-KV decode attention from a latent cache, on validated inputs: ``q [B, Sq, H, L + R]``, ``cache
    [B, S, 1, L + R]`` (the keys; the values are its first ``L = value_dim`` columns), ``L`` and ``R`` powers
    of two >= 16 up to :data:`LATENT_MAX`; or, with ``block_tables [B, max_pages]``, a page pool ``[P,
    page_size, 1, L + R]`` (``page_size`` a power of two >= 16) read through the tables as
    :func:`paged_decode_attention_kernel`; ``cache_scale [1]``: a quantized cache (FP8 / int8) holding ``latent /
    cache_scale``. Returns ``out [B, Sq, H, L]`` in q's dtype and the fp32 lse."""
    cfg = config or LATENT_CONFIGS.get((value_dim, jnp.dtype(q.dtype).itemsize), DecodeConfig(32, 32, 4, 3))
    if block_tables is None:
        table, s_max = None, cache.shape[1]
        bk = min(cfg.block_k, max(16, _common.next_pow2(s_max)))
    else:  # (whole key blocks per page, as the paged kernel)
        table, s_max, bk = block_tables.astype(jnp.int32), block_tables.shape[1] * cache.shape[1], min(cfg.block_k,
                                                                                                        cache.shape[1])
    return _launch(q, cache, None, lengths, table, s_max=s_max, cfg=cfg, bk=bk,
                   blocks_per_page=0 if table is None else cache.shape[1] // bk, causal=causal, scale=scale,
                   num_splits=num_splits, interpret=interpret, latent=value_dim, k_scale=cache_scale,
                   v_scale=cache_scale)


def latent_kernel_ok(width: int, value_dim: int) -> bool:
    """Whether the latent mode takes a cache ``width`` wide whose first ``value_dim`` columns are the values."""
    rope = width - value_dim
    pow2 = all(x >= 16 and x & (x - 1) == 0 for x in (value_dim, rope))
    return pow2 and value_dim <= LATENT_MAX[0] and rope <= LATENT_MAX[1]


def paged_decode_attention_kernel(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    config: DecodeConfig | None = None,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """Split-KV decode attention from a paged cache, on validated inputs: k_pages ``[P, page_size,
    Hkv, D]``, v_pages ``[P, page_size, Hkv, Dv]`` (``page_size`` a power of two >= 16),
    block_tables int ``[B, max_pages]``, lengths int ``[B]`` (clipped to ``max_pages * page_size``).
    Entries of a table past a row's length are never read. ``options`` (causal, scale, window, soft
    cap, splits, ALiBi slopes, cache scales, sinks, interpret) as :func:`decode_attention_kernel`; same
    results as it on the gathered cache."""
    d, page, dv = q.shape[-1], k_pages.shape[1], v_pages.shape[-1]
    cfg = config or decode_config(max(d, dv), q.dtype)
    bk = min(cfg.block_k, page)
    return _launch(q, k_pages, v_pages, lengths, block_tables.astype(jnp.int32), s_max=block_tables.shape[1] * page,
                   cfg=cfg, bk=bk, blocks_per_page=page // bk, **options)
