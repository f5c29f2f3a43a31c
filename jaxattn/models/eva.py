"""EVA-02 (Fang et al. 2024, "EVA-02: A Visual Representation for Neon Genesis") and DINOv3 (Simeoni et al.
2025) in Flax NNX: ViTs whose attention rotates queries and keys with 2-D axial rotary position embeddings
(timm's ``Eva`` class builds both).

:class:`Eva` is a :class:`ViT` (same patch embedding, class token, learned absolute position embedding,
pre-norm blocks, pooling, head, ``intermediates``, ``dynamic_img_size``) with :class:`EvaBlock` blocks, as
timm's ``Eva`` builds EVA-02 (``eva02_{tiny,small,base,large}_patch14_{224,336,448}``):

* rotary embeddings (timm's ``RotaryEmbeddingCat``, interleaved pairs): head dim ``d``, ``d / 4`` frequencies
  ``1 / temperature^(i / (d/4))``; patch ``(r, c)`` of an ``h x w`` grid sits at ``(r * ref / h, c * ref / w)``
  (``rope_ref_grid``: EVA's ``ref_feat_shape``, the pretraining grid, so that a fine-tune at another size
  sees the positions it was trained on; None: ``(r, c)``); the angles are ``[r f_0 .. r f_{d/4-1},
  c f_0 .. c f_{d/4-1}]``, each repeated twice, and ``x -> x cos + rot(x) sin`` with
  ``rot([x0, x1, ...]) = [-x1, x0, -x3, x2, ...]`` on the patch tokens' queries and keys (not the prefix
  tokens'); computed in fp32 for the images' grid on every call. DINOv3's (``rope_kind="dinov3"``, timm's
  ``RotaryEmbeddingDinoV3``): the same frequencies, patch ``(r, c)`` at ``(2 (r + 1/2) / h - 1, 2 (c + 1/2) / w - 1)``
  (centred in [-1, 1]), angles times ``2 pi``; ``rope_half``: the half layout (angles ``[a, a]``,
  ``rot(x) = [-x_hi, x_lo]``, timm's ``rope_rotate_half``);
* attention projections: one ``qkv`` linear without bias plus ``q_bias`` / ``v_bias`` parameters (keys have
  no bias; EVA-02 Ti/S), or ``q_proj`` / ``k_proj`` (no bias) / ``v_proj`` (``qkv_split``, EVA-02 B/L);
* MLP: SwiGLU ``fc2(act(g) * x)`` with ``mlp_dim = int(dim * mlp_ratio)`` hidden units: packed (``fc1``
  gives ``[g, x]``; ViT's ``glu_mlp``, EVA-02 Ti/S) or split into ``fc1_g`` / ``fc1_x`` with a LayerNorm on
  the hidden units (``mlp_norm``, timm's ``scale_mlp``, EVA-02 B/L), or split without the norm and with the
  hidden width rounded up to a multiple of ``swiglu_align`` (timm's ``swiglu_align_to``, DINOv3 S+/H+/7B); or
  the ViT's plain MLP (``swiglu=False``, DINOv3 S/B/L);
* DINOv3 also: no absolute position embedding (``abs_pos_embed=False``), four register tokens, layer scale
  (``gamma_1`` / ``gamma_2``), LayerNorm eps 1e-5, mean pooling after the final norm
  (``vit_{small,small_plus,base,large,huge_plus}_patch16_dinov3[_qkvb]``, ``vit_tiny_patch16_dinov3_qkvb``,
  ``vit_7b_patch16_dinov3``).

Module paths are timm's ``state_dict`` keys (``blocks.{i}.attn.qkv``, ``.q_bias``, ``.v_bias``, ``.q_proj``,
``.k_proj``, ``.v_proj``, ``.proj``, ``blocks.{i}.gamma_1``, ``blocks.{i}.mlp.fc1_g``, ``.fc1_x``, ``.norm``, ``.fc2``, ``fc_norm``,
``head``, ...); timm hub folders load through :func:`jaxattn.models.hf.load_pretrained`. Initialisation as
timm's: the ViT's, with each block's ``attn.proj`` and ``mlp.fc2`` divided by ``sqrt(2 * (i + 1))``, the
SwiGLU's value half (packed) or gate (split) near zero with bias 1, the head scaled by 0.001.
Also from timm's ``Eva``: EVA-02 CLIP's image towers (``attn_norm``: a LayerNorm on the heads' output before
``proj``, timm's ``scale_attn_inner``; ``eva02_{base_patch16,large_patch14}_clip_{224,336}``), timm's SBB RoPE
ViTs (``vit_{medium,mediumd,betwixt,base}_patch16_rope_reg{1,4}_gap_256``), RoPE-ViT (Heo et al. 2024;
``vit_{small,base,large}_patch16_rope[_mixed][_ape]_224``: ``attn_type="rope"``, timm's ``AttentionRope``, whose
fused ``qkv`` has its own bias, keys included; ``rope_xy``: coordinates ``(column, row)``; ``rope_kind="mixed"``:
learned frequencies ``rope.freqs [2, depth, heads, d / 2]``, each block and head turning a patch at ``(x, y)`` by
``x fx + y fy``) and Meta's Perception Encoder (``vit_pe_core_{tiny,small,base,large,gigantic}_*``: RoPE
attention, ``rope_offset`` 1 added to the indices, ``pre_norm``, attention pooling over every token with its own
heads and MLP ratio: ``pool_heads``, ``pool_mlp_ratio``, ``pool_include_prefix``), and its lang / spatial towers
(``vit_pe_{lang,spatial}_*``: no norm after the blocks, ``final_norm=False``). Not implemented: post-norm blocks
(EVA-02 E), gated or grouped-query attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.vit import (ACTIVATIONS, MLP, AttentionDropout, DropPath, ViT, ViTConfig, _apply, _dropout,
                                _layer_norm, _linear, activated_linear, attend)


@dataclasses.dataclass(frozen=True)
class EvaConfig(ViTConfig):
    """:class:`ViTConfig` plus EVA-02's attention and MLP options (defaults: EVA-02 B/L; timm's ``Eva``
    defaults are mean pooling with ``fc_norm`` and the class token kept)."""

    pool: Literal["cls", "mean", "map"] = "mean"
    class_token: bool | None = True
    fc_norm: bool = True
    mlp_ratio: float = 4 * 2 / 3  # the SwiGLU's hidden width (packed: fc1 gives twice as many)
    mlp_act: Literal["gelu", "quick_gelu", "gelu_tanh", "silu"] = "silu"
    rope_ref_grid: int | None = 16  # EVA's ref_feat_shape (the pretraining grid); None: patch indices
    rope_temperature: float = 10000.0
    # positions: (scaled) patch indices, DINOv3's centred [-1, 1], or RoPE-ViT's "mixed" (learned frequencies
    # per block and head, mixing both axes)
    rope_kind: Literal["eva", "dinov3", "mixed"] = "eva"
    rope_half: bool = False  # the half layout of the rotation (timm's rope_rotate_half); False: interleaved pairs
    rope_xy: bool = False  # (column, row) coordinate order (timm's rope_grid_indexing="xy": RoPE-ViT, PE)
    rope_offset: float = 0.0  # added to the patch indices before the ref-grid scaling (timm's rope_grid_offset)
    attn_type: Literal["eva", "rope"] = "eva"  # "rope": timm's AttentionRope, a k bias too (fused qkv's own bias)
    attn_norm: bool = False  # a LayerNorm on the heads' output before proj (EVA-02 CLIP's scale_attn_inner)
    abs_pos_embed: bool = True  # a learned absolute position embedding besides the rotary one (not DINOv3's)
    qkv_split: bool = True  # q_proj / k_proj / v_proj (EVA-02 B/L); False: one qkv plus q_bias / v_bias
    swiglu: bool = True  # a SwiGLU MLP; False: the ViT's plain MLP (with mlp_act; DINOv3 S/B/L)
    mlp_norm: bool = True  # split SwiGLU with a LayerNorm on its hidden units (EVA-02 B/L); False: packed
    swiglu_align: int = 0  # > 0: split SwiGLU (no norm unless mlp_norm), hidden width rounded up to a multiple

    def __post_init__(self):
        super().__post_init__()
        if self.gates != "none" or self.glu_mlp:
            raise ValueError("EvaConfig: gates and glu_mlp are not EVA-02 options (its SwiGLU: swiglu, packed with "
                             "mlp_norm=False, split with mlp_norm=True)")
        if (self.mlp_norm or self.swiglu_align) and not self.swiglu:
            raise ValueError("EvaConfig: mlp_norm and swiglu_align are the split SwiGLU's; they need swiglu=True")
        if self.swiglu_align < 0:
            raise ValueError(f"swiglu_align must be >= 0, got {self.swiglu_align}")
        if self.rope_kind not in ("eva", "dinov3", "mixed"):
            raise ValueError(f"rope_kind must be 'eva', 'dinov3' or 'mixed', got {self.rope_kind!r}")
        if self.attn_type not in ("eva", "rope"):
            raise ValueError(f"attn_type must be 'eva' or 'rope', got {self.attn_type!r}")
        if self.rope_kind == "mixed" and (self.rope_half or self.rope_ref_grid is not None or self.rope_offset):
            raise ValueError("rope_kind='mixed' (RoPE-ViT) has the interleaved layout on plain patch indices: "
                             "rope_half=False, rope_ref_grid=None, rope_offset=0")
        if self.head_dim % 4:
            raise ValueError(f"EvaConfig: 2-D rotary embeddings need a head dim divisible by 4, got {self.head_dim}")
        if self.rope_ref_grid is not None and self.rope_ref_grid < 1:
            raise ValueError(f"rope_ref_grid must be None or >= 1, got {self.rope_ref_grid}")
        if not self.rope_temperature > 0:
            raise ValueError(f"rope_temperature must be > 0, got {self.rope_temperature}")


def grid_positions(grid: tuple[int, int], ref_grid: int | None = None, offset: float = 0.0, xy: bool = False,
                   centred: bool = False) -> tuple[jax.Array, jax.Array]:
    """Each patch's two rotary coordinates ``[h * w]`` (row-major patches): ``(row, column)`` indices plus
    ``offset``, scaled by ``ref_grid / h`` and ``ref_grid / w`` (EVA's ``ref_feat_shape``), or with ``centred``
    DINOv3's ``2 (index + 1/2 + offset) / n - 1`` in [-1, 1]; ``xy``: ``(column, row)``."""
    if centred:
        t = [((jnp.arange(n, dtype=jnp.float32) + 0.5 + offset) / n) * 2.0 - 1.0 for n in grid]
    else:
        t = [(jnp.arange(n, dtype=jnp.float32) + offset) * (1.0 if ref_grid is None else ref_grid / n) for n in grid]
    rows, cols = (a.reshape(-1) for a in jnp.meshgrid(*t, indexing="ij"))
    return (cols, rows) if xy else (rows, cols)


def rope_sin_cos(grid: tuple[int, int], head_dim: int, ref_grid: int | None = None, temperature: float = 10000.0,
                 kind: Literal["eva", "dinov3"] = "eva", half: bool = False, xy: bool = False, offset: float = 0.0
                 ) -> tuple[jax.Array, jax.Array]:
    """The 2-D rotary embedding of an ``h x w`` patch grid (row-major): ``(sin, cos)``, each ``[h * w, head_dim]``
    fp32, interleaved (or ``half``) layout; EVA's positions or DINOv3's (module docstring)."""
    bands = 1.0 / temperature ** (jnp.arange(head_dim // 4, dtype=jnp.float32) / (head_dim // 4))
    dinov3 = kind == "dinov3"  # centred, normalised to [-1, 1] per axis; angles 2 pi * position / period
    a, c = grid_positions(grid, None if dinov3 else ref_grid, offset, xy, centred=dinov3)
    if dinov3:
        bands = bands * (2.0 * math.pi)
    angles = jnp.concatenate([a[:, None] * bands, c[:, None] * bands], axis=-1)
    # interleaved [a0, a0, a1, a1, ...] or half [a0, a1, ..., a0, a1, ...]
    angles = jnp.concatenate([angles, angles], axis=-1) if half else jnp.repeat(angles, 2, axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


class MixedRope(nnx.Module):
    """RoPE-ViT's mixed rotary embedding (Heo et al. 2024, timm's ``RotaryEmbeddingMixed``): learned
    frequencies ``freqs [2, depth, heads, head_dim / 2]`` (x and y per block and head, initialised as axial
    bands at a random angle per head); a patch at ``(x, y)`` turns by ``x fx + y fy``, interleaved layout."""

    def __init__(self, cfg: "EvaConfig", *, rngs: nnx.Rngs):
        d = cfg.head_dim
        mag = 1.0 / cfg.rope_temperature ** (jnp.arange(0, d, 4, dtype=jnp.float32) / d)
        angle = jax.random.uniform(rngs.params(), (cfg.depth, cfg.heads, 1)) * 2 * math.pi
        fx = jnp.concatenate([mag * jnp.cos(angle), mag * jnp.cos(angle + math.pi / 2)], axis=-1)
        fy = jnp.concatenate([mag * jnp.sin(angle), mag * jnp.sin(angle + math.pi / 2)], axis=-1)
        self.freqs = nnx.Param(jnp.stack([fx, fy]))
        self.xy = cfg.rope_xy

    def __call__(self, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """``(sin, cos)``, each ``[depth, heads, h * w, head_dim]`` (fp32)."""
        x, y = grid_positions(grid, xy=self.xy)
        f = self.freqs[...].astype(jnp.float32)
        angles = x[:, None] * f[0][:, :, None, :] + y[:, None] * f[1][:, :, None, :]
        angles = jnp.repeat(angles, 2, axis=-1)
        return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array], num_prefix: int, half: bool = False) -> jax.Array:
    """``x [B, prefix + N, heads, d]``: the patch tokens rotated (``x cos + rot(x) sin``, fp32), the prefix kept;
    ``rot`` pairs neighbours (``[-x1, x0, -x3, x2, ...]``) or, with ``half``, the halves (``[-x_hi, x_lo]``).
    ``rope``: ``[N, d]`` tables, or ``[heads, N, d]`` (one per head: the mixed embedding)."""
    sin, cos = (r[None, :, None, :] if r.ndim == 2 else jnp.swapaxes(r, 0, 1)[None] for r in rope)
    p = x[:, num_prefix:].astype(jnp.float32)
    if half:
        lo, hi = jnp.split(p, 2, axis=-1)
        rot = jnp.concatenate([-hi, lo], axis=-1)
    else:
        rot = jnp.stack([-p[..., 1::2], p[..., 0::2]], axis=-1).reshape(p.shape)
    return jnp.concatenate([x[:, :num_prefix], (p * cos + rot * sin).astype(x.dtype)], axis=1)


class EvaAttention(nnx.Module):
    """Multi-head self-attention with rotary queries and keys on ``jaxattn.attention``; ``[B, N, dim]`` in and out."""

    def __init__(self, cfg: EvaConfig, *, rngs: nnx.Rngs):
        dtype, dim = jnp.dtype(cfg.dtype), cfg.dim
        self.heads, self.head_dim, self.impl = cfg.heads, cfg.head_dim, cfg.attn_impl
        self.num_prefix, self.quantized, self.half = cfg.num_prefix_tokens, cfg.quantized, cfg.rope_half
        k_bias = cfg.qkv_bias and cfg.attn_type == "rope"  # (EvaAttention: keys have no bias)
        if cfg.qkv_split:
            self.q_proj = _linear(dim, dim, dtype, rngs, bias=cfg.qkv_bias)
            self.k_proj = _linear(dim, dim, dtype, rngs, bias=k_bias)
            self.v_proj = _linear(dim, dim, dtype, rngs, bias=cfg.qkv_bias)
        else:
            self.qkv = _linear(dim, 3 * dim, dtype, rngs, bias=k_bias)
            eva_bias = cfg.qkv_bias and not k_bias
            self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if eva_bias else None
            self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if eva_bias else None
        self.qkv_split = cfg.qkv_split
        self.q_norm = _layer_norm(cfg.head_dim, dtype, rngs, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = _layer_norm(cfg.head_dim, dtype, rngs, cfg.norm_eps) if cfg.qk_norm else None
        self.norm = _layer_norm(dim, dtype, rngs, cfg.norm_eps) if cfg.attn_norm else None  # (vit.attend applies it)
        self.proj = _linear(dim, dim, dtype, rngs)
        self.proj_drop = _dropout(cfg.dropout, rngs)
        self.attn_drop = AttentionDropout(cfg.attn_drop, rngs=rngs)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, n, _ = x.shape
        split = (b, n, self.heads, self.head_dim)
        if self.qkv_split:
            return tuple(p(x).reshape(split) for p in (self.q_proj, self.k_proj, self.v_proj))
        qkv = self.qkv(x)
        if self.q_bias is not None:  # (keys have no bias)
            zeros = jnp.zeros_like(self.q_bias[...])
            qkv = qkv + jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]]).astype(qkv.dtype)
        qkv = qkv.reshape(b, n, 3, self.heads, self.head_dim)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array], return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        q, k, v = self._qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = (apply_rope(t, rope, self.num_prefix, self.half) for t in (q, k))
        return attend(self, q, k, v, return_attention)


