"""Lightning Attention-2 on Pallas's Triton backend: causal linear attention with
per-head exponential decay, tiled into blocks with an fp32 ``[d, e]`` state.

Forward, per block t (local rows i, columns j, ``lambda = exp(-slope)``):
``O_t = [(Q_t K_t^T) * D] V_t + diag(lambda^(i+1)) Q_t S``, ``D_ij = lambda^(i-j)`` (i >= j),
then ``S <- lambda^B S + (diag(lambda^(B-1-j)) K_t)^T V_t``. ``S`` starts at the initial
state and ends as the final state. Backward: a forward scan for dQ (recomputing
``S``) and a reverse scan over ``G = sum_{later n} lambda^(n - block end) q_n^T dO_n``
for dK, dV and the initial-state gradient. One program per (batch, head, value chunk).
``LightningConfig.forward / backward = "chunked"`` select flash-linear-attention's scheme instead:
scans that only store the per-block states, then one program per (batch, head, block).
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

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class LightningConfig:
    """``block`` rows per step of the scan; the value head dim is split into ``block_e``-wide
    chunks run by separate programs (as the reference kernels do): the ``[d, block_e]`` fp32
    state fits in registers and ``batch * heads * e / block_e`` programs fill the GPU. The
    backward's chunks are ``block_e_bwd`` wide (default ``block_e``): dq and dk sum over the value
    channels, so each chunk writes an fp32 partial that is summed afterwards; wider chunks mean
    fewer partials. ``num_warps_bwd`` (default ``num_warps``): the backward kernels hold two
    ``[d, block_e_bwd]`` fp32 tiles (state and its cotangent) and want more warps than the forward."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_e: int = 64
    block_e_bwd: int | None = None
    num_warps_bwd: int | None = None
    forward: str = "scan"  # or "chunked": see _fwd_chunked
    backward: str = "scan"  # or "chunked": see _bwd_chunked

    def __post_init__(self):
        for name in ("forward", "backward"):
            if getattr(self, name) not in ("scan", "chunked"):
                raise ValueError(f"LightningConfig.{name} must be 'scan' or 'chunked', got {getattr(self, name)!r}")


# (padded max(d, e), bytes per element) -> config.
# Chosen by compiling for sm_90a (`python -m jaxattn.bench compile --families lightning`): every
# entry fits in shared memory (a d=128 state kept whole did not), the two-byte ones spill at most
# ~200 bytes (d=256's dk/dv), the fp32 ones at d <= 128 none (16-row blocks at d=128). The
# backward keeps value chunks wide (fewer fp32 partials of dq and dk to sum).
# d=128 two-byte: 64-row blocks (Hopper's warpgroup MMA wants 64 rows; 32-row blocks fell back to
# mma.sync), 4 warps and 32-wide value chunks in the forward, as the reference kernel runs. The
# H200 run of 2026-12-04 timed the earlier entry (32-row blocks, 8 warps, 16-wide chunks, 1 CTA/SM)
# at 10.7x slower than flash-linear-attention; this one compiles spill-free, all wgmma, 2 CTAs/SM.
# It runs the chunked schemes: on that GPU fla's chunked kernels ran 2.5x faster than OpenNLPLab's
# fused-scan ones for the same attention (not yet timed here: the benchmark times both schemes).
# (2026-12-06, compiled for sm_90a here: the chunked block-gradient kernel holds 210 registers, 254
# before dP was rounded once and dK computed before dV; packed documents (segment_ids) compile
# spill-free on the chunked kernels; on the fused scan at d=128 they spill 44-116 B, as the plain
# scan's dK/dV kernel does at this entry (452 B); elsewhere at most 64 B (d=256 bf16 dK/dV, as plain),
# 4 B (d=32 fp32 dQ) and 320 B (d=256 fp32 forward).)
CONFIGS: dict[tuple[int, int], LightningConfig] = {
    (16, 2): LightningConfig(64, 4, 2, 64), (32, 2): LightningConfig(64, 4, 2, 64),
    (64, 2): LightningConfig(64, 8, 2, 64),
    (128, 2): LightningConfig(64, 4, 2, 32, 64, 8, forward="chunked", backward="chunked"),
    (256, 2): LightningConfig(16, 8, 2, 64),
    (16, 4): LightningConfig(32, 4, 1, 64), (32, 4): LightningConfig(32, 8, 1, 32),
    (64, 4): LightningConfig(32, 8, 1, 16), (128, 4): LightningConfig(16, 8, 1, 16),
    (256, 4): LightningConfig(16, 8, 1, 16),
}
MAX_HEAD_DIM = 256


def lightning_config(head_dim: int, dtype) -> LightningConfig:
    return _common.table_entry(CONFIGS, head_dim, dtype, "lightning")


@dataclasses.dataclass(frozen=True)
class _Static:
    n: int  # true length
    n_pad: int
    block: int
    cfg: LightningConfig
    interpret: bool | None
    precision: object
    # Which state tensors a call moves (each [B, H, d, e] fp32): without an initial state the
    # kernels start from zeros instead of reading them, and no caller wants its cotangent;
    # without a final state nothing writes it and its cotangent (zero) is not read.
    initial: bool = True  # kernels read s0
    initial_grad: bool = True  # the backward writes dS0
    final: bool = True  # the forward writes the final state
    final_grad: bool = True  # the backward reads its cotangent dSf
    # packed sequences: kernels read each row's document index and the previous row's (see _Docs)
    docs: bool = False

    @property
    def n_blocks(self) -> int:
        return self.n_pad // self.block

    @property
    def rem(self) -> int:  # valid rows of the last block
        return self.n - (self.n_blocks - 1) * self.block


def _decay_matrix(s, block: int, transposed: bool = False):
    """``D [block, block]``, ``D[i, j] = lambda^(i - j)`` for ``i >= j``, else 0 (``transposed``: D^T).
    The offsets come from float position vectors (an int -> float conversion per element would
    run at exp2's rate) and the powers from ``exp2`` with ``s log2(e)`` folded in (``exp`` adds a
    range reduction per element)."""
    f = _common.exact_float(jnp.arange(block))  # (no cvt.rn.f32.s32 for each position either)
    diff = f[None, :] - f[:, None] if transposed else f[:, None] - f[None, :]
    return jnp.where(diff >= 0, jnp.exp2((-s * LOG2E) * jnp.maximum(diff, 0.0)), 0.0)


