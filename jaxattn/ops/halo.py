"""``jaxattn.halo_attention``: HaloNet blocked local self-attention (timm ``HaloAttn`` math),
layout NHWC with a heads axis: ``[batch, height, width, heads, head_dim]``."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import _common
from jaxattn.pallas.halo import halo_map_kernel, window_tile

_HP = lax.Precision.HIGHEST


def query_blocks(q: jax.Array, bq: int) -> jax.Array:
    """``[B, Hq, Wq, heads, d]`` -> ``[B, nby * nbx, bq * bq, heads, d]`` (row-major blocks)."""
    b, hq, wq, h, d = q.shape
    q = q.reshape(b, hq // bq, bq, wq // bq, bq, h, d).transpose(0, 1, 3, 2, 4, 5, 6)
    return q.reshape(b, (hq // bq) * (wq // bq), bq * bq, h, d)


def fold_blocks(o: jax.Array, nby: int, nbx: int, bq: int) -> jax.Array:
    b, _, _, h, e = o.shape
    o = o.reshape(b, nby, nbx, bq, bq, h, e).transpose(0, 1, 3, 2, 4, 5, 6)
    return o.reshape(b, nby * bq, nbx * bq, h, e)


def key_windows(k: jax.Array, block: int, halo: int) -> jax.Array:
    """Each block's ``win x win`` window of the zero-padded map: ``[B, nB, win * win, heads, d]``."""
    b, hh, ww, h, d = k.shape
    win = block + 2 * halo
    kp = jnp.pad(k, ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)))
    rows = (np.arange(hh // block) * block)[:, None] + np.arange(win)[None]
    cols = (np.arange(ww // block) * block)[:, None] + np.arange(win)[None]
    kw = kp[:, rows[:, None, :, None], cols[None, :, None, :]]  # [B, nby, nbx, win, win, h, d]
    return kw.reshape(b, rows.shape[0] * cols.shape[0], win * win, h, d)


def skewed_table(rel: jax.Array, bq: int, win: int, width: int) -> jax.Array:
    """``[2 win - 1, d]`` relative table -> ``[bq, width, d]``: row ``i``, column ``t`` holds
    ``rel[t - i + win - 1]`` (zero for ``t >= win``): the table a query at in-block offset ``i``
    reads for window row (or column) ``t``."""
    t = np.arange(width)
    idx = np.minimum(t[None, :] - np.arange(bq)[:, None] + win - 1, 2 * win - 2)  # >= win - bq >= 0
    return jnp.where(jnp.asarray(t < win)[None, :, None], rel[idx], jnp.zeros((), rel.dtype))


def rel_projections(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array, bq: int,
                    win: int) -> tuple[jax.Array, jax.Array]:
    """Per query ``(y, x)`` at in-block offset ``(iy, ix) = (y % bq, x % bq)``:
    ``A[y, x, jy] = q . R_h[jy - iy + win - 1]`` and ``B[y, x, jx] = q . R_w[jx - ix + win - 1]``,
    fp32 ``[B, Hq, Wq, heads, win]`` each: two dots against the :func:`skewed_table` s, batched
    over the in-block offset, on the blocked view of q (a free reshape; no gather over the map,
    so no scatter in the backward)."""
    b, hq, wq, h, d = q.shape
    qb = q.reshape(b, hq // bq, bq, wq // bq, bq, h, d)
    th, tw = skewed_table(rel_h, bq, win, win), skewed_table(rel_w, bq, win, win)
    # fp32 anywhere: exact fp32 dots; two-byte q and tables: products are exact, sums in fp32
    hp = _HP if jnp.float32 in (jnp.result_type(q, th), jnp.result_type(q, tw)) else None
    a = jnp.einsum("byixjhd,itd->byixjht", qb, th, precision=hp, preferred_element_type=jnp.float32)
    c = jnp.einsum("byixjhd,jtd->byixjht", qb, tw, precision=hp, preferred_element_type=jnp.float32)
    return a.reshape(b, hq, wq, h, win), c.reshape(b, hq, wq, h, win)


def window_valid(height: int, width: int, block: int, halo: int, mask_padding: bool) -> np.ndarray:
    """``[nB, win * win]`` bool: window keys inside the image (all True without masking)."""
    win = block + 2 * halo
    rows = (np.arange(height // block) * block)[:, None] + np.arange(win)[None] - halo
    cols = (np.arange(width // block) * block)[:, None] + np.arange(win)[None] - halo
    iny, inx = (rows >= 0) & (rows < height), (cols >= 0) & (cols < width)
    inside = iny[:, None, :, None] & inx[None, :, None, :]
    out = inside.reshape(-1, win * win)
    return out if mask_padding else np.ones_like(out)


def halo_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: jax.Array,
    rel_w: jax.Array,
    *,
    block_size: int,
    halo_size: int,
    stride: int = 1,
    scale: float | None = None,
    scale_pos_embed: bool = False,
    mask_padding: bool = False,
    impl: Literal["auto", "pallas", "xla"] = "auto",
) -> jax.Array:
    """HaloNet attention: each ``bq x bq`` query block (``bq = block_size // stride``) attends to
    the ``win x win`` window (``win = block_size + 2 halo_size``) of the key/value map
    zero-padded by ``halo_size``, with 2-D relative-position logits.

    Args:
      q: ``[B, H/stride, W/stride, heads, d]`` (the strided variant subsamples queries).
      k: ``[B, H, W, heads, d]``; v: ``[B, H, W, heads, e]``. H and W must be multiples of
        ``block_size`` (pad the feature map first otherwise).
      rel_h, rel_w: ``[2 win - 1, d]`` relative embeddings shared by the heads (timm's
        ``PosEmbedRel.height_rel`` / ``width_rel``).
      scale: default ``d ** -0.5``; logits ``scale q.k + rel`` (timm's default), or
        ``scale (q.k + rel)`` with ``scale_pos_embed``.
      mask_padding: False follows timm (zero-padded border keys take part with logit = rel
        and value 0); True excludes them from the softmax.
      impl: ``"pallas"`` (fused kernel; interpret mode without a GPU), ``"xla"`` (unfold and
        softmax), ``"auto"`` (kernel on GPU).

    Returns ``[B, H/stride, W/stride, heads, e]`` in q's dtype.
    """
    use_kernel = _check_inputs(q, k, v, rel_h, rel_w, block_size, halo_size, stride, impl)
    return _halo(q, k, v, rel_h, rel_w, block_size=block_size, halo_size=halo_size, stride=stride,
                 scale=q.shape[-1] ** -0.5 if scale is None else float(scale), scale_pos_embed=scale_pos_embed,
                 mask_padding=mask_padding, use_kernel=use_kernel)


def _check_inputs(q, k, v, rel_h, rel_w, block_size: int, halo_size: int, stride: int, impl: str) -> bool:
    """Raises a ValueError naming the bad argument; returns whether the kernel runs."""
    _checks.check_impl(impl)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 5, "[batch, height, width, heads, head_dim]")
    _checks.check_float_dtype("q", q)
    _checks.check_same_dtype(q=q, k=k, v=v)
    if block_size < 1 or halo_size < 0 or stride not in (1, 2):
        raise ValueError(f"need block_size >= 1, halo_size >= 0, stride in (1, 2); got "
                         f"{block_size}, {halo_size}, {stride}")
    if block_size % stride:
        raise ValueError(f"block_size {block_size} must be divisible by stride {stride} "
                         "(timm average-pools instead: use stride=1 and pool the output)")
    bsz, hh, ww, heads, d = k.shape
    if hh % block_size or ww % block_size:
        raise ValueError(f"k height/width {hh}x{ww} must be multiples of block_size {block_size}; "
                         "pad the feature map first")
    for ax, n, what in ((0, bsz, "batch size"), (1, hh, "height"), (2, ww, "width"), (3, heads, "heads")):
        _checks.check_dim("v", v, ax, n, what, "k")
    expected_q = (bsz, hh // stride, ww // stride, heads, d)
    if tuple(q.shape) != expected_q:
        raise ValueError(f"q must have shape [batch, H/stride, W/stride, heads, d] = {expected_q}, "
                         f"got {tuple(q.shape)}")
    win = block_size + 2 * halo_size
    for name, r in (("rel_h", rel_h), ("rel_w", rel_w)):
        _checks.check_array(name, r, "[2 * win - 1, head_dim]")
        if tuple(r.shape) != (2 * win - 1, d):
            raise ValueError(f"{name} must have shape [2 * win - 1, head_dim] = {(2 * win - 1, d)}, "
                             f"got {tuple(r.shape)}")
    return (impl == "pallas" or (impl == "auto" and _common.targets_gpu())) and not _checks.empty(q, k, v)


def halo_attention_kv(
    q: jax.Array,
    kv: jax.Array,
    rel_h: jax.Array,
    rel_w: jax.Array,
    *,
    block_size: int,
    halo_size: int,
    value_dim: int | None = None,
    stride: int = 1,
    scale: float | None = None,
    scale_pos_embed: bool = False,
    mask_padding: bool = False,
    impl: Literal["auto", "pallas", "xla"] = "auto",
) -> jax.Array:
    """:func:`halo_attention` on a packed key/value map, as a kv projection writes it (timm's
    ``HaloAttn`` layout): ``kv [B, H, W, heads, d + e]``, each head's ``d`` key channels (``d`` =
    q's head dim) then its ``e = value_dim`` value channels (default ``d``). With ``e == d`` a power
    of two >= 16 the kernel reads both halves of the map in place and its backward writes the
    map's cotangent whole: no slices of k and v, no concatenation of their gradients (a full pass
    over the map each, per layer); otherwise k and v are sliced out first. Other arguments and the
    result as :func:`halo_attention`."""
    _checks.check_rank("kv", kv, 5, "[batch, height, width, heads, d + e]")
    _checks.check_rank("q", q, 5, "[batch, height, width, heads, head_dim]")
    d = q.shape[-1]
    e = d if value_dim is None else int(value_dim)
    if e < 1 or kv.shape[-1] != d + e:
        raise ValueError(f"kv must have shape [batch, height, width, heads, d + value_dim] with d = q's head dim "
                         f"{d} and value_dim {e}: last dim {d + e}, got {tuple(kv.shape)}")
    k, v = kv[..., :d], kv[..., d:]  # (views for the checks and the XLA path; sliced only if used)
    use_kernel = _check_inputs(q, k, v, rel_h, rel_w, block_size, halo_size, stride, impl)
    packed = use_kernel and e == d and _common.unpadded_width(d)
    return _halo(q, k, v, rel_h, rel_w, block_size=block_size, halo_size=halo_size, stride=stride,
                 scale=d ** -0.5 if scale is None else float(scale), scale_pos_embed=scale_pos_embed,
                 mask_padding=mask_padding, use_kernel=use_kernel, packed_kv=kv if packed else None)


def _halo(q, k, v, rel_h, rel_w, *, block_size: int, halo_size: int, stride: int, scale: float,
          scale_pos_embed: bool, mask_padding: bool, use_kernel: bool, interpret: bool | None = None,
          config=None, packed_kv: jax.Array | None = None):
    """Validated inputs -> output; ``interpret=False`` forces GPU lowering (tests lower on CPU);
    ``packed_kv``: the ``[..., 2d]`` map k and v are the halves of (``d`` a power of two >= 16),
    which the kernel then reads in place."""
    _, hh, ww, _, _ = k.shape
    win = block_size + 2 * halo_size
    bq = block_size // stride
    nby, nbx = hh // block_size, ww // block_size
    if use_kernel:
        if packed_kv is not None:
            k, v = packed_kv, None
        return _kernel_path(q, k, v, rel_h, rel_w, block_size, halo_size, stride, mask_padding, scale,
                            scale if scale_pos_embed else 1.0, interpret, config)
    a, c = rel_projections(q, rel_h, rel_w, bq, win)
    if scale_pos_embed:
        a, c = a * scale, c * scale

    qb, a, c = query_blocks(q, bq), query_blocks(a, bq), query_blocks(c, bq)
    kw, vw = key_windows(k, block_size, halo_size), key_windows(v, block_size, halo_size)
    valid = window_valid(hh, ww, block_size, halo_size, mask_padding)
    hp = _HP if q.dtype == jnp.float32 else None  # bf16/fp16: native dots, fp32 accumulation
    s = jnp.einsum("bnihd,bnjhd->bnhij", qb, kw, precision=hp, preferred_element_type=jnp.float32)
    rel = (a[..., :, None] + c[..., None, :]).reshape(*a.shape[:-1], win * win)  # [B, nB, i, h, j]
    s = s * scale + jnp.moveaxis(rel, 3, 2)
    s = jnp.where(jnp.asarray(valid)[None, :, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bnhij,bnjhe->bnihe", p.astype(vw.dtype), vw, precision=hp,
                     preferred_element_type=jnp.float32).astype(q.dtype)
    return fold_blocks(out, nby, nbx, bq)


def _kernel_path(q, k, v, rel_h, rel_w, block, halo, stride, mask_padding, scale, rel_scale, interpret,
                 config=None):
    """Pads the head dims to powers of two (>= 16), builds the kernel's skewed relative tables
    (``[2, QB * T, d]`` in q's dtype) and calls the fused kernel on the maps (``v=None``: ``k`` is
    the packed kv map, head dims already powers of two)."""
    win, bq = block + 2 * halo, block // stride
    t, qpow = window_tile(win), _common.next_pow2(bq)
    value_dim = q.shape[-1] if v is None else v.shape[-1]
    d, e = max(16, _common.next_pow2(q.shape[-1])), max(16, _common.next_pow2(value_dim))
    pad = _common.pad_axis
    tab = jnp.stack([pad(pad(skewed_table(r, bq, win, t), 0, qpow), 2, d).reshape(qpow * t, d)
                     for r in (rel_h, rel_w)]).astype(q.dtype)
    k, v = (k, None) if v is None else (pad(k, 4, d), pad(v, 4, e))

    def run(q, k, tab, v=None, batch_offset=None):
        return halo_map_kernel(q, k, v, tab, block=block, halo=halo, stride=stride, scale=scale,
                               rel_scale=rel_scale, mask_padding=mask_padding, config=config, interpret=interpret)

    # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
    out = _spmd.per_batch_shard(run, dict(q=pad(q, 4, d), k=k, v=v), dict(tab=tab))
    return out[..., :value_dim]