class SwiGLU(nnx.Module):
    """timm's split ``SwiGLU``: ``fc2(norm(act(fc1_g(x)) * fc1_x(x)))`` (``norm``: a LayerNorm on the hidden units)."""

    def __init__(self, dim: int, hidden: int, *, act: str, norm: bool, eps: float, dropout: float, dtype: Any,
                 rngs: nnx.Rngs):
        self.act = act
        self.fc1_g = _linear(dim, hidden, dtype, rngs)
        self.fc1_x = _linear(dim, hidden, dtype, rngs)
        self.fc1_g.kernel[...] = nnx.initializers.normal(1e-6)(rngs.params(), (dim, hidden))  # timm's init_weights
        self.fc1_g.bias[...] = jnp.ones((hidden,), jnp.float32)
        self.norm = _layer_norm(hidden, dtype, rngs, eps) if norm else None
        self.fc2 = _linear(hidden, dim, dtype, rngs)
        self.drop1 = _dropout(dropout, rngs)
        self.drop2 = _dropout(dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = activated_linear(self.fc1_g, x, ACTIVATIONS[self.act]) * self.fc1_x(x)
        return _apply(self.drop2, self.fc2(_apply(self.norm, _apply(self.drop1, h))))


class EvaBlock(nnx.Module):
    """Pre-norm block ``x += gamma_1 * attn(norm1(x), rope)``, ``x += gamma_2 * mlp(norm2(x))`` (``gamma``: layer
    scale when ``layer_scale`` is set; stochastic depth on both)."""

    def __init__(self, cfg: EvaConfig, drop_path: float = 0.0, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.norm1 = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps)
        self.attn = EvaAttention(cfg, rngs=rngs)
        self.norm2 = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps)
        if not cfg.swiglu:
            self.mlp = MLP(cfg.dim, cfg.mlp_dim, dropout=cfg.dropout, dtype=dtype, act=cfg.mlp_act, rngs=rngs)
        elif cfg.mlp_norm or cfg.swiglu_align:  # (split, as timm's rule)
            hidden = cfg.mlp_dim + (-cfg.mlp_dim % cfg.swiglu_align if cfg.swiglu_align else 0)
            self.mlp = SwiGLU(cfg.dim, hidden, act=cfg.mlp_act, norm=cfg.mlp_norm, eps=cfg.norm_eps,
                              dropout=cfg.dropout, dtype=dtype, rngs=rngs)
        else:  # packed: fc1 gives [gate, value] (timm's GluMlp, gate first)
            self.mlp = MLP(cfg.dim, 2 * cfg.mlp_dim, dropout=cfg.dropout, dtype=dtype, act=cfg.mlp_act, glu=True,
                           rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0 else None
        scaled = cfg.layer_scale is not None
        self.gamma_1 = nnx.Param(jnp.full((cfg.dim,), cfg.layer_scale, jnp.float32)) if scaled else None
        self.gamma_2 = nnx.Param(jnp.full((cfg.dim,), cfg.layer_scale, jnp.float32)) if scaled else None

    def _scaled(self, gamma: nnx.Param | None, h: jax.Array) -> jax.Array:
        return h if gamma is None else h * gamma[...].astype(h.dtype)

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array], return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        h = self.attn(self.norm1(x), rope=rope, return_attention=return_attention)
        h, w = h if return_attention else (h, None)
        x = x + _apply(self.drop_path, self._scaled(self.gamma_1, h))
        x = x + _apply(self.drop_path, self._scaled(self.gamma_2, self.mlp(self.norm2(x))))
        return (x, w) if return_attention else x


