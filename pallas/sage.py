"""SageAttention2 (sm90 recipe) on Pallas's Triton backend: INT8 ``Q K^T``, FP8 ``P V``.

Inference only. Layout ``[batch, seq, heads, head_dim]``; GQA through the index maps.

Prologue (quantisation), per call:

* K smoothing (optional, default on): ``K~ = K - mean_tokens(K)`` per (batch, kv head,
  channel), in fp32. Exact for softmax (a per-row constant shift of the logits).
* Q smoothing (optional, paper-only in SageAttention2): ``Q~ = Q - q_bar`` with ``q_bar``
  the mean of each query block's (real) rows; the dropped term ``q_bar . K~^T`` is a
  ``[q blocks, keys]`` fp32 correction computed by one small XLA GEMM and added to the
  scores in the kernel.
* INT8 quantisation of Q~ and K~ (one XLA reduction for the amax, one Pallas program per
  scale group for the values): ``a = max(max|x_g|, 1e-7)``, scale ``s = a / 127``,
  ``y = x * (127 / a)`` and ``x_int8 = trunc(y + 0.5 sign(y))`` (round half away from zero).
  K: one scale per key block of the attention kernel.
  Q: one scale per query block (``"block"``) or per ``warp_rows`` rows inside it
  (``"warp"``: the rows one warp owns in the MMA layout, 16 on sm90). Padded rows are
  zeroed before the amax. ``sm_scale * log2(e)`` is folded into the Q scale afterwards.
* V to ``float8_e4m3fn`` per channel: ``s_v[c] = max_t |V[t, c]| / 448``,
  ``V_fp8 = e4m3(V * (448 / max_t |V[t, c]|))`` (an all-zero channel gets scale 1), stored
  transposed ``[batch, kv heads, dv, kv_len]`` so the P.V operand is K-major (what the
  Hopper FP8 WGMMA wants). One XLA reduction + one fused convert/transpose.

Attention kernel (one program per query block, batch, head): for each key block,
``S = int32(Q8 K8^T) * (s_q s_k)`` (+ correction) is in base-2 units; online softmax in
fp32 with the SageAttention2 offset ``m = max(m, rowmax(S) - 8.807)`` so that
``P = exp2(S - m)`` lies in ``(0, 448]`` and is cast to e4m3 with the static scale 448 (no
per-block scale, the 448 cancels with the fp32 row sum ``l`` of the unrounded P).
``P8 V8`` is one FP8 dot per key block into a fresh fp32 tile, multiplied by ``s_v`` and
added into the fp32 accumulator after its ``exp2(m_old - m_new)`` rescale (two-level
accumulation: the scale multiply also keeps Triton from folding the add into the MMA
accumulator). Causal block skipping, bottom-right causal alignment and masked tails
reuse the flash kernel's helpers. On sm90 both dots run on WGMMA (``s8`` and ``e4m3``): the FP8
one only because :mod:`jaxattn.pallas._fp8` lets Triton accumulate it imprecisely inside one
block, as Triton's own front end does on Hopper (``python -m jaxattn.bench compile --families
sage`` lists the MMA instructions per kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common, _fp8, flash_mgpu
from jaxattn.pallas import flash as _flash
from jaxattn.pallas._common import dot, exact_float

LOG2E = math.log2(math.e)
NEG_INF = float("-inf")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# exp2(8.807) ~= 447.9: P = exp2(S - rowmax + offset) fills the e4m3 range (0, 448].
P_OFFSET = 8.807
AMAX_EPS = 1e-7  # floor on an int8 group's amax (an all-zero group must not give NaN)
FP8_DTYPE = jnp.float8_e4m3fn
GRANULARITIES = ("block", "warp")
FP8_WGMMA = _fp8.enable()  # P.V on Hopper FP8 tensor cores (see jaxattn.pallas._fp8)
MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class SageConfig:
    """Tiles and launch parameters for one padded head dim (64 or 128)."""

    block_q: int = 128  # query rows per program = Q "block" quantisation group
    block_k: int = 128  # keys per inner step = K quantisation group
    warp_rows: int = 16  # Q rows per scale with qk_granularity="warp" (block_q / num_warps)
    num_warps: int = 8
    num_stages: int = 3
    quant_num_warps: int = 4


# padded head dim -> config. Targets an H100. d = 64: K blocks of 64 keys as SageAttention's own
# per-block quantiser (BLKQ=128, BLKK=64). d = 128: 128-key blocks (and K scale groups). Besides
# the dots, each key block rescales the [block_q, 128] fp32 accumulator and adds its FP8 partial
# (two-level accumulation), about 4 ops per score element at 64 keys, 2 at 128, on a kernel whose
# FP8 / INT8 dots run at twice bf16's rate, so the elementwise work is what bounds it. Spill-free
# for sm_90a (255 registers) once the compile report runs Triton's TTIR passes as XLA does;
# before that it showed spills and the table kept 64. The first H200 run (2026-12-04) timed the
# 64-key entry (`bench sage` still times it as jaxattn-prev-config).
CONFIGS: dict[int, SageConfig] = {
    64: SageConfig(128, 64, 16, 8, 3),
    128: SageConfig(128, 128, 16, 8, 3),
}


def padded_head_dim(d: int) -> int:
    """SageAttention pads head dims up to 64 or 128."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"sage attention supports head dims 1..{MAX_HEAD_DIM}, got {d}")
    return 64 if d <= 64 else 128


