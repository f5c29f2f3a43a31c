"""Input validation shared by the public ops: every error names the argument
and the expected shape or dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "xla")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


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
