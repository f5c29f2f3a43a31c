"""HaloNet blocked local attention on Pallas's Triton backend.

One program per (query block, batch, head), on the NHWC maps themselves. It gathers its query rows
and its ``win x win`` key/value window (``win = block + 2 halo``)
from the maps by row/column index vectors, and stores its output rows into the output map (rows
padded to a power of two are idle: loads clamp them, stores mask them). Window key ``j`` is row
``jy = j // TW``, column ``jx = j % TW`` of a ``TW``-wide tile (``TW = next_pow2(win)``); keys are
clamped into the image and zeroed outside it (timm's zero padding without a padded copy, and
without the ``(win / block)^2``-times larger unfolded windows).
The relative-position logits ``A[.., jy] = q . R_h[jy - iy + win - 1]``,
``B[.., jx] = q . R_w[jx - ix + win - 1]`` come from the wrapper's skewed tables
``tab[0][iy, t] = R_h[t - iy + win - 1]``, ``tab[1][ix, t] = R_w[..]`` (``[QB * T, d]`` each):
the kernel projects its rows on a whole table in one dot and keeps, per row, the slice of its
own in-block offset (a mask and a one-hot selection dot), so ``[A | B]`` never goes through HBM.
It adds them as a second tensor-core dot, ``s = scale q k^T + [A | B] E^T``, with ``E`` the
one-hot map from key ``j`` to its row and column (built in-kernel from iotas), masked softmax
over the window, ``p v``; the dq kernel also takes q's part of ``d[A | B] = ds E`` back through
the tables (:func:`rel_logits_grad_q`) and writes ``d[A | B]``, from which a small kernel sums
the tables' cotangent over the query blocks (no transposed copies of q for XLA's batched dots).
The forward and the dq kernel walk the window in chunks of ``key_chunk`` keys (whole tile rows; an
online softmax in the forward; dq recomputes ``p`` from the saved log-sum-exp), so the live fp32
tiles are ``[R, key_chunk]``. dk and dv come from a second backward kernel, one program per key
block: it visits the query blocks whose windows hold its keys (``(2 ceil(halo / block) + 1)^2`` of
them, 9 for HaloNet's block 8, halo 3) and writes its rows of the dk, dv maps once, so no
per-window copies (``(win / block)^2`` times the map) go through HBM and nothing is summed after.
``HaloConfig(backward="windows")`` keeps the earlier scheme: the dq kernel writes each window's dk,
dv and :func:`fold_windows` adds the overlapping windows back onto the maps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot

LOG2E = math.log2(math.e)


KEY_CHUNK = 64  # window keys per step of the kernels' key loop


@dataclasses.dataclass(frozen=True)
class HaloConfig:
    """Launch parameters of the kernels (``num_warps`` None: 8 from head dim 128, else 4) and the
    backward scheme: ``"keys"`` (a dk/dv kernel per key block over the query blocks that see it) or
    ``"windows"`` (the dq kernel also writes each window's dk, dv, which :func:`fold_windows` sums
    onto the maps: (win / block)^2 times the map's bytes written and read again, for ~2.5x fewer
    tensor-core products; which is faster is for a GPU to say: ``bench halo`` times both)."""

    key_chunk: int = KEY_CHUNK
    num_warps: int | None = None
    num_stages: int = 2
    backward: str = "keys"

    def __post_init__(self):
        if self.backward not in ("keys", "windows"):
            raise ValueError(f"HaloConfig.backward must be 'keys' or 'windows', got {self.backward!r}")


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    block: int  # key block side (the query block is block // stride)
    halo: int
    win: int  # block + 2 halo
    tile: int  # TW: window columns per tile row (power of two >= win); also T, the width of A and B
    qblock: int  # query block side (block // stride)
    qpow: int  # QB: rows per skewed table (power of two >= qblock)
    rel_scale: float  # factor on [A | B] (the logit scale with scale_pos_embed, else 1)
    rows: int  # R: query rows per program (power of two >= qblock^2; rows past it are idle)
    key_rows: int  # KB: key rows per dk/dv program (power of two >= block^2)
    height: int  # key map size
    width: int
    blocks_x: int  # query blocks per row
    key_chunk: int  # window keys per step: key_chunk // tile whole tile rows
    chunks: int
    mask_padding: bool
    windows: bool  # the "windows" backward scheme
    packed: bool  # k and v are the halves of one [B, H, W, heads, 2d] map (read and differentiated in place)
    num_warps: int
    num_stages: int
    interpret: bool | None
    precision: object


def _origin(st: _Static):
    """Block row and column of this program's query block."""
    n = pl.program_id(0)
    return n // st.blocks_x, n % st.blocks_x


