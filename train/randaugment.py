"""RandAugment in JAX (Cubuk et al. 2020) as timm runs it for DeiT (``rand-m9-mstd0.5-inc1``), on one
``uint8 [H, W, C]`` image inside the jitted training step.

``num_ops`` times: an op drawn uniformly from :data:`OPS`, applied with probability ``prob`` at
magnitude ``m ~ N(magnitude, magnitude_std)`` clipped to [0, 10]; signed ops (rotate, shear,
translate, the enhancements) take a random sign. Magnitudes map to arguments as timm's
``_RAND_INCREASING_TRANSFORMS``: rotate ``30 m/10`` degrees, shear ``0.3 m/10``, translate
``0.45 m/10`` of the side, posterize to ``4 - int(4 m/10)`` bits, solarize above ``256 - int(256 m/10)``,
solarize-add ``int(110 m/10)`` below 128, colour / contrast / brightness / sharpness factor
``1 +- 0.9 m/10``; geometric ops fill with ``fill`` (timm: the data mean). The ops follow PIL's
(``ImageOps``, ``ImageEnhance``, ``Image.transform``) and are tested against them; geometric ops sample
bilinearly (timm draws bilinear or bicubic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _u8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def _luma(x: jax.Array) -> jax.Array:
    """PIL's ``convert("L")`` (ITU-R 601-2) of float ``[H, W, C]``: ``[H, W]``; grey images are their own."""
    if x.shape[-1] < 3:
        return x[..., 0]
    return jnp.floor((x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) / 65536)


def _blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array) -> jax.Array:
    """``ImageEnhance`` (``Image.blend``): ``degenerate + factor * (x - degenerate)``, clipped and truncated
    to uint8 as PIL does."""
    return jnp.clip(jnp.floor(degenerate + factor * (x - degenerate)), 0, 255).astype(jnp.uint8)


def auto_contrast(x: jax.Array) -> jax.Array:
    """``ImageOps.autocontrast``: each channel stretched from its [min, max] to [0, 255]."""
    lo = x.min(axis=(0, 1), keepdims=True)
    hi = x.max(axis=(0, 1), keepdims=True)
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    return jnp.where(hi > lo, _u8(jnp.floor((x - lo) * scale)), x.astype(jnp.uint8))


def equalize(x: jax.Array) -> jax.Array:
    """``ImageOps.equalize``: per channel, the histogram-equalising lookup table of PIL."""
    def channel(c):
        c = c.astype(jnp.int32)
        hist = jnp.bincount(c.ravel(), length=256)
        last = hist[255 - jnp.argmax(hist[::-1] > 0)]  # count of the highest present value
        step = (c.size - last) // 255
        lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
        return jnp.where(step > 0, jnp.clip(lut, 0, 255)[c], c).astype(jnp.uint8)

    return jnp.stack([channel(x[..., i]) for i in range(x.shape[-1])], axis=-1)


def posterize(x: jax.Array, bits: jax.Array) -> jax.Array:
    """``ImageOps.posterize``: keep the top ``bits`` bits of each value."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return (x.astype(jnp.int32) & mask).astype(jnp.uint8)


def solarize(x: jax.Array, threshold: jax.Array) -> jax.Array:
    """``ImageOps.solarize``: values at or above ``threshold`` inverted."""
    return jnp.where(x < threshold, x, 255.0 - x).astype(jnp.uint8)


def solarize_add(x: jax.Array, add: jax.Array, threshold: float = 128) -> jax.Array:
    """timm's ``solarize_add``: ``add`` added (clipped) to values below ``threshold``."""
    return jnp.where(x < threshold, jnp.minimum(x + add, 255.0), x).astype(jnp.uint8)


