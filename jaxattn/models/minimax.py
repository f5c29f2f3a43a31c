"""MiniMax-01's lightning attention layer (MiniMax-Text-01, MiniMax-M1: Lightning Attention at 456B scale), a
:class:`jaxattn.models.gpt.GPT` layer kind (``layer_types`` entry ``"lightning"``; the others are softmax
attention, MiniMax's seven lightning layers to one softmax layer).

``qkv = silu(W_qkv x)`` split per head into ``q, k, v`` (each head's columns ``[q | k | v]``), causal linear
attention with per-head decay ``exp(-s_h)`` (:func:`jaxattn.lightning_attention`: the Lightning Attention-2
kernel, no softmax, no scaling, no normaliser), then an RMSNorm over all heads' outputs (eps 1e-6, as
MiniMax's), times ``sigmoid(W_gate x)``, and ``W_out``. The decay rates follow MiniMax's schedule over the
layers: ``s_h = 2 ** (-8 (h + 1) / H) * (1 - i / (L - 1 + 1e-5) + 1e-5)`` for head ``h`` of layer ``i`` of
``L``.

Generation keeps each lightning layer's ``[B, H, d, d]`` state (fp32), not a key/value cache: the prefill
runs the kernel and returns the final state, each decoded token costs O(1)
(:func:`jaxattn.lightning_attention_step`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.deltanet import prompt_mask
from jaxattn.models.gpt import RMSNorm, _linear
from jaxattn.models.vit import _apply, _dropout
from jaxattn.ops import _spmd
from jaxattn.ops.gated_linear import gated_linear_attention
from jaxattn.ops.lightning import lightning_attention, lightning_attention_step
from jaxattn.ops.lightning_sp import lightning_attention_sp

__all__ = ["LightningLayer", "minimax_slopes", "NORM_EPS"]

NORM_EPS = 1e-6  # MiniMax's RMSNorm over the heads' outputs (its default eps, not rms_norm_eps)


def minimax_slopes(heads: int, layer: int, layers: int) -> np.ndarray:
    """MiniMax's decay rates ``[heads]`` (float32) for ``layer`` of ``layers``."""
    base = 1 / 2 ** (8 / heads)
    factor = 1 - layer / (layers - 1 + 1e-5) + 1e-5
    return (base ** (np.arange(heads) + 1) * factor).astype(np.float32)


class LightningLayer(nnx.Module):
    """MiniMax-01's lightning attention (module docstring), the interface of :class:`jaxattn.models.gpt.Attention`:
    ``(x [B, n, dim], positions) -> [B, n, dim]``; with a cache ``(state [B, H, d, d],)``, ``-> (out, cache)``.
    Parameters: ``qkv`` (``[dim, 3 H d]``), ``gate``, ``out``, ``norm``."""

    def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
        self.cfg, self.kind, self.heads, self.head_dim = cfg, "lightning", cfg.heads, cfg.head_size
        width = cfg.heads * cfg.head_size
        self.qkv = _linear(cfg.dim, 3 * width, cfg, rngs)
        self.gate = _linear(cfg.dim, width, cfg, rngs)
        self.out = _linear(width, cfg.dim, cfg, rngs, std=cfg.init_std / (2 * cfg.layers) ** 0.5)
        self.norm = RMSNorm(width, NORM_EPS)
        self.slope = nnx.Variable(jnp.asarray(minimax_slopes(cfg.heads, layer, cfg.layers)))  # fixed, not trained
        self.resid_drop = _dropout(cfg.dropout, rngs)
        self.sequence_parallel: tuple | None = None  # (mesh, axis, batch_axis, layout): GPT.enable_sequence_parallel
        self.sinks = None

    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple | None = None,
                 offset: jax.Array | int = 0, segment_ids: jax.Array | None = None, lengths: jax.Array | None = None):
        """``lengths [B]``: a ragged prefill; the state stops at each row's length (the pads run as gated linear
        attention steps with no decay and no key: Lightning's decay is that op's constant one)."""
        del positions  # (no positional encoding: the decay orders the tokens)
        b, n, _ = x.shape
        qkv = jax.nn.silu(self.qkv(x)).reshape(b, n, self.heads, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        slope = jax.lax.stop_gradient(self.slope[...])
        if cache is not None and not (isinstance(offset, int) and offset == 0):  # decoding: the recurrent state
            if n == 1:
                o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, cache[0])
                o = o[:, None]
            else:  # several tokens past the cache (a prompt continued in pieces): chunked, from the state
                o, state = lightning_attention(q, k, v, slope, initial_state=cache[0], return_state=True,
                                               impl=self.cfg.attn_impl)
            new_cache = (state,)
        else:
            seg = {} if segment_ids is None else {"segment_ids": segment_ids}
            if _spmd.use_shards(self.sequence_parallel, x.shape, cache is None):  # (GPT.enable_sequence_parallel)
                mesh, axis, batch_axis = self.sequence_parallel[:3]
                op = functools.partial(lightning_attention_sp, mesh=mesh, axis=axis, batch_axis=batch_axis)
            else:
                op = lightning_attention
            if cache is None:
                o = op(q, k, v, slope, impl=self.cfg.attn_impl, **seg)
            elif lengths is not None:  # a ragged prefill: the pads neither decay nor write
                valid = prompt_mask(lengths, n)
                g = jnp.where(valid, -slope.astype(jnp.float32), 0.0)
                o, state = gated_linear_attention(q, jnp.where(valid[..., None], k, 0), v, g, scale=1.0,
                                                  return_state=True, impl=self.cfg.attn_impl)
                new_cache = (state,)
            else:  # the prefill: the prompt's output and its final state
                o, state = op(q, k, v, slope, impl=self.cfg.attn_impl, return_state=True)
                new_cache = (state,)
        o = self.norm(o.reshape(b, n, -1))
        o = self.out(jax.nn.sigmoid(self.gate(x).astype(jnp.float32)).astype(o.dtype) * o)
        o = _apply(self.resid_drop, o)
        return o if cache is None else (o, new_cache)

    def sink_logits(self) -> None:
        return None

    def alibi_slopes(self) -> None:
        return None
