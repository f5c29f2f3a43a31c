"""Variable-length documents for the gated delta rule, flash-linear-attention's ``cu_seqlens`` form: one row
``[1, total, ...]`` holds ``N`` documents back to back (document ``i`` its tokens ``cu_seqlens[i] ..
cu_seqlens[i + 1]``), each with its own initial state ``[N, heads, d_k, d_v]`` and its own final state: a serving
engine's packed prefill, every request starting from its cached state.

The documents are laid on chunk boundaries first: each moved to a chunk-aligned offset of a padded row (pad
tokens ``k = v = q = 0``, ``beta = 0``, ``g = 0`` leave the state as it is), so every chunk belongs to one document.
The scan over chunks (the kernels' or XLA's) then runs document by document over each one's chunk range
(:func:`layout`), from the document's initial state to its final state; the outputs are gathered back. Each document
costs at most ``C - 1`` pad tokens (``C``: 16 for the kernels, 64 on XLA's path with one decay per head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.pallas import _common


def check_cu_seqlens(cu_seqlens, total: int) -> int:
    """Validates ``cu_seqlens`` (int ``[N + 1]``: 0, then nondecreasing offsets, ``total`` last; values checked when
    concrete); returns ``N``."""
    shape, dtype = tuple(jnp.shape(cu_seqlens)), jnp.result_type(cu_seqlens)
    if len(shape) != 1 or shape[0] < 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be an integer [documents + 1] (0, then each document's end), got "
                         f"{dtype.name} {shape}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        cu = np.asarray(cu_seqlens)
        if cu[0] != 0 or cu[-1] != total or (np.diff(cu) < 0).any():
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the row's {total} tokens, got "
                             f"{cu.tolist()}")
    return shape[0] - 1


def layout(cu_seqlens: jax.Array, total: int, align: int, multiple: int):
    """``(positions [total], padded length, (begin, end))``: each token's place in the padded row (documents
    starting on multiples of ``align``, the chunk), the padded row's static length (a multiple of ``multiple``),
    and each document's chunks ``begin .. end`` (int32 ``[documents]``; ``begin == end``: an empty document)."""
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    docs = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    spans = (lens + align - 1) // align * align
    starts = jnp.cumsum(spans) - spans  # [N]: each document's offset in the padded row
    tok = jnp.arange(total, dtype=jnp.int32)
    doc = jnp.searchsorted(cu[1:], tok, side="right")  # (empty documents hold no token)
    n = _common.round_up(max(total + docs * (align - 1), 1), multiple)
    return starts[doc] + tok - cu[doc], n, (starts // align, (starts + spans) // align)


def scatter(x: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    """``x [1, total, ...]`` at ``positions`` of a zero row ``[1, n, ...]``."""
    return jnp.zeros((1, n, *x.shape[2:]), x.dtype).at[:, positions].set(x)
