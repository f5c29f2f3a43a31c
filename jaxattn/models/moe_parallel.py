"""Expert parallelism for :mod:`jaxattn.models.moe` (GShard / DeepSpeed-MoE style): the experts split over a
mesh axis, each device holding ``experts / P`` of them, and the tokens, split over the same axis by batch,
sent to the devices of the experts they pick and back, with two ``all_to_all`` exchanges each way.

Within :func:`expert_parallel` (``jaxattn.expert_parallel``, read while tracing), :func:`jaxattn.models.moe.moe_dispatch` runs under a
``shard_map`` over the axis. Per device:

1. its tokens' ``T * top_k`` assignments are sorted by expert, so by destination device, and each gets
   a slot in a ``[P, capacity, dim]`` send buffer (the local index of its expert beside it);
2. ``all_to_all``: device ``p`` receives every device's rows for its experts;
3. the received rows, grouped by local expert, go through the grouped matmuls (the Pallas kernel on a
   GPU) and the gated activation;
4. ``all_to_all`` back, and each token sums its assignments' outputs times its routing weights.

``capacity_factor=None`` (default) is dropless and exact: a device's whole ``T * top_k`` may go to one
device, so the send buffer has that many slots per destination (``P`` times the routed rows, in memory
and in the exchange). ``capacity_factor=c`` gives each destination ``ceil(c * T * top_k / P)`` slots:
an assignment past them (in expert order, then token order) is dropped, contributing zero (the
Switch / GShard convention; ``c >= P`` never drops).

Gradients follow (``all_to_all``'s transpose is the reverse exchange); each device's expert weights get
their own gradients, the router's are summed over the devices. The trainers' ``--expert-parallel``
shards the expert weights (and their optimizer state) over ``data`` and traces the step in this context.
Checked on 4 CPU devices against one device: ``tests/test_expert_parallel.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxattn.ops import _spmd
from jaxattn.ops._spmd import expert_parallel, expert_split

__all__ = ["expert_parallel", "expert_split", "ep_dispatch", "EXPERT_VARIABLES"]

# the MoE variables whose leading axis is the expert (what --expert-parallel shards)
EXPERT_VARIABLES = ("gate_up", "down", "gate_up_bias", "down_bias")

def capacity(assignments: int, devices: int, capacity_factor: float | None) -> int:
    """Send-buffer slots per destination device for a device's ``assignments`` (``T * top_k``) rows."""
    if capacity_factor is None:
        return assignments
    return max(1, min(assignments, math.ceil(capacity_factor * assignments / devices)))


def ep_dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: Any, w2: Any, b1: Any, b2: Any, *,
                mesh: Mesh, axis: str, capacity_factor: float | None,
                expert_mlp: Callable[..., jax.Array]) -> jax.Array:
    """The expert-parallel ``moe_dispatch``: ``x [T, D]``, routing ``weights`` / ``experts [T, k]`` split over
    ``axis`` by token, the expert weights ``w1``, ``w2`` (arrays or MXFP4) and biases (or None) by expert;
    ``expert_mlp(rows, w1, w2, b1, b2, sizes, local_expert) -> [R, D]`` (fp32) runs the grouped experts on
    rows sorted by local expert (``sizes`` rows each, the rest of no group). Returns ``[T, D]`` fp32."""
    devices = mesh.shape[axis]
    n_experts = jax.tree.leaves(w1)[0].shape[0]
    local_experts = n_experts // devices

    def body(x, weights, experts, w1, w2, b1=None, b2=None):
        t, k = experts.shape
        d = x.shape[1]
        cap = capacity(t * k, devices, capacity_factor)
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # by expert: so by destination device, then by token
        expert = flat[order]
        token, weight = order // k, weights.reshape(-1)[order].astype(jnp.float32)
        dest = expert // local_experts
        counts = jnp.zeros((devices,), jnp.int32).at[dest].add(1)
        slot = jnp.arange(t * k, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[dest]
        kept = slot < cap
        slot = jnp.where(kept, slot, cap)  # (out of bounds: dropped by the scatters, zero from the gather)
        send = jnp.zeros((devices, cap, d), x.dtype).at[dest, slot].set(x[token], mode="drop")
        send_expert = jnp.full((devices, cap), local_experts, jnp.int32).at[dest, slot].set(
            expert - dest * local_experts, mode="drop")  # (local_experts: an empty slot)
        rows = jax.lax.all_to_all(send, axis, 0, 0).reshape(devices * cap, d)
        row_expert = jax.lax.all_to_all(send_expert, axis, 0, 0).reshape(-1)
        by_expert = jnp.argsort(row_expert, stable=True)  # the empty slots last, in no group
        sizes = jnp.zeros((local_experts,), jnp.int32).at[row_expert].add(1, mode="drop")
        local = jnp.minimum(row_expert[by_expert], local_experts - 1)
        y = expert_mlp(rows[by_expert], w1, w2, b1, b2, sizes, local)
        y = jnp.zeros_like(y).at[by_expert].set(y).reshape(devices, cap, d)
        back = jax.lax.all_to_all(y, axis, 0, 0)
        mine = back.at[dest, slot].get(mode="fill", fill_value=0) * jnp.where(kept, weight, 0.0)[:, None]
        return jnp.zeros((t, d), jnp.float32).at[token].add(mine)

    split = {"x": x, "weights": weights, "experts": experts, "w1": w1, "w2": w2, "b1": b1, "b2": b2}
    split = {name: value for name, value in split.items() if value is not None}
    fn = _spmd.shard_map(lambda *a: body(**dict(zip(split, a))), mesh=mesh, in_specs=(P(axis),) * len(split),
                         out_specs=P(axis))
    return fn(*split.values())
