"""L²ViT (Zheng et al., "The Linear Attention Resurrection in Vision Transformer", arXiv
2501.16182) in Flax NNX, NHWC, on ``jaxattn.linear_global_attention`` and ``jaxattn.attention``.

Structure follows ``ChuanyangZheng/L2ViT`` ``classification/models/l2vit.py`` (``L2ViT_Tiny`` /
``_Small`` / ``_Base``: ``block_type='mix_local_enhanced_vit'``, ``conv_stem=True``):

- ``downsample_layers[0]`` (conv stem, /4): 3x3/2 conv (``dim/2``) -> BatchNorm -> ReLU ->
  3x3/2 conv (``dim``) -> BatchNorm, then LayerNorm. ``downsample_layers[i > 0]`` (/2):
  LayerNorm on the incoming channels, then a 2x2/2 conv. Odd sizes are zero-padded right/bottom.
- Stages of blocks alternating **inside each stage** (the block index ``j``, as the reference's
  ``build_block(index=j)``): even ``j`` an ``LWABlock``, odd ``j`` an ``LGABlock``.
- ``LWABlock``: ``x = x + DWConv3x3(x)`` (``cpe[0]``); ``x += WinAttn(LN(x))``;
  ``x = x + DWConv3x3(x)`` (``cpe[1]``); ``x += MLP(LN(x))``. ``WinAttn`` is non-shifted
  ``window x window`` softmax attention without relative position bias; the LayerNorm output is
  zero-padded right/bottom to window multiples and the padded tokens are **not masked** (they
  enter as keys with the qkv bias only, as the reference), then cropped.
- ``LGABlock``: ``x = x + DWConv3x3(x)`` (``cpe[0]``); ``x += LinAttn(LN1(x))``;
  ``x += LCM(LN3(x))``; ``x += MLP(LN2(x))``. ``LinAttn`` is ``qkv`` -> linear global attention
  (ReLU features, per-head learnable temperature init ``head_dim ** -0.5``, normaliser clamped at
  100) -> ``proj``. ``LCM`` (local concentration module): DWConv7x7 -> GELU -> BatchNorm ->
  DWConv7x7 (the convs with bias).
- Final LayerNorm, global average pool, linear head. LayerNorms are PyTorch's ``nn.LayerNorm``
  (eps 1e-5), GELU is exact, qkv has a bias, MLP ratio 4, stochastic depth linear in the block
  index up to ``drop_path`` (default 0; the README trains L2ViT-B on ImageNet-1k with 0.3).

Module paths mirror the reference's ``state_dict`` keys (``downsample_layers.0.proj``,
``stages.2.3.attn.temperature``, ``stages.2.3.local_mp.bn``, ``norm``, ``head``, ...), with NNX
leaf names (``kernel`` in HWIO / ``[in, out]``, ``scale``) and the conv stem's ``nn.Sequential``
``downsample_layers.0.proj.proj.{0,1,3,4}`` named ``conv1`` / ``bn1`` / ``conv2`` / ``bn2``; ``temperature`` is
``[heads]`` instead of ``[heads, 1, 1]``. ``to_reference_state_dict`` / ``load_reference_state_dict`` convert (numpy, no
torch import; the official checkpoints keep the weights under ``"model"`` / ``"model_ema"``).
Init as the reference: every conv and linear truncated normal std 0.02 (flax truncates at 2 std,
timm at +-2 absolute) with zero bias; LayerNorm / BatchNorm scale 1, bias 0. BatchNorm follows
NNX modes (``model.train()``: batch statistics, running averages updated; ``model.eval()``: the
running averages). Parameters are fp32; ``dtype`` is the compute dtype; logits are fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.halonet import _bn, param_count
from jaxattn.models.vit import MLP, DropPath, _linear
from jaxattn.ops.attention import attention
from jaxattn.ops.linear_global import linear_global_attention

__all__ = ["L2VIT_CONFIGS", "L2ViT", "L2ViTConfig", "LinearAttention", "WindowAttention", "load_reference_state_dict",
           "param_count", "reference_shapes", "to_reference_state_dict"]

_IMPLS = ("auto", "pallas", "xla")
LN_EPS = 1e-5  # torch nn.LayerNorm default, as the reference
_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class L2ViTConfig:
    depths: tuple[int, ...] = (2, 2, 6, 2)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    window_size: int = 7
    clamp: float = 100.0  # lower bound of the linear attention normaliser
    qkv_bias: bool = True
    drop_path: float = 0.0  # stochastic depth rate of the last block
    num_classes: int = 1000
    image_size: int = 224  # nominal (any size runs; odd maps are padded)
    in_channels: int = 3
    dtype: str = "float32"  # compute dtype; parameters are fp32
    attn_impl: Literal["auto", "pallas", "xla"] = "auto"  # window attention's jaxattn.attention path

    def __post_init__(self):
        n = len(self.depths)
        if n == 0 or len(self.dims) != n or len(self.heads) != n:
            raise ValueError(f"depths, dims and heads need one entry per stage, got "
                             f"{len(self.depths)}, {len(self.dims)}, {len(self.heads)}")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be >= 1, got {self.depths}")
        for c, h in zip(self.dims, self.heads):
            if h < 1 or c % h:
                raise ValueError(f"each dim must be divisible by its heads, got dims {self.dims}, heads {self.heads}")
        if self.dims[0] % 2 or self.dims[0] < 2:
            raise ValueError(f"dims[0] must be even (the conv stem's first width is dims[0] / 2), got {self.dims[0]}")
        if self.window_size < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"need window_size >= 1 and mlp_ratio > 0, got {self.window_size}, {self.mlp_ratio}")
        if not np.isfinite(self.clamp) or self.clamp <= 0:
            raise ValueError(f"clamp must be finite and > 0, got {self.clamp}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.num_classes < 1 or self.in_channels < 1 or self.image_size < 1:
            raise ValueError("num_classes, in_channels and image_size must be >= 1")
        if self.attn_impl not in _IMPLS:
            raise ValueError(f"attn_impl must be one of {_IMPLS}, got {self.attn_impl!r}")
        try:
            ok = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"dtype must be a floating dtype name, got {self.dtype!r}")


def _layer_norm(dim: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, *, groups: int = 1, dtype: Any,
          rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                    use_bias=True, kernel_init=_trunc02, bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def _pad_to(x: jax.Array, m: int) -> jax.Array:
    """Zero-pads NHWC ``x`` at the bottom/right to multiples of ``m``."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = -h % m, -w % m
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else x