def _queries(st: _Static, origin, ref):
    """Index vectors ``[R, 1]`` and ``[1, c]`` of the block's query rows in a ``[Hq, Wq, c]`` map
    ref for loads (clamped), for stores (idle rows out of bounds; stores also mask them), and the
    ``[R, 1]`` mask of real rows."""
    i = lax.broadcasted_iota(jnp.int32, (st.rows, 1), 0)
    y, x = origin[0] * st.qblock + i // st.qblock, origin[1] * st.qblock + i % st.qblock
    real = i < st.qblock * st.qblock
    col = lax.broadcasted_iota(jnp.int32, (1, ref.shape[-1]), 1)
    load = (jnp.minimum(y, ref.shape[-3] - 1), jnp.minimum(x, ref.shape[-2] - 1), col)
    return load, (jnp.where(real, y, ref.shape[-3]), x, col), real


def _load_rows(st: _Static, origin, ref, image=None):
    """The block's query rows of a map ref (``[Hq, Wq, c]``, or ``[B, Hq, Wq, c]`` read at
    ``image``); idle rows read as zero."""
    idx, _, real = _queries(st, origin, ref)
    if image is not None:  # (one gather: a Triton ref takes a single indexer)
        idx = (jnp.full(idx[0].shape, image, jnp.int32), *idx)
    t = ref[idx]
    return jnp.where(real, t, jnp.zeros_like(t))


def _store_rows(st: _Static, origin, ref, value):
    _, idx, real = _queries(st, origin, ref)
    pltriton.store(ref.at[idx], value.astype(ref.dtype), mask=jnp.broadcast_to(real, value.shape))


def _window(st: _Static, origin, c):
    """Key chunk ``c`` of the window at ``origin``: map rows and columns (clamped), whether each key
    lies in the image, whether it takes part in the softmax, and its one-hot relative map."""
    j = c * st.key_chunk + lax.broadcasted_iota(jnp.int32, (st.key_chunk,), 0)
    jy, jx = j // st.tile, j % st.tile
    y, x = origin[0] * st.block - st.halo + jy, origin[1] * st.block - st.halo + jx
    inside = (y >= 0) & (y < st.height) & (x >= 0) & (x < st.width)
    in_window = (jy < st.win) & (jx < st.win)
    valid = in_window & inside if st.mask_padding else in_window
    col = lax.broadcasted_iota(jnp.int32, (st.key_chunk, 2 * st.tile), 1)
    emap = (col == jy[:, None]) | (col == st.tile + jx[:, None])  # keys past the window are masked
    return jnp.clip(y, 0, st.height - 1), jnp.clip(x, 0, st.width - 1), inside, valid, emap


def _load(ref, y, x, inside):
    """Window rows of a ``[H, W, d]`` map ref; keys outside the image read as zero."""
    t = ref[y, x, :]
    return jnp.where(inside[:, None], t, jnp.zeros_like(t))


def rel_logits(st: _Static, q, tab_ref):
    """``[A | B]`` (``[R, 2T]``, q's dtype) of the block's query rows: row ``i`` at in-block
    offset ``(iy, ix)`` reads table rows ``iy`` (A) and ``ix`` (B). Per table, one dot projects
    the rows on all ``QB`` offsets; a mask keeps each row's own ``T`` columns, and a one-hot dot
    moves them to ``[A | B]``'s columns (values in q's dtype, as the exact selection of the
    rounded projections)."""
    ab = None
    for half, own_columns, sel in _rel_selection(st, q.shape[0], q.dtype):
        proj = dot(q, tab_ref[half], trans_b=True, precision=st.precision) * st.rel_scale  # [R, QB T]
        own = jnp.where(own_columns, proj, 0.0).astype(q.dtype)
        part = dot(own, sel, precision=st.precision)
        ab = part if ab is None else ab + part
    return ab.astype(q.dtype)