def _decays(s, block: int, rem: int):
    """Decay vectors/matrix for one block holding ``rem`` valid rows."""
    i = jnp.arange(block)
    f = _common.exact_float(i)
    q_dec = jnp.exp(-s * (f + 1.0))  # lambda^(i+1)
    k_dec = jnp.where(i < rem, jnp.exp(-s * jnp.maximum(rem - 1 - f, 0.0)), 0.0)  # lambda^(rem-1-j)
    return q_dec, k_dec, _decay_matrix(s, block), jnp.exp(-s * float(rem))


class _Docs(NamedTuple):
    """fp32 masks of one block of a packed sequence (documents: runs of equal segment ids, indices
    nondecreasing along the rows; the state entering the block belongs to the previous row's
    document, the one leaving it to the last row's). Rows ``[block]`` in: ``entering`` the entering
    state's document, ``start`` the first row's, ``end`` the last row's; ``c``: the rows' documents
    (:func:`_masked_product` keeps the pairs in one document). Scalars: ``fwd_through`` (the entering state's document is the last row's:
    the state survives the block), ``bwd_through`` (one document from the first row to the last: the
    backward's state, which belongs to the last row's document, survives it), ``cont`` (the first row
    continues the previous row's document)."""

    entering: jax.Array
    start: jax.Array
    end: jax.Array
    c: jax.Array
    fwd_through: jax.Array
    bwd_through: jax.Array
    cont: jax.Array


def _doc_masks(c, pv) -> _Docs:
    """:class:`_Docs` from the block's document indices ``c`` and the previous rows' ``pv`` (int32
    ``[block]``; padded rows repeat the last real row's document, so they change no reduction)."""
    entering, start, end = jnp.min(pv), jnp.min(c), jnp.max(c)
    f = lambda m: m.astype(jnp.float32)  # noqa: E731
    return _Docs(f(c == entering), f(c == start), f(c == end), c, f(entering == end), f(start == end),
                 f(start == entering))


def _block_docs(c_ref, pv_ref, rows) -> _Docs | None:
    return None if c_ref is None else _doc_masks(c_ref[rows], pv_ref[rows])


def _fwd_masked(dec, docs: _Docs | None):
    """The forward decays ``(q_dec, k_dec, intra, blk_dec)`` of a block with its document masks: rows
    read the entering state only in its document, only the last document's keys enter the leaving
    state, the state crosses the block only within one document (and :func:`_masked_product` keeps
    rows within their document)."""
    if docs is None:
        return dec
    q_dec, k_dec, intra, blk_dec = dec
    return q_dec * docs.entering, k_dec * docs.end, intra, blk_dec * docs.fwd_through


def _row_scaled_dot(x, w, m, st: "_Static", trans_b: bool = False):
    """``diag(w) x @ m`` (``m`` an fp32 state tile). Two-byte inputs: ``m`` is rounded to the input
    dtype for a tensor-core MMA and the rows are scaled after it (as the reference kernels do);
    fp32: the fp32 product of the pre-scaled rows (fewer live registers there)."""
    if x.dtype == jnp.float32:
        return dot(x * w[:, None], m, trans_b=trans_b, precision=st.precision)
    return dot(x, m.astype(x.dtype), trans_b=trans_b, precision=st.precision) * w[:, None]


def _decayed_outer(acc, x, w, y, st: "_Static"):
    """``acc + (diag(w) x)^T y``: a state (or its cotangent) gaining one block of rows."""
    xd = (x.astype(jnp.float32) * w[:, None]).astype(y.dtype)
    return acc + dot(xd, y, trans_a=True, precision=st.precision)


def _masked_product(a, b, c, mask, st: "_Static", docs: "_Docs | None" = None):
    """``[(a b^T) * mask] c``: the intra-block term (``mask`` the decay matrix or its transpose); with
    ``docs``, only the pairs of rows in one document (compared on the product's elements: no
    ``[block, block]`` mask is kept in registers)."""
    p = _same_document(dot(a, b, trans_b=True, precision=st.precision) * mask, docs)
    return dot(p.astype(c.dtype), c, precision=st.precision)


def _same_document(p, docs: "_Docs | None"):
    """``p [block, block]`` with the pairs of rows in different documents zeroed."""
    return p if docs is None else jnp.where(docs.c[:, None] == docs.c[None, :], p, 0.0)


def _optional_refs(refs, *present: bool):
    """``refs`` split in order, with None for each ref whose flag is False (absent from the call)."""
    refs, out = list(refs), []
    for flag in present:
        out.append(refs.pop(0) if flag else None)
    assert not refs, refs
    return out


def _load_or_zeros(ref, shape):
    """An fp32 state tile from ``ref``, or zeros when the call has no such input."""
    return jnp.zeros(shape, jnp.float32) if ref is None else ref[...]


def _rows(t, block: int):
    """Row slice of block ``t`` (a Python int for the peeled last block, else traced)."""
    start = t * block
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, block), block)


def _fwd_kernel(s_ref, q_ref, k_ref, v_ref, *refs, st: _Static):
    c_ref, pv_ref, s0_ref, o_ref, sf_ref = _optional_refs(refs, st.docs, st.docs, st.initial, True, st.final)
    s = s_ref[...]  # (1,)
    full = _decays(s, st.block, st.block)
    last = _decays(s, st.block, st.rem)

    def body(t, state, dec, update: bool = True):
        rows = _rows(t, st.block)
        docs = _block_docs(c_ref, pv_ref, rows)
        q_dec, k_dec, intra, blk_dec = _fwd_masked(dec, docs)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        o = _masked_product(q, k, v, intra, st, docs) + _row_scaled_dot(q, q_dec, state, st)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return _decayed_outer(state * blk_dec, k, k_dec, v, st) if update else None

    state = _load_or_zeros(s0_ref, (q_ref.shape[-1], v_ref.shape[-1]))
    state = lax.fori_loop(0, st.n_blocks - 1, functools.partial(body, dec=full), state)
    final = body(st.n_blocks - 1, state, last, update=sf_ref is not None)
    if sf_ref is not None:
        sf_ref[...] = final


