"""Text classifiers with an additive attention-pooling head (Kitada & Iyatomi's AT / VAT setting).

Both models map ``tokens int [B, T]`` (left-aligned, ``0`` = pad) and ``lengths int [B]`` to class
logits through

    embed -> encoder -> hidden h [B, T, D] -> scores s_t = w^T tanh(W h_t + b)  (additive attention,
    as ``TanhBCAttention`` of shunk031/attention-meets-perturbation: D -> D/2 -> 1, no output bias)
    -> (+ score_perturbation) -> softmax over the first ``lengths[b]`` tokens -> a
    -> sum_t a_t h_t -> Linear -> logits

* :class:`BiLSTMClassifier`: a one-layer bidirectional LSTM (``lax.scan``; the backward direction
  runs over each sequence's own valid tokens reversed; hidden states at pads are 0).
* :class:`TextTransformer`: pre-LN transformer blocks on :func:`jaxattn.attention` with a key
  padding mask, learned positional embeddings, the same attention-pooling head.

``score_perturbation [B, T]`` is added to the pooling scores before the softmax (adversarial
training of attention); it is never applied unless passed. :meth:`TextClassifier.embed` and
:meth:`TextClassifier.from_embeddings` split the forward at the word embeddings so gradient-based
word importance can be computed (``stop_attention_grad`` holds the attention weights fixed, as in
Jain & Wallace 2019, whom the AT papers follow).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.ops.attention import attention

__all__ = ["AdditivePool", "BiLSTMClassifier", "LSTM", "TextClassifier", "TextTransformer",
           "check_tokens", "length_mask", "masked_softmax"]


def check_tokens(tokens: jax.Array, lengths: jax.Array) -> None:
    """Clear errors for ``tokens int [B, T]`` / ``lengths int [B]``."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    if lengths.shape != tokens.shape[:1] or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array [batch] = [{tokens.shape[0]}], "
                         f"got {lengths.dtype}{list(lengths.shape)}")


