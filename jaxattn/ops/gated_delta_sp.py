"""Sequence-parallel gated delta rule with JAX's SPMD: the sequence is split into contiguous shards over a mesh axis.

The rule ``S_t = A_t S_{t-1} + beta_t k_t v_tᵀ`` (``A_t = exp(g_t) (I - beta_t k_t k_tᵀ)``, or with a decay per key
channel ``(I - beta_t k_t k_tᵀ) diag(exp(g_t))``) is affine in the state, so a shard of tokens maps the state
entering it to ``M S_in + B`` with ``M = A_n ... A_1`` (``[d_k, d_k]``) and ``B`` its final state from zero. Each
device gets ``B`` from the single-device op on its shard and ``M`` from the same op run on zero values from the
identity (the state's value columns are independent, so that run's final state is ``M``), the devices exchange
them (one ``all_gather`` of ``[batch, heads, d_k, d_k + d_v]`` per device, independent of the sequence length),
each composes the earlier shards' maps to its incoming state ``S_in(i) = M_{i-1} S_in(i-1) + B_{i-1}`` (``S_in(0)``
the initial state), and reruns its shard from it: three passes over the shard (two of them value-width ``d_k``
and ``d_v``, each at the op's speed), exact. With packed ``segment_ids`` (documents may span shards) a state
crosses a shard boundary only where the document continues (the ids on either side are equal); inside a shard
the op's own segment handling cuts it (``M`` is then zero). Gradients flow through the collective and the op's
kernels, so the same function trains.

* ``gated_delta_rule(..., sequence_axis="sp")`` inside a ``shard_map`` whose inputs are split along the sequence
  over mesh axis ``"sp"``;
* :func:`gated_delta_rule_sp` wraps that ``shard_map`` for global arrays and a ``Mesh``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxattn.ops import _spmd

__all__ = ["gated_delta_rule_sp", "sequence_parallel_gated_delta"]

_HP = lax.Precision.HIGHEST


def sequence_parallel_gated_delta(op, q, k, v, g, beta, axis: str, initial_state=None, segment_ids=None
                                  ) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map`` over ``axis``: ``(o, final state)`` of the whole sequence for this shard, where
    ``op(q, k, v, g, beta, initial_state, segment_ids) -> (o, state)`` is the single-device rule."""
    b, _, _, dk = q.shape
    h = v.shape[2]
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (b, h, dk, dk))
    _, m = op(q, k, jnp.zeros((*v.shape[:3], dk), v.dtype), g, beta, eye, segment_ids)  # M: the shard's map
    _, b_loc = op(q, k, v, g, beta, None, segment_ids)  # B: from a zero state
    ms, bs = lax.all_gather(m, axis), lax.all_gather(b_loc, axis)  # [P, b, h, d_k, d_k | d_v]
    shards = ms.shape[0]
    if segment_ids is not None:  # the document continues across the boundary before shard j (j >= 1)
        ends = lax.all_gather(jnp.stack([segment_ids[:, 0], segment_ids[:, -1]], -1), axis)  # [P, b, 2]
        cont = (ends[1:, :, 0] == ends[:-1, :, 1]).astype(jnp.float32)[..., None, None, None]  # [P - 1, b, 1, 1, 1]
    s = jnp.zeros(b_loc.shape, jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    incoming = [s]
    for j in range(shards):
        s = jnp.einsum("bhkl,bhlv->bhkv", ms[j], s, precision=_HP) + bs[j]
        if segment_ids is not None and j + 1 < shards:
            s = s * cont[j]
        incoming.append(s)
    s_in = jnp.take(jnp.stack(incoming[:-1]), lax.axis_index(axis), axis=0)
    o, _ = op(q, k, v, g, beta, s_in, segment_ids)
    return o, incoming[-1]


def gated_delta_rule_sp(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *, mesh: Mesh,
                        axis: str, batch_axis: str | None = None, scale: float | None = None,
                        initial_state: jax.Array | None = None, return_state: bool = False,
                        segment_ids: jax.Array | None = None,
                        impl: Literal["auto", "pallas", "xla"] = "auto") -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`jaxattn.gated_delta_rule` with the sequence split over ``mesh`` axis ``axis`` (and, optionally, the
    batch over ``batch_axis``). Same arguments and results; ``seq`` must be divisible by the size of ``axis``
    (shard ``i`` holds positions ``[i·n, (i+1)·n)``); packed ``segment_ids [batch, seq]`` are split with the
    sequence (documents may span shards)."""
    if beta is None:
        raise ValueError("beta must be a floating [batch, seq, heads] array (without the delta rule's beta: "
                         "jaxattn.gated_linear_attention_sp)")
    return sharded_rule(q, k, v, g, beta, mesh=mesh, axis=axis, batch_axis=batch_axis, scale=scale,
                        initial_state=initial_state, return_state=return_state, segment_ids=segment_ids, impl=impl)


def sharded_rule(q, k, v, g, beta, *, mesh, axis, batch_axis, scale, initial_state, return_state, segment_ids, impl):
    """:func:`gated_delta_rule_sp`, or with ``beta`` None gated linear attention's."""
    from jaxattn.ops.gated_delta import chunked_rule

    _spmd.check_mesh(mesh, axis, batch_axis)
    _spmd.check_split(q, mesh, axis, batch_axis)
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"segment_ids must have shape [batch, seq] = {tuple(q.shape[:2])}, got "
                         f"{tuple(segment_ids.shape)}")
    seq_spec, b_spec = P(batch_axis, axis), P(batch_axis)
    has_s0, has_seg = initial_state is not None, segment_ids is not None

    inputs = (q, k, v, g) + ((beta,) if beta is not None else ())

    def body(*args):
        (q, k, v, g), rest = args[:4], args[4:]
        b, rest = (rest[0], rest[1:]) if beta is not None else (None, rest)
        s0 = rest[0] if has_s0 else None
        seg = rest[-1] if has_seg else None
        return chunked_rule(q, k, v, g, b, scale=scale, initial_state=s0, return_state=True, impl=impl,
                            segment_ids=seg, sequence_axis=axis, cu_seqlens=None)

    args = inputs + ((initial_state,) if has_s0 else ()) + ((segment_ids,) if has_seg else ())
    specs = (seq_spec,) * len(inputs) + ((b_spec,) if has_s0 else ()) + ((seq_spec,) if has_seg else ())
    out, state = _spmd.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(seq_spec, b_spec))(*args)
    return (out, state) if return_state else out
