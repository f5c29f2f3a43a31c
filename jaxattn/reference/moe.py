"""A mixture-of-experts MLP written from the math in fp32: the test oracle of :mod:`jaxattn.models.moe`.

Independent of the model code: the top-k comes from a stable descending ``argsort`` (not ``lax.top_k``),
every expert runs on every token, and the output is the dense sum ``sum_e c[t, e] expert_e(x_t)`` with the
combine weights ``c`` zero off each token's chosen experts (no sorting, grouping or gathers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def moe_reference(x: jax.Array, router: jax.Array, gate_up: jax.Array, down: jax.Array, *, top_k: int,
                  router_bias: jax.Array | None = None, gate_up_bias: jax.Array | None = None,
                  down_bias: jax.Array | None = None, renormalize: bool = True, act: str = "silu",
                  limit: float | None = None) -> jax.Array:
    """``x [T, D]`` through the mixture (``router [D, E]``, ``gate_up [E, D, 2H]`` gate | up, ``down
    [E, H, D]``): the fp32 output ``[T, D]``. ``renormalize``: the chosen experts' weights are their
    logits' softmax among themselves, else their full-softmax probabilities. ``act`` ``"silu"``:
    ``silu(g) u``; ``"gpt_oss"``: ``(clip(u, -L, L) + 1) g' sigmoid(1.702 g')``, ``g' = min(g, L)``."""
    f32 = jnp.float32
    x = x.astype(f32)
    logits = jnp.matmul(x, router.astype(f32), precision=_HI)
    if router_bias is not None:
        logits = logits + router_bias.astype(f32)
    rank = jnp.argsort(jnp.argsort(-logits, axis=-1, stable=True), axis=-1, stable=True)
    chosen = rank < top_k  # [T, E]
    if renormalize:  # softmax among the chosen logits
        z = jnp.where(chosen, logits, -jnp.inf)
        combine = jnp.exp(z - z.max(-1, keepdims=True))
        combine = combine / combine.sum(-1, keepdims=True)
    else:
        p = jnp.exp(logits - logits.max(-1, keepdims=True))
        combine = jnp.where(chosen, p / p.sum(-1, keepdims=True), 0.0)
    h = jnp.einsum("td,edh->teh", x, gate_up.astype(f32), precision=_HI)
    if gate_up_bias is not None:
        h = h + gate_up_bias.astype(f32)
    half = h.shape[-1] // 2
    g, u = h[..., :half], h[..., half:]
    if act == "gpt_oss":
        g = jnp.minimum(g, limit)
        a = (jnp.clip(u, -limit, limit) + 1.0) * g / (1.0 + jnp.exp(-1.702 * g))
    elif act == "silu":
        a = g / (1.0 + jnp.exp(-g)) * u
    else:
        raise ValueError(f"moe_reference covers act 'silu' and 'gpt_oss', got {act!r}")
    y = jnp.einsum("teh,ehd->ted", a, down.astype(f32), precision=_HI)
    if down_bias is not None:
        y = y + down_bias.astype(f32)
    return jnp.einsum("te,ted->td", combine, y, precision=_HI)


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes) -> jax.Array:
    """fp32 ``[M, N]``: each row of ``lhs [M, K]`` times the ``rhs [G, K, N]`` matrix of the group it falls
    in (groups of ``group_sizes`` consecutive rows; rows past their sum: zeros), as a sum over groups of
    row-masked dense products."""
    f32 = jnp.float32
    ends = jnp.cumsum(jnp.asarray(group_sizes))
    rows = jnp.arange(lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), f32)
    for g in range(rhs.shape[0]):
        mine = (rows >= ends[g] - group_sizes[g]) & (rows < ends[g])
        out = out + jnp.where(mine[:, None], jnp.matmul(lhs.astype(f32), rhs[g].astype(f32), precision=_HI), 0.0)
    return out
