"""``score_mod`` inside the kernels: its tables, its derivative and its tables' gradients.

A ``score_mod(x, batch, head, q_idx, kv_idx, *tables)`` may read arrays passed beside it
(``score_mod_tables``: a learned relative-position bias, per-head slopes, ...) by indexing them
with the index arguments, as FlexAttention's score_mod reads captured tensors. Inside a kernel each
table arrives as a :class:`Table`, whose indexing is a gather load from the table's ref (indices
normalised as NumPy's and clamped, as ``jnp`` indexing does, so no load leaves the table).

The backward needs, per score, ``d score_mod / d x`` (the chain rule to ``q k^T``) and, per table
read, ``d score_mod / d value`` (the table's gradient). :func:`apply` records the values the
function loads, then replays it on them under ``jax.jvp``: no ref is read inside a transformation.
:func:`add_table_grads` scatters ``dz * d score_mod / d value`` into fp32 gradient buffers, with
atomic adds on a GPU (many scores read one table entry) and one scatter-add per tile when
interpreted (the interpreter's atomic add keeps only one of the updates to a repeated index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

HOW = "index every axis with integers or index arrays, e.g. table[head, q_idx - kv_idx]"


class _Tape:
    """The values a score_mod's table reads load (``replay`` None), or hands back (replaying them)."""

    def __init__(self, replay: Sequence[jax.Array] | None = None):
        self.reads: list[tuple[int, tuple, jax.Array]] = []  # (table number, indices, value)
        self.replay = None if replay is None else list(replay)


class Table:
    """A ``score_mod`` table inside a kernel: ``table[i, j, ...]`` (one integer or integer array per
    axis; the arrays broadcast together) loads those elements. ``shape``, ``ndim`` and ``dtype`` are
    the table's; nothing else of an array is available (compute with the loaded values)."""

    def __init__(self, ref: Any, number: int, tape: _Tape):
        self._ref, self._number, self._tape = ref, number, tape

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._ref.shape)

    @property
    def ndim(self) -> int:
        return len(self._ref.shape)

    @property
    def dtype(self) -> Any:
        return self._ref.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> jax.Array:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) != self.ndim or any(k is None or k is Ellipsis or isinstance(k, slice) for k in key):
            raise TableReadError(f"score_mod table {self._number} (shape {self.shape}) is read one element per score "
                            f"inside the kernels: {HOW}; got the index {key!r}")
        idx = []
        for axis, (k, n) in enumerate(zip(key, self.shape)):
            k = jnp.asarray(k)
            if not jnp.issubdtype(k.dtype, jnp.integer):
                raise TableReadError(f"score_mod table {self._number}: axis {axis}'s index must be an integer (array), "
                                f"got {k.dtype}")
            k = k.astype(jnp.int32)
            idx.append(jnp.clip(jnp.where(k < 0, k + n, k), 0, n - 1))  # (as jnp indexing: wrap, then clamp)
        shape = jnp.broadcast_shapes(*(i.shape for i in idx))
        idx = tuple(jnp.broadcast_to(i, shape) for i in idx)
        if self._tape.replay is not None:
            value = self._tape.replay.pop(0)
        else:
            value = self._ref[idx]
        self._tape.reads.append((self._number, idx, value))
        return value


class TableReadError(TypeError):
    """A score_mod read a table in a way the kernels cannot (not one element per score)."""


def _call(score_mod: Callable, x, index: tuple, refs: Sequence[Any], tape: _Tape):
    try:
        return score_mod(x, *index, *(Table(r, n, tape) for n, r in enumerate(refs)))
    except TableReadError:
        raise
    except (TypeError, ValueError) as e:
        if not refs:
            raise
        raise TableReadError(f"score_mod failed inside the kernel, where its tables are read-only views (Table): "
                             f"{HOW}, then compute with the loaded values ({type(e).__name__}: {e})") from e


def apply(score_mod: Callable, x: jax.Array, index: tuple, refs: Sequence[Any] = (), *,
          derivative: bool = False, grads: Sequence[bool] = ()):
    """``(y, dy/dx, partials)`` for natural-unit logits ``x`` and ``index = (batch, head, q_idx,
    kv_idx)`` (broadcasting against ``x``), the tables' ``refs``. ``dy/dx`` (with ``derivative``) is
    elementwise, as ``x``; ``partials`` lists, for each read of a table whose ``grads`` entry is
    True, ``(table number, indices, dy/dvalue as x)`` (for :func:`add_table_grads`). Without
    ``derivative`` the last two are None."""
    if not derivative:
        return _call(score_mod, x, index, refs, _Tape()), None, None
    record = _Tape()
    _call(score_mod, x, index, refs, record)  # (its loads feed the replays; the rest is dead code)
    values = [v for _, _, v in record.reads]

    def replay(x, *vals):
        return _call(score_mod, x, index, refs, _Tape(vals))

    y, dy = jax.jvp(lambda x: replay(x, *values), (x,), (jnp.ones_like(x),))
    partials = []
    for n, (number, idx, value) in enumerate(record.reads):
        if number < len(grads) and grads[number]:
            _, dv = jax.jvp(lambda val, n=n: replay(x, *values[:n], val, *values[n + 1:]),
                            (value,), (jnp.ones_like(value),))
            partials.append((number, idx, jnp.broadcast_to(dv, x.shape).astype(jnp.float32)))
    return y, jnp.broadcast_to(dy, x.shape).astype(jnp.float32), partials


def add_table_grads(grad_refs: dict[int, Any], partials, dz: jax.Array, interpret: bool) -> None:
    """Adds ``dz * dy/dvalue`` (``dz``: the final logits' cotangent, natural units, as the partials'
    tiles) into the fp32 gradient buffer ``grad_refs[table number]`` at each read's indices, summed
    over the dims the read broadcasts over. Scores with ``dz == 0`` (masked, or padding) add nothing:
    their derivative may be inf or NaN there."""
    for number, idx, partial in partials:
        c = jnp.where(dz == 0.0, 0.0, dz * partial)
        shape = idx[0].shape
        lead = (1,) * (c.ndim - len(shape)) + tuple(shape)
        c = jnp.sum(c, axis=tuple(a for a, n in enumerate(lead) if n == 1 and c.shape[a] != 1), keepdims=True)
        c = c.reshape(shape)
        ref = grad_refs[number]
        if interpret:  # (grid steps run one at a time: a read-modify-write of the whole buffer)
            ref[...] = ref[...].at[idx].add(c)
        elif shape:
            pltriton.atomic_add(ref, idx, c, mask=c != 0.0)
        else:
            pltriton.atomic_add(ref, idx, c)