class Eva(ViT):
    """EVA-02 image classifier: :class:`ViT` with :class:`EvaBlock` blocks (rotary attention, SwiGLU MLP)."""

    block_class = EvaBlock

    def __init__(self, cfg: EvaConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, EvaConfig):
            raise ValueError(f"Eva needs an EvaConfig, got {type(cfg).__name__}")
        super().__init__(cfg, rngs=rngs)
        if not cfg.abs_pos_embed:
            self.pos_embed = None
        self.rope = MixedRope(cfg, rngs=rngs) if cfg.rope_kind == "mixed" else None
        for i, block in enumerate(self.blocks):  # timm's fix_init_weight
            scale = math.sqrt(2.0 * (i + 1))
            block.attn.proj.kernel[...] = block.attn.proj.kernel[...] / scale
            block.mlp.fc2.kernel[...] = block.mlp.fc2.kernel[...] / scale
        if self.head is not None:  # timm's head_init_scale
            self.head.kernel[...] = self.head.kernel[...] * 1e-3

    def _block_extras(self, grid: tuple[int, int]) -> list[dict[str, Any]]:
        c = self.cfg
        if self.rope is not None:  # one [heads, N, d] table per block
            sin, cos = self.rope(grid)
            return [{"rope": (sin[i], cos[i])} for i in range(c.depth)]
        rope = rope_sin_cos(grid, c.head_dim, c.rope_ref_grid, c.rope_temperature, c.rope_kind, c.rope_half,
                            c.rope_xy, c.rope_offset)
        return [{"rope": rope}] * c.depth


# CPU-sized (tests, the image trainer on digits); the paper's sizes load from timm hub folders (timm_hub).
EVA_CONFIGS: dict[str, EvaConfig] = {
    "eva02-tiny": EvaConfig(image_size=32, patch_size=4, in_channels=1, num_classes=10, dim=128, depth=4, heads=4,
                            rope_ref_grid=None),
}
