"""Sparsifiner (Wei et al., CVPR 2023): a ViT whose attention keeps, per query, only the top-k keys
ranked by a cheap low-rank *connectivity predictor* (after ``lim142857/Sparsifiner``,
``src/models/sparsifiner.py``; spec: attention-variants.md §8).

Per layer (one predictor per layer, its weights shared by the layer's heads, as the original),
with per-head ``q, k [B, N, H, d]`` from the block's ``qkv``:

* ``q' = proj_c_q(q)``, ``k' = proj_c_k(k)`` (``Linear(d -> d / reduce_c_factor)``, default ``d/2``);
* ``k'' = k'^T P_n`` with ``P_n [N, n_r]``, ``n_r = N // reduce_n_factor``;
* ``coef = softmax(q' k'' * H^-1/2)`` over the ``n_r`` basis columns (``H`` = heads, as the
  original's ``num_heads ** -0.5``), for the patch queries only (the class-token row is dropped);
* ``stage="recon"`` (stage 1, predictor training): ``Â = coef P_back^T`` and the block attends
  densely (the original does not mask while reconstructing attention);
* ``stage="sparse"`` (stage 2 and inference): ``basis = Threshold(|P_back^T|, 0.02)`` (entries
  ``<= 0.02`` set to 0), only the top-8 coefficients of each row kept (the rest zeroed, no
  renormalisation), ``Â = coef basis``; the mask keeps the top ``k = ceil(attn_keep_rate * N)``
  entries of each ``Â`` row (detached: ``stop_gradient``), the class-token query row keeps every
  key, and the block runs masked softmax attention.

The masked attention is the dense masked path ``jaxattn.attention(q, k, v, mask=bool)``: at the
sequence lengths this repo trains (N = 65) a gather of ``k`` keys per query costs more in index
traffic than it saves, the class row is ragged (N keys, the others k), and on GPU the flash
kernel takes the bool mask directly. So the saving in attention FLOPs is *analytic* (see
:func:`attention_flops`), not realised wall-clock time; the block-sparse kernel does not apply
because the kept set is per element, not per tile.

Parameters: the predictor lives at ``blocks.{i}.attn.predictor`` (``proj_c_q``, ``proj_c_k``,
``proj_n``, ``proj_back_n``); everything else has the ViT's paths, so a trained
:class:`~jaxattn.models.vit.ViT` loads into a :class:`Sparsifiner` with
``nnx.update(sparsifiner, nnx.state(vit))``. :data:`PREDICTOR` / :data:`BACKBONE` are the NNX
filters of the two parameter sets (for ``Trainer(wrt=...)`` / ``optax.multi_transform``).
Initialisation as the original: Linear truncated normal std 0.02 (zero bias), ``P_n`` and
``P_back`` truncated normal std 0.02.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.vit import Attention, Block, ViT, ViTConfig, _apply, _linear, _trunc02
from jaxattn.ops.attention import attention

Stage = Literal["recon", "sparse"]
STAGES = ("recon", "sparse")

PREDICTOR = nnx.All(nnx.Param, nnx.PathContains("predictor"))
"""NNX filter of the connectivity-predictor parameters."""
BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("predictor")))
"""NNX filter of every other parameter (the ViT backbone)."""


@dataclasses.dataclass(frozen=True)
class SparsifinerConfig(ViTConfig):
    """:class:`ViTConfig` plus the connectivity predictor's settings (defaults: the original's
    ``sparsifiner_default_config.yaml``)."""

    attn_keep_rate: float = 0.25  # k = ceil(attn_keep_rate * N) keys per query
    reduce_n_factor: int = 6  # n_r = N // reduce_n_factor basis columns
    reduce_c_factor: int = 2  # predictor channels d // reduce_c_factor
    basis_threshold: float = 0.02  # |P_back| <= this -> 0 (sparse stage)
    basis_topk: int = 8  # coefficients kept per row (sparse stage); clipped to n_r

    def __post_init__(self):
        super().__post_init__()
        if self.remat:
            raise ValueError("remat (activation checkpointing) is not implemented for Sparsifiner; use remat=False")
        if not 0.0 < self.attn_keep_rate <= 1.0:
            raise ValueError(f"attn_keep_rate must be in (0, 1], got {self.attn_keep_rate}")
        for name in ("reduce_n_factor", "reduce_c_factor", "basis_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.basis_threshold < 0:
            raise ValueError(f"basis_threshold must be >= 0, got {self.basis_threshold}")
        if self.quantized:
            raise ValueError("quantized=True is not supported by Sparsifiner (masked attention)")
        if self.reg_tokens or self.class_token is not None or self.dynamic_img_size:
            raise ValueError("Sparsifiner has a fixed token layout (a class token exactly when pool='cls'): "
                             "reg_tokens must be 0, class_token None and dynamic_img_size False")
        if self.pool == "map" or self.qk_norm or self.glu_mlp:
            raise ValueError("Sparsifiner's blocks have plain attention and MLPs and pool by 'cls' or 'mean': "
                             "pool='map', qk_norm and glu_mlp are not supported")
        if self.head_dim // self.reduce_c_factor < 1:
            raise ValueError(f"head_dim {self.head_dim} // reduce_c_factor {self.reduce_c_factor} must be >= 1")
        if self.num_tokens // self.reduce_n_factor < 1:
            raise ValueError(f"num_tokens {self.num_tokens} // reduce_n_factor {self.reduce_n_factor} must be >= 1")

    @property
    def reduced_n(self) -> int:
        return self.num_tokens // self.reduce_n_factor

    @property
    def reduced_c(self) -> int:
        return self.head_dim // self.reduce_c_factor

    @property
    def attn_budget(self) -> int:
        """Keys kept per (patch) query: ``ceil(attn_keep_rate * N)``."""
        return keep_count(self.num_tokens, self.attn_keep_rate)


# -- functional pieces ----------------------------------------------------------------------
def keep_count(n: int, keep_rate: float) -> int:
    """``ceil(keep_rate * n)`` (at least 1, at most ``n``)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return min(n, max(1, math.ceil(keep_rate * n)))


