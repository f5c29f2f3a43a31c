"""Gated linear attention as its token-by-token recurrence, in fp32: the oracle. With a state ``S [d_k, d_v]`` per
head, starting from ``S_0``, for each token ``t``::

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,    o_t = scale * q_tᵀ S_t

``g_t <= 0`` the log decay: one per head (Mamba-2's SSD, RetNet / Lightning with data-dependent decay,
flash-linear-attention's ``simple_gla``) or one per key channel, ``g_t [d_k]``, each state row decaying at its own
rate (GLA, Yang et al. 2023: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["gated_linear_reference"]


def gated_linear_reference(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, *, scale: float | None = None,
                           initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(o [B, N, H, d_v] fp32, final state [B, H, d_k, d_v] fp32)`` of ``q, k [B, N, H_k, d_k]`` (value head
    ``i`` reads head ``i // (H / H_k)``), ``v [B, N, H, d_v]``, ``g [B, N, H]`` or ``[B, N, H, d_k]``."""
    r = v.shape[2] // q.shape[2]
    q, k = (jnp.repeat(x, r, axis=2) for x in (q, k))
    b, _, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    s0 = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    hp = lax.Precision.HIGHEST

    def step(s, xs):
        q_t, k_t, v_t, g_t = xs
        decay = jnp.exp(g_t)[..., None] if g_t.ndim == 3 else jnp.exp(g_t)[..., None, None]
        s = decay * s + k_t[..., :, None] * v_t[..., None, :]
        return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=hp)

    time_first = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731
    s, o = lax.scan(step, s0, tuple(map(time_first, (q, k, v, g))))
    return jnp.moveaxis(o, 0, 1), s
