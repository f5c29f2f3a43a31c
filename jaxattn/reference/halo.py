"""HaloNet blocked local attention, written per query from the math in fp32.

Query (y, x) of the (possibly strided) query map lies in block ``(y // bq, x // bq)``
(``bq = block_size // stride``) at in-block offset ``(iy, ix)``. Its keys are the
``win x win`` window (``win = block_size + 2 * halo_size``) of the key/value map zero-padded
by ``halo_size``, starting at padded row ``by * block_size``, column ``bx * block_size``.
Logit for window key ``(jy, jx)``: ``scale * q.k + q.R_h[jy - iy + win - 1] + q.R_w[jx - ix + win - 1]``
(timm's ``HaloAttn``; with ``scale_pos_embed`` the relative term is scaled too). Padded border
keys take part with ``k = v = 0`` unless ``mask_padding``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def halo_reference(q, k, v, rel_h, rel_w, *, block_size: int, halo_size: int, stride: int = 1,
                   scale: float | None = None, scale_pos_embed: bool = False,
                   mask_padding: bool = False) -> jax.Array:
    """q ``[B, H/s, W/s, heads, d]``, k ``[B, H, W, heads, d]``, v ``[B, H, W, heads, e]``,
    rel_h, rel_w ``[2 win - 1, d]``. Returns fp32 ``[B, H/s, W/s, heads, e]``."""
    q, k, v, rel_h, rel_w = (x.astype(jnp.float32) for x in (q, k, v, rel_h, rel_w))
    b, hh, ww = block_size, halo_size, block_size + 2 * halo_size
    bq = b // stride
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    hq, wq = q.shape[1], q.shape[2]
    y, x = jnp.arange(hq), jnp.arange(wq)
    by, iy, bx, ix = y // bq, y % bq, x // bq, x % bq
    j = jnp.arange(ww)
    rows = by[:, None] * b + j[None, :]  # padded key row for each (query row, jy)
    cols = bx[:, None] * b + j[None, :]
    kp = jnp.pad(k, ((0, 0), (hh, hh), (hh, hh), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (hh, hh), (hh, hh), (0, 0), (0, 0)))
    # [B, Hq, Wq, win, win, heads, d]: every query's own window
    kw = kp[:, rows[:, None, :, None], cols[None, :, None, :]]
    vw = vp[:, rows[:, None, :, None], cols[None, :, None, :]]
    hp = lax.Precision.HIGHEST
    qk = jnp.einsum("byxhd,byxuwhd->byxhuw", q, kw, precision=hp)
    rh = rel_h[j[None, :] - iy[:, None] + ww - 1]  # [Hq, win, d]
    rw = rel_w[j[None, :] - ix[:, None] + ww - 1]  # [Wq, win, d]
    rel = (jnp.einsum("byxhd,yud->byxhu", q, rh, precision=hp)[..., :, None]
           + jnp.einsum("byxhd,xwd->byxhw", q, rw, precision=hp)[..., None, :])
    logits = (qk + rel) * scale if scale_pos_embed else qk * scale + rel
    if mask_padding:
        inside_y = (rows >= hh) & (rows < hh + k.shape[1])  # [Hq, win]
        inside_x = (cols >= hh) & (cols < hh + k.shape[2])
        inside = inside_y[:, None, None, :, None] & inside_x[None, :, None, None, :]
        logits = jnp.where(inside, logits, -jnp.inf)
    p = jax.nn.softmax(logits.reshape(*logits.shape[:4], -1), axis=-1).reshape(logits.shape)
    return jnp.einsum("byxhuw,byxuwhe->byxhe", p, vw, precision=hp)
