"""FlashAttention-2 on Pallas's Triton backend: forward, dq and dk/dv kernels.

Layout ``[batch, seq, heads, head_dim]``. The forward keeps an online softmax in
fp32 (base-2 exponentials), skips key blocks above a causal diagonal, and
returns the natural-log log-sum-exp. The backward follows FlashAttention-2:
``delta = rowsum(dO * O)`` (minus the lse cotangent) as a pre-pass, one kernel
for dq (a program per query block) and one for dk/dv (a program per key block,
looping over the query heads of its GQA group). ``jax.custom_vjp`` wires them.

Nothing is padded: the tiles are powers of two (head dims round up to one >= 16) and the
kernels load and store the ragged last tile of a sequence and the columns past a head dim
masked (keys past the sequence are masked out of the softmax). Rows whose every key is
masked produce zeros and ``lse = -inf``.

Optional: a local window ``(left, right)`` around each query's position (key blocks outside
it are skipped, in the forward and in both backward kernels), a logits soft cap
``c * tanh(x / c)`` (Gemma 2 style; its derivative enters ``ds``), and ALiBi slopes per head
(``slope * |p - j|`` subtracted in-kernel from positions, no bias tensor).

The same three kernels run block-sparse attention (``jaxattn.pallas.block_sparse``):
with ``_Static.sparse`` set, the key loop of the forward/dq kernels walks a per-query-block
list of key blocks (full blocks first, then partial ones that apply an element mask
``mask_fn(q_pos, k_pos)``), and the dk/dv kernel walks the transposed lists.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxattn.pallas import _common, _dropout, _score_mod, flash_mgpu
from jaxattn.pallas._common import dot

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tile sizes and launch parameters for one (head dim, dtype) pair."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # dq kernel: a program owns block_q_dq query rows and loops over block_k_dq keys.
    block_q_dq: int = 64
    block_k_dq: int = 64
    # dk/dv kernel: a program owns block_k_dkv key rows and loops over block_q_dkv queries.
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2


# The one tuning table: (padded head dim, bytes per element) -> config.
# Two-byte entries target an H100 (sm90) through Triton. Every entry compiles for sm_90a
# without register spills (causal or not, with a window and soft cap too) and within shared
# memory: `python -m jaxattn.bench compile --families flash` shows it.
# d=128's dk/dv kernel owns 128 keys (two warpgroups of 64 rows, as FlashAttention-2's d=128
# backward): spill-free once Triton's TTIR passes fold `acc + dot` into the MMA accumulator, as
# XLA's pipeline does (the compile report skipped them before 2026-12-04 and showed spills).
CONFIGS: dict[tuple[int, int], FlashConfig] = {
    (32, 2): FlashConfig(128, 64, 4, 3, 128, 64, 64, 128, 8, 2),
    (64, 2): FlashConfig(128, 64, 4, 3, 128, 64, 32, 128, 8, 2),
    (128, 2): FlashConfig(128, 64, 8, 3, 128, 64, 32, 128, 8, 2),
    (256, 2): FlashConfig(64, 32, 8, 2, 64, 32, 32, 32, 8, 2),
    # fp32 runs IEEE-exact FMA dots (no tensor cores): small tiles keep them in registers
    # (the halved bf16 tiles spilled 30-140 KB per thread at d >= 128), 8 warps at d >= 128
    # (4 spilled up to 1.3 KB in the causal forward).
    (32, 4): FlashConfig(64, 32, 4, 2, 64, 32, 32, 32, 8, 1),
    (64, 4): FlashConfig(64, 16, 4, 2, 32, 32, 32, 32, 8, 1),
    (128, 4): FlashConfig(32, 16, 8, 2, 32, 16, 16, 32, 8, 2),
    (256, 4): FlashConfig(16, 16, 8, 2, 16, 16, 16, 16, 8, 2),
}

SUPPORTED_HEAD_DIMS = (32, 256)  # inclusive range of head dims
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def flash_config(head_dim: int, dtype: Any) -> FlashConfig:
    """The table entry for ``head_dim`` (padded to a power of two) and ``dtype``."""
    return _common.table_entry(CONFIGS, head_dim, dtype, "flash", min_dim=32)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels need that is known at trace time."""

    scale: float
    causal: bool
    q_len: int  # true lengths
    kv_len: int
    q_pad: int  # padded lengths
    kv_pad: int
    groups: int  # q heads per kv head
    heads: int  # q heads (dropout's per-head mask)
    has_seg: bool
    bias_kind: str | None  # None, "add" or "bool"
    bias_bcast: tuple[bool, bool, bool, bool]  # which bias dims are broadcast (size 1)
    cfg: FlashConfig
    interpret: bool | None
    precision: Any
    sparse: SparseSpec | None = None  # block-sparse layout (then ``causal`` is False)
    # (left, right) local window around each query's position (None: unbounded side)
    window: tuple[int | None, int | None] = (None, None)
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap)
    alibi: bool = False  # per-head slopes: logits -= slope * |query position - key position|
    # (x, batch, head, q_idx, kv_idx) -> x', elementwise on the (capped) logits (FlexAttention's score_mod)
    score_mod: Callable | None = None
    mod_tables: int = 0  # arrays score_mod reads (``_score_mod.Table``), inputs after the sparse lists
    table_grads: tuple[bool, ...] = ()  # which of them the dq kernel writes a gradient for (atomically)
    bias_grad: bool = False  # the dq kernel also writes the logits' cotangent (an additive bias's)
    dropout: float = 0.0  # attention dropout rate (mask from ``_dropout``, regenerated in every kernel)
    dropout_shared: bool = False  # one mask for every (batch, head), as flax's broadcast_dropout
    # positions (q_offset, kv_offset) come as an int32 [2] input (``position_offset``): query row i sits at
    # key position ``i + q_offset - kv_offset`` (not ``i + kv_len - q_len``) and score_mod sees
    # ``q_offset + i``, ``kv_offset + j``
    offsets: bool = False
    # a learned logit per q head in every row's softmax, with no value (gpt-oss's attention sinks): the
    # forward starts each row's online softmax from it (m = sink, l = 1); dsink is the backward's XLA sum
    sinks: bool = False
    mosaic: Any = None  # a flash_mgpu.MosaicConfig: the forward runs on Mosaic GPU (Hopper)
    # q, k, v are slots 0, 1, 2 of one [B, S, 3, H, D] array (passed as q; k and v None): the
    # kernels read them in place and the backward writes one [B, S, 3, H, D] cotangent
    packed: bool = False
    # the arrays' head dims (q/k, v; set by run_padded): tiles are powers of two >= 16 as wide,
    # their columns past these are loaded as zeros and not stored (no padded copies)
    head_dim: int = 0
    value_dim: int = 0


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """Static half of a block-sparse layout. Its int32 arrays travel as kernel inputs, in
    CSR form: ``kv_index [n_qb, 3]`` holds, per query block, (start, n_full, n_visit) into
    ``kv_blocks [nnz]``, the key blocks to visit with the full ones first; ``q_index
    [n_kb, 3]`` / ``q_blocks [nnz']`` are the transpose (per key block, the query blocks
    that visit it) for the dk/dv kernel; ``q_offset [1]`` is the absolute position of
    query row 0. Kernel tiles divide the mask blocks ``block_q x block_k``."""

    mask_fn: Callable[[jax.Array, jax.Array], jax.Array]  # (q_pos [bq,1], k_pos [1,bk]) -> keep
    block_q: int
    block_k: int


# ----------------------------------------------------------------------------
# Shared pieces of the three kernels.
# ----------------------------------------------------------------------------


def _bounds(st: Any, causal: bool | None = None) -> tuple[int | None, int | None]:
    """:func:`window_bounds` of a kernel's static (``st.window`` when it has one: the sage kernel's
    does not)."""
    return window_bounds(getattr(st, "window", (None, None)), st.causal if causal is None else causal)


