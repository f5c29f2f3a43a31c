"""Residual Relationship Attention (RRA) with Relationship Position Encoding (RPE): the
Relationship Batch Integration (RBI) framework of "Enhancing Fine-grained Image Classification
through Attentive Batch Training" (Le, Bui, Tran, Tran, Pham; arXiv 2412.19606).

What we followed (no code of the authors was found; the structure is from the paper's abstract and
summaries of its method section):

* RPE: a similarity matrix ``S [B, B]`` between the *input images* of the batch from their pairwise
  PSNR, normalised. We use ``PSNR_ij = -10 log10 MSE(x_i, x_j)`` (the ``10 log10 MAX^2`` term is a
  constant that the normalisation removes), min-max normalised over the off-diagonal pairs to
  ``[0, 1]``, diagonal 1 (an image is most related to itself); ``S`` is all ones when ``B < 3`` or
  every pair is equally far. The exact normalisation of the paper is not known to us.
* RRA: queries, keys and values are learned linear maps of the backbone's feature vectors
  ``N [B, D]``; attention over the **batch** axis, ``A = softmax(Q K^T / sqrt(d) + S)`` (RPE as an
  additive relation bias -- "modulated by the relationship position embeddings"; ``rpe_mode="mul"``
  scales the logits by ``S`` instead), and a residual output ``N + gamma * (A V)`` with a learned
  scalar ``gamma`` ("combines the original features and the weighted attention features based on
  learned weights"). ``gamma`` starts at 0 by default (our choice: the plug-in starts as the plain
  model), so the module is the identity at initialisation.
* RBI: backbone features -> RRA -> the backbone's own classifier head, during training only; at
  evaluation (``deterministic=True``, which ``model.eval()`` sets) RRA is bypassed, since a test
  image must not depend on the other images of its batch.

Permutation-equivariant over the batch: permuting the images permutes the outputs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["relationship_position_encoding", "ResidualRelationshipAttention", "RBIClassifier"]


def relationship_position_encoding(images: jax.Array, *, eps: float = 1e-10) -> jax.Array:
    """RPE: ``images [B, ...]`` -> ``S [B, B]`` fp32 in ``[0, 1]`` (min-max normalised PSNR, diagonal 1)."""
    if images.ndim < 2:
        raise ValueError(f"images must be an array [B, ...] with a batch axis, got shape {tuple(images.shape)}")
    b = images.shape[0]
    x = jax.lax.stop_gradient(images).reshape(b, -1).astype(jnp.float32)
    sq = jnp.sum(x * x, -1)
    mse = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0) / x.shape[1]
    psnr = -10.0 * jnp.log10(jnp.maximum(mse, eps))
    off = ~jnp.eye(b, dtype=bool)
    lo = jnp.min(jnp.where(off, psnr, jnp.inf))
    hi = jnp.max(jnp.where(off, psnr, -jnp.inf))
    span = hi - lo
    s = jnp.where(span > 0, (psnr - lo) / jnp.where(span > 0, span, 1.0), 1.0)
    return jnp.where(off, jnp.clip(s, 0.0, 1.0), 1.0)


class ResidualRelationshipAttention(nnx.Module):
    """``feats [B, D]`` (+ optional relation ``S [B, B]``) -> ``feats + gamma * Attn_batch(feats)``;
    the identity when ``deterministic`` (eval)."""

    def __init__(self, dim: int, *, heads: int = 1, rpe_mode: str = "add", gamma_init: float = 0.0,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs, deterministic: bool = False):
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"dim must be a positive multiple of heads, got dim={dim} heads={heads}")
        if rpe_mode not in ("add", "mul"):
            raise ValueError(f"rpe_mode must be 'add' or 'mul', got {rpe_mode!r}")
        self.dim, self.heads, self.rpe_mode, self.deterministic = dim, heads, rpe_mode, deterministic
        init = nnx.initializers.xavier_uniform()
        self.q = nnx.Linear(dim, dim, kernel_init=init, dtype=dtype, rngs=rngs)
        self.k = nnx.Linear(dim, dim, kernel_init=init, dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(dim, dim, kernel_init=init, dtype=dtype, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((), gamma_init, jnp.float32))

    def attention(self, feats: jax.Array, relation: jax.Array | None = None) -> jax.Array:
        """Softmax weights over the batch ``[heads, B, B]`` (fp32)."""
        b = feats.shape[0]
        h, d = self.heads, self.dim // self.heads
        q = self.q(feats).reshape(b, h, d).astype(jnp.float32)
        k = self.k(feats).reshape(b, h, d).astype(jnp.float32)
        logits = jnp.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
        if relation is not None:
            logits = logits + relation[None] if self.rpe_mode == "add" else logits * relation[None]
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, feats: jax.Array, relation: jax.Array | None = None) -> jax.Array:
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must be [batch, {self.dim}], got shape {tuple(feats.shape)}")
        if relation is not None and relation.shape != (feats.shape[0],) * 2:
            raise ValueError(f"relation must be [batch, batch] = {(feats.shape[0],) * 2}, got {tuple(relation.shape)}")
        if self.deterministic:
            return feats
        b = feats.shape[0]
        h, d = self.heads, self.dim // self.heads
        v = self.v(feats).reshape(b, h, d).astype(jnp.float32)
        out = jnp.einsum("hij,jhd->ihd", self.attention(feats, relation), v).reshape(b, self.dim)
        return (feats.astype(jnp.float32) + self.gamma[...] * out).astype(feats.dtype)


class RBIClassifier(nnx.Module):
    """RBI wrapper: ``images -> backbone features [B, D] -> RRA (+ RPE of the images) -> backbone
    head``. Backbones: :class:`~jaxattn.models.vit.ViT` (``pool_features`` + ``head``),
    :class:`~jaxattn.models.halonet.HaloNet` (``forward_features`` + average pool + ``head.fc``), or
    any module with ``pool_features(images) -> [B, D]``, a ``head`` and ``num_features`` (or
    ``cfg.dim``). In eval mode the output equals the backbone's own."""

    def __init__(self, backbone: nnx.Module, *, rngs: nnx.Rngs, heads: int = 1, rpe: bool = True,
                 rpe_mode: str = "add", gamma_init: float = 0.0):
        self.backbone, self.rpe = backbone, rpe
        if hasattr(backbone, "pool_features"):
            dim = getattr(backbone, "num_features", None) or backbone.cfg.dim
        elif hasattr(backbone, "forward_features") and hasattr(backbone, "num_features"):
            dim = backbone.num_features
        else:
            raise ValueError(f"RBIClassifier needs a backbone with pool_features (ViT) or forward_features "
                             f"and num_features (HaloNet), got {type(backbone).__name__}")
        dtype = jnp.dtype(getattr(getattr(backbone, "cfg", None), "dtype", jnp.float32))
        self.rra = ResidualRelationshipAttention(dim, heads=heads, rpe_mode=rpe_mode, gamma_init=gamma_init,
                                                 dtype=dtype, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """The backbone's pooled features ``[B, D]`` (the head's input without RRA)."""
        bb = self.backbone
        if hasattr(bb, "pool_features"):
            return bb.pool_features(images)
        x = bb.forward_features(images)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)

    def head(self, feats: jax.Array) -> jax.Array:
        head = self.backbone.head
        if head is None:
            return feats
        return (head.fc if hasattr(head, "fc") and not isinstance(head, nnx.Linear) else head)(feats)

    def __call__(self, images: jax.Array) -> jax.Array:
        feats = self.features(images)
        if not self.rra.deterministic:
            feats = self.rra(feats, relationship_position_encoding(images) if self.rpe else None)
        return self.head(feats).astype(jnp.float32)
