"""``jaxattn.gated_delta_rule``: the gated delta rule (Gated DeltaNet; Qwen3-Next's and Kimi Linear's linear
attention), ``S_t = exp(g_t) (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ``, ``o_t = scale q_tᵀ S_t``
(:mod:`jaxattn.reference.gated_delta`), computed chunk by chunk.

Chunked form (the WY / UT representation of DeltaNet's chunkwise training, with the decay): in a chunk of ``C``
tokens with in-chunk cumulative log decays ``G`` (``gamma = exp(G)``, ``Gamma_ij = gamma_i / gamma_j`` for
``j <= i``) and the state ``S_0`` before it, the delta rule's corrected values ``u_t = beta_t (v_t - k_tᵀ
exp(g_t) S_{t-1})`` solve the unit lower-triangular system ``(I + A) U = beta V - beta gamma K S_0`` with ``A_tj
= beta_t Gamma_tj k_t . k_j`` (``j < t``), so ``U = T V - W S_0`` with ``T V`` and ``W = T gamma K`` independent of
the state; then ``O = gamma Q S_0 + (Q Kᵀ * Gamma) U`` and ``S_C = gamma_C S_0 + (gamma_C / gamma K)ᵀ U``. Only the
last two lines run chunk after chunk.

``impl="xla"`` inverts ``I + A`` by its finite Neumann series (:func:`unit_lower_inverse`, matmuls only) and
scans the chunks (differentiable by autodiff); ``impl="pallas"`` runs :mod:`jaxattn.pallas.gated_delta`'s forward kernel (one
program per batch row, head and value-column block, the state in registers, ``(I + A)^{-1}`` by repeated
squaring) and its backward kernel (a reverse scan from the chunks' stored states; with a decay per key channel,
:mod:`jaxattn.pallas.channel_decay`'s kernels too); ``"auto"``: the kernels on a GPU.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas import _common
from jaxattn.pallas.gated_delta import CHUNK, gated_delta_kernel, kernel_config, kernel_ok  # (CHUNK: the padding)

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "CHUNK"]

_HP = lax.Precision.HIGHEST


def _check(q, k, v, g, beta, initial_state):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 4, "[batch, seq, heads, head_dim]")
        _checks.check_float_dtype(name, x)
    _checks.check_same_dtype(q=q, k=k, v=v)
    b, n, hk, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} [batch, seq, heads, d_k], got {tuple(k.shape)}")
    if v.shape[:2] != (b, n) or v.shape[2] % hk:
        raise ValueError(f"v must be [batch, seq, heads, d_v] = [{b}, {n}, heads, d_v] with heads a multiple of q's "
                         f"{hk} (each q / k head shared by heads / {hk} value heads), got {tuple(v.shape)}")
    h = v.shape[2]
    for name, x in [("g", g)] + ([("beta", beta)] if beta is not None else []):  # (no beta: gated linear attention)
        shapes = ((b, n, h), (b, n, h, dk)) if name == "g" else ((b, n, h),)
        if tuple(jnp.shape(x)) not in shapes or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            want = f"[batch, seq, heads] = ({b}, {n}, {h})" + (
                f" or, per key channel (Kimi Delta Attention), [batch, seq, heads, d_k] = ({b}, {n}, {h}, {dk})"
                if name == "g" else "")
            raise ValueError(f"{name} must be a floating {want}, got {jnp.result_type(x).name} {tuple(jnp.shape(x))}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [batch, heads, d_k, d_v] = ({b}, {h}, {dk}, {v.shape[-1]}), got "
                         f"{tuple(initial_state.shape)}")


def _chunks(x: jax.Array, c: int) -> jax.Array:
    """``[B, N, H, ...] -> [B, H, N / c, c, ...]`` (N a multiple of c)."""
    b, n, h = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, n // c, c, h, *x.shape[3:]), 3, 1)


def segment_masks(segment_ids: jax.Array | None, c: int):
    """Packed documents' masks per chunk (``None`` without segment ids), ``[B, 1, N / c, ...]`` to broadcast over
    heads: ``(same [c, c]`` (tokens of one document), ``carry [c]`` (the token's document is the incoming
    state's), ``to_last [c]`` (the token's document is the chunk's last token's), ``through [1])`` (the incoming
    state reaches the chunk's end)). The first chunk's incoming state belongs to the row's first document."""
    if segment_ids is None:
        return None
    seg = segment_ids.astype(jnp.int32)
    prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)[:, ::c]  # [B, Nc]: the token before each chunk
    seg = seg.reshape(seg.shape[0], 1, -1, c)
    prev = prev[:, None, :, None]
    last = seg[..., -1:]
    return seg[..., :, None] == seg[..., None, :], seg == prev, seg == last, last == prev