def threshold_basis(p_back: jax.Array, threshold: float) -> jax.Array:
    """``Threshold(|P_back^T|, threshold)``: ``p_back [N, n_r] -> basis [n_r, N]``, entries of
    ``|P_back|`` that are ``<= threshold`` set to 0 (``torch.nn.Threshold(threshold, 0)``)."""
    a = jnp.abs(p_back).T
    return jnp.where(a > threshold, a, jnp.zeros_like(a))


def topk_scatter(x: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest entries of each row of ``x`` (last axis) in place, zeros elsewhere."""
    k = min(k, x.shape[-1])
    _, idx = jax.lax.top_k(x, k)
    keep = jnp.put_along_axis(jnp.zeros(x.shape, jnp.bool_), idx, True, axis=-1, inplace=False)
    return jnp.where(keep, x, jnp.zeros_like(x))


def topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Bool mask with exactly ``k`` True per row: the top-``k`` of ``scores`` along the last axis
    (ties broken towards the lower index). No gradient flows through it."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in [1, {scores.shape[-1]}] (the last axis of scores), got {k}")
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
    mask = jnp.zeros(scores.shape, jnp.bool_)
    return jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)


def connectivity_mask(approx: jax.Array, k: int, *, has_cls: bool = True) -> jax.Array:
    """The attention mask ``[B, H, N, N]`` (bool) from the predicted connectivity ``approx``
    ``[B, H, N - has_cls, N]``: top-``k`` per row, plus an all-True class-token row first when
    ``has_cls``. Detached."""
    if approx.ndim != 4 or approx.shape[2] != approx.shape[3] - int(has_cls):
        raise ValueError(f"approx must be [batch, heads, N{' - 1' if has_cls else ''}, N], got "
                         f"shape {tuple(approx.shape)}")
    mask = topk_mask(approx, k)
    if has_cls:
        b, h, _, n = approx.shape
        mask = jnp.concatenate([jnp.ones((b, h, 1, n), jnp.bool_), mask], axis=2)
    return mask


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     impl: Literal["auto", "pallas", "xla"] = "auto") -> jax.Array:
    """Masked softmax attention ``[B, N, H, d]`` with a bool ``mask [B, H, N, N]`` (True = kept),
    through ``jaxattn.attention(mask=...)``; the mask gets no gradient."""
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be bool [batch, heads, q_len, kv_len], got dtype {jnp.dtype(mask.dtype).name}")
    return attention(q, k, v, mask=jax.lax.stop_gradient(mask), impl=impl)


def attention_flops(n: int, head_dim: int, keep: int, reduced_c: int, reduced_n: int, *, has_cls: bool = True,
                    basis_topk: int | None = None) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one head in one layer: dense ``QK^T`` + ``AV``
    (``4 N^2 d``), the sparse pair over the kept entries (class row: ``N``; other rows: ``keep``),
    and the predictor (``q', k'`` projections, ``k'^T P_n``, ``q' k''``, ``coef basis``; with
    ``basis_topk`` the last counts only the kept coefficients). Softmax/top-k are not counted."""
    rows = n - int(has_cls)
    kept = n * int(has_cls) + rows * keep
    coef_cols = reduced_n if basis_topk is None else min(basis_topk, reduced_n)
    pred = (2 * 2 * n * head_dim * reduced_c  # q', k'
            + 2 * reduced_c * n * reduced_n  # k'' = k'^T P_n
            + 2 * n * reduced_c * reduced_n  # q' k''
            + 2 * rows * coef_cols * n)  # coef @ basis
    return {"dense": 4.0 * n * n * head_dim, "sparse": 4.0 * kept * head_dim, "predictor": float(pred),
            "kept_fraction": kept / (n * n)}


# -- modules --------------------------------------------------------------------------------
class ConnectivityPredictor(nnx.Module):
    """Low-rank connectivity predictor of one layer: ``(q, k [B, N, H, d]) -> (Â, mask)``.

    ``Â`` is ``[B, H, N - has_cls, N]`` (fp32; the class-token query row is not predicted) and
    ``mask`` the bool ``[B, H, N, N]`` top-k mask of :func:`connectivity_mask`.
    """

    def __init__(self, num_tokens: int, heads: int, head_dim: int, *, keep_rate: float = 0.25,
                 reduce_n_factor: int = 6, reduce_c_factor: int = 2, basis_threshold: float = 0.02,
                 basis_topk: int = 8, has_cls: bool = True, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.num_tokens, self.heads, self.head_dim = num_tokens, heads, head_dim
        self.reduced_c = head_dim // reduce_c_factor
        self.reduced_n = num_tokens // reduce_n_factor
        if self.reduced_c < 1 or self.reduced_n < 1:
            raise ValueError(f"predictor sizes must be >= 1: head_dim // reduce_c_factor = {self.reduced_c}, "
                             f"num_tokens // reduce_n_factor = {self.reduced_n}")
        self.budget = keep_count(num_tokens, keep_rate)
        self.basis_threshold, self.basis_topk, self.has_cls = basis_threshold, basis_topk, has_cls
        self.scale = heads ** -0.5  # the original's qk_scale default: num_heads ** -0.5
        self.proj_c_q = _linear(head_dim, self.reduced_c, dtype, rngs)
        self.proj_c_k = _linear(head_dim, self.reduced_c, dtype, rngs)
        self.proj_n = nnx.Param(_trunc02(rngs.params(), (num_tokens, self.reduced_n)))
        self.proj_back_n = nnx.Param(_trunc02(rngs.params(), (num_tokens, self.reduced_n)))

    def basis(self, stage: Stage) -> jax.Array:
        """``[n_r, N]``: ``P_back^T`` (recon) or ``Threshold(|P_back^T|, basis_threshold)`` (sparse)."""
        p = self.proj_back_n[...].astype(jnp.float32)
        return p.T if stage == "recon" else threshold_basis(p, self.basis_threshold)

    def coefficients(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """``softmax(q' k'' * H^-1/2)`` ``[B, H, N - has_cls, n_r]`` (fp32)."""
        b, n, h, d = q.shape
        if (n, h, d) != (self.num_tokens, self.heads, self.head_dim) or k.shape != q.shape:
            raise ValueError(f"predictor q and k must be [batch, {self.num_tokens}, {self.heads}, {self.head_dim}], "
                             f"got {tuple(q.shape)} and {tuple(k.shape)}")
        qc = self.proj_c_q(q).astype(jnp.float32)  # [B, N, H, c]
        kc = self.proj_c_k(k).astype(jnp.float32)
        kr = jnp.einsum("bnhc,nr->bhcr", kc, self.proj_n[...].astype(jnp.float32))
        logits = jnp.einsum("bnhc,bhcr->bhnr", qc, kr) * self.scale
        if self.has_cls:
            logits = logits[:, :, 1:]
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, q: jax.Array, k: jax.Array, stage: Stage = "sparse") -> tuple[jax.Array, jax.Array]:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        coef = self.coefficients(q, k)
        if stage == "sparse":
            coef = topk_scatter(coef, self.basis_topk)
        approx = coef @ self.basis(stage)  # [B, H, N - has_cls, N]
        return approx, connectivity_mask(approx, self.budget, has_cls=self.has_cls)


class SparsifinerAttention(Attention):
    """:class:`~jaxattn.models.vit.Attention` with a :class:`ConnectivityPredictor`; attends
    densely in ``stage="recon"`` and through the predicted top-k mask in ``stage="sparse"``."""

    def __init__(self, cfg: SparsifinerConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        super().__init__(cfg.dim, cfg.heads, qkv_bias=cfg.qkv_bias, proj_drop=cfg.dropout, impl=cfg.attn_impl,
                         dtype=dtype, rngs=rngs)
        self.stage: Stage = "sparse"
        self.predictor = ConnectivityPredictor(
            cfg.num_tokens, cfg.heads, cfg.head_dim, keep_rate=cfg.attn_keep_rate,
            reduce_n_factor=cfg.reduce_n_factor, reduce_c_factor=cfg.reduce_c_factor,
            basis_threshold=cfg.basis_threshold, basis_topk=cfg.basis_topk, has_cls=cfg.pool == "cls",
            dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, return_attention: bool = False) -> jax.Array | tuple[jax.Array, dict]:
        """``x [B, N, dim] -> [B, N, dim]``; with ``return_attention`` also ``{"approx": Â,
        "mask": bool mask, "attn": the softmax weights used [B, H, N, N] (fp32)}``."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        approx, mask = self.predictor(q, k, self.stage)
        if self.stage == "recon":
            o = attention(q, k, v, impl=self.impl)
        else:
            o = sparse_attention(q, k, v, mask, impl=self.impl)
        out = _apply(self.proj_drop, self.proj(o.reshape(b, n, -1)))
        if not return_attention:
            return out
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * self.head_dim ** -0.5
        if self.stage == "sparse":
            logits = jnp.where(mask, logits, -jnp.inf)
        return out, {"approx": approx, "mask": mask, "attn": jax.nn.softmax(logits, axis=-1)}


class SparsifinerBlock(Block):
    """:class:`~jaxattn.models.vit.Block` whose attention is a :class:`SparsifinerAttention`."""

    def __init__(self, cfg: SparsifinerConfig, drop_path: float = 0.0, *, rngs: nnx.Rngs):
        super().__init__(cfg, drop_path, rngs=rngs)
        self.attn = SparsifinerAttention(cfg, rngs=rngs)


class Sparsifiner(ViT):
    """Sparsifiner ViT: ``images -> logits`` through top-k masked attention (``stage="sparse"``).

    ``forward(images, stage=...)`` returns ``{"logits", "tokens", "approx", "mask", "attn"}`` with
    the last three per-layer lists (see :meth:`SparsifinerAttention.__call__`); ``tokens`` are the
    final normalised tokens ``[B, N, dim]``.
    """

    def __init__(self, cfg: SparsifinerConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, SparsifinerConfig):
            raise ValueError(f"cfg must be a SparsifinerConfig, got {type(cfg).__name__}")
        super().__init__(cfg, rngs=rngs)
        rates = [float(b.drop_path.rate) if b.drop_path is not None else 0.0 for b in self.blocks]
        self.blocks = nnx.List([SparsifinerBlock(cfg, r, rngs=rngs) for r in rates])

    def set_stage(self, stage: Stage) -> None:
        """``"recon"`` (dense attention, unthresholded Â: stage 1) or ``"sparse"`` (the default)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        for blk in self.blocks:
            blk.attn.stage = stage

    def forward(self, images: jax.Array, *, stage: Stage | None = None) -> dict[str, Any]:
        if stage is not None:
            self.set_stage(stage)
        tokens, aux = self._tokens(images, True)
        logits = _apply(self.head, self.pool(tokens)).astype(jnp.float32)
        return {"logits": logits, "tokens": tokens, **{key: [a[key] for a in aux] for key in ("approx", "mask", "attn")}}


SPARSIFINER_CONFIGS: dict[str, SparsifinerConfig] = {
    # vit-tiny backbone (digits at 32x32: N = 65, k = 17, n_r = 10) with the original's defaults.
    "sparsifiner-vit-tiny": SparsifinerConfig(image_size=32, patch_size=4, in_channels=1, num_classes=10, dim=128,
                                              depth=4, heads=4),
}
