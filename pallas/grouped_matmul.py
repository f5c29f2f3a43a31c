"""Grouped matmul (a mixture of experts' expert matmuls) on Pallas's Triton backend.

``out[r] = lhs[r] @ rhs[g]`` for every row ``r`` of group ``g``, where ``lhs [M, K]`` holds the groups'
rows one group after another (``group_sizes [G]`` rows each, in order; rows past their sum belong to
none and come out zero) and ``rhs [G, K, N]`` one matrix per group: :func:`jax.lax.ragged_dot`'s
contract. XLA's GPU compiler runs ``ragged_dot`` as one dense matmul over every group (``G`` times the
work: a 32-expert layer pays 32x); these kernels do each row's own group only.

* ``gmm`` (forward; with ``transpose_rhs`` the lhs gradient ``dout @ rhs[g]ᵀ``): a work list of
  (group, row tile) pairs, one program per pair and column tile. A row tile that straddles groups is
  visited once per group; each visit stores only its group's rows (masked stores, so two programs never
  write the same element). The list is built by XLA from the group sizes, its static length the most
  it can need, ``ceil(M / block_m) + G - 1``; unused entries do nothing.
* ``tgmm`` (the rhs gradient ``drhs[g] = lhs[rows of g]ᵀ @ dout[rows of g]``): one program per (group,
  K tile, N tile), looping over the group's row tiles with the rows outside the group masked to zero;
  a group without rows gets zeros.

With an MXFP4 ``rhs`` (:mod:`jaxattn.ops.mxfp4`: packed uint8 ``[G, 17 K / 32, N]``) ``gmm`` dequantizes
each 32-row group's two 16-row halves (low and high nibbles) and scale as it reads them, into ``lhs``' dtype,
and its transposed form (the lhs gradient) writes each half group's 16 output columns as their own piece;
the packed weights get no gradient.

fp32 accumulation; bf16 / fp16 / fp32 inputs (fp32: exact fp32 dots). ``K`` and ``N`` are tiled by
powers of two that divide them (multiples of 16; others are zero-padded), ``M`` is padded to the row
tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxattn.ops import mxfp4
from jaxattn.pallas import _common
from jaxattn.pallas._common import dot

__all__ = ["GroupedMatmulConfig", "grouped_matmul_kernel", "group_metadata", "MAX_RHS_ELEMENTS"]

# rhs is read through 32-bit offsets: beyond this many elements the op falls back to XLA
MAX_RHS_ELEMENTS = 2 ** 31 - 1


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Row, column and contraction tiles (powers of two >= 16; the column and contraction tiles are
    shrunk to divide the dims), warps and pipeline stages."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


# bytes per element -> config (two-byte: 64 x 128 wgmma tiles, 64-deep; fp32: half the tiles)
CONFIGS = {2: GroupedMatmulConfig(), 4: GroupedMatmulConfig(32, 64, 32, 4, 2)}


def grouped_matmul_config(dtype) -> GroupedMatmulConfig:
    return CONFIGS[jnp.dtype(dtype).itemsize if jnp.dtype(dtype).itemsize in CONFIGS else 2]


def _tile(dim: int, largest: int) -> int:
    """The largest power of two <= ``largest`` (>= 16) dividing ``dim`` (``dim`` a multiple of 16)."""
    t = largest
    while dim % t:
        t //= 2
    return t


@dataclasses.dataclass(frozen=True)
class _Static:
    block_m: int
    block_n: int  # output columns per program
    block_k: int  # contraction step
    contract: int  # the contraction length
    transpose_rhs: bool
    num_warps: int
    num_stages: int
    interpret: bool | None
    exact: bool
    mxfp4_k: int = 0  # an MXFP4 rhs (jaxattn.ops.mxfp4): its matrices' K; 0: a dense rhs

    @property
    def mxfp4(self) -> bool:
        return self.mxfp4_k > 0

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None


def group_metadata(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(offsets [G + 1], tile_group [W], tile_row [W])`` int32: each group's first row, and the work
    list of (group, row tile) pairs in order, ``W = ceil(m / block_m) + G - 1`` entries, the unused ones
    with group -1."""
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    first = starts // block_m
    count = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
    done = jnp.cumsum(count)  # work items up to and including group i
    w = -(-m // block_m) + g - 1
    item = jnp.arange(w, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(done, item, side="right"), g - 1).astype(jnp.int32)
    tile = first[group] + item - (done[group] - count[group])
    valid = item < done[-1]
    return offsets, jnp.where(valid, group, -1), jnp.where(valid, tile, 0)


def _rows(t, block: int):
    return pl.ds(pl.multiple_of(t * block, block), block)


def _fp4(code: jax.Array) -> jax.Array:
    """fp32 values of FP4 (e2m1) codes (int32 in [0, 16))."""
    e, m = (code >> 1) & 3, (code & 1).astype(jnp.float32)
    mag = jnp.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << jnp.maximum(e - 1, 0)).astype(jnp.float32))
    return jnp.where(code >= 8, -mag, mag)


