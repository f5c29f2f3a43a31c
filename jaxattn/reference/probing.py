"""fp32 oracle of efficient probing (EP, Psomas et al. ICLR 2026), written from the math, one query at a
time: ``a_m = softmax_t(q_m . x_t / sqrt(C))``, ``z_m = sum_t a_m[t] (x_t W_v)[m w:(m+1) w]`` with
``w = C' / M``, ``z = concat_m z_m`` -> BatchNorm(affine=False) -> ``z W + b``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def efficient_pool_reference(x: jax.Array, queries: jax.Array, w_v: jax.Array,
                             b_v: jax.Array | None = None) -> jax.Array:
    """``x [B, T, C]``, ``queries [M, C]``, ``w_v [C, C']`` (``b_v [C']``) -> ``z [B, C']`` (fp32)."""
    x = jnp.asarray(x, jnp.float32)
    q = jnp.asarray(queries, jnp.float32)
    m, c = q.shape
    v = x @ jnp.asarray(w_v, jnp.float32)
    if b_v is not None:
        v = v + jnp.asarray(b_v, jnp.float32)
    width = v.shape[-1] // m
    parts = []
    for i in range(m):
        logits = (x @ q[i]) / jnp.sqrt(jnp.float32(c))  # [B, T]
        a = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        a = a / a.sum(axis=-1, keepdims=True)
        parts.append(jnp.sum(a[:, :, None] * v[:, :, i * width:(i + 1) * width], axis=1))
    return jnp.concatenate(parts, axis=-1)


def batchnorm_reference(z: jax.Array, *, eps: float = 1e-6, mean: jax.Array | None = None,
                        var: jax.Array | None = None) -> jax.Array:
    """Non-affine BatchNorm over axis 0: with the batch's (biased) statistics, or ``mean``/``var``."""
    z = jnp.asarray(z, jnp.float32)
    if mean is None:
        mean = z.mean(axis=0)
        var = jnp.mean((z - mean) ** 2, axis=0)
    return (z - mean) / jnp.sqrt(jnp.asarray(var, jnp.float32) + eps)


def efficient_probe_reference(x: jax.Array, queries: jax.Array, w_v: jax.Array, head_w: jax.Array,
                              head_b: jax.Array, *, b_v: jax.Array | None = None, eps: float = 1e-6,
                              running_mean: jax.Array | None = None,
                              running_var: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, K]`` of the efficient probe (``head_w [C', K]``, ``head_b [K]``); BatchNorm uses the
    batch statistics (train mode) unless ``running_mean``/``running_var`` are given (eval mode)."""
    z = efficient_pool_reference(x, queries, w_v, b_v)
    zn = batchnorm_reference(z, eps=eps, mean=running_mean, var=running_var)
    return zn @ jnp.asarray(head_w, jnp.float32) + jnp.asarray(head_b, jnp.float32)
