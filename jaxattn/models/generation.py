"""Autoregressive sampling for the language models: ``generate(model, prompt, n)``.

A model that can be sampled from has two methods (TNL: the recurrent Lightning state, O(1)
per token; GPT: a KV cache read by :func:`jaxattn.decode_attention`):

- ``prefill(tokens [B, p], max_len, lengths=None) -> (logits [B, vocab], cache)``: the parallel forward
  of the prompt, the logits of its last position (of position ``lengths[b] - 1`` for ragged prompts), and a
  cache with room for ``max_len`` tokens;
- ``decode_step(token [B], cache, position) -> (logits [B, vocab], cache)``: one new token at
  ``position`` (an int32 scalar, or ``[B]`` for ragged prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def supports_generation(model: nnx.Module) -> bool:
    """True when ``model`` has the ``prefill``/``decode_step`` pair that :func:`generate` uses."""
    return callable(getattr(model, "prefill", None)) and callable(getattr(model, "decode_step", None))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """``logits [B, vocab]`` with each token already in its row's sequence (``seen [B, vocab]`` bool)
    penalised as CTRL / Hugging Face's ``repetition_penalty``: a positive logit divided by ``penalty``, a
    negative one multiplied by it."""
    logits = logits.astype(jnp.float32)
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None = None, min_p: float | None = None) -> jax.Array:
    """Samples token ids from ``logits [..., vocab]``: greedy at ``temperature <= 0``, else softmax
    of ``logits / temperature`` restricted to the ``top_k`` largest (all when None), then to the
    smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling; the most
    likely token always stays), then to the tokens at least ``min_p`` times as likely as the most likely
    one (min-p sampling), as Hugging Face's warpers in that order."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = warp_logits(logits, temperature, top_k, top_p, min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def warp_logits(logits: jax.Array, temperature: float, top_k: int | None = None, top_p: float | None = None,
                min_p: float | None = None) -> jax.Array:
    """``logits / temperature`` (``temperature > 0``) with the tokens that :func:`sample_logits` leaves out
    at ``-inf``."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    if min_p is not None and min_p > 0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


@nnx.jit(static_argnames=("max_len",))
def _prefill(model, prompt, max_len: int, lengths=None):
    return model.prefill(prompt, max_len) if lengths is None else model.prefill(prompt, max_len, lengths)


@nnx.jit
def _decode_step(model, token, cache, position):
    return model.decode_step(token, cache, position)


def generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float | None = None, eos_id: int | Sequence[int] | None = None,
             key: jax.Array | None = None, return_logits: bool = False,
             on_token: Callable[[np.ndarray], None] | None = None,
             prompt_lengths: jax.Array | Sequence[int] | None = None, pad_id: int = 0):
    """Samples up to ``max_new_tokens`` after ``prompt [batch, p]`` (int). The prompt is prefilled
    with the parallel forward; each new token is one incremental step. ``temperature=0`` is
    greedy; ``top_k`` / ``top_p`` / ``min_p`` restrict sampling (:func:`sample_logits`);
    ``repetition_penalty`` (greedy too) penalises every token already in the row, prompt included
    (:func:`apply_repetition_penalty`). With ``eos_id`` (one id, or
    several: chat models end a turn with one of them) a row that has emitted one continues with the first
    only, and generation stops once every row has. ``on_token`` is called with each step's tokens
    (``[batch]`` numpy, as they are drawn: for streaming). Returns
    ``tokens [batch, p + n]``, ``n <= max_new_tokens`` the steps taken (and the per-step logits
    ``[batch, n, vocab]``, which equal the parallel forward's).

    Ragged prompts: ``prompt_lengths [batch]``, row b's prompt its first ``prompt_lengths[b]`` tokens (the
    rest padding); every row is sampled as if alone, and the result holds row b's prompt, then its new
    tokens, then ``pad_id`` up to ``p + n`` (column ``prompt_lengths[b] + i`` is its i-th new token). (A
    GPT with a quantized KV cache takes its scales from the whole padded prompt, pads included, so its
    rows match their lone runs up to that quantisation.)"""
    if not supports_generation(model):
        raise ValueError(f"{type(model).__name__} has no incremental decoding (prefill/decode_step); "
                         "generate() samples from TNL and GPT models")
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be int [batch, p] with p >= 1, got shape {tuple(prompt.shape)}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must have an integer dtype, got {jnp.dtype(prompt.dtype).name}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    vocab = model.cfg.vocab_size
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in 1..{vocab}, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be positive (1: none), got {repetition_penalty}")
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    if not all(isinstance(e, (int, np.integer)) and 0 <= e < vocab for e in eos):
        raise ValueError(f"eos_id must be ids in 0..{vocab - 1}, got {eos_id}")
    lengths = None
    if prompt_lengths is not None:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (prompt.shape[0],) or not np.issubdtype(lengths.dtype, np.integer) \
                or not ((lengths >= 1) & (lengths <= prompt.shape[1])).all():
            raise ValueError(f"prompt_lengths must be {prompt.shape[0]} ints in 1..{prompt.shape[1]} (one per prompt "
                             f"row), got {lengths.tolist()}")
        lengths = jnp.asarray(lengths, jnp.int32)
    key = jax.random.PRNGKey(0) if key is None else key
    prompt = prompt.astype(jnp.int32)
    tokens, all_logits = [prompt], []
    if max_new_tokens:
        pos = prompt.shape[1] if lengths is None else lengths
        last, cache = _prefill(model, prompt, prompt.shape[1] + max_new_tokens, lengths)
        done = jnp.zeros((prompt.shape[0],), bool)
        penalise = repetition_penalty is not None and repetition_penalty != 1.0
        if penalise:  # [B, vocab]: the tokens each row holds so far (not its pads)
            rows = jnp.arange(prompt.shape[0])[:, None]
            real = jnp.ones(prompt.shape, bool) if lengths is None else jnp.arange(prompt.shape[1]) < lengths[:, None]
            seen = jnp.zeros((prompt.shape[0], vocab), bool).at[rows, prompt].max(real)
        for i in range(max_new_tokens):
            all_logits.append(last)
            key, sub = jax.random.split(key)
            scores = apply_repetition_penalty(last, seen, repetition_penalty) if penalise else last
            tok = sample_logits(scores, sub, temperature, top_k, top_p, min_p)
            if penalise:
                seen = seen.at[rows[:, 0], tok].set(True)
            if eos:
                tok = jnp.where(done, eos[0], tok)
                done = done | jnp.isin(tok, jnp.asarray(eos, tok.dtype))
            tokens.append(tok[:, None])
            if on_token is not None:
                on_token(np.asarray(tok))
            if eos and bool(done.all()):
                break
            if i + 1 < max_new_tokens:
                last, cache = _decode_step(model, tok, cache, jnp.asarray(pos, jnp.int32))
                pos += 1
    out = jnp.concatenate(tokens, axis=1)
    if lengths is not None:  # row b: its prompt, its new tokens, then pad_id
        p, n = prompt.shape[1], out.shape[1] - prompt.shape[1]
        filled = jnp.where(jnp.arange(p + n)[None] < lengths[:, None], jnp.pad(prompt, ((0, 0), (0, n))), pad_id)
        rows = jnp.arange(prompt.shape[0])[:, None]
        out = filled.at[rows, lengths[:, None] + jnp.arange(n)[None]].set(out[:, p:])
    if not return_logits:
        return out
    logits = jnp.stack(all_logits, axis=1) if all_logits else jnp.zeros((prompt.shape[0], 0, vocab), jnp.float32)
    return out, logits