def chunk_terms(k, v, g, beta, c: int, masks=None):
    """The state-independent terms per chunk, fp32 ``[B, H, N / c, ...]``: ``(G, T V, W, gamma_C / gamma K,
    gamma_C [..., 1])``, and ``Gamma`` (masked, including the diagonal); ``masks``: :func:`segment_masks`'s,
    the decays zero across a document start (``gamma`` is then returned masked too). ``beta`` None: gated linear
    attention (``T V = V``, ``W`` None)."""
    k, v = _chunks(k.astype(jnp.float32), c), _chunks(v.astype(jnp.float32), c)
    gcum = jnp.cumsum(_chunks(g.astype(jnp.float32), c), axis=-1)  # [B, H, Nc, c]
    incl = jnp.tril(jnp.ones((c, c), bool))
    same, carry, to_last, through = masks if masks is not None else (True,) * 4
    diff = gcum[..., :, None] - gcum[..., None, :]
    gam_ij = jnp.where(incl & same, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)
    gam = jnp.where(carry, jnp.exp(gcum), 0.0)
    k_dec = k * jnp.where(to_last, jnp.exp(gcum[..., -1:] - gcum), 0.0)[..., None]
    gam_c = jnp.where(through, jnp.exp(gcum[..., -1:]), 0.0)
    if beta is None:
        return gam, v, None, k_dec, gam_c, gam_ij
    beta = _chunks(beta.astype(jnp.float32), c)
    a = jnp.where(jnp.tril(incl, -1), beta[..., :, None] * jnp.einsum("...ik,...jk->...ij", k, k, precision=_HP) * gam_ij,
                  0.0)
    inv = unit_lower_inverse(a)
    tv = jnp.einsum("...ij,...jv->...iv", inv, beta[..., None] * v, precision=_HP)
    w = jnp.einsum("...ij,...jk->...ik", inv, (beta * gam)[..., None] * k, precision=_HP)
    return gam, tv, w, k_dec, gam_c, gam_ij


CHANNEL_CHUNK = 16  # the per-channel XLA path's chunk (its decays are [c, c, d_k] per chunk)


