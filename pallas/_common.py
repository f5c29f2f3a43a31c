"""Helpers shared by the Pallas kernels: interpret-mode choice, output poisoning,
padding, one ``pallas_call`` wrapper that pins the Triton backend, masked loads and stores of
tiles from unpadded arrays, an FMA and an exact int32 -> fp32 conversion that stay off Hopper's
slow paths, and the exact merge of partial attentions by their log-sum-exps (split-KV decoding,
ring attention)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_state = threading.local()

# Triton-backend 2D dot with transpose flags (moved from ``pl`` to ``pallas.triton``).
dot = getattr(pltriton, "dot", None) or pl.dot


def targets_gpu() -> bool:
    """True when kernels are built for a GPU: the default backend is one, or the trace runs inside
    :func:`compile_for_gpu` (compiling for a compile-only GPU from a CPU-only machine)."""
    return jax.default_backend() == "gpu" or getattr(_state, "compile_for_gpu", False)


@contextlib.contextmanager
def compile_for_gpu() -> Iterator[None]:
    """Within this context, traces build the GPU kernels (``impl="auto"`` picks them, nothing runs
    interpreted) whatever the default backend: for ``.lower(lowering_platforms=("cuda",))`` and
    compiling for a compile-only GPU (:mod:`jaxattn.bench.aot`). Read at trace time, which jit's
    cache does not see: trace fresh functions inside it."""
    with _flag("compile_for_gpu", True):
        yield


@contextlib.contextmanager
def _flag(name: str, value: bool) -> Iterator[None]:
    """Sets a thread-local trace-time flag for the duration of the context."""
    prev = getattr(_state, name, False)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, prev)


def interpret_default() -> bool:
    """True when no GPU backend is present, so kernels must run interpreted."""
    return not targets_gpu()


def resolve_interpret(interpret: bool | None) -> bool:
    return interpret_default() if interpret is None else bool(interpret)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within this context, every kernel output starts as NaN (or int min).

    The buffers are passed in and aliased to the outputs, so an element that a
    kernel forgets to write shows up as NaN on a GPU as well as in interpret mode.
    The flag is read at trace time: use it around un-jitted calls or fresh traces.
    """
    with _flag("poison", enabled):
        yield


def _poison_value(dtype: Any) -> Any:
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.nan
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).min
    return 0


def pallas_call(
    kernel: Callable[..., None],
    *,
    out_shape: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...],
    in_specs: Sequence[pl.BlockSpec],
    out_specs: Sequence[pl.BlockSpec],
    num_warps: int,
    num_stages: int,
    interpret: bool | None,
    name: str,
    out_init: Sequence[Any] | None = None,
) -> Callable[..., tuple[jax.Array, ...]]:
    """``pl.pallas_call`` on the Triton backend, with optional output poisoning. ``out_init``: per
    output, an array it starts from (the kernel writes only some of its blocks or slots; the call
    takes it as an extra trailing argument, aliased to the output), or None."""
    out_shape = tuple(out_shape)
    out_specs = tuple(out_specs)
    in_specs = tuple(in_specs)
    init = tuple(out_init) if out_init is not None else (None,) * len(out_shape)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    interp = resolve_interpret(interpret)
    poison = getattr(_state, "poison", False)
    # outputs that start from given contents, or from the poison value, are aliased inputs
    aliased = [i for i, x in enumerate(init) if x is not None or poison]
    if not aliased:
        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            compiler_params=params,
            interpret=interp,
            name=name,
        )

    n_in = len(in_specs)

    def aliased_kernel(*refs: Any) -> None:
        # refs: inputs, the aliased initial outputs (unused: the outputs are the same buffers), outputs.
        kernel(*refs[:n_in], *refs[n_in + len(aliased):])

    call = pl.pallas_call(
        aliased_kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs + tuple(out_specs[i] for i in aliased),
        out_specs=out_specs,
        compiler_params=params,
        interpret=interp,
        name=name,
        input_output_aliases={n_in + j: i for j, i in enumerate(aliased)},
    )

    @functools.wraps(call)
    def run(*args: jax.Array) -> tuple[jax.Array, ...]:
        extra = [init[i] if init[i] is not None else
                 jnp.full(out_shape[i].shape, _poison_value(out_shape[i].dtype), out_shape[i].dtype) for i in aliased]
        return call(*args, *extra)

    return run


