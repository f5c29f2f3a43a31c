"""Block-sparse softmax attention: ``jaxattn.BlockMask`` and ``jaxattn.block_sparse_attention``.

A ``BlockMask`` describes which keys each query sees through an element mask
``mask_fn(q_idx, kv_idx) -> bool`` (absolute positions, jnp-traceable) and, derived from
it on the host (numpy), the lists the kernel walks: per query block the key blocks to
visit, each *full* (every element visible, no mask applied) or *partial* (the element
mask is evaluated in the kernel), plus the transposed lists for the dk/dv kernel. No dense
``[q_len, kv_len]`` mask is built for the kernel path.

Ready patterns (all causal; query ``i`` at absolute position ``p = i + q_offset``, key ``j``):

* ``causal``:         ``j <= p``
* ``sliding_window``: ``p - window < j <= p``
* ``sink_window``:    ``j <= p and (j < sink or p - j < window)`` (StreamingLLM)
* ``dilated``:        ``j <= p and (j < sink or (D % dilation == 0 and D < window / B))``
* ``power``:          ``j <= p and (j < sink or D < window / B or D is a power of two)``
  (PowerAttention, arXiv 2503.03588), with ``D = p // B - j // B`` the block distance.
* ``from_fn(mask_fn, ...)``: any predicate (lists built by evaluating it element-wise).

The built-in patterns also describe each row as a few disjoint key intervals, which gives
the block lists in O(rows x intervals) without evaluating the element mask, so building
one for 128k tokens takes well under a second; ``from_fn`` evaluates the predicate on the
full grid in chunks (O(q_len x kv_len)). A mask whose ``q_offset`` is a traced value (a
decode step inside ``jit``) is built on device from the element mask instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import _dropout
from jaxattn.pallas import flash as _flash
from jaxattn.pallas._common import targets_gpu as _targets_gpu
from jaxattn.pallas.block_sparse import block_sparse_attention_kernel
from jaxattn.reference.attention import attention_reference

EMPTY, PARTIAL, FULL = 0, 1, 2
MaskFn = Callable[[Any, Any], Any]


# ----------------------------------------------------------------------------
# Patterns: element masks (jnp-traceable, also fine on numpy) + row intervals.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Causal:
    """``j <= p``."""

    def __call__(self, q_idx, kv_idx):
        return kv_idx <= q_idx

    def intervals(self, p: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Disjoint half-open key intervals ``[start, stop)`` visible to positions ``p``."""
        return [(np.zeros_like(p), p + 1)]


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
    """``j <= p and (p - j < window or j < sink)``: the last ``window`` keys (the query's
    own included), plus the first ``sink`` keys."""

    window: int
    sink: int = 0

    def __call__(self, q_idx, kv_idx):
        near = q_idx - kv_idx < self.window
        if self.sink:
            near = near | (kv_idx < self.sink)
        return (kv_idx <= q_idx) & near

    def intervals(self, p):
        s = self.sink
        return [(np.zeros_like(p), np.minimum(s, p + 1)),
                (np.maximum(s, p - self.window + 1), p + 1)]


@dataclasses.dataclass(frozen=True)
class Dilated:
    """Block-dilated window: query block ``P = p // B`` sees key blocks ``P - m * dilation``
    for ``m * dilation < window_blocks`` (causally), plus the first ``sink`` keys."""

    block: int
    dilation: int
    window_blocks: int
    sink: int = 0

    def __call__(self, q_idx, kv_idx):
        dist = q_idx // self.block - kv_idx // self.block
        keep = (dist % self.dilation == 0) & (dist < self.window_blocks)
        if self.sink:
            keep = keep | (kv_idx < self.sink)
        return (kv_idx <= q_idx) & keep

    def intervals(self, p):
        b, s = self.block, self.sink
        qb = p // b
        out = [(np.zeros_like(p), np.minimum(s, p + 1))]
        for dist in range(0, self.window_blocks, self.dilation):
            kb = qb - dist
            out.append((np.maximum(s, kb * b), np.minimum((kb + 1) * b, p + 1)))
        return out


