"""Sequence-parallel Lightning attention (LASP-style) with JAX's SPMD: the sequence is split into
contiguous shards over a mesh axis, each device runs the single-device op on its shard from a zero
state, the devices exchange their shards' final states (one ``all_gather`` of
``[batch, heads, head_dim, v_head_dim]`` per device, independent of the sequence length), and each
shard adds the contribution of the state flowing in from the shards before it:

    S_in(i) = λ^(n·i) S_0 + Σ_{j<i} λ^(n·(i-1-j)) S_loc(j)        (n = shard length, λ = exp(-s))
    o_t     = o_loc_t + λ^t q_t S_in(i)                          (t = 1..n within the shard)
    S_final = λ^(n·P) S_0 + Σ_j λ^(n·(P-1-j)) S_loc(j)            (P shards)

which is exact (the recurrence ``S_t = λ S_{t-1} + k_tᵀ v_t`` is linear in the state). With packed
``segment_ids`` (documents may span shards) the same all-gather carries each shard's first and last
ids and inner boundary count, and a state reaches on only within its document. Gradients
flow through the collective (its transpose is a reduce-scatter) and through the kernel's
``custom_vjp``, so the same function trains.

* ``lightning_attention(..., sequence_axis="sp")`` inside a ``shard_map`` whose inputs are split
  along the sequence over mesh axis ``"sp"``;
* :func:`lightning_attention_sp` wraps that ``shard_map`` for global arrays and a ``Mesh``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxattn.ops import _spmd
from jaxattn.pallas._common import document_index

__all__ = ["lightning_attention_sp", "sequence_parallel_combine"]


def _document_masks(segment_ids: jax.Array, axis: str, idx: jax.Array):
    """Packed documents across shards (runs of equal ids, possibly spanning shards): one ``all_gather``
    of each shard's first and last ids and inner boundary count gives every shard's last global
    document ``ends [P, b]``. Returns ``(ends, prev, rows)``: ``prev [b]`` the document of the state
    entering this shard (the previous shard's last; 0 for the first shard), ``rows [b, n]`` whether a
    row reads it (in the shard's first run, which continues that document)."""
    local = document_index(segment_ids)  # [b, n]: runs within this shard
    info = lax.all_gather(jnp.stack([segment_ids[:, 0], segment_ids[:, -1], local[:, -1]], -1), axis)
    first, last, inner = info[..., 0], info[..., 1], info[..., 2]  # [P, b]
    edge = jnp.concatenate([jnp.zeros_like(first[:1]), (first[1:] != last[:-1]).astype(inner.dtype)], axis=0)
    ends = jnp.cumsum(edge + inner, axis=0)  # each shard's last document, counted along the whole row
    start = jnp.take(ends - inner, idx, axis=0)  # this shard's first document
    prev = jnp.where(idx > 0, jnp.take(ends, jnp.maximum(idx - 1, 0), axis=0), 0)
    rows = (local == 0) & (start == prev)[:, None]
    return ends, prev, rows


def sequence_parallel_combine(q: jax.Array, out_local: jax.Array, state_local: jax.Array, slope: jax.Array,
                              axis: str, initial_state: jax.Array | None = None,
                              segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Inside ``shard_map`` over ``axis``: the shard's exact output and the global final state from
    its zero-state result (``out_local [b, n, h, e]``, ``state_local [b, h, d, e]`` fp32; with the
    shard's ``segment_ids [b, n]``, those of the packed op on the shard)."""
    n = q.shape[1]
    idx = lax.axis_index(axis)
    shards = lax.axis_size(axis)
    s = lax.stop_gradient(slope.astype(jnp.float32))  # [h]
    states = lax.all_gather(state_local.astype(jnp.float32), axis)  # [P, b, h, d, e]
    j = jnp.arange(states.shape[0])
    # weights of the earlier shards' states in this shard's incoming state, and in the final state
    w_in = jnp.where((j < idx)[:, None], jnp.exp(-s[None] * n * jnp.maximum(idx - 1 - j, 0)[:, None]), 0.0)
    w_fin = jnp.exp(-s[None] * n * (shards - 1 - j)[:, None])
    s0_in, s0_fin = jnp.exp(-s * n * idx), jnp.exp(-s * n * shards)  # [h]
    w_in, w_fin = w_in[:, None], w_fin[:, None]  # [P, 1, h]: (per batch row with documents)
    s0_in, s0_fin = s0_in[None], s0_fin[None]  # [1, h]
    rows = None
    if segment_ids is not None:  # a state reaches on only within its document
        ends, prev, rows = _document_masks(segment_ids, axis, idx)
        w_in = w_in * (ends == prev[None])[..., None]
        w_fin = w_fin * (ends == ends[-1:])[..., None]
        s0_in = s0_in * (prev == 0)[:, None]
        s0_fin = s0_fin * (ends[-1] == 0)[:, None]
    hp = lax.Precision.HIGHEST
    s_in = jnp.einsum("pbh,pbhde->bhde", jnp.broadcast_to(w_in, states.shape[:3]), states, precision=hp)
    final = jnp.einsum("pbh,pbhde->bhde", jnp.broadcast_to(w_fin, states.shape[:3]), states, precision=hp)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        s_in = s_in + s0_in[:, :, None, None] * s0
        final = final + s0_fin[:, :, None, None] * s0
    decay = jnp.exp(-s[None] * jnp.arange(1, n + 1, dtype=jnp.float32)[:, None])  # [n, h]: λ^t
    qd = q.astype(jnp.float32) * decay[None, :, :, None]
    if rows is not None:
        qd = qd * rows[:, :, None, None]
    out = out_local.astype(jnp.float32) + jnp.einsum("bnhd,bhde->bnhe", qd, s_in, precision=hp)
    return out.astype(out_local.dtype), final


def lightning_attention_sp(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slope: jax.Array,
    *,
    mesh: Mesh,
    axis: str,
    batch_axis: str | None = None,
    initial_state: jax.Array | None = None,
    return_state: bool = False,
    impl: Literal["auto", "pallas", "xla"] = "auto",
    segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`jaxattn.lightning_attention` with the sequence split over ``mesh`` axis ``axis``
    (and, optionally, the batch over ``batch_axis``). Same arguments and results; ``seq`` must be
    divisible by the size of ``axis`` (shard ``i`` holds positions ``[i·n, (i+1)·n)``); packed
    ``segment_ids [batch, seq]`` are split with the sequence (documents may span shards)."""
    from jaxattn.ops.lightning import _check_slope, lightning_attention

    _spmd.check_mesh(mesh, axis, batch_axis)
    _spmd.check_split(q, mesh, axis, batch_axis)
    _check_slope(slope, q.shape[2])
    seq_spec, b_spec = P(batch_axis, axis), P(batch_axis)

    def body(q, k, v, slope, *rest):
        s0 = rest[0] if initial_state is not None else None
        seg = rest[-1] if segment_ids is not None else None
        out, state = lightning_attention(q, k, v, slope, initial_state=s0, return_state=True, impl=impl,
                                         sequence_axis=axis, segment_ids=seg)
        return out, state

    if segment_ids is not None and tuple(segment_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"segment_ids must have shape [batch, seq] = {tuple(q.shape[:2])}, got {tuple(segment_ids.shape)}")
    args = (q, k, v, slope) + ((initial_state,) if initial_state is not None else ()) + (
        (segment_ids,) if segment_ids is not None else ())
    specs = (seq_spec, seq_spec, seq_spec, P()) + ((b_spec,) if initial_state is not None else ()) + (
        (seq_spec,) if segment_ids is not None else ())
    out, state = _spmd.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(seq_spec, b_spec))(*args)
    return (out, state) if return_state else out