def _dq_kernel(s_ref, k_ref, v_ref, do_ref, *refs, st: _Static):
    c_ref, pv_ref, s0_ref, dq_ref = _optional_refs(refs, st.docs, st.docs, st.initial, True)
    s = s_ref[...]
    full = _decays(s, st.block, st.block)

    def body(t, state):
        rows = _rows(t, st.block)
        docs = _block_docs(c_ref, pv_ref, rows)
        q_dec, k_dec, intra, blk_dec = _fwd_masked(full, docs)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dq = _masked_product(do, v, k, intra, st, docs) + _row_scaled_dot(do, q_dec, state, st, trans_b=True)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return _decayed_outer(state * blk_dec, k, k_dec, v, st)

    # the state after the last block is never needed here, so every block uses full decays
    lax.fori_loop(0, st.n_blocks, body, _load_or_zeros(s0_ref, (k_ref.shape[-1], v_ref.shape[-1])))


def _bwd_masked(docs: _Docs | None, intra_t, k_w, q_w):
    """The reverse scan's decays of a block with its document masks: the later rows' sum ``G`` (which
    belongs to the block's last document) reaches only that document's keys (``k_w``), and only the
    first document's rows join ``G`` on its way out (``q_w``); ``intra_t`` as it is (see
    :func:`_masked_product`)."""
    if docs is None:
        return intra_t, k_w, q_w
    return intra_t, *(None if x is None else x * m for x, m in ((k_w, docs.end), (q_w, docs.start)))


def _bwd_carry(g, docs: _Docs | None):
    """``G`` leaving a block backwards (toward the previous row's document): kept only if the block
    starts inside that document."""
    return g if docs is None else g * docs.cont


def _dkv_kernel(s_ref, q_ref, k_ref, v_ref, do_ref, *refs, st: _Static):
    c_ref, pv_ref, dsf_ref, dk_ref, dv_ref, ds0_ref = _optional_refs(
        refs, st.docs, st.docs, st.final_grad, True, True, st.initial_grad)
    s = s_ref[...]
    f = jnp.arange(st.block).astype(jnp.float32)
    intra_t0 = _decay_matrix(s, st.block, transposed=True)  # D^T
    q_pow0 = jnp.exp(-s * f)  # lambda^i
    k_pow0 = jnp.exp(-s * (st.block - f))  # lambda^(B-j)
    blk_dec = jnp.exp(-s * float(st.block))
    last = st.n_blocks - 1

    def body(t, g, dsf=None):
        """Block ``t``'s dK, dV from ``G`` (the later blocks' ``sum lambda^(n - block end) q_n^T dO_n``;
        the last block: zeros and the final-state cotangent ``dsf``); returns ``G`` for block t - 1."""
        rows = _rows(t, st.block)
        docs = _block_docs(c_ref, pv_ref, rows)
        intra_t, k_pow, q_pow = _bwd_masked(docs, intra_t0, k_pow0, q_pow0)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        if dsf is not None:  # lambda^(rem-1-j): the final state's weights of the ragged block's keys
            k_dec = _decays(s, st.block, st.rem)[1]
            k_dec = k_dec if docs is None else k_dec * docs.end

        def dv_part():  # intra-block [(Q K^T) * D]^T dO, then later blocks through G (and dSf)
            dv = _masked_product(k, q, do, intra_t, st, docs) + _row_scaled_dot(k, k_pow, g, st)
            if dsf is not None:
                dv += _row_scaled_dot(k, k_dec, dsf, st)
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)

        def dk_part():  # [(dO V^T) * D]^T Q + ...
            dk = _masked_product(v, do, q, intra_t, st, docs) + _row_scaled_dot(v, k_pow, g, st, trans_b=True)
            if dsf is not None:
                dk += _row_scaled_dot(v, k_dec, dsf, st, trans_b=True)
            dk_ref[rows, :] = dk.astype(dk_ref.dtype)

        # Program order sets the live fp32 tiles: two-byte inputs spill none with dV first (d=128:
        # 236 B the other way, as the compile report measured before it ran Triton's TTIR passes),
        # fp32 ones spill least with dK first.
        for part in (dk_part, dv_part) if q.dtype == jnp.float32 else (dv_part, dk_part):
            part()
        acc = g * blk_dec
        if dsf is not None:
            acc += jnp.exp(-s * float(st.rem - 1)) * dsf
        if docs is not None:
            acc *= docs.bwd_through
        return _bwd_carry(_decayed_outer(acc, q, q_pow, do, st), docs)

    g = jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    g = body(last, g, None if dsf_ref is None else dsf_ref[...])
    g = lax.fori_loop(0, last, lambda r, g: body(last - 1 - r, g), g)
    if ds0_ref is not None:
        ds0_ref[...] = jnp.exp(-s) * g  # dS0 = lambda * sum_n lambda^n q_n^T dO_n (+ lambda^N dSf)


# Grids are (batch, heads, value chunks); a chunk is ``be`` wide.
def _specs(st: _Static, *dims: int):
    """Whole-sequence blocks of q/k-like inputs (every chunk reads all ``d`` channels)."""
    return [pl.BlockSpec((None, st.n_pad, None, d), lambda b, h, c: (b, 0, h, 0)) for d in dims]


def _chunk_specs(st: _Static, be: int, count: int = 1):
    """Whole-sequence blocks of one value chunk (v, dO, out, dv)."""
    return [pl.BlockSpec((None, st.n_pad, None, be), lambda b, h, c: (b, 0, h, c)) for _ in range(count)]


def _state_spec(d: int, be: int):
    return pl.BlockSpec((None, None, d, be), lambda b, h, c: (b, h, 0, c))


def _partial_spec(st: _Static, d: int):
    """Per-chunk partial sums ``[chunks, B, N, H, d]`` of dq / dk (summed over chunks outside)."""
    return pl.BlockSpec((None, None, st.n_pad, None, d), lambda b, h, c: (c, b, 0, h, 0))


