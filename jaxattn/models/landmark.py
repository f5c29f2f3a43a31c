"""A byte-level GPT decoder with landmark tokens (Mohtashami & Jaggi 2023), in Flax NNX.

Reuses ``jaxattn.models.gpt`` (RMSNorm, RoPE, SwiGLU, Block, projections); only the attention
core changes: every layer runs ``jaxattn.landmark_attention`` over a token stream in which a
landmark token (id ``landmark_id``, a reserved vocabulary entry) follows every ``mem_freq``
regular tokens (``insert_landmarks``). At inference, ``model(tokens, top_k=k)`` switches every
layer to top-k block retrieval (``jaxattn.landmark_retrieval_attention``), with retrieved blocks
re-placed right before the current block for RoPE (``memory_positions="contiguous"``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models import gpt
from jaxattn.models._remat import remat_blocks
from jaxattn.ops.landmark import landmark_attention, landmark_retrieval_attention


@dataclasses.dataclass(frozen=True)
class LandmarkGPTConfig(gpt.GPTConfig):
    """``GPTConfig`` plus the landmark layout; ``layer_types`` is ignored (all layers landmark)."""

    vocab_size: int = 257  # 256 bytes + the landmark token
    mem_freq: int = 31  # regular tokens per block (block_len = mem_freq + 1)
    landmark_id: int = 256
    top_k: int = 4  # retrieved blocks per query and head at inference
    eval_chunk: int = 256  # queries per retrieval chunk (bounds the gathered-block memory)
    memory_positions: str = "contiguous"

    def __post_init__(self):
        if self.dropout:
            raise ValueError("landmark attention has no dropout: use dropout=0")
        super().__post_init__()
        changed = gpt.non_default(self, gpt.FAMILY_FIELDS)
        if self.head_dim not in (None, self.dim // self.heads) or changed:
            raise ValueError(f"landmark models have dim // heads wide heads and LLaMA blocks: leave "
                             f"{changed or ['head_dim']} unset")
        if self.mem_freq < 1:
            raise ValueError(f"mem_freq must be >= 1, got {self.mem_freq}")
        if not 0 <= self.landmark_id < self.vocab_size:
            raise ValueError(f"landmark_id {self.landmark_id} must be a vocab id < vocab_size {self.vocab_size}")

    @property
    def block_len(self) -> int:
        return self.mem_freq + 1


def insert_landmarks(tokens: np.ndarray | jax.Array, mem_freq: int, landmark_id: int) -> jax.Array:
    """``[B, N]`` regular tokens -> ``[B, N + N // mem_freq]`` with a landmark after every
    ``mem_freq`` tokens (none after a trailing partial block)."""
    tokens = jnp.asarray(tokens)
    b, n = tokens.shape
    nb = n // mem_freq
    full = tokens[:, : nb * mem_freq].reshape(b, nb, mem_freq)
    lm = jnp.full((b, nb, 1), landmark_id, tokens.dtype)
    out = jnp.concatenate([full, lm], axis=2).reshape(b, nb * (mem_freq + 1))
    return jnp.concatenate([out, tokens[:, nb * mem_freq:]], axis=1)


def regular_index(n: int, mem_freq: int) -> np.ndarray:
    """Positions of the ``n`` regular tokens in the landmark-inserted stream."""
    i = np.arange(n)
    return i + i // mem_freq


class LandmarkAttention(gpt.Attention):
    """``gpt.Attention``'s projections and RoPE with the landmark attention core."""

    def __call__(self, x: jax.Array, positions: jax.Array, top_k: int | None = None) -> jax.Array:
        cfg = self.cfg
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, cfg.heads, self.head_dim)
        k, v = jnp.split(self.kv(x).reshape(b, n, self.kv_heads, 2 * self.head_dim), 2, axis=-1)
        if top_k is None:
            q, k = gpt.rope(q, positions, cfg.rope_theta), gpt.rope(k, positions, cfg.rope_theta)
            o = landmark_attention(q, k, v, block_len=cfg.block_len, impl=cfg.attn_impl)
        else:  # RoPE applied inside, per retrieved block
            outs = []
            for start in range(0, n, cfg.eval_chunk):
                qc = q[:, start: start + cfg.eval_chunk]
                kc, vc = k[:, : start + qc.shape[1]], v[:, : start + qc.shape[1]]
                outs.append(landmark_retrieval_attention(
                    qc, kc, vc, block_len=cfg.block_len, top_k=top_k, q_offset=start,
                    rope_theta=cfg.rope_theta, memory_positions=cfg.memory_positions).astype(x.dtype))
            o = jnp.concatenate(outs, axis=1)
        return self.o(o.reshape(b, n, cfg.dim))


class LandmarkBlock(gpt.Block):
    def __init__(self, cfg: LandmarkGPTConfig, layer: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = gpt.RMSNorm(cfg.dim, cfg.norm_eps), gpt.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = LandmarkAttention(cfg, layer, rngs=rngs)
        self.mlp = gpt.SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, positions, top_k=None):
        x = x + self.attn(self.norm1(x), positions, top_k)
        return x + self.mlp(self.norm2(x))


class LandmarkGPT(gpt.GPT):
    """``model(tokens [B, N], top_k=None) -> logits [B, N, vocab]``; ``tokens`` already hold the
    landmark tokens (``insert_landmarks``). ``top_k`` switches to retrieval inference."""

    # No KV-cache decoding (GPT's prefill/decode_step): sample by re-running the model.
    prefill = None
    decode_step = None

    def __init__(self, cfg: LandmarkGPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, embedding_init=nnx.initializers.normal(cfg.init_std),
                               rngs=rngs)
        self.blocks = nnx.List([LandmarkBlock(cfg, i, rngs=rngs) for i in range(cfg.layers)])
        self.norm = gpt.RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else gpt._linear(cfg.dim, cfg.vocab_size, cfg, rngs)

    def __call__(self, tokens: jax.Array, top_k: int | None = None) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, seq], got {tuple(tokens.shape)}")
        x = self.embed(tokens).astype(jnp.dtype(self.cfg.dtype))
        positions = jnp.arange(tokens.shape[1])
        run = remat_blocks(self.cfg.remat and top_k is None, lambda blk, x: blk(x, positions, top_k))
        for blk in self.blocks:
            x = run(blk, x)
        x = self.norm(x)
        if self.head is None:
            return jnp.einsum("bnd,vd->bnv", x.astype(jnp.float32), self.embed.embedding[...])
        return self.head(x).astype(jnp.float32)