@dataclasses.dataclass(frozen=True)
class Power:
    """PowerAttention: with ``D = p // B - j // B``, key ``j`` is visible iff
    ``j <= p and (j < sink or D < window_blocks or D & (D - 1) == 0)``; query block ``P``
    sees key blocks ``{sink} U {P - D : D < W} U {P - 2^k}``."""

    block: int
    window_blocks: int
    sink: int

    def __call__(self, q_idx, kv_idx):
        dist = q_idx // self.block - kv_idx // self.block
        keep = (kv_idx < self.sink) | (dist < self.window_blocks) | ((dist & (dist - 1)) == 0)
        return (kv_idx <= q_idx) & keep

    def intervals(self, p):
        b, s, w = self.block, self.sink, self.window_blocks
        qb = p // b
        out = [(np.zeros_like(p), np.minimum(s, p + 1)),
               (np.maximum(s, (qb - w + 1) * b), p + 1)]
        dist = 1 << max(0, w - 1).bit_length()  # smallest power of two >= w
        while p.size and dist <= qb.max():
            kb = qb - dist  # distances < w are inside the window interval
            out.append((np.maximum(s, kb * b), (kb + 1) * b))
            dist *= 2
        return out


@dataclasses.dataclass(frozen=True)
class FnPattern:
    """A user predicate (equal iff it wraps the same function object)."""

    fn: MaskFn

    def __call__(self, q_idx, kv_idx):
        return self.fn(q_idx, kv_idx)

    intervals = None


# ----------------------------------------------------------------------------
# Block states and lists.
# ----------------------------------------------------------------------------


