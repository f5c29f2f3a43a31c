"""Multi-head latent attention (MLA: DeepSeek-V2 / V3, Kimi K2), a :class:`jaxattn.models.gpt.GPT` layer
(``GPTConfig.kv_lora_rank > 0``).

Each token's keys and values come from one latent ``c = RMSNorm(W_dkv x)`` of ``kv_lora_rank`` numbers
(512 in DeepSeek-V2/V3) through ``W_ukv``: per head a no-RoPE key part ``k_nope`` (``head_dim``) and a
value (``v_head_dim``); RoPE lives in a separate ``qk_rope_dim``-wide key ``k_pe = RoPE(W_kr x)`` that
every head shares. Queries: ``W_uq RMSNorm(W_dq x)`` with a ``q_lora_rank`` bottleneck (or one projection),
split into ``q_nope`` and a RoPE part. Scores ``q_nope . k_nope + q_pe . k_pe`` times ``attn_scale``.

Training and prefill expand the latent and run :func:`jaxattn.attention` (the flash kernel with query/key
width ``head_dim + qk_rope_dim`` and value width ``v_head_dim``). The generation cache keeps only
``[c, k_pe]``, ``kv_lora_rank + qk_rope_dim`` numbers per token and layer (576 for DeepSeek-V3: 1/57 of
its 128 heads' expanded keys and values), and decoding absorbs ``W_ukv`` into the query and the output
(``q_nope . (W_uk c) = (W_ukᵀ q_nope) . c``, ``sum p (W_uv c) = W_uv (sum p c)``): one key/value head of
width ``kv_lora_rank + qk_rope_dim`` / ``kv_lora_rank`` that all query heads attend to, through
:func:`jaxattn.latent_decode_attention` (the decode kernel's latent mode: each cache block read once).

Parameters (Hugging Face names in brackets): ``q`` [q_proj] or ``q_a`` [q_a_proj], ``q_norm``
[q_a_layernorm], ``q_b`` [q_b_proj]; ``kv_a`` [kv_a_proj_with_mqa] to ``[c | k_pe]``, ``kv_norm``
[kv_a_layernorm], ``kv_b`` [kv_b_proj] to per-head ``[k_nope | v]``; ``o`` [o_proj]. Each RoPE part rotates
halves (the checkpoints' interleaved pairs are reordered when they load).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.gpt import RMSNorm, _linear, rope
from jaxattn.models.vit import AttentionDropout, _apply, _dropout
from jaxattn.ops import _spmd
from jaxattn.ops.attention import attention
from jaxattn.ops.latent_decode import latent_decode_attention
from jaxattn.pallas.decode import latent_kernel_ok

__all__ = ["MLAttention"]


class MLAttention(nnx.Module):
    """Multi-head latent attention (module docstring), the interface of :class:`jaxattn.models.gpt.Attention`:
    ``(x [B, n, dim], positions) -> [B, n, dim]``; with a cache ``(latent [B, S, 1, kv_lora_rank +
    qk_rope_dim],)``, ``-> (out, cache)``."""

    def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
        self.cfg, self.kind, self.rope = cfg, cfg.layer_type(layer), cfg.layer_has_rope(layer)
        h, self.nope, self.rope_dim = cfg.heads, cfg.head_size, cfg.qk_rope_dim
        self.v_dim, self.rank = cfg.v_size, cfg.kv_lora_rank
        qk = self.nope + self.rope_dim
        if cfg.q_lora_rank:
            self.q = None
            self.q_a = _linear(cfg.dim, cfg.q_lora_rank, cfg, rngs)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b = _linear(cfg.q_lora_rank, h * qk, cfg, rngs)
        else:
            self.q, self.q_a, self.q_norm, self.q_b = _linear(cfg.dim, h * qk, cfg, rngs), None, None, None
        self.kv_a = _linear(cfg.dim, self.rank + self.rope_dim, cfg, rngs)
        self.kv_norm = RMSNorm(self.rank, cfg.norm_eps)
        self.kv_b = _linear(self.rank, h * (self.nope + self.v_dim), cfg, rngs)
        self.o = _linear(h * self.v_dim, cfg.dim, cfg, rngs, std=cfg.init_std / (2 * cfg.layers) ** 0.5)
        self.attn_drop = AttentionDropout(cfg.dropout, rngs=rngs)
        self.resid_drop = _dropout(cfg.dropout, rngs)
        self.sequence_parallel: tuple | None = None  # (mesh, axis, batch_axis, layout): GPT.enable_sequence_parallel
        self.sinks = None

    @property
    def scale(self) -> float:
        return self.cfg.attn_scale or (self.nope + self.rope_dim) ** -0.5

    def _rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return rope(x, positions, self.cfg.rope_theta, self.cfg.rope_scaling) if self.rope else x

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(q_nope [B, n, H, head_dim], q_pe [B, n, H, qk_rope_dim])``, the RoPE part rotated."""
        b, n, _ = x.shape
        q = self.q(x) if self.q is not None else self.q_b(self.q_norm(self.q_a(x)))
        q_nope, q_pe = jnp.split(q.reshape(b, n, self.cfg.heads, -1), [self.nope], axis=-1)
        return q_nope, self._rotate(q_pe, positions)

    def latent(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The cached ``[c | k_pe] [B, n, 1, kv_lora_rank + qk_rope_dim]``: the normed latent and the rotated
        shared RoPE key."""
        c, k_pe = jnp.split(self.kv_a(x), [self.rank], axis=-1)
        return jnp.concatenate([self.kv_norm(c), self._rotate(k_pe[:, :, None], positions)[:, :, 0]],
                               axis=-1)[:, :, None]

    def _up(self) -> tuple[jax.Array, jax.Array]:
        """``W_uk [kv_lora_rank, H, head_dim]`` and ``W_uv [kv_lora_rank, H, v_head_dim]`` of ``kv_b``."""
        w = self.kv_b.kernel[...].reshape(self.rank, self.cfg.heads, self.nope + self.v_dim)
        return w[..., :self.nope], w[..., self.nope:]

    def __call__(self, x: jax.Array, positions: jax.Array, cache: tuple | None = None,
                 offset: jax.Array | int = 0, segment_ids: jax.Array | None = None):
        b, n, _ = x.shape
        q_nope, q_pe = self._queries(x, positions)
        lat = self.latent(x, positions)
        if cache is None or (isinstance(offset, int) and offset == 0):  # training, prefill: the expanded heads
            out = self._attend(q_nope, q_pe, lat, segment_ids, forward=cache is None)
            return out if cache is None else (out, (_write(cache[0], lat, 0),))
        latent_cache = _write(cache[0], lat, offset)
        lengths = jnp.broadcast_to(jnp.asarray(offset, jnp.int32) + n, (b,))
        w_uk, w_uv = self._up()
        dt = q_nope.dtype
        q_lat = jnp.einsum("bnhd,chd->bnhc", q_nope, w_uk.astype(dt), preferred_element_type=jnp.float32)
        q = jnp.concatenate([q_lat.astype(dt), q_pe], axis=-1)
        cache = latent_cache.astype(dt)
        impl = self.cfg.attn_impl
        if impl == "pallas" and not latent_kernel_ok(cache.shape[-1], self.rank):  # (widths the kernel cannot tile)
            impl = "xla"
        o_lat = latent_decode_attention(q, cache, lengths, value_dim=self.rank, causal=True, scale=self.scale, impl=impl)
        o = jnp.einsum("bnhc,chv->bnhv", o_lat, w_uv.astype(dt), preferred_element_type=jnp.float32).astype(dt)
        return self.o(o.reshape(b, n, -1)), (latent_cache,)

    def _attend(self, q_nope, q_pe, lat, segment_ids, forward: bool = False):
        """Causal attention of the expanded heads (``forward``: the model's forward without a cache, its tokens
        in zig-zag order with that layout; sequence parallel when the model is, a prefill when its shape splits)."""
        b, n, h = q_nope.shape[:3]
        c, k_pe = lat[:, :, 0, :self.rank], lat[:, :, :, self.rank:]
        k_nope, v = jnp.split(self.kv_b(c).reshape(b, n, h, -1), [self.nope], axis=-1)
        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (b, n, h, self.rope_dim)).astype(k_nope.dtype)], axis=-1)
        seg = {} if segment_ids is None else {"segment_ids": segment_ids}
        if _spmd.use_shards(self.sequence_parallel, q.shape, forward):  # (enable_sequence_parallel: a ring)
            from jaxattn.ops.ring_attention import ring_attention_sp

            mesh, axis, batch_axis, layout = self.sequence_parallel
            o = ring_attention_sp(q, k, v, mesh=mesh, axis=axis, batch_axis=batch_axis, causal=True, scale=self.scale,
                                  impl=self.cfg.attn_impl, layout=layout, zigzagged=forward and layout == "zigzag",
                                  **self.attn_drop(), **seg)
        else:
            o = attention(q, k, v, causal=True, scale=self.scale, impl=self.cfg.attn_impl, **self.attn_drop(), **seg)
        return _apply(self.resid_drop, self.o(o.reshape(b, n, -1)))

    def sink_logits(self) -> None:
        return None

    def alibi_slopes(self) -> None:
        return None


def _write(cache: jax.Array, new: jax.Array, offset: jax.Array | int) -> jax.Array:
    """``new [B, n, 1, w]`` written into ``cache [B, S, 1, w]`` at row ``offset`` (or per row ``[B]``)."""
    start = jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (cache.shape[0],))
    return jax.vmap(lambda c, x, s: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (s, 0, 0)))(cache, new, start)
