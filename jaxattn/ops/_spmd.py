"""Shared pieces of the sequence-parallel ops: argument checks and a ``shard_map`` that works
across jax versions."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from jaxattn.ops import _checks


def check_mesh(mesh: Any, axis: str, batch_axis: str | None = None) -> None:
    """Clear errors for a mesh that is not a ``Mesh`` or lacks ``axis`` / ``batch_axis``."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, ax in (("axis", axis), ("batch_axis", batch_axis)):
        if ax is not None and ax not in mesh.axis_names:
            raise ValueError(f"{name} {ax!r} is not an axis of the mesh (axes {mesh.axis_names})")
    if batch_axis == axis:
        raise ValueError(f"batch_axis and axis must differ, both are {axis!r}")


def layer_setting(mesh: Any, axis: str, batch_axis: str | None) -> tuple | None:
    """What a model's ``enable_sequence_parallel`` stores on its layers: ``(mesh, axis, batch_axis)``
    after :func:`check_mesh`, or None (off) for ``mesh=None``."""
    if mesh is None:
        return None
    check_mesh(mesh, axis, batch_axis)
    return mesh, axis, batch_axis


def check_split(q: Any, mesh: Mesh, axis: str, batch_axis: str | None = None) -> None:
    """``q [batch, seq, heads, head_dim]``: seq divisible by the ``axis`` size, batch by ``batch_axis``'s."""
    _checks.check_rank("q", q, 4, "[batch, seq, heads, head_dim]")
    size = mesh.shape[axis]
    if q.shape[1] % size:
        raise ValueError(f"q: sequence length {q.shape[1]} must be divisible by the size {size} of mesh "
                         f"axis {axis!r} (pad the sequence)")
    if batch_axis is not None and q.shape[0] % mesh.shape[batch_axis]:
        raise ValueError(f"q: batch {q.shape[0]} must be divisible by the size {mesh.shape[batch_axis]} "
                         f"of mesh axis {batch_axis!r}")


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (``jax.experimental.shard_map`` on old jax)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as _shard_map  # jax < 0.7

    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