def sage_config(head_dim: int) -> SageConfig:
    """The table entry for ``head_dim`` (padded to 64 or 128)."""
    return CONFIGS[padded_head_dim(head_dim)]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sizes resolved for one call (tiles shrink for short sequences)."""

    block_q: int
    block_k: int
    q_group: int  # Q rows per scale: block_q ("block") or warp_rows ("warp")
    q_pad: int
    kv_pad: int


def resolve_blocks(q_len: int, kv_len: int, cfg: SageConfig, granularity: str) -> Blocks:
    # Triton's int8/fp8 dots want every dimension >= 32 (K of one MMA step).
    bq = min(cfg.block_q, max(32, _common.next_pow2(q_len)))
    bk = min(cfg.block_k, max(32, _common.next_pow2(kv_len)))
    group = bq if granularity == "block" else min(cfg.warp_rows, bq)
    return Blocks(bq, bk, group, _common.round_up(q_len, bq), _common.round_up(kv_len, bk))


# ----------------------------------------------------------------------------
# Prologue: INT8 quantisation kernel (Q and K), FP8 V, means and the Q-smoothing term.
# ----------------------------------------------------------------------------


def _round_half_away_int(y: jax.Array) -> jax.Array:
    """``trunc(y + 0.5 sign(y))`` as int32 for ``|y| <= 127``, written without adding to ``y``: a
    compiler may fuse ``x * inv + 0.5`` into one FMA (Triton does on sm90), which rounds once
    instead of twice and moves some exact ties. Compares against the integer part instead."""
    t = y.astype(jnp.int32)  # truncates toward zero
    up = jnp.abs(y) >= jnp.abs(t).astype(jnp.float32) + 0.5
    return t + jnp.where(up, jnp.where(y >= 0, 1, -1), 0)


def _quant_int8_kernel(*refs, has_mean: bool, length: int, ragged: bool, width: int):
    if has_mean:
        x_ref, mean_ref, inv_ref, o_ref = refs
    else:
        (x_ref, inv_ref, o_ref), mean_ref = refs, None
    group = o_ref.shape[0]
    # x is not padded: its rows past ``length`` and columns past ``width`` load as 0 (their
    # quantised values are 0: padded rows have inverse scale 0, padded channels mean 0)
    x = _common.load_tile(x_ref, (slice(None), slice(None)), pl.program_id(0) * group, length, ragged,
                          width).astype(jnp.float32)
    if has_mean:
        x = x - mean_ref[...][None, :]
    # padded rows: their inverse scale is 0 (and they were left out of the amax)
    y = x * inv_ref[...][:, None]  # multiply by the reciprocal, as SageAttention's CUDA quantiser
    o_ref[...] = _round_half_away_int(y).astype(jnp.int8)


def _group_amax(x: jax.Array, group: int, rows: int, mean: jax.Array | None, mean_rows: int) -> jax.Array:
    """``max(max |x~_g|, 1e-7)`` per group of rows: ``[B, H, rows / group]`` fp32 (one fused XLA
    reduction over ``x~ = x - mean``, the rows past x's zeroed)."""
    batch, length, heads, d = x.shape
    xf = _common.pad_axis(x.astype(jnp.float32), 1, rows)
    if mean is not None:
        xf = xf - jnp.repeat(mean.astype(jnp.float32), mean_rows, axis=1)[:, :rows]
    xf = jnp.where((jnp.arange(rows) < length)[None, :, None, None], xf, 0.0)
    amax = jnp.max(jnp.abs(xf.reshape(batch, rows // group, group, heads, d)), axis=(2, 4))
    return jnp.transpose(jnp.maximum(amax, AMAX_EPS), (0, 2, 1))


def quantize_int8_rows(
    x: jax.Array,
    *,
    group: int,
    rows: int | None = None,
    width: int | None = None,
    mean: jax.Array | None = None,
    mean_rows: int | None = None,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """INT8 quantisation of ``x [B, S, H, d]`` in groups of ``group`` rows, into ``rows`` rows
    (default S; a multiple of ``group``) and ``width`` channels (default d): the rows and
    channels past x's are zeros (x itself is read unpadded).

    ``mean [B, n, H, d]`` (fp32) is subtracted first, row r using ``mean[:, r // mean_rows]``.
    Returns ``int8 [B, rows, H, width]`` and the fp32 scale of every row ``[B, H, rows]``
    (constant over each group; ``[..., ::group]`` is per group). The group amax and its
    reciprocal ``127 / a`` come from XLA (IEEE division: Triton's fp32 ``/`` is ``div.full``,
    within 2 ulp), the scaling and rounding from a Pallas kernel.
    """
    batch, length, heads, d = x.shape
    rows, width = rows or length, width or d
    if rows % group or rows < length:
        raise ValueError(f"rows={rows} must be a multiple of the group size {group} and >= seq={length}")
    if width < d:
        raise ValueError(f"width={width} must be >= the head dim {d}")
    mrows = mean_rows or rows
    amax = _group_amax(x, group, rows, mean, mrows)  # [B, H, G]
    inv = jnp.where((jnp.arange(rows) < length)[None, None, :],
                    jnp.repeat(INT8_MAX / amax, group, axis=2), 0.0)
    in_specs = [pl.BlockSpec((None, group, None, width), lambda i, b, h: (b, i, h, 0))]
    args = [x]
    if mean is not None:
        in_specs.append(pl.BlockSpec((None, None, None, width), lambda i, b, h: (b, (i * group) // mrows, h, 0)))
        args.append(_common.pad_axis(mean.astype(jnp.float32), 3, width))
    in_specs.append(pl.BlockSpec((None, None, group), lambda i, b, h: (b, h, i)))
    args.append(inv)
    (x8,) = _common.pallas_call(
        functools.partial(_quant_int8_kernel, has_mean=mean is not None, length=length, ragged=rows != length,
                          width=d),
        out_shape=[jax.ShapeDtypeStruct((batch, rows, heads, width), jnp.int8)],
        grid=(rows // group, batch, heads), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, group, None, width), lambda i, b, h: (b, i, h, 0))],
        num_warps=num_warps, num_stages=1, interpret=interpret, name="jaxattn_sage_quant_int8")(*args)
    return x8, jnp.repeat(amax / INT8_MAX, group, axis=2)


def quantize_v_fp8(v: jax.Array, kv_pad: int, width: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-channel e4m3 quantisation of ``v [B, Sk, Hkv, dv]`` (XLA: one reduction and one
    fused pad/scale/convert/transpose). Returns ``v_fp8 [B, Hkv, width, kv_pad]`` (``width``
    default dv; padded keys and channels 0) and ``v_scale [B, Hkv, width]`` fp32 (1 for a padded or
    all-zero channel)."""
    vf = _common.pad_axis(_common.pad_axis(v.astype(jnp.float32), 1, kv_pad), 3, width or v.shape[-1])
    amax = jnp.max(jnp.abs(vf), axis=1)  # [B, Hkv, width]
    nz = amax > 0
    inv = jnp.where(nz, FP8_MAX / jnp.where(nz, amax, 1.0), 1.0)
    scale = jnp.where(nz, amax / FP8_MAX, 1.0)
    return jnp.transpose((vf * inv[:, None]).astype(FP8_DTYPE), (0, 2, 3, 1)), scale


def token_mean(x: jax.Array) -> jax.Array:
    """Per-channel mean over tokens in fp32: ``[B, S, H, d] -> [B, 1, H, d]``."""
    return jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True)


def block_means(x: jax.Array, block: int) -> jax.Array:
    """Mean of the real rows of each ``block``-row block, fp32: ``[B, S, H, d] ->
    [B, ceil(S / block), H, d]``."""
    batch, s, heads, d = x.shape
    n = -(-s // block)
    xs = _common.pad_axis(x.astype(jnp.float32), 1, n * block).reshape(batch, n, block, heads, d)
    counts = jnp.minimum(block, s - block * jnp.arange(n)).astype(jnp.float32)
    return jnp.sum(xs, axis=2) / counts[None, :, None, None]


def smoothing_correction(q_mean: jax.Array, k_smooth: jax.Array, factor: float, kv_pad: int) -> jax.Array:
    """``factor * q_bar . K~^T`` for every (query block, key): ``q_mean [B, nqb, Hq, d]``,
    ``k_smooth [B, Sk, Hkv, d]`` fp32 -> ``[B, Hq, nqb, kv_pad]`` fp32 (padded keys 0)."""
    batch, nqb, hq, d = q_mean.shape
    hkv = k_smooth.shape[2]
    qm = q_mean.reshape(batch, nqb, hkv, hq // hkv, d)
    corr = jnp.einsum("bnhgd,bkhd->bhgnk", qm, k_smooth, precision=lax.Precision.HIGHEST)
    corr = corr.reshape(batch, hq, nqb, -1) * factor
    return _common.pad_axis(corr, 3, kv_pad)


class Quantized(NamedTuple):
    """Everything the attention kernel reads, plus the prologue's intermediates."""

    q8: jax.Array  # int8 [B, q_pad, Hq, dp]
    q_scale: jax.Array  # fp32 [B, Hq, q_pad / q_group] (without sm_scale * log2e)
    k8: jax.Array  # int8 [B, kv_pad, Hkv, dp]
    k_scale: jax.Array  # fp32 [B, Hkv, kv_pad / block_k]
    v8: jax.Array  # e4m3 [B, Hkv, dvp, kv_pad]
    v_scale: jax.Array  # fp32 [B, Hkv, dvp]
    k_mean: jax.Array | None  # fp32 [B, 1, Hkv, d] (smooth_k)
    q_mean: jax.Array | None  # fp32 [B, q_pad / block_q, Hq, d] (smooth_q)
    correction: jax.Array | None  # fp32 [B, Hq, q_pad / block_q, kv_pad], base-2 units (smooth_q)


def quantize(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    blocks: Blocks,
    scale: float,
    smooth_q: bool,
    smooth_k: bool,
    width: int | None = None,
    value_width: int | None = None,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> Quantized:
    """The quantisation prologue on ``q, k, v`` as they are (true lengths and head dims): the
    quantised arrays come out padded to the blocks' lengths and to ``width`` (q, k) and
    ``value_width`` (v) channels (defaults: the head dims), the padding zeros."""
    width, value_width = width or q.shape[-1], value_width or v.shape[-1]
    k_mean = token_mean(k) if smooth_k else None
    q_mean = block_means(q, blocks.block_q) if smooth_q else None
    q8, q_rows = quantize_int8_rows(q, group=blocks.q_group, rows=blocks.q_pad, width=width, mean=q_mean,
                                    mean_rows=blocks.block_q, num_warps=num_warps, interpret=interpret)
    k8, k_rows = quantize_int8_rows(k, group=blocks.block_k, rows=blocks.kv_pad, width=width, mean=k_mean,
                                    num_warps=num_warps, interpret=interpret)
    v8, v_scale = quantize_v_fp8(v, blocks.kv_pad, value_width)
    correction = None
    if smooth_q:
        k_s = k.astype(jnp.float32) - (k_mean if smooth_k else 0.0)
        correction = smoothing_correction(q_mean, k_s, scale * LOG2E, blocks.kv_pad)
    return Quantized(q8, q_rows[..., ::blocks.q_group], k8, k_rows[..., ::blocks.block_k], v8, v_scale,
                     k_mean, q_mean, correction)


# ----------------------------------------------------------------------------
# Attention kernel.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Trace-time constants. ``causal, q_len, kv_len, q_pad, kv_pad, sparse`` are the fields
    the flash kernel's ``_block_mask`` / ``_kv_range`` / ``_q_block`` helpers read."""

    causal: bool
    q_len: int
    kv_len: int
    q_pad: int
    kv_pad: int
    groups: int  # q heads per kv head
    block_q: int
    block_k: int
    has_corr: bool
    cfg: SageConfig
    interpret: bool | None
    value_dim: int  # v's head dim: the output is [B, q_len, Hq, value_dim], stored unpadded
    positive_scale: bool = True  # sm_scale > 0: the row scales are positive (see _attn_kernel)
    sparse: None = None  # flash's block-sparse layout: never used here
    has_seg: bool = False  # segment ids (packed sequences): the kernel reads q / kv ids and block ranges
    sinks: bool = False  # attention sinks: each row's online softmax starts from its head's sink


def _attn_kernel(*refs, st: _Static):
    q_ref, qs_ref, k_ref, ks_ref, v_ref, vs_ref, *rest, o_ref = refs
    corr_ref = rest.pop(0) if st.has_corr else None
    qseg_ref, kseg_ref, range_ref = (rest.pop(0), rest.pop(0), rest.pop(0)) if st.has_seg else (None, None, None)
    sink_ref = rest.pop(0) if st.sinks else None
    bq, bk = st.block_q, st.block_k
    q_start = _flash._q_block(st, pl.program_id(0), bq) * bq
    q_pos = q_start + jnp.arange(bq)
    q = q_ref[...]  # int8 [bq, d]
    qs = qs_ref[...]  # fp32 [bq]: per-row Q scale * sm_scale * log2(e)
    vs = vs_ref[...]  # fp32 [dv]
    qseg = qseg_ref[...] if st.has_seg else None

    interpret = _common.resolve_interpret(st.interpret)
    fma = functools.partial(_common.fma, interpret=interpret)
    # Without the smoothing correction and with sm_scale > 0, the logits are the integer scores
    # times a positive row scale r: the row max is taken on the scores and scaled (exactly the max
    # of the scaled scores: rounding is monotonic), and each exponent is one FMA.
    raw = not st.has_corr and st.positive_scale

    def body(j, carry, masked: bool):
        acc, m, l = carry
        k_start = pl.multiple_of(j * bk, bk)
        ks = pl.ds(k_start, bk)
        s = exact_float(dot(q, k_ref[ks, :], trans_b=True))  # int32 scores, exact, as fp32
        r = qs * ks_ref[j]  # [bq] the row scales of this key block
        if not raw:
            s = fma(s, r[:, None], corr_ref[ks][None, :]) if st.has_corr else s * r[:, None]
        if masked:
            mask = _flash._block_mask(st, q_pos, k_start + jnp.arange(bk), causal=st.causal,
                                      length=st.kv_len % bk != 0)
            if mask is not None:
                s = jnp.where(mask, s, NEG_INF)
        if qseg is not None:  # (every visited block: a segment may start anywhere in it)
            s = jnp.where(qseg[:, None] == kseg_ref[ks][None, :], s, NEG_INF)
        row_max = jnp.max(s, axis=1)
        m_new = jnp.maximum(m, (row_max * r if raw else row_max) - P_OFFSET)
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(fma(s, r[:, None], -m_safe[:, None]) if raw else s - m_safe[:, None])  # (0, 448]
        l = l * alpha + jnp.sum(p, axis=1)
        pv = dot(p.astype(FP8_DTYPE), v_ref[:, ks], trans_b=True)  # fp8 x fp8 -> fp32, this block only
        acc = fma(pv, vs[None, :], acc * alpha[:, None])
        return acc, m_new, l

    acc = jnp.zeros((bq, v_ref.shape[0]), jnp.float32)
    m = jnp.full((bq,), NEG_INF, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    if st.sinks:  # the sink's P under the offset running max m = sink2 - P_OFFSET is 2^P_OFFSET
        m = jnp.full((bq,), sink_ref[pl.program_id(2)] * LOG2E - P_OFFSET, jnp.float32)
        l = jnp.full((bq,), 2.0 ** P_OFFSET, jnp.float32)
    # Unmasked key blocks first, then the causal diagonal / padded tail; blocks above the
    # diagonal are skipped.
    n_full, hi = _flash._kv_range(st, q_start, bq, bk)
    lo = 0
    if range_ref is not None:  # only the key blocks whose segments can meet this query block's
        lo, _, n_full, hi = _flash._clip_range(range_ref, lax.div(q_start, bq), 0, 0, n_full, hi)
    carry = lax.fori_loop(lo, n_full, functools.partial(body, masked=False), (acc, m, l))
    acc, m, l = lax.fori_loop(n_full, hi, functools.partial(body, masked=True), carry)
    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    _common.store_tile(o_ref, (slice(None), slice(None)), out, q_start, st.q_len, st.q_len != st.q_pad, st.value_dim)


def _attn_call(st: _Static, qz: Quantized, q_row_scale: jax.Array, out_dtype, qseg=None, kseg=None,
               sinks=None) -> jax.Array:
    batch, _, hq, d = qz.q8.shape
    dv = qz.v8.shape[2]
    bq, g = st.block_q, st.groups
    nkb = st.kv_pad // st.block_k
    qb = functools.partial(_flash._q_block, st, block_q=bq)
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, qb(i), h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qb(i))),
        pl.BlockSpec((None, st.kv_pad, None, d), lambda i, b, h: (b, 0, h // g, 0)),
        pl.BlockSpec((None, None, nkb), lambda i, b, h: (b, h // g, 0)),
        pl.BlockSpec((None, None, dv, st.kv_pad), lambda i, b, h: (b, h // g, 0, 0)),
        pl.BlockSpec((None, None, dv), lambda i, b, h: (b, h // g, 0)),
    ]
    args = [qz.q8, q_row_scale, qz.k8, qz.k_scale, qz.v8, qz.v_scale]
    if st.has_corr:
        in_specs.append(pl.BlockSpec((None, None, None, st.kv_pad), lambda i, b, h: (b, h, qb(i), 0)))
        args.append(qz.correction)
    if st.has_seg:  # ids of the query block, of every key, and each query block's key-block range
        ranges = _flash.segment_block_ranges(qseg, kseg, st.q_len, st.kv_len, bq, st.block_k)
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, qb(i))),
                     pl.BlockSpec((None, st.kv_pad), lambda i, b, h: (b, 0)),
                     pl.BlockSpec((None, *ranges.shape[1:]), lambda i, b, h: (b, 0, 0))]
        args += [qseg, kseg, ranges]
    if st.sinks:  # fp32 [Hq], read as scalars
        in_specs.append(_common.whole_block(sinks.shape))
        args.append(sinks)
    call = _common.pallas_call(
        functools.partial(_attn_kernel, st=st),
        out_shape=[jax.ShapeDtypeStruct((batch, st.q_len, hq, st.value_dim), out_dtype)],  # (unpadded)
        grid=(st.q_pad // bq, batch, hq), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, b, h: (b, qb(i), h, 0))],
        num_warps=st.cfg.num_warps, num_stages=st.cfg.num_stages,
        interpret=st.interpret, name="jaxattn_sage_fwd")
    return call(*args)[0]


class _Options(NamedTuple):
    causal: bool
    scale: float
    granularity: str
    smooth_q: bool
    smooth_k: bool
    cfg: SageConfig
    interpret: bool | None
    backend: str = "triton"


def mosaic_blocks(q_len: int, kv_len: int, granularity: str, head_dim: int = 128) -> Blocks:
    """Quantisation groups of the Mosaic GPU kernel for a padded ``head_dim``: query blocks of a
    program's rows (128), Q groups of those or of 16 rows, K groups of one key block (128)."""
    mcfg = flash_mgpu.mosaic_config(head_dim)
    bq, bk = 2 * mcfg.block_q, mcfg.block_kv
    group = bq if granularity == "block" else 16
    return Blocks(bq, bk, group, _common.round_up(q_len, bq), _common.round_up(kv_len, bk))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sage(opts: _Options, q, k, v, qseg=None, kseg=None, sinks=None):
    q_len, kv_len, hq, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    dv = v.shape[-1]
    mosaic = opts.backend == "mosaic"
    dp, dvp = padded_head_dim(d), padded_head_dim(dv)
    if mosaic:  # one padded head dim for q, k and v (the kernel's tiles share it)
        dp = dvp = max(dp, dvp)
        blocks = mosaic_blocks(q_len, kv_len, opts.granularity, dp)
    else:
        blocks = resolve_blocks(q_len, kv_len, opts.cfg, opts.granularity)
    qz = quantize(q, k, v, blocks=blocks, scale=opts.scale, smooth_q=opts.smooth_q, smooth_k=opts.smooth_k,
                  width=dp, value_width=dvp, num_warps=opts.cfg.quant_num_warps, interpret=opts.interpret)
    q_rows = jnp.repeat(qz.q_scale, blocks.q_group, axis=-1) * (opts.scale * LOG2E)
    if mosaic:
        x = flash_mgpu.SageInputs(qz.q8, q_rows, qz.k8, qz.k_scale, qz.v8, qz.v_scale, qz.correction)
        out = flash_mgpu.sage_forward(x, causal=opts.causal, q_len=q_len, kv_len=kv_len, out_dtype=q.dtype,
                                      interpret=_common.resolve_interpret(opts.interpret))
        return out[:, :q_len, :, :dv]
    st = _Static(causal=opts.causal, q_len=q_len, kv_len=kv_len, q_pad=blocks.q_pad,
                 kv_pad=blocks.kv_pad, groups=hq // k.shape[2], block_q=blocks.block_q,
                 block_k=blocks.block_k, has_corr=opts.smooth_q, cfg=opts.cfg, interpret=opts.interpret,
                 value_dim=dv, positive_scale=opts.scale > 0, has_seg=qseg is not None, sinks=sinks is not None)
    if qseg is not None:
        qseg, kseg = _flash.pad_segment_ids(qseg, kseg, blocks.q_pad, blocks.kv_pad)
    if sinks is not None:
        sinks = jnp.asarray(sinks, jnp.float32).reshape(hq)
    return _attn_call(st, qz, q_rows, q.dtype, qseg, kseg, sinks)


@_sage.defjvp
def _sage_jvp(opts, primals, tangents):
    del opts, primals, tangents
    raise NotImplementedError(
        "sage_attention is inference-only: its INT8/FP8 kernel has no gradient. Differentiate "
        "jaxattn.attention instead (or wrap the inputs in jax.lax.stop_gradient).")


def sage_attention_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    qk_granularity: str = "block",
    smooth_q: bool = False,
    smooth_k: bool = True,
    config: SageConfig | None = None,
    interpret: bool | None = None,
    backend: str = "triton",
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Quantised attention on already-validated inputs (forward only).

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` (D, Dv <= 128, Hkv
    divides Hq), one floating dtype. Returns ``[B, Sq, Hq, Dv]`` in q's dtype; a query row
    with no visible key (causal with Sq > Sk) is zero. Differentiating raises. ``backend="mosaic"``
    runs the attention on the Mosaic GPU kernel (:func:`jaxattn.pallas.flash_mgpu.sage_forward`:
    Hopper, 128-key K groups; ``smooth_q`` per 128-row program tile) after the same prologue.
    ``q_segment_ids`` / ``kv_segment_ids`` (int ``[B, Sq]`` / ``[B, Sk]``, Triton backend): packed
    sequences, keys only within the query's segment; the quantisation groups are the unpacked call's
    (a K block's scale may span two sequences; smoothing K by the mean of all keys stays exact).
    ``sinks`` fp32 ``[Hq]`` (Triton backend): attention sinks, a value-less logit per head in every row's
    softmax: the online softmax starts at ``m = sink - P_OFFSET`` with the sink's ``P = 2^P_OFFSET`` in ``l``.
    """
    if qk_granularity not in GRANULARITIES:
        raise ValueError(f"qk_granularity must be one of {GRANULARITIES}, got {qk_granularity!r}")
    if backend not in ("triton", "mosaic"):
        raise ValueError(f"backend must be 'triton' or 'mosaic', got {backend!r}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together")
    if backend == "mosaic":
        if not flash_mgpu.available():
            raise ValueError("impl='mosaic' needs jax's Pallas Mosaic GPU backend (jax >= 0.10)")
        if q_segment_ids is not None or sinks is not None:
            raise ValueError("impl='mosaic' runs Sage without segment_ids or sinks; use impl='pallas'")
    cfg = config or sage_config(max(q.shape[-1], v.shape[-1]))
    scale = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    opts = _Options(bool(causal), scale, qk_granularity, bool(smooth_q), bool(smooth_k), cfg, interpret, backend)
    return _sage(opts, q, k, v, q_segment_ids, kv_segment_ids, sinks)


def fp8_supported() -> bool:
    """True on a GPU whose Triton FP8 (e4m3) dots exist: compute capability >= 8.9."""
    if jax.default_backend() != "gpu":
        return _common.targets_gpu()  # compiling for a compile-only H100 (sm_90a)
    try:
        cc = getattr(jax.devices()[0], "compute_capability", "0")
        major, minor = (int(x) for x in str(cc).split(".")[:2])
        return (major, minor) >= (8, 9)
    except Exception:  # noqa: BLE001 - unknown device: let the caller fall back
        return False


__all__ = [
    "CONFIGS", "FP8_MAX", "P_OFFSET", "Quantized", "SageConfig", "fp8_supported", "quantize",
    "quantize_int8_rows", "quantize_v_fp8", "resolve_blocks", "sage_attention_kernel", "sage_config",
]

