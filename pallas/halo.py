"""HaloNet blocked local attention on Pallas's Triton backend.

One program per (query block, batch, head). The kernels read each block's ``win x win`` key/value
window straight from the NHWC maps (``win = block + 2 halo``): window key ``j`` is row
``jy = j // TW``, column ``jx = j % TW`` of a ``TW``-wide tile (``TW = next_pow2(win)``), loaded by
gathered row/column indices, clamped into the image and zeroed outside it (timm's zero padding,
without materialising a padded map or the ``(win / block)^2``-times larger unfolded windows).
The wrapper (``jaxattn.ops.halo``) gives the query blocks and the per-row relative-position
projections ``A[i, jy] = q_i . R_h[jy - iy + win - 1]``, ``B[i, jx] = q_i . R_w[jx - ix + win - 1]``
(JAX differentiates those); the kernel adds them as a second tensor-core dot,
``s = scale q k^T + [A | B] E^T``, with ``E`` the one-hot map from key ``j`` to its row and column
(built in-kernel from iotas), masked softmax over the window, ``p v``; ``d[A | B] = ds E``.
Both kernels walk the window in chunks of ``key_chunk`` keys (whole tile rows; an online softmax
in the forward; the backward recomputes ``p`` from the saved log-sum-exp), so the live fp32 tiles
are ``[R, key_chunk]``. The backward writes dk, dv per window; :func:`fold_windows` adds the
overlapping windows back onto the map with ``ceil(win / block)^2`` shifted dense adds (no scatter).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot


KEY_CHUNK = 64  # window keys per step of the kernels' key loop


@dataclasses.dataclass(frozen=True)
class HaloConfig:
    """Launch parameters of both kernels (``num_warps`` None: 8 from head dim 128, else 4)."""

    key_chunk: int = KEY_CHUNK
    num_warps: int | None = None
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    block: int  # key block side (the query block is block // stride)
    halo: int
    win: int  # block + 2 halo
    tile: int  # TW: window columns per tile row (power of two >= win); also T, the width of A and B
    height: int  # key map size
    width: int
    blocks_x: int  # query blocks per row
    key_chunk: int  # window keys per step: key_chunk // tile whole tile rows
    chunks: int
    mask_padding: bool
    num_warps: int
    num_stages: int
    interpret: bool | None
    precision: object


def _origin(st: _Static):
    """Map row and column of this program's window corner (outside the image by ``halo``)."""
    n = pl.program_id(0)
    return (n // st.blocks_x) * st.block - st.halo, (n % st.blocks_x) * st.block - st.halo


def _window(st: _Static, origin, c):
    """Key chunk ``c`` of the window at ``origin``: map rows and columns (clamped), whether each key
    lies in the image, whether it takes part in the softmax, and its one-hot relative map."""
    j = c * st.key_chunk + lax.broadcasted_iota(jnp.int32, (st.key_chunk,), 0)
    jy, jx = j // st.tile, j % st.tile
    y, x = origin[0] + jy, origin[1] + jx
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


def _logits(st: _Static, q, k, ab, emap, valid):
    # the relative term is a second dot accumulated onto the first (one fp32 tile live)
    s = dot(q, k, trans_b=True, precision=st.precision) * st.scale
    s = s + dot(ab, emap.astype(ab.dtype), trans_b=True, precision=st.precision)
    return jnp.where(valid[None, :], s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, ab_ref, o_ref, lse_ref, *, st: _Static):
    """Online softmax over key chunks (keeps the live logits tile to ``[R, key_chunk]``)."""
    q, ab = q_ref[...], ab_ref[...]
    rows = q.shape[0]
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    acc = jnp.zeros((rows, o_ref.shape[-1]), jnp.float32)
    origin = _origin(st)

    def body(c, carry):
        m, l, acc = carry
        y, x, inside, valid, emap = _window(st, origin, c)
        k, v = _load(k_ref, y, x, inside), _load(v_ref, y, x, inside)
        s = _logits(st, q, k, ab, emap, valid)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a chunk of padding keys only
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        return m_new, l, acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision=st.precision)

    m, l, acc = lax.fori_loop(0, st.chunks, body, (m, l, acc))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _bwd_kernel(q_ref, k_ref, v_ref, ab_ref, o_ref, lse_ref, do_ref,
                dq_ref, dk_ref, dv_ref, dab_ref, *, st: _Static):
    """Per key chunk: recompute p, write that chunk's window dk and dv, accumulate dq and d[A | B]."""
    q, ab, do = q_ref[...], ab_ref[...], do_ref[...]
    lse = lse_ref[...]
    delta = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1)
    dq = jnp.zeros(q.shape, jnp.float32)
    dab = jnp.zeros(ab.shape, jnp.float32)
    origin = _origin(st)

    def body(c, carry):
        dq, dab = carry
        keys = pl.ds(pl.multiple_of(c * st.key_chunk, st.key_chunk), st.key_chunk)
        y, x, inside, valid, emap = _window(st, origin, c)
        k, v = _load(k_ref, y, x, inside), _load(v_ref, y, x, inside)
        p = jnp.exp(_logits(st, q, k, ab, emap, valid) - lse[:, None])
        dv_ref[keys, :] = dot(p.astype(do.dtype), do, trans_a=True, precision=st.precision).astype(dv_ref.dtype)
        dp = dot(do, v, trans_b=True, precision=st.precision)
        ds = (p * (dp - delta[:, None])).astype(q.dtype)
        dk_ref[keys, :] = (dot(ds, q, trans_a=True, precision=st.precision) * st.scale).astype(dk_ref.dtype)
        return dq + dot(ds, k, precision=st.precision), dab + dot(ds, emap.astype(ds.dtype), precision=st.precision)

    dq, dab = lax.fori_loop(0, st.chunks, body, (dq, dab))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)
    dab_ref[...] = dab.astype(dab_ref.dtype)


