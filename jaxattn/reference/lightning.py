"""Causal linear attention with per-head exponential decay (Lightning Attention),
written from the math in fp32: a dense form and a recurrence.

``o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j`` with ``lambda_h = exp(-slope_h)``;
no softmax, no 1/sqrt(d), no normaliser. With an initial state ``S0`` ``[d, e]``
the recurrence is ``S_n = lambda S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``, ``S_{-1} = S0``.

Packed sequences (``segment_ids [B, N]``): a document is a run of equal consecutive ids; the sum
keeps ``j`` only when no document starts in ``(j, i]`` (the recurrence restarts from zeros at each
document's first token); ``S0`` feeds the first document, the final state is the last one's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _starts(segment_ids: jax.Array) -> jax.Array:
    """bool ``[B, N]``: a document starts at this token (not at the first one)."""
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


def lightning_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, slope: jax.Array,
    initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense ``((Q K^T) * M) V``, ``M_ij = lambda^(i-j)`` for ``j <= i`` (and no document start in
    ``(j, i]``).

    q, k ``[B, N, H, d]``; v ``[B, N, H, e]``; slope ``[H]``; initial_state ``[B, H, d, e]``;
    segment_ids int ``[B, N]``. Returns fp32 ``out [B, N, H, e]`` and the final state ``[B, H, d, e]``.
    """
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = slope.astype(jnp.float32)
    n = q.shape[1]
    i = jnp.arange(n)
    diff = (i[:, None] - i[None, :]).astype(jnp.float32)
    m = jnp.where(diff >= 0, jnp.exp(-s[:, None, None] * jnp.maximum(diff, 0)), 0.0)  # [H, N, N]
    hp = lax.Precision.HIGHEST
    b = q.shape[0]
    # starts[b, t]: documents begun at or before t (0 without segment ids); j reaches i iff equal
    starts = jnp.zeros((b, n), jnp.int32) if segment_ids is None else jnp.cumsum(_starts(segment_ids), axis=1)
    same = (starts[:, :, None] == starts[:, None, :]).astype(jnp.float32)  # [B, N, N]
    scores = jnp.einsum("bihd,bjhd->bhij", q, k, precision=hp) * m[None] * same[:, None]
    out = jnp.einsum("bhij,bjhe->bihe", scores, v, precision=hp)
    # final state: sum_j lambda^(N-1-j) k_j^T v_j (+ lambda^N S0), the last document's tokens only
    w = jnp.exp(-s[None, :] * (n - 1 - i)[:, None].astype(jnp.float32))  # [N, H]
    last = same[:, -1]  # [B, N]: in the last token's document
    state = jnp.einsum("bjhd,jh,bj,bjhe->bhde", k, w, last, v, precision=hp)
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        dec = jnp.exp(-s[:, None] * (i + 1)[None, :].astype(jnp.float32))  # [H, N]
        first = same[:, 0]  # [B, N]: in the first document (the one S0 feeds)
        out = out + jnp.einsum("bihd,hi,bi,bhde->bihe", q, dec, first, s0, precision=hp)
        state = state + jnp.exp(-s * n)[None, :, None, None] * first[:, -1, None, None, None] * s0
    return out, state


def lightning_recurrent(
    q: jax.Array, k: jax.Array, v: jax.Array, slope: jax.Array,
    initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The same op as a ``lax.scan`` over tokens (O(1) state per step), fp32; the state restarts
    from zeros at each document's first token."""
    b, _, h, d = q.shape
    e = v.shape[-1]
    lam = jnp.exp(-slope.astype(jnp.float32))[None, :, None, None]
    s0 = jnp.zeros((b, h, d, e), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(state, x):
        qt, kt, vt, start = x
        keep = jnp.where(start, 0.0, 1.0)[:, None, None, None]  # [B, 1, 1, 1]
        state = keep * lam * state + jnp.einsum("bhd,bhe->bhde", kt, vt, precision=lax.Precision.HIGHEST)
        return state, jnp.einsum("bhd,bhde->bhe", qt, state, precision=lax.Precision.HIGHEST)

    starts = jnp.zeros(q.shape[:2], bool) if segment_ids is None else _starts(segment_ids)
    xs = (*(jnp.swapaxes(x.astype(jnp.float32), 0, 1) for x in (q, k, v)), starts.T)
    state, out = lax.scan(step, s0, xs)
    return jnp.swapaxes(out, 0, 1), state