def _mxfp4_tile(rhs_ref, g, grp, cols, k: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Rows ``32 grp + [0, 16)`` and ``32 grp + [16, 32)`` of group ``g``'s MXFP4 matrix (packed
    ``rhs_ref [G, 17 K / 32, N]``, :mod:`jaxattn.ops.mxfp4`) at columns ``cols``, dequantized to ``dtype``."""
    byte = rhs_ref[g, pl.ds(grp * 16, 16), cols].astype(jnp.int32)
    scale = lax.bitcast_convert_type(rhs_ref[g, pl.ds(k // 2 + grp, 1), cols].astype(jnp.int32) << 23, jnp.float32)
    return (_fp4(byte & 15) * scale).astype(dtype), (_fp4(byte >> 4) * scale).astype(dtype)


def _products(st: _Static, lhs_ref, rhs_ref, g, rows, n) -> list[tuple[pl.Slice, jax.Array]]:
    """The program's output pieces ``(columns, fp32 value)``: one ``[block_m, block_n]`` tile, or for the
    transposed MXFP4 product one ``[block_m, 16]`` piece per half group of its ``block_n`` columns."""
    cols = _rows(n, st.block_n)
    if st.mxfp4 and st.transpose_rhs:  # dout @ W^T: the output columns are W's rows, two pieces a group
        groups = st.block_n // 32

        def body(kk, accs):
            a = lhs_ref[rows, _rows(kk, st.block_k)]
            out = []
            for j in range(groups):
                lo, hi = _mxfp4_tile(rhs_ref, g, n * groups + j, _rows(kk, st.block_k), st.mxfp4_k, a.dtype)
                out += [dot(a, lo, trans_b=True, precision=st.precision), dot(a, hi, trans_b=True, precision=st.precision)]
            return tuple(acc + p for acc, p in zip(accs, out))

        accs = lax.fori_loop(0, st.contract // st.block_k, body,
                             tuple(jnp.zeros((st.block_m, 16), jnp.float32) for _ in range(2 * groups)))
        return [(pl.ds(n * st.block_n + 16 * i, 16), acc) for i, acc in enumerate(accs)]

    def body(kk, acc):
        if st.mxfp4:  # block_k / 32 groups of 32 rows, each its two halves
            for j in range(st.block_k // 32):
                grp = kk * (st.block_k // 32) + j
                lo, hi = _mxfp4_tile(rhs_ref, g, grp, cols, st.mxfp4_k, lhs_ref.dtype)
                acc += dot(lhs_ref[rows, pl.ds(grp * 32, 16)], lo, precision=st.precision)
                acc += dot(lhs_ref[rows, pl.ds(grp * 32 + 16, 16)], hi, precision=st.precision)
            return acc
        ks = _rows(kk, st.block_k)
        a = lhs_ref[rows, ks]
        b = rhs_ref[g, cols, ks] if st.transpose_rhs else rhs_ref[g, ks, cols]
        return acc + dot(a, b, trans_b=st.transpose_rhs, precision=st.precision)

    acc = lax.fori_loop(0, st.contract // st.block_k, body, jnp.zeros((st.block_m, st.block_n), jnp.float32))
    return [(cols, acc)]


def _gmm_kernel(group_ref, tile_ref, offsets_ref, lhs_ref, rhs_ref, out_ref, *, st: _Static):
    w, n = pl.program_id(0), pl.program_id(1)
    g = group_ref[w]

    @pl.when(g >= 0)
    def _():
        t = tile_ref[w]
        rows = _rows(t, st.block_m)
        for cols, acc in _products(st, lhs_ref, rhs_ref, g, rows, n):
            r = t * st.block_m + lax.broadcasted_iota(jnp.int32, acc.shape, 0)
            mine = (r >= offsets_ref[g]) & (r < offsets_ref[g + 1])
            pltriton.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=mine)


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, st: _Static):
    g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[g], offsets_ref[g + 1]
    ks, ns = _rows(kb, st.block_k), _rows(nb, st.block_n)

    def body(t, acc):
        rows = _rows(t, st.block_m)
        r = t * st.block_m + lax.broadcasted_iota(jnp.int32, (st.block_m, st.block_k), 0)
        a = lhs_ref[rows, ks]
        a = jnp.where((r >= start) & (r < end), a, jnp.zeros_like(a))
        return acc + dot(a, dout_ref[rows, ns], trans_a=True, precision=st.precision)

    hi = jnp.where(end > start, (end + st.block_m - 1) // st.block_m, 0)
    acc = lax.fori_loop(start // st.block_m, hi, body, jnp.zeros((st.block_k, st.block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _static(cfg: GroupedMatmulConfig, contract: int, out_cols: int, transpose_rhs: bool, dtype,
            interpret, mxfp4_k: int = 0) -> _Static:
    return _Static(cfg.block_m, _tile(out_cols, cfg.block_n), _tile(contract, cfg.block_k), contract, transpose_rhs,
                   cfg.num_warps, cfg.num_stages, interpret, jnp.dtype(dtype) == jnp.float32, mxfp4_k)


def _gmm(lhs, rhs, offsets, tile_group, tile_row, *, transpose_rhs: bool, out_dtype, cfg: GroupedMatmulConfig,
         interpret, mxfp4_k: int = 0):
    """``lhs [Mp, C] -> [Mp, O]`` with ``rhs [G, C, O]`` (``transpose_rhs``: ``[G, O, C]``; ``mxfp4_k``: the
    packed MXFP4 ``[G, 17 K / 32, N]`` of matrices ``[G, K, N]``); ``Mp`` a multiple of ``block_m``, ``C``
    and ``O`` multiples of 16 (of 32 where they are an MXFP4 ``K``)."""
    mp, c = lhs.shape
    if mxfp4_k:
        o = mxfp4_k if transpose_rhs else rhs.shape[2]
    else:
        o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    st = _static(cfg, c, o, transpose_rhs, lhs.dtype, interpret, mxfp4_k)
    w = tile_group.shape[0]
    call = _common.pallas_call(
        functools.partial(_gmm_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((mp, o), out_dtype)],
        grid=(w, o // st.block_n),
        in_specs=[_common.whole_block(x.shape) for x in (tile_group, tile_row, offsets, lhs, rhs)],
        out_specs=[_common.whole_block((mp, o))],
        num_warps=st.num_warps, num_stages=st.num_stages, interpret=interpret,
        name="grouped_matmul" + ("_mxfp4" if mxfp4_k else "") + ("_t" if transpose_rhs else ""),
        # rows of no group (padding, past the sizes' sum) are never stored: they start as zeros
        out_init=[jnp.zeros((mp, o), out_dtype)])
    return call(tile_group, tile_row, offsets, lhs, rhs)[0]


def _tgmm(lhs, dout, offsets, *, out_dtype, cfg: GroupedMatmulConfig, interpret):
    """``[G, K, N]``: per group, its rows of ``lhs [Mp, K]`` transposed times its rows of ``dout [Mp, N]``."""
    mp, k = lhs.shape
    n = dout.shape[1]
    g = offsets.shape[0] - 1
    st = _static(cfg, k, n, False, lhs.dtype, interpret)  # (block_k: the K tile, block_n: the N tile)
    call = _common.pallas_call(
        functools.partial(_tgmm_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((g, k, n), out_dtype)],
        grid=(g, k // st.block_k, n // st.block_n),
        in_specs=[_common.whole_block(x.shape) for x in (offsets, lhs, dout)],
        out_specs=[pl.BlockSpec((None, st.block_k, st.block_n), lambda gi, kb, nb: (gi, kb, nb))],
        num_warps=st.num_warps, num_stages=st.num_stages, interpret=interpret, name="grouped_matmul_tgmm")
    return call(offsets, lhs, dout)[0]


def _pad16(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    for a in axes:
        x = _common.pad_axis(x, a, _common.round_up(x.shape[a], 16))
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped(lhs, rhs, group_sizes, out_dtype, cfg, interpret):
    return _forward(lhs, rhs, group_sizes, out_dtype, cfg, interpret)


def _pad_rows(x, cfg):
    """``x [M, C]`` padded to whole row tiles and a multiple of 16 columns."""
    return _pad16(_common.pad_axis(x, 0, _common.round_up(max(x.shape[0], 1), cfg.block_m)), (1,))


def _forward(lhs, rhs, group_sizes, out_dtype, cfg, interpret):
    lhs_p = _pad_rows(lhs, cfg)
    meta = group_metadata(group_sizes, lhs_p.shape[0], cfg.block_m)
    out = _gmm(lhs_p, _pad16(rhs, (1, 2)), *meta, transpose_rhs=False, out_dtype=out_dtype, cfg=cfg,
               interpret=interpret)
    return out[:lhs.shape[0], :rhs.shape[2]]


def _vjp_fwd(lhs, rhs, group_sizes, out_dtype, cfg, interpret):
    return _forward(lhs, rhs, group_sizes, out_dtype, cfg, interpret), (lhs, rhs, group_sizes)


def _vjp_bwd(out_dtype, cfg, interpret, res, dout):
    lhs, rhs, group_sizes = res
    (m, k), n = lhs.shape, rhs.shape[2]
    lhs_p, dout_p = _pad_rows(lhs, cfg), _pad_rows(dout.astype(lhs.dtype), cfg)
    meta = group_metadata(group_sizes, lhs_p.shape[0], cfg.block_m)
    dlhs = _gmm(dout_p, _pad16(rhs, (1, 2)), *meta, transpose_rhs=True, out_dtype=lhs.dtype, cfg=cfg,
                interpret=interpret)[:m, :k]
    drhs = _tgmm(lhs_p, dout_p, meta[0], out_dtype=rhs.dtype, cfg=cfg, interpret=interpret)[:, :k, :n]
    return dlhs, drhs, None


_grouped.defvjp(_vjp_fwd, _vjp_bwd)


def _mxfp4_product(lhs, packed, group_sizes, out_dtype, cfg, interpret, transpose: bool):
    """``lhs [M, K] @ W[g]`` (``transpose``: ``lhs [M, N] @ W[g]^T``) of the MXFP4 ``W`` in ``packed``."""
    k = mxfp4.contraction_size(packed.shape[1])
    n = packed.shape[2]
    lhs_p = _pad_rows(lhs, cfg)
    meta = group_metadata(group_sizes, lhs_p.shape[0], cfg.block_m)
    out = _gmm(lhs_p, _pad16(packed, (2,)), *meta, transpose_rhs=transpose, out_dtype=out_dtype, cfg=cfg,
               interpret=interpret, mxfp4_k=k)
    return out[:lhs.shape[0], :(k if transpose else n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_mxfp4(lhs, packed, group_sizes, out_dtype, cfg, interpret):
    return _mxfp4_product(lhs, packed, group_sizes, out_dtype, cfg, interpret, False)


def _mxfp4_fwd(lhs, packed, group_sizes, out_dtype, cfg, interpret):
    out = _mxfp4_product(lhs, packed, group_sizes, out_dtype, cfg, interpret, False)
    return out, (packed, group_sizes, jnp.zeros((0,), lhs.dtype))  # (an empty array: lhs' dtype)


def _mxfp4_bwd(out_dtype, cfg, interpret, res, dout):
    packed, group_sizes, like = res  # (the quantized weights are constants: no gradient)
    dlhs = _mxfp4_product(dout.astype(like.dtype), packed, group_sizes, like.dtype, cfg, interpret, True)
    return dlhs, None, None


_grouped_mxfp4.defvjp(_mxfp4_fwd, _mxfp4_bwd)


def grouped_matmul_kernel(lhs: jax.Array, rhs: jax.Array | mxfp4.MXFP4, group_sizes: jax.Array, *, out_dtype=None,
                          config: GroupedMatmulConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """``[M, N]``: rows of ``lhs [M, K]`` grouped in order by ``group_sizes [G]``, each times its group's
    ``rhs [G, K, N]`` (fp32 accumulation, ``out_dtype`` default ``lhs.dtype``); differentiable in ``lhs``
    and ``rhs``, or in ``lhs`` alone for an :class:`~jaxattn.ops.mxfp4.MXFP4` ``rhs`` (dequantized tile by
    tile in the kernel, in ``lhs``' dtype). Shapes and dtypes are checked by :func:`jaxattn.grouped_matmul`."""
    cfg = config or grouped_matmul_config(lhs.dtype)
    if isinstance(rhs, mxfp4.MXFP4):
        return _grouped_mxfp4(lhs, rhs.packed, group_sizes, jnp.dtype(out_dtype or lhs.dtype), cfg, interpret)
    return _grouped(lhs, rhs, group_sizes, jnp.dtype(out_dtype or lhs.dtype), cfg, interpret)
