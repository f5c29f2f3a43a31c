"""``jaxattn.dot_product_attention``: ``jax.nn.dot_product_attention``'s signature and semantics on jaxattn's
kernels, so that code written for JAX's function switches by changing one import.

What maps where: ``bias`` and a boolean ``mask`` become :func:`jaxattn.attention`'s ``mask`` (a float bias with
``-inf`` where the mask is False, differentiable as JAX's); ``query_seq_lengths`` / ``key_value_seq_lengths``
become segment ids (valid queries see valid keys, padded query rows give zeros, as JAX's; the kernels skip
the padded key blocks); ``is_causal`` and ``local_window_size`` keep JAX's top-left alignment (key ``j``
visible to query ``i`` iff ``j <= i``; the window ``i - left <= j <= i + right``): with ``T == S`` they run as
the kernels' causal / window modes (blocks outside skipped), else as a mask. ``implementation``: None (or
``"auto"``) picks the flash kernel on a GPU (jaxattn's ``impl="auto"``), ``"pallas"`` / ``"mosaic"`` /
``"xla"`` are jaxattn's paths, ``"cudnn"`` calls JAX's own cuDNN path unchanged.

One difference: a query row with no visible key (every key masked) gives zeros here (and ``lse = -inf``),
where JAX's XLA path averages all the values (its masked logits are a large finite negative).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops.attention import attention

__all__ = ["dot_product_attention"]

Implementation = Literal["auto", "pallas", "mosaic", "xla", "cudnn"] | None


def _to_4d(name: str, x, ndim: int = 4):
    x = jnp.asarray(x)
    if x.ndim > ndim:
        raise ValueError(f"{name} must have at most {ndim} dims (broadcastable to [batch, heads, q_len, kv_len]), "
                         f"got shape {tuple(x.shape)}")
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``jax.nn.dot_product_attention`` on jaxattn's kernels (module docstring): ``query [B, T, N, H]`` (or
    ``[T, N, H]``), ``key`` / ``value [B, S, K, H]`` (``K`` divides ``N``), ``bias`` / ``mask`` (bool) 4-D at
    most, broadcastable to ``[B, N, T, S]``, ``*_seq_lengths`` int ``[B]``. Returns ``[B, T, N, H]`` (and with
    ``return_residual`` the log-sum-exp ``[B, T, N]`` in the key dtype, without gradient)."""
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            query, key, value, bias, mask, scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
            implementation="cudnn", return_residual=return_residual)
    if implementation not in (None, "auto", "pallas", "mosaic", "xla"):
        raise ValueError(f"implementation must be None, 'auto', 'pallas', 'mosaic', 'xla' or 'cudnn', got "
                         f"{implementation!r}")
    query, key, value = (jnp.asarray(t) for t in (query, key, value))
    unbatched = query.ndim == 3
    if not {query.ndim, key.ndim, value.ndim} <= {3, 4} or len({query.ndim, key.ndim, value.ndim}) != 1:
        raise ValueError(f"query, key and value must all be [B, T, N, H] (or all [T, N, H]); got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"query, key and value must share one dtype (as jax.nn.dot_product_attention), got "
                         f"{query.dtype}, {key.dtype}, {value.dtype}")
    if key.shape != value.shape:
        raise ValueError(f"value must have the key's shape [B, S, K, H] = {key.shape}, got {value.shape}")
    b, t, _, _ = query.shape
    s = key.shape[1]

    # top-left causal / window: the kernels' own modes when T == S, else a [T, S] mask
    window = (local_window_size, local_window_size) if isinstance(local_window_size, int) else local_window_size
    causal = bool(is_causal)
    structural = None
    if t != s and (causal or window is not None):
        i, j = np.arange(t)[:, None], np.arange(s)[None, :]
        keep = np.ones((t, s), bool)
        if causal:
            keep &= j <= i
        if window is not None:
            keep &= (j >= i - window[0]) & (j <= i + window[1])
        structural, causal, window = jnp.asarray(keep)[None, None], False, None

    if mask is not None:
        mask = _to_4d("mask", mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean (True: attend; an additive mask goes in bias), got {mask.dtype}")
    if structural is not None:
        mask = structural if mask is None else mask & structural
    logit_mask = None
    if bias is not None:
        bias = _to_4d("bias", bias)
        logit_mask = bias if mask is None else jnp.where(mask, bias, -jnp.inf)
    elif mask is not None:
        logit_mask = mask

    segments = None
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        def ids(lengths, n, pad, name):
            if lengths is None:
                return jnp.zeros((b, n), jnp.int32)
            lengths = jnp.asarray(lengths)
            if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
                raise ValueError(f"{name} must be int [batch] = ({b},), got {lengths.dtype} {tuple(lengths.shape)}")
            return jnp.where(jnp.arange(n)[None, :] < lengths[:, None], 0, pad).astype(jnp.int32)

        # valid rows 0; padded queries 1 and padded keys 2 never meet anything
        segments = (ids(query_seq_lengths, t, 1, "query_seq_lengths"),
                    ids(key_value_seq_lengths, s, 2, "key_value_seq_lengths"))

    out, lse = attention(query, key, value, causal=causal, segment_ids=segments, mask=logit_mask, scale=scale,
                         local_window_size=window, impl=implementation or "auto", return_lse=True)
    if unbatched:
        out, lse = out[0], lse[0]
    if not return_residual:
        return out
    return out, jax.lax.stop_gradient(lse.astype(key.dtype))