def _block_spec(shape):
    """``[B, nB, rows, heads, cols]`` per (block, batch, head), or ``[B, nB, heads, rows]``."""
    if len(shape) == 5:
        return pl.BlockSpec((None, None, shape[2], None, shape[4]), lambda n, b, h: (b, n, 0, h, 0))
    return pl.BlockSpec((None, None, None, shape[3]), lambda n, b, h: (b, n, h, 0))


def _map_spec(shape):
    """A whole ``[B, H, W, heads, d]`` map per (batch, head): the kernels gather the windows."""
    return pl.BlockSpec((None, shape[1], shape[2], None, shape[4]), lambda n, b, h: (b, 0, 0, h, 0))


def _call(kernel, st, blocked, maps, outs, name):
    """``blocked`` and ``outs[i]`` for i not in the window outputs are per block; ``maps`` whole."""
    qb = blocked[0]
    batch, nb, _, heads, _ = qb.shape
    args = [blocked[0], *maps, *blocked[1:]]
    in_specs = [_block_spec(blocked[0].shape), *(_map_spec(m.shape) for m in maps),
                *(_block_spec(x.shape) for x in blocked[1:])]
    return _common.pallas_call(
        functools.partial(kernel, st=st), out_shape=outs, grid=(nb, batch, heads), in_specs=in_specs,
        out_specs=[_block_spec(o.shape) for o in outs], num_warps=st.num_warps, num_stages=st.num_stages,
        interpret=st.interpret, name=name)(*args)


def _fwd(st, qb, k, v, ab):
    batch, nb, rows, heads, _ = qb.shape
    outs = [jax.ShapeDtypeStruct((batch, nb, rows, heads, v.shape[-1]), qb.dtype),
            jax.ShapeDtypeStruct((batch, nb, heads, rows), jnp.float32)]
    return _call(_fwd_kernel, st, [qb, ab], [k, v], outs, "jaxattn_halo_fwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _halo(st, qb, k, v, ab):
    return _fwd(st, qb, k, v, ab)[0]


def _halo_fwd(st, qb, k, v, ab):
    o, lse = _fwd(st, qb, k, v, ab)
    return o, (qb, k, v, ab, o, lse)


def _halo_bwd(st, res, do):
    qb, k, v, ab, o, lse = res
    batch, nb, _, heads, _ = qb.shape
    keys = st.chunks * st.key_chunk
    outs = [jax.ShapeDtypeStruct(qb.shape, qb.dtype),
            jax.ShapeDtypeStruct((batch, nb, keys, heads, k.shape[-1]), k.dtype),
            jax.ShapeDtypeStruct((batch, nb, keys, heads, v.shape[-1]), v.dtype),
            jax.ShapeDtypeStruct(ab.shape, ab.dtype)]
    dq, dkw, dvw, dab = _call(_bwd_kernel, st, [qb, ab, o, lse, do.astype(o.dtype)], [k, v], outs,
                              "jaxattn_halo_bwd")
    fold = functools.partial(fold_windows, block=st.block, halo=st.halo, win=st.win, tile=st.tile,
                             height=st.height, width=st.width)
    return dq, fold(dkw).astype(k.dtype), fold(dvw).astype(v.dtype), dab


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


def halo_blocks_kernel(qb, k, v, ab, *, block: int, halo: int, scale: float, mask_padding: bool = False,
                       config: HaloConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """Fused attention of query blocks over their windows of the key/value maps (tile dims powers
    of two): qb ``[B, nB, R, heads, d]`` (row-major blocks of the query map), k ``[B, H, W, heads, d]``,
    v ``[B, H, W, heads, e]``, ab ``[B, nB, R, heads, 2T]`` (q's dtype, ``T = window_tile(win)``):
    the row and column relative logits ``[A | B]`` (columns past ``win`` ignored). H and W are
    multiples of ``block``; ``mask_padding`` drops keys outside the image from the softmax (else they
    take part as zeros). Returns ``[B, nB, R, heads, e]``."""
    if ab.dtype != qb.dtype:
        raise ValueError(f"ab must have q's dtype {qb.dtype}, got {ab.dtype}")
    cfg = config or HaloConfig()
    win = block + 2 * halo
    tile = window_tile(win)
    if ab.shape[-1] != 2 * tile:
        raise ValueError(f"ab must have 2 * window_tile(win) = {2 * tile} columns, got {ab.shape[-1]}")
    # whole tile rows per chunk, no more chunks than the window needs
    chunk = min(max(cfg.key_chunk, tile), tile * _common.next_pow2(win))
    rows_per_chunk = chunk // tile
    warps = cfg.num_warps or (8 if max(qb.shape[-1], v.shape[-1]) >= 128 else 4)
    st = _Static(scale=float(scale), block=block, halo=halo, win=win, tile=tile, height=k.shape[1],
                 width=k.shape[2], blocks_x=k.shape[2] // block, key_chunk=chunk,
                 chunks=-(-win // rows_per_chunk), mask_padding=bool(mask_padding), num_warps=warps,
                 num_stages=cfg.num_stages, interpret=interpret,
                 precision=lax.Precision.HIGHEST if qb.dtype == jnp.float32 else None)
    return _halo(st, qb, k, v, ab)