def whole_block(shape: Sequence[int]) -> pl.BlockSpec:
    """The whole array as every program's block (small inputs a kernel indexes itself: lists, tables)."""
    return pl.BlockSpec(tuple(shape), lambda *_, n=len(shape): (0,) * n)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def fma(a: jax.Array, b: Any, c: Any, *, interpret: bool) -> jax.Array:
    """``a * b + c`` in fp32 rounded once: one ``fma.rn.f32`` per element in a GPU kernel (inline
    PTX: XLA's Triton pipeline marks ``*`` and ``+`` ``.rn``, which ptxas never contracts), the
    two operations when interpreted (no PTX to run). ``b`` and ``c`` broadcast to ``a``'s shape."""
    if interpret:
        return a * b + c
    f32 = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), a.shape)  # noqa: E731
    (out,) = pltriton.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[f32(a), f32(b), f32(c)], constraints="=r,r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


# 1.5 * 2^23 as an int32 bit pattern and as a float: ``bitcast(x + MAGIC_BITS) - MAGIC`` is x as a float,
# exactly, for |x| < 2^22 (the float lies in [2^23, 2^24), where its ulp is 1).
MAGIC_BITS = 0x4B400000
MAGIC = 12582912.0


def exact_float(x: jax.Array) -> jax.Array:
    """int32 to fp32, exactly for ``|x| < 2^22`` (INT8 attention scores: ``127^2 * 128`` is about
    2^21): one integer add and one float subtract on the full-rate pipes instead of
    ``cvt.rn.f32.s32``, which Hopper runs at exp2's rate (16 per clock and SM), one per score."""
    return jax.lax.bitcast_convert_type(x + MAGIC_BITS, jnp.float32) - MAGIC


def tile_width(d: int) -> int:
    """A kernel tile's width for head dim ``d``: a power of two >= 16 (Triton's tiles are powers
    of two; :func:`load_tile` / :func:`store_tile` mask the columns past ``d``)."""
    return max(16, next_pow2(d))


def tile_mask(shape: tuple[int, ...], first, length: int, ragged: bool, width: int) -> jax.Array | None:
    """Which elements of a ``shape`` tile (sequence rows from ``first`` on axis 0, head-dim
    columns on the last axis) exist in an array of ``length`` rows (checked when ``ragged``) and
    ``width`` columns; None when all do."""
    mask = None
    if ragged:
        mask = first + jax.lax.broadcasted_iota(jnp.int32, shape, 0) < length
    if width != shape[-1]:
        cols = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) < width
        mask = cols if mask is None else mask & cols
    return mask


def load_tile(ref, idx, first, length: int, ragged: bool, width: int) -> jax.Array:
    """``ref[idx]``: a tile whose leading axis is sequence rows from ``first`` and last axis the
    head dim, from an array that is not padded to the tiles: rows at or past ``length``
    (``ragged``: the sequence is not a multiple of the tiles) and columns at or past ``width`` (a
    head dim that is not a power of two) are not read; they load as zero, as a zero-padded copy's
    would. (Interpret mode fills a block's rows and columns past the array with NaN, so a missing
    mask shows in the tests.)"""
    view = ref.at[idx]
    mask = tile_mask(view.shape, first, length, ragged, width)
    return ref[idx] if mask is None else pltriton.load(view, mask=mask, other=0)


def store_tile(ref, idx, value: jax.Array, first, length: int, ragged: bool, width: int) -> None:
    """``ref[idx] = value`` for an output tile of sequence rows from ``first``: only the rows before
    ``length`` and the columns before ``width`` exist in the (unpadded) output."""
    mask = tile_mask(value.shape, first, length, ragged, width)
    if mask is None:
        ref[idx] = value.astype(ref.dtype)
    else:
        pltriton.store(ref.at[idx], value.astype(ref.dtype), mask=mask)