def color(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``ImageEnhance.Color``: blend with the greyscale image."""
    return _blend(_luma(x)[..., None], x, factor)


def contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``ImageEnhance.Contrast``: blend with the mean grey level."""
    return _blend(jnp.floor(jnp.mean(_luma(x)) + 0.5), x, factor)


def brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``ImageEnhance.Brightness``: blend with black."""
    return _blend(jnp.zeros_like(x), x, factor)


def sharpness(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``ImageEnhance.Sharpness``: blend with PIL's SMOOTH filter (3x3, centre 5, total 13) inside the
    one-pixel border, which keeps its values."""
    k = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    h, w = x.shape[:2]
    windows = sum(k[i, j] * x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    smooth = x.at[1:-1, 1:-1].set(jnp.round(windows))
    return _blend(smooth, x, factor)


def affine(x: jax.Array, matrix: jax.Array, fill: Sequence[float]) -> jax.Array:
    """``Image.transform(AFFINE, matrix)``: output pixel ``(u, v)`` (centres ``+ 0.5``) samples the input at
    ``(a u + b v + c, d u + e v + f)`` bilinearly; outside the image: ``fill``."""
    h, w, ch = x.shape
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    v, u = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    sx, sy = a * u + b * v + c - 0.5, d * u + e * v + f - 0.5  # (input pixel centres at integers)
    x0, y0 = jnp.floor(sx), jnp.floor(sy)
    out = jnp.zeros((h, w, ch), jnp.float32)
    fill = jnp.asarray(fill, jnp.float32)[:ch]
    xf = x.astype(jnp.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            wgt = (1 - jnp.abs(sx - xx)) * (1 - jnp.abs(sy - yy))
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            val = xf[jnp.clip(yy, 0, h - 1).astype(jnp.int32), jnp.clip(xx, 0, w - 1).astype(jnp.int32)]
            out = out + wgt[..., None] * jnp.where(inside[..., None], val, fill)
    outside = (sx < -0.5) | (sx > w - 0.5) | (sy < -0.5) | (sy > h - 0.5)
    return _u8(jnp.where(outside[..., None], fill, out))


def rotate(x: jax.Array, degrees: jax.Array, fill: Sequence[float]) -> jax.Array:
    """``Image.rotate(degrees)``: counter-clockwise about the centre, same size."""
    h, w = x.shape[:2]
    t = -degrees * math.pi / 180.0
    cx, cy = w / 2.0, h / 2.0
    cos, sin = jnp.cos(t), jnp.sin(t)
    return affine(x, jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]), fill)


def _op(name: str, x: jax.Array, m: jax.Array, sign: jax.Array, fill: Sequence[float]) -> jax.Array:
    """One op at magnitude ``m`` (0-10) with ``sign`` (+-1), as timm's increasing transforms."""
    f, h, w = m / 10.0, x.shape[0], x.shape[1]
    xf = x.astype(jnp.float32)
    one, zero = jnp.ones(()), jnp.zeros(())
    if name == "AutoContrast":
        return auto_contrast(xf)
    if name == "Equalize":
        return equalize(x)
    if name == "Invert":
        return (255 - x.astype(jnp.int32)).astype(jnp.uint8)
    if name == "Rotate":
        return rotate(x, sign * 30.0 * f, fill)
    if name == "Posterize":
        return posterize(x, 4 - jnp.floor(4 * f).astype(jnp.int32))
    if name == "Solarize":
        return solarize(xf, 256 - jnp.floor(256 * f))
    if name == "SolarizeAdd":
        return solarize_add(xf, jnp.floor(110 * f))
    enhance = {"Color": color, "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness}
    if name in enhance:
        return enhance[name](xf, 1.0 + sign * 0.9 * f)
    s = sign * 0.3 * f
    t = sign * 0.45 * f
    matrix = {"ShearX": (one, s, zero, zero, one, zero), "ShearY": (one, zero, zero, s, one, zero),
              "TranslateX": (one, zero, t * w, zero, one, zero), "TranslateY": (one, zero, zero, zero, one, t * h)}
    return affine(x, jnp.stack(matrix[name]), fill)


def rand_augment(image: jax.Array, key: jax.Array, *, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, fill: Sequence[float] = (124.0, 116.0, 104.0),
                 ops: Sequence[str] = OPS) -> jax.Array:
    """RandAugment on one ``uint8 [H, W, C]`` image (see the module docstring); ``fill``: the pixel value
    (0-255 per channel) where geometric ops leave the image."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; known: {list(OPS)}")
    if image.dtype != jnp.uint8 or image.ndim != 3:
        raise ValueError(f"rand_augment takes one uint8 image [H, W, C], got {image.dtype} {image.shape}")
    branches = [lambda x, m, s, n=n: _op(n, x, m, s, fill) for n in ops]
    for k in jax.random.split(key, num_ops):
        k_op, k_apply, k_mag, k_sign = jax.random.split(k, 4)
        m = magnitude + (jax.random.normal(k_mag) * magnitude_std if magnitude_std > 0 else 0.0)
        m = jnp.clip(jnp.asarray(m, jnp.float32), 0.0, 10.0)
        sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
        out = jax.lax.switch(jax.random.randint(k_op, (), 0, len(branches)), branches, image, m, sign)
        image = jnp.where(jax.random.bernoulli(k_apply, prob), out, image)
    return image
