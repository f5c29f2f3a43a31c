"""HaloNet in Flax NNX (NHWC), on ``jaxattn.halo_attention_kv``.

``HaloAttn`` is timm's ``HaloAttn`` layer (``timm.layers.halo_attn``): a 1x1 conv ``q``
(strided when the layer strides), a 1x1 conv ``kv`` whose output channels are per head
``[k_h (dim_head_qk), v_h (dim_head_v)]``, relative position embeddings
``pos_embed.height_rel`` / ``pos_embed.width_rel`` of shape ``[2 win - 1, dim_head_qk]``
shared by the heads, and blocked local attention in which every ``block x block`` query block
attends to its ``win x win`` window (``win = block + 2 halo``) of the zero-padded key/value
map. Logits are ``scale q.k + rel`` (``scale (q.k + rel)`` with ``scale_pos_embed``), border
keys are zero and not masked. With ``stride=2`` the queries are subsampled (``q`` is a
stride-2 1x1 conv, query blocks are ``block / 2`` wide) unless ``avg_down`` or
``block_size`` is odd, in which case the full-resolution output is 2x2 average-pooled.
Unlike timm, which asserts that H and W are multiples of ``block_size``, other sizes are
accepted: the projected k/v (and q) are zero-padded at the bottom/right to block multiples
and the output is cropped, so padded keys act like the halo border.

``HaloNet`` is timm's ``ByobNet`` restricted to what the HaloNet layouts use: a stem
(timm's ``tiered`` 3x3 stack or a ResNet ``7x7`` conv, optional 3x3/2 max-pool), stages of
ResNet bottleneck blocks (``'b'``: 1x1 -> 3x3 -> [SE] -> 1x1) and self-attention blocks
(``'h'``: 1x1 -> HaloAttn -> BN-act -> 1x1), a 1x1 conv + BN shortcut where the shape
changes, an optional final 1x1 conv (``num_features``), global average pooling and a linear
classifier. BatchNorm follows NNX modes: ``model.train()`` uses batch statistics and updates
the running averages, ``model.eval()`` uses the running averages.

timm checkpoint conventions: parameter paths mirror timm's ``state_dict`` keys, with NNX
leaf names in place of PyTorch's. A 1x1 or kxk conv ``X.weight`` (PyTorch OIHW
``[out, in, kh, kw]``) is ``X.kernel`` in HWIO ``[kh, kw, in, out]``
(``w.permute(2, 3, 1, 0)``); the classifier ``head.fc.weight`` ``[out, in]`` is
``head.fc.kernel`` ``[in, out]``; BatchNorm ``weight / bias / running_mean / running_var``
are ``scale / bias / mean / var`` (``num_batches_tracked`` is dropped); biases and
``pos_embed.height_rel / width_rel`` (``[2 win - 1, dim_head_qk]``) are copied as is.
Module paths are the same (``stem.conv1.conv``, ``stages.2.1.self_attn.kv``,
``stages.1.0.attn.fc1``, ``final_conv.bn``, ...), with NHWC activations instead of NCHW.
``load_timm_state_dict(model, sd)`` and ``to_timm_state_dict(model)`` do the conversion
(numpy arrays in and out, so no torch import). Channel order inside ``q`` is head-major
(``[head, dim_head_qk]``) and inside ``kv`` per-head interleaved
(``[head, dim_head_qk + dim_head_v]``), as in timm, so the weights need no reordering.
Training differences: PyTorch BatchNorm updates ``running_var`` with the unbiased batch
variance, NNX with the biased one; parameter init follows timm's scheme, not its draws.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxattn.models._remat import remat_blocks
from jaxattn.models.gates import FeatureGate
from jaxattn.models.timm_weights import load_timm_state_dict, timm_variables, to_timm_state_dict  # noqa: F401
from jaxattn.ops.halo import halo_attention_kv

_IMPLS = ("auto", "pallas", "xla")
_ACTS = {"relu": jax.nn.relu, "silu": jax.nn.silu}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _he_fan_out(key, shape, dtype=jnp.float32):
    """timm ``ByobNet`` conv init: ``N(0, sqrt(2 / fan_out))``, fan_out = kh * kw * out."""
    kh, kw, _, out = shape
    return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (kh * kw * out))


def _conv(cin: int, cout: int, k: int, stride: int, *, dtype, rngs: nnx.Rngs, bias: bool = False,
          kernel_init=_he_fan_out) -> nnx.Conv:
    """Conv with timm's symmetric padding ``((stride - 1) + (k - 1)) // 2``."""
    p = ((stride - 1) + (k - 1)) // 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=bias,
                    kernel_init=kernel_init, dtype=dtype, rngs=rngs)