def channel_chunk_terms(q, k, v, g, beta, c: int = CHANNEL_CHUNK, masks=None):
    """:func:`chunk_terms` with a decay per key channel (Kimi Delta Attention's ``g [B, N, H, d_k]``): the decay
    between tokens ``j <= i`` is ``exp(G_i - G_j)`` per channel, inside the dot products (``A_ij = beta_i
    sum_c k_ic k_jc exp(G_ic - G_jc)``, the same for ``Q Kᵀ``), formed elementwise (exponents <= 0: no
    overflow however fast a channel decays). Returns ``(T V, W, Q gamma, K gamma_C / gamma, gamma_C [..., d_k],
    P)`` with ``P`` the decayed ``Q Kᵀ``; ``masks``: :func:`segment_masks`'s (packed documents); ``beta`` None:
    gated linear attention (``T V = V``, ``W`` None)."""
    q, k, v = (_chunks(x.astype(jnp.float32), c) for x in (q, k, v))
    gcum = jnp.cumsum(_chunks(g.astype(jnp.float32), c), axis=-2)  # [B, H, Nc, c, d_k]
    incl = jnp.tril(jnp.ones((c, c), bool))
    same, carry, to_last = (m[..., None] for m in masks[:3]) if masks is not None else (True,) * 3
    diff = gcum[..., :, None, :] - gcum[..., None, :, :]  # [B, H, Nc, c, c, d_k]
    dec = jnp.where(incl[..., None] & same, jnp.exp(jnp.where(incl[..., None], diff, 0.0)), 0.0)
    p = jnp.einsum("...ik,...jk,...ijk->...ij", q, k, dec, precision=_HP)
    gam = jnp.where(carry, jnp.exp(gcum), 0.0)
    k_dec = k * jnp.where(to_last, jnp.exp(gcum[..., -1:, :] - gcum), 0.0)
    g_last = jnp.exp(gcum[..., -1, :])
    g_last = g_last if masks is None else jnp.where(masks[3], g_last, 0.0)
    if beta is None:
        return v, None, q * gam, k_dec, g_last, p
    beta = _chunks(beta.astype(jnp.float32), c)
    a = jnp.where(jnp.tril(incl, -1), beta[..., :, None] * jnp.einsum("...ik,...jk,...ijk->...ij", k, k, dec,
                                                                      precision=_HP), 0.0)
    inv = unit_lower_inverse(a)
    tv = jnp.einsum("...ij,...jv->...iv", inv, beta[..., None] * v, precision=_HP)
    w = jnp.einsum("...ij,...jk->...ik", inv, beta[..., None] * k * gam, precision=_HP)
    return tv, w, q * gam, k_dec, g_last, p


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + A)^{-1}`` of strictly lower-triangular ``a [..., c, c]`` (``c`` a power of two): ``A`` is nilpotent,
    so the inverse is the finite Neumann series ``(I - A)(I + A^2)(I + A^4)...(I + A^(c/2))``, ``2 log2 c - 1``
    matmuls (the kernel's way too; XLA's batched triangular solves are slow off a GPU)."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    inv, p = eye - a, jnp.einsum("...ij,...jk->...ik", a, a, precision=_HP)
    for _ in range(int(a.shape[-1]).bit_length() - 2):
        inv = jnp.einsum("...ij,...jk->...ik", inv, eye + p, precision=_HP)
        p = jnp.einsum("...ij,...jk->...ik", p, p, precision=_HP)
    return inv


