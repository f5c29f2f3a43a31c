"""``jaxattn.sage_attention``: SageAttention2-style quantised attention for inference
(INT8 ``Q K^T``, FP8 e4m3 ``P V``), a drop-in for ``jaxattn.attention`` in forward passes."""

from __future__ import annotations

from typing import Literal

import jax

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import sage as _sage
from jaxattn.reference.sage import sage_reference

Granularity = Literal["block", "warp"]


def sage_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    qk_granularity: Granularity = "block",
    smooth_q: bool = False,
    smooth_k: bool = True,
    impl: Literal["auto", "pallas", "mosaic", "xla"] = "auto",
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Quantised scaled dot-product attention (SageAttention2, sm90 recipe). Forward only.

    Same layout and causal convention as :func:`jaxattn.attention`, so a layer can swap
    ``jaxattn.attention(q, k, v, causal=c, impl=i)`` for ``sage_attention(q, k, v, causal=c,
    impl=i)`` at inference.

    Args:
      q: ``[batch, q_len, heads, head_dim]``, float16 / bfloat16 (float32 accepted).
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (GQA/MQA).
      v: ``[batch, kv_len, kv_heads, v_head_dim]``. Head dims up to 128 (padded to 64/128).
      causal: key j visible to query i iff ``j <= i + kv_len - q_len``.
      scale: logit scale, default ``1/sqrt(head_dim)``.
      qk_granularity: INT8 scale groups for Q: ``"block"`` (one per 128-row query block) or
        ``"warp"`` (one per 16 rows, the rows a warp owns). K has one scale per key block.
      smooth_q: subtract each query block's mean before quantising and add the exact
        ``q_bar . K^T`` correction (SageAttention2 paper; off in its public code).
      smooth_k: subtract the per-channel token mean of K first (exact for softmax; what
        keeps outlier channels from eating the INT8 range). Default on.
      impl: ``"pallas"`` (the Triton kernel; interpret mode without a GPU), ``"xla"`` (the
        same quantised math in jnp, fp32), or ``"auto"`` (the kernel on a GPU with FP8
        dots, compute capability >= 8.9; else XLA). ``"mosaic"``: the same prologue, then the
        attention on the warp-specialized Mosaic GPU kernel (Hopper; ``s8`` and ``e4m3`` WGMMA,
        ping-pong consumers; Mosaic GPU's interpret mode without a GPU); K scale groups of 128
        keys (``smooth_q``: per 128-row query block, as ``"block"``).
      segment_ids: ``[batch, seq]`` (when ``q_len == kv_len``) or a pair ``(q_ids, kv_ids)``: packed
        sequences, as :func:`jaxattn.attention`'s (SageAttention's ``sageattn_varlen``; not with
        ``impl="mosaic"``). The quantisation groups stay the unpacked call's.
      sinks: ``[heads]``: attention sinks, as :func:`jaxattn.attention`'s (not with ``impl="mosaic"``).

    Returns:
      ``[batch, q_len, heads, v_head_dim]`` in the dtype of ``q``. A query row with no
      visible key is zero. Differentiating raises ``NotImplementedError`` (inference only).
    """
    _checks.check_impl(impl, _checks.MOSAIC_IMPLS)
    if qk_granularity not in _sage.GRANULARITIES:
        raise ValueError(f"qk_granularity must be one of {_sage.GRANULARITIES}, got {qk_granularity!r}")
    batch, q_len, kv_len, hq, hkv, d = _checks.check_qkv(q, k, v)
    for name, dim in (("q", d), ("v", v.shape[-1])):
        if not 1 <= dim <= _sage.MAX_HEAD_DIM:
            raise ValueError(f"{name} has head_dim {dim}; sage_attention supports 1..{_sage.MAX_HEAD_DIM}")
    scale = _checks.check_scale(scale)
    seg = {}
    if segment_ids is not None:
        from jaxattn.ops.attention import _segment_pair

        qs, ks = _segment_pair(segment_ids, batch, q_len, kv_len)
        seg = dict(q_segment_ids=qs, kv_segment_ids=ks)
    if sinks is not None:
        seg["sinks"] = _checks.check_sinks(sinks, hq)

    use_kernel = impl in ("pallas", "mosaic") or (impl == "auto" and _sage.fp8_supported())
    use_kernel = use_kernel and not _checks.empty(q, k, v)  # an empty batch: XLA returns it
    kw = dict(scale=scale, **{name: _checks.check_flag(name, flag) for name, flag in
                              (("causal", causal), ("smooth_q", smooth_q), ("smooth_k", smooth_k))})
    if use_kernel:
        def run(q, k, v, batch_offset=None, **arrays):
            return _sage.sage_attention_kernel(q, k, v, qk_granularity=qk_granularity,
                                               backend="mosaic" if impl == "mosaic" else "triton", **kw, **arrays)

        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        sinks = {"sinks": seg.pop("sinks")} if "sinks" in seg else {}
        return _spmd.per_batch_shard(run, dict(q=q, k=k, v=v, **seg), sinks)
    cfg = _sage.sage_config(max(d, v.shape[-1]))
    blocks = _sage.resolve_blocks(q_len, kv_len, cfg, qk_granularity)
    out = _xla(q, k, v, block_q=blocks.block_q, block_k=blocks.block_k, q_group=blocks.q_group, **kw, **seg)
    return out.astype(q.dtype)


_NO_GRAD = ("sage_attention is inference-only: its quantised forward has no gradient. Differentiate "
            "jaxattn.attention instead (or wrap the inputs in jax.lax.stop_gradient).")


def _xla(q, k, v, **kw):
    """The jnp emulation, with the same clear error as the kernel when differentiated."""
    q, k, v = (_checks.no_grad(x, _NO_GRAD) for x in (q, k, v))
    return sage_reference(q, k, v, **kw)
