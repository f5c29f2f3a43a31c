"""A Gated DeltaNet layer (Yang, Kautz and Hatamizadeh 2024; the linear-attention layers of Qwen3-Next), a
:class:`jaxattn.models.gpt.GPT` layer kind (``layer_types`` entry ``"delta"``), on :func:`jaxattn.gated_delta_rule`.

``q, k, v = W_q x, W_k x, W_v x`` through a short causal depthwise convolution (``delta_conv`` taps) and SiLU,
``q`` and ``k`` L2-normalized per head; the write strength ``beta = sigmoid(W_b x)`` and the log decay
``g = -exp(A_log) softplus(W_a x + dt_bias)`` per head (Mamba-2's parametrization, as Qwen3-Next's); the gated
delta rule (scale ``d ** -0.5``); then a gated RMSNorm per head, ``RMSNorm(o) * silu(W_z x)``, and ``W_out``.

Packed documents (``segment_ids``): the convolution and the state stop at each document start. Head counts
and widths are the config's ``delta_dims``: ``H`` value heads of width ``d_v``, ``H_k`` query / key
heads of width ``d_k``, each shared by ``H / H_k`` consecutive value heads (Qwen3-Next: 32 value heads, 16 key
heads, 128 wide). Generation keeps, per layer, the ``[B, H, d_k, d_v]`` state (fp32) and the convolution's last
``delta_conv - 1`` inputs; each new token costs O(1) (:func:`jaxattn.gated_delta_rule_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.gpt import _linear, rms_norm
from jaxattn.models.vit import _apply, _dropout
from jaxattn.ops import _spmd
from jaxattn.ops.gated_delta import gated_delta_rule, gated_delta_rule_step
from jaxattn.ops.gated_delta_sp import gated_delta_rule_sp
from jaxattn.pallas._common import document_index

__all__ = ["GatedDeltaNetLayer", "KimiDeltaLayer", "RecurrentLayer", "causal_conv", "prompt_mask"]


def causal_conv(x: jax.Array, w: jax.Array, history: jax.Array | None = None,
                segment_ids: jax.Array | None = None) -> jax.Array:
    """Depthwise causal convolution of ``x [B, n, C]`` with taps ``w [K, C]`` (tap ``K - 1`` on the current
    token): ``y_t = sum_j w[j] x_{t - K + 1 + j}``, the ``K - 1`` inputs before ``x`` from ``history [B, K - 1,
    C]`` (zeros if None); ``segment_ids [B, n]`` (packed documents, runs of equal ids): only inputs of the token's
    own document."""
    k = w.shape[0]
    if history is None:
        history = jnp.zeros((x.shape[0], k - 1, x.shape[2]), x.dtype)
    full = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    n = x.shape[1]
    if segment_ids is None:
        return sum(full[:, j:j + n] * w[j].astype(x.dtype) for j in range(k))
    doc = document_index(segment_ids)  # (an id may come back in a later document)
    seg = jnp.pad(doc, ((0, 0), (k - 1, 0)), constant_values=-1)  # (no history across documents)
    return sum(jnp.where((seg[:, j:j + n] == doc)[..., None], full[:, j:j + n], 0) * w[j].astype(x.dtype)
               for j in range(k))


def prompt_mask(lengths: jax.Array | None, n: int) -> jax.Array | None:
    """``[B, n, 1]`` bool of a ragged prefill: the tokens before each row's length ``lengths [B]`` (None without)."""
    return None if lengths is None else (jnp.arange(n)[None] < lengths[:, None])[..., None]


