"""Input validation shared by the public ops: every error names the argument
and the expected shape or dtype."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "xla")
MOSAIC_IMPLS = (*IMPLS, "mosaic")  # ops with a Mosaic GPU (Hopper) forward as well
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_impl(impl: str, allowed: Sequence[str] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"impl must be one of {tuple(allowed)}, got {impl!r}")


def empty(*arrays: jax.Array) -> bool:
    """Whether any array has no elements (an empty batch): the ops then run their XLA path, which
    returns the empty result (and gradients) without launching a kernel."""
    return any(math.prod(x.shape) == 0 for x in arrays)


def check_array(name: str, x: Any, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array of shape {layout}, got {type(x).__name__}")


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
    check_array(name, x, layout)
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_float_dtype(name: str, x: jax.Array, allowed: Sequence[Any] = FLOAT_DTYPES) -> None:
    if jnp.dtype(x.dtype) not in [jnp.dtype(a) for a in allowed]:
        names = ", ".join(jnp.dtype(a).name for a in allowed)
        raise ValueError(f"{name} has dtype {jnp.dtype(x.dtype).name}; expected one of {names}")


def check_same_dtype(**arrays: jax.Array) -> None:
    dtypes = {n: jnp.dtype(a.dtype).name for n, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{', '.join(dtypes)} must share one dtype, got {dtypes}")


def check_dim(name: str, x: jax.Array, axis: int, expected: int, what: str, source: str = "") -> None:
    """``x.shape[axis]`` must equal ``expected`` (taken from ``source``, e.g. "q")."""
    if x.shape[axis] != expected:
        src = f" ({source}'s)" if source else ""
        raise ValueError(f"{name} has {what} {x.shape[axis]} at axis {axis} (shape {tuple(x.shape)}); "
                         f"expected {expected}{src}")


def check_broadcastable(name: str, x: jax.Array, target: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Checks that ``x`` broadcasts to ``target`` with each dim either full or 1;
    returns its shape left-padded to ``len(target)``."""
    if x.ndim > len(target):
        raise ValueError(f"{name} must broadcast to {layout} = {target}, got shape {tuple(x.shape)}")
    shape = (1,) * (len(target) - x.ndim) + tuple(x.shape)
    if any(s not in (1, t) for s, t in zip(shape, target)):
        raise ValueError(f"{name} must broadcast to {layout} = {target}, got shape {tuple(x.shape)}")
    return shape


def check_qkv(q: Any, k: Any, v: Any, dtypes: Sequence[Any] = FLOAT_DTYPES) -> tuple[int, int, int, int, int, int]:
    """Validates ``q [batch, q_len, heads, d]``, ``k [batch, kv_len, kv_heads, d]`` and
    ``v [batch, kv_len, kv_heads, e]`` (one dtype from ``dtypes``, kv heads dividing q heads,
    non-empty lengths); returns ``(batch, q_len, kv_len, heads, kv_heads, d)``."""
    layout = "[batch, seq, heads, head_dim]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, layout)
    check_float_dtype("q", q, dtypes)
    check_same_dtype(q=q, k=k, v=v)
    batch, q_len, hq, d = q.shape
    check_dim("k", k, 0, batch, "batch size", "q")
    check_dim("v", v, 0, batch, "batch size", "q")
    kv_len, hkv = k.shape[1], k.shape[2]
    check_dim("v", v, 1, kv_len, "kv length", "k")
    check_dim("v", v, 2, hkv, "kv heads", "k")
    check_dim("k", k, 3, d, "head dim", "q")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k has {hkv} kv heads, which must divide q's {hq} heads (GQA/MQA)")
    if q_len == 0 or kv_len == 0:
        raise ValueError(f"q and k need at least one position, got q_len={q_len}, kv_len={kv_len}")
    return batch, q_len, kv_len, hq, hkv, d


