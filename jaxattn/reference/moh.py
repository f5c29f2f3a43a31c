"""MoH (Mixture-of-Head attention) written from the math in fp32: the test oracle.

Independent of :mod:`jaxattn.models.moh`: gates are derived with an ``argsort`` top-k (not
``lax.top_k``), attention is a plain per-head softmax einsum, and the output is the gating einsum
``W_O . concat_h(g_h * o_h)`` (shared heads first). Formulas follow SkyworkAI/MoH
(``MoH-ViT/attention.py``, ``MoH-DiT/models.py``, ``MoH-LLaMA3/Inference_code/modeling_llama.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def _topk_mask_reference(probs: jax.Array, k: int) -> jax.Array:
    """``1[i in TopK(probs, k)]`` along the last axis via a descending stable argsort (fp32 0/1)."""
    order = jnp.argsort(-probs, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)  # rank of each entry, 0 = largest
    return (ranks < k).astype(jnp.float32)


def moh_gates_reference(x: jax.Array, w_r: jax.Array | None, w_s: jax.Array | None, w_h: jax.Array | None, *,
                        heads: int, shared_heads: int, top_k: int) -> dict[str, jax.Array]:
    """Learned-router gates of one MoH layer for tokens ``x [..., dim]``.

    ``w_r [dim, E]`` (routed router, E = heads - shared_heads), ``w_s [dim, h_s]`` (shared router,
    only when h_s > 1), ``w_h [dim, 2]`` (two-stage router, when h_s > 0 and top_k > 0); None
    otherwise. Returns ``{"gates": [..., heads], "probs": [..., E], "mask": [..., E]}`` (fp32;
    probs/mask absent when top_k == 0):

    * routed: ``r = softmax(x W_r)``, ``g_r = top_k * r * 1[TopK] / max(sum_TopK r, eps)``;
    * shared: ``g_s = h_s * softmax(x W_s)`` if h_s > 1 else 1;
    * two-stage (h_s > 0 and top_k > 0): ``[a1, a2] = 2 softmax(x W_h)``, ``g_s *= a1``, ``g_r *= a2``.
    """
    x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    out: dict[str, jax.Array] = {}
    if shared_heads > 1:
        g_s = shared_heads * jax.nn.softmax(jnp.matmul(x, w_s.astype(jnp.float32), precision=_HI), axis=-1)
    else:
        g_s = jnp.ones(lead + (shared_heads,), jnp.float32)
    if top_k == 0:
        out["gates"] = g_s
        return out
    r = jax.nn.softmax(jnp.matmul(x, w_r.astype(jnp.float32), precision=_HI), axis=-1)
    m = _topk_mask_reference(r, top_k)
    denom = jnp.maximum(jnp.sum(r * m, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    g_r = top_k * r * m / denom
    if shared_heads > 0:
        a = 2.0 * jax.nn.softmax(jnp.matmul(x, w_h.astype(jnp.float32), precision=_HI), axis=-1)
        g_s, g_r = a[..., :1] * g_s, a[..., 1:] * g_r
    out.update(gates=jnp.concatenate([g_s, g_r], axis=-1), probs=r, mask=m)
    return out


def query_norm_gates_reference(q: jax.Array, *, shared_heads: int, top_k: int) -> jax.Array:
    """MoH-LLaMA3's parameter-free router: binary gates ``[..., heads]`` from queries ``[..., heads, d]``.

    Shared heads get 1; each routed head scores ``||q_h||_2``, divided by the unbiased standard
    deviation over the routed heads, softmax, top-k -> 1 on the selected heads, 0 elsewhere.
    """
    norms = jnp.sqrt(jnp.sum(jnp.square(q[..., shared_heads:, :].astype(jnp.float32)), axis=-1))
    e = norms.shape[-1]
    if e > 1:
        mean = jnp.mean(norms, axis=-1, keepdims=True)
        std = jnp.sqrt(jnp.sum(jnp.square(norms - mean), axis=-1, keepdims=True) / (e - 1))
        norms = norms / jnp.maximum(std, jnp.finfo(jnp.float32).tiny)
    mask = _topk_mask_reference(jax.nn.softmax(norms, axis=-1), top_k)
    return jnp.concatenate([jnp.ones(mask.shape[:-1] + (shared_heads,), jnp.float32), mask], axis=-1)


def load_balance_reference(probs: jax.Array, mask: jax.Array) -> jax.Array:
    """``E * sum_i P_i f_i`` with ``P_i`` the mean router probability of routed head i and ``f_i``
    the fraction of tokens that select it, both over every token (``[..., E]`` flattened)."""
    e = probs.shape[-1]
    p = probs.reshape(-1, e).astype(jnp.float32)
    f = mask.reshape(-1, e).astype(jnp.float32)
    return e * jnp.sum(jnp.mean(p, axis=0) * jnp.mean(f, axis=0))


def moh_reference(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, w_o: jax.Array,
                  b_o: jax.Array | None = None, *, causal: bool = False, scale: float | None = None) -> jax.Array:
    """``concat_h(g_h * softmax(scale q_h k_h^T) v_h) W_O + b_O`` in fp32.

    q, k, v ``[B, N, H, d]``; gates ``[B, N, H]``; ``w_o [H*d, dim]``; returns ``[B, N, dim]``.
    """
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HI) * scale
    if causal:
        s = jnp.where(jnp.arange(n)[None, :] <= jnp.arange(n)[:, None], s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=_HI)
    o = jnp.einsum("bqh,bqhd->bqhd", gates.astype(jnp.float32), o)
    out = jnp.matmul(o.reshape(b, n, h * d), w_o.astype(jnp.float32), precision=_HI)
    return out if b_o is None else out + b_o.astype(jnp.float32)