def _unit(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RecurrentLayer(nnx.Module):
    """What GPT's convolution-and-state layers share (Gated DeltaNet, Kimi Delta, Mamba-2): the output projection
    and its dropout, the sequence-parallel setting, no sinks or ALiBi, the convolution's taps and its cache."""

    def _output(self, cfg, width: int, rngs: nnx.Rngs) -> None:
        self.out = _linear(width, cfg.dim, cfg, rngs, std=cfg.init_std / (2 * cfg.layers) ** 0.5)
        self.resid_drop = _dropout(cfg.dropout, rngs)
        self.sequence_parallel: tuple | None = None  # (mesh, axis, batch_axis, layout): GPT.enable_sequence_parallel
        self.sinks = None

    @staticmethod
    def _taps(cfg, shape: tuple[int, ...], rngs: nnx.Rngs) -> jax.Array:
        """Depthwise convolution weights (``[delta_conv, width]`` taps, or a ``[width]`` bias), PyTorch's Conv1d
        initialisation (``U(±1 / sqrt(K))``)."""
        bound = 1.0 / cfg.delta_conv ** 0.5
        return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)

    @staticmethod
    def _history(cache: tuple | None, offset) -> tuple[bool, jax.Array | None]:
        """``(decoding, the convolution's cached inputs or None)``: a cache at a nonzero offset continues it."""
        decoding = cache is not None and not (isinstance(offset, int) and offset == 0)
        return decoding, cache[1] if decoding else None

    def _next_cache(self, state: jax.Array, history: jax.Array | None, mixed: jax.Array, cache: tuple,
                    lengths: jax.Array | None = None) -> tuple:
        """The cache after ``mixed [B, n, C]``: ``(state, the convolution's last delta_conv - 1 inputs)`` (with
        ``lengths [B]``, a ragged prefill: those before row ``b``'s position ``lengths[b]``)."""
        k, b = self.cfg.delta_conv, mixed.shape[0]
        past = jnp.concatenate([history if history is not None else jnp.zeros((b, k - 1, mixed.shape[-1]), mixed.dtype),
                                mixed], axis=1)
        if lengths is None:
            return state, past[:, past.shape[1] - (k - 1):].astype(cache[1].dtype)
        rows = lengths[:, None] + jnp.arange(k - 1)[None]  # (past's row j + k - 1 is token j)
        return state, jnp.take_along_axis(past, rows[..., None], axis=1).astype(cache[1].dtype)

    def sink_logits(self) -> None:
        return None

    def alibi_slopes(self) -> None:
        return None


class GatedDeltaNetLayer(RecurrentLayer):
    """Gated DeltaNet (module docstring), the interface of :class:`jaxattn.models.gpt.Attention`: ``(x [B, n,
    dim], positions) -> [B, n, dim]``; with a cache ``(state [B, H, d_k, d_v], conv history [B, K - 1, 2 H_k d_k
    + H d_v])``, ``-> (out, cache)``. Parameters: ``q``, ``k`` (``H_k d_k`` wide), ``v``, ``z`` (``H d_v``),
    ``conv`` (``[K, 2 H_k d_k + H d_v]``, channels q | k | v), ``b``, ``a``, ``A_log``, ``dt_bias`` (``H``),
    ``norm`` (``[d_v]``), ``out``."""

    def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
        del layer
        self.cfg, self.kind = cfg, "delta"
        self.heads, self.key_heads, self.head_dim, self.value_dim = cfg.delta_dims
        kw, vw = self.key_heads * self.head_dim, self.heads * self.value_dim
        self.q, self.k = _linear(cfg.dim, kw, cfg, rngs), _linear(cfg.dim, kw, cfg, rngs)
        self.v = _linear(cfg.dim, vw, cfg, rngs)
        self.conv = nnx.Param(self._taps(cfg, (cfg.delta_conv, 2 * kw + vw), rngs))
        self.b, self.a = _linear(cfg.dim, self.heads, cfg, rngs), _linear(cfg.dim, self.heads, cfg, rngs)
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, self.heads, dtype=jnp.float32)))
        self.dt_bias = nnx.Param(jnp.zeros((self.heads,), jnp.float32))
        self.z = _linear(cfg.dim, vw, cfg, rngs)
        self.norm = nnx.Param(jnp.ones((self.value_dim,), jnp.float32))
        self._output(cfg, vw, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple | None = None,
                 offset: jax.Array | int = 0, segment_ids: jax.Array | None = None, lengths: jax.Array | None = None):
        """``lengths [B]``: a ragged prefill, the state and convolution history stopping at each row's length (the
        pads write nothing and decay nothing: ``beta = g = 0``)."""
        del positions  # (no positional encoding: the convolution and the decay order the tokens)
        b, n, _ = x.shape
        h, hk, dk, dv = self.heads, self.key_heads, self.head_dim, self.value_dim
        mixed = jnp.concatenate([self.q(x), self.k(x), self.v(x)], axis=-1)
        decoding, history = self._history(cache, offset)
        conv = jax.nn.silu(causal_conv(mixed, self.conv[...], history, segment_ids))
        q, k, v = jnp.split(conv, [hk * dk, 2 * hk * dk], axis=-1)
        q, k, v = _unit(q.reshape(b, n, hk, dk)), _unit(k.reshape(b, n, hk, dk)), v.reshape(b, n, h, dv)
        beta = jax.nn.sigmoid(self.b(x).astype(jnp.float32))
        g = self._log_decay(x)
        if (valid := prompt_mask(lengths, n)) is not None:
            beta, g = jnp.where(valid, beta, 0.0), jnp.where(valid if g.ndim == 3 else valid[..., None], g, 0.0)
        if decoding and n == 1:  # a step from the layer's state
            o, state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache[0])
            o = o[:, None]
        elif decoding:  # several tokens past the cache (a prompt continued in pieces): chunked, from the state
            o, state = gated_delta_rule(q, k, v, g, beta, initial_state=cache[0], return_state=True,
                                        impl=self.cfg.attn_impl)
        elif _spmd.use_shards(self.sequence_parallel, x.shape, cache is None):  # (GPT.enable_sequence_parallel)
            mesh, axis, batch_axis = self.sequence_parallel[:3]
            o, state = gated_delta_rule_sp(q, k, v, g, beta, mesh=mesh, axis=axis, batch_axis=batch_axis,
                                           return_state=True, segment_ids=segment_ids, impl=self.cfg.attn_impl)
        else:
            o, state = gated_delta_rule(q, k, v, g, beta, return_state=True, segment_ids=segment_ids,
                                        impl=self.cfg.attn_impl)
        o = rms_norm(o, self.norm[...], self.cfg.norm_eps) * self._output_gate(x).reshape(b, n, h, dv).astype(o.dtype)
        out = _apply(self.resid_drop, self.out(o.reshape(b, n, h * dv)))
        return out if cache is None else (out, self._next_cache(state, history, mixed, cache, lengths))

    def _log_decay(self, x: jax.Array) -> jax.Array:
        """``g [B, n, H]``: Mamba-2's ``-exp(A_log) softplus(W_a x + dt_bias)``."""
        return -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.a(x).astype(jnp.float32) + self.dt_bias[...])

    def _output_gate(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.z(x).astype(jnp.float32))


