"""The gated delta rule (Gated DeltaNet, Yang, Kautz and Hatamizadeh 2024; DeltaNet with a decay gate, as Qwen3-Next
and Kimi Linear use it) as its token-by-token recurrence, in fp32: the oracle.

With a state ``S [d_k, d_v]`` per head, starting from ``S_0``, for each token ``t``::

    S_t = exp(g_t) (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ,    o_t = scale * q_tᵀ S_t

(``g_t <= 0`` the log decay, ``beta_t`` in [0, 1] the write strength: the state's prediction of ``v_t`` from
``k_t`` moves a fraction ``beta_t`` of the way to ``v_t``). Kimi Delta Attention (Kimi Linear) decays each key
channel at its own rate, ``g_t [d_k]``: ``S_t = (I - beta_t k_t k_tᵀ) diag(exp(g_t)) S_{t-1} + beta_t k_t
v_tᵀ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["gated_delta_reference"]


def gated_delta_reference(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                          scale: float | None = None, initial_state: jax.Array | None = None,
                          segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(o [B, N, H, d_v] fp32, final state [B, H, d_k, d_v] fp32)`` of ``q, k [B, N, H, d_k]``, ``v [B, N, H,
    d_v]``, ``g, beta [B, N, H]`` (or ``g [B, N, H, d_k]``: a decay per key channel) (module docstring; ``scale`` default ``d_k ** -0.5``). q and k may have ``H / r``
    heads: value head ``i`` then reads query / key head ``i // r``. ``segment_ids [B, N]``: packed documents, the
    state zeroed where the id changes."""
    if q.shape[2] != v.shape[2]:
        r = v.shape[2] // q.shape[2]
        q, k = (jnp.repeat(x, r, axis=2) for x in (q, k))
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    f32 = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731  (time first)
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    hp = lax.Precision.HIGHEST

    seg = jnp.zeros((b, n), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    starts = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)  # [B, N]

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t, start = xs  # [B, H, d], [B, H], [B]
        s = jnp.where(start[:, None, None, None], 0.0, s)  # (a new document)
        s = (jnp.exp(g_t)[..., None] if g_t.ndim == 3 else jnp.exp(g_t)[..., None, None]) * s  # (per channel: rows)
        pred = jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=hp)
        s = s + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * (v_t - pred), precision=hp)
        return s, scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=hp)

    s, o = lax.scan(step, s0, (f32(q), f32(k), f32(v), f32(g), f32(beta), jnp.moveaxis(starts, 1, 0)))
    return jnp.moveaxis(o, 0, 1), s