def _xla(q, k, v, g, beta, scale, initial_state, segment_ids=None, documents=None):
    """The chunked rule in XLA (``beta`` None: gated linear attention). ``documents``:
    :func:`jaxattn.ops.gated_delta_varlen.layout`'s chunk ranges (batch 1, documents on :func:`xla_chunk`'s
    boundaries), ``initial_state [documents, heads, d_k, d_v]``, and the final states the same (each document's
    after its last chunk; an empty one's, its initial state)."""
    q, k = (share_heads(x, v.shape[2]) for x in (q, k))
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    delta = beta is not None  # (None: gated linear attention)
    if g.ndim == 4:  # a decay per key channel (Kimi Delta Attention)
        tv, w, q_dec, k_dec, g_last, qk = channel_chunk_terms(q, k, v, g, beta,
                                                              masks=segment_masks(segment_ids, CHANNEL_CHUNK))
    else:
        gam, tv, w, k_dec, g_last, gam_ij = chunk_terms(k, v, g, beta, CHUNK, segment_masks(segment_ids, CHUNK))
        qc = _chunks(q.astype(jnp.float32), CHUNK)
        qk = jnp.einsum("...ik,...jk->...ij", qc, _chunks(k.astype(jnp.float32), CHUNK), precision=_HP) * gam_ij
        q_dec = qc * gam[..., None]
    if documents is not None:
        s0 = jnp.zeros((b, h, dk, dv), jnp.float32)
        docs_s0 = initial_state.astype(jnp.float32)  # [D, H, d_k, d_v]
    else:
        s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, xs):
        tv_c, qk_c, qd_c, kd_c, gl_c, *rest = xs
        w_c, rest = (rest[0], rest[1:]) if delta else (None, rest)
        if rest:  # a document's first chunk starts from its initial state
            s = jnp.where(rest[0] >= 0, docs_s0[jnp.maximum(rest[0], 0)][None], s)
        u = tv_c if w_c is None else tv_c - jnp.einsum("bhik,bhkv->bhiv", w_c, s, precision=_HP)
        o = jnp.einsum("bhik,bhkv->bhiv", qd_c, s, precision=_HP) + jnp.einsum("bhij,bhjv->bhiv", qk_c, u, precision=_HP)
        s = gl_c[..., :, None] * s + jnp.einsum("bhik,bhiv->bhkv", kd_c, u, precision=_HP)  # (gamma_C: [.., 1 or d_k])
        return s, (o, s) if rest else o

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (tv, qk, q_dec, k_dec, g_last, *((w,) if delta else ())))
    if documents is not None:  # each chunk's document where it is the document's first chunk, else -1
        begin, end = documents
        chunks, docs = tv.shape[2], begin.shape[0]
        held = end > begin
        xs = (*xs, jnp.full((chunks,), -1, jnp.int32).at[jnp.where(held, begin, chunks)].set(
            jnp.arange(docs, dtype=jnp.int32), mode="drop"))
    s, o = lax.scan(step, s0, xs)  # o [Nc, B, H, c, dv]
    if documents is not None:  # each document's state after its last chunk (an empty one's: its initial state)
        o, after = o
        s = jnp.where(held[:, None, None, None], after[jnp.maximum(end - 1, 0), 0], docs_s0)
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, n, dv).transpose(0, 2, 1, 3)
    return (scale * o).astype(q.dtype), s


def xla_chunk(g: jax.Array) -> int:
    """The XLA path's chunk for log decays ``g`` (per key channel: :data:`CHANNEL_CHUNK`)."""
    return CHANNEL_CHUNK if g.ndim == 4 else CHUNK