def length_mask(lengths: jax.Array, t: int) -> jax.Array:
    """``bool [B, T]``: True at the first ``lengths[b]`` positions."""
    return jnp.arange(t)[None, :] < lengths[:, None]


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the True entries of ``mask`` (0 elsewhere; an all-False row gives zeros)."""
    s = jnp.where(mask, scores.astype(jnp.float32), -1e30)
    a = jax.nn.softmax(s, axis=-1)
    return jnp.where(mask, a, 0.0)


class AdditivePool(nnx.Module):
    """Additive (tanh) attention scores over tokens: ``s_t = w^T tanh(W h_t + b)``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim, hidden, rngs=rngs)
        self.score = nnx.Linear(hidden, 1, use_bias=False, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.score(jnp.tanh(self.proj(h)))[..., 0].astype(jnp.float32)


class LSTM(nnx.Module):
    """One LSTM direction: ``x [B, T, I] -> h [B, T, H]``, carrying the state unchanged (and
    emitting 0) at positions ``>= lengths``. Gates ``i, f, g, o``; forget bias initialised to 1."""

    def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.inp = nnx.Linear(in_dim, 4 * hidden, rngs=rngs)
        self.inp.bias[...] = self.inp.bias[...].at[hidden:2 * hidden].set(1.0)
        self.rec = nnx.Linear(hidden, 4 * hidden, use_bias=False,
                              kernel_init=nnx.initializers.orthogonal(), rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        xp = self.inp(x)  # [B, T, 4H]
        w = self.rec.kernel[...]
        valid = length_mask(lengths, t)
        hd = self.hidden

        def step(carry, inp):
            h, c = carry
            z, m = inp
            z = z + h @ w
            i, f, g, o = (z[:, k * hd:(k + 1) * hd] for k in range(4))
            c2 = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h2 = jax.nn.sigmoid(o) * jnp.tanh(c2)
            m = m[:, None]
            h, c = jnp.where(m, h2, h), jnp.where(m, c2, c)
            return (h, c), jnp.where(m, h2, 0.0)

        zeros = jnp.zeros((b, hd), xp.dtype)
        _, hs = jax.lax.scan(step, (zeros, zeros), (xp.swapaxes(0, 1), valid.T))
        return hs.swapaxes(0, 1)


def _reverse_valid(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses the first ``lengths[b]`` steps of each row (an involution; pads stay in place)."""
    t = x.shape[1]
    pos = jnp.arange(t)[None, :]
    idx = jnp.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)
    return jnp.take_along_axis(x, idx[..., None], axis=1)


class TextClassifier(nnx.Module):
    """Shared forward of the attention-pooled text classifiers; subclasses define ``self.embedding``,
    ``self.pool`` (:class:`AdditivePool`), ``self.classifier`` and :meth:`encode`."""

    embedding: nnx.Embed
    pool: AdditivePool
    classifier: nnx.Linear

    def encode(self, emb: jax.Array, lengths: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Word embeddings ``[B, T, E]``."""
        return self.embedding(tokens)

    def features(self, emb: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(hidden [B, T, D], scores [B, T])`` from embeddings (scores before masking)."""
        h = self.encode(emb, lengths)
        return h, self.pool(h)

    def head(self, hidden: jax.Array, scores: jax.Array, lengths: jax.Array, *,
             score_perturbation: jax.Array | None = None,
             stop_attention_grad: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(logits fp32 [B, C], attention [B, T])`` from hidden states and (perturbed) scores."""
        if score_perturbation is not None:
            if score_perturbation.shape != scores.shape:
                raise ValueError(f"score_perturbation must have shape [batch, seq] = {list(scores.shape)}, "
                                 f"got {list(score_perturbation.shape)}")
            scores = scores + score_perturbation
        a = masked_softmax(scores, length_mask(lengths, scores.shape[1]))
        aw = jax.lax.stop_gradient(a) if stop_attention_grad else a
        ctx = jnp.einsum("bt,btd->bd", aw.astype(hidden.dtype), hidden)
        return self.classifier(ctx).astype(jnp.float32), a

    def from_embeddings(self, emb: jax.Array, lengths: jax.Array, *, score_perturbation: jax.Array | None = None,
                        return_attention: bool = False, stop_attention_grad: bool = False):
        """The forward from word embeddings ``[B, T, E]``; see :meth:`__call__`."""
        h, s = self.features(emb, lengths)
        logits, a = self.head(h, s, lengths, score_perturbation=score_perturbation,
                              stop_attention_grad=stop_attention_grad)
        return (logits, a) if return_attention else logits

    def __call__(self, tokens: jax.Array, lengths: jax.Array, *, score_perturbation: jax.Array | None = None,
                 return_attention: bool = False):
        """``logits [B, C]`` (and the pooling attention ``[B, T]`` with ``return_attention``);
        ``score_perturbation [B, T]`` is added to the pooling scores before the softmax."""
        check_tokens(tokens, lengths)
        return self.from_embeddings(self.embed(tokens), lengths, score_perturbation=score_perturbation,
                                    return_attention=return_attention)


class BiLSTMClassifier(TextClassifier):
    """Embedding -> BiLSTM (``hidden`` per direction) -> additive attention pooling -> Linear."""

    def __init__(self, vocab_size: int, num_classes: int, *, embed_dim: int = 64, hidden: int = 64,
                 rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.fwd = LSTM(embed_dim, hidden, rngs=rngs)
        self.bwd = LSTM(embed_dim, hidden, rngs=rngs)
        self.pool = AdditivePool(2 * hidden, hidden, rngs=rngs)
        self.classifier = nnx.Linear(2 * hidden, num_classes, rngs=rngs)

    def encode(self, emb: jax.Array, lengths: jax.Array) -> jax.Array:
        hf = self.fwd(emb, lengths)
        hb = _reverse_valid(self.bwd(_reverse_valid(emb, lengths), lengths), lengths)
        return jnp.concatenate([hf, hb], axis=-1)


class _Block(nnx.Module):
    """Pre-LN transformer block with key-padding-masked self-attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, impl: str, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.impl = heads, impl
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=key_mask[:, None, None, :], impl=self.impl)
        x = x + self.proj(o.reshape(b, t, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class TextTransformer(TextClassifier):
    """Embedding + learned positions -> ``depth`` pre-LN blocks (``jaxattn.attention``, pads masked
    as keys) -> LayerNorm -> additive attention pooling -> Linear."""

    def __init__(self, vocab_size: int, num_classes: int, *, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 2.0, max_len: int = 512,
                 impl: Literal["auto", "pallas", "xla"] = "auto", rngs: nnx.Rngs):
        self.max_len = max_len
        self.embedding = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (max_len, dim)))
        self.blocks = nnx.List([_Block(dim, heads, int(dim * mlp_ratio), impl, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.pool = AdditivePool(dim, max(1, dim // 2), rngs=rngs)
        self.classifier = nnx.Linear(dim, num_classes, rngs=rngs)

    def encode(self, emb: jax.Array, lengths: jax.Array) -> jax.Array:
        t = emb.shape[1]
        if t > self.max_len:
            raise ValueError(f"tokens has {t} positions but the model's max_len is {self.max_len}")
        x = emb + self.pos[...][:t]
        mask = length_mask(lengths, t)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)
