"""``jaxattn.lightning_attention``: causal linear attention with per-head decay
(Lightning Attention-2, the TransNormerLLM token mixer), and its decode step."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import lightning as _kernel
from jaxattn.pallas._common import targets_gpu as _targets_gpu
from jaxattn.reference.lightning import lightning_reference


def _check_slope(slope: jax.Array, heads: int) -> jax.Array:
    """The validated slope; a traced one (values unknown here) has its negative or non-finite
    entries made NaN, so a bad slope under ``jit`` shows as NaN outputs, not as a silently
    growing "decay"."""
    _checks.check_array("slope", slope, "[heads]")
    if tuple(slope.shape) != (heads,):
        raise ValueError(f"slope must have shape [heads] = ({heads},), got {tuple(slope.shape)}")
    if not jnp.issubdtype(slope.dtype, jnp.floating):
        raise ValueError(f"slope must be floating, got {jnp.dtype(slope.dtype).name}")
    try:
        s = np.asarray(slope, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return jnp.where((slope >= 0) & jnp.isfinite(slope), slope, jnp.nan)
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise ValueError(f"slope must be finite and >= 0 (decay = exp(-slope) <= 1), got {s.tolist()}")
    return slope


def _check_state(state: jax.Array, shape: tuple[int, ...], name: str) -> None:
    _checks.check_array(name, state, "[batch, heads, head_dim, v_head_dim]")
    if tuple(state.shape) != shape:
        raise ValueError(f"{name} must have shape [batch, heads, head_dim, v_head_dim] = {shape}, "
                         f"got {tuple(state.shape)}")
    if not jnp.issubdtype(state.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating, got {jnp.dtype(state.dtype).name}")


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slope: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    return_state: bool = False,
    impl: Literal["auto", "pallas", "xla"] = "auto",
    sequence_axis: str | None = None,
    segment_ids: jax.Array | None = None,
    cu_seqlens: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``o_i = sum_{j<=i} exp(-slope (i-j)) (q_i . k_j) v_j`` per head.

    No softmax, no 1/sqrt(d) scaling and no normaliser (as the reference code).

    Args:
      q, k: ``[batch, seq, heads, head_dim]``.
      v: ``[batch, seq, heads, v_head_dim]`` (may differ from head_dim).
      slope: ``[heads]``, the decay rate s >= 0; the decay is ``exp(-s)``, s = 0 is plain
        causal linear attention. No gradient flows to it.
      initial_state: ``[batch, heads, head_dim, v_head_dim]``, the state before the first
        token (chunked prefill, sequence parallelism); zeros if None. Differentiable.
      return_state: also return the final state (fp32), differentiable.
      impl: ``"pallas"`` (Lightning Attention-2 kernel; interpret mode without a GPU),
        ``"xla"`` (dense reference), ``"auto"`` (kernel on GPU).
      sequence_axis: inside ``shard_map``, the mesh axis over which the sequence is split into
        contiguous shards (in axis-index order): each device's inputs are its shard, the result is
        its shard of the exact global output, and the returned state is the global final state
        (:mod:`jaxattn.ops.lightning_sp`; :func:`jaxattn.lightning_attention_sp` does the
        ``shard_map`` for global arrays). ``initial_state`` is then the global one.
      segment_ids: int ``[batch, seq]`` for packed sequences (several documents in one row, as
        flash-linear-attention's ``cu_seqlens``): a document is a run of equal consecutive ids, and
        each token sums only over earlier tokens of its own document (the state restarts at every
        document's first token). ``initial_state`` feeds the first document of each row; the
        returned state is the last document's. With ``sequence_axis``: this shard's ids (documents
        may span shards).
      cu_seqlens: int ``[N + 1]``: ``N`` documents packed in one row ``[1, total, ...]`` (flash-linear-attention's
        varlen form, a serving engine's packed prefill), each run from its own ``initial_state[i]`` (``[N, heads,
        head_dim, v_head_dim]``, zeros if None), each with its own final state (``[N, ...]``). Lightning attention
        is gated linear attention with the constant log decay ``-slope``, so this runs
        :func:`jaxattn.gated_linear_attention`'s varlen path (its kernels where the head dims are powers of two
        from 16 to 256, else XLA's chunked form).

    Returns ``out [batch, seq, heads, v_head_dim]`` in q's dtype (and the final state).
    """
    _checks.check_impl(impl)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 4, "[batch, seq, heads, head_dim]")
    _checks.check_float_dtype("q", q)
    _checks.check_same_dtype(q=q, k=k, v=v)
    b, n, h, d = q.shape
    for name, x in (("k", k), ("v", v)):
        _checks.check_dim(name, x, 0, b, "batch size", "q")
        _checks.check_dim(name, x, 1, n, "sequence length", "q")
        _checks.check_dim(name, x, 2, h, "heads", "q")
    _checks.check_dim("k", k, 3, d, "head dim", "q")
    e = v.shape[-1]
    if n == 0:
        raise ValueError("q needs at least one position, got seq = 0")
    if max(d, e) > _kernel.MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {_kernel.MAX_HEAD_DIM}, got head_dim={d}, v_head_dim={e}")
    slope = _check_slope(slope, h)
    if cu_seqlens is not None:  # (gated linear attention with the constant decay -slope: its varlen path)
        from jaxattn.ops.gated_linear import gated_linear_attention

        g = jnp.broadcast_to(-lax.stop_gradient(slope).astype(jnp.float32), (b, n, h))  # (no gradient to the slopes)
        return gated_linear_attention(q, k, v, g, scale=1.0, initial_state=initial_state, return_state=return_state,
                                      segment_ids=segment_ids, cu_seqlens=cu_seqlens, impl=impl,
                                      sequence_axis=sequence_axis)
    if initial_state is not None:
        _check_state(initial_state, (b, h, d, e), "initial_state")
    if segment_ids is not None:
        _checks.check_rank("segment_ids", segment_ids, 2, "[batch, seq]")
        if tuple(segment_ids.shape) != (b, n):
            raise ValueError(f"segment_ids must have shape [batch, seq] = {(b, n)}, got {tuple(segment_ids.shape)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must have an integer dtype, got {jnp.dtype(segment_ids.dtype).name}")

    local_state = None if sequence_axis is not None else initial_state
    if (impl == "pallas" or (impl == "auto" and _targets_gpu())) and not _checks.empty(q, k, v):
        # (without return_state the final state's cotangent is zero: the backward skips its terms)
        def kernel(q, k, v, slope, state=None, segment_ids=None, batch_offset=None):
            return _kernel.lightning_attention_kernel(q, k, v, slope, state,
                                                      final_state=return_state or sequence_axis is not None,
                                                      segment_ids=segment_ids)

        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        out, state = _spmd.per_batch_shard(kernel, dict(q=q, k=k, v=v, state=local_state, segment_ids=segment_ids),
                                           dict(slope=slope))
    else:
        out, state = lightning_reference(q, k, v, lax.stop_gradient(slope), local_state, segment_ids)
        out = out.astype(q.dtype)
    if sequence_axis is not None:
        from jaxattn.ops.lightning_sp import sequence_parallel_combine

        out, state = sequence_parallel_combine(q, out, state, slope, sequence_axis, initial_state, segment_ids)
    return (out, state) if return_state else out


