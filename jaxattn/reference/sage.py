"""SageAttention2 oracles in plain jnp: every quantiser (bit-exact with the Pallas prologue),
a quantisation-emulating attention (same rounding, fp32 online softmax over the same key
blocks, e4m3-rounded P and V), and the paper's accuracy metrics.

Written from the math (``/work/shared/specs/attention-variants.md`` §2), not from the
kernel: groups are reshapes, the online softmax is a ``lax.scan`` over key blocks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)
INT8_MAX = 127.0
FP8_MAX = 448.0
P_OFFSET = 8.807
AMAX_EPS = 1e-7
FP8 = jnp.float8_e4m3fn


def _pad_seq(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, [(0, 0), (0, size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def quantize_int8_emulated(x: jax.Array, group: int, length: int | None = None,
                           mean: jax.Array | None = None, mean_rows: int | None = None):
    """``x [B, S, H, d]`` -> ``int8 [B, S, H, d]``, fp32 scales ``[B, H, S / group]``.

    ``x~ = x - mean[r // mean_rows]`` (fp32), rows ``>= length`` set to 0, then per group
    of ``group`` rows: ``a = max(amax, 1e-7)``, scale ``a / 127``, values
    ``round_half_away(x~ * (127 / a))`` (a multiply by the reciprocal, not a division).
    """
    b, s, h, d = x.shape
    length = s if length is None else length
    xf = x.astype(jnp.float32)
    if mean is not None:
        rows = mean_rows or s
        xf = xf - jnp.repeat(mean.astype(jnp.float32), rows, axis=1)[:, :s]
    xf = jnp.where((jnp.arange(s) < length)[None, :, None, None], xf, 0.0)
    xg = xf.reshape(b, s // group, group, h, d)
    amax = jnp.max(jnp.abs(xg), axis=(2, 4))  # [B, n, H]
    amax = jnp.maximum(amax, AMAX_EPS)
    y = xg * (INT8_MAX / amax)[:, :, None, :, None]
    # trunc(y + 0.5 sign(y)), written so that no compiler can fuse the multiply above and an add
    # into one FMA (XLA and Triton do on GPUs): the integer part, then a comparison.
    t = jnp.trunc(y)
    xi = (t + jnp.where(jnp.abs(y) >= jnp.abs(t) + 0.5, jnp.sign(y), 0.0)).astype(jnp.int8)
    return xi.reshape(b, s, h, d), jnp.transpose(amax / INT8_MAX, (0, 2, 1))


def quantize_v_fp8_emulated(v: jax.Array):
    """Per-channel e4m3: ``s_v = amax_t / 448`` (1 for an all-zero channel), ``v / s_v``
    computed as ``v * (448 / amax)``, rounded to nearest even. Returns ``e4m3 [B, Sk, Hkv, dv]``
    (token-major, unlike the kernel's transposed copy) and ``s_v [B, Hkv, dv]``."""
    vf = v.astype(jnp.float32)
    amax = jnp.max(jnp.abs(vf), axis=1)
    safe = jnp.where(amax > 0, amax, 1.0)
    inv = jnp.where(amax > 0, FP8_MAX / safe, 1.0)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (vf * inv[:, None]).astype(FP8), scale


def k_mean(k: jax.Array) -> jax.Array:
    return jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True)


def q_block_means(q: jax.Array, block: int) -> jax.Array:
    """Mean over the real rows of each query block: ``[B, ceil(S / block), H, d]``."""
    b, s, h, d = q.shape
    n = -(-s // block)
    qf = _pad_seq(q.astype(jnp.float32), n * block).reshape(b, n, block, h, d)
    counts = jnp.minimum(block, s - block * jnp.arange(n)).astype(jnp.float32)
    return jnp.sum(qf, axis=2) / counts[None, :, None, None]


class Emulated(NamedTuple):
    q8: jax.Array  # int8 [B, q_pad, Hq, d]
    q_scale: jax.Array  # [B, Hq, q_pad / q_group]
    k8: jax.Array  # int8 [B, kv_pad, Hkv, d]
    k_scale: jax.Array  # [B, Hkv, kv_pad / block_k]
    v8: jax.Array  # e4m3 [B, kv_pad, Hkv, dv]
    v_scale: jax.Array  # [B, Hkv, dv]
    k_mean: jax.Array | None
    q_mean: jax.Array | None
    correction: jax.Array | None  # [B, Hq, q_pad / block_q, kv_pad], base 2, incl. scale


@functools.partial(jax.jit, static_argnames=(
    "block_q", "block_k", "q_group", "scale", "smooth_q", "smooth_k"))
def quantize_emulated(q, k, v, *, block_q: int, block_k: int, q_group: int, scale: float,
                      smooth_q: bool = False, smooth_k: bool = True) -> Emulated:
    """The whole SageAttention2 prologue. Sequences are padded to the block sizes."""
    sq, sk = q.shape[1], k.shape[1]
    q_pad, kv_pad = -(-sq // block_q) * block_q, -(-sk // block_k) * block_k
    km = k_mean(k) if smooth_k else None
    qm = q_block_means(q, block_q) if smooth_q else None
    q8, qs = quantize_int8_emulated(_pad_seq(q, q_pad), q_group, sq, qm, block_q)
    k8, kscale = quantize_int8_emulated(_pad_seq(k, kv_pad), block_k, sk, km)
    v8, vs = quantize_v_fp8_emulated(v)
    corr = None
    if smooth_q:
        hq, hkv = q.shape[2], k.shape[2]
        ksm = k.astype(jnp.float32) - (km if smooth_k else 0.0)
        ksm = jnp.repeat(ksm, hq // hkv, axis=2)
        corr = jnp.einsum("bnhd,bkhd->bhnk", qm, ksm, precision=lax.Precision.HIGHEST) * (scale * LOG2E)
        corr = jnp.pad(corr, [(0, 0)] * 3 + [(0, kv_pad - sk)])
    return Emulated(q8, qs, k8, kscale, _pad_seq(v8, kv_pad), vs, km, qm, corr)


@functools.partial(jax.jit, static_argnames=(
    "causal", "scale", "block_q", "block_k", "q_group", "smooth_q", "smooth_k"))
def sage_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    q_group: int | None = None,
    smooth_q: bool = False,
    smooth_k: bool = True,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Quantisation-emulating SageAttention2 forward in fp32 (returns fp32 ``[B, Sq, Hq, Dv]``).

    Scores ``int8 Q . int8 K`` (exact, int32) times the scales, in base 2; online softmax
    over key blocks of ``block_k`` with the running max offset by 8.807 so P is in
    ``(0, 448]``; P rounded to e4m3; ``P8 . V8`` per block in fp32 times ``s_v``, added into
    the rescaled accumulator; ``O = acc / l`` with ``l`` the sum of unrounded P. Causal is
    bottom-right aligned; with segment ids (int ``[B, Sq]`` / ``[B, Sk]``) keys only within the
    query's segment; rows without a visible key give 0. ``sinks [Hq]`` (attention sinks): the online
    softmax starts at ``m = sink * log2(e) - 8.807`` with the sink's unrounded ``P = 2^8.807`` in ``l``.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qz = quantize_emulated(q, k, v, block_q=block_q, block_k=block_k, q_group=q_group or block_q,
                           scale=scale, smooth_q=smooth_q, smooth_k=smooth_k)
    g = hq // hkv
    q_pad, kv_pad = qz.q8.shape[1], qz.k8.shape[1]
    nkb = kv_pad // block_k
    q_rows = jnp.repeat(qz.q_scale, qz.q8.shape[1] // qz.q_scale.shape[-1], axis=-1) * (scale * LOG2E)
    q8 = jnp.transpose(qz.q8, (0, 2, 1, 3)).astype(jnp.int32)  # [B, Hq, Sq, d]
    k8 = jnp.repeat(jnp.transpose(qz.k8, (0, 2, 1, 3)), g, axis=1).astype(jnp.int32)
    v8 = jnp.repeat(jnp.transpose(qz.v8, (0, 2, 1, 3)), g, axis=1).astype(jnp.float32)
    k_sc = jnp.repeat(qz.k_scale, g, axis=1)  # [B, Hq, nkb]
    v_sc = jnp.repeat(qz.v_scale, g, axis=1)  # [B, Hq, dv]
    corr = qz.correction
    i_pos = jnp.arange(q_pad)
    seg = q_segment_ids is not None
    if seg:  # padded rows / keys: ids that match nothing
        qseg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, q_pad - sq)), constant_values=-1)
        kseg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, kv_pad - sk)), constant_values=-2)

    def step(carry, j):
        acc, m, l = carry
        kb = lax.dynamic_slice_in_dim(k8, j * block_k, block_k, axis=2)
        vb = lax.dynamic_slice_in_dim(v8, j * block_k, block_k, axis=2)
        s_int = jnp.einsum("bhqd,bhkd->bhqk", q8, kb, preferred_element_type=jnp.int32)
        s = s_int.astype(jnp.float32) * (q_rows * k_sc[:, :, j, None])[..., None]
        if corr is not None:
            cb = lax.dynamic_slice_in_dim(corr, j * block_k, block_k, axis=3)  # [B, Hq, nqb, bk]
            s = s + jnp.repeat(cb, block_q, axis=2)
        k_pos = j * block_k + jnp.arange(block_k)
        vis = jnp.broadcast_to(k_pos[None, :] < sk, (q_pad, block_k))
        if causal:
            vis = vis & (k_pos[None, :] <= i_pos[:, None] + (sk - sq))
        if seg:  # [B, 1, q_pad, block_k]
            kb_seg = lax.dynamic_slice_in_dim(kseg, j * block_k, block_k, axis=1)
            vis = vis[None, None] & (qseg[:, None, :, None] == kb_seg[:, None, None, :])
        s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1) - P_OFFSET)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[..., None])
        l = l * alpha + jnp.sum(p, axis=-1)
        p8 = p.astype(FP8).astype(jnp.float32)
        pv = jnp.einsum("bhqk,bhkd->bhqd", p8, vb, precision=lax.Precision.HIGHEST)
        acc = acc * alpha[..., None] + pv * v_sc[:, :, None, :]
        return (acc, m_new, l), None

    dv = v.shape[-1]
    init = (jnp.zeros((b, hq, q_pad, dv), jnp.float32), jnp.full((b, hq, q_pad), -jnp.inf, jnp.float32),
            jnp.zeros((b, hq, q_pad), jnp.float32))
    if sinks is not None:
        m0 = jnp.asarray(sinks, jnp.float32).reshape(1, hq, 1) * LOG2E - P_OFFSET
        init = (init[0], jnp.broadcast_to(m0, (b, hq, q_pad)), jnp.full((b, hq, q_pad), 2.0 ** P_OFFSET, jnp.float32))
    (acc, _, l), _ = lax.scan(step, init, jnp.arange(nkb))
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return jnp.transpose(out, (0, 2, 1, 3))[:, :sq]


def accuracy_metrics(out, ref) -> dict[str, float]:
    """SageAttention's metrics against a full-precision ``ref``: cosine similarity, relative
    L1 ``sum|o - r| / sum|r|`` and RMSE, all over the flattened tensors (in float64)."""
    o = np.asarray(jnp.asarray(out, jnp.float32), np.float64).ravel()
    r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64).ravel()
    cos = float(o @ r / max(np.linalg.norm(o) * np.linalg.norm(r), 1e-300))
    rel_l1 = float(np.abs(o - r).sum() / max(np.abs(r).sum(), 1e-300))
    rmse = float(np.sqrt(np.mean((o - r) ** 2)))
    return {"cos_sim": cos, "rel_l1": rel_l1, "rmse": rmse}
