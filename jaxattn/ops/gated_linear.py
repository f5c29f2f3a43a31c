"""``jaxattn.gated_linear_attention``: causal linear attention with a data-dependent decay,
``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ``, ``o_t = scale q_tᵀ S_t`` (:mod:`jaxattn.reference.gated_linear`).

One log decay per head and token is Mamba-2's SSD (``g = dt * A``, ``k = B``, ``q = C``, ``v = dt * x``), RetNet's or
Lightning attention's decay made data-dependent (flash-linear-attention's ``simple_gla``); one per key channel,
``g [B, N, H, d_k]``, is GLA (Yang et al. 2023, fla's ``chunk_gla``). The chunked form is the gated delta rule's
(:mod:`jaxattn.ops.gated_delta`) without the delta rule: no triangular system, ``U = V``, so ``O = gamma Q S_0 + (Q
Kᵀ * Gamma) V`` and ``S_C = gamma_C S_0 + (gamma_C / gamma K)ᵀ V`` per chunk. It runs on the same kernels (their
``delta=False`` mode: :mod:`jaxattn.pallas.gated_delta`, with :mod:`jaxattn.pallas.channel_decay` per key channel),
forward and backward, and takes what the gated delta rule takes: q / k heads shared by several value heads, packed
documents (``segment_ids``), flash-linear-attention's varlen form (``cu_seqlens``, a state per document), sequence
parallelism (``sequence_axis``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jax.sharding import Mesh

from jaxattn.ops.gated_delta import _HP, chunked_rule, share_heads
from jaxattn.ops.gated_delta_sp import sharded_rule

__all__ = ["gated_linear_attention", "gated_linear_attention_sp", "gated_linear_attention_step"]


def gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float | None = None,
                           initial_state: jax.Array | None = None, return_state: bool = False,
                           segment_ids: jax.Array | None = None, cu_seqlens: jax.Array | None = None,
                           impl: Literal["auto", "pallas", "xla"] = "auto",
                           sequence_axis: str | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Gated linear attention (module docstring).

    Args:
      q, k: ``[batch, seq, h_k, d_k]``; v: ``[batch, seq, heads, d_v]`` (``heads`` a multiple of ``h_k``: each q /
        k head shared by ``heads / h_k`` consecutive value heads, as Mamba-2's groups).
      g: log decays ``<= 0``, ``[batch, seq, heads]`` (one per head) or ``[batch, seq, heads, d_k]`` (per key
        channel).
      scale: on the queries (default ``d_k ** -0.5``; Mamba-2: 1).
      initial_state: ``[batch, heads, d_k, d_v]`` (zeros if None); with ``cu_seqlens`` ``[N, heads, d_k, d_v]``.
      return_state: also return the final state (fp32; with ``cu_seqlens`` one per document).
      segment_ids: int ``[batch, seq]``: packed documents (runs of equal ids), each from a zero state.
      cu_seqlens: int ``[N + 1]``: ``N`` documents packed in one row ``[1, total, ...]``, each from its own
        initial state (flash-linear-attention's varlen form).
      impl: ``"pallas"`` (the chunked kernels; interpret mode without a GPU; head dims powers of two from 16 to
        256), ``"xla"`` (the chunked form in XLA, differentiable by autodiff), ``"auto"`` (the kernels on a GPU).
      sequence_axis: inside a ``shard_map`` splitting the sequence over that mesh axis: the whole sequence's result
        (:mod:`jaxattn.ops.gated_delta_sp`'s affine composition).

    Returns ``o [batch, seq, heads, d_v]`` in q's dtype (and the final state).
    """
    return chunked_rule(q, k, v, g, None, scale=scale, initial_state=initial_state, return_state=return_state,
                        segment_ids=segment_ids, impl=impl, sequence_axis=sequence_axis, cu_seqlens=cu_seqlens)


def gated_linear_attention_sp(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, mesh: Mesh, axis: str,
                              batch_axis: str | None = None, scale: float | None = None,
                              initial_state: jax.Array | None = None, return_state: bool = False,
                              segment_ids: jax.Array | None = None,
                              impl: Literal["auto", "pallas", "xla"] = "auto") -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`gated_linear_attention` with the sequence split over ``mesh`` axis ``axis`` (and the batch over
    ``batch_axis``), on global arrays (as :func:`jaxattn.gated_delta_rule_sp`)."""
    return sharded_rule(q, k, v, g, None, mesh=mesh, axis=axis, batch_axis=batch_axis, scale=scale,
                        initial_state=initial_state, return_state=return_state, segment_ids=segment_ids, impl=impl)


def gated_linear_attention_step(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, state: jax.Array, *,
                                scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step: ``q, k [batch, h_k, d_k]``, ``v [batch, heads, d_v]``, ``g [batch, heads]`` (or ``[batch,
    heads, d_k]``), ``state [batch, heads, d_k, d_v]`` -> ``(o [batch, heads, d_v]`` in q's dtype, ``state')``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = (share_heads(x, v.shape[1]) for x in (q, k))
    decay = jnp.exp(g.astype(jnp.float32))
    s = (decay[..., None] if decay.ndim == 3 else decay[..., None, None]) * state.astype(jnp.float32)
    s = s + jnp.einsum("bhk,bhv->bhkv", k.astype(jnp.float32), v.astype(jnp.float32), precision=_HP)
    o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32), s, precision=_HP)
    return o.astype(q.dtype), s
