"""``grouped_matmul``: the rows of ``lhs`` in consecutive groups, each group times its own matrix (a
mixture of experts' expert matmuls, :func:`jax.lax.ragged_dot`'s contract).

``impl="pallas"`` runs :mod:`jaxattn.pallas.grouped_matmul` (each row multiplies its own group's matrix
only; a kernel backward for both operands); ``"xla"`` is :func:`jax.lax.ragged_dot`, which XLA's GPU
compiler runs as one dense matmul over every group (G times the work); ``"auto"`` picks the kernel on a
GPU. ``python -m jaxattn.bench moe`` times them in an expert layer.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxattn.ops import _checks
from jaxattn.pallas import _common
from jaxattn.pallas.grouped_matmul import MAX_RHS_ELEMENTS, grouped_matmul_kernel

__all__ = ["grouped_matmul"]


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=None, impl: Literal["auto", "pallas", "xla"] = "auto") -> jax.Array:
    """``out [M, N]``: row ``r`` of ``lhs [M, K]`` times ``rhs[g] [K, N]`` for the group ``g`` it falls in,
    the groups taking ``group_sizes [G]`` (int) consecutive rows in order; rows past their sum give zeros.
    Accumulates in fp32; the result is ``preferred_element_type`` (default ``lhs``' dtype). Differentiable
    in ``lhs`` and ``rhs``."""
    _checks.check_impl(impl)
    _checks.check_rank("lhs", lhs, 2, "[rows, K]")
    _checks.check_rank("rhs", rhs, 3, "[groups, K, N]")
    _checks.check_float_dtype("lhs", lhs)
    _checks.check_same_dtype(lhs=lhs, rhs=rhs)
    _checks.check_dim("rhs", rhs, 1, lhs.shape[1], "contraction size K", "lhs")
    if jnp.ndim(group_sizes) != 1 or group_sizes.shape[0] != rhs.shape[0] \
            or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be int [groups] = ({rhs.shape[0]},) like rhs' first axis, got "
                         f"{jnp.dtype(getattr(group_sizes, 'dtype', None)).name} {tuple(jnp.shape(group_sizes))}")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    kernel = impl == "pallas" or (impl == "auto" and _common.targets_gpu())
    if kernel and math.prod(rhs.shape) <= MAX_RHS_ELEMENTS and not _checks.empty(lhs, rhs):
        return grouped_matmul_kernel(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype=out_dtype)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(out_dtype)