def lightning_attention_step(
    q: jax.Array, k: jax.Array, v: jax.Array, slope: jax.Array, state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One decode step, O(1) in the sequence length: ``state' = exp(-slope) state + k^T v``,
    ``o = q state'``.

    q, k ``[batch, heads, head_dim]``; v ``[batch, heads, v_head_dim]``; state
    ``[batch, heads, head_dim, v_head_dim]`` (fp32). Returns ``(o [batch, heads, v_head_dim]``
    in q's dtype, ``state')``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 3, "[batch, heads, head_dim]")
    b, h, d = q.shape
    _checks.check_dim("k", k, 0, b, "batch size", "q")
    _checks.check_dim("k", k, 1, h, "heads", "q")
    _checks.check_dim("k", k, 2, d, "head dim", "q")
    _checks.check_dim("v", v, 0, b, "batch size", "q")
    _checks.check_dim("v", v, 1, h, "heads", "q")
    slope = _check_slope(slope, h)
    _check_state(state, (b, h, d, v.shape[-1]), "state")
    lam = jnp.exp(-slope.astype(jnp.float32))[None, :, None, None]
    hp = lax.Precision.HIGHEST
    state = lam * state.astype(jnp.float32) + jnp.einsum(
        "bhd,bhe->bhde", k.astype(jnp.float32), v.astype(jnp.float32), precision=hp)
    out = jnp.einsum("bhd,bhde->bhe", q.astype(jnp.float32), state, precision=hp)
    return out.astype(q.dtype), state