_SLOPE_SPEC = pl.BlockSpec((1,), lambda b, h, c: (h,))


def _chunk(cfg: LightningConfig, e: int, backward: bool = False) -> tuple[int, int]:
    """(chunk width, chunks) for a padded value head dim ``e`` (both powers of two)."""
    width = (cfg.block_e_bwd or cfg.block_e) if backward else cfg.block_e
    be = min(width, e)
    return be, e // be


def _sum_partials(x: jax.Array, dtype) -> jax.Array:
    return (x[0] if x.shape[0] == 1 else jnp.sum(x, axis=0)).astype(dtype)


def _call(kernel, st: _Static, out_shape, in_specs, out_specs, grid, name, backward: bool = False):
    warps = (st.cfg.num_warps_bwd or st.cfg.num_warps) if backward else st.cfg.num_warps
    return _common.pallas_call(
        functools.partial(kernel, st=st), out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=out_specs, num_warps=warps, num_stages=st.cfg.num_stages,
        interpret=st.interpret, name=name)


def _doc_specs(st: _Static):
    """Whole-sequence document indices (this row's, the previous row's), grid (batch, heads, chunks)."""
    return [pl.BlockSpec((None, st.n_pad), lambda b, h, c: (b, 0))] * (2 * st.docs)


def _block_doc_specs(st: _Static):
    """One block's document indices, grid (batch, heads, blocks)."""
    return [pl.BlockSpec((None, st.block), lambda i, j, t: (i, t))] * (2 * st.docs)


def _fwd(st: _Static, q, k, v, slope, s0, docs=()):
    """Output and final state (None without ``st.final``); ``docs``: () or the int32 document indices
    ``(c, pv) [B, n_pad]`` of a packed sequence (``st.docs``)."""
    if st.cfg.forward == "chunked":
        return _fwd_chunked(st, q, k, v, slope, s0, docs)
    b, _, h, d = q.shape
    e = v.shape[-1]
    be, ne = _chunk(st.cfg, e)
    out = _call(
        _fwd_kernel, st,
        [jax.ShapeDtypeStruct((b, st.n_pad, h, e), q.dtype), *[jax.ShapeDtypeStruct((b, h, d, e), jnp.float32)] * st.final],
        [_SLOPE_SPEC, *_specs(st, d, d), *_chunk_specs(st, be), *_doc_specs(st), *[_state_spec(d, be)] * st.initial],
        [*_chunk_specs(st, be), *[_state_spec(d, be)] * st.final], (b, h, ne),
        "jaxattn_lightning_fwd")(slope, q, k, v, *docs, *_present(s0))
    return out[0], (out[1] if st.final else None)


# ---- Chunked forward (``LightningConfig.forward = "chunked"``) ----------------------------------
# flash-linear-attention's scheme: a scan that only carries the state and stores the state entering
# every block (``[B, H, blocks, d, e]``, in the input dtype for two-byte inputs: the fused scan
# rounds it there for its product anyway), then one independent program per (batch, head, block)
# for ``O_t = [(Q_t K_t^T) * D] V_t + diag(lambda^(i+1)) Q_t S_t`` over the whole value head dim.
# No program waits on another's output, and Q K^T is computed once per block (the fused scan
# recomputes it per value chunk); the cost is writing and reading the states. Either backward
# (``LightningConfig.backward``) differentiates either forward: both compute the same function.


def _states_kernel(s_ref, k_ref, v_ref, *refs, st: _Static, final: bool):
    c_ref, pv_ref, s0_ref, hs_ref, sf_ref = _optional_refs(refs, st.docs, st.docs, st.initial, True, final)
    s = s_ref[...]
    full, last = _decays(s, st.block, st.block), _decays(s, st.block, st.rem)

    def body(t, state, dec, update: bool = True):
        hs_ref[t] = state.astype(hs_ref.dtype)
        rows = _rows(t, st.block)
        _, k_dec, _, blk_dec = _fwd_masked(dec, _block_docs(c_ref, pv_ref, rows))
        return _decayed_outer(state * blk_dec, k_ref[rows, :], k_dec, v_ref[rows, :], st) if update else None

    state = _load_or_zeros(s0_ref, (k_ref.shape[-1], v_ref.shape[-1]))
    state = lax.fori_loop(0, st.n_blocks - 1, functools.partial(body, dec=full), state)
    state = body(st.n_blocks - 1, state, last, update=final)
    if final:
        sf_ref[...] = state


def _block_out_kernel(s_ref, q_ref, k_ref, v_ref, hs_ref, *refs, st: _Static):
    c_ref, pv_ref, o_ref = _optional_refs(refs, st.docs, st.docs, True)
    dec = _decays(s_ref[...], st.block, st.block)  # the last block's rows too
    docs = _block_docs(c_ref, pv_ref, slice(None))
    q_dec, _, intra, _ = _fwd_masked(dec, docs)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    o = _masked_product(q, k, v, intra, st, docs) + _row_scaled_dot(q, q_dec, hs_ref[...], st)
    o_ref[...] = o.astype(o_ref.dtype)


def _all_states(st: _Static, k, v, slope, s0, docs=(), backward: bool = False):
    """(state entering every block ``[B, H, blocks, d, e]``, final state or None: the backward's
    recomputation and a call without ``st.final`` do not write it)."""
    b, _, h, d = k.shape
    e = v.shape[-1]
    be, ne = _chunk(st.cfg, e, backward=backward)
    nb = st.n_blocks
    final = st.final and not backward
    out = _call(
        functools.partial(_states_kernel, final=final), st,
        [jax.ShapeDtypeStruct((b, h, nb, d, e), _state_dtype(k)),
         *[jax.ShapeDtypeStruct((b, h, d, e), jnp.float32)] * final],
        [_SLOPE_SPEC, *_specs(st, d), *_chunk_specs(st, be), *_doc_specs(st), *[_state_spec(d, be)] * st.initial],
        [_all_states_spec(nb, d, be), *[_state_spec(d, be)] * final],
        (b, h, ne), "jaxattn_lightning_states_all", backward=backward)(slope, k, v, *docs, *_present(s0))
    return out[0], (out[1] if final else None)


