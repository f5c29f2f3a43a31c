"""Drop-in Flax NNX attention on jaxattn's kernels.

``jaxattn.layers.MultiHeadAttention`` is ``flax.nnx.MultiHeadAttention`` (same constructor, same
parameters and checkpoints, same ``init_cache``/``decode``) whose attention core is
:func:`jaxattn.attention` (the flash kernel on GPU). ``attention_fn`` is that core on its own, with
the signature of ``flax.nnx.dot_product_attention``, for any module that takes an
``attention_fn``::

    attn = jaxattn.layers.MultiHeadAttention(8, 512, num_kv_heads=2, rngs=nnx.Rngs(0))
    attn = nnx.MultiHeadAttention(8, 512, attention_fn=jaxattn.layers.attention_fn, rngs=...)

Semantics follow ``flax.nnx.dot_product_attention`` (``is_causal`` aligned to the top-left, bool
masks keep True), with two exceptions: a query row whose every key is masked returns zeros (flax
gives the mean of the values), and where flax would need attention weights (``sow_weights``)
the call is handed to flax's own implementation. Attention dropout runs in the kernels
(``broadcast_dropout`` = one mask for every batch row and head, as flax), with the same keep
probability and scaling as flax but masks drawn from jaxattn's own hash of the ``dropout_rng``.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.ops.attention import attention

Impl = Literal["auto", "pallas", "mosaic", "xla"]  # "mosaic": Hopper forward (jaxattn.attention)


def attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: nnx.Module | None = None,
    promote_dtype: Callable[..., Any] | None = None,
    is_causal: bool = False,
    *,
    impl: Impl = "auto",
    score_mod: Callable | None = None,
    score_mod_tables: Sequence[jax.Array] = (),
    sinks: jax.Array | None = None,
) -> jax.Array:
    """``flax.nnx.dot_product_attention``-compatible attention on :func:`jaxattn.attention`.

    ``query [..., q_len, heads, d]``, ``key``/``value [..., kv_len, kv_heads, d]`` (GQA when
    ``kv_heads`` divides ``heads``), ``bias``/``mask`` broadcastable to ``[..., heads, q_len,
    kv_len]``. ``impl`` picks jaxattn's path and ``score_mod`` transforms the logits, reading
    ``score_mod_tables`` (see :func:`jaxattn.attention`; ``batch`` is the flattened leading index);
    ``sinks [heads]``: attention sinks (gpt-oss); bind them with ``functools.partial``."""
    if module is not None:
        kw = {} if promote_dtype is None else {"promote_dtype": promote_dtype}
        return nnx.dot_product_attention(query, key, value, bias, mask, broadcast_dropout, dropout_rng,
                                         dropout_rate, deterministic, dtype, precision, module,
                                         is_causal=is_causal, **kw)
    if promote_dtype is not None:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    elif dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    else:
        query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
        dt = jnp.result_type(query, key, value)
        query, key, value = (x.astype(dt) for x in (query, key, value))
    if query.ndim < 4 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"query, key and value must share one rank >= 4 [..., seq, heads, head_dim]; got "
                         f"shapes {query.shape}, {key.shape}, {value.shape}")
    batch_shape = query.shape[:-3]
    q_len, heads = query.shape[-3], query.shape[-2]
    kv_len = key.shape[-3]
    b = math.prod(batch_shape)

    def flat(x):  # [..., s, h, d] -> [b, s, h, d]
        return x.reshape(b, *x.shape[-3:])

    def flat_mask(m, name):  # broadcastable to [..., heads, q, kv] -> [b or 1, heads or 1, q or 1, kv or 1]
        m = jnp.asarray(m)
        full = (*batch_shape, heads, q_len, kv_len)
        if m.ndim > len(full):
            raise ValueError(f"{name} must broadcast to [..., heads, q_len, kv_len] = {full}, got {m.shape}")
        m = m.reshape((1,) * (len(full) - m.ndim) + m.shape)
        if all(s == 1 for s in m.shape[:len(batch_shape)]):
            return m.reshape(1, *m.shape[len(batch_shape):])
        return jnp.broadcast_to(m, (*batch_shape, *m.shape[len(batch_shape):])).reshape(b, *m.shape[len(batch_shape):])

    keep = None if mask is None else flat_mask(mask, "mask").astype(bool)
    causal = bool(is_causal) and q_len == kv_len
    if is_causal and not causal:  # flax/jax align is_causal to the top-left: key j <= query i
        tril = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
        keep = tril[None, None] if keep is None else keep & tril
    combined = keep
    if bias is not None:
        combined = flat_mask(bias, "bias").astype(jnp.float32)
        if keep is not None:
            combined = jnp.where(keep, combined, -jnp.inf)
    rate = 0.0 if deterministic else dropout_rate
    out = attention(flat(query), flat(key), flat(value), causal=causal, mask=combined, impl=impl,
                    dropout_rate=rate, dropout_rng=dropout_rng if rate else None,
                    dropout_broadcast=broadcast_dropout, score_mod=score_mod, score_mod_tables=score_mod_tables,
                    sinks=sinks)
    return out.reshape(*batch_shape, *out.shape[1:])


_core = attention_fn  # MultiHeadAttention's constructor shadows the name with its own argument
# the learned score_mod tables and sinks of the MultiHeadAttention being called (read by its attention core)
_LEARNED: contextvars.ContextVar[dict] = contextvars.ContextVar("jaxattn_learned_attention_arrays", default={})


class _LearnedCore:
    """A MultiHeadAttention's attention core when it owns score_mod tables or sinks: :func:`attention_fn`
    with the calling module's arrays (set around its ``__call__``)."""

    def __init__(self, impl: Impl, score_mod: Callable | None):
        self.impl, self.score_mod = impl, score_mod

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        return _core(*args, impl=self.impl, score_mod=self.score_mod, **_LEARNED.get(), **kwargs)