def share_heads(x: jax.Array, heads: int) -> jax.Array:
    """``x [..., h_k, d]`` with each head repeated for the ``heads / h_k`` value heads that share it (head ``i``
    of ``heads`` reads head ``i // (heads / h_k)``: Qwen3-Next's grouped value heads)."""
    return x if x.shape[-2] == heads else jnp.repeat(x, heads // x.shape[-2], axis=-2)


def _pad(x: jax.Array, n: int) -> jax.Array:
    return _common.pad_axis(x, 1, n)


def gated_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, *,
                     scale: float | None = None, initial_state: jax.Array | None = None, return_state: bool = False,
                     segment_ids: jax.Array | None = None, impl: Literal["auto", "pallas", "xla"] = "auto",
                     sequence_axis: str | None = None,
                     cu_seqlens: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The gated delta rule (module docstring) of ``q, k [batch, seq, h_k, d_k]``, ``v [batch, seq, heads,
    d_v]`` (``heads`` a multiple of ``h_k``: consecutive groups of ``heads / h_k`` value heads share a query and
    key head, as Qwen3-Next's; the kernel reads them in place), log decays ``g`` (``<= 0``) and write strengths
    ``beta`` (in ``[0, 1]``), both ``[batch, seq, heads]`` (or ``g [batch, seq, heads, d_k]``, a decay per key
    channel, ``S_t = (I - beta_t k_t k_tᵀ) diag(exp(g_t)) S_{t-1} + beta_t k_t v_tᵀ``: Kimi Delta Attention);
    ``scale`` on the queries (default ``d_k ** -0.5``); ``initial_state [batch, heads, d_k, d_v]``
    (zeros if None; with ``segment_ids``, the first document's). ``segment_ids`` int ``[batch, seq]``: packed
    documents, contiguous runs of one id, each starting from a zero state (the final state is the last
    document's). The keys are taken as they are: Gated DeltaNet L2-normalizes them (and the queries)
    first, which keeps ``I - beta k kᵀ`` a contraction. Returns ``o`` in q's dtype (and the final state, fp32).
    Any sequence length (padded inside to whole chunks of 64). ``sequence_axis``: inside a ``shard_map`` whose
    inputs are split along the sequence over that mesh axis, the whole sequence's rule
    (:mod:`jaxattn.ops.gated_delta_sp`; :func:`jaxattn.gated_delta_rule_sp` for global arrays).

    ``cu_seqlens`` int ``[N + 1]`` (flash-linear-attention's varlen form: a serving engine's packed prefill): the
    inputs hold ``N`` documents in one row ``[1, total, ...]``, document ``i`` its tokens ``cu_seqlens[i] ..
    cu_seqlens[i + 1]`` (empty ones allowed), each run from its own ``initial_state[i]`` (``[N, heads, d_k, d_v]``,
    zeros if None); the returned state is ``[N, heads, d_k, d_v]``, each document's final state
    (:mod:`jaxattn.ops.gated_delta_varlen`). Differentiable in the initial states too."""
    if beta is None:
        raise ValueError("beta must be a floating [batch, seq, heads] array (without the delta rule's beta: "
                         "jaxattn.gated_linear_attention)")
    return chunked_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state, return_state=return_state,
                        segment_ids=segment_ids, impl=impl, sequence_axis=sequence_axis, cu_seqlens=cu_seqlens)


def chunked_rule(q, k, v, g, beta, *, scale, initial_state, return_state, segment_ids, impl, sequence_axis,
                 cu_seqlens):
    """:func:`gated_delta_rule`, or with ``beta`` None gated linear attention (:mod:`jaxattn.ops.gated_linear`)."""
    _checks.check_impl(impl)
    _check(q, k, v, g, beta, initial_state if cu_seqlens is None else None)
    if cu_seqlens is not None:
        return _varlen(q, k, v, g, beta, cu_seqlens, scale, initial_state, return_state, impl,
                       segment_ids=segment_ids, sequence_axis=sequence_axis)
    if sequence_axis is not None:
        from jaxattn.ops.gated_delta_sp import sequence_parallel_gated_delta

        def op(q, k, v, g, beta, s0, seg):
            return chunked_rule(q, k, v, g, beta, scale=scale, initial_state=s0, return_state=True, segment_ids=seg,
                                impl=impl, sequence_axis=None, cu_seqlens=None)

        o, s = sequence_parallel_gated_delta(op, q, k, v, g, beta, sequence_axis, initial_state, segment_ids)
        return (o, s) if return_state else o
    n = q.shape[1]
    if segment_ids is not None:
        if tuple(jnp.shape(segment_ids)) != q.shape[:2] or not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(f"segment_ids must be an integer [batch, seq] = {tuple(q.shape[:2])}, got "
                             f"{jnp.result_type(segment_ids).name} {tuple(jnp.shape(segment_ids))}")
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.check_scale(scale)
    n_pad = _common.round_up(max(n, 1), CHUNK)  # (a multiple of CHANNEL_CHUNK too)
    # (padding: k = 0, beta = 0, g = 0 leave the state as it is)
    args = [None if x is None else _pad(x, n_pad) for x in (q, k, v, g, beta)]
    # (runs of equal ids, each a document, counted along the row: an id may come back in a later document)
    seg = None if segment_ids is None else jnp.pad(_common.document_index(segment_ids), ((0, 0), (0, n_pad - n)),
                                                   mode="edge")
    dk, dv = q.shape[-1], v.shape[-1]
    if impl == "pallas" and not kernel_ok(dk, dv):
        raise ValueError(f"impl='pallas' takes head dims that are powers of two from 16 to 256; got d_k={dk}, d_v={dv}")
    kernel = (impl == "pallas" or (impl == "auto" and _common.targets_gpu())) and kernel_ok(dk, dv)
    if kernel and not _checks.empty(q, v):
        # (under jaxattn.batch_parallel per device on its batch shard: XLA cannot split a kernel's custom call)
        o, s = _spmd.per_batch_shard(
            lambda q, k, v, g, beta=None, initial_state=None, segment_ids=None, batch_offset=None: gated_delta_kernel(
                q, k, v, g, beta, scale=float(scale), initial_state=initial_state, segment_ids=segment_ids,
                delta=beta is not None),
            dict(q=args[0], k=args[1], v=args[2], g=args[3], beta=args[4], initial_state=initial_state,
                 segment_ids=seg))
    else:
        o, s = _xla(*args, scale, initial_state, seg)
    o = o[:, :n]
    return (o, s) if return_state else o


def _varlen(q, k, v, g, beta, cu_seqlens, scale, initial_state, return_state, impl, *, segment_ids, sequence_axis):
    from jaxattn.ops import gated_delta_varlen as varlen

    for name, x in (("segment_ids", segment_ids), ("sequence_axis", sequence_axis)):
        if x is not None:
            raise ValueError(f"cu_seqlens and {name} are exclusive (cu_seqlens already marks the documents)")
    b, total = q.shape[:2]
    if b != 1:
        raise ValueError(f"with cu_seqlens, q, k, v, g (and beta) hold the documents packed in one row "
                         f"[1, total, ...]; got batch {b}")
    docs = varlen.check_cu_seqlens(cu_seqlens, total)
    h, dk, dv = v.shape[2], q.shape[-1], v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((docs, h, dk, dv), jnp.float32)
    elif tuple(jnp.shape(initial_state)) != (docs, h, dk, dv):
        raise ValueError(f"with cu_seqlens, initial_state must be [documents, heads, d_k, d_v] = ({docs}, {h}, {dk}, "
                         f"{dv}), got {tuple(jnp.shape(initial_state))}")
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.check_scale(scale)
    if impl == "pallas" and not kernel_ok(dk, dv):
        raise ValueError(f"impl='pallas' takes head dims that are powers of two from 16 to 256; got d_k={dk}, d_v={dv}")
    kernel = (impl == "pallas" or (impl == "auto" and _common.targets_gpu())) and kernel_ok(dk, dv)
    align = kernel_config(g, beta is not None).chunk if kernel else xla_chunk(g)
    positions, n, ranges = varlen.layout(cu_seqlens, total, align, CHUNK)
    args = [None if x is None else varlen.scatter(x, positions, n) for x in (q, k, v, g, beta)]
    if kernel:
        o, s = gated_delta_kernel(*args, scale=float(scale), initial_state=initial_state, documents=ranges,
                                  delta=beta is not None)
    else:
        o, s = _xla(*args, scale, initial_state, documents=ranges)
    o = o[:, positions]
    return (o, s) if return_state else o


def gated_delta_rule_step(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array, state: jax.Array,
                          *, scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step, O(1) in the sequence length: ``q, k [batch, heads, d_k]``, ``v [batch, heads, d_v]``,
    ``g, beta [batch, heads]`` (``g [batch, heads, d_k]``: per key channel), ``state [batch, heads, d_k, d_v]``
    (fp32) -> ``(o [batch, heads, d_v]`` in q's dtype, ``state')``; q and k may have fewer heads, as in
    :func:`gated_delta_rule`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = (share_heads(x, v.shape[1]) for x in (q, k))
    decay = jnp.exp(g.astype(jnp.float32))
    s = (decay[..., None] if decay.ndim == 3 else decay[..., None, None]) * state.astype(jnp.float32)
    kf = k.astype(jnp.float32)
    pred = jnp.einsum("bhk,bhkv->bhv", kf, s, precision=_HP)
    s = s + jnp.einsum("bhk,bhv->bhkv", kf, beta.astype(jnp.float32)[..., None] * (v.astype(jnp.float32) - pred),
                       precision=_HP)
    o = scale * jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32), s, precision=_HP)
    return o.astype(q.dtype), s
