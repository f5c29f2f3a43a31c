"""Ring attention: softmax attention with the sequence split over a mesh axis (Liu et al. 2023,
"Ring Attention with Blockwise Transformers"), with JAX's SPMD.

Each device keeps its contiguous query shard; the key/value shards travel around the ring
(``ppermute``, P - 1 hops). At every hop the device attends to the shard it holds with
:func:`jaxattn.attention` (the flash kernel, which returns the log-sum-exp) and merges the partial
result into its running one by the log-sum-exp:

    lse = logaddexp(lse_acc, lse_r),   o = e^(lse_acc - lse) o_acc + e^(lse_r - lse) o_r

which is exact. Causal: shard ``j`` is visible to query shard ``i`` fully when ``j < i``, under the
causal mask when ``j == i`` (equal shard lengths make it the ordinary square causal mask), and not
at all when ``j > i`` (that hop is skipped with ``lax.cond``). Gradients flow through ``ppermute``
(its transpose is the reverse permutation) and the kernel's ``custom_vjp``.

Attention dropout: each hop draws its block of the single-device mask (``dropout_offset`` =
(first batch row, ``i * n``, ``j * n``)), so the result equals :func:`jaxattn.attention` with the
same ``dropout_rng`` on the whole sequence; merging by the log-sum-exp stays exact because the
kernel's lse is that of the undropped weights.

* ``ring_attention(q, k, v, axis=...)`` inside a ``shard_map`` over ``axis``;
* :func:`ring_attention_sp` wraps that ``shard_map`` for global arrays and a ``Mesh``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas._common import merge_partials

__all__ = ["ring_attention", "ring_attention_sp"]


def _merge(o_acc, lse_acc, o_r, lse_r):
    """Merges two normalised partial attentions ``o [b, n, h, e]`` with ``lse [b, n, h]``."""
    return merge_partials(jnp.stack([o_acc, o_r], 1), jnp.stack([lse_acc, lse_r], 1))


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis: str, causal: bool = False,
                   scale: float | None = None, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                   batch_axis: str | None = None, impl: Literal["auto", "pallas", "xla"] = "auto",
                   return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Inside ``shard_map`` over ``axis``: this device's shard of ``softmax(q k^T) v`` where q, k, v
    ``[batch, seq/P, heads, head_dim]`` are its contiguous shards (shard ``i`` = positions
    ``[i·n, (i+1)·n)``; GQA as in :func:`jaxattn.attention`). ``dropout_rate`` / ``dropout_rng`` (the
    same key on every device): attention dropout with the single-device mask; ``batch_axis`` names
    the mesh axis the batch is split over, if any (the mask depends on the global batch row).
    Returns ``out`` in q's dtype (and the fp32 log-sum-exp ``[batch, seq/P, heads]``)."""
    from jaxattn.ops.attention import attention

    idx = lax.axis_index(axis)
    n_shards = int(lax.axis_size(axis))  # static inside shard_map
    perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    n = q.shape[1]
    b0 = lax.axis_index(batch_axis) * q.shape[0] if batch_axis is not None else 0

    def attend(k, v, src, diagonal: bool):
        o, lse = attention(q, k, v, causal=causal and diagonal, scale=scale, impl=impl, return_lse=True,
                           dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                           dropout_offset=(b0, idx * n, src * n))
        return o.astype(jnp.float32), lse.astype(jnp.float32)

    o_acc, lse_acc = attend(k, v, idx, True)
    for r in range(1, n_shards):
        k = lax.ppermute(k, axis, perm)
        v = lax.ppermute(v, axis, perm)
        src = (idx - r) % n_shards  # the shard this device now holds
        if causal:
            skip = (jnp.zeros_like(o_acc), jnp.full_like(lse_acc, -jnp.inf))
            o_r, lse_r = lax.cond(src < idx, lambda k, v: attend(k, v, src, False), lambda k, v: skip, k, v)
        else:
            o_r, lse_r = attend(k, v, src, False)
        o_acc, lse_acc = _merge(o_acc, lse_acc, o_r, lse_r)
    out = o_acc.astype(q.dtype)
    return (out, lse_acc) if return_lse else out


def ring_attention_sp(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis: str,
                      batch_axis: str | None = None, causal: bool = False, scale: float | None = None,
                      dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                      impl: Literal["auto", "pallas", "xla"] = "auto") -> jax.Array:
    """:func:`jaxattn.attention` (no masks or segment ids) with the sequence split over ``mesh``
    axis ``axis`` (and the batch over ``batch_axis``) by :func:`ring_attention`. q and k/v must
    have the same length, divisible by the size of ``axis``. With ``dropout_rate`` > 0 the result
    equals :func:`jaxattn.attention` with the same ``dropout_rng`` (the same mask)."""
    _spmd.check_mesh(mesh, axis, batch_axis)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 4, "[batch, seq, heads, head_dim]")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(f"ring attention needs q, k and v of one sequence length, got {q.shape[1]}, "
                         f"{k.shape[1]}, {v.shape[1]}")
    _spmd.check_split(q, mesh, axis, batch_axis)
    _checks.check_dropout(dropout_rate, dropout_rng)
    spec = P(batch_axis, axis)
    if not dropout_rate:
        body = lambda q, k, v: ring_attention(q, k, v, axis=axis, causal=causal, scale=scale, impl=impl)  # noqa: E731
        return _spmd.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)
    seed = _dropout_key_data(dropout_rng)  # raw uint32 key data: replicated into the shard_map

    def body(q, k, v, seed):
        return ring_attention(q, k, v, axis=axis, causal=causal, scale=scale, dropout_rate=dropout_rate,
                              dropout_rng=seed, batch_axis=batch_axis, impl=impl)

    return _spmd.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec)(q, k, v, seed)


def _dropout_key_data(rng: jax.Array) -> jax.Array:
    """A PRNG key as raw key data (typed keys become ``uint32[2]``); ``_dropout`` accepts both."""
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
