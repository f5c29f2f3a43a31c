"""``jaxattn.attention``: softmax attention with flash kernels on GPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from typing import Literal

import jax
import jax.numpy as jnp

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import _dropout
from jaxattn.pallas import flash as _flash
from jaxattn.pallas._common import targets_gpu as _targets_gpu
from jaxattn.reference.attention import attention_reference

SegmentIds = jax.Array | tuple[jax.Array, jax.Array]


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: SegmentIds | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    score_mod: Callable | None = None,
    score_mod_tables: Sequence[jax.Array] = (),
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_broadcast: bool = False,
    dropout_offset: tuple = (0, 0, 0),
    position_offset: tuple | None = None,
    sinks: jax.Array | None = None,
    impl: Literal["auto", "pallas", "mosaic", "xla"] = "auto",
    return_lse: bool = False,
    _packed_qkv: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product softmax attention.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (GQA/MQA).
      v: ``[batch, kv_len, kv_heads, v_head_dim]``.
      causal: key j is visible to query i iff ``j <= i + kv_len - q_len``
        (aligned to the bottom-right, as FlashAttention >= 2.1; ``jax.nn.dot_product_attention``'s
        ``is_causal`` is top-left, the same when ``q_len == kv_len``: :func:`jaxattn.dot_product_attention`
        keeps JAX's).
      segment_ids: int ``[batch, seq]`` when ``q_len == kv_len``, or a pair
        ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])``;
        queries see only keys of the same segment (packed sequences).
      mask: broadcastable to ``[batch, heads, q_len, kv_len]``; bool keeps True
        entries, floating is added to the logits (a learned bias: differentiable on both paths;
        the kernel's dq pass then also writes the fp32 ``[batch, heads, q_len, kv_len]`` logits'
        cotangent, summed over the mask's broadcast dims, only when the mask is differentiated).
      scale: logit scale, default ``1/sqrt(head_dim)``.
      local_window_size: ``(left, right)`` or one int for both: query i, at position
        ``p = i + kv_len - q_len``, sees keys ``p - left .. p + right`` (None: that side
        unbounded; with ``causal`` the right side is 0). The kernel skips key blocks outside
        the window (sliding-window attention costs O(window), not O(kv_len)).
      logits_soft_cap: c > 0 caps the scaled logits x as ``c * tanh(x / c)`` (Gemma 2), before
        the additive mask.
      alibi_slopes: ``[heads]`` or ``[batch, heads]`` (ALiBi): ``slope * |p - j|`` is subtracted
        from the (capped) logits of the query at position p and key j, computed in the kernel
        from positions (no bias tensor), as flash-attn's ``alibi_slopes``. No gradient.
      score_mod: FlexAttention's ``score_mod``: ``(x, batch, head, q_idx, kv_idx) -> x'`` maps each
        scaled (and soft-capped) logit of query row ``q_idx`` and key ``kv_idx`` (int32 index arrays
        that broadcast against ``x``) before ALiBi, ``mask`` and the masking; elementwise, written with
        jnp ops and closing over no arrays (arrays it reads come as ``score_mod_tables``). The kernels
        trace it inline and the backward applies its derivative (``jax.jvp`` in the kernel), so relative
        position biases, soft caps or distance penalties cost no ``[q_len, kv_len]`` tensor. Compared
        by identity under ``jit``: define it once.
      score_mod_tables: arrays (rank >= 1; floating or integer) passed to ``score_mod`` after
        ``kv_idx``, which it reads by indexing every axis with the index arguments, e.g. a learned
        relative-position bias ``table[head, q_idx - kv_idx + kv_len - 1]`` (FlexAttention's captured
        tensors). Indices wrap and clamp as ``jnp`` indexing does (an out-of-range read's gradient goes
        to the entry read; ``impl="xla"``, being jnp, drops it: keep reads in range where the two paths
        must agree). Floating tables are differentiable:
        the dq kernel adds each score's contribution into an fp32 gradient (atomic adds on a GPU, so
        the sum's order, and its last bits, vary between runs).
      dropout_rate: attention dropout (training): each softmax weight is zeroed with this
        probability and the kept ones scaled by ``1 / (1 - rate)`` (flash-attn's ``dropout_p``).
        The kernels regenerate the mask from a counter-based hash of (seed from ``dropout_rng``,
        batch, head, query, key) instead of storing it; both paths use the same mask.
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      dropout_broadcast: one mask shared by every batch row and head (flax's ``broadcast_dropout``).
      dropout_offset: ``(batch, query row, key)``, ints or int32 scalars: this call's inputs are
        the block at that offset of a larger problem, and draw that block of its mask (how
        :func:`jaxattn.ring_attention` shards reproduce the single-device mask).
      position_offset: ``(q_offset, kv_offset)``, ints or int32 scalars (traced ones too: one compiled
        program for every offset): q and k are blocks of a larger problem that start at these
        positions. Query i sits at position ``q_offset + i``, key j at ``kv_offset + j``; ``causal``,
        ``local_window_size`` and ALiBi compare those positions (replacing the bottom-right
        alignment: ``(kv_len - q_len, 0)`` reproduces it) and ``score_mod`` receives them as ``q_idx``
        / ``kv_idx``. How :func:`jaxattn.ring_attention` 's hops see their place in the whole sequence.
      sinks: ``[heads]`` floating: attention sinks as gpt-oss's, a learned logit per query head that
        joins every row's softmax and carries no value, so a head can put weight on "nothing" (the
        weights over the keys sum to ``1 - p_sink``). Differentiable; the kernel starts each row's
        online softmax from it (no extra pass) and the lse includes it. A row with no visible key
        returns zeros with ``lse = sink``.
      impl: ``"pallas"`` (the flash kernel; interpret mode without a GPU),
        ``"xla"`` (the dense reference), or ``"auto"`` (the kernel on GPU when the
        head dim is in 32..256, else XLA). ``"mosaic"``: the forward runs the FlashAttention-3
        kernel on Pallas's Mosaic GPU backend (Hopper; warp-specialized, TMA, WGMMA, ping-pong
        softmax; Mosaic GPU's interpret mode without a GPU), the backward the flash kernels;
        plain causal or non-causal attention with GQA and any lengths, head dims 64 or 128,
        bf16/fp16 (other features raise a ``ValueError``).
      return_lse: also return the log-sum-exp ``[batch, q_len, heads]`` (fp32).
      _packed_qkv: internal (:func:`attention_qkvpacked`): the ``[B, S, 3, H, D]`` array q, k, v
        are the slots of; the Triton kernels then read it in place.

    A query row with no visible key (every key masked by ``causal``,
    ``segment_ids``, a bool ``mask`` or ``-inf`` bias) returns zeros, with
    ``lse = -inf`` (the sink with ``sinks``), never NaN.

    Returns:
      ``out [batch, q_len, heads, v_head_dim]`` in the dtype of ``q``, and ``lse``
      if ``return_lse``.
    """
    _checks.check_impl(impl, _checks.MOSAIC_IMPLS)
    causal = _checks.check_flag("causal", causal)
    batch, q_len, kv_len, hq, hkv, d = _checks.check_qkv(q, k, v, (*_checks.FLOAT_DTYPES, jnp.float64))

    qseg = kvseg = None
    if segment_ids is not None:
        qseg, kvseg = _segment_pair(segment_ids, batch, q_len, kv_len)
    if mask is not None:
        _checks.check_array("mask", mask, "[batch, heads, q_len, kv_len]")
        if mask.dtype != jnp.bool_:
            _checks.check_float_dtype("mask", mask, (*_checks.FLOAT_DTYPES, jnp.bool_))
        shape = _checks.check_broadcastable(
            "mask", mask, (batch, hq, q_len, kv_len), "[batch, heads, q_len, kv_len]")
        mask = mask.reshape(shape)
    scale = _checks.check_scale(scale)
    extra = dict(local_window_size=_checks.check_window(local_window_size),
                 logits_soft_cap=_checks.check_soft_cap(logits_soft_cap))
    extra["score_mod"], extra["score_mod_tables"] = _checks.check_score_mod(score_mod, score_mod_tables)
    if alibi_slopes is not None:
        extra["alibi_slopes"] = _checks.check_alibi(alibi_slopes, batch, hq)
    if _checks.check_dropout(dropout_rate, dropout_rng):
        extra.update(dropout_rate=float(dropout_rate), dropout_seed=_dropout.seed_from_key(dropout_rng),
                     dropout_shared=bool(dropout_broadcast),
                     dropout_offset=_checks.check_dropout_offset(dropout_offset))
    if (position_offset := _checks.check_position_offset(position_offset)) is not None:
        extra["position_offset"] = position_offset
    if (sinks := _checks.check_sinks(sinks, hq)) is not None:
        extra["sinks"] = sinks

    lo, hi = _flash.SUPPORTED_HEAD_DIMS
    kernel_ok = lo <= max(d, v.shape[-1]) <= hi and jnp.dtype(q.dtype) in _checks.FLOAT_DTYPES
    if impl in ("pallas", "mosaic"):
        if not lo <= d <= hi or not lo <= v.shape[-1] <= hi:
            raise ValueError(
                f"impl='pallas' supports head dims {lo}..{hi}; got q/k head_dim={d}, "
                f"v head_dim={v.shape[-1]}")
        _checks.check_float_dtype("q", q)
    use_kernel = impl in ("pallas", "mosaic") or (impl == "auto" and kernel_ok and _targets_gpu())
    use_kernel = use_kernel and not _checks.empty(q, k, v)  # an empty batch: XLA returns it

    if use_kernel:
        mosaic = impl == "mosaic" or (impl == "auto" and _flash.mosaic_auto(
            q, k, v, causal, mask, qseg, extra["local_window_size"], extra["logits_soft_cap"],
            extra.get("alibi_slopes"), extra.get("dropout_rate", 0.0), extra["score_mod"], position_offset, sinks))
        packed = _packed_qkv is not None and not mosaic

        def flash(q=None, k=None, v=None, qkv=None, mask=None, qseg=None, kvseg=None, batch_offset=None, **arrays):
            kw = {**extra, **arrays}
            if batch_offset is not None and "dropout_offset" in kw:  # (a batch shard: its rows' global masks)
                b0, r0, c0 = kw["dropout_offset"]
                kw["dropout_offset"] = (b0 + batch_offset, r0, c0)
            return _flash.flash_attention(
                *((qkv, None, None) if qkv is not None else (q, k, v)), causal=causal, scale=scale, bias=mask,
                q_segment_ids=qseg, kv_segment_ids=kvseg, backend="mosaic" if mosaic else "triton", **kw)

        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        arrays = {name: _spmd.as_arrays(x) for name, x in extra.items() if _spmd.has_arrays(x)}
        batched = {**({"qkv": _packed_qkv} if packed else {"q": q, "k": k, "v": v}), "qseg": qseg, "kvseg": kvseg}
        if arrays.get("alibi_slopes") is not None and arrays["alibi_slopes"].ndim == 2:  # [batch, heads]
            batched["alibi_slopes"] = arrays.pop("alibi_slopes")
        (batched if mask is not None and mask.shape[0] == batch else arrays)["mask"] = mask
        out, lse = _spmd.per_batch_shard(flash, batched, arrays)
    else:
        out, lse = attention_reference(
            q, k, v, causal=causal, scale=scale, mask=mask,
            q_segment_ids=qseg, kv_segment_ids=kvseg, **extra)
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def attention_qkvpacked(qkv: jax.Array, **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`attention` (self-attention; same keyword arguments) on q, k, v packed as one
    ``[batch, seq, 3, heads, head_dim]`` array, as a fused qkv projection writes it (timm's
    ``qkv(x).reshape(B, N, 3, heads, head_dim)``; flash-attn's ``qkvpacked`` layout). On the Triton
    kernels with a power-of-two head dim the kernels read the three slots in place and the
    backward writes the packed gradient whole: no slices of q, k, v and no concatenation of their
    gradients go through memory. Returns ``[batch, seq, heads, head_dim]`` (and the lse)."""
    _checks.check_rank("qkv", qkv, 5, "[batch, seq, 3, heads, head_dim]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [batch, seq, 3, heads, head_dim]: axis 2 of size 3, got {tuple(qkv.shape)}")
    if "_packed_qkv" in kwargs:
        raise TypeError("attention_qkvpacked() got an unexpected keyword argument '_packed_qkv'")
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **kwargs, _packed_qkv=qkv)


def _segment_pair(segment_ids: SegmentIds, batch: int, q_len: int, kv_len: int):
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be an array [batch, seq] or a pair "
                             f"(q_segment_ids, kv_segment_ids); got {len(segment_ids)} items")
        qseg, kvseg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"segment_ids as one array needs q_len == kv_len (got {q_len} and {kv_len}); "
                "pass a pair (q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])")
        qseg = kvseg = segment_ids
    for name, x, n in (("q_segment_ids", qseg, q_len), ("kv_segment_ids", kvseg, kv_len)):
        _checks.check_rank(name, x, 2, f"[batch, {'q_len' if n == q_len else 'kv_len'}]")
        if x.shape != (batch, n):
            raise ValueError(f"{name} must have shape [batch, len] = {(batch, n)}, got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must have an integer dtype, got {jnp.dtype(x.dtype).name}")
    return qseg, kvseg


def varlen_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens_q: jax.Array,
    cu_seqlens_k: jax.Array | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    logits_soft_cap: float | None = None,
    alibi_slopes: jax.Array | None = None,
    score_mod: Callable | None = None,
    score_mod_tables: Sequence[jax.Array] = (),
    sinks: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    impl: Literal["auto", "pallas", "xla"] = "auto",
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention over sequences packed without padding (flash-attn's ``*_varlen_func`` layout).

    Args:
      q: ``[total_q, heads, head_dim]``; k, v: ``[total_k, kv_heads, head_dim | v_head_dim]``.
      cu_seqlens_q: int ``[n + 1]``: sequence ``i`` holds query rows ``cu[i] .. cu[i+1]``
        (``cu[0] = 0``, non-decreasing, ``cu[n] = total_q``).
      cu_seqlens_k: the same for keys; None: the queries' (self-attention). ``causal`` needs None.
      causal, scale, local_window_size, logits_soft_cap, alibi_slopes, sinks, dropout_rate, dropout_rng,
        impl, return_lse: as :func:`attention`, within each sequence (positions count from its
        first token; the dropout mask is indexed by packed rows).
      score_mod, score_mod_tables: as :func:`attention`, with ``batch = 0`` and ``q_idx`` /
        ``kv_idx`` the packed row indices (as FlexAttention's over a packed batch): their difference
        is the relative position within a sequence (self-attention); a per-token table (e.g. each
        row's sequence start, ``cu_seqlens_q`` expanded) gives positions from a sequence's first token.

    Runs :func:`attention` on one packed batch row with segment ids, so the kernels visit only
    blocks inside each sequence. Returns ``out [total_q, heads, v_head_dim]`` (and the lse
    ``[total_q, heads]``); rows past ``cu_seqlens_q[n]`` attend to nothing and return zeros.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 3, "[total_tokens, heads, head_dim]")
    if causal and cu_seqlens_k is not None:
        raise ValueError("causal varlen attention is self-attention: pass cu_seqlens_k=None (the queries' "
                         "sequences); bottom-right alignment per sequence pair is not supported")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"without cu_seqlens_k, k must have q's total_q = {q.shape[0]} rows, got {k.shape[0]}")

    def segment_ids(cu, total, name):
        _checks.check_array(name, cu, "[n_seqs + 1]")
        if cu.ndim != 1 or cu.shape[0] < 2 or not jnp.issubdtype(cu.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array [n_seqs + 1] (0, l0, l0 + l1, ...), got "
                             f"{jnp.dtype(cu.dtype).name} {tuple(cu.shape)}")
        ids = jnp.searchsorted(cu.astype(jnp.int32), jnp.arange(total, dtype=jnp.int32), side="right") - 1
        return jnp.where(jnp.arange(total) < cu[-1], ids, -1 - (name == "cu_seqlens_k"))[None]  # tail: no match

    qs = segment_ids(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    ks = segment_ids(cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    res = attention(q[None], k[None], v[None], causal=causal, segment_ids=(qs, ks), scale=scale,
                    local_window_size=local_window_size, logits_soft_cap=logits_soft_cap,
                    alibi_slopes=alibi_slopes, score_mod=score_mod, score_mod_tables=score_mod_tables, sinks=sinks,
                    dropout_rate=dropout_rate, dropout_rng=dropout_rng, impl=impl, return_lse=return_lse)
    return (res[0][0], res[1][0]) if return_lse else res[0]