def _present(*xs):
    """The arrays among ``xs`` that are not None (a kernel's optional inputs, in order)."""
    return [x for x in xs if x is not None]


def _state_dtype(x):  # stored states: the input dtype (two-byte products round them there anyway)
    return jnp.float32 if x.dtype == jnp.float32 else x.dtype


def _all_states_spec(nb: int, d: int, be: int):
    return pl.BlockSpec((None, None, nb, d, be), lambda i, j, c: (i, j, 0, 0, c))


def _row_block(st: _Static, width: int):  # one block of rows, grid (batch, head, block)
    return pl.BlockSpec((None, st.block, None, width), lambda i, j, t: (i, t, j, 0))


def _block_state_spec(d: int, e: int):
    return pl.BlockSpec((None, None, None, d, e), lambda i, j, t: (i, j, t, 0, 0))


def _fwd_chunked(st: _Static, q, k, v, slope, s0, docs=()):
    b, _, h, d = q.shape
    e = v.shape[-1]
    hs, final = _all_states(st, k, v, slope, s0, docs)
    (out,) = _call(
        _block_out_kernel, st, [jax.ShapeDtypeStruct((b, st.n_pad, h, e), q.dtype)],
        [_SLOPE_SPEC, _row_block(st, d), _row_block(st, d), _row_block(st, e), _block_state_spec(d, e),
         *_block_doc_specs(st)],
        [_row_block(st, e)], (b, h, st.n_blocks), "jaxattn_lightning_block_out")(slope, q, k, v, hs, *docs)
    return out, final


# Chunked backward (``LightningConfig.backward = "chunked"``): the forward's block states again,
# a reverse scan that stores ``G_t = sum_{later n} lam^(n - end of block t) q_n^T dO_n`` for every
# block (the last block's slot holds the final-state cotangent, which reaches its rows with the
# ragged block's decays), then one program per (batch, head, block) for its dQ, dK and dV over the
# whole head dims: no fp32 partials over value chunks, no waiting on other blocks.


def _dstates_kernel(s_ref, q_ref, do_ref, *refs, st: _Static):
    c_ref, pv_ref, dsf_ref, gs_ref, ds0_ref = _optional_refs(
        refs, st.docs, st.docs, st.final_grad, True, st.initial_grad)
    s = s_ref[...]
    q_pow0 = jnp.exp(-s * jnp.arange(st.block).astype(jnp.float32))  # lambda^i
    blk_dec = jnp.exp(-s * float(st.block))
    last = st.n_blocks - 1
    dsf = _load_or_zeros(dsf_ref, (q_ref.shape[-1], do_ref.shape[-1]))
    gs_ref[last] = dsf.astype(gs_ref.dtype)

    def update(t, acc):  # acc: G entering the block, decayed to its first row
        rows = _rows(t, st.block)
        docs = _block_docs(c_ref, pv_ref, rows)
        q_pow = _bwd_masked(docs, None, None, q_pow0)[2]
        if docs is not None:
            acc *= docs.bwd_through
        return _bwd_carry(_decayed_outer(acc, q_ref[rows, :], q_pow, do_ref[rows, :], st), docs)

    def body(r, g):
        t = last - 1 - r
        gs_ref[t] = g.astype(gs_ref.dtype)
        return update(t, g * blk_dec)

    acc = jnp.zeros(dsf.shape, jnp.float32)
    if dsf_ref is not None:
        acc = jnp.exp(-s * float(st.rem - 1)) * dsf
    g = update(last, acc)
    g = lax.fori_loop(0, last, body, g)
    if ds0_ref is not None:
        ds0_ref[...] = jnp.exp(-s) * g