def _bn(c: int, *, dtype, rngs: nnx.Rngs, zero: bool = False) -> nnx.BatchNorm:
    """PyTorch BatchNorm2d defaults (momentum 0.1 -> NNX 0.9, eps 1e-5)."""
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs,
                         scale_init=nnx.initializers.zeros if zero else nnx.initializers.ones)


def _avg_pool2(x: jax.Array) -> jax.Array:
    """2x2/2 average pool; odd sizes round up, averaging the valid elements (timm's AvgPool2d(2, 2)
    on even sizes, which is all timm accepts)."""
    _, h, w, _ = x.shape
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    win, strides = (1, 2, 2, 1), (1, 2, 2, 1)
    s = lax.reduce_window(x.astype(jnp.float32), 0.0, lax.add, win, strides, pad)
    n = lax.reduce_window(jnp.ones((1, h, w, 1), jnp.float32), 0.0, lax.add, win, strides, pad)
    return (s / n).astype(x.dtype)


def _max_pool3s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)``."""
    # The init must be a Python scalar: an array built under jit is not concrete, so JAX would pick
    # the generic (non-differentiable) reduce_window instead of reduce_window_max.
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))


class PosEmbedRel(nnx.Module):
    """timm's ``PosEmbedRel`` parameters: ``height_rel``, ``width_rel`` ``[2 win - 1, dim_head]``."""

    def __init__(self, win_size: int, dim_head: int, scale: float, *, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(stddev=scale)
        self.height_rel = nnx.Param(init(rngs.params(), (2 * win_size - 1, dim_head)))
        self.width_rel = nnx.Param(init(rngs.params(), (2 * win_size - 1, dim_head)))


class HaloAttn(nnx.Module):
    """timm's ``HaloAttn`` (same constructor knobs, same parameter layout), NHWC in and out:
    ``[B, H, W, dim] -> [B, ceil(H / stride), ceil(W / stride), dim_out]``.

    ``dim_head`` (q/k width per head) defaults to ``make_divisible(dim_out * qk_ratio) // num_heads``;
    the value width per head is ``dim_out // num_heads``. ``feat_size`` is accepted and unused
    (timm's argument compatibility). ``impl`` selects ``jaxattn.halo_attention_kv``'s path; ``dtype``
    is the compute dtype (parameters are fp32).
    """

    def __init__(self, dim: int, dim_out: int | None = None, feat_size: Any = None, stride: int = 1,
                 num_heads: int = 8, dim_head: int | None = None, block_size: int = 8, halo_size: int = 3,
                 qk_ratio: float = 1.0, qkv_bias: bool = False, avg_down: bool = False,
                 scale_pos_embed: bool = False, *, impl: Literal["auto", "pallas", "xla"] = "auto",
                 dtype: Any = None, rngs: nnx.Rngs):
        del feat_size
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} must be divisible by num_heads {num_heads}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"need block_size >= 1 and halo_size >= 0, got {block_size}, {halo_size}")
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.dim, self.num_heads = dim, num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size, self.halo_size = block_size, halo_size
        self.win_size = block_size + 2 * halo_size
        self.use_avg_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not self.use_avg_pool else 1
        self.impl = impl
        init = nnx.initializers.truncated_normal(stddev=dim ** -0.5)  # fan-in, as timm resets them
        self.q = nnx.Conv(dim, self.dim_out_qk, (1, 1), strides=self.block_stride, padding="VALID",
                          use_bias=qkv_bias, kernel_init=init, dtype=dtype, rngs=rngs)
        self.kv = nnx.Conv(dim, self.dim_out_qk + self.dim_out_v, (1, 1), padding="VALID",
                           use_bias=qkv_bias, kernel_init=init, dtype=dtype, rngs=rngs)
        self.pos_embed = PosEmbedRel(self.win_size, self.dim_head_qk, self.scale, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"HaloAttn expects NHWC input [batch, height, width, {self.dim}], "
                             f"got shape {tuple(x.shape)}")
        b, h, w, _ = x.shape
        bs, s, heads = self.block_size, self.block_stride, self.num_heads
        q = self.q(x)  # [B, ceil(H/s), ceil(W/s), heads * dqk]
        kv = self.kv(x)
        hq, wq = q.shape[1], q.shape[2]
        hp, wp = -(-h // bs) * bs, -(-w // bs) * bs
        if (hp, wp) != (h, w):  # timm asserts instead; zero keys/values behave like the halo border
            kv = jnp.pad(kv, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
            q = jnp.pad(q, ((0, 0), (0, hp // s - hq), (0, wp // s - wq), (0, 0)))
        q = q.reshape(b, hp // s, wp // s, heads, self.dim_head_qk)
        kv = kv.reshape(b, hp, wp, heads, self.dim_head_qk + self.dim_head_v)  # each head: its k, then its v
        o = halo_attention_kv(q, kv, self.pos_embed.height_rel[...], self.pos_embed.width_rel[...],
                              block_size=bs, halo_size=self.halo_size, value_dim=self.dim_head_v, stride=s,
                              scale=self.scale, scale_pos_embed=self.scale_pos_embed, impl=self.impl)
        o = o[:, :hq, :wq].reshape(b, hq, wq, self.dim_out_v)
        return _avg_pool2(o) if self.use_avg_pool else o


@dataclasses.dataclass(frozen=True)
class HaloNetConfig:
    """A HaloNet layout. ``layout`` has one string per stage, one letter per block: ``'b'`` a
    bottleneck conv block, ``'h'`` a HaloAttn self-attention block; the first block of a stage
    carries its stride. ``bottle_ratio`` (one value or one per stage) sets the block width
    ``make_divisible(channels * ratio)``; ``value_ratio`` (the paper's ``r_v``; timm: 1) widens
    HaloAttn's value/output to ``value_ratio * width``. ``num_heads`` is one value or one per stage."""

    layout: tuple[str, ...] = ("bb", "bb", "bh", "hh")
    channels: tuple[int, ...] = (256, 512, 1024, 2048)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    bottle_ratio: float | tuple[float, ...] = 0.25
    stem_type: Literal["tiered", "7x7"] = "tiered"
    stem_chs: int = 64
    stem_pool: bool = True  # 3x3/2 max-pool; without it a tiered stem's last conv strides
    act: Literal["relu", "silu"] = "relu"
    se: bool = False  # squeeze-excite (timm SEModule, rd 1/16, ReLU) in 'b' blocks
    num_features: int = 0  # final 1x1 conv-BN-act width (0: none)
    # HaloAttn
    block_size: int = 8
    halo_size: int = 2
    num_heads: int | tuple[int, ...] = 8
    dim_head: int | None = None
    qk_ratio: float = 1.0
    value_ratio: float = 1.0
    qkv_bias: bool = False
    avg_down: bool = False
    scale_pos_embed: bool = False
    # task / numerics
    num_classes: int = 1000
    image_size: int = 256  # nominal input size (any size runs; maps are padded to block multiples)
    in_channels: int = 3
    dtype: str = "float32"  # compute dtype; parameters are fp32
    attn_impl: Literal["auto", "pallas", "xla"] = "auto"
    zero_init_last: bool = True  # zero the last BN scale of each residual branch (timm default)
    gates: bool = False  # feature-selection gates on each stage's output channels (jaxattn.models.gates)
    remat: bool = False  # training: each block recomputed in the backward (activation checkpointing)

    def __post_init__(self):
        n = len(self.layout)
        if n == 0 or len(self.channels) != n or len(self.strides) != n:
            raise ValueError(f"layout, channels and strides need one entry per stage, got "
                             f"{len(self.layout)}, {len(self.channels)}, {len(self.strides)}")
        for name in ("bottle_ratio", "num_heads"):
            val = getattr(self, name)
            if isinstance(val, tuple) and len(val) != n:
                raise ValueError(f"{name} needs one value or {n} (one per stage), got {len(val)}")
        for s in self.layout:
            if not s or set(s) - {"b", "h"}:
                raise ValueError(f"each layout entry is a non-empty string of 'b'/'h', got {s!r}")
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"stage strides must be 1 or 2, got {self.strides}")
        if self.stem_type not in ("tiered", "7x7"):
            raise ValueError(f"stem_type must be 'tiered' or '7x7', got {self.stem_type!r}")
        if self.act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {self.act!r}")
        if self.attn_impl not in _IMPLS:
            raise ValueError(f"attn_impl must be one of {_IMPLS}, got {self.attn_impl!r}")
        if self.num_classes < 1 or self.in_channels < 1 or self.image_size < 1:
            raise ValueError("num_classes, in_channels and image_size must be >= 1")
        if self.block_size < 1 or self.halo_size < 0:
            raise ValueError(f"need block_size >= 1, halo_size >= 0, got {self.block_size}, {self.halo_size}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a float dtype, got {self.dtype!r}")

    def stage_value(self, name: str, i: int):
        val = getattr(self, name)
        return val[i] if isinstance(val, tuple) else val


class ConvNormAct(nnx.Module):
    """timm ``ConvNormAct``: ``conv`` (no bias) -> ``bn`` -> act."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, *, act, dtype, rngs: nnx.Rngs,
                 zero_bn: bool = False):
        self.conv = _conv(cin, cout, k, stride, dtype=dtype, rngs=rngs)
        self.bn = _bn(cout, dtype=dtype, rngs=rngs, zero=zero_bn)
        self.act = act

    def __call__(self, x):
        x = self.bn(self.conv(x))
        return x if self.act is None else self.act(x)


class SEModule(nnx.Module):
    """timm ``SEModule``: mean -> ``fc1`` (1x1, bias) -> ReLU -> ``fc2`` -> sigmoid gate."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        rd = make_divisible(c / 16, 8, round_limit=0.0)
        self.fc1 = _conv(c, rd, 1, 1, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = _conv(rd, c, 1, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        return x * jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))


class BottleneckBlock(nnx.Module):
    """timm ``BottleneckBlock``: 1x1 -> 3x3 (stride) -> [SE] -> 1x1, residual, act."""

    def __init__(self, cin: int, cout: int, stride: int, width: int, cfg: HaloNetConfig, *, rngs: nnx.Rngs):
        dt, act = jnp.dtype(cfg.dtype), _ACTS[cfg.act]
        self.shortcut = (ConvNormAct(cin, cout, 1, stride, act=None, dtype=dt, rngs=rngs)
                         if cin != cout or stride != 1 else None)
        self.conv1_1x1 = ConvNormAct(cin, width, 1, act=act, dtype=dt, rngs=rngs)
        self.conv2_kxk = ConvNormAct(width, width, 3, stride, act=act, dtype=dt, rngs=rngs)
        self.attn = SEModule(width, dtype=dt, rngs=rngs) if cfg.se else None
        self.conv3_1x1 = ConvNormAct(width, cout, 1, act=None, dtype=dt, rngs=rngs, zero_bn=cfg.zero_init_last)
        self.act = act

    def __call__(self, x):
        y = self.conv2_kxk(self.conv1_1x1(x))
        if self.attn is not None:
            y = self.attn(y)
        y = self.conv3_1x1(y)
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class SelfAttnBlock(nnx.Module):
    """timm ``SelfAttnBlock``: 1x1 -> HaloAttn (stride) -> BN-act ``post_attn`` -> 1x1, residual, act."""

    def __init__(self, cin: int, cout: int, stride: int, width: int, heads: int, cfg: HaloNetConfig, *,
                 rngs: nnx.Rngs):
        dt, act = jnp.dtype(cfg.dtype), _ACTS[cfg.act]
        attn_out = make_divisible(width * cfg.value_ratio) if cfg.value_ratio != 1 else width
        self.shortcut = (ConvNormAct(cin, cout, 1, stride, act=None, dtype=dt, rngs=rngs)
                         if cin != cout or stride != 1 else None)
        self.conv1_1x1 = ConvNormAct(cin, width, 1, act=act, dtype=dt, rngs=rngs)
        # q/k width follows the block width, the value width attn_out (timm: the same when
        # value_ratio == 1); this reproduces the paper's H5-H7 parameter counts.
        dim_head = cfg.dim_head or make_divisible(width * cfg.qk_ratio) // heads
        self.self_attn = HaloAttn(width, attn_out, stride=stride, num_heads=heads, dim_head=dim_head,
                                  block_size=cfg.block_size, halo_size=cfg.halo_size, qk_ratio=cfg.qk_ratio,
                                  qkv_bias=cfg.qkv_bias, avg_down=cfg.avg_down,
                                  scale_pos_embed=cfg.scale_pos_embed, impl=cfg.attn_impl, dtype=dt, rngs=rngs)
        self.post_attn = _bn(attn_out, dtype=dt, rngs=rngs)
        self.conv3_1x1 = ConvNormAct(attn_out, cout, 1, act=None, dtype=dt, rngs=rngs, zero_bn=cfg.zero_init_last)
        self.act = act

    def __call__(self, x):
        y = self.act(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        y = self.conv3_1x1(y)
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nnx.Module):
    """``tiered``: 3x3 convs of ``(3c/8, c/2, c)`` channels, the first with stride 2 (the last too
    when there is no pool); ``7x7``: one 7x7/2 conv. Then the optional 3x3/2 max-pool."""

    def __init__(self, cfg: HaloNetConfig, *, rngs: nnx.Rngs):
        dt, act, c = jnp.dtype(cfg.dtype), _ACTS[cfg.act], cfg.stem_chs
        if cfg.stem_type == "tiered":
            chs, k = (3 * c // 8, c // 2, c), 3
            strides = [2, 1, 2 if not cfg.stem_pool else 1]
        else:
            chs, k, strides = (c,), 7, [2]
        prev = cfg.in_channels
        self.n = len(chs)
        for i, (ch, s) in enumerate(zip(chs, strides)):
            setattr(self, f"conv{i + 1}", ConvNormAct(prev, ch, k, s, act=act, dtype=dt, rngs=rngs))
            prev = ch
        self.pool = cfg.stem_pool
        self.out_chs = prev

    def __call__(self, x):
        for i in range(self.n):
            x = getattr(self, f"conv{i + 1}")(x)
        return _max_pool3s2(x) if self.pool else x


class ClassifierHead(nnx.Module):
    """Global average pool -> ``fc``."""

    def __init__(self, cin: int, num_classes: int, *, dtype, rngs: nnx.Rngs):
        self.fc = nnx.Linear(cin, num_classes, kernel_init=nnx.initializers.normal(0.01), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc(jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype))


class HaloNet(nnx.Module):
    """Images ``[B, H, W, in_channels]`` (NHWC, float) -> logits ``[B, num_classes]`` (fp32)."""

    def __init__(self, cfg: HaloNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.stem = Stem(cfg, rngs=rngs)
        prev = self.stem.out_chs
        stages = []
        for i, (types, c, s) in enumerate(zip(cfg.layout, cfg.channels, cfg.strides)):
            out = make_divisible(c)
            width = make_divisible(out * cfg.stage_value("bottle_ratio", i))
            heads = cfg.stage_value("num_heads", i)
            blocks = []
            for j, t in enumerate(types):
                stride = s if j == 0 else 1
                if t == "b":
                    blocks.append(BottleneckBlock(prev, out, stride, width, cfg, rngs=rngs))
                else:
                    blocks.append(SelfAttnBlock(prev, out, stride, width, heads, cfg, rngs=rngs))
                prev = out
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.gates = (nnx.List([FeatureGate(make_divisible(c), rngs=rngs) for c in cfg.channels])
                      if cfg.gates else None)
        self.final_conv = (ConvNormAct(prev, cfg.num_features, 1, act=_ACTS[cfg.act], dtype=dt, rngs=rngs)
                           if cfg.num_features else None)
        self.num_features = cfg.num_features or prev
        self.head = ClassifierHead(self.num_features, cfg.num_classes, dtype=dt, rngs=rngs)

    def forward_features(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be NHWC [batch, height, width, {cfg.in_channels}], "
                             f"got shape {tuple(images.shape)}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be a float array (normalise first), got {images.dtype}")
        x = self.stem(images.astype(cfg.dtype))
        run = remat_blocks(cfg.remat, lambda block, x: block(x))
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = run(block, x)
            if self.gates is not None:
                x = self.gates[i](x)
        return x if self.final_conv is None else self.final_conv(x)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.forward_features(images)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# timm weight conversion

def param_count(model: nnx.Module) -> int:
    """Trainable parameters (``nnx.Param``), BatchNorm running statistics excluded."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# Named configurations (merged into jaxattn.models.MODEL_CONFIGS)

def _paper_h(b: int, h: int, rv: float, rb: float, l3: int, df: int, size: int) -> HaloNetConfig:
    """HaloNet-H{0..7} (Vaswani et al. 2021, "Scaling Local Self-Attention for Parameter Efficient
    Visual Backbones", model table): block b, halo h, value ratio r_v, bottleneck ratio r_b,
    l3 blocks in stage 3, final 1x1 conv width d_f (0: none), image size. Blocks are all
    self-attention, depths (3, 3, l3, 3), block width (64, 128, 256, 512) (q/k width too),
    output ``r_b`` x that, value width ``r_v`` x that; these reproduce the paper's parameter
    counts (5.5 / 8.1 / 9.4 / 11.8 / 19.1 / 30.7 / 43.4 / 67.4 M). UNCONFIRMED (not in the table;
    they change no parameter count): the 7x7/2 conv + max-pool stem (as timm's ``halonet_h1``),
    heads (4, 8, 8, 8) per stage, and SiLU activations (timm's ``halonet_h1`` uses ReLU)."""
    base = (64, 128, 256, 512)
    return HaloNetConfig(layout=("h" * 3, "h" * 3, "h" * l3, "h" * 3), channels=tuple(round(c * rb) for c in base),
                         strides=(1, 2, 2, 2), bottle_ratio=1.0 / rb, stem_type="7x7", stem_chs=64, stem_pool=True,
                         act="silu", block_size=b, halo_size=h, num_heads=(4, 8, 8, 8), value_ratio=rv,
                         num_features=df, image_size=size)


HALONET_CONFIGS: dict[str, HaloNetConfig] = {
    # CPU-sized, for tests and the image trainer's default job (sklearn digits at 32x32, grey):
    # tiered stem without pool to 8x8, then 8x8 conv, 4x4 conv + halo, strided halo to 2x2.
    "halonet-tiny": HaloNetConfig(
        layout=("b", "bh", "h"), channels=(64, 128, 256), strides=(1, 2, 2), bottle_ratio=0.5,
        stem_type="tiered", stem_chs=32, stem_pool=False, act="silu", block_size=4, halo_size=1, num_heads=4,
        num_classes=10, image_size=32, in_channels=1),
    #                b   h  r_v   r_b  l3   d_f   image
    "halonet-h0": _paper_h(8, 3, 1.0, 0.5, 7, 0, 256),
    "halonet-h1": _paper_h(8, 3, 1.0, 1.0, 10, 0, 256),
    "halonet-h2": _paper_h(8, 3, 1.0, 1.25, 11, 0, 256),
    "halonet-h3": _paper_h(10, 3, 1.0, 1.5, 12, 1024, 320),
    "halonet-h4": _paper_h(12, 2, 1.0, 3.0, 12, 1280, 384),
    "halonet-h5": _paper_h(14, 2, 2.5, 2.0, 23, 1536, 448),
    "halonet-h6": _paper_h(8, 4, 3.0, 2.75, 24, 1536, 512),
    "halonet-h7": _paper_h(10, 3, 4.0, 3.5, 26, 2048, 600),
    # timm byoanet model_cfgs (weights convert with load_timm_state_dict; 256 px).
    "halonet26t": HaloNetConfig(
        layout=("bb", "bb", "bh", "hh"), channels=(256, 512, 1024, 2048), strides=(1, 2, 2, 2), bottle_ratio=0.25,
        stem_type="tiered", stem_chs=64, stem_pool=True, act="relu", block_size=8, halo_size=2, num_heads=8),
    "sehalonet33ts": HaloNetConfig(
        layout=("bb", "bbh", "bbh", "hh"), channels=(256, 512, 1024, 1536), strides=(1, 2, 2, 2),
        bottle_ratio=(0.25, 0.25, 0.25, 0.333), stem_type="tiered", stem_chs=64, stem_pool=False, act="silu",
        se=True, num_features=1280, block_size=8, halo_size=3, num_heads=8),
}