def rel_logits_grad_q(st: _Static, dab, tab_ref):
    """q's cotangent through :func:`rel_logits` (``[R, d]`` fp32) from ``d[A | B]`` (``[R, 2T]``,
    q's dtype): the selection dot transposed spreads each row's ``T`` columns back to its own
    offset's slice of the ``[R, QB T]`` projection, which the table maps back to ``d`` channels."""
    dq = None
    for half, own_columns, sel in _rel_selection(st, dab.shape[0], dab.dtype):
        part = dot(_spread_back(st, dab, own_columns, sel), tab_ref[half], precision=st.precision)
        dq = part if dq is None else dq + part
    return dq * st.rel_scale


def _spread_back(st: _Static, dab, own_columns, sel):
    """``d[A | B]`` (``[R, 2T]``) back onto one table's ``[R, QB T]`` projection: the selection dot
    transposed, each row kept to its own offset's columns (in ``dab``'s dtype)."""
    return jnp.where(own_columns, dot(dab, sel, trans_b=True, precision=st.precision), 0.0).astype(dab.dtype)


def _rel_selection(st: _Static, rows: int, dtype):
    """Per table (``half`` 0: rows' in-block row offsets ``iy`` against ``R_h``, 1: ``ix``, ``R_w``):
    which of the ``[R, QB T]`` projection's columns are row ``i``'s own (``[R, QB T]`` bool) and
    the one-hot ``[QB T, 2T]`` map from them to ``[A | B]``'s columns."""
    width = st.qpow * st.tile
    i = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    c = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    sc = lax.broadcasted_iota(jnp.int32, (width, 2 * st.tile), 0)
    su = lax.broadcasted_iota(jnp.int32, (width, 2 * st.tile), 1)
    for half, offset in enumerate((i // st.qblock, i % st.qblock)):
        yield half, c // st.tile == offset, (su == half * st.tile + sc % st.tile).astype(dtype)


def _exp_minus(st: _Static, s, row):
    """``exp(s - row[:, None])`` as ``exp2(fma(s, log2(e), -row log2(e)))``: one FMA and one ``ex2``
    per score (``exp`` spends a subtract and a range-reducing ``fma.rm`` besides its ``ex2``)."""
    return jnp.exp2(_common.fma(s, LOG2E, -(row * LOG2E)[:, None], interpret=_common.resolve_interpret(st.interpret)))


def _logits(st: _Static, q, k, ab, emap, valid):
    # the relative term is a second dot accumulated onto the first (one fp32 tile live)
    s = dot(q, k, trans_b=True, precision=st.precision) * st.scale
    s = s + dot(ab, emap.astype(ab.dtype), trans_b=True, precision=st.precision)
    return jnp.where(valid[None, :], s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, tab_ref, o_ref, lse_ref, *, st: _Static):
    """Online softmax over key chunks (keeps the live logits tile to ``[R, key_chunk]``)."""
    origin = _origin(st)
    q = _load_rows(st, origin, q_ref)
    ab = rel_logits(st, q, tab_ref)
    rows = q.shape[0]
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    acc = jnp.zeros((rows, o_ref.shape[-1]), jnp.float32)

    def body(c, carry):
        m, l, acc = carry
        y, x, inside, valid, emap = _window(st, origin, c)
        k, v = _load(k_ref, y, x, inside), _load(v_ref, y, x, inside)
        s = _logits(st, q, k, ab, emap, valid)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a chunk of padding keys only
        alpha = jnp.exp(m - m_safe)
        p = _exp_minus(st, s, m_safe)
        l = l * alpha + jnp.sum(p, axis=1)
        return m_new, l, acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision=st.precision)

    m, l, acc = lax.fori_loop(0, st.chunks, body, (m, l, acc))
    _store_rows(st, origin, o_ref, acc / l[:, None])
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, tab_ref, o_ref, lse_ref, do_ref, dq_ref, dab_ref, *outs, st: _Static):
    """Per key chunk of the window: recompute p, accumulate dq and d[A | B]. ``outs``: the rows'
    ``[A | B]`` and ``delta = rowsum(dO * O)`` for the dk/dv kernel (which reads each query block's
    nine times), or with the "windows" scheme the window's dk and dv (idle query rows have
    ``dO = 0``: they add nothing)."""
    origin = _origin(st)
    q, do = _load_rows(st, origin, q_ref), _load_rows(st, origin, do_ref)
    ab = rel_logits(st, q, tab_ref)
    lse = lse_ref[...]
    delta = jnp.sum(do.astype(jnp.float32) * _load_rows(st, origin, o_ref).astype(jnp.float32), axis=1)
    if not st.windows:
        _store_rows(st, origin, outs[0], ab)
        outs[1][...] = delta
    dq = jnp.zeros(q.shape, jnp.float32)
    dab = jnp.zeros(ab.shape, jnp.float32)

    def body(c, carry):
        dq, dab = carry
        y, x, inside, valid, emap = _window(st, origin, c)
        k, v = _load(k_ref, y, x, inside), _load(v_ref, y, x, inside)
        p = _exp_minus(st, _logits(st, q, k, ab, emap, valid), lse)
        dp = dot(do, v, trans_b=True, precision=st.precision)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        if st.windows:
            dk_ref, dv_ref = outs
            keys = pl.ds(pl.multiple_of(c * st.key_chunk, st.key_chunk), st.key_chunk)
            dv_ref[keys, :] = dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision).astype(dv_ref.dtype)
            dk_ref[keys, :] = (dot(ds, q, trans_a=True, precision=st.precision) * st.scale).astype(dk_ref.dtype)
        return dq + dot(ds, k, precision=st.precision), dab + dot(ds, emap.astype(ds.dtype), precision=st.precision)

    dq, dab = lax.fori_loop(0, st.chunks, body, (dq, dab))
    dab = dab.astype(dab_ref.dtype)  # (q's dtype: the relative logits' cotangent as the tables' adjoint reads it)
    _store_rows(st, origin, dq_ref, dq * st.scale + rel_logits_grad_q(st, dab, tab_ref))
    _store_rows(st, origin, dab_ref, dab)


