"""Causal linear attention with per-head exponential decay (Lightning Attention),
written from the math in fp32: a dense form and a recurrence.

``o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j`` with ``lambda_h = exp(-slope_h)``;
no softmax, no 1/sqrt(d), no normaliser. With an initial state ``S0`` ``[d, e]``
the recurrence is ``S_n = lambda S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``, ``S_{-1} = S0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def lightning_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, slope: jax.Array,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense ``((Q K^T) * M) V``, ``M_ij = lambda^(i-j)`` for ``j <= i``.

    q, k ``[B, N, H, d]``; v ``[B, N, H, e]``; slope ``[H]``; initial_state ``[B, H, d, e]``.
    Returns fp32 ``out [B, N, H, e]`` and the final state ``[B, H, d, e]``.
    """
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = slope.astype(jnp.float32)
    n = q.shape[1]
    i = jnp.arange(n)
    diff = (i[:, None] - i[None, :]).astype(jnp.float32)
    m = jnp.where(diff >= 0, jnp.exp(-s[:, None, None] * jnp.maximum(diff, 0)), 0.0)  # [H, N, N]
    hp = lax.Precision.HIGHEST
    scores = jnp.einsum("bihd,bjhd->bhij", q, k, precision=hp) * m[None]
    out = jnp.einsum("bhij,bjhe->bihe", scores, v, precision=hp)
    # final state: sum_j lambda^(N-1-j) k_j^T v_j (+ lambda^N S0)
    w = jnp.exp(-s[None, :] * (n - 1 - i)[:, None].astype(jnp.float32))  # [N, H]
    state = jnp.einsum("bjhd,jh,bjhe->bhde", k, w, v, precision=hp)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        dec = jnp.exp(-s[:, None] * (i + 1)[None, :].astype(jnp.float32))  # [H, N]
        out = out + jnp.einsum("bihd,hi,bhde->bihe", q, dec, s0, precision=hp)
        state = state + jnp.exp(-s * n)[None, :, None, None] * s0
    return out, state


def lightning_recurrent(
    q: jax.Array, k: jax.Array, v: jax.Array, slope: jax.Array,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The same op as a ``lax.scan`` over tokens (O(1) state per step), fp32."""
    b, _, h, d = q.shape
    e = v.shape[-1]
    lam = jnp.exp(-slope.astype(jnp.float32))[None, :, None, None]
    s0 = jnp.zeros((b, h, d, e), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(state, x):
        qt, kt, vt = x
        state = lam * state + jnp.einsum("bhd,bhe->bhde", kt, vt, precision=lax.Precision.HIGHEST)
        return state, jnp.einsum("bhd,bhde->bhe", qt, state, precision=lax.Precision.HIGHEST)

    xs = tuple(jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v))
    state, out = lax.scan(step, s0, xs)
    return jnp.swapaxes(out, 0, 1), state