def window_bounds(window: tuple[int | None, int | None] | None, causal: bool) -> tuple[int | None, int | None]:
    """``(left, right)``: query at position p sees keys ``p - left .. p + right`` (None: that
    side unbounded); causal caps ``right`` at 0."""
    left, right = window or (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _block_mask(st: _Static, q_pos, k_pos, *, causal: bool, length: bool, transposed: bool = False, align=None):
    """Boolean [bq, bk] mask from positions (``[bk, bq]`` when ``transposed``), or None when
    nothing is masked. ``align``: the key position of query row 0 (default ``kv_len - q_len``)."""
    mask = None
    shape = (k_pos.shape[0], q_pos.shape[0]) if transposed else (q_pos.shape[0], k_pos.shape[0])
    q_pos, k_pos = (q_pos[None, :], k_pos[:, None]) if transposed else (q_pos[:, None], k_pos[None, :])

    def both(m, c):
        return c if m is None else jnp.logical_and(m, c)

    if length:
        mask = jnp.broadcast_to(k_pos < st.kv_len, shape)
    pos = q_pos + (st.kv_len - st.q_len if align is None else align)  # the query's position among the keys
    left, right = _bounds(st, causal)
    if right is not None:
        mask = both(mask, k_pos <= pos + right)
    if left is not None:
        mask = both(mask, k_pos >= pos - left)
    if st.sparse is not None:  # q_pos are absolute positions here; mask_fn is elementwise
        mask = both(mask, jnp.broadcast_to(st.sparse.mask_fn(q_pos, k_pos), shape))
    return mask


def _raw_logits(st: _Static) -> bool:
    """Whether the base-2 logits are ``q k^T`` times the positive constant :func:`_logit_scale` (no
    soft cap, ALiBi or additive bias): then the kernels scale them inside each weight's exponent,
    one FMA per score (the forward with the running max, ``online_softmax_step(scale=)``; the
    backward with the lse)."""
    return st.softcap is None and not st.alibi and st.bias_kind != "add" and st.scale > 0 and st.score_mod is None


def _logit_scale(st: _Static) -> float:
    return st.scale * LOG2E


def _scores(st: _Static, q, k, qseg, kseg, bias, pos_mask, transposed: bool = False, alibi=None,
            raw: bool = False, mod=None):
    """Base-2 logits ``log2(e) * (softcap(scale * q k^T) + bias)`` with masked entries at -inf,
    and the soft cap's ``tanh`` term (None without one) for the backward. ``transposed`` gives
    the ``[bk, bq]`` logits ``k q^T`` (``bias`` still comes as a ``[bq, bk]`` tile, ``pos_mask``
    as ``[bk, bq]``). ``alibi = (slope, p, k_pos)`` subtracts ``slope * |p - k_pos|``, ``p`` the
    queries' positions among the keys (:func:`_aligned`). ``raw`` (:func:`_raw_logits` holds): ``q k^T``
    masked, not yet multiplied by :func:`_logit_scale`. ``mod = (batch, head, q_pos, k_pos, table refs,
    grads)`` applies ``st.score_mod`` to the (capped) logits; ``t`` is then ``(tanh term, d score_mod /
    d x, partials for the tables' gradients)`` (:func:`_score_mod.apply`)."""
    qk = dot(k, q, trans_b=True, precision=st.precision) if transposed else dot(
        q, k, trans_b=True, precision=st.precision)
    s, t = (qk, None) if raw else base2_logits(qk, st.scale, st.softcap)
    if mod is not None:
        b, h, q_pos, k_pos, tables, grads = mod
        qi, ki = (q_pos[None, :], k_pos[:, None]) if transposed else (q_pos[:, None], k_pos[None, :])
        s, dmod, partials = score_mod_logits(st.score_mod, s, b, h, qi, ki, derivative=True, tables=tables,
                                             grads=grads)
        t = (t, dmod, partials)
    if alibi is not None:
        slope, p, k_pos = alibi
        dist = jnp.abs(k_pos[:, None] - p[None, :]) if transposed else jnp.abs(p[:, None] - k_pos[None, :])
        s = s - dist.astype(jnp.float32) * (slope * LOG2E)
    mask = pos_mask
    if bias is not None and transposed:
        bias = bias.T
    if st.bias_kind == "add":
        s = s + bias.astype(jnp.float32) * LOG2E
    elif st.bias_kind == "bool":
        keep = jnp.broadcast_to(bias != 0, s.shape)
        mask = keep if mask is None else jnp.logical_and(mask, keep)
    if qseg is not None:
        same = kseg[:, None] == qseg[None, :] if transposed else qseg[:, None] == kseg[None, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
        if mod is not None:  # (masked entries' derivative never meets a NaN or inf there)
            t = (t[0], jnp.where(mask, t[1], 0.0), t[2])
    return s, t


def score_mod_logits(score_mod: Callable, s, batch, head, q_idx, kv_idx, derivative: bool = False,
                     tables: tuple = (), grads: tuple[bool, ...] = ()):
    """Base-2 logits ``s`` through ``score_mod`` (which sees natural-unit logits and reads the table
    refs ``tables``), and (``derivative``) its elementwise derivative for the backward's chain rule (a
    ``jax.jvp`` traced into the kernel) and the partials of the tables flagged in ``grads`` (see
    :func:`_score_mod.apply`), else None twice. The index arguments broadcast against ``s``."""
    y, dy, partials = _score_mod.apply(score_mod, s * LN2, (batch, head, q_idx, kv_idx), tables,
                                       derivative=derivative, grads=grads)
    return jnp.broadcast_to(y, s.shape).astype(jnp.float32) * LOG2E, dy, partials


def base2_logits(qk, scale: float, softcap: float | None):
    """``log2(e) * softcap(scale * qk)`` and the soft cap's ``tanh`` term (None without one)."""
    if softcap is None:
        return qk * (scale * LOG2E), None
    t = jnp.tanh(qk * (scale / softcap))
    return t * (softcap * LOG2E), t


def online_softmax_step(carry, s, v, precision, exp: Callable[[jax.Array], jax.Array] = jnp.exp2,
                        drop: Callable[[jax.Array], jax.Array] | None = None, scale: float | None = None,
                        interpret: bool = True):
    """One key block of the online softmax: ``(acc, m, l)`` updated with logits ``s [rows, bk]``
    (``-inf`` where masked; base 2 unless ``exp=jnp.exp``) and values ``v [bk, e]``; ``drop``
    (dropout) maps the weights that multiply ``v`` (the normaliser sums them undropped).
    ``scale > 0``: the logits are ``scale * s``; the row max is taken on ``s`` and scaled, and
    each weight is ``exp(fma(s, scale, -m))``, one FMA per score on a GPU (``interpret=False``)
    instead of a multiply and a subtract (as FlashAttention's kernels do)."""
    acc, m, l = carry
    row_max = jnp.max(s, axis=1)
    m_new = jnp.maximum(m, row_max if scale is None else row_max * scale)
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    alpha = exp(m - m_safe)
    if scale is None:
        p = exp(s - m_safe[:, None])
    else:
        p = exp(_common.fma(s, scale, -m_safe[:, None], interpret=interpret))
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot((p if drop is None else drop(p)).astype(v.dtype), v, precision=precision)
    return acc, m_new, l


def online_softmax_init(rows: int, width: int):
    return (jnp.zeros((rows, width), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def online_softmax_finish(acc, m, l):
    """``(out [rows, e] fp32, natural-log lse [rows])``; rows that saw no key give 0 and -inf."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[:, None]
    return out, jnp.where(empty, NEG_INF, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2E)


def _logit_grad(st: _Static, ds, t):
    """Chain rule from the final logits back to ``scale q k^T``: through ``score_mod`` (``t = (tanh,
    derivative)``) and the soft cap ``c tanh(x / c)`` (``ds * (1 - tanh^2)``)."""
    if isinstance(t, tuple):
        t, dmod = t[:2]
        ds = ds * dmod
    return ds if t is None else ds * (1.0 - t * t)


def _kv_range(st: _Static, q_start, block_q: int, block_k: int):
    """Key-block ranges for a query block without a left window bound: ``[0, n_full)``
    needs no positional mask, ``[n_full, hi)`` does (causal diagonal and/or padded keys)."""
    lo, full_lo, n_full, hi = _kv_blocks(st, q_start, block_q, block_k)
    return n_full, hi


def _kv_blocks(st: _Static, q_start, block_q: int, block_k: int, align=None):
    """Key-block ranges ``lo <= full_lo <= full_hi <= hi`` for a query block: ``[lo, full_lo)``
    straddles the left window edge (masked), ``[full_lo, full_hi)`` is fully visible to every
    row, ``[full_hi, hi)`` straddles the causal diagonal / right window edge / padded keys
    (masked); blocks outside ``[lo, hi)`` are skipped. ``align``: as :func:`_block_mask`'s."""
    n_valid = -(-st.kv_len // block_k)  # blocks holding real keys
    n_valid_full = st.kv_len // block_k  # blocks made only of real keys
    offset = st.kv_len - st.q_len if align is None else align
    first, last = q_start + offset, q_start + block_q - 1 + offset  # positions of the block's rows
    left, right = _bounds(st)
    if right is None:
        full_hi, hi = n_valid_full, n_valid
    else:  # row r sees keys k <= r + right
        full_hi = jnp.minimum(lax.div(jnp.maximum(first + right + 1, 0), block_k), n_valid_full)
        hi = jnp.minimum(lax.div(jnp.maximum(last + right + 1, 0) + block_k - 1, block_k), n_valid)
    if left is None:
        lo = full_lo = 0
    else:  # row r sees keys k >= r - left
        lo = lax.div(jnp.maximum(first - left, 0), block_k)
        full_lo = lax.div(jnp.maximum(last - left, 0) + block_k - 1, block_k)
    hi = jnp.maximum(hi, lo)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _pair_mask(st: _Static, shape, q_pos, k_pos, rows: bool, cols: bool):
    """Which elements of a ``[queries, keys]`` tile of an unpadded ``[..., q_len, kv_len]`` array
    (a bias, the logits' cotangent) exist: with ``rows``, queries before ``q_len`` (when the
    queries are ragged); with ``cols``, keys before ``kv_len``. None when all do."""
    rows = (q_pos < st.q_len)[:, None] if rows and _q_ragged(st) else None
    cols = (k_pos < st.kv_len)[None, :] if cols else None
    mask = rows if cols is None else cols if rows is None else rows & cols
    return None if mask is None else jnp.broadcast_to(mask, shape)


def _load_bias(st: _Static, bias_ref, lead: tuple, q_idx, k_idx, q_pos, k_pos, ragged_k: bool):
    """A bias tile ``bias_ref[*lead, q_idx, k_idx]`` (``q_idx``/``k_idx`` dropped on broadcast
    dims), for queries ``q_pos`` and keys ``k_pos`` (``ragged_k``: the tile may hold keys past the
    end). The bias is not padded to the tiles: elements past ``q_len`` / ``kv_len`` load as 0
    (:func:`_pair_mask`; broadcast dims are not masked), as a zero-padded copy's would."""
    _, _, bq, bk = st.bias_bcast
    idx = (*lead, slice(None) if bq else q_idx, slice(None) if bk else k_idx)
    view = bias_ref.at[idx]
    mask = _pair_mask(st, view.shape, q_pos, k_pos, rows=not bq, cols=ragged_k and not bk)
    return bias_ref[idx] if mask is None else pltriton.load(view, mask=mask, other=0)


def _optional_refs(st: _Static, rest):
    """Splits ``(qseg, kseg, segment block ranges)?, bias?, alibi slopes?, dropout seed?, position
    offsets?, sinks?, (index, blocks, q_offset)?, score_mod tables*, *outputs`` off the kernel's trailing
    refs (the tables, the offsets as :func:`_offsets` and the sinks' ref are returned first)."""
    qseg_ref = kseg_ref = range_ref = bias_ref = alibi_ref = seed_ref = pos_ref = sink_ref = lists = None
    if st.has_seg:
        qseg_ref, kseg_ref, range_ref, *rest = rest
    if st.bias_kind:
        bias_ref, *rest = rest
    if st.alibi:
        alibi_ref, *rest = rest
    if st.dropout:
        seed_ref, *rest = rest
    if st.offsets:
        pos_ref, *rest = rest
    if st.sinks:
        sink_ref, *rest = rest
    if st.sparse is not None:
        lists, rest = rest[:3], rest[3:]
    tables, rest = tuple(rest[:st.mod_tables]), rest[st.mod_tables:]
    return ((tables, _offsets(st, pos_ref), sink_ref),
            (qseg_ref, kseg_ref, range_ref, bias_ref, alibi_ref, seed_ref, lists, rest))


def _offsets(st: _Static, pos_ref) -> tuple:
    """``(align, q_offset, kv_offset)``: the key position of query row 0 (None: ``kv_len - q_len``) and
    what score_mod's indices add, from the ``position_offset`` input (read once per program)."""
    if not st.offsets:
        return None, 0, 0
    q_off, kv_off = pos_ref[0], pos_ref[1]
    return q_off - kv_off, q_off, kv_off


def _aligned(st: _Static, q_pos, align):
    """Query rows ``q_pos`` -> their positions among the keys (ALiBi's distances)."""
    return q_pos + (st.kv_len - st.q_len if align is None else align)


def _batch_head(st: _Static, head):
    """Dropout's (batch, q head) index of this program (read program ids outside loops)."""
    return 0 if st.dropout_shared else pl.program_id(1) * st.heads + head


def _drop_state(st: _Static, seed_ref):
    """``(seed, batch-head offset, query offset, key offset)`` of the dropout mask (the block of a
    larger mask this call draws; ``_dropout.kernel_seed``), read once per program."""
    return seed_ref[0], 0 if st.dropout_shared else seed_ref[1], seed_ref[2], seed_ref[3]


def _drop_rows(seed, bh, q_start, block_q: int):
    """Dropout state of a query tile's rows (``bh``, ``q_start`` with the offsets added)."""
    return _dropout.row_hash(seed, jnp.asarray(bh, jnp.int32), q_start + jnp.arange(block_q))


def _drop(st: _Static, keep, x):
    """Dropped and rescaled: ``x / (1 - rate)`` where kept, else 0 (``keep`` None: x)."""
    return x if keep is None else jnp.where(keep, x * (1.0 / (1.0 - st.dropout)), 0.0)


def _clip_range(range_ref, row, lo, a, b, hi):
    """Intersects block ranges ``lo <= a <= b <= hi`` with the segment range ``range_ref[row]``
    (blocks outside it hold no key of the tile's segments, so they would be fully masked)."""
    lo = jnp.maximum(lo, range_ref[row, 0])
    hi = jnp.maximum(jnp.minimum(hi, range_ref[row, 1]), lo)
    a = jnp.clip(a, lo, hi)
    return lo, a, jnp.clip(b, a, hi), hi


def segment_block_ranges(q_segment_ids, kv_segment_ids, q_len: int, kv_len: int, block_q: int,
                         block_k: int, transposed: bool = False) -> jax.Array:
    """Per query block, the key blocks ``[lo, hi)`` that can hold a key of one of its segments
    (``transposed``: per key block, the query blocks): int32 ``[B, blocks, 2]``. A block's
    segments are summarised by their min and max id over its real rows, so the range is exact
    for packed (sorted) segments and conservative for any other ids; an empty range is
    ``[n, n)``. Inputs are the padded id arrays ``[B, q_pad]`` / ``[B, kv_pad]``."""
    big = jnp.iinfo(jnp.int32).max

    def summary(ids, length, block):
        n = ids.shape[1] // block
        real = (jnp.arange(ids.shape[1]) < length).reshape(n, block)
        x = ids.reshape(ids.shape[0], n, block)
        return (jnp.min(jnp.where(real, x, big), axis=2), jnp.max(jnp.where(real, x, -big), axis=2))

    qmin, qmax = summary(q_segment_ids, q_len, block_q)
    kmin, kmax = summary(kv_segment_ids, kv_len, block_k)
    if transposed:
        (qmin, qmax), (kmin, kmax) = (kmin, kmax), (qmin, qmax)
    meet = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
    n = meet.shape[2]
    j = jnp.arange(n)
    lo = jnp.min(jnp.where(meet, j, n), axis=2)
    hi = jnp.max(jnp.where(meet, j + 1, 0), axis=2)
    return jnp.stack([lo, jnp.maximum(hi, lo)], axis=-1).astype(jnp.int32)


def _seg_inputs(st: _Static, qseg, kseg, bq: int, bk: int, transposed: bool, q_map, kv_map):
    """Specs and arrays of the segment ids and their block ranges for one kernel."""
    if not st.has_seg:
        return [], []
    ranges = segment_block_ranges(qseg, kseg, st.q_len, st.kv_len, bq, bk, transposed)
    return ([q_map, kv_map, pl.BlockSpec((None, *ranges.shape[1:]), lambda i, b, h: (b, 0, 0))],
            [qseg, kseg, ranges])


def _qkv_spec(st: _Static, slot: int, rows: int, heads: int | None, width: int, index) -> pl.BlockSpec:
    """Block spec of q (``slot`` 0), k (1) or v (2): ``rows x heads x width`` blocks (``heads`` None:
    one head, squeezed) at ``index(i, b, h) -> (batch, row block, head block)``; packed, the same
    block of that slot of the ``[B, S, 3, H, D]`` array."""
    if not st.packed:
        return pl.BlockSpec((None, rows, heads, width), lambda i, b, h: (*index(i, b, h), 0))
    return pl.BlockSpec((None, rows, None, heads, width),
                        lambda i, b, h: (*index(i, b, h)[:2], slot, index(i, b, h)[2], 0))


def _qkv_inputs(st: _Static, q, k, v, d: int, dv: int, q_rows: int, q_heads: int | None, q_index, kv_rows: int,
                kv_index) -> tuple[list, list]:
    """(specs, arrays) of a kernel's q, k, v inputs: ``q_rows x q_heads`` query blocks at ``q_index``,
    ``kv_rows``-row key/value blocks of one kv head at ``kv_index`` (:func:`_qkv_spec`); packed, the
    one array three times."""
    specs = [_qkv_spec(st, 0, q_rows, q_heads, d, q_index), _qkv_spec(st, 1, kv_rows, None, d, kv_index),
             _qkv_spec(st, 2, kv_rows, None, dv, kv_index)]
    return specs, [q, q, q] if st.packed else [q, k, v]


def _packed_grad_spec(rows: int, width: int, index) -> pl.BlockSpec:
    """All three slots of a ``[B, S, 3, H, D]`` cotangent, ``rows`` rows of one head."""
    return pl.BlockSpec((None, rows, 3, None, width), lambda i, b, h: (*index(i, b, h)[:2], 0, index(i, b, h)[2], 0))


def _dims(st: _Static, q) -> tuple[int, int, int, int]:
    """(batch, q heads, q/k tile width, v tile width) of the kernel inputs."""
    batch, hq = q.shape[0], q.shape[-2]
    return batch, hq, _common.tile_width(st.head_dim), _common.tile_width(st.value_dim)


def _seq_store(ref, value, first, length: int, ragged: bool, width: int, slot: int | None = None):
    """An output tile of sequence rows from ``first`` (``slot``: into ``ref[:, slot, :]`` of a packed
    ``[rows, 3, d]`` cotangent tile), masked as :func:`_common.store_tile`."""
    idx = (slice(None), slice(None))
    if slot is not None:  # (a [rows, 1, d] window of the slot: interpret mode takes no int index here)
        idx, value = (slice(None), pl.ds(slot, 1), slice(None)), value[:, None, :]
    _common.store_tile(ref, idx, value, first, length, ragged, width)


def _q_ragged(st: _Static) -> bool:
    return st.q_len != st.q_pad


def _kv_ragged(st: _Static) -> bool:
    return st.kv_len != st.kv_pad


def _q_positions(st: _Static, q_start, block_q: int, lists):
    """Query positions of a tile: absolute (``q_offset`` added) for a sparse mask_fn."""
    pos = q_start + jnp.arange(block_q)
    return pos + lists[2][0] if st.sparse is not None else pos


def _row_tile(st: _Static, j, block_k: int, q, q_pos, qseg, k_ref, v_ref, kseg_ref, bias_ref, masked: bool,
              slope=None, raw: bool = False, bh=None, tables: tuple = (), grads: tuple[bool, ...] = (),
              offs: tuple = (None, 0, 0)):
    """Key block ``j`` for a query tile: base-2 logits ``s [bq, bk]`` (``raw``: not yet scaled, see
    :func:`_scores`), the chain-rule terms (or None), k and v. ``bh``: the program's (batch, head),
    ``tables`` the table refs and ``grads`` which tables' partials to return, for ``score_mod``;
    ``offs``: :func:`_offsets`."""
    align, q_off, kv_off = offs
    k_start = pl.multiple_of(j * block_k, block_k)
    ks = pl.ds(k_start, block_k)
    k_pos = k_start + jnp.arange(block_k)
    # (tiles holding keys past kv_len are always among the masked ones)
    ragged = masked and _kv_ragged(st)
    k = _common.load_tile(k_ref, (ks, slice(None)), k_start, st.kv_len, ragged, st.head_dim)
    v = _common.load_tile(v_ref, (ks, slice(None)), k_start, st.kv_len, ragged, st.value_dim)
    pos_mask = None
    if masked:
        # a sparse layout pads keys to its mask block: a listed tile may be all padding
        length = st.kv_len % block_k != 0 or (st.sparse is not None and st.kv_len != st.kv_pad)
        pos_mask = _block_mask(st, q_pos, k_pos, causal=st.causal, length=length, align=align)
    kseg = kseg_ref[ks] if st.has_seg else None
    bias = _load_bias(st, bias_ref, (), slice(None), ks, q_pos, k_pos, ragged) if st.bias_kind else None
    alibi = (slope, _aligned(st, q_pos, align), k_pos) if st.alibi else None
    mod = (*bh, q_pos + q_off, k_pos + kv_off, tables, grads) if st.score_mod is not None else None
    s, t = _scores(st, q, k, qseg, kseg, bias, pos_mask, alibi=alibi, raw=raw, mod=mod)
    return s, t, k, v


def _loop_lists(row, mask_block: int, tile: int, index_ref, blocks_ref, body, carry):
    """Block-sparse loop: ``body(j, carry, masked)`` over the ``tile``-sized sub-tiles ``j``
    of the mask blocks listed for ``row`` (``blocks_ref[start : start + n_visit]``, with
    ``(start, n_full, n_visit) = index_ref[row]``): full blocks unmasked, then partial
    ones masked (each iteration reads the next one's block id: ``_common.listed_loop``)."""
    sub = mask_block // tile  # static power of two
    start = index_ref[row, 0]
    last = blocks_ref.shape[0] - 1

    def tile_at(it):
        return blocks_ref[jnp.minimum(start + lax.div(it, sub), last)] * sub + lax.rem(it, sub)

    n_full, n_visit = index_ref[row, 1] * sub, index_ref[row, 2] * sub
    carry = _common.listed_loop(0, n_full, tile_at, lambda _, j, c: body(j, c, masked=False), carry)
    return _common.listed_loop(n_full, n_visit, tile_at, lambda _, j, c: body(j, c, masked=True), carry)


def _loop_kv(st: _Static, q_start, block_q: int, block_k: int, body, carry, lists=None, range_ref=None, align=None):
    """Runs ``body(j, carry, masked)`` over the key blocks a query tile sees: unmasked
    blocks first, then those on the causal diagonal or holding padded keys (or, for a
    sparse layout, the listed full blocks then the partial ones). With segment ids, only
    the key blocks whose segments can meet the tile's (``range_ref``) are visited."""
    if st.sparse is not None:
        row = lax.div(q_start, st.sparse.block_q)
        return _loop_lists(row, st.sparse.block_k, block_k, lists[0], lists[1], body, carry)
    lo, full_lo, full_hi, hi = _kv_blocks(st, q_start, block_q, block_k, align)
    if range_ref is not None:
        lo, full_lo, full_hi, hi = _clip_range(range_ref, lax.div(q_start, block_q), lo, full_lo, full_hi, hi)
    if st.window[0] is not None:  # else lo = full_lo = 0
        carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


# ----------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------


def _fwd_kernel(*refs, st: _Static, block_q: int, block_k: int):
    q_ref, k_ref, v_ref, *rest = refs
    (tables, offs, sink_ref), (qseg_ref, kseg_ref, range_ref, bias_ref, alibi_ref, seed_ref, lists,
                               (o_ref, lse_ref)) = _optional_refs(st, rest)
    q_start = _q_block(st, pl.program_id(0), block_q) * block_q
    q_pos = _q_positions(st, q_start, block_q, lists)
    q = _common.load_tile(q_ref, (slice(None), slice(None)), q_start, st.q_len, _q_ragged(st), st.head_dim)
    qseg = qseg_ref[...] if st.has_seg else None
    slope = alibi_ref[pl.program_id(2)] if st.alibi else None
    bh = (pl.program_id(1), pl.program_id(2))
    rows = None
    if st.dropout:
        seed, bh_off, q_off, k_off = _drop_state(st, seed_ref)
        rows = _drop_rows(seed, _batch_head(st, pl.program_id(2)) + bh_off, q_off + q_start, block_q)

    raw = _raw_logits(st)

    def body(j, carry, masked: bool):
        s, _, _, v = _row_tile(st, j, block_k, q, q_pos, qseg, k_ref, v_ref, kseg_ref, bias_ref, masked, slope,
                               raw=raw, bh=bh, tables=tables, offs=offs)
        drop = None
        if rows is not None:  # the normaliser sums every p; only p v sees the dropped weights
            keep = _dropout.keep(rows[:, None], k_off + j * block_k + jnp.arange(block_k)[None, :], st.dropout)
            drop = functools.partial(_drop, st, keep)
        return online_softmax_step(carry, s, v, st.precision, drop=drop, scale=_logit_scale(st) if raw else None,
                                   interpret=_common.resolve_interpret(st.interpret))

    init = online_softmax_init(block_q, v_ref.shape[-1])
    if st.sinks:  # the sink's weight exp2(sink2 - m) = 1 under the running max m = sink2
        init = (init[0], jnp.full((block_q,), sink_ref[pl.program_id(2)] * LOG2E, jnp.float32),
                jnp.ones((block_q,), jnp.float32))
    carry = _loop_kv(st, q_start, block_q, block_k, body, init, lists, range_ref, offs[0])
    o, lse = online_softmax_finish(*carry)
    _seq_store(o_ref, o, q_start, st.q_len, _q_ragged(st), st.value_dim)
    lse_ref[...] = lse


def _q_block(st: _Static, i, block_q: int):
    """Query block handled by program ``i``: with causal masking (or a sparse layout,
    whose patterns are causal-like) the heaviest (last) blocks are launched first, which
    balances the tail of the grid."""
    return st.q_pad // block_q - 1 - i if st.causal or st.sparse is not None else i


def _bias_spec_fwd(st: _Static, block_q: int):
    """One query tile's row stripe of the bias (over ``kv_pad`` columns: the bias is not padded,
    :func:`_load_bias` masks)."""
    bb, bh, bq, bk = st.bias_bcast
    blk = (None, None, 1 if bq else block_q, 1 if bk else st.kv_pad)

    def index_map(i, b, h):
        return (0 if bb else b, 0 if bh else h, 0 if bq else _q_block(st, i, block_q), 0)

    return pl.BlockSpec(blk, index_map)


def _list_inputs(st: _Static, layout, transposed: bool):
    """Specs and arrays of a sparse layout's lists for one kernel: per query block
    (forward, dq) or per key block (``transposed``, dk/dv), plus ``q_offset``. The whole
    arrays are passed; the kernels read scalars from them."""
    if st.sparse is None:
        return [], []
    kv_index, kv_blocks, q_index, q_blocks, q_offset = layout
    arrays = [q_index, q_blocks, q_offset] if transposed else [kv_index, kv_blocks, q_offset]
    return _whole_inputs(arrays)


def _row_inputs(st: _Static, qseg, kseg, bias, alibi, seed, layout, bq: int, bk: int, tables=(), pos=None,
                sinks=None):
    """Specs and arrays of the optional inputs of a kernel with one query tile per program
    (forward, dq): segment ids (and their block ranges), bias, ALiBi slopes, dropout seed, position
    offsets, sinks, sparse lists, score_mod tables."""
    qb = functools.partial(_q_block, st, block_q=bq)
    specs, arrays = _seg_inputs(st, qseg, kseg, bq, bk, False, pl.BlockSpec((None, bq), lambda i, b, h: (b, qb(i))),
                                pl.BlockSpec((None, st.kv_pad), lambda i, b, h: (b, 0)))
    if st.bias_kind:
        specs.append(_bias_spec_fwd(st, bq))
        arrays.append(bias)
    sspecs, sarrays = _scalar_inputs(st, alibi, seed, pos, sinks)
    lspecs, larrays = _list_inputs(st, layout, transposed=False)
    tspecs, tarrays = _whole_inputs(tables)
    return specs + sspecs + lspecs + tspecs, arrays + sarrays + larrays + tarrays


def _whole_inputs(arrays):
    """Specs and arrays of inputs every program reads whole (sparse lists, score_mod's tables)."""
    return [_common.whole_block(x.shape) for x in arrays], list(arrays)


def _scalar_inputs(st: _Static, alibi, seed, pos=None, sinks=None):
    """Specs and arrays read as scalars by every kernel (grids ``(tile, batch, head)``): the ALiBi
    slopes ``[B, Hq]`` (a program reads its head's, or its kv head group's), the dropout seed, the
    position offsets (int32 ``[2]``) and the sinks (fp32 ``[Hq]``; the forward's only: the backward
    kernels see them through the lse)."""
    specs, arrays = [], []
    if st.alibi:
        specs.append(pl.BlockSpec((None, alibi.shape[1]), lambda i, b, h: (b, 0)))
        arrays.append(alibi)
    if st.dropout:
        specs.append(pl.BlockSpec((4,), lambda i, b, h: (0,)))
        arrays.append(seed)
    if st.offsets:
        specs.append(pl.BlockSpec((2,), lambda i, b, h: (0,)))
        arrays.append(pos)
    if st.sinks:
        specs.append(_common.whole_block(sinks.shape))
        arrays.append(sinks)
    return specs, arrays


def _fwd_call(st: _Static, q, k, v, bias, qseg, kseg, layout, alibi=None, seed=None, tables=(), pos=None,
              sinks=None):
    if st.mosaic is not None:  # the FlashAttention-3 forward (flash_mgpu); the backward stays here
        sparse = None
        if st.sparse is not None:
            kv_index, kv_blocks, _, _, q_offset = layout
            sparse = flash_mgpu.SparseLists(st.sparse.mask_fn, st.sparse.block_q, st.sparse.block_k, kv_index,
                                            kv_blocks, q_offset)
        return flash_mgpu.forward(q, k, v, causal=st.causal, scale=st.scale, q_len=st.q_len, kv_len=st.kv_len,
                                  config=st.mosaic, sparse=sparse, interpret=_common.resolve_interpret(st.interpret))
    cfg = st.cfg
    bq, bk = _blocks(st, cfg.block_q, cfg.block_k)
    batch, hq, d, dv = _dims(st, q)
    g = st.groups
    qb = functools.partial(_q_block, st, block_q=bq)
    in_specs, args = _qkv_inputs(st, q, k, v, d, dv, bq, None, lambda i, b, h: (b, qb(i), h),
                                 st.kv_pad, lambda i, b, h: (b, 0, h // g))
    specs, arrays = _row_inputs(st, qseg, kseg, bias, alibi, seed, layout, bq, bk, tables, pos, sinks)
    in_specs, args = in_specs + specs, args + arrays
    out_shape = [jax.ShapeDtypeStruct((batch, q.shape[1], hq, st.value_dim), q.dtype),  # (as q's rows: not padded)
                 jax.ShapeDtypeStruct((batch, hq, st.q_pad), jnp.float32)]
    out_specs = [pl.BlockSpec((None, bq, None, dv), lambda i, b, h: (b, qb(i), h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qb(i)))]
    call = _common.pallas_call(
        functools.partial(_fwd_kernel, st=st, block_q=bq, block_k=bk),
        out_shape=out_shape, grid=(st.q_pad // bq, batch, hq), in_specs=in_specs,
        out_specs=out_specs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        interpret=st.interpret, name="jaxattn_flash_fwd")
    return call(*args)


# ----------------------------------------------------------------------------
# Backward: dq.
# ----------------------------------------------------------------------------


def _dq_kernel(*refs, st: _Static, block_q: int, block_k: int):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    (tables, offs, _), (qseg_ref, kseg_ref, range_ref, bias_ref, alibi_ref, seed_ref, lists, (dq_ref, *outs)) = \
        _optional_refs(st, rest)
    dbias, outs = (outs[:1], outs[1:]) if st.bias_grad else ((), outs)
    dtable_refs = dict(zip((n for n, g in enumerate(st.table_grads) if g), outs))  # fp32, accumulated
    q_start = _q_block(st, pl.program_id(0), block_q) * block_q
    q_pos = _q_positions(st, q_start, block_q, lists)
    q, do = (_common.load_tile(r, (slice(None), slice(None)), q_start, st.q_len, _q_ragged(st), w)
             for r, w in ((q_ref, st.head_dim), (do_ref, st.value_dim)))
    lse2 = _lse2(lse_ref[...])
    delta = delta_ref[...]
    qseg = qseg_ref[...] if st.has_seg else None
    slope = alibi_ref[pl.program_id(2)] if st.alibi else None
    bh = (pl.program_id(1), pl.program_id(2))
    rows = None
    if st.dropout:
        seed, bh_off, q_off, k_off = _drop_state(st, seed_ref)
        rows = _drop_rows(seed, _batch_head(st, pl.program_id(2)) + bh_off, q_off + q_start, block_q)

    def key_tile(j):
        return pl.ds(pl.multiple_of(j * block_k, block_k), block_k)

    skips = st.causal or st.window != (None, None) or st.has_seg or st.sparse is not None

    def store_dz(j, dz):  # the logits' cotangent, [B, Hq, q_len, kv_len] (unpadded: masked)
        view = dbias[0].at[:, key_tile(j)]
        mask = _pair_mask(st, view.shape, q_pos, j * block_k + jnp.arange(block_k), rows=True,
                          cols=_kv_ragged(st))
        if mask is None:
            dbias[0][:, key_tile(j)] = dz.astype(dbias[0].dtype)
        else:
            pltriton.store(view, dz.astype(dbias[0].dtype), mask=mask)

    if st.bias_grad and skips:  # zeros where no key block is visited (causal, window, segments)
        def clear(j, c):
            store_dz(j, jnp.zeros((block_q, block_k), jnp.float32))
            return c
        lax.fori_loop(0, st.kv_pad // block_k, clear, 0)

    def body(j, dq, masked: bool):
        s, t, k, v = _row_tile(st, j, block_k, q, q_pos, qseg, k_ref, v_ref, kseg_ref, bias_ref, masked, slope,
                               raw=_raw_logits(st), bh=bh, tables=tables, grads=st.table_grads, offs=offs)
        p = _weights(st, s, lse2[:, None])
        dp = dot(do, v, trans_b=True, precision=st.precision)
        if rows is not None:  # the cotangent of the kept weights, rescaled
            dp = _drop(st, _dropout.keep(rows[:, None], k_off + j * block_k + jnp.arange(block_k)[None, :],
                                         st.dropout), dp)
        dz = p * (dp - delta[:, None])  # cotangent of the final logits (the bias enters there)
        if st.bias_grad:
            store_dz(j, dz)
        if dtable_refs:
            _score_mod.add_table_grads(dtable_refs, t[2], dz, _common.resolve_interpret(st.interpret))
        ds = _logit_grad(st, dz, t)
        return dq + dot(ds.astype(k.dtype), k, precision=st.precision)

    dq = _loop_kv(st, q_start, block_q, block_k, body, jnp.zeros(q.shape, jnp.float32), lists, range_ref, offs[0])
    _seq_store(dq_ref, dq * st.scale, q_start, st.q_len, _q_ragged(st), st.head_dim, 0 if st.packed else None)


def _weights(st: _Static, s, lse2):
    """``exp2(logits - lse2)`` for logits from :func:`_scores` (``raw`` when :func:`_raw_logits`
    holds: then scaled inside the exponent, one FMA per score on a GPU); ``lse2`` broadcasts."""
    if not _raw_logits(st):
        return jnp.exp2(s - lse2)
    return jnp.exp2(_common.fma(s, _logit_scale(st), -lse2, interpret=_common.resolve_interpret(st.interpret)))


def _lse2(lse):
    """Natural lse -> base 2; empty rows (-inf) become +inf so exp2(s - lse) = 0."""
    return jnp.where(lse == NEG_INF, jnp.inf, lse * LOG2E)


def _dq_call(st: _Static, q, k, v, do, lse, delta, bias, qseg, kseg, layout, alibi=None, seed=None,
             dqkv=None, tables=(), pos=None):
    """dq (and the logits' cotangent with ``st.bias_grad``, and the fp32 gradients of the score_mod
    tables flagged in ``st.table_grads``); packed, slot 0 of ``dqkv`` (the dk/dv kernel's packed
    cotangent, updated in place)."""
    cfg = st.cfg
    # the tables' index, partial and update tiles stay live beside the dq accumulator: half the query
    # rows keep the d=128 kernel spill-free
    block_q = cfg.block_q_dq // 2 if any(st.table_grads) and cfg.block_q_dq > 16 else cfg.block_q_dq
    bq, bk = _blocks(st, block_q, cfg.block_k_dq)
    batch, hq, d, dv_ = _dims(st, q)
    g = st.groups
    qb = functools.partial(_q_block, st, block_q=bq)
    in_specs, args = _qkv_inputs(st, q, k, v, d, dv_, bq, None, lambda i, b, h: (b, qb(i), h),
                                 st.kv_pad, lambda i, b, h: (b, 0, h // g))
    in_specs += [
        pl.BlockSpec((None, bq, None, dv_), lambda i, b, h: (b, qb(i), h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qb(i))),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qb(i))),
    ]
    args += [do, lse, delta]
    specs, arrays = _row_inputs(st, qseg, kseg, bias, alibi, seed, layout, bq, bk, tables, pos)
    in_specs, args = in_specs + specs, args + arrays
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if st.packed:
        out_specs = [_packed_grad_spec(bq, d, lambda i, b, h: (b, qb(i), h))]
    else:
        out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, qb(i), h, 0))]
    if st.bias_grad:  # fp32 [B, Hq, q_len, kv_len]: one query tile's row stripe per program
        out_shape.append(jax.ShapeDtypeStruct((batch, hq, st.q_len, st.kv_len), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, bq, st.kv_pad), lambda i, b, h: (b, h, qb(i), 0)))
    out_init = [dqkv] + [None] * (len(out_shape) - 1)
    for x, grad in zip(tables, st.table_grads):  # every program adds into the whole table
        if grad:
            out_shape.append(jax.ShapeDtypeStruct(x.shape, jnp.float32))
            out_specs.append(_common.whole_block(x.shape))
            out_init.append(jnp.zeros(x.shape, jnp.float32))
    call = _common.pallas_call(
        functools.partial(_dq_kernel, st=st, block_q=bq, block_k=bk),
        out_shape=out_shape, grid=(st.q_pad // bq, batch, hq), in_specs=in_specs, out_specs=out_specs,
        num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd,
        interpret=st.interpret, name="jaxattn_flash_dq", out_init=out_init)
    out = call(*args)
    n = 2 if st.bias_grad else 1
    return out[0], (out[1] if st.bias_grad else None), list(out[n:])


# ----------------------------------------------------------------------------
# Backward: dk, dv.
# ----------------------------------------------------------------------------


def _q_range(st: _Static, k_start, block_q: int, block_k: int, align=None):
    """Query-block ranges ``lo <= first_full <= last_full <= hi`` for a key block: ``[lo,
    first_full)`` straddles the causal diagonal / right window edge (masked), ``[first_full,
    last_full)`` sees the whole block, ``[last_full, hi)`` straddles the left window edge
    (masked); other query blocks see none of it. ``align``: as :func:`_block_mask`'s."""
    n_q = st.q_pad // block_q
    offset = st.kv_len - st.q_len if align is None else align
    left, right = _bounds(st)
    first_key, last_key = k_start - offset, k_start + block_k - 1 - offset
    # query row i sees key k iff k - offset - right <= i <= k - offset + left
    if right is None:
        lo = first_full = 0
    else:
        lo = lax.div(jnp.maximum(first_key - right, 0), block_q)
        first_full = lax.div(jnp.maximum(last_key - right, 0) + block_q - 1, block_q)
    if left is None:
        last_full = hi = n_q
    else:
        last_full = lax.div(jnp.maximum(first_key + left + 1, 0), block_q)
        hi = lax.div(jnp.maximum(last_key + left + 1, 0) + block_q - 1, block_q)
    lo = jnp.minimum(lo, n_q)
    hi = jnp.clip(hi, lo, n_q)
    first_full = jnp.clip(first_full, lo, hi)
    last_full = jnp.clip(last_full, first_full, hi)
    return lo, first_full, last_full, hi


def _dkdv_kernel(*refs, st: _Static, block_q: int, block_k: int):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    (tables, (align, q_off, kv_off), _), (qseg_ref, kseg_ref, range_ref, bias_ref, alibi_ref, seed_ref, lists, outs) = \
        _optional_refs(st, rest)

    k_start = pl.program_id(0) * block_k
    k_pos = k_start + jnp.arange(block_k)
    k, v = (_common.load_tile(r, (slice(None), slice(None)), k_start, st.kv_len, _kv_ragged(st), w)
            for r, w in ((k_ref, st.head_dim), (v_ref, st.value_dim)))
    kseg = kseg_ref[...] if st.has_seg else None
    bias_heads = 1 if st.bias_bcast[1] else st.groups
    head0 = pl.program_id(2) * st.groups  # first q head of this kv head's group (ALiBi slopes)
    batch = pl.program_id(1)
    if st.dropout:
        seed, bh_off, q_off, k_off = _drop_state(st, seed_ref)
        bh0 = _batch_head(st, head0) + bh_off

    def body(i, carry, g, masked: bool):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        qs = pl.ds(q_start, block_q)
        q, do = (_common.load_tile(r, (qs, g, slice(None)), q_start, st.q_len, _q_ragged(st), w)
                 for r, w in ((q_ref, st.head_dim), (do_ref, st.value_dim)))
        lse2 = _lse2(lse_ref[g, qs])
        delta = delta_ref[g, qs]
        pos_mask = None
        if masked:  # causal diagonal / window edge, or a partial block of a sparse layout
            pos_mask = _block_mask(st, _q_positions(st, q_start, block_q, lists), k_pos,
                                   causal=st.causal, length=False, transposed=True, align=align)
        qseg = qseg_ref[qs] if st.has_seg else None
        bias = None
        if st.bias_kind:
            gb = g if bias_heads > 1 else jnp.int32(0)  # (an int index fails interpret mode's masked load)
            bias = _load_bias(st, bias_ref, (gb,), qs, slice(None), q_start + jnp.arange(block_q), k_pos,
                              _kv_ragged(st))
        # Transposed scores [bk, bq] (as Triton's fused-attention backward): every dot below
        # takes its operands as they are, with no register tile transposed in between.
        alibi = (alibi_ref[head0 + g], _aligned(st, q_start + jnp.arange(block_q), align), k_pos) if st.alibi else None
        mod = ((batch, head0 + g, _q_positions(st, q_start, block_q, lists) + q_off, k_pos + kv_off, tables, ())
               if st.score_mod is not None else None)
        s_t, t_t = _scores(st, q, k, qseg, kseg, bias, pos_mask, transposed=True, alibi=alibi,
                           raw=_raw_logits(st), mod=mod)
        p_t = _weights(st, s_t, lse2[None, :])
        keep_t = None
        if st.dropout:  # the forward's mask, transposed: rows are this tile's queries
            rows = _drop_rows(seed, bh0 if st.dropout_shared else bh0 + g, q_off + q_start, block_q)
            keep_t = _dropout.keep(rows[None, :], k_off + k_pos[:, None], st.dropout)
        dv = dv + dot(_drop(st, keep_t, p_t).astype(do.dtype), do, precision=st.precision)
        dp_t = _drop(st, keep_t, dot(v, do, trans_b=True, precision=st.precision))
        ds_t = _logit_grad(st, p_t * (dp_t - delta[None, :]), t_t)
        dk = dk + dot(ds_t.astype(q.dtype), q, precision=st.precision)
        return dk, dv

    if st.sparse is not None:
        col = lax.div(k_start, st.sparse.block_k)

        def group_body(g, carry):
            return _loop_lists(col, st.sparse.block_q, block_q, lists[0], lists[1],
                               functools.partial(body, g=g), carry)
    else:
        lo, first_full, last_full, hi = _q_range(st, k_start, block_q, block_k, align)
        if range_ref is not None:
            lo, first_full, last_full, hi = _clip_range(range_ref, pl.program_id(0), lo, first_full, last_full, hi)

        def group_body(g, carry):
            carry = lax.fori_loop(lo, first_full, functools.partial(body, g=g, masked=True), carry)
            carry = lax.fori_loop(first_full, last_full, functools.partial(body, g=g, masked=False), carry)
            if st.window[0] is None:  # last_full = hi
                return carry
            return lax.fori_loop(last_full, hi, functools.partial(body, g=g, masked=True), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, st.groups, group_body, carry)
    if st.packed:  # one [bk, 3, d] tile of the packed cotangent: dk, dv into slots 1, 2 (dq's kernel fills 0)
        _seq_store(outs[0], dk * st.scale, k_start, st.kv_len, _kv_ragged(st), st.head_dim, 1)
        _seq_store(outs[0], dv, k_start, st.kv_len, _kv_ragged(st), st.value_dim, 2)
    else:
        _seq_store(outs[0], dk * st.scale, k_start, st.kv_len, _kv_ragged(st), st.head_dim)
        _seq_store(outs[1], dv, k_start, st.kv_len, _kv_ragged(st), st.value_dim)


def _dkdv_call(st: _Static, q, k, v, do, lse, delta, bias, qseg, kseg, layout, alibi=None, seed=None, tables=(),
               pos=None):
    cfg = st.cfg
    # a soft cap keeps its tanh tile live until the chain rule, dropout its keep mask (and a window
    # placed by traced position offsets its bounds): half the query rows per step keep the d=128
    # kernel (128 keys) spill-free
    extra_tiles = (st.softcap is not None or st.dropout > 0 or st.score_mod is not None
                   or (st.offsets and st.window != (None, None)))
    block_q = cfg.block_q_dkv // 2 if extra_tiles and cfg.block_q_dkv > 16 else cfg.block_q_dkv
    bq, bk = _blocks(st, block_q, cfg.block_k_dkv)
    batch, hq, d, dv_ = _dims(st, q)
    g = st.groups
    hkv = hq // g
    in_specs, args = _qkv_inputs(st, q, k, v, d, dv_, st.q_pad, g, lambda j, b, h: (b, 0, h),
                                 bk, lambda j, b, h: (b, j, h))
    in_specs += [
        pl.BlockSpec((None, st.q_pad, g, dv_), lambda j, b, h: (b, 0, h, 0)),
        pl.BlockSpec((None, g, st.q_pad), lambda j, b, h: (b, h, 0)),
        pl.BlockSpec((None, g, st.q_pad), lambda j, b, h: (b, h, 0)),
    ]
    args += [do, lse, delta]
    specs, arrays = _seg_inputs(st, qseg, kseg, bq, bk, True, pl.BlockSpec((None, st.q_pad), lambda j, b, h: (b, 0)),
                                pl.BlockSpec((None, bk), lambda j, b, h: (b, j)))
    in_specs, args = in_specs + specs, args + arrays
    if st.bias_kind:
        bb, bh, bbq, bbk = st.bias_bcast
        blk = (None, 1 if bh else g, 1 if bbq else st.q_pad, 1 if bbk else bk)
        in_specs.append(pl.BlockSpec(
            blk, lambda j, b, h: (0 if bb else b, 0 if bh else h, 0, 0 if bbk else j)))
        args.append(bias)
    specs, arrays = _scalar_inputs(st, alibi, seed, pos)
    in_specs, args = in_specs + specs, args + arrays
    specs, arrays = _list_inputs(st, layout, transposed=True)
    in_specs, args = in_specs + specs, args + arrays
    specs, arrays = _whole_inputs(tables)
    in_specs, args = in_specs + specs, args + arrays
    if st.packed:  # (slot 0, dq, comes from the dq kernel afterwards)
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [_packed_grad_spec(bk, d, lambda j, b, h: (b, j, h))]
    else:
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        out_specs = [pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0)),
                     pl.BlockSpec((None, bk, None, dv_), lambda j, b, h: (b, j, h, 0))]
    call = _common.pallas_call(
        functools.partial(_dkdv_kernel, st=st, block_q=bq, block_k=bk),
        out_shape=out_shape, grid=(st.kv_pad // bk, batch, hkv), in_specs=in_specs, out_specs=out_specs,
        num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd,
        interpret=st.interpret, name="jaxattn_flash_dkdv")
    return call(*args)


# ----------------------------------------------------------------------------
# custom_vjp and the padded entry point.
# ----------------------------------------------------------------------------


def _blocks(st: _Static, block_q: int, block_k: int) -> tuple[int, int]:
    """Tiles shrunk to the (padded) lengths, and to a sparse layout's mask blocks; all
    are powers of two, so the tiles divide the padded lengths and the mask blocks."""
    if st.sparse is not None:
        block_q, block_k = min(block_q, st.sparse.block_q), min(block_k, st.sparse.block_k)
    return min(block_q, st.q_pad), min(block_k, st.kv_pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, bias, qseg, kseg, layout, alibi, seed, pos, sinks, tables):
    return _fwd_call(st, q, k, v, bias, qseg, kseg, layout, alibi, seed, tables, pos, sinks)


def _flash_fwd(st, q, k, v, bias, qseg, kseg, layout, alibi, seed, pos, sinks, tables):
    # symbolic_zeros: every array leaf comes as CustomVJPPrimal(value, perturbed)
    bias_grad = bias is not None and bias.perturbed and st.bias_kind == "add"
    table_grads = tuple(t.perturbed and jnp.issubdtype(t.value.dtype, jnp.inexact) for t in tables)
    q, k, v, bias, qseg, kseg, layout, alibi, seed, pos, sinks, tables = jax.tree.map(
        lambda x: x.value, (q, k, v, bias, qseg, kseg, layout, alibi, seed, pos, sinks, tables))
    o, lse = _fwd_call(st, q, k, v, bias, qseg, kseg, layout, alibi, seed, tables, pos, sinks)
    # a differentiated additive bias (and score_mod table) is marked by the residual's structure (a
    # 1-tuple, not an array)
    tables = tuple((x,) if g else x for x, g in zip(tables, table_grads))
    return (o, lse), (q, k, v, (bias,) if bias_grad else bias, qseg, kseg, layout, alibi, seed, pos, sinks, tables,
                      o, lse)


def _zero_if_symbolic(ct, like):
    return jnp.zeros(like.shape, like.dtype) if isinstance(ct, jax.custom_derivatives.SymbolicZero) else ct


def _flash_bwd(st, res, cts):
    q, k, v, bias, qseg, kseg, layout, alibi, seed, pos, sinks, tables, o, lse = res
    st = dataclasses.replace(st, sinks=False)  # (the backward kernels see the sinks through the lse)
    bias_grad = isinstance(bias, tuple)
    if bias_grad:
        (bias,), st = bias, dataclasses.replace(st, bias_grad=True)
    st = dataclasses.replace(st, table_grads=tuple(isinstance(x, tuple) for x in tables))
    tables = tuple(x[0] if isinstance(x, tuple) else x for x in tables)
    do, dlse = _zero_if_symbolic(cts[0], o), _zero_if_symbolic(cts[1], lse)
    # delta_i = sum_d dO_id O_id; an lse cotangent adds p * dlse to ds.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = _common.pad_axis(delta, 2, st.q_pad) - dlse.astype(jnp.float32)  # (the kernels read q_pad rows)
    do = do.astype(q.dtype)
    if st.packed:  # one [B, S, 3, H, D] cotangent: dk, dv into slots 1, 2, then dq into slot 0 in place
        (dqkv,) = _dkdv_call(st, q, k, v, do, lse, delta, bias, qseg, kseg, layout, alibi, seed, tables, pos)
        (dq, dz, dtables), dk, dv = _dq_call(st, q, k, v, do, lse, delta, bias, qseg, kseg, layout, alibi, seed,
                                             dqkv, tables, pos), None, None
    else:
        dq, dz, dtables = _dq_call(st, q, k, v, do, lse, delta, bias, qseg, kseg, layout, alibi, seed,
                                   tables=tables, pos=pos)
        dk, dv = _dkdv_call(st, q, k, v, do, lse, delta, bias, qseg, kseg, layout, alibi, seed, tables, pos)
    dbias = None
    if bias_grad:  # the logits' cotangent summed over the bias's broadcast dims
        dbias = jnp.sum(dz, axis=tuple(i for i, b in enumerate(st.bias_bcast) if b), keepdims=True)
        dbias = dbias.astype(bias.dtype)
    dtables = iter(dtables)
    dtables = tuple(next(dtables).astype(x.dtype) if g else None for x, g in zip(tables, st.table_grads))
    dsinks = None
    if sinks is not None:  # d lse / d sink = p_sink and d o / d sink = -p_sink o: dsink = -sum p_sink delta
        p_sink = jnp.exp(sinks[None, :, None] - lse[:, :, :st.q_len])
        dsinks = -jnp.sum(p_sink * delta[:, :, :st.q_len], axis=(0, 2))
    # No gradient flows to a bool mask, the segment ids, the sparse layout, the ALiBi slopes, the seed or
    # the position offsets.
    return dq, dk, dv, dbias, None, None, None, None, None, None, dsinks, dtables


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


def flash_attention(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array | None,
    *,
    causal: bool = False,
    scale: float | None = None,
    bias: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    local_window_size: tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    score_mod: Callable | None = None,
    score_mod_tables: tuple = (),
    dropout_rate: float = 0.0,
    dropout_seed: jax.Array | None = None,
    dropout_shared: bool = False,
    dropout_offset: tuple = (0, 0, 0),
    position_offset: tuple | None = None,
    sinks: jax.Array | None = None,
    config: FlashConfig | None = None,
    interpret: bool | None = None,
    backend: str = "triton",
    mosaic_config: flash_mgpu.MosaicConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention kernel on already-validated inputs.

    Args:
      q: ``[B, Sq, Hq, D]``; k: ``[B, Sk, Hkv, D]``; v: ``[B, Sk, Hkv, Dv]``,
        with ``Hkv`` dividing ``Hq``; one floating dtype. Or ``q`` packed ``[B, S, 3, H, D]`` (q, k,
        v in slots 0, 1, 2) with ``k = v = None``: the kernels read the
        slots in place and the gradient is one ``[B, S, 3, H, D]`` array (triton backend only).
      bias: rank-4 array broadcastable to ``[B, Hq, Sq, Sk]`` (each dim full or 1);
        floating = additive (differentiable: when it is differentiated, the dq kernel also writes
        the logits' cotangent, ``[B, Hq, Sq, Sk]`` fp32, summed over the broadcast dims), bool =
        keep-mask.
      q_segment_ids, kv_segment_ids: int ``[B, Sq]`` / ``[B, Sk]``; keys attend only
        within the same segment.
      local_window_size: ``(left, right)``: the query at position p (``i + Sk - Sq``) sees keys
        ``p - left .. p + right`` (None: that side unbounded); key blocks outside are skipped.
      logits_soft_cap: c > 0 maps the scaled logits x to ``c * tanh(x / c)``.
      alibi_slopes: ``[Hq]`` or ``[B, Hq]``: ALiBi, ``slope * |p - j|`` subtracted from the
        (capped) logits of query position p and key j (flash-attn's ``alibi_slopes``).
      score_mod: ``(x, batch, head, q_idx, kv_idx) -> x'`` on the (capped) logits, elementwise,
        before ALiBi, the bias and the masks (query row and key index; a sparse layout's absolute
        query positions); the backward applies its derivative (``jax.jvp`` inside the kernels).
      score_mod_tables: arrays (rank >= 1) passed to ``score_mod`` after its index arguments, read by
        indexing (:class:`jaxattn.pallas._score_mod.Table`: a gather per score); the dq kernel adds
        the floating ones' gradients (fp32 atomic adds on a GPU) when they are differentiated.
      dropout_rate: attention dropout in [0, 1): each weight is dropped with this probability
        and the kept ones scaled by ``1 / (1 - rate)``; the mask (``jaxattn.pallas._dropout``)
        is a function of ``dropout_seed`` (int32 ``[1]``), (batch, head) (or one mask for all of
        them with ``dropout_shared``), query row and key, regenerated by the backward kernels.
      dropout_offset: ``(batch, query row, key)`` of this call's block in a larger problem's mask
        (ints or int32 scalars; a sequence or batch shard draws its part of the single-device mask).
      position_offset: ``(q_offset, kv_offset)`` (ints or int32 scalars): q and k are blocks of a larger
        problem starting at these positions. Query row i sits at position ``q_offset + i`` and key j at
        ``kv_offset + j``: the causal mask, window and ALiBi compare those (instead of aligning the
        last query with the last key), and score_mod sees them as ``q_idx`` / ``kv_idx``.
      sinks: fp32 ``[Hq]``: a learned logit per head in every row's softmax that carries no value
        (gpt-oss's attention sinks; differentiable). The forward starts each row's online softmax
        from it; the lse includes it, so the backward kernels are unchanged and dsink is
        ``-sum_rows p_sink * (dO . O - dlse)``, one XLA reduction.
      config: tile sizes; defaults to the table entry for (head dim, dtype).
      interpret: run in interpret mode; None picks it when no GPU is present.
      backend: ``"triton"``, or ``"mosaic"``: the forward runs the FlashAttention-3 kernel of
        :mod:`jaxattn.pallas.flash_mgpu` (Hopper; head dims 64/128, bf16/fp16, causal or not, no
        bias, segments, window, soft cap, ALiBi or dropout), the backward these Triton kernels.
      mosaic_config: its tiles; defaults to ``flash_mgpu.CONFIGS[head_dim]``.

    Returns:
      ``out [B, Sq, Hq, Dv]`` in the input dtype and ``lse [B, Sq, Hq]`` (fp32,
      natural log, ``-inf`` for rows with no visible key, whose output is zero).
    """
    packed = k is None
    if packed:
        if v is not None or q.ndim != 5 or q.shape[2] != 3:
            raise ValueError(f"packed qkv (k = v = None) must be [B, S, 3, H, D] and v None; got q {tuple(q.shape)}")
        if backend != "triton":
            raise ValueError("packed qkv runs on the triton backend only")
        batch, q_len, _, hq, d = q.shape
        kv_len, hkv, dv = q_len, hq, d
    else:
        batch, q_len, hq, d = q.shape
        kv_len, hkv = k.shape[1], k.shape[2]
        dv = v.shape[-1]
    cfg = config or flash_config(max(d, dv), q.dtype)
    scale = float(1.0 / math.sqrt(d) if scale is None else scale)

    q_block = min(max(cfg.block_q, cfg.block_q_dq, cfg.block_q_dkv), max(16, _common.next_pow2(q_len)))
    k_block = min(max(cfg.block_k, cfg.block_k_dq, cfg.block_k_dkv), max(16, _common.next_pow2(kv_len)))
    mosaic = None
    if backend == "mosaic":
        check_mosaic(q, k, v, bias, q_segment_ids, local_window_size, logits_soft_cap, alibi_slopes,
                     dropout_rate, score_mod, position_offset, sinks)
        mosaic = mosaic_config or flash_mgpu.mosaic_config(d)
        # powers of two: the larger tile is a multiple of the smaller
        q_block, k_block = max(q_block, 2 * mosaic.block_q), max(k_block, mosaic.block_kv)
    elif backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'mosaic', got {backend!r}")
    q_pad, kv_pad = _common.round_up(q_len, q_block), _common.round_up(kv_len, k_block)

    has_seg = q_segment_ids is not None
    qseg = kseg = None
    if has_seg:
        qseg, kseg = pad_segment_ids(q_segment_ids, kv_segment_ids, q_pad, kv_pad)

    bias_kind, bcast = None, (True, True, True, True)
    if bias is not None:
        bias_kind = "bool" if bias.dtype == jnp.bool_ else "add"
        if bias_kind == "bool":
            bias = bias.astype(jnp.int8)
        bcast = tuple(s == 1 for s in bias.shape)  # (read unpadded: the kernels mask its ragged tiles)

    st = _Static(
        scale=scale, causal=bool(causal), q_len=q_len, kv_len=kv_len, q_pad=q_pad, kv_pad=kv_pad,
        groups=hq // hkv, has_seg=has_seg, bias_kind=bias_kind, bias_bcast=bcast, cfg=cfg,
        interpret=interpret, precision=precision_for(q.dtype),
        window=tuple(local_window_size) if local_window_size is not None else (None, None),
        softcap=None if logits_soft_cap is None else float(logits_soft_cap), alibi=alibi_slopes is not None,
        score_mod=score_mod, mod_tables=len(score_mod_tables), heads=hq, dropout=float(dropout_rate),
        dropout_shared=bool(dropout_shared), mosaic=mosaic, packed=packed, offsets=position_offset is not None,
        sinks=sinks is not None,
    )
    seed = None
    if dropout_rate:
        if dropout_seed is None:
            raise ValueError("dropout_rate > 0 needs dropout_seed (int32 [1])")
        seed = _dropout.kernel_seed(dropout_seed, hq, dropout_offset)
    alibi = None
    if alibi_slopes is not None:
        alibi = jnp.broadcast_to(jnp.asarray(alibi_slopes, jnp.float32).reshape(-1, hq), (batch, hq))
    pos = None
    if position_offset is not None:
        pos = jnp.stack([jnp.asarray(x, jnp.int32) for x in position_offset])
    return run_padded(st, q, k, v, bias, qseg, kseg, None, alibi, seed, tuple(score_mod_tables), pos, sinks)


def mosaic_auto(q, k, v, causal: bool, bias=None, q_segment_ids=None, window=None, softcap=None, alibi=None,
                dropout_rate=0.0, score_mod=None, position_offset=None, sinks=None) -> bool:
    """Whether ``impl="auto"`` runs the Mosaic GPU forward for these inputs: switched on
    (``flash_mgpu.AUTO_ON_HOPPER``), a Hopper GPU, and inputs it takes (``check_mosaic``)."""
    if not flash_mgpu.AUTO_ON_HOPPER or not flash_mgpu.on_hopper():
        return False
    if causal and not flash_mgpu.causal_supported():
        return False
    try:
        check_mosaic(q, k, v, bias, q_segment_ids, window, softcap, alibi, dropout_rate, score_mod, position_offset,
                     sinks)
    except ValueError:
        return False
    return True


def check_mosaic(q, k, v, bias=None, q_segment_ids=None, window=None, softcap=None, alibi=None,
                 dropout_rate=0.0, score_mod=None, position_offset=None, sinks=None) -> None:
    """What the Mosaic GPU forward runs; anything else raises, naming the argument."""
    if not flash_mgpu.available():
        raise ValueError("impl='mosaic' needs jax's Pallas Mosaic GPU backend (jax >= 0.10)")
    d, dk, dv = q.shape[-1], k.shape[-1], v.shape[-1]
    if not d == dk == dv or d not in flash_mgpu.HEAD_DIMS:
        raise ValueError(f"impl='mosaic' needs q, k and v head dims equal and in {flash_mgpu.HEAD_DIMS}; "
                         f"got q/k head_dim={d}, v head_dim={dv}")
    if jnp.dtype(q.dtype) not in flash_mgpu.DTYPES:
        raise ValueError(f"impl='mosaic' needs q, k, v in bfloat16 or float16, got {jnp.dtype(q.dtype).name}")
    extras = {"mask": bias is not None, "segment_ids": q_segment_ids is not None,
              "local_window_size": window is not None, "logits_soft_cap": softcap is not None,
              "alibi_slopes": alibi is not None, "dropout_rate": bool(dropout_rate), "score_mod": score_mod is not None,
              "position_offset": position_offset is not None, "sinks": sinks is not None}
    if used := [name for name, on in extras.items() if on]:
        raise ValueError(f"impl='mosaic' runs plain causal or non-causal attention; {', '.join(used)} "
                         "need impl='pallas'")


def pad_segment_ids(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_pad: int,
                    kv_pad: int) -> tuple[jax.Array, jax.Array]:
    """int32 segment ids padded to ``q_pad`` / ``kv_pad``: padded rows (-1) and keys (-2) match nothing."""
    return (_common.pad_axis(q_segment_ids.astype(jnp.int32), 1, q_pad, -1),
            _common.pad_axis(kv_segment_ids.astype(jnp.int32), 1, kv_pad, -2))


def precision_for(dtype: Any) -> Any:
    """fp32 inputs get exact fp32 dots; 16-bit ones the default (tensor-core) precision."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def run_padded(st: _Static, q, k, v, bias, qseg, kseg, layout, alibi=None, seed=None,
               tables: tuple = (), pos=None, sinks=None) -> tuple[jax.Array, jax.Array]:
    """Runs the differentiable kernels: ``out [B, Sq, Hq, Dv]``, ``lse [B, Sq, Hq]``. Neither the
    sequences nor the head dims are padded: the Triton kernels load and store the ragged last
    tiles and the columns past a head dim that is not a power of two masked (no padded copies of
    q, k, v, dO and the outputs); only the Mosaic GPU forward (head dims 64 or 128) takes q, k, v
    padded to ``st.q_pad``/``st.kv_pad`` rows."""
    if st.packed:
        st = dataclasses.replace(st, head_dim=q.shape[-1], value_dim=q.shape[-1])
        args = (q, None, None)
    else:
        st = dataclasses.replace(st, head_dim=q.shape[-1], value_dim=v.shape[-1])
        if st.mosaic is not None:  # (its TMA copies read whole tiles)
            q, k, v = (_common.pad_axis(x, 1, n) for x, n in ((q, st.q_pad), (k, st.kv_pad), (v, st.kv_pad)))
        args = (q, k, v)
    if sinks is not None:  # (fp32 [Hq], read as scalars by the forward)
        sinks = jnp.asarray(sinks, jnp.float32).reshape(-1)
    o, lse = _flash(st, *args, bias, qseg, kseg, layout, alibi, seed, pos, sinks, tuple(tables))
    return o[:, :st.q_len], jnp.swapaxes(lse[:, :, :st.q_len], 1, 2)
