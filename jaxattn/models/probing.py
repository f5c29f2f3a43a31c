"""Probe heads for frozen encoders (Psomas et al., "Attention, Please! Revisiting Attentive Probing
Through the Lens of Efficiency", ICLR 2026; ``billpsomas/efficient-probing``).

Every probe maps frozen tokens ``x [B, T, C]`` to logits ``[B, classes]`` (fp32) as the original's
``probe_heads.py``: ``pooling -> BatchNorm1d(affine=False, eps=1e-6) -> Linear``.

* :class:`EfficientProbe` (EP, ``poolings/ep.py``): ``M`` learned queries ``Q [M, C]`` (init
  ``N(0, 0.02^2)``), no ``W_q``/``W_k``: ``A = softmax_T(Q x^T C^-1/2)`` ``[B, M, T]``;
  ``V = x W_v`` (``C -> C' = C / d_out``, no bias) split into ``M`` channel slices of width
  ``C' / M``; query ``m`` reads only slice ``m``: ``z_m = A_m V[:, :, m]``; ``z = concat_m z_m``
  ``[B, C']`` -> BN -> ``Linear(C', classes)`` (a fresh classifier, PyTorch's default init).
  Defaults ``M = 32``, ``d_out = 1``. Trainable: ``M C + C C' + C' K + K``.
* :class:`AttentiveProbe`: the standard attentive probe the paper starts from, as the original's
  ``aim`` pooling (``poolings/aim.py``, AIM's ``AttentionPoolingClassifier``): a BatchNorm
  (affine=False) over the input tokens, ``W_k``, ``W_v`` ``C x C`` (no bias, no ``W_q``), one learned
  query (init ``N(0, 0.02^2)``), ``heads``-head cross-attention with scale ``(C/heads)^-1/2``, the
  mean over queries -> BN -> ``Linear(C, classes)``. ``heads`` defaults to 16, the original's
  ``--num_heads`` default (AIM's own default is 12). Trainable: ``2 C^2 + n_q C + C K + K``.
* :class:`LinearProbe`: linear probing as the original's (MAE) protocol: the class token (``pool="cls"``,
  token 0) or the mean over the given tokens (``pool="mean"``, GAP) -> BN -> ``Linear(C, classes)``.
  Trainable: ``C K + K``.

Initialisation follows the original: learned queries ``N(0, 0.02^2)``; ``W_v``/``W_k`` and EP's fresh
classifier PyTorch's ``nn.Linear`` default (weight and bias ``U(+-1/sqrt(fan_in))``); the linear and
attentive probes keep the encoder's head, i.e. timm's init (truncated normal std 0.02, zero bias).
BatchNorm: batch statistics in train mode (``model.train()``), running statistics in eval mode
(``model.eval()``), PyTorch momentum 0.1 (flax ``momentum=0.9``); one difference: flax updates the
running variance with the biased batch variance, PyTorch with the unbiased one. Parameters and
compute are fp32 (inputs are cast).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.ops._checks import check_rank
from jaxattn.ops.attention import attention

BN_EPS = 1e-6  # the original's _batchnorm
BN_MOMENTUM = 0.9  # flax convention; PyTorch's momentum=0.1

_query_init = nnx.initializers.normal(0.02)
_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)
_torch_weight_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(din: int, dout: int, *, bias: bool = True, rngs: nnx.Rngs) -> nnx.Linear:
    """``nn.Linear(din, dout, bias)`` with PyTorch's default initialisation."""
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=_torch_weight_init, bias_init=_torch_bias_init(din),
                      rngs=rngs)


