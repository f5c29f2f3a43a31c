"""fp32 oracle of L²ViT's linear global attention, in the quadratic ("qk-first") form.

With ``φ = ReLU``, per head ``h`` and query ``i``::

    s_ij = φ(q_i) · φ(k_j)
    o_i  = τ_h · Σ_j s_ij v_j / max(Σ_j s_ij, clamp)

(Zheng et al., "The Linear Attention Resurrection in Vision Transformer", arXiv 2501.16182;
``LinearAttention`` in ``ChuanyangZheng/L2ViT``, default ``clamp = 100``). Non-causal. The
``N x N`` matrix ``s`` is materialised on purpose: this is the form the paper uses for attention
maps, and it is independent of the KV-first computation in ``jaxattn.ops.linear_global``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_global_reference(q: jax.Array, k: jax.Array, v: jax.Array, temperature: jax.Array | float,
                            clamp: float = 100.0) -> jax.Array:
    """``q, k [B, N, H, D]``, ``v [B, N, H, E]``, ``temperature`` scalar or ``[H]`` ->
    ``[B, N, H, E]`` in ``q.dtype`` (computed in fp32)."""
    f32 = jnp.float32
    qf, kf, vf = jax.nn.relu(q.astype(f32)), jax.nn.relu(k.astype(f32)), v.astype(f32)
    s = jnp.einsum("bihd,bjhd->bhij", qf, kf, precision="highest")  # [B, H, N, N]
    denom = jnp.maximum(s.sum(-1), clamp)  # [B, H, N]
    o = jnp.einsum("bhij,bjhe->bihe", s / denom[..., None], vf, precision="highest")
    tau = jnp.broadcast_to(jnp.asarray(temperature, f32), (q.shape[2],))
    return (o * tau[:, None]).astype(q.dtype)