class MultiHeadAttention(nnx.MultiHeadAttention):
    """``flax.nnx.MultiHeadAttention`` with :func:`jaxattn.attention` as its core (``impl`` picks
    the path: "auto" = the flash kernel on GPU; ``score_mod``: a logit transform, as
    :func:`jaxattn.attention`'s). Takes every argument of the flax module; its parameters and cache
    have the same names and shapes, so flax checkpoints load unchanged.

    ``score_mod_tables``: shapes of learned tables the ``score_mod`` reads (after ``kv_idx``), e.g.
    ``[(num_heads, 2 * max_len - 1)]`` for a relative-position bias; they are parameters
    ``score_mod_table0``, ``score_mod_table1``, ... initialised by ``score_mod_table_init`` (zeros by
    default) and trained through the kernels' table gradients. ``sinks=True``: attention sinks
    (gpt-oss), a learned logit per head (parameter ``sinks [num_heads]``, zeros at init) in every
    row's softmax, carrying no value."""

    def __init__(self, *args: Any, impl: Impl = "auto", attention_fn: Callable[..., jax.Array] | None = None,
                 score_mod: Callable | None = None, score_mod_tables: Sequence[Sequence[int]] = (),
                 score_mod_table_init: Callable = nnx.initializers.zeros_init(), sinks: bool = False, **kwargs: Any):
        if attention_fn is not None and (score_mod is not None or sinks):
            raise ValueError("score_mod and sinks apply to jaxattn's attention_fn: give attention_fn, or score_mod / "
                             "sinks, not both")
        if score_mod_tables and score_mod is None:
            raise ValueError("score_mod_tables are read by a score_mod: give score_mod too")
        shapes = [tuple(int(n) for n in s) for s in score_mod_tables]
        if any(len(s) < 1 or min(s) < 1 for s in shapes):
            raise ValueError(f"score_mod_tables must be shapes of rank >= 1 with positive sizes, got {score_mod_tables}")
        if shapes or sinks:
            fn = _LearnedCore(impl, score_mod)
        else:
            fn = attention_fn or functools.partial(_core, impl=impl, score_mod=score_mod)
        super().__init__(*args, attention_fn=fn, **kwargs)
        self.num_score_mod_tables = len(shapes)
        for i, s in enumerate(shapes):  # (flax's module takes rngs by keyword, required)
            setattr(self, f"score_mod_table{i}", nnx.Param(score_mod_table_init(kwargs["rngs"].params(), s,
                                                                                self.param_dtype)))
        self.sinks = nnx.Param(jnp.zeros((self.num_heads,), self.param_dtype)) if sinks else None

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        if not self.num_score_mod_tables and self.sinks is None:
            return super().__call__(*args, **kwargs)
        learned = {"score_mod_tables": tuple(getattr(self, f"score_mod_table{i}")[...]
                                             for i in range(self.num_score_mod_tables))}
        if self.sinks is not None:
            learned["sinks"] = self.sinks[...]
        token = _LEARNED.set(learned)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _LEARNED.reset(token)