def require_static(name: str, value: Any, kind: type) -> None:
    """A ValueError saying how to make an option static when ``value`` (or an item of a tuple) is
    traced (an argument of a jitted function): the option is compiled into the kernels."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(x, jax.core.Tracer) for x in items):
        raise ValueError(f"{name} must be static (Python {kind.__name__}s): it is compiled into the kernels, but "
                         "got a traced value (an argument of a jitted function); close over it or pass it in "
                         "jax.jit's static_argnames")


def static_number(name: str, value: Any, kind: type = float) -> Any:
    """``kind(value)`` for an option that is compiled into the kernels (:func:`require_static`)."""
    require_static(name, value, kind)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a Python {kind.__name__}, got {value!r}") from None


def check_flag(name: str, value: Any) -> bool:
    """A static bool option (``causal``, ...)."""
    return static_number(name, value, bool)


def check_scale(scale: Any) -> float | None:
    """``None`` or a finite float."""
    if scale is None:
        return None
    scale = static_number("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")
    return scale


def check_window(window: Any) -> tuple[int | None, int | None] | None:
    """``local_window_size``: None, an int w >= 0 (``(w, w)``) or a pair of ints >= 0 / None."""
    if window is None:
        return None
    require_static("local_window_size", window, int)
    pair = (window, window) if isinstance(window, int) and not isinstance(window, bool) else window
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0) for w in pair)
    if not ok:
        raise ValueError("local_window_size must be None, an int >= 0, or a pair (left, right) of ints >= 0 "
                         f"or None; got {window!r}")
    return None if tuple(pair) == (None, None) else (pair[0], pair[1])


def check_soft_cap(cap: Any) -> float | None:
    """``logits_soft_cap``: None or a finite float > 0."""
    if cap is None:
        return None
    value = static_number("logits_soft_cap", cap)
    if not 0 < value < float("inf"):
        raise ValueError(f"logits_soft_cap must be a finite float > 0 or None, got {cap!r}")
    return value


def check_score_mod(fn: Any, tables: Any = ()) -> tuple[Any, tuple]:
    """``(score_mod, score_mod_tables)``: None and no tables, or an elementwise ``(x, batch, head, q_idx,
    kv_idx, *tables) -> x'`` that closes over no arrays (the kernels trace it inside; arrays it reads come
    as ``score_mod_tables``) and its checked tables."""
    if fn is None:
        if check_score_mod_tables(tables):
            raise ValueError("score_mod_tables are read by a score_mod: give score_mod too")
        return None, ()
    if not callable(fn):
        raise ValueError(f"score_mod must be a callable (x, batch, head, q_idx, kv_idx) -> x', got {type(fn).__name__}")
    tables = check_score_mod_tables(tables)
    x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    idx = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
           jax.ShapeDtypeStruct((2, 1), jnp.int32), jax.ShapeDtypeStruct((1, 3), jnp.int32))
    avals = tuple(jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tables)
    what = ", ".join(["x [2, 3] float32", "batch", "head", "q_idx [2, 1]", "kv_idx [1, 3]"]
                     + [f"table {tuple(t.shape)} {jnp.dtype(t.dtype).name}" for t in tables])
    try:
        closed = jax.make_jaxpr(fn)(x, *idx, *avals)
    except Exception as e:  # noqa: BLE001 - the user's function, traced on small index arrays
        raise ValueError(f"score_mod({what}) failed to trace: {type(e).__name__}: {e}") from e
    out = closed.out_avals
    if len(out) != 1 or not jnp.issubdtype(out[0].dtype, jnp.floating) or \
            jnp.broadcast_shapes(tuple(out[0].shape), (2, 3)) != (2, 3):
        raise ValueError(f"score_mod must return one floating array broadcastable to x's shape; for x [2, 3] it "
                         f"returned {[f'{a.dtype} {tuple(a.shape)}' for a in out]}")
    if closed.consts:  # (Pallas kernels capture no constants, not even a 0-d array)
        raise ValueError("score_mod closes over arrays (captured tables, jnp scalars or traced values): the kernels "
                         "take Python numbers and index arithmetic only; pass arrays it reads as score_mod_tables "
                         "(they follow kv_idx among its arguments, and are differentiable), write constants as "
                         "Python floats")
    return fn, tables


def check_score_mod_tables(tables: Any) -> tuple:
    """``score_mod_tables``: a sequence of arrays of rank >= 1, floating (differentiable) or integer."""
    if tables is None:
        return ()
    if hasattr(tables, "shape") or not isinstance(tables, (tuple, list)):
        raise ValueError(f"score_mod_tables must be a tuple or list of arrays, got {type(tables).__name__}")
    out = []
    for i, t in enumerate(tables):
        check_array(f"score_mod_tables[{i}]", t, "[n, ...] (rank >= 1)")
        t = jnp.asarray(t)
        if t.ndim < 1:
            raise ValueError(f"score_mod_tables[{i}] must have rank >= 1 (a scalar as shape [1]), got a 0-d array")
        if jnp.dtype(t.dtype) not in [jnp.dtype(a) for a in (*FLOAT_DTYPES, jnp.float64)] and \
                not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"score_mod_tables[{i}] must be float16, bfloat16, float32 or an integer dtype, got "
                             f"{jnp.dtype(t.dtype).name}")
        if t.size == 0:
            raise ValueError(f"score_mod_tables[{i}] is empty (shape {tuple(t.shape)})")
        out.append(t)
    return tuple(out)


def check_dropout(rate: Any, rng: Any) -> float:
    """``dropout_rate`` in [0, 1), with a ``dropout_rng`` PRNG key when it is > 0."""
    value = static_number("dropout_rate", rate)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}")
    if value > 0.0 and rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a PRNG key, e.g. jax.random.key(0))")
    return value


def check_dropout_offset(offset: Any) -> tuple:
    """``dropout_offset``: three integers (or integer scalar arrays) ``(batch, query row, key)``."""
    try:
        items = tuple(offset)
    except TypeError:
        items = ()
    if len(items) != 3 or any(jnp.ndim(x) != 0 or not jnp.issubdtype(jnp.result_type(x), jnp.integer)
                              for x in items):
        raise ValueError("dropout_offset must be three integers (batch, query row, key), got "
                         f"{offset!r}")
    return items


def check_position_offset(offset: Any) -> tuple | None:
    """``position_offset``: None, or two integers (or integer scalar arrays) ``(q_offset, kv_offset)``."""
    if offset is None:
        return None
    try:
        items = () if isinstance(offset, str) else tuple(offset)
        ok = len(items) == 2 and all(
            jnp.ndim(x) == 0 and jnp.issubdtype(jnp.result_type(x), jnp.integer) for x in items)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("position_offset must be None or two integers (q_offset, kv_offset): the positions of "
                         f"q's first row and k's first row; got {offset!r}")
    return items


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def no_grad(x: jax.Array, message: str) -> jax.Array:
    """Identity that raises ``NotImplementedError(message)`` when differentiated (forward-only ops)."""
    del message
    return x


@no_grad.defjvp
def _no_grad_jvp(message, primals, tangents):
    del primals, tangents
    raise NotImplementedError(message)


def check_alibi(alibi_slopes: Any, batch: int, heads: int) -> Any:
    """``None`` or floating slopes of shape ``[heads]`` or ``[batch, heads]`` (gradient stopped)."""
    if alibi_slopes is None:
        return None
    check_array("alibi_slopes", alibi_slopes, "[heads] or [batch, heads]")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape [heads] = ({heads},) or [batch, heads] = ({batch}, {heads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if not jnp.issubdtype(alibi_slopes.dtype, jnp.floating):
        raise ValueError(f"alibi_slopes must be floating, got {jnp.dtype(alibi_slopes.dtype).name}")
    return jax.lax.stop_gradient(alibi_slopes)


def check_sinks(sinks: Any, heads: int) -> Any:
    """``None`` or floating attention-sink logits of shape ``[heads]`` (differentiable)."""
    if sinks is None:
        return None
    check_array("sinks", sinks, "[heads]")
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks must have shape [heads] = ({heads},) (one logit per query head), got "
                         f"{tuple(sinks.shape)}")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"sinks must be floating, got {jnp.dtype(sinks.dtype).name}")
    return sinks