class KimiDeltaLayer(GatedDeltaNetLayer):
    """Kimi Delta Attention (Kimi Linear; ``layer_types`` entry ``"kda"``): :class:`GatedDeltaNetLayer` with a log
    decay per head and key channel, ``g = -exp(A_log[h]) softplus(W_fb W_fa x + dt_bias) [B, n, H, d_k]`` (a
    low-rank projection of rank ``d_k``; ``S_t = (I - beta k kᵀ) diag(exp(g_t)) S_{t-1} + beta k vᵀ``), and the
    output gate ``sigmoid(W_gb W_ga x)`` (rank ``d_v``) on the RMSNorm. Parameters beside q, k, v, conv, b,
    A_log (``[H]``), norm, out: ``f_a``, ``f_b``, ``dt_bias`` (``[H d_k]``), ``g_a``, ``g_b``. The per-channel
    decay runs on the gated delta rule's XLA chunked path (:func:`jaxattn.gated_delta_rule`)."""

    def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, layer, rngs=rngs)
        self.kind = "kda"
        h, dk, dv = self.heads, self.head_dim, self.value_dim
        del self.a, self.z
        self.f_a, self.f_b = _linear(cfg.dim, dk, cfg, rngs), _linear(dk, h * dk, cfg, rngs)
        self.dt_bias = nnx.Param(jnp.zeros((h * dk,), jnp.float32))
        self.g_a, self.g_b = _linear(cfg.dim, dv, cfg, rngs), _linear(dv, h * dv, cfg, rngs)

    def _log_decay(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        f = self.f_b(self.f_a(x)).astype(jnp.float32) + self.dt_bias[...]
        return -jnp.exp(self.A_log[...])[:, None] * jax.nn.softplus(f.reshape(b, n, self.heads, self.head_dim))

    def _output_gate(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.g_b(self.g_a(x)).astype(jnp.float32))