def _keys(st: _Static):
    """This program's ``block x block`` key block, ``KB`` rows (a power of two; idle rows past
    ``block^2``): ``[KB, 1]`` map rows, columns and the mask of real rows."""
    ky, kx = _origin(st)
    j = lax.broadcasted_iota(jnp.int32, (st.key_rows, 1), 0)
    return ky * st.block + j // st.block, kx * st.block + j % st.block, j < st.block * st.block


def _key_index(ref, y, x, real=None, width: int | None = None, offset: int = 0):
    """Index vectors of the key rows in a ``[H, W, c]`` map ref: for loads (clamped into the map),
    or with ``real`` for stores (idle rows out of bounds; stores also mask them); ``width`` channels
    from ``offset`` (default: all ``c``)."""
    col = lax.broadcasted_iota(jnp.int32, (1, width or ref.shape[-1]), 1) + offset
    if real is None:
        return jnp.minimum(y, ref.shape[0] - 1), jnp.minimum(x, ref.shape[1] - 1), col
    return jnp.where(real, y, ref.shape[0]), x, col


def _dkv_kernel(q_ref, k_ref, v_ref, ab_ref, lse_ref, delta_ref, do_ref, *outs, st: _Static):
    """dk, dv of one key block, from the query blocks whose windows hold it: the
    ``(2m + 1)^2`` blocks around it, ``m = ceil(halo / block)`` (those off the map add nothing).
    Per query block: its rows' p over this block's keys (recomputed from the saved log-sum-exp,
    with the relative logits of each key's place in that block's window, both stored per block by
    the dq kernel with ``delta = rowsum(dO * O)``), then ``dv += p^T dO`` and
    ``dk += scale (p (dO v^T - delta))^T q``. Idle query rows have ``dO = 0``."""
    key_y, key_x, key_real = _keys(st)  # [KB, 1]
    k, v = k_ref[_key_index(k_ref, key_y, key_x)], v_ref[_key_index(v_ref, key_y, key_x)]
    y, x, real = key_y[:, 0], key_x[:, 0], key_real[:, 0]
    ky, kx = _origin(st)
    nby = st.height // st.block
    m = -(-st.halo // st.block)
    side = 2 * m + 1
    col = lax.broadcasted_iota(jnp.int32, (st.key_rows, 2 * st.tile), 1)

    def body(t, carry):
        dk, dv = carry
        ty = lax.div(t, jnp.int32(side))  # (not t // side: Pallas's Triton lowering rejects it here)
        by, bx = ky + ty - m, kx + (t - ty * side) - m
        on_map = (by >= 0) & (by < nby) & (bx >= 0) & (bx < st.blocks_x)
        by, bx = jnp.clip(by, 0, nby - 1), jnp.clip(bx, 0, st.blocks_x - 1)
        origin = (by, bx)
        q, do, ab = (_load_rows(st, origin, r) for r in (q_ref, do_ref, ab_ref))
        lse, delta = lse_ref[by * st.blocks_x + bx, :], delta_ref[by * st.blocks_x + bx, :]
        jy, jx = y - (by * st.block - st.halo), x - (bx * st.block - st.halo)  # place in that window
        seen = real & on_map & (jy >= 0) & (jy < st.win) & (jx >= 0) & (jx < st.win)
        emap = (col == jy[:, None]) | (col == st.tile + jx[:, None])
        s = dot(q, k, trans_b=True, precision=st.precision) * st.scale
        s = s + dot(ab, emap.astype(ab.dtype), trans_b=True, precision=st.precision)
        p = jnp.where(seen[None, :], _exp_minus(st, s, lse), 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision)
        dp = dot(do, v, trans_b=True, precision=st.precision)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        return dk + dot(ds, q, trans_a=True, precision=st.precision), dv

    dk, dv = lax.fori_loop(0, side * side, body, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    # (packed: dk into channels [0, d) and dv into [d, 2d) of the one [H, W, 2d] cotangent map)
    dk_ref, dv_ref = (outs[0], outs[0]) if st.packed else outs
    for ref, val, offset in ((dk_ref, dk * st.scale, 0), (dv_ref, dv, dk.shape[-1] if st.packed else 0)):
        idx = _key_index(ref, key_y, key_x, key_real, val.shape[-1], offset)
        pltriton.store(ref.at[idx], val.astype(ref.dtype), mask=jnp.broadcast_to(key_real, val.shape))


def _block_spec(shape):
    """Per (block, batch, head): ``[B, nB, keys, heads, c]`` windows or ``[B, nB, heads, R]``."""
    if len(shape) == 5:
        return pl.BlockSpec((None, None, shape[2], None, shape[4]), lambda n, b, h: (b, n, 0, h, 0))
    return pl.BlockSpec((None, None, None, shape[3]), lambda n, b, h: (b, n, h, 0))


def _all_blocks_spec(shape):
    """Every block's slice of a ``[B, nB, heads, R]`` array, per (batch, head)."""
    return pl.BlockSpec((None, shape[1], None, shape[3]), lambda n, b, h: (b, 0, h, 0))


def _map_spec(shape):
    """A whole ``[B, H, W, heads, c]`` map per (batch, head): the kernels gather their rows."""
    return pl.BlockSpec((None, shape[1], shape[2], None, shape[4]), lambda n, b, h: (b, 0, 0, h, 0))


@dataclasses.dataclass(frozen=True)
class _Half:
    """Half ``index`` (0: keys, 1: values) of the channels of a packed ``[B, H, W, heads, 2d]`` map,
    as a kernel input: the program's block is that half of its (batch, head) map, read in place."""

    kv: jax.Array
    index: int


def _kv_inputs(st: _Static, k, v) -> list:
    return [_Half(k, 0), _Half(k, 1)] if st.packed else [k, v]


def _call(kernel, st, args, outs, name, lse_all: bool = False, windows: tuple[int, ...] = ()):
    """Inputs: 5-d maps (or :class:`_Half` of a packed one), the 3-d skewed tables and 4-d
    per-block rows (lse, delta; ``lse_all``: every block's, for each (batch, head)); outputs: maps
    and per-block rows, except ``windows`` (indices of ``[B, nB, keys, heads, c]`` per-block window
    outputs)."""
    batch, _, _, heads, _ = args[0].shape
    nb = (st.height // st.block) * st.blocks_x

    def in_spec(x):
        if isinstance(x, _Half):
            shape = x.kv.shape
            return pl.BlockSpec((None, shape[1], shape[2], None, shape[4] // 2),
                                lambda n, b, h, i=x.index: (b, 0, 0, h, i))
        return spec(x.shape, True)

    def spec(shape, is_input=False):
        if len(shape) == 3:  # the skewed tables, whole, in every program
            return pl.BlockSpec(shape, lambda n, b, h: (0, 0, 0))
        if len(shape) == 4:
            return _all_blocks_spec(shape) if is_input and lse_all else _block_spec(shape)
        return _map_spec(shape)

    return _common.pallas_call(
        functools.partial(kernel, st=st), out_shape=outs, grid=(nb, batch, heads),
        in_specs=[in_spec(x) for x in args],
        out_specs=[_block_spec(o.shape) if i in windows else spec(o.shape) for i, o in enumerate(outs)],
        num_warps=st.num_warps, num_stages=st.num_stages, interpret=st.interpret,
        name=name)(*[x.kv if isinstance(x, _Half) else x for x in args])


def _value_dim(st: _Static, k, v) -> int:
    return k.shape[-1] // 2 if st.packed else v.shape[-1]


def _fwd(st, q, k, v, tab):
    batch, _, _, heads, _ = q.shape
    nb = (st.height // st.block) * st.blocks_x
    outs = [jax.ShapeDtypeStruct((*q.shape[:4], _value_dim(st, k, v)), q.dtype),
            jax.ShapeDtypeStruct((batch, nb, heads, st.rows), jnp.float32)]
    return _call(_fwd_kernel, st, [q, *_kv_inputs(st, k, v), tab], outs, "jaxattn_halo_fwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _halo(st, q, k, v, tab):
    return _fwd(st, q, k, v, tab)[0]


def _halo_fwd(st, q, k, v, tab):
    o, lse = _fwd(st, q, k, v, tab)
    return o, (q, k, v, tab, o, lse)


def _table_grad_kernel(q_ref, dab_ref, dtab_ref, *, st: _Static, per: int, units: int):
    """The skewed tables' cotangent from ``per`` query blocks of one head (units ``batch * blocks
    + block`` over the whole batch): per table, ``sum_rows d_own^T q`` (``[QB T, d]``, fp32),
    ``d_own`` the rows' ``d[A | B]`` spread back to their own offsets' columns
    (:func:`_spread_back`, as in :func:`rel_logits_grad_q`)."""
    nb = (st.height // st.block) * st.blocks_x
    first = pl.program_id(0) * per
    width, d = st.qpow * st.tile, q_ref.shape[-1]
    selections = list(_rel_selection(st, st.rows, q_ref.dtype))

    def body(u, acc):
        b, n = lax.div(u, nb), lax.rem(u, nb)
        origin = (lax.div(n, st.blocks_x), lax.rem(n, st.blocks_x))
        q, dab = _load_rows(st, origin, q_ref, b), _load_rows(st, origin, dab_ref, b)
        out = []
        for (_, own_columns, sel), a in zip(selections, acc):
            out.append(a + dot(_spread_back(st, dab, own_columns, sel), q, trans_a=True, precision=st.precision))
        return tuple(out)

    zeros = jnp.zeros((width, d), jnp.float32)
    acc = lax.fori_loop(first, jnp.minimum(first + per, units), body, (zeros, zeros))
    for half in range(2):
        dtab_ref[half] = acc[half] * st.rel_scale


TABLE_GRAD_PROGRAMS = 128  # programs (heads x shares of the batch's query blocks) for the tables' cotangent


def _table_grad(st: _Static, q, dab, tab):
    """The cotangent of the skewed tables ``tab [2, QB T, d]`` (its dtype): per head, the batch's
    query blocks are split into shares, one program each, for about ``TABLE_GRAD_PROGRAMS``
    programs; their fp32 partials (32 KiB each at d = 32) are summed by XLA."""
    batch, hq, wq, heads, d = q.shape
    units = batch * (st.height // st.block) * st.blocks_x
    split = min(units, max(1, -(-TABLE_GRAD_PROGRAMS // heads)))
    per = -(-units // split)
    split = -(-units // per)
    width = st.qpow * st.tile

    def whole_batch(c):  # every image of one head: the kernel gathers its rows
        return pl.BlockSpec((batch, hq, wq, None, c), lambda s, h: (0, 0, 0, h, 0))

    (parts,) = _common.pallas_call(
        functools.partial(_table_grad_kernel, st=st, per=per, units=units),
        out_shape=[jax.ShapeDtypeStruct((split, heads, 2, width, d), jnp.float32)],
        grid=(split, heads), in_specs=[whole_batch(d), whole_batch(dab.shape[-1])],
        out_specs=[pl.BlockSpec((None, None, 2, width, d), lambda s, h: (s, h, 0, 0, 0))],
        num_warps=4, num_stages=st.num_stages, interpret=st.interpret, name="jaxattn_halo_dtab")(q, dab)
    return jnp.sum(parts, axis=(0, 1)).astype(tab.dtype)


def _halo_bwd(st, res, do):
    """dq, dk, dv (packed: one ``[B, H, W, heads, 2d]`` cotangent of the kv map and None) and the
    skewed tables' cotangent."""
    q, k, v, tab, o, lse = res
    do = do.astype(o.dtype)
    kv = _kv_inputs(st, k, v)
    d, e = q.shape[-1], _value_dim(st, k, v)
    ab_shape = jax.ShapeDtypeStruct((*q.shape[:4], 2 * st.tile), q.dtype)
    outs = [jax.ShapeDtypeStruct(q.shape, q.dtype), ab_shape]
    if st.windows:
        batch, nb, heads, _ = lse.shape
        keys = st.chunks * st.key_chunk
        outs += [jax.ShapeDtypeStruct((batch, nb, keys, heads, d), k.dtype),
                 jax.ShapeDtypeStruct((batch, nb, keys, heads, e), k.dtype)]
        dq, dab, dkw, dvw = _call(_dq_kernel, st, [q, *kv, tab, o, lse, do], outs, "jaxattn_halo_bwd",
                                  windows=(2, 3))
        fold = functools.partial(fold_windows, block=st.block, halo=st.halo, win=st.win, tile=st.tile,
                                 height=st.height, width=st.width)
        dk, dv = fold(dkw).astype(k.dtype), fold(dvw).astype(k.dtype)
        if st.packed:
            dk, dv = jnp.concatenate([dk, dv], axis=-1), None
    else:
        dq, dab, ab, delta = _call(_dq_kernel, st, [q, *kv, tab, o, lse, do],
                                   outs + [ab_shape, jax.ShapeDtypeStruct(lse.shape, jnp.float32)], "jaxattn_halo_dq")
        # (packed: k is the kv map, and its cotangent the one output)
        grads = [jax.ShapeDtypeStruct(k.shape, k.dtype)] + ([] if st.packed else [jax.ShapeDtypeStruct(v.shape, v.dtype)])
        dk, *dv = _call(_dkv_kernel, st, [q, *kv, ab, lse, delta, do], grads, "jaxattn_halo_dkv", lse_all=True)
        dv = dv[0] if dv else None
    # (q's part of the relative logits' cotangent is already in dq: rel_logits_grad_q)
    return dq, dk, dv, _table_grad(st, q, dab, tab)


_halo.defvjp(_halo_fwd, _halo_bwd)


def fold_windows(w: jax.Array, *, block: int, halo: int, win: int, tile: int, height: int,
                 width: int) -> jax.Array:
    """Adjoint of the window gather: ``[B, nB, keys, heads, d]`` windows (key ``j`` at row
    ``j // tile``, column ``j % tile``) summed back onto the ``[B, H, W, heads, d]`` map; keys
    outside the image are dropped. Window row ``my * block + ry`` of block row ``by`` lands on
    padded-map block row ``by + my``, so the sum is ``ceil(win / block)^2`` shifted dense adds."""
    batch, _, keys, heads, d = w.shape
    nby, nbx = height // block, width // block
    m = -(-win // block)
    w = w.reshape(batch, nby, nbx, keys // tile, tile, heads, d)[:, :, :, :win, :win].astype(jnp.float32)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 0), (0, m * block - win), (0, m * block - win), (0, 0), (0, 0)))
    w = w.reshape(batch, nby, nbx, m, block, m, block, heads, d)
    out = jnp.zeros((batch, nby + m - 1, block, nbx + m - 1, block, heads, d), jnp.float32)
    for my in range(m):
        for mx in range(m):
            part = w[:, :, :, my, :, mx].transpose(0, 1, 3, 2, 4, 5, 6)  # [B, nby, block, nbx, block, ..]
            out = out.at[:, my:my + nby, :, mx:mx + nbx].add(part)
    out = out.reshape(batch, (nby + m - 1) * block, (nbx + m - 1) * block, heads, d)
    return out[:, halo:halo + height, halo:halo + width]


def window_tile(win: int) -> int:
    """Columns per window tile row (also the width of each of A and B): a power of two >= 8."""
    return max(8, _common.next_pow2(win))


def halo_map_kernel(q, k, v, tab, *, block: int, halo: int, stride: int = 1, scale: float,
                    rel_scale: float = 1.0, mask_padding: bool = False, config: HaloConfig | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Fused HaloNet attention on NHWC maps (head dims powers of two >= 16): q ``[B, H/s, W/s, heads, d]``,
    k ``[B, H, W, heads, d]``, v ``[B, H, W, heads, e]``, tab ``[2, QB * T, d]`` (q's dtype;
    ``T = window_tile(win)``, ``QB = next_pow2(block // s)``): the skewed relative tables,
    ``tab[0][iy * T + t] = R_h[t - iy + win - 1]`` and ``tab[1][ix * T + t] = R_w[..]`` for
    ``t < win`` (:func:`jaxattn.ops.halo.skewed_table`; other rows ignored or zero). Logits are
    ``scale q.k + rel_scale (A + B)``. H and W are multiples of ``block`` (``s`` the stride,
    dividing ``block``); ``mask_padding`` drops keys outside the image from the softmax (else they
    take part as zeros). Returns ``[B, H/s, W/s, heads, e]``.

    ``v=None``: ``k`` is one packed ``[B, H, W, heads, 2d]`` map, each head's ``d`` key channels then
    its ``d`` value channels (a kv projection's output as timm's ``HaloAttn`` lays it out). The
    kernels read both halves in place and the backward writes one packed cotangent (its gradient
    w.r.t. ``k``; none w.r.t. ``v``), so no slice or concatenation of the map goes through HBM."""
    if tab.dtype != q.dtype:
        raise ValueError(f"tab must have q's dtype {q.dtype}, got {tab.dtype}")
    packed = v is None
    if packed and k.shape[-1] != 2 * q.shape[-1]:
        raise ValueError(f"with v=None, k must be the packed [B, H, W, heads, 2 * d] = [..., {2 * q.shape[-1]}] "
                         f"kv map, got {tuple(k.shape)}")
    e = k.shape[-1] // 2 if packed else v.shape[-1]
    cfg = config or HaloConfig()
    win = block + 2 * halo
    tile = window_tile(win)
    qblock = block // stride
    qpow = _common.next_pow2(qblock)
    if tab.shape != (2, qpow * tile, q.shape[-1]):
        raise ValueError(f"tab must have shape [2, next_pow2(block // stride) * window_tile(win), d] = "
                         f"{(2, qpow * tile, q.shape[-1])}, got {tab.shape}")
    # whole tile rows per chunk, no more chunks than the window needs
    chunk = min(max(cfg.key_chunk, tile), tile * _common.next_pow2(win))
    rows_per_chunk = chunk // tile
    warps = cfg.num_warps or (8 if max(q.shape[-1], e) >= 128 else 4)
    st = _Static(scale=float(scale), block=block, halo=halo, win=win, tile=tile, qblock=qblock, qpow=qpow,
                 rel_scale=float(rel_scale), rows=max(16, _common.next_pow2(qblock * qblock)),
                 key_rows=max(16, _common.next_pow2(block * block)),
                 height=k.shape[1], width=k.shape[2],
                 blocks_x=k.shape[2] // block, key_chunk=chunk, chunks=-(-win // rows_per_chunk),
                 mask_padding=bool(mask_padding), windows=cfg.backward == "windows", packed=packed,
                 num_warps=warps, num_stages=cfg.num_stages,
                 interpret=interpret, precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    return _halo(st, q, k, v, tab)