def timm_head(din: int, dout: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A classifier initialised as timm's ViT head (truncated normal std 0.02, zero bias)."""
    return nnx.Linear(din, dout, kernel_init=_trunc02, bias_init=nnx.initializers.zeros, rngs=rngs)


def plain_batchnorm(width: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """``BatchNorm1d(width, affine=False, eps=1e-6)`` over the last axis (statistics over all others)."""
    return nnx.BatchNorm(width, use_bias=False, use_scale=False, epsilon=BN_EPS, momentum=BN_MOMENTUM, rngs=rngs)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_tokens(x: Any, dim: int) -> jax.Array:
    layout = f"[batch, tokens, {dim}]"
    check_rank("x", x, 3, layout)
    if x.shape[-1] != dim:
        raise ValueError(f"x must have {dim} channels (last axis) {layout}, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one token {layout}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {jnp.dtype(x.dtype).name}")
    return jnp.asarray(x, jnp.float32)


class EfficientProbe(nnx.Module):
    """Efficient probing: ``x [B, T, C] -> logits [B, num_classes]`` (see the module docstring)."""

    def __init__(self, dim: int, num_classes: int, *, num_queries: int = 32, d_out: int = 1,
                 qkv_bias: bool = False, rngs: nnx.Rngs):
        _positive(dim=dim, num_classes=num_classes, num_queries=num_queries, d_out=d_out)
        if dim % d_out:
            raise ValueError(f"dim C={dim} must be divisible by d_out={d_out} (C' = C / d_out)")
        if (dim // d_out) % num_queries:
            raise ValueError(f"C' = dim / d_out = {dim // d_out} must be divisible by num_queries={num_queries} "
                             f"(each query reads C'/num_queries channels), i.e. dim must be divisible by "
                             f"num_queries * d_out = {num_queries * d_out}")
        self.dim, self.num_queries, self.d_out = dim, num_queries, d_out
        self.out_dim = dim // d_out  # C'
        self.scale = dim ** -0.5  # one head over the full width
        self.queries = nnx.Param(_query_init(rngs.params(), (num_queries, dim)))
        self.v = torch_linear(dim, self.out_dim, bias=qkv_bias, rngs=rngs)
        self.norm = plain_batchnorm(self.out_dim, rngs=rngs)
        self.head = torch_linear(self.out_dim, num_classes, rngs=rngs)

    def attention_maps(self, x: jax.Array) -> jax.Array:
        """``softmax_T(Q x^T / sqrt(C))``: ``[B, M, T]`` fp32 (one map per query)."""
        x = _check_tokens(x, self.dim)
        logits = jnp.einsum("mc,btc->bmt", self.queries[...], x) * self.scale
        return jax.nn.softmax(logits, axis=-1)

    def pool(self, x: jax.Array) -> jax.Array:
        """The pooled representation ``z [B, C']`` (before BatchNorm)."""
        a = self.attention_maps(x)
        b, t, _ = x.shape
        v = self.v(jnp.asarray(x, jnp.float32)).reshape(b, t, self.num_queries, self.out_dim // self.num_queries)
        return jnp.einsum("bmt,btmc->bmc", a, v).reshape(b, self.out_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(self.pool(x)))


class AttentiveProbe(nnx.Module):
    """Standard attentive probing (the original's ``aim`` pooling): ``x [B, T, C] -> logits``."""

    def __init__(self, dim: int, num_classes: int, *, heads: int = 16, num_queries: int = 1,
                 qkv_bias: bool = False, impl: Literal["auto", "pallas", "xla"] = "auto", rngs: nnx.Rngs):
        _positive(dim=dim, num_classes=num_classes, heads=heads, num_queries=num_queries)
        if dim % heads:
            raise ValueError(f"dim C={dim} must be divisible by heads={heads}")
        self.dim, self.heads, self.num_queries, self.impl = dim, heads, num_queries, impl
        self.input_norm = plain_batchnorm(dim, rngs=rngs)
        self.k = torch_linear(dim, dim, bias=qkv_bias, rngs=rngs)
        self.v = torch_linear(dim, dim, bias=qkv_bias, rngs=rngs)
        self.queries = nnx.Param(_query_init(rngs.params(), (num_queries, dim)))
        self.norm = plain_batchnorm(dim, rngs=rngs)
        self.head = timm_head(dim, num_classes, rngs=rngs)

    def pool(self, x: jax.Array) -> jax.Array:
        """The pooled representation ``[B, C]`` (before the output BatchNorm)."""
        x = self.input_norm(_check_tokens(x, self.dim))
        b, t, c = x.shape
        h, d = self.heads, c // self.heads
        q = jnp.broadcast_to(self.queries[...].reshape(1, self.num_queries, h, d), (b, self.num_queries, h, d))
        k = self.k(x).reshape(b, t, h, d)
        v = self.v(x).reshape(b, t, h, d)
        o = attention(q, k, v, impl=self.impl)  # [B, n_q, H, d], scale d^-1/2
        return jnp.mean(o.reshape(b, self.num_queries, c), axis=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(self.pool(x)))


class LinearProbe(nnx.Module):
    """Linear probing: token 0 (``pool="cls"``) or the token mean (``pool="mean"``) -> BN -> linear."""

    def __init__(self, dim: int, num_classes: int, *, pool: Literal["cls", "mean"] = "cls", rngs: nnx.Rngs):
        _positive(dim=dim, num_classes=num_classes)
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.dim, self.pool_mode = dim, pool
        self.norm = plain_batchnorm(dim, rngs=rngs)
        self.head = timm_head(dim, num_classes, rngs=rngs)

    def pool(self, x: jax.Array) -> jax.Array:
        x = _check_tokens(x, self.dim)
        return x[:, 0] if self.pool_mode == "cls" else jnp.mean(x, axis=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.norm(self.pool(x)))


PROBES = ("linear", "attentive", "efficient")


def create_probe(kind: str, dim: int, num_classes: int, *, rngs: nnx.Rngs, **kw: Any) -> nnx.Module:
    """``create_probe("efficient", 128, 10, rngs=nnx.Rngs(0), num_queries=32)``; unused keywords set to
    ``None`` are dropped."""
    kw = {k: v for k, v in kw.items() if v is not None}
    cls = {"linear": LinearProbe, "attentive": AttentiveProbe, "efficient": EfficientProbe}.get(kind)
    if cls is None:
        raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")
    return cls(dim, num_classes, rngs=rngs, **kw)


def probe_param_count(kind: str, dim: int, num_classes: int, *, num_queries: int | None = None,
                      d_out: int = 1, qkv_bias: bool = False) -> int:
    """Trainable parameters by formula (BatchNorms are affine=False: no parameters)."""
    c, k = dim, num_classes
    if kind == "linear":
        return c * k + k
    if kind == "attentive":
        nq = num_queries or 1
        return 2 * c * c + 2 * c * qkv_bias + nq * c + c * k + k
    if kind == "efficient":
        m, cp = num_queries or 32, dim // d_out
        return m * c + c * cp + cp * qkv_bias + cp * k + k
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")


def count_params(module: nnx.Module) -> int:
    """Number of ``nnx.Param`` entries of ``module``."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