def _maybe(dp: DropPath | None, x: jax.Array) -> jax.Array:
    return x if dp is None else dp(x)


class CPE(nnx.Module):
    """Conditional position encoding: ``x + DWConv3x3(x)`` (``proj``, with bias)."""

    def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.proj = _conv(dim, dim, 3, 1, 1, groups=dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.proj(x)


class WindowAttention(nnx.Module):
    """Non-shifted window softmax attention on NHWC maps (no relative position bias)."""

    def __init__(self, dim: int, heads: int, window_size: int, *, qkv_bias: bool = True,
                 impl: str = "auto", dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.heads, self.window_size, self.impl = heads, window_size, impl
        self.head_dim = dim // heads
        self.qkv = _linear(dim, 3 * dim, dtype, rngs, bias=qkv_bias)
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window_size
        xp = _pad_to(x, ws)  # zero tokens, not masked (reference behaviour)
        hp, wp = xp.shape[1], xp.shape[2]
        win = xp.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, ws * ws, c)
        qkv = self.qkv(win).reshape(win.shape[0], ws * ws, 3, self.heads, self.head_dim)
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.impl)
        o = self.proj(o.reshape(win.shape[0], ws * ws, c))
        o = o.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return o[:, :h, :w]


class LinearAttention(nnx.Module):
    """``qkv`` -> ``jaxattn.linear_global_attention`` (learnable ``temperature [heads]``) -> ``proj``."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, clamp: float = 100.0,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.heads, self.head_dim, self.clamp = heads, dim // heads, clamp
        self.temperature = nnx.Param(jnp.full((heads,), self.head_dim ** -0.5, jnp.float32))
        self.qkv = _linear(dim, 3 * dim, dtype, rngs, bias=qkv_bias)
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, N, dim] -> [B, N, dim]``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)
        o = linear_global_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], temperature=self.temperature[...],
                                    clamp=self.clamp)
        return self.proj(o.reshape(b, n, c))


class LCM(nnx.Module):
    """Local concentration module: DWConv7x7 -> GELU -> BatchNorm -> DWConv7x7 (NHWC)."""

    def __init__(self, dim: int, *, kernel_size: int = 7, dtype: Any, rngs: nnx.Rngs):
        p = kernel_size // 2
        self.conv1 = _conv(dim, dim, kernel_size, 1, p, groups=dim, dtype=dtype, rngs=rngs)
        self.bn = _bn(dim, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(dim, dim, kernel_size, 1, p, groups=dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(self.bn(jax.nn.gelu(self.conv1(x), approximate=False)))


class LWABlock(nnx.Module):
    """Local window attention block (NHWC in and out)."""

    def __init__(self, dim: int, heads: int, cfg: L2ViTConfig, drop_path: float = 0.0, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cpe = nnx.List([CPE(dim, dtype=dt, rngs=rngs), CPE(dim, dtype=dt, rngs=rngs)])
        self.norm1 = _layer_norm(dim, dt, rngs)
        self.attn = WindowAttention(dim, heads, cfg.window_size, qkv_bias=cfg.qkv_bias, impl=cfg.attn_impl,
                                    dtype=dt, rngs=rngs)
        self.norm2 = _layer_norm(dim, dt, rngs)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), dtype=dt, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.cpe[0](x)
        x = x + _maybe(self.drop_path, self.attn(self.norm1(x)))
        x = self.cpe[1](x)
        return x + _maybe(self.drop_path, self.mlp(self.norm2(x)))


class LGABlock(nnx.Module):
    """Linear global attention block (enhanced: with the LCM), NHWC in and out."""

    def __init__(self, dim: int, heads: int, cfg: L2ViTConfig, drop_path: float = 0.0, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cpe = nnx.List([CPE(dim, dtype=dt, rngs=rngs)])
        self.norm1 = _layer_norm(dim, dt, rngs)
        self.attn = LinearAttention(dim, heads, qkv_bias=cfg.qkv_bias, clamp=cfg.clamp, dtype=dt, rngs=rngs)
        self.norm2 = _layer_norm(dim, dt, rngs)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), dtype=dt, rngs=rngs)
        self.norm3 = _layer_norm(dim, dt, rngs)
        self.local_mp = LCM(dim, dtype=dt, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = self.cpe[0](x)
        y = self.attn(self.norm1(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        x = x + _maybe(self.drop_path, y)
        x = x + _maybe(self.drop_path, self.local_mp(self.norm3(x)))
        return x + _maybe(self.drop_path, self.mlp(self.norm2(x)))


class ConvStem(nnx.Module):
    """/4 stem: 3x3/2 conv -> BN -> ReLU -> 3x3/2 conv -> BN, then ``norm`` (LayerNorm)."""

    def __init__(self, cin: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, dim // 2, 3, 2, 1, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(dim // 2, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(dim // 2, dim, 3, 2, 1, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(dim, dtype=dtype, rngs=rngs)
        self.norm = _layer_norm(dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _pad_to(x, 4)  # the reference pads to the patch size 4 before the stem
        x = self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(x)))))
        return self.norm(x)


class Downsample(nnx.Module):
    """/2 patch merging: ``norm`` (LayerNorm on the incoming channels) -> 2x2/2 conv ``proj``."""

    def __init__(self, cin: int, cout: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm = _layer_norm(cin, dtype, rngs)
        self.proj = _conv(cin, cout, 2, 2, 0, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(_pad_to(self.norm(x), 2))


class L2ViT(nnx.Module):
    """Images ``[B, H, W, in_channels]`` (NHWC, float) -> logits ``[B, num_classes]`` (fp32)."""

    def __init__(self, cfg: L2ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        downs = [ConvStem(cfg.in_channels, cfg.dims[0], dtype=dt, rngs=rngs)]
        downs += [Downsample(cfg.dims[i - 1], cfg.dims[i], dtype=dt, rngs=rngs) for i in range(1, len(cfg.dims))]
        self.downsample_layers = nnx.List(downs)
        rates = np.linspace(0.0, cfg.drop_path, sum(cfg.depths)).tolist()
        stages, cur = [], 0
        for dim, heads, depth in zip(cfg.dims, cfg.heads, cfg.depths):
            blocks = [(LWABlock if j % 2 == 0 else LGABlock)(dim, heads, cfg, rates[cur + j], rngs=rngs)
                      for j in range(depth)]
            stages.append(nnx.List(blocks))
            cur += depth
        self.stages = nnx.List(stages)
        self.norm = _layer_norm(cfg.dims[-1], dt, rngs)
        self.head = _linear(cfg.dims[-1], cfg.num_classes, dt, rngs)

    def forward_features(self, images: jax.Array) -> jax.Array:
        """Pooled features ``[B, dims[-1]]``."""
        cfg = self.cfg
        if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be NHWC [batch, height, width, {cfg.in_channels}], "
                             f"got shape {tuple(getattr(images, 'shape', ()))}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be a float array (normalise first), got {images.dtype}")
        x = images.astype(cfg.dtype)
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)
            for block in stage:
                x = block(x)
        x = self.norm(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.forward_features(images)).astype(jnp.float32)


L2VIT_CONFIGS: dict[str, L2ViTConfig] = {
    # CPU-sized for 32x32 grey digits: stem /4 -> 8x8 (4x4 windows), 4x4 (one window), 2x2
    # (padded to one 4x4 window); LWA then LGA block in every stage.
    "l2vit-mini": L2ViTConfig(depths=(2, 2, 2), dims=(32, 64, 128), heads=(1, 2, 4), window_size=4,
                              num_classes=10, image_size=32, in_channels=1),
    # The reference's L2ViT_Tiny / _Small / _Base (224 px; paper: 29M / 50M / 89M parameters).
    "l2vit-t": L2ViTConfig(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), heads=(3, 6, 12, 24)),
    "l2vit-s": L2ViTConfig(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), heads=(3, 6, 12, 24)),
    "l2vit-b": L2ViTConfig(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32)),
}


# ---------------------------------------------------------------------------------------------
# Reference (ChuanyangZheng/L2ViT) state_dict conversion

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var",
         "temperature": "temperature"}
_STEM = {"conv1": "proj.proj.0", "bn1": "proj.proj.1", "conv2": "proj.proj.3", "bn2": "proj.proj.4"}


def _reference_entries(model: L2ViT) -> list[hf.Entry]:
    """Every parameter and BatchNorm statistic under its reference key: conv HWIO <-> OIHW, linear
    [in, out] <-> [out, in], temperature [h] <-> [h, 1, 1]."""
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.Param, nnx.BatchStat)):
            continue
        names = [str(p) for p in path]
        if names[:2] == ["downsample_layers", "0"] and names[2] in _STEM:
            names[2] = _STEM[names[2]]
        leaf = names[-1]
        key = ".".join(names[:-1] + [_LEAF[leaf]])
        if leaf == "kernel":
            out.append((hf.conv if node.ndim == 4 else hf.linear)(key, node))
        elif leaf == "temperature":
            out.append(hf.Entry((key,), node, lambda t: t.reshape(-1), lambda t: (t[:, None, None],)))
        else:
            out.append(hf.same(key, node))
    return out


def reference_shapes(model: L2ViT) -> dict[str, tuple[int, ...]]:
    """Reference ``state_dict`` keys and shapes (works on an abstract ``nnx.eval_shape`` model)."""
    return hf.entry_shapes(_reference_entries(model))


def to_reference_state_dict(model: L2ViT) -> dict[str, np.ndarray]:
    """The model's variables under the reference ``state_dict`` keys and layouts (numpy)."""
    return hf.to_state_dict(_reference_entries(model))


def load_reference_state_dict(model: L2ViT, state_dict: dict[str, Any]) -> None:
    """Copies a reference ``state_dict`` (numpy arrays or anything ``np.asarray`` takes) into
    ``model`` in place; every model variable must be present and every key used
    (``num_batches_tracked`` is ignored)."""
    hf.load_state_dict(_reference_entries(model), state_dict, ignore=lambda k: k.endswith("num_batches_tracked"))
