"""MXFP4 weights (the OCP microscaling format gpt-oss ships its experts in): each run of 32 values along
the contraction axis shares one power-of-two scale (E8M0: ``2 ** (code - 127)``), each value an FP4 (e2m1)
code: sign bit 3, exponent bits 2-1, mantissa bit 0, the values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
negatives. 4.25 bits a value: a quarter of bf16's memory.

:class:`MXFP4` holds a matrix ``[..., K, N]`` (``K`` a multiple of 32) as one uint8 array ``packed``
``[..., K / 2 + K / 32, N]``, the layout :func:`jaxattn.grouped_matmul`'s kernel reads: row ``16 g + i``
(``i < 16``) holds rows ``32 g + i`` (low nibble) and ``32 g + 16 + i`` (high nibble) of group ``g``'s codes,
row ``K / 2 + g`` its scale codes. ``jaxattn.models.moe_hf`` converts gpt-oss's ``*_blocks`` / ``*_scales``
to and from it without rounding anything.

:func:`quantize_mxfp4` picks each group's scale as the least power of two ``s`` with ``amax <= 6 s`` (``amax``
its largest magnitude; the OCP spec's ``2 ** (floor(log2 amax) - 2)`` would saturate values up to 25% above
6 s), and rounds each value to the nearest FP4 value, ties to even.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MXFP4", "FP4_VALUES", "quantize_mxfp4", "dequantize", "packed_rows", "contraction_size"]

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
GROUP = 32  # values per scale
# magnitude thresholds between consecutive FP4 codes; True: a tie rounds up (to the even code)
_ROUNDING = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def packed_rows(k: int) -> int:
    """The packed array's rows for a contraction size ``k`` (a multiple of 32)."""
    return k // 2 + k // GROUP


def contraction_size(rows: int) -> int:
    """``K`` of a packed array with ``rows`` rows (``17 K / 32``); ``ValueError`` if no ``K`` fits."""
    if rows <= 0 or rows % 17:
        raise ValueError(f"an MXFP4 packed array has 17 * K / 32 rows (K a multiple of 32), got {rows} rows")
    return rows // 17 * GROUP


class MXFP4(NamedTuple):
    """A matrix ``[..., K, N]`` in MXFP4, stored as ``packed`` uint8 ``[..., 17 K / 32, N]`` (module docstring).
    A pytree (passes through ``jit``); ``shape`` is the matrix's."""

    packed: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, rows, n = self.packed.shape
        return (*lead, contraction_size(rows), n)

    @property
    def ndim(self) -> int:
        return self.packed.ndim


def _codes(x: jax.Array) -> jax.Array:
    """FP4 codes (int32) of ``x`` (already scaled): nearest value, ties to even, saturated at 6."""
    mag = jnp.abs(x)
    code = sum(((mag >= t) if up else (mag > t)).astype(jnp.int32) for t, up in _ROUNDING)
    return jnp.where(x < 0, code + 8, code)


def quantize_mxfp4(w: jax.Array) -> MXFP4:
    """``w [..., K, N]`` (``K`` a multiple of 32) in MXFP4, one scale per 32 rows of each column."""
    *lead, k, n = w.shape
    if k % GROUP:
        raise ValueError(f"MXFP4 quantizes groups of 32 along the contraction axis: K (axis -2) must be a "
                         f"multiple of 32, got shape {tuple(w.shape)}")
    g = w.astype(jnp.float32).reshape(*lead, k // GROUP, GROUP, n)
    amax = jnp.max(jnp.abs(g), axis=-2)  # [..., G, N]
    mant, e = jnp.frexp(amax)  # amax = mant * 2**e, mant in [0.5, 1)
    exponent = jnp.where(mant > 0.75, e - 2, e - 3)  # the least s with amax <= 6 * 2**s
    scale = jnp.where(amax > 0, jnp.clip(exponent + 127, 0, 254), 0).astype(jnp.int32)
    codes = _codes(g * jnp.ldexp(jnp.float32(1), 127 - scale)[..., None, :])  # [..., G, 32, N]
    byte = codes[..., :16, :] | (codes[..., 16:, :] << 4)  # [..., G, 16, N]
    blocks = byte.reshape(*lead, k // 2, n).astype(jnp.uint8)
    return MXFP4(jnp.concatenate([blocks, scale.astype(jnp.uint8)], axis=-2))


def dequantize(w: MXFP4, dtype=jnp.float32) -> jax.Array:
    """The matrix ``[..., K, N]`` of ``w`` in ``dtype`` (exact in fp32 and bf16)."""
    *lead, k, n = w.shape
    blocks = w.packed[..., : k // 2, :].reshape(*lead, k // GROUP, 16, n).astype(jnp.int32)
    scale = w.packed[..., k // 2:, :].astype(jnp.int32)  # [..., G, N]
    table = jnp.asarray(FP4_VALUES)
    values = jnp.concatenate([table[blocks & 15], table[blocks >> 4]], axis=-2)  # [..., G, 32, N]
    values = jnp.ldexp(values, (scale - 127)[..., None, :])
    return values.reshape(*lead, k, n).astype(dtype)