def _block_grad_kernel(s_ref, q_ref, k_ref, v_ref, do_ref, hs_ref, gs_ref, *refs, st: _Static):
    c_ref, pv_ref, dq_ref, dk_ref, dv_ref = _optional_refs(refs, st.docs, st.docs, True, True, True)
    is_last = pl.program_id(2) == st.n_blocks - 1
    s = s_ref[...]
    docs = _block_docs(c_ref, pv_ref, slice(None))
    q_dec, _, intra, _ = _fwd_masked(_decays(s, st.block, st.block), docs)
    k_last = _decays(s, st.block, st.rem)[1]
    k_pow = jnp.exp(-s * (st.block - jnp.arange(st.block).astype(jnp.float32)))  # lambda^(B-j)
    w = jnp.where(is_last, k_last, k_pow)  # the last block's G slot holds dSf
    intra_t = _decay_matrix(s, st.block, transposed=True)  # (computed, not a register transpose)
    intra_t, w, _ = _bwd_masked(docs, intra_t, w, None)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    g = gs_ref[...]
    # dP in the input dtype once, for dQ and (transposed) dK, and dK before dV: dP's tile is dead before
    # dV's P^T tile is made
    dp = _same_document(dot(do, v, trans_b=True, precision=st.precision) * intra, docs).astype(k.dtype)
    dq = dot(dp, k, precision=st.precision)
    dq_ref[...] = (dq + _row_scaled_dot(do, q_dec, hs_ref[...], st, trans_b=True)).astype(dq_ref.dtype)
    dk = dot(dp.T, q, precision=st.precision)
    dk_ref[...] = (dk + _row_scaled_dot(v, w, g, st, trans_b=True)).astype(dk_ref.dtype)
    dv = _masked_product(k, q, do, intra_t, st, docs) + _row_scaled_dot(k, w, g, st)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_chunked(st: _Static, q, k, v, slope, s0, do, dsf, docs=()):
    b, _, h, d = q.shape
    e = v.shape[-1]
    be, ne = _chunk(st.cfg, e, backward=True)
    nb = st.n_blocks
    hs, _ = _all_states(st, k, v, slope, s0, docs, backward=True)
    gs, *ds0 = _call(
        _dstates_kernel, st,
        [jax.ShapeDtypeStruct((b, h, nb, d, e), _state_dtype(q)),
         *[jax.ShapeDtypeStruct((b, h, d, e), jnp.float32)] * st.initial_grad],
        [_SLOPE_SPEC, *_specs(st, d), *_chunk_specs(st, be), *_doc_specs(st), *[_state_spec(d, be)] * st.final_grad],
        [_all_states_spec(nb, d, be), *[_state_spec(d, be)] * st.initial_grad], (b, h, ne),
        "jaxattn_lightning_dstates_all", backward=True)(slope, q, do, *docs, *_present(dsf))
    rows_d, rows_e = _row_block(st, d), _row_block(st, e)
    return (*_call(
        _block_grad_kernel, st,
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [_SLOPE_SPEC, rows_d, rows_d, rows_e, rows_e, _block_state_spec(d, e), _block_state_spec(d, e),
         *_block_doc_specs(st)],
        [rows_d, rows_d, rows_e], (b, h, nb), "jaxattn_lightning_block_grad",
        backward=True)(slope, q, k, v, do, hs, gs, *docs), ds0[0] if ds0 else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(st: _Static, q, k, v, slope, s0, c, pv):
    return _fwd(st, q, k, v, slope, s0, _present(c, pv))


def _lightning_fwd(st, q, k, v, slope, s0, c, pv):
    return _fwd(st, q, k, v, slope, s0, _present(c, pv)), (q, k, v, slope, s0, c, pv)


def _bwd(st: _Static, q, k, v, slope, s0, do, dsf, docs=()):
    """dq, dk, dv and the initial-state cotangent of one kernel call (dO, final-state cotangent)."""
    if st.cfg.backward == "chunked":
        return _bwd_chunked(st, q, k, v, slope, s0, do, dsf, docs)
    b, _, h, d = q.shape
    e = v.shape[-1]
    be, ne = _chunk(st.cfg, e, backward=True)
    # dq and dk sum over the value channels: one partial per chunk (fp32 when there are several).
    part = jax.ShapeDtypeStruct((ne, *q.shape), q.dtype if ne == 1 else jnp.float32)
    (dq,) = _call(_dq_kernel, st, [part],
                  [_SLOPE_SPEC, *_specs(st, d), *_chunk_specs(st, be, 2), *_doc_specs(st),
                   *[_state_spec(d, be)] * st.initial],
                  [_partial_spec(st, d)], (b, h, ne), "jaxattn_lightning_dq",
                  backward=True)(slope, k, v, do, *docs, *_present(s0))
    dk, dv, *ds0 = _call(
        _dkv_kernel, st,
        [part, jax.ShapeDtypeStruct(v.shape, v.dtype),
         *[jax.ShapeDtypeStruct((b, h, d, e), jnp.float32)] * st.initial_grad],
        [_SLOPE_SPEC, *_specs(st, d, d), *_chunk_specs(st, be, 2), *_doc_specs(st),
         *[_state_spec(d, be)] * st.final_grad],
        [_partial_spec(st, d), *_chunk_specs(st, be), *[_state_spec(d, be)] * st.initial_grad], (b, h, ne),
        "jaxattn_lightning_dkv", backward=True)(slope, q, k, v, do, *docs, *_present(dsf))
    return _sum_partials(dq, q.dtype), _sum_partials(dk, k.dtype), dv, (ds0[0] if ds0 else None)


def _lightning_bwd(st, res, cts):
    q, k, v, slope, s0, c, pv = res
    do, dsf = cts
    dsf = dsf.astype(jnp.float32) if st.final_grad else None
    dq, dk, dv, ds0 = _bwd(st, q, k, v, slope, s0, do.astype(q.dtype), dsf, _present(c, pv))
    # No gradient for the decay rates (fixed ALiBi-style schedules in TNL) or the document indices.
    return dq, dk, dv, None, ds0, None, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# ---- Segments: sequence parallelism inside one call -------------------------------------------
# A program scans its whole sequence, so long sequences with few batch x heads leave most of the
# GPU idle (S = 64k, batch 1, 16 heads: 32 backward programs for 132 SMs). Splitting the sequence
# into P segments of L rows multiplies the programs by P at the cost of one extra read of two
# inputs per pass (the segments' states: a small kernel, ``_outer_kernel``; the scans over
# segments: XLA on [B, P, H, d, e]):
#   forward   Sloc[p] = sum_t lam^(end_p - t) k_t^T v_t  (segment p's own state)
#             s_in[p] = lam^(L p) S0 + sum_{j<p} lam^(L (p-1-j)) Sloc[j]
#             then the kernel runs every segment from its s_in;
#   backward  ds_in[p] = sum_t lam^(t+1) q_t^T dO_t (+ lam^rem dSf for the last segment),
#             dSloc[j] = sum_{p>j} lam^(L (p-1-j)) ds_in[p] enters the kernel as the segment's
#             final-state cotangent (which routes it to dk and dv), dS0 = sum_p lam^(L p) ds_in[p].
SEGMENT_PROGRAMS = 512  # split while batch x heads x backward chunks is below this ...
MIN_SEGMENT = 1024  # ... and segments stay at least this long


def segment_count(batch: int, heads: int, n: int, cfg: LightningConfig, e: int) -> int:
    """Segments for a sequence of ``n`` rows: enough for ``SEGMENT_PROGRAMS`` backward programs."""
    ne = _chunk(cfg, max(16, _common.next_pow2(e)), backward=True)[1]
    want = -(-SEGMENT_PROGRAMS // (batch * heads * ne))
    return max(1, min(want, n // MIN_SEGMENT))


@dataclasses.dataclass(frozen=True)
class _Seg:
    st: _Static  # one segment's kernel statics (n = n_pad = L)
    n: int  # true sequence length
    segments: int
    final_state: bool = True  # False: the caller drops the final state (its cotangent is zero)
    initial: bool = True  # False: no initial state (zero), and no cotangent for it

    @property
    def rem(self) -> int:  # real rows of the last segment
        return self.n - (self.segments - 1) * self.st.n_pad


def _pow(slope, exps):
    """``lam^exps`` per head: ``exps [...]`` -> ``[..., heads]``."""
    return jnp.exp(-slope * jnp.asarray(exps, jnp.float32)[..., None])


def _carry(sg: _Seg, slope, ends=None):
    """``W[p, j] = [j < p] lam^(L (p-1-j))`` -> ``[P, P, heads]`` (``[B, P, P, heads]`` with the
    segments' last documents ``ends [B, P]``: own state j reaches segment p only if segment p - 1
    ends in its document)."""
    i = jnp.arange(sg.segments)
    gap = i[:, None] - 1 - i[None, :]
    w = jnp.where((gap >= 0)[..., None], _pow(slope, sg.st.n_pad * jnp.maximum(gap, 0)), 0.0)
    if ends is None:
        return w
    before = jnp.concatenate([ends[:, :1], ends[:, :-1]], axis=1)  # segment p - 1's last document
    return w[None] * (ends[:, None, :] == before[:, :, None])[..., None]


def _outer_kernel(s_ref, x_ref, y_ref, *refs, st: _Static, segments: int, n: int, from_end: bool):
    """``sum_t lam^(e_t) x_t^T y_t`` over one segment: ``e_t = end - t`` (its own state; ``end``
    the segment's last real row) or ``e_t = t + 1`` (the cotangent of its incoming state). A packed
    sequence's rows count only in the document ``tgt`` (the segment's last one, or the previous
    row's at its start)."""
    c_ref, tgt_ref, o_ref = _optional_refs(refs, st.docs, st.docs, True)
    s = s_ref[...]
    if from_end:
        p = lax.rem(pl.program_id(0), segments)
        end = (jnp.minimum((p + 1) * st.n_pad, n) - 1 - p * st.n_pad).astype(jnp.float32)

    def body(t, acc):
        rows = _rows(t, st.block)
        i = (t * st.block + jnp.arange(st.block)).astype(jnp.float32)
        w = jnp.exp(-s * (jnp.maximum(end - i, 0.0) if from_end else i + 1.0))
        if c_ref is not None:
            w = jnp.where(c_ref[rows] == tgt_ref[rows], w, 0.0)
        return _decayed_outer(acc, x_ref[rows, :], w, y_ref[rows, :], st)

    o_ref[...] = lax.fori_loop(0, st.n_blocks, body, jnp.zeros(o_ref.shape, jnp.float32))


def _seg_outer(sg: _Seg, x, y, slope, from_end: bool, docs=()):
    """:func:`_outer_kernel` for every (segment, head, value chunk): ``[B, P, H, d, e]`` fp32;
    ``docs``: () or the rows' documents and each row's target document ``(c, tgt) [B, n_pad]``."""
    x, y, *docs = _seg_kernel_args(sg, x, y, *docs)
    bp, _, h, d = x.shape
    e = y.shape[-1]
    be, ne = _chunk(sg.st.cfg, e)
    kernel = functools.partial(_outer_kernel, segments=sg.segments, n=sg.n, from_end=from_end)
    (out,) = _call(kernel, sg.st, [jax.ShapeDtypeStruct((bp, h, d, e), jnp.float32)],
                   [_SLOPE_SPEC, *_specs(sg.st, d), *_chunk_specs(sg.st, be), *_doc_specs(sg.st)],
                   [_state_spec(d, be)], (bp, h, ne), "jaxattn_lightning_states")(slope, x, y, *docs)
    return out.reshape(bp // sg.segments, sg.segments, h, d, e)


def _seg_view(x, sg: _Seg):
    return x.reshape(x.shape[0], sg.segments, sg.st.n_pad, *x.shape[2:])


def _flat(x):  # [B, P, ...] -> [B * P, ...]
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class _SegDocs(NamedTuple):
    """A packed sequence's documents per segment: ``ends [B, P]`` (each segment's last row's), ``entering
    [B, P]`` (the row before its first: the incoming state's), and per row ``[B, n_pad]`` the targets of
    :func:`_outer_kernel` (its segment's end, its segment's entering document)."""

    c: jax.Array
    pv: jax.Array
    ends: jax.Array
    entering: jax.Array

    def rows(self, sg: _Seg, per_segment: jax.Array) -> jax.Array:
        return jnp.repeat(per_segment, sg.st.n_pad, axis=1)


def _seg_docs(sg: _Seg, c, pv) -> _SegDocs | None:
    if c is None:
        return None
    return _SegDocs(c, pv, _seg_view(c, sg).max(axis=2), _seg_view(pv, sg).min(axis=2))


def _same(a, b):  # [B, ...] masks as fp32 per (batch, segment), broadcast over heads and the state
    return (a == b).astype(jnp.float32)[..., None, None, None]


def _seg_inputs(sg: _Seg, q, k, v, slope, s0, docs: _SegDocs | None = None):
    """(s_in [B, P, H, d, e], final state) from the segments' own states."""
    p, length = sg.segments, sg.st.n_pad
    own = _seg_outer(sg, k, v, slope, True, () if docs is None else (docs.c, docs.rows(sg, docs.ends)))
    hp = lax.Precision.HIGHEST
    if docs is None:
        s_in = jnp.einsum("pjh,bjhde->bphde", _carry(sg, slope), own, precision=hp)
    else:
        s_in = jnp.einsum("bpjh,bjhde->bphde", _carry(sg, slope, docs.ends), own, precision=hp)
    if s0 is not None:
        s0_in = _pow(slope, length * jnp.arange(p))[None, :, :, None, None] * s0[:, None]
        s_in += s0_in if docs is None else s0_in * _same(docs.entering, docs.c[:, :1])
    last = _pow(slope, sg.rem)[None, :, None, None] * s_in[:, -1]
    if docs is not None:  # (the incoming state crosses the last segment within one document only)
        last *= _same(docs.entering[:, -1], docs.ends[:, -1])
    return s_in, last + own[:, -1]


def _seg_kernel_args(sg: _Seg, *xs):
    return [_flat(_seg_view(x, sg)) for x in xs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _segmented(sg: _Seg, q, k, v, slope, s0, c, pv):
    return _segmented_fwd(sg, q, k, v, slope, s0, c, pv)[0]


def _segmented_fwd(sg: _Seg, q, k, v, slope, s0, c, pv):
    s_in, final = _seg_inputs(sg, q, k, v, slope, s0, _seg_docs(sg, c, pv))
    docs = _seg_kernel_args(sg, *_present(c, pv))
    out, _ = _fwd(sg.st, *_seg_kernel_args(sg, q, k, v), slope, _flat(s_in), docs)  # (sg.st.final is False)
    return (out.reshape(v.shape), final), (q, k, v, slope, s_in, c, pv)


def _segmented_bwd(sg: _Seg, res, cts):
    q, k, v, slope, s_in, c, pv = res
    docs = _seg_docs(sg, c, pv)
    do, dsf = cts
    do, dsf = do.astype(q.dtype), dsf.astype(jnp.float32)
    p, length = sg.segments, sg.st.n_pad
    hp = lax.Precision.HIGHEST
    ds_in = _seg_outer(sg, q, do, slope, False, () if docs is None else (c, docs.rows(sg, docs.entering)))
    if sg.final_state:
        through = _pow(slope, sg.rem)[None, :, None, None] * dsf
        if docs is not None:
            through *= _same(docs.entering[:, -1], docs.ends[:, -1])
        ds_in = ds_in.at[:, -1].add(through)
    if docs is None:
        ds_own = jnp.einsum("pjh,bphde->bjhde", _carry(sg, slope), ds_in, precision=hp)  # last one: 0
    else:
        ds_own = jnp.einsum("bpjh,bphde->bjhde", _carry(sg, slope, docs.ends), ds_in, precision=hp)
    ds0 = None
    if sg.initial:
        to_s0 = ds_in if docs is None else ds_in * _same(docs.entering, c[:, :1])
        ds0 = jnp.einsum("ph,bphde->bhde", _pow(slope, length * jnp.arange(p)), to_s0, precision=hp)
    dq, dk, dv, _ = _bwd(sg.st, *_seg_kernel_args(sg, q, k, v), slope, _flat(s_in),
                         *_seg_kernel_args(sg, do), _flat(ds_own), _seg_kernel_args(sg, *_present(c, pv)))
    dq, dk, dv = dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    if not sg.final_state:  # (else two einsums over the last segment and two copies of dk, dv)
        return dq, dk, dv, None, ds0, None, None
    # dSf through the last segment's own state (its real rows end at n - 1, not at the padded end)
    last = slice((p - 1) * length, None)
    t = jnp.arange((p - 1) * length, p * length)
    w = jnp.where((t < sg.n)[:, None], _pow(slope, jnp.maximum(sg.n - 1 - t, 0)), 0.0)[None, :, :, None]
    if docs is not None:  # (the final state holds the last document's keys only)
        w = w * (c[:, last] == c[:, -1:])[:, :, None, None]
    dk_last = w * jnp.einsum("blhe,bhde->blhd", v[:, last].astype(jnp.float32), dsf, precision=hp)
    dv_last = w * jnp.einsum("blhd,bhde->blhe", k[:, last].astype(jnp.float32), dsf, precision=hp)
    dk = dk.at[:, last].add(dk_last.astype(dk.dtype))
    dv = dv.at[:, last].add(dv_last.astype(dv.dtype))
    return dq, dk, dv, None, ds0, None, None


_segmented.defvjp(_segmented_fwd, _segmented_bwd)


def lightning_attention_kernel(
    q: jax.Array, k: jax.Array, v: jax.Array, slope: jax.Array,
    initial_state: jax.Array | None = None, *,
    config: LightningConfig | None = None, interpret: bool | None = None, segments: int | None = None,
    final_state: bool = True, segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Kernel entry on validated inputs: q, k ``[B, N, H, d]``, v ``[B, N, H, e]``,
    slope ``[H]`` (>= 0), initial_state ``[B, H, d, e]`` or None, segment_ids int ``[B, N]`` or None
    (a packed sequence: :func:`_common.document_index`; the initial state belongs to the first document, the
    final state is the last one's).
    ``segments``: split the sequence into that many segments run in parallel (default
    :func:`segment_count`: only long sequences with few batch x heads are split).
    Returns ``out [B, N, H, e]`` (input dtype) and the final state (fp32), or None with
    ``final_state=False`` (the backward then skips the final state's terms)."""
    b, n, h, d = q.shape
    e = v.shape[-1]
    cfg = config or lightning_config(max(d, e), q.dtype)
    if segments is None:
        segments = segment_count(b, h, n, cfg, e)
    if not 1 <= segments <= n:
        raise ValueError(f"segments must be in [1, seq] = [1, {n}], got {segments}")
    length = -(-n // segments)  # rows per segment
    block = min(cfg.block, max(16, _common.next_pow2(length)))
    length = _common.round_up(length, block)
    segments = -(-n // length)  # the last segment holds 1..length real rows
    n_pad = segments * length
    d_pad, e_pad = max(16, _common.next_pow2(d)), max(16, _common.next_pow2(e))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    pad = lambda x, dim: _common.pad_axis(_common.pad_axis(x, 1, n_pad), 3, dim)  # noqa: E731
    s0 = None  # no initial state: the kernels start from zeros (none are materialized)
    if initial_state is not None:
        s0 = jnp.pad(initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, d_pad - d), (0, e_pad - e)))
    c = pv = None
    if segment_ids is not None:  # padded rows repeat the last document
        c = jnp.pad(_common.document_index(segment_ids), ((0, 0), (0, n_pad - n)), mode="edge")
        pv = jnp.concatenate([c[:, :1], c[:, :-1]], axis=1)
    args = (pad(q, d_pad), pad(k, d_pad), pad(v, e_pad), slope.astype(jnp.float32), s0, c, pv)
    docs = segment_ids is not None
    if segments == 1:
        given = s0 is not None
        st = _Static(n=n, n_pad=n_pad, block=block, cfg=cfg, interpret=interpret, precision=precision,
                     initial=given, initial_grad=given, final=final_state, final_grad=final_state, docs=docs)
        out, state = _lightning(st, *args)
    else:  # each segment starts from its s_in; the segments' own states and dS0 come from XLA
        st = _Static(n=length, n_pad=length, block=block, cfg=cfg, interpret=interpret, precision=precision,
                     initial=True, initial_grad=False, final=False, final_grad=True, docs=docs)
        out, state = _segmented(_Seg(st, n, segments, final_state, s0 is not None), *args)
    return out[:, :n, :, :e], (state[:, :, :d, :e] if final_state else None)

