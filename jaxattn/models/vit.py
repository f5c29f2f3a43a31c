"""Vision Transformer (ViT, Dosovitskiy et al. 2021) in Flax NNX, on ``jaxattn.attention``.

``images [B, H, W, C]`` (NHWC, float) -> ``PatchEmbed`` (a ``patch x patch`` conv with stride
``patch``, flattened row-major to ``[B, (H/p)(W/p), dim]``) -> class token prepended (``pool="cls"``,
or ``class_token=True``), then ``reg_tokens`` register tokens -> learned positional embedding added
(to every token, or to the patches only with ``no_embed_class``) -> (``pre_norm``: a LayerNorm, CLIP's)
-> ``depth`` pre-norm blocks
``x += DropPath(LS(Attn(LN(x))))``, ``x += DropPath(LS(MLP(LN(x))))`` (``LS``: LayerScale when
``layer_scale`` is set) -> final LayerNorm (or ``fc_norm`` after the pooling; none with ``final_norm=False``) -> pooling
(the class token, the mean of the patch tokens, or attention pooling: one learned query attending over
the patch tokens, then an MLP, as SigLIP) -> linear head. LayerNorm eps is 1e-6 and the
MLP uses exact (erf) GELU, as the original ViT and timm. ``dropout`` is applied where the original
ViT applies it (after the positional embedding, after the attention projection, after the MLP's
GELU and after its second linear), ``attn_drop`` on the softmax weights (inside the attention
kernel); ``drop_path`` is stochastic depth, linearly increasing from 0
at the first block to ``drop_path`` at the last (timm's ``drop_path_rate``). Both follow NNX
modes: active after ``model.train()`` (the default of a fresh model), off after ``model.eval()``.
They draw keys from the ``dropout`` stream of the ``rngs`` given at construction (falling back to
``default``) and are only built when their rate is > 0.

timm checkpoint conventions (``timm.models.vision_transformer.VisionTransformer``; ``pool="cls"`` is
timm's ``global_pool='token'``, ``pool="mean"`` its ``'avg'`` (the mean of the patch tokens, after the
prefix tokens); ``class_token``, ``reg_tokens``, ``no_embed_class``, ``fc_norm`` are timm's arguments of
those names, ``layer_scale`` its ``init_values``, ``norm_eps`` / ``mlp_act`` its ``norm_layer`` /
``act_layer`` of CLIP's ViTs; ``qk_norm`` and ``glu_mlp`` (``mlp_layer=SwiGLUPacked``) theirs; ``pool="map"``
is SigLIP's ``global_pool='map'``, timm's ``AttentionPoolLatent``): module paths are
timm's ``state_dict`` keys (``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``,
``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.ls1.gamma``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``blocks.{i}.ls2.gamma``, ``norm``,
``blocks.{i}.attn.q_norm``, ``blocks.{i}.attn.k_norm``, ``fc_norm``, ``norm_pre``, ``attn_pool.{latent, q, kv, proj,
norm, mlp.fc1, mlp.fc2}``, ``head``) with NNX leaf names:
``X.weight`` of a Linear (PyTorch ``[out, in]``) is ``X.kernel`` ``[in, out]`` (``w.T``); the patch
conv ``patch_embed.proj.weight`` (PyTorch OIHW ``[dim, C, p, p]``) is ``patch_embed.proj.kernel``
in HWIO ``[p, p, C, dim]`` (``w.permute(2, 3, 1, 0)``); LayerNorm ``weight`` is ``scale``;
biases, ``cls_token [1, 1, dim]`` and ``pos_embed [1, N(+1), dim]`` are copied as is. The fused
``qkv`` output is ``[3, heads, head_dim]`` (q, k, v; head-major), as in timm, so it needs no
reordering, and patches are flattened row-major as timm's ``flatten(2)``. ``dynamic_img_size`` resamples
the position grid per call as timm does (:func:`resample_pos_embed`, also what loading at another
``image_size`` uses once).
``to_timm_state_dict`` / ``load_timm_state_dict`` do the conversion on numpy arrays (no torch
import); tests/test_timm_hub.py checks the forward against timm's written in float64 numpy, and
against timm itself when installed.

Initialisation (timm's default ``init_weights`` scheme, not its draws): ``pos_embed`` truncated
normal std 0.02; ``cls_token`` normal std 1e-6 (timm); every Linear (qkv, proj, fc1, fc2, head)
truncated normal std 0.02 with zero bias (flax truncates at +-2 std, timm's ``trunc_normal_`` at
+-2 absolute, i.e. not at all for std 0.02); the patch conv keeps PyTorch's default
(``kaiming_uniform(a=sqrt(5))`` = ``variance_scaling(1/3, fan_in, uniform)``) with a zero bias;
LayerNorm scale 1, bias 0. Parameters are fp32; ``dtype`` is the compute dtype; logits are fp32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from jaxattn.models._remat import remat_blocks
from jaxattn.models.gates import FeatureGate, TokenGate
from jaxattn.models.timm_weights import load_timm_state_dict, timm_variables, to_timm_state_dict  # noqa: F401
from jaxattn.ops.attention import attention, attention_qkvpacked

_IMPLS = ("auto", "pallas", "mosaic", "xla")  # "mosaic": Hopper kernels (bf16/fp16, no attn_drop)
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000  # 0: no head, the model returns pooled features [B, dim]
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool: Literal["cls", "mean", "map"] = "cls"  # class token, mean of the patches, attention pooling (SigLIP)
    dropout: float = 0.0  # original-ViT placement, see the module docstring
    drop_path: float = 0.0  # stochastic depth rate of the last block
    attn_drop: float = 0.0  # attention dropout on the softmax weights (timm's attn_drop_rate), in the kernel
    dtype: str = "float32"  # compute dtype; parameters are fp32
    attn_impl: Literal["auto", "pallas", "mosaic", "xla"] = "auto"
    # Hard-attention / feature-selection gates (jaxattn.models.gates): "features" gates each block's
    # attention and MLP branch per feature as the reference FSG-ViT; "tokens" also gates every
    # token position after the position embedding.
    gates: Literal["none", "features", "tokens"] = "none"
    quantized: bool = False  # inference through jaxattn.sage_attention (INT8 QK, FP8 PV)
    remat: bool = False  # training: each block recomputed in the backward (activation checkpointing)
    # timm options of later ViT recipes (DeiT III, DINOv2, register ViTs, MAE fine-tunes; timm's names):
    class_token: bool | None = None  # None: a class token iff pool="cls"; True with pool="mean": kept, not pooled
    reg_tokens: int = 0  # register tokens after the class token (Darcet et al. 2024), dropped by the pooling
    no_embed_class: bool = False  # the position embedding covers the patches only (DeiT III, registers)
    layer_scale: float | None = None  # LayerScale: per-channel residual-branch scales, initialised to this
    fc_norm: bool = False  # the final LayerNorm after the pooling (timm's fc_norm) instead of on every token
    # False: no LayerNorm after the blocks at all, neither on the tokens nor fc_norm (timm's final_norm=False;
    # Eva's use_post_transformer_norm=False: Perception Encoder's lang / spatial towers)
    final_norm: bool = True
    dynamic_img_size: bool = False  # any H x W (multiples of the patch): position grid resampled per call (timm's)
    pre_norm: bool = False  # a LayerNorm before the blocks (CLIP's ln_pre, timm's norm_pre); no patch-embed bias
    norm_eps: float = LN_EPS  # every LayerNorm's epsilon (CLIP: 1e-5)
    mlp_act: Literal["gelu", "quick_gelu", "gelu_tanh", "silu"] = "gelu"  # exact GELU, CLIP's, SigLIP's, SwiGLU's
    qk_norm: bool = False  # LayerNorm of each head's queries and keys before the attention (timm's qk_norm)
    glu_mlp: bool = False  # gated MLP: fc1 -> [a, b] halves -> act(a) * b -> fc2 (silu: DINOv2-giant's SwiGLU)
    # attention pooling (pool="map"): its heads, MLP ratio and activation (None: the blocks'; timm Eva's
    # attn_pool_num_heads / attn_pool_mlp_ratio, whose pool MLP is always exact GELU)
    pool_heads: int | None = None
    pool_mlp_ratio: float | None = None
    pool_act: str | None = None
    pool_include_prefix: bool = False  # "mean" / "map" pooling over the prefix tokens too (timm's; Eva's map pool)

    def __post_init__(self):
        if self.fc_norm and not self.final_norm:
            raise ValueError("fc_norm is the final norm after the pooling: final_norm=False has none")
        if self.gates not in ("none", "features", "tokens"):
            raise ValueError(f"gates must be 'none', 'features' or 'tokens', got {self.gates!r}")
        for name in ("image_size", "patch_size", "in_channels", "dim", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {self.num_classes}")
        if self.image_size < self.patch_size:  # (not divisible: the last rows and columns are dropped, as timm)
            raise ValueError(f"image_size {self.image_size} must be >= patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pool not in ("cls", "mean", "map"):
            raise ValueError(f"pool must be 'cls', 'mean' or 'map', got {self.pool!r}")
        if self.glu_mlp and self.mlp_dim % 2:
            raise ValueError(f"glu_mlp needs an even hidden width int(dim * mlp_ratio), got {self.mlp_dim}")
        if self.pool == "cls" and self.class_token is False:
            raise ValueError("pool='cls' needs the class token: class_token must be True or None")
        if self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {self.reg_tokens}")
        if self.dynamic_img_size and self.gates == "tokens":
            raise ValueError("dynamic_img_size needs a fixed token count; gates='tokens' gates each position")
        if self.mlp_act not in ACTIVATIONS or self.pool_act not in (None, *ACTIVATIONS):
            raise ValueError(f"mlp_act and pool_act must be one of {sorted(ACTIVATIONS)}, got {self.mlp_act!r}, "
                             f"{self.pool_act!r}")
        if self.pool_heads is not None and (self.pool_heads < 1 or self.dim % self.pool_heads):
            raise ValueError(f"pool_heads must divide dim {self.dim}, got {self.pool_heads}")
        if self.pool_mlp_ratio is not None and not self.pool_mlp_ratio > 0:
            raise ValueError(f"pool_mlp_ratio must be > 0, got {self.pool_mlp_ratio}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.layer_scale is not None and not self.layer_scale > 0:
            raise ValueError(f"layer_scale must be None or an initial scale > 0, got {self.layer_scale}")
        if self.attn_impl not in _IMPLS:
            raise ValueError(f"attn_impl must be one of {_IMPLS}, got {self.attn_impl!r}")
        for name in ("dropout", "drop_path", "attn_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        try:
            ok = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"dtype must be a floating dtype name (e.g. 'float32', 'bfloat16'), got {self.dtype!r}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def has_class_token(self) -> bool:
        return self.pool == "cls" if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token (if any), then the register tokens."""
        return int(self.has_class_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the blocks (prefix tokens, then the patches)."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def pos_embed_len(self) -> int:
        """Rows of ``pos_embed``: every token, or only the patches with ``no_embed_class``."""
        return self.num_patches if self.no_embed_class else self.num_tokens

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear(din: int, dout: int, dtype: Any, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=_trunc02, bias_init=nnx.initializers.zeros,
                      dtype=dtype, rngs=rngs)


def _layer_norm(dim: int, dtype: Any, rngs: nnx.Rngs, eps: float = LN_EPS) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    return nnx.Dropout(rate, rngs=rngs) if rate > 0 else None


def _apply(mod: nnx.Module | None, x: jax.Array) -> jax.Array:
    return x if mod is None else mod(x)


class AttentionDropout(nnx.Module):
    """The dropout keywords of ``jaxattn.attention`` for a layer: ``rate`` with a fresh key per call
    in train mode, none in eval mode (``deterministic``, set by ``model.train()/eval()``)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate, self.deterministic = rate, False
        self.rngs = rngs["dropout"].fork() if rate > 0 else None

    def __call__(self) -> dict[str, Any]:
        if self.deterministic or self.rngs is None:
            return {}
        return dict(dropout_rate=self.rate, dropout_rng=self.rngs())


class DropPath(nnx.Module):
    """Stochastic depth: drops the whole residual branch per example with probability ``rate``
    (kept branches are scaled by ``1 / (1 - rate)``); identity when ``deterministic``."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs, deterministic: bool = False):
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class PatchEmbed(nnx.Module):
    """``[B, H, W, C] -> [B, (H//p)(W//p), dim]`` with a ``p x p`` stride-``p`` conv (``proj``; rows and columns
    past the last whole patch are dropped, as torch's conv does for timm's ``vit_so400m_patch14_siglip_384``)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, dtype: Any = jnp.float32,
                 bias: bool = True, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Conv(in_channels, dim, (patch_size, patch_size), strides=patch_size, padding="VALID",
                             kernel_init=_torch_conv_init, bias_init=nnx.initializers.zeros, use_bias=bias,
                             dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] < p or x.shape[2] < p:
            raise ValueError(f"patch_embed input must be [batch, H, W, C] with H and W >= the patch size {p}, "
                             f"got shape {tuple(x.shape)}")
        y = self.proj(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class Attention(nnx.Module):
    """Multi-head self-attention: ``qkv`` linear -> (``qk_norm``: a LayerNorm over each head's queries and
    keys, ``q_norm`` / ``k_norm``) -> ``jaxattn.attention`` -> ``proj``, ``[B, N, dim]`` in and out."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, impl: Literal["auto", "pallas", "xla"] = "auto", dtype: Any = jnp.float32,
                 quantized: bool = False, qk_norm: bool = False, norm_eps: float = LN_EPS, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.impl, self.quantized = impl, quantized
        self.qkv = _linear(dim, 3 * dim, dtype, rngs, bias=qkv_bias)
        self.q_norm = _layer_norm(self.head_dim, dtype, rngs, norm_eps) if qk_norm else None
        self.k_norm = _layer_norm(self.head_dim, dtype, rngs, norm_eps) if qk_norm else None
        self.proj = _linear(dim, dim, dtype, rngs)
        self.proj_drop = _dropout(proj_drop, rngs)
        self.attn_drop = AttentionDropout(attn_drop, rngs=rngs)  # inside the kernels

    def __call__(self, x: jax.Array, *, return_attention: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``x [B, N, dim] -> [B, N, dim]``; with ``return_attention`` also the softmax weights
        ``[B, heads, N, N]`` (fp32), computed by a separate plain-jnp path for analysis (the
        output itself still comes from ``jaxattn.attention``, so it is unchanged)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return attend(self, q, k, v, return_attention, packed=None if self.q_norm is not None else qkv)


def attend(layer: nnx.Module, q: jax.Array, k: jax.Array, v: jax.Array, return_attention: bool = False,
           packed: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The attention layers' shared tail (:class:`Attention`, :class:`jaxattn.models.eva.EvaAttention`):
    ``q, k, v [B, N, heads, d]`` through ``jaxattn.attention`` (``packed``: the same ``[B, N, 3, heads, d]``,
    which the kernels read in place: no q/k/v copies, one packed gradient) or, with ``layer.quantized``,
    SageAttention2-style INT8 QK / FP8 PV (inference only); then ``layer.proj`` and its dropout. With
    ``return_attention`` also the softmax weights ``[B, heads, N, N]`` (fp32) from a separate plain-jnp
    path for analysis (the output still comes from the kernels)."""
    b, n = q.shape[:2]
    if layer.quantized:
        from jaxattn.ops.sage import sage_attention

        o = sage_attention(q, k, v, impl=layer.impl)
    elif packed is not None:
        o = attention_qkvpacked(packed, impl=layer.impl, **layer.attn_drop())
    else:
        o = attention(q, k, v, impl=layer.impl, **layer.attn_drop())
    o = o.reshape(b, n, -1)
    if getattr(layer, "norm", None) is not None:  # (EVA-02 CLIP: a LayerNorm on the heads' output)
        o = layer.norm(o)
    out = _apply(layer.proj_drop, layer.proj(o))
    if not return_attention:
        return out
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    return out, jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)


def activated_linear(linear: nnx.Linear, x: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``act(linear(x))`` (as ``nnx.Linear`` computes it) whose backward recomputes the bias add and
    ``act`` from the matmul's output (``jax.checkpoint``): the forward writes the matmul's output
    and the activation's only, where autodiff would also keep the pre-activation and the
    activation's intermediate terms (exact GELU: three hidden-sized tensors per layer instead of
    one; ViT-S16's training step writes 1.7 GiB less)."""
    bias = linear.bias[...] if linear.bias is not None else None
    x, kernel, bias = promote_dtype((x, linear.kernel[...], bias), dtype=linear.dtype)
    y = linear.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision)
    if bias is None:
        return jax.checkpoint(act)(y)
    return jax.checkpoint(lambda y, b: act(y + b))(y, bias)


def _exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _tanh_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# timm's act_layer names: exact GELU, CLIP's quick GELU, SigLIP's tanh-approximated GELU, SiLU (SwiGLU)
ACTIVATIONS = {"gelu": _exact_gelu, "quick_gelu": _quick_gelu, "gelu_tanh": _tanh_gelu, "silu": jax.nn.silu}


class MLP(nnx.Module):
    """``fc2(drop(act(fc1(x))))`` with the activation ``act`` (a name of :data:`ACTIVATIONS`: exact GELU by
    default), recomputed in the backward (:func:`activated_linear`). ``glu``: timm's ``GluMlp`` with the gate
    first (``SwiGLUPacked`` with ``act="silu"``): ``fc1``'s ``hidden`` outputs split into halves ``[a, b]``,
    ``act(a) * b`` goes to ``fc2`` (``hidden / 2`` inputs); ``b``'s weights start near 0 and its bias at 1, as timm's."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0, dtype: Any = jnp.float32, act: str = "gelu",
                 glu: bool = False, rngs: nnx.Rngs):
        if glu and hidden % 2:
            raise ValueError(f"a gated MLP needs an even hidden width, got {hidden}")
        self.act, self.glu = act, glu
        self.fc1 = _linear(dim, hidden, dtype, rngs)
        self.fc2 = _linear(hidden // 2 if glu else hidden, dim, dtype, rngs)
        if glu:  # timm's GluMlp.init_weights
            half = hidden // 2
            self.fc1.kernel[...] = self.fc1.kernel[...].at[:, half:].set(
                nnx.initializers.normal(1e-6)(rngs.params(), (dim, hidden - half)))
            self.fc1.bias[...] = self.fc1.bias[...].at[half:].set(1.0)
        self.drop1 = _dropout(dropout, rngs)
        self.drop2 = _dropout(dropout, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        if self.glu:
            half = self.fc2.in_features
            x = activated_linear(self.fc1, x, lambda y: act(y[..., :half]) * y[..., half:])
        else:
            x = activated_linear(self.fc1, x, act)
        return _apply(self.drop2, self.fc2(_apply(self.drop1, x)))


class AttentionPool(nnx.Module):
    """Attention pooling (multihead attention pooling, MAP: SigLIP's head; timm's ``AttentionPoolLatent``):
    a learned ``latent`` query, projected by ``q``, attends over the tokens' ``kv`` projection (``heads``
    heads, through ``jaxattn.attention``); then ``proj`` and a pre-norm MLP residual ``x + mlp(norm(x))``.
    ``[B, N, dim] -> [B, dim]``."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        dtype, dim = jnp.dtype(cfg.dtype), cfg.dim
        self.heads, self.impl = cfg.pool_heads or cfg.heads, cfg.attn_impl
        self.latent = nnx.Param(nnx.initializers.truncated_normal(dim ** -0.5)(rngs.params(), (1, 1, dim)))
        self.q = _linear(dim, dim, dtype, rngs)  # (timm: biased whatever the blocks' qkv_bias)
        self.kv = _linear(dim, 2 * dim, dtype, rngs)
        self.proj = _linear(dim, dim, dtype, rngs)
        self.norm = _layer_norm(dim, dtype, rngs, cfg.norm_eps)
        hidden = cfg.mlp_dim if cfg.pool_mlp_ratio is None else int(dim * cfg.pool_mlp_ratio)
        self.mlp = MLP(dim, hidden, dtype=dtype, act=cfg.pool_act or cfg.mlp_act, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        hd = dim // self.heads
        q = self.q(jnp.broadcast_to(self.latent[...].astype(x.dtype), (b, 1, dim))).reshape(b, 1, self.heads, hd)
        kv = self.kv(x).reshape(b, n, 2, self.heads, hd)
        o = attention(q, kv[:, :, 0], kv[:, :, 1], impl=self.impl)
        y = self.proj(o.reshape(b, 1, dim))
        return (y + self.mlp(self.norm(y)))[:, 0]


def resample_pos_embed(pos: jax.Array, grid: tuple[int, int], num_prefix: int) -> jax.Array:
    """``pos [1, prefix + g*g, dim]`` with its square patch grid resized to ``grid`` (bicubic, antialiased:
    the same numbers as timm's ``resample_abs_pos_embed``, torch's ``bicubic`` with ``antialias=True``);
    the first ``num_prefix`` rows (class / register tokens) are kept."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patch rows is not a square grid")
    if (g, g) == tuple(grid):
        return pos
    out = jax.image.resize(patches.reshape(g, g, -1).astype(jnp.float32), (*grid, patches.shape[-1]), "cubic")
    return jnp.concatenate([prefix, out.reshape(1, -1, patches.shape[-1]).astype(pos.dtype)], axis=1)


class LayerScale(nnx.Module):
    """``x * gamma``: a learned per-channel scale of a residual branch (CaiT / DeiT III; timm's ``ls1``/``ls2``)."""

    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x += attn(norm1(x))``, ``x += mlp(norm2(x))`` (with stochastic depth,
    and LayerScale ``ls1``/``ls2`` on the branches when ``layer_scale`` is set)."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.norm1 = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, qkv_bias=cfg.qkv_bias, proj_drop=cfg.dropout,
                              attn_drop=cfg.attn_drop, impl=cfg.attn_impl, dtype=dtype, quantized=cfg.quantized,
                              qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, rngs=rngs)
        self.norm2 = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, dropout=cfg.dropout, dtype=dtype, act=cfg.mlp_act, glu=cfg.glu_mlp,
                       rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0 else None
        scaled = cfg.layer_scale is not None
        self.ls1 = LayerScale(cfg.dim, cfg.layer_scale) if scaled else None
        self.ls2 = LayerScale(cfg.dim, cfg.layer_scale) if scaled else None
        gated = cfg.gates != "none"
        self.gate1 = FeatureGate(cfg.dim, rngs=rngs) if gated else None
        self.gate2 = FeatureGate(cfg.dim, rngs=rngs) if gated else None

    def __call__(self, x: jax.Array, *, return_attention: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        h = self.attn(self.norm1(x), return_attention=return_attention)
        h, w = h if return_attention else (h, None)
        x = x + _apply(self.drop_path, _apply(self.gate1, _apply(self.ls1, h)))
        x = x + _apply(self.drop_path, _apply(self.gate2, _apply(self.ls2, self.mlp(self.norm2(x)))))
        return (x, w) if return_attention else x


class ViT(nnx.Module):
    """Vision Transformer classifier: ``images [B, H, W, C] -> logits [B, num_classes]`` (fp32).

    ``features(images)`` gives the normalised tokens ``[B, N(+1), dim]`` (class token first when
    ``pool="cls"``), ``pool_features(images)`` the pooled ``[B, dim]``, and ``reset_classifier``
    replaces the head (``num_classes=0``: no head, ``__call__`` returns the pooled features).
    """

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.dim, dtype=dtype,
                                      bias=not cfg.pre_norm, rngs=rngs)  # (timm: no patch bias with pre_norm)
        self.cls_token = (nnx.Param(nnx.initializers.normal(1e-6)(rngs.params(), (1, 1, cfg.dim)))
                          if cfg.has_class_token else None)
        self.reg_token = (nnx.Param(nnx.initializers.normal(1e-6)(rngs.params(), (1, cfg.reg_tokens, cfg.dim)))
                          if cfg.reg_tokens else None)
        self.pos_embed = nnx.Param(_trunc02(rngs.params(), (1, cfg.pos_embed_len, cfg.dim)))
        self.pos_drop = _dropout(cfg.dropout, rngs)
        self.norm_pre = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps) if cfg.pre_norm else None
        self.token_gate = TokenGate(cfg.num_tokens, rngs=rngs) if cfg.gates == "tokens" else None
        rates = np.linspace(0.0, cfg.drop_path, cfg.depth)  # as timm (depth 1: rate 0)
        self.blocks = nnx.List([self.block_class(cfg, float(r), rngs=rngs) for r in rates])
        self.norm = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps) if cfg.final_norm and not cfg.fc_norm else None
        self.attn_pool = AttentionPool(cfg, rngs=rngs) if cfg.pool == "map" else None
        self.fc_norm = _layer_norm(cfg.dim, dtype, rngs, cfg.norm_eps) if cfg.fc_norm else None
        self.head = _linear(cfg.dim, cfg.num_classes, dtype, rngs) if cfg.num_classes > 0 else None

    block_class = Block  # (a subclass's blocks: jaxattn.models.eva)

    def _block_extras(self, grid: tuple[int, int]) -> list[dict[str, Any]]:
        """Keyword arguments of each block for a patch grid (none here; rotary embeddings in :class:`Eva`)."""
        return [{}] * len(self.blocks)

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs) -> None:
        """Replaces the head by a fresh one with ``num_classes`` outputs (0: none)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: no head), got {num_classes}")
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        self.head = _linear(self.cfg.dim, num_classes, jnp.dtype(self.cfg.dtype), rngs) if num_classes > 0 else None

    def _check_images(self, images: Any) -> None:
        c = self.cfg
        want = f"[batch, {c.image_size}, {c.image_size}, {c.in_channels}] (NHWC)"
        if not hasattr(images, "shape") or not hasattr(images, "dtype"):
            raise ValueError(f"images must be an array of shape {want}, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have rank 4 {want}, got shape {tuple(images.shape)}")
        _, h, w, ch = images.shape
        if (h, w) != (c.image_size, c.image_size) and (h % c.patch_size or w % c.patch_size):
            raise ValueError(f"images height and width must be divisible by patch_size {c.patch_size}; "
                             f"expected shape {want}, got {tuple(images.shape)}")
        if (h, w) != (c.image_size, c.image_size) and not c.dynamic_img_size:
            raise ValueError(f"images must be {c.image_size}x{c.image_size} as configured (image_size="
                             f"{c.image_size}): expected shape {want}, got {tuple(images.shape)}")
        if ch != c.in_channels:
            raise ValueError(f"images must have {c.in_channels} channels (in_channels={c.in_channels}, "
                             f"last axis): expected shape {want}, got {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floating point (normalised), got dtype {jnp.dtype(images.dtype).name}")

    def _embed(self, images: jax.Array) -> jax.Array:
        """The blocks' input: patch tokens, prefix tokens, position embedding (``norm_pre``, token gates)."""
        self._check_images(images)
        dtype = jnp.dtype(self.cfg.dtype)
        x = self.patch_embed(images.astype(dtype))
        prefix = [jnp.broadcast_to(t[...].astype(dtype), (x.shape[0],) + t.shape[1:])
                  for t in (self.cls_token, self.reg_token) if t is not None]
        pos = 0.0 if self.pos_embed is None else self.pos_embed[...].astype(dtype)  # (none: Eva's DINOv3)
        grid = self._grid(images)
        if self.pos_embed is not None and grid != (self.cfg.grid, self.cfg.grid):  # (dynamic_img_size)
            pos = resample_pos_embed(pos, grid, 0 if self.cfg.no_embed_class else self.cfg.num_prefix_tokens)
        if self.cfg.no_embed_class:  # timm: add to the patches, then prepend the prefix tokens
            x = jnp.concatenate(prefix + [x + pos], axis=1)
        else:
            x = jnp.concatenate(prefix + [x], axis=1) + pos
        return _apply(self.token_gate, _apply(self.norm_pre, _apply(self.pos_drop, x)))

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        return images.shape[1] // self.cfg.patch_size, images.shape[2] // self.cfg.patch_size

    def _tokens(self, images: jax.Array, return_attention: bool) -> tuple[jax.Array, list[jax.Array]]:
        x = self._embed(images)
        weights, extras = [], self._block_extras(self._grid(images))
        run = remat_blocks(self.cfg.remat, lambda block, x, kw: block(x, **kw))
        for block, kw in zip(self.blocks, extras):
            if return_attention:
                x, w = block(x, return_attention=True, **kw)
                weights.append(w)
            else:
                x = run(block, x, kw)
        return _apply(self.norm, x), weights

    def intermediates(self, images: jax.Array, indices: int | Sequence[int] | None = None, *, norm: bool = False,
                      return_prefix_tokens: bool = False, output_fmt: Literal["NHWC", "NLC"] = "NHWC") -> list[Any]:
        """Block outputs for dense tasks and multi-layer probes (timm's ``forward_intermediates`` with
        ``intermediates_only=True``): ``indices`` an int ``n`` takes the last ``n`` blocks, a sequence those
        blocks (negative: from the end), None every block; in block order. ``norm`` applies the final norm.
        Each item is the patch tokens as a grid ``[B, H/p, W/p, dim]`` (NHWC; ``output_fmt="NLC"``:
        ``[B, (H/p)(W/p), dim]``), or ``(patches, prefix)`` with ``return_prefix_tokens`` (``prefix
        [B, num_prefix_tokens, dim]``: class and register tokens). Blocks after the last one taken are not run."""
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, (int, np.integer)):
            if not 0 < indices <= depth:
                raise ValueError(f"indices: an int takes the last n blocks, 1 <= n <= depth {depth}, got {indices}")
            take = list(range(depth - int(indices), depth))
        else:
            take = sorted({int(i) + depth if int(i) < 0 else int(i) for i in indices})
            if not take or take[0] < 0 or take[-1] >= depth:
                raise ValueError(f"indices must be block numbers in [-{depth}, {depth}) (depth {depth}), got {indices}")
        if output_fmt not in ("NHWC", "NLC"):
            raise ValueError(f"output_fmt must be 'NHWC' or 'NLC', got {output_fmt!r}")
        x, out, prefix = self._embed(images), [], self.cfg.num_prefix_tokens
        grid = self._grid(images)
        extras = self._block_extras(grid)
        for i, block in enumerate(self.blocks):
            if i > take[-1]:
                break
            x = block(x, **extras[i])
            if i in take:
                y = _apply(self.norm, x) if norm else x
                patches = y[:, prefix:]
                if output_fmt == "NHWC":
                    patches = patches.reshape(y.shape[0], *grid, y.shape[-1])
                out.append((patches, y[:, :prefix]) if return_prefix_tokens else patches)
        return out

    def features(self, images: jax.Array) -> jax.Array:
        """Tokens after the final norm (none with ``fc_norm`` or ``final_norm=False``), ``[B, prefix + N, dim]`` in the
        compute dtype."""
        return self._tokens(images, False)[0]

    def pool(self, tokens: jax.Array) -> jax.Array:
        """``[B, prefix + N, dim] -> [B, dim]``: the class token, the mean over the patch tokens, or their
        attention pooling (``pool="map"``; both over the prefix tokens too with ``pool_include_prefix``); then
        ``fc_norm`` when configured."""
        if self.cfg.pool == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens if self.cfg.pool_include_prefix else tokens[:, self.cfg.num_prefix_tokens:]
            if self.cfg.pool == "map":
                pooled = self.attn_pool(pooled)
            else:
                pooled = jnp.mean(pooled.astype(jnp.float32), axis=1).astype(tokens.dtype)
        return _apply(self.fc_norm, pooled)

    def pool_features(self, images: jax.Array) -> jax.Array:
        """Pooled features ``[B, dim]`` (the head's input)."""
        return self.pool(self.features(images))

    def __call__(self, images: jax.Array, *, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """``images [B, H, W, C]`` -> logits ``[B, num_classes]`` fp32 (pooled features ``[B, dim]``
        without a head); with ``return_attention`` also the list of per-layer softmax weights
        ``[B, heads, N, N]`` (fp32)."""
        tokens, weights = self._tokens(images, return_attention)
        pooled = self.pool(tokens)
        out = _apply(self.head, pooled).astype(jnp.float32)
        return (out, weights) if return_attention else out


# ---------------------------------------------------------------------------------------------
# timm state_dict conversion (numpy in and out)

# ---------------------------------------------------------------------------------------------
# Named configurations (merged into jaxattn.models.MODEL_CONFIGS)

VIT_CONFIGS: dict[str, ViTConfig] = {
    # CPU-sized, for tests and the image trainer's default job (sklearn digits at 32x32, grey):
    # 8x8 patches of 4 px + class token = 65 tokens, head_dim 32 (flash-kernel eligible on GPU).
    "vit-tiny": ViTConfig(image_size=32, patch_size=4, in_channels=1, num_classes=10, dim=128, depth=4, heads=4),
    # Paper / timm sizes (vit_{tiny,small,base}_patch16_224): 5.7M / 22.1M / 86.6M parameters.
    "vit-ti16": ViTConfig(dim=192, depth=12, heads=3),
    "vit-s16": ViTConfig(dim=384, depth=12, heads=6),
    "vit-b16": ViTConfig(dim=768, depth=12, heads=12),
}
