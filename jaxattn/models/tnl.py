"""TransNormerLLM (TNL) in Flax NNX, on ``jaxattn.lightning_attention``.

Per layer (pre-norm): ``x += Mixer(SRMSNorm(x))``, ``x += SGLU(SRMSNorm(x))``; a final
SRMSNorm and an LM head. The mixer projects to ``[q, k, v, u]``, applies SiLU to q and k,
LRPE on the configured layers (``[x cos(n theta), x sin(n theta)]``, doubling the qk head
dim), lightning attention with a per-head decay ``exp(-s_{h,l})`` where ALiBi slopes are
scheduled over layers as ``s_h (1 - l/(L-1) + 1e-5)``, then ``out_proj(SRMSNorm(o) * u)``.
Embeddings are scaled by ``sqrt(dim)`` unless ``no_scale_embedding``.

``model(tokens)`` is the parallel forward (training, prefill); ``generate`` prefills once
and then decodes with the recurrent state, O(1) per new token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxattn.models._remat import remat_blocks
from jaxattn.models.gpt import check_segment_ids, token_positions
from jaxattn.ops import _spmd
from jaxattn.ops.lightning import lightning_attention, lightning_attention_step
from jaxattn.ops.lightning_sp import lightning_attention_sp


@dataclasses.dataclass(frozen=True)
class TNLConfig:
    vocab_size: int = 64000
    dim: int = 2048
    layers: int = 16
    heads: int = 16
    hidden_dim: int | None = None  # token-mixer width; defaults to dim
    glu_dim: int = 5632
    lrpe_layers: tuple[int, ...] = (0,)
    no_scale_embedding: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters are fp32
    attn_impl: Literal["auto", "pallas", "xla"] = "auto"
    remat: bool = False  # activation checkpointing per block in training (recomputed in the backward)

    @property
    def width(self) -> int:
        return self.hidden_dim or self.dim

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"hidden_dim {self.width} must be divisible by heads {self.heads}")
        bad = [i for i in self.lrpe_layers if not 0 <= i < self.layers]
        if bad:
            raise ValueError(f"lrpe_layers {bad} out of range for {self.layers} layers")


def tnl_slopes(heads: int) -> list[float]:
    """ALiBi rates ``2^(-8(h+1)/H)``; for non-powers of two, interleaved from 2P."""
    def pow2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 1 << (heads.bit_length() - 1)
    return pow2(heads) if p == heads else pow2(p) + tnl_slopes(2 * p)[0::2][: heads - p]


def layer_slopes(heads: int, layer: int, layers: int) -> jax.Array:
    frac = layer / (layers - 1) if layers > 1 else 0.0
    return jnp.asarray(tnl_slopes(heads), jnp.float32) * (1.0 - frac + 1e-5)


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Simple RMSNorm without weight, computed in fp32."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _linear(din: int, dout: int, cfg: TNLConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, kernel_init=nnx.initializers.normal(cfg.init_std),
                      dtype=jnp.dtype(cfg.dtype), rngs=rngs)


class Lrpe(nnx.Module):
    """Linearized relative positional encoding with learnable theta ``[heads, head_dim]``."""

    def __init__(self, heads: int, head_dim: int):
        d = heads * head_dim
        self.theta = nnx.Param((10000.0 ** (-2.0 / d * jnp.arange(d))).reshape(heads, head_dim))

    def __call__(self, x: jax.Array, offset: jax.Array | int) -> jax.Array:
        """``x [B, N, H, d]`` at positions ``offset ..`` (``offset``: int, or ``[B]`` per row)."""
        pos = token_positions(x.shape[1], offset).astype(jnp.float32)  # [(B,) N]
        ang = pos[..., None, None] * self.theta[...]  # [(B,) N, H, d]
        xf = x.astype(jnp.float32)
        return jnp.concatenate([xf * jnp.cos(ang), xf * jnp.sin(ang)], axis=-1).astype(x.dtype)


class NormLinearAttention(nnx.Module):
    """The TNL token mixer."""

    def __init__(self, cfg: TNLConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.head_dim = cfg.width // cfg.heads
        self.qkvu = _linear(cfg.dim, 4 * cfg.width, cfg, rngs)
        self.out_proj = _linear(cfg.width, cfg.dim, cfg, rngs)
        self.lrpe = Lrpe(cfg.heads, self.head_dim) if layer in cfg.lrpe_layers else None
        self.slope = nnx.Variable(layer_slopes(cfg.heads, layer, cfg.layers))  # fixed, not trained
        self.sequence_parallel: tuple | None = None  # (mesh, axis, batch_axis): see TNL.enable_sequence_parallel

    def __call__(self, x, state=None, offset=0, return_state=True, segment_ids=None):
        """``(out, state after the last token)``; with ``return_state=False`` the state is None
        (training: the kernel's backward then skips the final state's terms). ``segment_ids``: packed
        documents (the state restarts at each)."""
        b, n, _ = x.shape
        q, k, v, u = jnp.split(self.qkvu(x), 4, axis=-1)
        q, k, v = (t.reshape(b, n, self.cfg.heads, self.head_dim) for t in (q, k, v))
        q, k = jax.nn.silu(q), jax.nn.silu(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        slope = jax.lax.stop_gradient(self.slope[...])
        if state is not None and n == 1:
            o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, state)
            o = o[:, None]
        elif self.sequence_parallel is not None:
            mesh, axis, batch_axis = self.sequence_parallel
            o, state = lightning_attention_sp(q, k, v, slope, mesh=mesh, axis=axis, batch_axis=batch_axis,
                                              initial_state=state, return_state=True, impl=self.cfg.attn_impl,
                                              segment_ids=segment_ids)
        elif return_state:
            o, state = lightning_attention(q, k, v, slope, initial_state=state, return_state=True,
                                           impl=self.cfg.attn_impl, segment_ids=segment_ids)
        else:
            o, state = lightning_attention(q, k, v, slope, initial_state=state, impl=self.cfg.attn_impl,
                                           segment_ids=segment_ids), None
        o = srms_norm(o.reshape(b, n, self.cfg.width)) * u
        return self.out_proj(o), state


class SGLU(nnx.Module):
    """``W3((W1 x) * (W2 x))``, no activation."""

    def __init__(self, cfg: TNLConfig, *, rngs: nnx.Rngs):
        self.l1 = _linear(cfg.dim, cfg.glu_dim, cfg, rngs)
        self.l2 = _linear(cfg.dim, cfg.glu_dim, cfg, rngs)
        self.l3 = _linear(cfg.glu_dim, cfg.dim, cfg, rngs)

    def __call__(self, x):
        return self.l3(self.l1(x) * self.l2(x))


class TNLBlock(nnx.Module):
    def __init__(self, cfg: TNLConfig, layer: int, *, rngs: nnx.Rngs):
        self.mixer = NormLinearAttention(cfg, layer, rngs=rngs)
        self.glu = SGLU(cfg, rngs=rngs)

    def __call__(self, x, state=None, offset=0, return_state=True, segment_ids=None):
        h, state = self.mixer(srms_norm(x), state, offset, return_state, segment_ids)
        x = x + h
        return x + self.glu(srms_norm(x)), state


class TNL(nnx.Module):
    """TransNormerLLM causal language model: tokens ``[batch, seq]`` -> logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: TNLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, embedding_init=nnx.initializers.normal(cfg.init_std),
                               dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.blocks = nnx.List([TNLBlock(cfg, i, rngs=rngs) for i in range(cfg.layers)])
        self.head = None if cfg.tie_embeddings else _linear(cfg.dim, cfg.vocab_size, cfg, rngs)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(cfg.dim)

    def enable_sequence_parallel(self, mesh: Mesh | None, axis: str = "seq", batch_axis: str | None = None,
                                 layout: str = "contiguous") -> None:
        """Runs every token mixer's parallel forward sequence-parallel over ``mesh`` axis ``axis``
        (:func:`jaxattn.lightning_attention_sp`; the batch over ``batch_axis``); the other layers are
        partitioned by XLA from the input sharding (e.g. tokens placed with
        ``NamedSharding(mesh, P(batch_axis, axis))``). The sequence length must be divisible by the
        axis size, also for a prefill in :func:`generate` (decoding steps are unaffected); ``mesh=None``
        turns it off. ``layout``: contiguous shards only (the zig-zag one is ring attention's, GPT's)."""
        if layout != "contiguous":
            raise ValueError(f"layout {layout!r}: --ring-layout is for ring attention (GPT); TNL's sequence-parallel "
                             "Lightning attention splits the sequence into contiguous shards")
        setting = _spmd.layer_setting(mesh, axis, batch_axis)
        for block in self.blocks:
            block.mixer.sequence_parallel = setting

    def __call__(self, tokens: jax.Array, *, states: list[jax.Array] | None = None,
                 offset: jax.Array | int = 0, return_states: bool = False, segment_ids: jax.Array | None = None):
        """Parallel forward. ``states``/``offset`` continue from an earlier prefix (one
        ``[batch, heads, qk_dim, head_dim]`` fp32 state per layer; qk_dim doubles on
        LRPE layers). With ``return_states`` also returns the states after the last token.
        ``segment_ids`` int ``[batch, seq]``: packed documents (runs of equal ids), each mixing only
        within itself, so its logits are those of the document alone (LRPE is relative); given
        ``states`` feed each row's first document, and the returned ones are its last document's (at the
        row's positions: a continuation takes ``offset`` = the row's length)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}")
        if segment_ids is not None:
            check_segment_ids(segment_ids, tokens)
        x = self.embed(tokens) * self.embed_scale
        new_states = []
        run = remat_blocks(self.cfg.remat and states is None and not return_states,  # (training)
                           lambda block, x, st: block(x, st, offset, return_states, segment_ids))
        for i, block in enumerate(self.blocks):
            x, st = run(block, x, None if states is None else states[i])
            new_states.append(st)
        x = srms_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        logits = logits.astype(jnp.float32)
        return (logits, new_states) if return_states else logits

    def prefill(self, tokens: jax.Array, max_len: int | None = None, lengths: jax.Array | None = None):
        """Parallel forward of a prompt: ``(last logits [B, vocab], states)``, for
        :func:`jaxattn.models.generate` (the recurrent state has no length limit). ``lengths`` int ``[B]``:
        ragged prompts, each row's first ``lengths[b]`` tokens (right padding): each row is rotated so its
        pads come first, as a document of their own (``segment_ids``), and its prompt sits at positions
        ``0 .. lengths[b] - 1``, so decoding continues at ``lengths[b]``."""
        if lengths is None:
            logits, states = self(tokens, return_states=True)
            return logits[:, -1], states
        p = tokens.shape[1]
        shift = p - lengths  # [B]: pads per row
        cols = (jnp.arange(p)[None] - shift[:, None]) % p  # left padding: column c holds token c - shift
        rolled = jnp.take_along_axis(tokens, cols, axis=1)
        segments = (jnp.arange(p)[None] >= shift[:, None]).astype(jnp.int32)
        logits, states = self(rolled, return_states=True, segment_ids=segments, offset=-shift)
        return logits[:, -1], states

    def decode_step(self, token: jax.Array, states: list[jax.Array], position: jax.Array):
        """One token ``[B]`` at ``position`` (or ``[B]``: per row): O(1) recurrent step, ``(logits [B, vocab],
        states)``."""
        logits, states = self(token[:, None], states=states, offset=position, return_states=True)
        return logits[:, 0], states
