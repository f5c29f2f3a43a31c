"""``linear_global_attention``: L²ViT's enhanced linear global attention (non-causal).

With ``φ = ReLU``, per head ``h``::

    o_i = τ_h · φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / max(φ(q_i) · Σ_j φ(k_j), clamp)

computed KV-first: the ``[D, E]`` state ``Σ_j φ(k_j) v_jᵀ`` and the ``[D]`` key sum are
reduced once per (batch, head) and then read by every query, so time and memory are linear in
the sequence length (the quadratic form is ``jaxattn.reference.linear_global``). φ(q), φ(k)
and v are upcast to fp32, so the state, the key sum and both query-side products accumulate in
fp32 (CPU XLA has no bf16 x bf16 -> fp32 dot); the output is cast back to q's dtype. Gradients are JAX autodiff of the
fused XLA graph (residuals are linear in N). The clamp (``torch.clamp(min=100)`` in the
reference code) keeps the normaliser away from zero when few query/key features are active;
``jnp.maximum`` splits the gradient evenly at an exact tie, where PyTorch's clamp passes it all.

``impl="pallas"`` runs the kernels of :mod:`jaxattn.pallas.linear_global` (the same KV-first
computation on the ``[batch, seq, heads, dim]`` layout, without the transposed copies and fp32
temporaries XLA makes of this graph, and a kernel backward); ``"auto"`` picks them on a GPU.
``python -m jaxattn.bench l2vit`` times both against the quadratic form and softmax attention.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import _common
from jaxattn.pallas.linear_global import AUTO_MAX_HEAD_DIM, MAX_HEAD_DIM, linear_global_kernel

_IMPLS = ("auto", "pallas", "xla")


def _check_temperature(temperature: jax.Array | float, heads: int) -> jax.Array:
    t = jnp.asarray(temperature) if not hasattr(temperature, "shape") else temperature
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, heads)):
        raise ValueError(f"temperature must be a scalar or have shape [heads] = ({heads},), got {tuple(t.shape)}")
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise ValueError(f"temperature must be floating, got {jnp.dtype(t.dtype).name}")
    return jnp.broadcast_to(t.astype(jnp.float32), (heads,))


def linear_global_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    temperature: jax.Array | float,
    clamp: float = 100.0,
    impl: Literal["auto", "pallas", "xla"] = "auto",
) -> jax.Array:
    """L²ViT linear global attention, ``[batch, seq, heads, head_dim]`` layout.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, heads, head_dim]``.
      v: ``[batch, kv_len, heads, v_head_dim]``.
      temperature: the per-head output scale τ, a scalar or ``[heads]`` (L²ViT learns it,
        initialised to ``head_dim ** -0.5``); differentiable.
      clamp: lower bound of the normaliser ``φ(q_i) · Σ_j φ(k_j)``, finite and > 0 (100 in L²ViT).
      impl: ``"pallas"`` (the Triton kernels; interpret mode without a GPU; head dims up to 128),
        ``"xla"`` (the fused KV-first graph) or ``"auto"`` (the kernels on a GPU, for head dims up
        to 128 in bf16/fp16 and 64 in fp32, where they compile without register spills; else XLA).

    Returns ``[batch, q_len, heads, v_head_dim]`` in q's dtype.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    _, _, _, hq, hkv, _ = _checks.check_qkv(q, k, v)
    if hkv != hq:
        raise ValueError(f"k and v must have q's {hq} heads (no GQA), got {hkv}")
    try:
        c = float(clamp)
    except (TypeError, ValueError):  # includes a traced value
        c = math.nan
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"clamp must be a static finite float > 0, got {clamp!r}")
    tau = _check_temperature(temperature, hq)
    width = max(q.shape[-1], v.shape[-1])
    if impl == "pallas" and width > MAX_HEAD_DIM:
        raise ValueError(f"impl='pallas' takes head dims up to {MAX_HEAD_DIM}, got q {q.shape[-1]}, "
                         f"v {v.shape[-1]}; use impl='xla'")
    fast = width <= AUTO_MAX_HEAD_DIM[min(jnp.dtype(q.dtype).itemsize, 4)]
    if (impl == "pallas" or (impl == "auto" and fast and _common.targets_gpu())) and not _checks.empty(q, k, v):
        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        def kernel(q, k, v, tau, batch_offset=None):
            return linear_global_kernel(q, k, v, tau, clamp=c)

        return _spmd.per_batch_shard(kernel, dict(q=q, k=k, v=v), dict(tau=tau))
    return _linear_global_xla(q, k, v, tau, c)


def _linear_global_xla(q: jax.Array, k: jax.Array, v: jax.Array, tau: jax.Array, clamp: float) -> jax.Array:
    f32 = jnp.float32
    kf = jax.nn.relu(k).astype(f32)
    kv = jnp.einsum("bjhd,bjhe->bhde", kf, v.astype(f32))  # Σ_j φ(k_j) v_jᵀ
    ksum = jnp.sum(kf, axis=1)  # [B, H, D]
    qf = jax.nn.relu(q).astype(f32)
    num = jnp.einsum("bihd,bhde->bihe", qf, kv)
    den = jnp.maximum(jnp.einsum("bihd,bhd->bih", qf, ksum), clamp)
    return (num * (tau[:, None] / den[..., None])).astype(q.dtype)
