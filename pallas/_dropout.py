"""Counter-based attention dropout: the keep mask is a pure function of (seed, batch * heads + head,
query row, key column), so the forward and both backward kernels (and the XLA path) regenerate the
same mask without storing it. Plain int32 jnp arithmetic (wrapping multiplies, logical shifts), so it
traces the same inside a Pallas kernel and in XLA.

``x = mix(mix(mix(seed ^ mix(bh + C0)) ^ row * C1) ^ col * C2)`` with ``mix`` the "lowbias32" integer
finaliser (two multiplies, three xor-shifts; a bijection with full avalanche); the element is kept
when the top 24 bits of ``x`` reach ``threshold = round(rate * 2^24)``, so it is kept with
probability ``1 - rate`` (to 2^-24), independently across elements, rows, heads and seeds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _i32(c: int) -> int:
    """An unsigned 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


_M1, _M2 = _i32(0x7FEB352D), _i32(0x846CA68B)
_C0, _C1, _C2 = _i32(0x3C6EF372), _i32(0x9E3779B9), _i32(0x85EBCA6B)


def _mix(x: jax.Array) -> jax.Array:
    x = x ^ lax.shift_right_logical(x, 16)
    x = x * _M1
    x = x ^ lax.shift_right_logical(x, 15)
    x = x * _M2
    return x ^ lax.shift_right_logical(x, 16)


def threshold(rate: float) -> int:
    """Keep iff ``top 24 bits >= threshold``."""
    return int(round(float(rate) * (1 << 24)))


def row_hash(seed: jax.Array, bh: jax.Array, rows: jax.Array) -> jax.Array:
    """Per (seed, batch-head, query row) state, int32, broadcasting ``bh`` against ``rows``."""
    base = _mix(seed.astype(jnp.int32) ^ _mix(bh.astype(jnp.int32) + _C0))
    return _mix(base ^ (rows.astype(jnp.int32) * _C1))


def keep(row_state: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Bool keep mask for ``row_state`` (from :func:`row_hash`) broadcast against key ``cols``."""
    x = _mix(row_state ^ (cols.astype(jnp.int32) * _C2))
    return lax.shift_right_logical(x, 8) >= threshold(rate)


def seed_from_key(rng: jax.Array) -> jax.Array:
    """An int32 seed ``[1]`` from a PRNG key (raw ``uint32[2]`` or typed)."""
    bits = jax.random.bits(rng, (1,), jnp.uint32)
    return lax.bitcast_convert_type(bits, jnp.int32)


def keep_mask(seed: jax.Array, batch: int, heads: int, q_len: int, kv_len: int, rate: float,
              offset: tuple = (0, 0, 0)) -> jax.Array:
    """The ``[batch, heads, q_len, kv_len]`` mask (the XLA path and tests): the block at
    ``offset = (batch, query row, key)`` of the mask of a larger problem with ``heads`` heads (the
    mask of one shard, so sharded callers draw the single-device mask)."""
    b0, q0, k0 = (jnp.asarray(o, jnp.int32) for o in offset)
    bh = ((b0 + jnp.arange(batch))[:, None] * heads + jnp.arange(heads)[None, :])[:, :, None, None]
    rows = (q0 + jnp.arange(q_len))[None, None, :, None]
    state = row_hash(jnp.asarray(seed).reshape(()), bh, rows)
    return keep(state, (k0 + jnp.arange(kv_len))[None, None, None, :], rate)


def kernel_seed(seed: jax.Array, heads: int, offset: tuple = (0, 0, 0)) -> jax.Array:
    """The kernels' int32 ``[4]`` scalars: ``(seed, batch offset * heads, query offset, key
    offset)`` (see :func:`keep_mask`)."""
    b0, q0, k0 = (jnp.asarray(o, jnp.int32).reshape(()) for o in offset)
    return jnp.stack([jnp.asarray(seed, jnp.int32).reshape(()), b0 * heads, q0, k0])