def listed_loop(lo, hi, read: Callable[[Any], Any], body: Callable[[Any, Any, Any], Any], carry: Any) -> Any:
    """``for it in range(lo, hi): carry = body(it, read(it), carry)`` where ``read`` is a scalar
    load from a list (a key block id, a cache page) that tells which tile iteration ``it`` loads.

    Each iteration reads the *next* one's value and carries it, as FlexAttention's kernel does.
    Had the tile's own id been read in the iteration that loads the tile, Triton's software
    pipeline would spend one of its ``num_stages`` on that read (a three-stage loop then kept one
    tile's copies in flight instead of two; ``aot.loop_waits`` shows it). ``read(hi)`` is called
    and its value dropped: it must not read outside the list (clamp the index)."""
    def step(it, c):
        c, value = c
        return body(it, value, c), read(it + 1)

    return jax.lax.fori_loop(lo, hi, step, (carry, read(lo)))[0]


def unpadded_width(d: int) -> bool:
    """Whether a kernel that pads head dims (HaloNet's) takes ``d`` as it is (a power of two >= 16):
    no padded copy, so an input can be read in place (packed layouts). The flash, decode and Sage
    kernels take any head dim as it is (:func:`load_tile`)."""
    return d >= 16 and d == next_pow2(d)


def table_key(head_dim: int, dtype: Any, min_dim: int = 16) -> tuple[int, int]:
    """A config table's key: the head dim padded to a power of two (at least ``min_dim``) and the
    bytes per element (4, or 2 for the two-byte dtypes)."""
    return max(min_dim, next_pow2(head_dim)), 4 if jnp.dtype(dtype).itemsize >= 4 else 2


def table_entry(table: dict, head_dim: int, dtype: Any, what: str, min_dim: int = 16) -> Any:
    """``table[table_key(...)]``, or a ``ValueError`` naming the kernel, head dim and dtype."""
    try:
        return table[table_key(head_dim, dtype, min_dim)]
    except KeyError:
        raise ValueError(f"no {what} config for head_dim={head_dim}, dtype={jnp.dtype(dtype).name}") from None


def document_index(segment_ids: jax.Array) -> jax.Array:
    """int32 ``[B, N]``: each token's document, counted from 0 along the row (a document is a run of
    equal consecutive ids, so an id may come back in a later document)."""
    new = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                            jnp.cumsum(new, axis=1, dtype=jnp.int32)], axis=1)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    """Pads ``x`` along ``axis`` at the end up to ``size`` (no-op if already there)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def merge_partials(o_parts: jax.Array, lse_parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact merge over axis 1 of partial attentions, each normalised over its own keys:
    ``o = sum_s exp(lse_s - lse) o_s`` with ``lse = logsumexp_s lse_s``; a row whose parts are
    all empty (``lse_s = -inf``) gives zeros and ``-inf``."""
    m = jnp.max(lse_parts, axis=1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_parts - m_safe)  # exp(-inf) = 0 for empty chunks
    total = jnp.sum(w, axis=1)
    out = jnp.sum(w[..., None] * o_parts, axis=1) / jnp.where(total == 0, 1.0, total)[..., None]
    lse = jnp.where(total == 0, -jnp.inf, m_safe[:, 0] + jnp.log(jnp.where(total == 0, 1.0, total)))
    return out, lse


def with_sinks(out: jax.Array, lse: jax.Array, sinks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention normalised over its keys (fp32 ``out [..., H, D]``, ``lse [..., H]``) -> with a value-less
    logit per head ``sinks [H]`` joining the softmax (attention sinks): ``lse' = logaddexp(lse, sink)``,
    ``out' = exp(lse - lse') out`` (a row with no key: zeros, ``lse' = sink``). The sink as one more
    partial of :func:`merge_partials`, for paths that merge partials anyway (split-KV decode, the ring)."""
    sinks = sinks.astype(jnp.float32)
    total = jnp.logaddexp(lse, sinks)
    return out * jnp.exp(lse - total)[..., None], total
