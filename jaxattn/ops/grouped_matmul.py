"""``grouped_matmul``: the rows of ``lhs`` in consecutive groups, each group times its own matrix (a
mixture of experts' expert matmuls, :func:`jax.lax.ragged_dot`'s contract).

``impl="pallas"`` runs :mod:`jaxattn.pallas.grouped_matmul` (each row multiplies its own group's matrix
only; a kernel backward for both operands); ``"xla"`` is :func:`jax.lax.ragged_dot`, which XLA's GPU
compiler runs as one dense matmul over every group (G times the work); ``"auto"`` picks the kernel on a
GPU. ``python -m jaxattn.bench moe`` times them in an expert layer.

``rhs`` may be an :class:`~jaxattn.ops.mxfp4.MXFP4` matrix (gpt-oss's expert weights at 4.25 bits a value):
the kernel dequantizes it a tile at a time into ``lhs``' dtype, so the weights stay packed in memory; the
XLA path dequantizes the whole of it first. Such weights are constants: the op differentiates in ``lhs``
only.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxattn.ops import _checks
from jaxattn.ops.mxfp4 import MXFP4, dequantize
from jaxattn.pallas import _common
from jaxattn.pallas.grouped_matmul import MAX_RHS_ELEMENTS, grouped_matmul_kernel

__all__ = ["grouped_matmul"]


def grouped_matmul(lhs: jax.Array, rhs: jax.Array | MXFP4, group_sizes: jax.Array, *,
                   preferred_element_type=None, impl: Literal["auto", "pallas", "xla"] = "auto") -> jax.Array:
    """``out [M, N]``: row ``r`` of ``lhs [M, K]`` times ``rhs[g] [K, N]`` for the group ``g`` it falls in,
    the groups taking ``group_sizes [G]`` (int) consecutive rows in order; rows past their sum give zeros.
    Accumulates in fp32; the result is ``preferred_element_type`` (default ``lhs``' dtype). Differentiable
    in ``lhs`` and ``rhs``."""
    _checks.check_impl(impl)
    _checks.check_rank("lhs", lhs, 2, "[rows, K]")
    _checks.check_float_dtype("lhs", lhs)
    quantized = isinstance(rhs, MXFP4)
    if quantized:
        if rhs.packed.ndim != 3 or rhs.packed.dtype != jnp.uint8:
            raise ValueError(f"rhs (MXFP4) must hold packed uint8 [groups, 17 K / 32, N], got "
                             f"{rhs.packed.dtype} {tuple(rhs.packed.shape)}")
        if rhs.shape[1] != lhs.shape[1]:
            raise ValueError(f"rhs (MXFP4) has contraction size K = {rhs.shape[1]}, lhs {tuple(lhs.shape)} "
                             f"has {lhs.shape[1]}")
    else:
        _checks.check_rank("rhs", rhs, 3, "[groups, K, N]")
        _checks.check_same_dtype(lhs=lhs, rhs=rhs)
        _checks.check_dim("rhs", rhs, 1, lhs.shape[1], "contraction size K", "lhs")
    if jnp.ndim(group_sizes) != 1 or group_sizes.shape[0] != rhs.shape[0] \
            or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be int [groups] = ({rhs.shape[0]},) like rhs' first axis, got "
                         f"{jnp.dtype(getattr(group_sizes, 'dtype', None)).name} {tuple(jnp.shape(group_sizes))}")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    kernel = impl == "pallas" or (impl == "auto" and _common.targets_gpu())
    stored = rhs.packed if quantized else rhs
    if kernel and math.prod(stored.shape) <= MAX_RHS_ELEMENTS and not _checks.empty(lhs, stored):
        return grouped_matmul_kernel(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype=out_dtype)
    if quantized:  # (constants: no gradient reaches the packed bytes)
        rhs = dequantize(MXFP4(jax.lax.stop_gradient(rhs.packed)), lhs.dtype)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(out_dtype)