def _states_from_intervals(pattern, q_len: int, kv_len: int, q_offset: int, bq: int, bk: int) -> np.ndarray:
    """[n_qb, n_kb] int8 block states from each row's disjoint key intervals: the number of
    visible (row, key) pairs per block, summed with difference arrays, decides
    empty (0) / full (all real rows x bk keys) / partial."""
    n_qb, n_kb = -(-q_len // bq), -(-kv_len // bk)
    width = n_kb + 1
    p = np.arange(q_len, dtype=np.int64) + q_offset
    tile = np.arange(q_len, dtype=np.int64) // bq
    pts_i, pts_w, dif_i, dif_w = [], [], [], []
    for start, stop in pattern.intervals(p):
        start = np.clip(np.broadcast_to(start, p.shape), 0, kv_len)
        stop = np.clip(np.broadcast_to(stop, p.shape), 0, kv_len)
        ok = stop > start
        a, s, e = tile[ok] * width, start[ok], stop[ok]
        c0, c1 = s // bk, (e - 1) // bk
        one = c0 == c1
        pts_i += [a + c0, (a + c1)[~one]]
        pts_w += [np.where(one, e - s, (c0 + 1) * bk - s), (e - c1 * bk)[~one]]
        dif_i += [(a + c0 + 1)[~one], (a + c1)[~one]]  # + bk over the blocks strictly inside
        dif_w += [np.full((~one).sum(), bk), np.full((~one).sum(), -bk)]
    size = n_qb * width

    def acc(idx, w):
        if not idx:
            return np.zeros((n_qb, width))
        return np.bincount(np.concatenate(idx), np.concatenate(w).astype(np.float64),
                           minlength=size).reshape(n_qb, width)

    vis = (acc(pts_i, pts_w) + np.cumsum(acc(dif_i, dif_w), axis=1))[:, :n_kb]
    rows = np.minimum(bq, q_len - np.arange(n_qb) * bq)
    whole = (np.arange(n_kb) + 1) * bk <= kv_len
    full = (vis == rows[:, None] * bk) & whole[None, :]
    return np.where(vis == 0, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _states_elementwise(fn: MaskFn, q_len: int, kv_len: int, q_offset, bq: int, bk: int, xp=np):
    """Block states by evaluating the element mask on the padded grid: on the host with
    numpy position arrays (``fn`` may return jnp arrays), in chunks of query blocks; with
    ``xp=jnp`` in one traced evaluation (for a traced ``q_offset``)."""
    n_qb, n_kb = -(-q_len // bq), -(-kv_len // bk)
    kpos = xp.arange(n_kb * bk, dtype=np.int32)
    real_k = kpos < kv_len

    def chunk(t0: int, nt: int):
        rows = t0 * bq + xp.arange(nt * bq, dtype=np.int32)
        vis = xp.broadcast_to(xp.asarray(fn((rows + q_offset)[:, None], kpos[None, :])), (nt * bq, n_kb * bk))
        vis = vis & (rows < q_len)[:, None] & real_k[None, :]
        cnt = vis.reshape(nt, bq, n_kb, bk).sum(axis=(1, 3))
        real = xp.minimum(bq, q_len - (t0 + xp.arange(nt)) * bq)
        return xp.where(cnt == 0, EMPTY, xp.where(cnt == real[:, None] * bk, FULL, PARTIAL)).astype(np.int8)

    if xp is jnp:
        return chunk(0, n_qb)
    step = max(1, (1 << 24) // (bq * n_kb * bk))
    return np.concatenate([chunk(t, min(step, n_qb - t)) for t in range(0, n_qb, step)])


def _lists(states, xp=np):
    """CSR lists of a [R, C] state array: ``index [R, 3]`` = (start, n_full, n_visit) and
    ``blocks [nnz]`` (full blocks first, ascending). On device (``xp=jnp``) every row
    gets C slots, so shapes stay static."""
    r, c = states.shape
    n_full = (states == FULL).sum(1)
    n_visit = (states != EMPTY).sum(1)
    key = xp.where(states == FULL, 0, xp.where(states == PARTIAL, 1, 2)) * c + xp.arange(c)[None, :]
    order = xp.argsort(key, axis=1)  # keys are distinct: stable by construction
    if xp is jnp:
        start = jnp.arange(r) * c
        index = jnp.stack([start, n_full, n_visit], axis=1).astype(jnp.int32)
        return index, order.reshape(-1).astype(jnp.int32)
    start = np.concatenate([[0], np.cumsum(n_visit)[:-1]])
    keep = np.arange(c)[None, :] < n_visit[:, None]
    blocks = order[keep]
    if blocks.size == 0:
        blocks = np.zeros(1, np.int64)
    index = np.stack([start, n_full, n_visit], axis=1)
    return index.astype(np.int32), blocks.astype(np.int32)


def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=64)
def _host_layout(pattern, q_len: int, kv_len: int, q_offset: int, bq: int, bk: int):
    if pattern.intervals is not None:
        states = _states_from_intervals(pattern, q_len, kv_len, q_offset, bq, bk)
    else:
        states = _states_elementwise(pattern, q_len, kv_len, q_offset, bq, bk)
    kv_index, kv_blocks = _lists(states)
    q_index, q_blocks = _lists(states.T)
    return _readonly(states, kv_index, kv_blocks, q_index, q_blocks)


# ----------------------------------------------------------------------------
# BlockMask.
# ----------------------------------------------------------------------------


def _pow2_tile(name: str, t: int) -> int:
    if not isinstance(t, (int, np.integer)) or t < 16 or t & (t - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (the block size of the kernel's "
                         f"lists), got {t!r}")
    return int(t)


def _positive(name: str, x, minimum: int = 1) -> int:
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")
    return int(x)


def _static_int(x):
    """``int(x)`` for a concrete value, None for a traced one."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Which keys each query sees, and the kernel's block lists derived from it.

    Build one with a constructor (``causal``, ``sliding_window``, ``sink_window``,
    ``dilated``, ``power``, ``from_fn``); pass it to ``jaxattn.block_sparse_attention``.
    Every constructor takes ``q_len`` (and ``kv_len``, default ``q_len``) and places query
    row ``i`` at absolute position ``i + q_offset`` (default ``kv_len - q_len``, i.e.
    aligned to the end, as for a prompt continuing a cache). For single-token decode pass
    ``q_len=1``, ``kv_len`` = cache size and ``q_offset`` = the token's position; a traced
    ``q_offset`` (inside ``jit``) builds the lists on device.

    Attributes:
      mask_fn: the element mask ``(q_idx, kv_idx) -> bool`` on absolute positions.
      q_len, kv_len, block_q, block_k: lengths and the lists' block sizes.
      q_offset: int, or an int32 scalar array when traced.
      kv_index, kv_blocks: per query block ``(start, n_full, n_visit)`` into the key
        blocks to visit (full first); ``q_index``/``q_blocks`` the transpose.
    """

    def __init__(self, mask_fn, q_len, kv_len, block_q, block_k, q_offset, states,
                 kv_index, kv_blocks, q_index, q_blocks):
        self.mask_fn = mask_fn
        self.q_len, self.kv_len = q_len, kv_len
        self.block_q, self.block_k = block_q, block_k
        self.q_offset = q_offset
        self._states = states
        self.kv_index, self.kv_blocks = kv_index, kv_blocks
        self.q_index, self.q_blocks = q_index, q_blocks

    # -- pytree: the arrays are leaves, the pattern and sizes static -------------------
    def tree_flatten(self):
        leaves = (self.q_offset, self._states, self.kv_index, self.kv_blocks, self.q_index, self.q_blocks)
        return leaves, (self.mask_fn, self.q_len, self.kv_len, self.block_q, self.block_k)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        fn, q_len, kv_len, bq, bk = aux
        return cls(fn, q_len, kv_len, bq, bk, *leaves)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def _build(cls, pattern, q_len, kv_len, tile, q_offset) -> BlockMask:
        q_len = _positive("q_len", q_len)
        kv_len = q_len if kv_len is None else _positive("kv_len", kv_len)
        tq, tk = (tile, tile) if not isinstance(tile, (tuple, list)) else tuple(tile)
        tq, tk = _pow2_tile("block (tile)", tq), _pow2_tile("block (tile)", tk)
        bq = min(tq, max(16, 1 << (q_len - 1).bit_length()))  # short queries (decode): small tiles
        if q_offset is None:
            if kv_len < q_len:
                raise ValueError(f"q_len={q_len} > kv_len={kv_len}: pass q_offset (the absolute "
                                 "position of query row 0)")
            q_offset = kv_len - q_len
        static = _static_int(q_offset)
        if static is not None:
            if isinstance(q_offset, bool) or static < 0 or static != q_offset:
                raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
            arrays = _host_layout(pattern, q_len, kv_len, static, bq, tk)
            return cls(pattern, q_len, kv_len, bq, tk, static, *arrays)
        off = jnp.asarray(q_offset, jnp.int32)
        if off.ndim != 0:
            raise ValueError(f"q_offset must be a scalar, got shape {tuple(off.shape)}")
        states = _states_elementwise(pattern, q_len, kv_len, off, bq, tk, xp=jnp)
        kv_index, kv_blocks = _lists(states, jnp)
        q_index, q_blocks = _lists(states.T, jnp)
        return cls(pattern, q_len, kv_len, bq, tk, off, states, kv_index, kv_blocks, q_index, q_blocks)

    @classmethod
    def causal(cls, q_len: int, block: int = 128, *, kv_len: int | None = None,
               q_offset: int | jax.Array | None = None) -> BlockMask:
        """``j <= i + q_offset``; ``block`` is the lists' block size (a power of two >= 16)."""
        return cls._build(Causal(), q_len, kv_len, block, q_offset)

    @classmethod
    def sliding_window(cls, q_len: int, block: int = 128, *, window: int, kv_len: int | None = None,
                       q_offset: int | jax.Array | None = None) -> BlockMask:
        """The last ``window`` keys of each query (itself included), causal."""
        return cls._build(SlidingWindow(_positive("window", window)), q_len, kv_len, block, q_offset)

    @classmethod
    def sink_window(cls, q_len: int, block: int = 128, *, window: int, sink: int,
                    kv_len: int | None = None, q_offset: int | jax.Array | None = None) -> BlockMask:
        """Sliding window of ``window`` keys plus the first ``sink`` keys (attention sinks)."""
        pattern = SlidingWindow(_positive("window", window), _positive("sink", sink, 0))
        return cls._build(pattern, q_len, kv_len, block, q_offset)

    @classmethod
    def dilated(cls, q_len: int, block: int = 128, *, window: int, dilation: int, sink: int = 0,
                kv_len: int | None = None, q_offset: int | jax.Array | None = None,
                tile: int | tuple[int, int] | None = None) -> BlockMask:
        """Block-dilated window at granularity ``block``: key blocks at block distance
        ``0, dilation, 2 dilation, ...`` below ``window`` tokens (a multiple of ``block``),
        plus the first ``sink`` keys. ``tile`` is the lists' block size (default
        ``block`` clipped to 16..128, or 128 for a non-power-of-two ``block``)."""
        b = _positive("block", block)
        w = _window_blocks(window, b)
        pattern = Dilated(b, _positive("dilation", dilation), w, _positive("sink", sink, 0))
        return cls._build(pattern, q_len, kv_len, _default_tile(b, tile), q_offset)

    @classmethod
    def power(cls, q_len: int, block: int = 256, window: int | None = None, sink: int | None = None,
              *, kv_len: int | None = None, q_offset: int | jax.Array | None = None,
              tile: int | tuple[int, int] | None = None) -> BlockMask:
        """PowerAttention (arXiv 2503.03588): block size ``B = block``; with block distance
        ``D = i // B - j // B``, key ``j`` is visible to query ``i`` iff ``j <= i`` and
        (``j < sink`` or ``D < window / B`` or ``D`` is a power of two).

        ``window`` and ``sink`` are in tokens (defaults: the paper's ``W = 5`` blocks and
        one sink block, i.e. ``5 * block`` and ``block``); ``window`` must be a multiple of
        ``block``. ``tile`` is the lists' block size (default ``block`` clipped to 16..128,
        or 128 for a non-power-of-two ``block``).
        """
        b = _positive("block", block)
        w = _window_blocks(5 * b if window is None else window, b)
        s = b if sink is None else _positive("sink", sink, 0)
        return cls._build(Power(b, w, s), q_len, kv_len, _default_tile(b, tile), q_offset)

    @classmethod
    def from_fn(cls, mask_fn: MaskFn, q_len: int, kv_len: int | None = None, block: int = 128, *,
                q_offset: int | jax.Array | None = None) -> BlockMask:
        """Any predicate ``mask_fn(q_idx, kv_idx) -> bool`` on absolute int32 positions
        (broadcasting ``[n, 1]`` against ``[1, m]``, or ``[1, n]`` against ``[m, 1]`` in the
        dk/dv kernel: it must be element-wise), written with jnp/operators so it can be traced
        into the kernel. The block lists come from evaluating it on the whole grid
        (O(q_len x kv_len) on the host, in chunks). ``mask_fn`` is compared by identity:
        reuse one function object to share compiled kernels."""
        if not callable(mask_fn):
            raise ValueError(f"mask_fn must be callable (q_idx, kv_idx) -> bool, got {type(mask_fn).__name__}")
        return cls._build(FnPattern(mask_fn), q_len, kv_len, block, q_offset)

    # -- views ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.q_len, self.kv_len

    @property
    def num_blocks(self) -> tuple[int, int]:
        """(query blocks, key blocks) of the lists' grid."""
        return -(-self.q_len // self.block_q), -(-self.kv_len // self.block_k)

    def block_states(self):
        """``[n_q_blocks, n_kv_blocks]`` int8: 0 skipped, 1 partial (masked), 2 full."""
        return self._states

    @property
    def density(self):
        """Fraction of the block grid the kernel visits (full + partial blocks)."""
        nq, nk = self.num_blocks
        return (self._states != EMPTY).sum() / (nq * nk)

    @property
    def visited_blocks(self):
        """Number of (query block, key block) pairs the kernel visits."""
        return (self._states != EMPTY).sum()

    def dense(self) -> jax.Array:
        """The element mask as a bool ``[q_len, kv_len]`` array (for the XLA path and tests)."""
        q = jnp.arange(self.q_len, dtype=jnp.int32) + jnp.asarray(self.q_offset, jnp.int32)
        k = jnp.arange(self.kv_len, dtype=jnp.int32)
        return jnp.broadcast_to(jnp.asarray(self.mask_fn(q[:, None], k[None, :]), bool),
                                (self.q_len, self.kv_len))

    def __repr__(self) -> str:
        dens = self.density
        dens = f"{float(dens):.3f}" if _static_int(self.visited_blocks) is not None else "traced"
        return (f"BlockMask({self.mask_fn!r}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block=({self.block_q}, {self.block_k}), q_offset={self.q_offset!r}, density={dens})")


def _window_blocks(window, block: int) -> int:
    window = _positive("window", window)
    if window % block:
        raise ValueError(f"window must be a multiple of block={block} (it counts whole blocks), "
                         f"got {window}")
    return window // block


def _default_tile(block: int, tile):
    if tile is not None:
        return tile
    return min(128, max(16, block)) if block & (block - 1) == 0 else 128


# ----------------------------------------------------------------------------
# The op.
# ----------------------------------------------------------------------------


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    impl: Literal["auto", "pallas", "mosaic", "xla"] = "auto",
    return_lse: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    score_mod: Callable | None = None,
    score_mod_tables: Sequence[jax.Array] = (),
    sinks: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention restricted to the keys a ``BlockMask`` allows.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (GQA/MQA).
      v: ``[batch, kv_len, kv_heads, v_head_dim]``.
      block_mask: a ``jaxattn.BlockMask`` built for ``(q_len, kv_len)``.
      scale: logit scale, default ``1/sqrt(head_dim)``.
      dropout_rate, dropout_rng: attention dropout, as :func:`jaxattn.attention`.
      impl: ``"pallas"`` (the block-sparse flash kernel; interpret mode without a GPU),
        ``"xla"`` (dense masked softmax), or ``"auto"`` (the kernel on GPU when the head
        dims are in 32..256, else XLA). ``"mosaic"``: the forward on the warp-specialized Mosaic GPU
        kernel (Hopper; as ``jaxattn.attention(impl="mosaic")``, its producer warpgroup walks the
        block lists), the backward on the flash kernels; mask blocks of at least 128 x 128.
      return_lse: also return the log-sum-exp ``[batch, q_len, heads]`` (fp32).
      segment_ids: ``[batch, seq]`` (when ``q_len == kv_len``) or a pair ``(q_ids, kv_ids)``: packed
        sequences, as :func:`jaxattn.attention`'s: on top of the layout, keys only within the query's
        segment (not with ``impl="mosaic"``).
      score_mod: ``(x, batch, head, q_pos, kv_idx) -> x'`` on the scaled logits, as
        :func:`jaxattn.attention`'s, with the layout's absolute query positions (``mask_fn``'s):
        with the ``BlockMask``'s ``mask_fn`` this is FlexAttention's ``score_mod`` + ``mask_mod``
        (not with ``impl="mosaic"``).
      score_mod_tables: arrays ``score_mod`` reads by indexing, after its index arguments (as
        :func:`jaxattn.attention`'s; differentiable).
      sinks: ``[heads]``: attention sinks, as :func:`jaxattn.attention`'s (a learned value-less logit per
        head in every row's softmax; differentiable).

    A query row with no visible key returns zeros (``lse = -inf``, or the sink), never NaN.
    """
    _checks.check_impl(impl, _checks.MOSAIC_IMPLS)
    batch, q_len, kv_len, hq, hkv, d = _checks.check_qkv(q, k, v, (*_checks.FLOAT_DTYPES, jnp.float64))
    if not isinstance(block_mask, BlockMask):
        raise ValueError(f"block_mask must be a jaxattn.BlockMask, got {type(block_mask).__name__}")
    if block_mask.shape != (q_len, kv_len):
        raise ValueError(f"block_mask is built for (q_len, kv_len) = {block_mask.shape}; q and k have "
                         f"q_len={q_len} (q axis 1) and kv_len={kv_len} (k axis 1)")
    scale = _checks.check_scale(scale)
    opts = {}  # segment ids and score_mod, for the kernel or the reference alike
    if segment_ids is not None:
        from jaxattn.ops.attention import _segment_pair

        qs, ks = _segment_pair(segment_ids, batch, q_len, kv_len)
        opts.update(q_segment_ids=qs, kv_segment_ids=ks)
    opts["score_mod"], opts["score_mod_tables"] = _checks.check_score_mod(score_mod, score_mod_tables)
    if sinks is not None:
        opts["sinks"] = _checks.check_sinks(sinks, hq)
    drop = {}
    if _checks.check_dropout(dropout_rate, dropout_rng):
        drop = dict(dropout_rate=float(dropout_rate), dropout_seed=_dropout.seed_from_key(dropout_rng))

    lo, hi = _flash.SUPPORTED_HEAD_DIMS
    dv = v.shape[-1]
    kernel_ok = lo <= d <= hi and lo <= dv <= hi and jnp.dtype(q.dtype) in _checks.FLOAT_DTYPES
    if impl == "pallas":
        if not lo <= d <= hi or not lo <= dv <= hi:
            raise ValueError(f"impl='pallas' supports head dims {lo}..{hi}; got q/k head_dim={d}, "
                             f"v head_dim={dv}")
        _checks.check_float_dtype("q", q)
    kernel = impl in ("pallas", "mosaic") or (impl == "auto" and kernel_ok and _targets_gpu())
    if kernel and not _checks.empty(q, k, v):
        bm = block_mask

        rows = {name: opts.pop(name) for name in ("q_segment_ids", "kv_segment_ids") if name in opts}
        shared = {name: opts.pop(name) for name in list(opts) if _spmd.has_arrays(opts[name])}
        shared.update(kv_index=bm.kv_index, kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks,
                      q_offset=jnp.asarray(bm.q_offset))

        def run(q, k, v, batch_offset=None, **arrays):
            return block_sparse_attention_kernel(
                q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, scale=scale,
                backend="mosaic" if impl == "mosaic" else "triton", **drop, **opts, **arrays)

        # under jaxattn.batch_parallel per device on its batch shard (XLA cannot split a kernel's custom
        # call); not with dropout, whose masks this kernel draws by local batch row
        out, lse = _spmd.per_batch_shard(run, dict(q=q, k=k, v=v, **rows), shared, allowed=not drop)
    else:
        if score_mod is not None:  # (mask_fn's absolute query positions, as the kernel's)
            opts["position_offset"] = (block_mask.q_offset, 0)
        out, lse = attention_reference(q, k, v, scale=scale, mask=block_mask.dense()[None, None], **drop, **opts)
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def power_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block: int = 256,
    window: int | None = None,
    sink: int | None = None,
    q_offset: int | jax.Array | None = None,
    scale: float | None = None,
    impl: Literal["auto", "pallas", "mosaic", "xla"] = "auto",
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """PowerAttention: ``block_sparse_attention`` with ``BlockMask.power(q_len, block, window,
    sink, kv_len=k.shape[1], q_offset=q_offset)`` (window and sink in tokens; defaults
    ``5 * block`` and ``block``)."""
    for name, x in (("q", q), ("k", k)):
        _checks.check_rank(name, x, 4, "[batch, seq, heads, head_dim]")
    mask = BlockMask.power(q.shape[1], block, window, sink, kv_len=k.shape[1], q_offset=q_offset)
    return block_sparse_attention(q, k, v, mask, scale=scale, impl=impl, return_lse=return_lse)
