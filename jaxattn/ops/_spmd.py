"""Shared pieces of the sequence-parallel ops: argument checks and a ``shard_map`` that works
across jax versions; batch parallelism for the ops' Pallas kernels (:func:`batch_parallel`); and the
switch for expert parallelism (:func:`expert_parallel`, :mod:`jaxattn.models.moe_parallel`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

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


def use_shards(setting: tuple | None, shape: tuple[int, ...], forward: bool) -> bool:
    """Whether a layer with ``setting`` (:func:`layer_setting`'s, or None) runs sequence parallel on ``[batch, seq,
    ...]`` inputs: always in the model's forward (``forward``; shapes that do not split raise there), and in a
    prefill only when the batch and the sequence split evenly over the mesh (a one-row prompt after sequence-parallel
    training runs on one device's view)."""
    if setting is None:
        return False
    mesh, axis, batch_axis = setting[:3]
    return forward or (shape[1] % mesh.shape[axis] == 0 and (batch_axis is None or shape[0] % mesh.shape[batch_axis] == 0))


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


# (mesh, axis) while batch_parallel is active (read at trace time)
_BATCH_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("jaxattn_batch_parallel", default=None)


@contextlib.contextmanager
def batch_parallel(mesh: Mesh | None, axis: str = "data") -> Iterator[None]:
    """Within this context (read when a function is traced), the ops' Pallas kernels run per device on
    its shard of the batch: a ``shard_map`` over mesh axis ``axis`` splits their batched inputs (q, k, v,
    segment ids, per-row masks, states) and replicates the rest (slopes, sinks, score_mod tables), whose
    gradients ``shard_map``'s transpose sums over the devices.

    Why: XLA's SPMD partitioner cannot split a kernel (a custom call). Under a plain ``jit`` whose
    inputs are sharded over the batch, it gathers the whole batch to every device and runs the kernel
    on all of it there: data parallelism that does every device's attention on each device. The
    trainers (:class:`jaxattn.train.loop.Trainer`) trace their steps inside this context over their
    ``data`` axis. Results are the same either way (dropout masks too: each shard's kernels count
    batch rows from the shard's first global row). ``mesh=None``: off."""
    if mesh is not None:
        check_mesh(mesh, axis)
    token = _BATCH_PARALLEL.set(None if mesh is None else (mesh, axis))
    try:
        yield
    finally:
        _BATCH_PARALLEL.reset(token)


def batch_split(batch: int) -> tuple[Mesh, str] | None:
    """``(mesh, axis)`` to split a kernel's ``batch`` rows over under :func:`batch_parallel`, or None: no
    context, an axis of size 1, a batch the axis size does not divide, or inside a ``shard_map`` (ring
    attention's, sequence-parallel Lightning's, a user's: the shards are already the caller's)."""
    setting = _BATCH_PARALLEL.get()
    if setting is None:
        return None
    mesh, axis = setting
    size = mesh.shape[axis]
    if size == 1 or batch % size:
        return None
    if getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):
        return None
    return setting


def per_batch_shard(fn: Callable[..., Any], batched: Mapping[str, Any], replicated: Mapping[str, Any] | None = None,
                    *, allowed: bool = True) -> Any:
    """``fn(**batched, **replicated)``, the way a kernel call should run: under :func:`batch_parallel` (and
    ``allowed``), per device under ``shard_map``, each ``batched`` array (or pytree of arrays) split on its
    leading axis (the batch), the ``replicated`` ones whole, every output split on its leading axis, and
    ``fn`` given ``batch_offset`` (int32: the global index of the shard's first row); otherwise called
    as it is (``batch_offset`` left to its default). None values are left out (``fn``'s defaults apply)."""
    batched = {k: v for k, v in batched.items() if v is not None}
    replicated = {k: v for k, v in (replicated or {}).items() if v is not None}
    rows = jax.tree.leaves(batched)[0].shape[0]
    setting = batch_split(rows) if allowed else None
    if setting is None:
        return fn(**batched, **replicated)
    mesh, axis = setting
    names, local = [*batched, *replicated], rows // mesh.shape[axis]

    def body(*args):
        return fn(batch_offset=jax.lax.axis_index(axis) * local, **dict(zip(names, args)))

    specs = (P(axis),) * len(batched) + (P(),) * len(replicated)
    return shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(axis))(*batched.values(), *replicated.values())


_EXPERT_PARALLEL: contextvars.ContextVar = contextvars.ContextVar("jaxattn_expert_parallel", default=None)


@contextlib.contextmanager
def expert_parallel(mesh: Mesh | None, axis: str = "data", capacity_factor: float | None = None) -> Iterator[None]:
    """Within this context (read when a function is traced) mixtures of experts run expert-parallel over
    mesh axis ``axis`` (:mod:`jaxattn.models.moe_parallel`): their experts and the batch split over it. ``capacity_factor``:
    None (dropless) or the slots per destination device relative to an even share. ``mesh=None``: off."""
    if mesh is not None:
        check_mesh(mesh, axis)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {capacity_factor}")
    token = _EXPERT_PARALLEL.set(None if mesh is None else (mesh, axis, capacity_factor))
    try:
        yield
    finally:
        _EXPERT_PARALLEL.reset(token)


def expert_split(experts: int, tokens: int) -> tuple[Mesh, str, float | None] | None:
    """``(mesh, axis, capacity_factor)`` under :func:`expert_parallel` when the axis (size > 1) divides the
    experts and the tokens and no ``shard_map`` is already running; else None."""
    setting = _EXPERT_PARALLEL.get()
    if setting is None:
        return None
    mesh, axis, _ = setting
    size = mesh.shape[axis]
    if size == 1 or experts % size or tokens % size:
        return None
    if getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):
        return None
    return setting


def has_arrays(x: Any) -> bool:
    """Whether the pytree ``x`` holds a JAX array (traced or not): what an op passes through ``shard_map``."""
    return any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(x))


def as_arrays(x: Any) -> Any:
    """``x`` with its Python scalars as arrays (a tuple of offsets that mixes ints and traced scalars)."""
    return jax.tree.map(jax.numpy.asarray, x)
