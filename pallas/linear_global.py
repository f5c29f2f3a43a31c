"""L²ViT's linear global attention (non-causal, ReLU features) on Pallas's Triton backend.

Per (batch, head), with ``φ = ReLU``::

    S = Σ_j φ(k_j)ᵀ v_j  [d, e],   z = Σ_j φ(k_j)  [d]
    o_i = τ φ(q_i) S / max(φ(q_i) · z, clamp)

Four kernels on the ``[batch, seq, heads, dim]`` layout itself (no transposed copies):

* ``state``: grid (batch, head, split); each program sums ``φ(k)ᵀ v`` and ``φ(k)`` over its
  share of the key blocks (tensor-core products in the input dtype, fp32 sums); XLA adds the
  ``splits`` partial states (``[d, e]`` each).
* ``out``: one program per (batch, head, query block): ``φ(q) S``, the normaliser, the output.
* ``dq`` (backward): grid (batch, head, split) over query blocks: with ``r = τ / den`` and the
  clamp's active rows ``a``, ``dq = [r ⊙ (dO Sᵀ) + w zᵀ] ⊙ [q > 0]`` where
  ``w = -a r (dO · num) / den``; it also sums ``dS = φ(q)ᵀ (r ⊙ dO)``, ``dz = φ(q)ᵀ w`` and
  ``dτ = Σ (dO · num) / den`` over its blocks (partials added by XLA).
* ``dkv``: one program per (batch, head, key block): ``dk = (v dSᵀ + dz) ⊙ [k > 0]``,
  ``dv = φ(k) dS``.

The fp32 state (and ``dS``, and the per-block ``r ⊙ dO``) meets two-byte inputs on the tensor
cores as a scaled hi + lo pair in the input dtype (``m ≈ (hi + lo) · amax``, ~16 significant
bits: about fp32's accuracy for the output, where a plain cast would round the state to the
input's 8 or 11 bits); fp32 inputs use exact fp32 dots. Lengths are padded to whole blocks and
head dims to powers of two (>= 16) with zeros, which add nothing (``φ(0) = 0``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from jaxattn.pallas._common import dot

TARGET_PROGRAMS = 264  # split the reductions until about 2 programs per SM of an H100 (132 SMs)


@dataclasses.dataclass(frozen=True)
class LinearGlobalConfig:
    """``block`` rows per step; ``splits`` programs per (batch, head) for the two reductions
    (None: enough for ``TARGET_PROGRAMS`` in all, at most one per block); ``block_dq`` and
    ``num_warps_dq`` for the dq kernel (default ``block`` and ``num_warps``), which holds the
    state's pair and the ``dS`` sum at once. ``block_dq`` divides ``block``."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None
    block_dq: int | None = None
    num_warps_dq: int | None = None

    def __post_init__(self):
        if self.block_dq and self.block % self.block_dq:
            raise ValueError(f"block_dq {self.block_dq} must divide block {self.block}")


# (padded max(d, e), bytes per element) -> config, from `python -m jaxattn.bench compile --families
# linear_global` (sm_90a): two-byte entries compile spill-free (d=128's dq kernel on 32-row blocks:
# on 64-row ones it spilled 512 B), the forward's kernels on 64-row wgmma tiles. fp32 ones are
# spill-free up to d=64; at d=128 the fp32 [d, d] tiles spill in every layout tried, so
# impl="auto" runs fp32 beyond AUTO_MAX_HEAD_DIM[4] on XLA.
CONFIGS: dict[tuple[int, int], LinearGlobalConfig] = {
    (16, 2): LinearGlobalConfig(64, 4), (32, 2): LinearGlobalConfig(64, 4),
    (64, 2): LinearGlobalConfig(64, 8), (128, 2): LinearGlobalConfig(64, 8, block_dq=32),
    (16, 4): LinearGlobalConfig(32, 4), (32, 4): LinearGlobalConfig(32, 4, num_warps_dq=8),
    (64, 4): LinearGlobalConfig(16, 4, num_warps_dq=8), (128, 4): LinearGlobalConfig(8, 4, num_warps_dq=8),
}
MAX_HEAD_DIM = 128
AUTO_MAX_HEAD_DIM = {2: 128, 4: 64}  # bytes per element -> widest head dim impl="auto" runs here


def linear_global_config(head_dim: int, dtype) -> LinearGlobalConfig:
    return _common.table_entry(CONFIGS, head_dim, dtype, "linear_global")


@dataclasses.dataclass(frozen=True)
class _Static:
    clamp: float
    block: int
    block_dq: int
    q_blocks: int  # of block rows (out kernel)
    dq_blocks: int  # of block_dq rows (dq kernel)
    k_blocks: int
    q_per: int  # blocks per program of the two reductions (dq: of block_dq rows, state)
    k_per: int
    num_warps: int
    num_warps_dq: int
    num_stages: int
    interpret: bool | None
    exact: bool  # fp32 inputs: plain fp32 dots (two-byte: the hi + lo pairs)

    @property
    def q_splits(self) -> int:
        return -(-self.dq_blocks // self.q_per)

    @property
    def k_splits(self) -> int:
        return -(-self.k_blocks // self.k_per)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None


def _split(m, dtype):
    """fp32 tile -> ``(hi, lo, amax)`` with ``m ≈ (hi + lo) amax`` in a two-byte dtype."""
    amax = jnp.max(jnp.max(jnp.abs(m), axis=1), axis=0)
    amax = jnp.where(amax > 0, amax, 1.0)
    u = m * (1.0 / amax)
    hi = u.astype(dtype)
    return hi, (u - hi.astype(jnp.float32)).astype(dtype), amax


def split_state(m: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XLA side of :func:`_split` for ``[B, H, d, e]`` fp32 states: ``hi, lo`` in ``dtype`` and
    ``amax [B, H, 1]`` (fp32 inputs: the state itself, zeros and ones)."""
    if jnp.dtype(dtype) == jnp.float32:
        return m, jnp.zeros_like(m), jnp.ones((*m.shape[:2], 1), jnp.float32)
    hi, lo, amax = jax.vmap(jax.vmap(functools.partial(_split, dtype=dtype)))(m)
    return hi, lo, amax[..., None]


def _dot_pair(st: _Static, x, hi, lo, amax, trans_a: bool = False, trans_b: bool = False):
    """``x @ m`` (fp32) for ``m`` given as its pair ``(hi, lo, amax)``."""
    out = dot(x, hi, trans_a=trans_a, trans_b=trans_b, precision=st.precision)
    if st.exact:
        return out
    return (out + dot(x, lo, trans_a=trans_a, trans_b=trans_b, precision=st.precision)) * amax


def _rows(t, block: int):
    return pl.ds(pl.multiple_of(t * block, block), block)


def _phi(x):
    return jnp.maximum(x, jnp.zeros_like(x))


def _state_kernel(k_ref, v_ref, s_ref, z_ref, *, st: _Static):
    per = st.k_per
    first = pl.program_id(2) * per
    d, e = k_ref.shape[-1], v_ref.shape[-1]

    def body(t, carry):
        s, z = carry
        rows = _rows(t, st.block)
        phik = _phi(k_ref[rows, :])
        s = s + dot(phik, v_ref[rows, :], trans_a=True, precision=st.precision)
        return s, z + jnp.sum(phik.astype(jnp.float32), axis=0)

    s, z = lax.fori_loop(first, jnp.minimum(first + per, st.k_blocks), body,
                         (jnp.zeros((d, e), jnp.float32), jnp.zeros((d,), jnp.float32)))
    s_ref[...] = s
    z_ref[...] = z


def _numerator(st: _Static, phiq, hi_ref, lo_ref, amax_ref, z_ref):
    """``φ(q) S`` and the clamped normaliser ``max(φ(q) · z, clamp)`` with its active rows."""
    num = _dot_pair(st, phiq, hi_ref[...], lo_ref[...], amax_ref[...])
    raw = jnp.sum(phiq.astype(jnp.float32) * z_ref[...][None, :], axis=1)
    return num, jnp.maximum(raw, st.clamp), raw > st.clamp


def _out_kernel(q_ref, hi_ref, lo_ref, amax_ref, z_ref, tau_ref, o_ref, *, st: _Static):
    num, den, _ = _numerator(st, _phi(q_ref[...]), hi_ref, lo_ref, amax_ref, z_ref)
    o_ref[...] = (num * (tau_ref[...] / den)[:, None]).astype(o_ref.dtype)


def _dq_kernel(q_ref, do_ref, hi_ref, lo_ref, amax_ref, z_ref, tau_ref, dq_ref, ds_ref, dz_ref, dtau_ref, *,
               st: _Static):
    per = st.q_per
    first = pl.program_id(2) * per
    d, e = q_ref.shape[-1], do_ref.shape[-1]
    tau, z = tau_ref[...], z_ref[...]

    def body(t, carry):
        ds, dz, dtau = carry
        rows = _rows(t, st.block_dq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        phiq = _phi(q)
        num, den, active = _numerator(st, phiq, hi_ref, lo_ref, amax_ref, z_ref)
        r = tau / den
        dn = jnp.sum(do.astype(jnp.float32) * num, axis=1) / den  # (dO . num) / den
        w = jnp.where(active, -r * dn, 0.0)
        dphiq = _dot_pair(st, do, hi_ref[...], lo_ref[...], amax_ref[...], trans_b=True) * r[:, None]
        dphiq = dphiq + w[:, None] * z[None, :]
        dq_ref[rows, :] = jnp.where(q > 0, dphiq, 0.0).astype(dq_ref.dtype)
        g = do.astype(jnp.float32) * r[:, None]
        if st.exact:
            ds = ds + dot(phiq, g, trans_a=True, precision=st.precision)
        else:
            ds = ds + _dot_pair(st, phiq, *_split(g, phiq.dtype), trans_a=True)
        dz = dz + jnp.sum(phiq.astype(jnp.float32) * w[:, None], axis=0)
        return ds, dz, dtau + jnp.sum(dn)

    ds, dz, dtau = lax.fori_loop(first, jnp.minimum(first + per, st.dq_blocks), body,
                                 (jnp.zeros((d, e), jnp.float32), jnp.zeros((d,), jnp.float32),
                                  jnp.zeros((), jnp.float32)))
    ds_ref[...] = ds
    dz_ref[...] = dz
    dtau_ref[...] = jnp.zeros((1,), jnp.float32) + dtau


def _dkv_kernel(k_ref, v_ref, hi_ref, lo_ref, amax_ref, dz_ref, dk_ref, dv_ref, *, st: _Static):
    k, v = k_ref[...], v_ref[...]
    hi, lo, amax = hi_ref[...], lo_ref[...], amax_ref[...]
    dphik = _dot_pair(st, v, hi, lo, amax, trans_b=True) + dz_ref[...][None, :]
    dk_ref[...] = jnp.where(k > 0, dphik, 0.0).astype(dk_ref.dtype)
    dv_ref[...] = _dot_pair(st, _phi(k), hi, lo, amax).astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------
# specs: grid (batch, head, third); the third axis is a split (reductions) or a row block


def _whole(n: int, width: int):
    """Every row of one (batch, head) of a ``[B, N, H, width]`` array."""
    return pl.BlockSpec((None, n, None, width), lambda b, h, s: (b, 0, h, 0))


def _block(st: _Static, width: int):
    return pl.BlockSpec((None, st.block, None, width), lambda b, h, t: (b, t, h, 0))


def _per_head(*shape: int):
    """One ``shape`` slice per (batch, head) of a ``[B, H, *shape]`` array."""
    return pl.BlockSpec((None, None, *shape), lambda b, h, s: (b, h, *(0 for _ in shape)))


def _per_split(*shape: int):
    """One ``shape`` slice per program of a ``[B, H, splits, *shape]`` array."""
    return pl.BlockSpec((None, None, None, *shape), lambda b, h, s: (b, h, s, *(0 for _ in shape)))


def _call(kernel, st: _Static, grid, in_specs, out_shape, out_specs, name):
    warps = st.num_warps_dq if kernel is _dq_kernel else st.num_warps
    return _common.pallas_call(functools.partial(kernel, st=st), out_shape=out_shape, grid=grid,
                               in_specs=in_specs, out_specs=out_specs, num_warps=warps,
                               num_stages=st.num_stages, interpret=st.interpret, name=name)


def _state(st: _Static, k, v):
    b, nk, h, d = k.shape
    e = v.shape[-1]
    f32 = jnp.float32
    s, z = _call(_state_kernel, st, (b, h, st.k_splits), [_whole(nk, d), _whole(nk, e)],
                 [jax.ShapeDtypeStruct((b, h, st.k_splits, d, e), f32),
                  jax.ShapeDtypeStruct((b, h, st.k_splits, d), f32)],
                 [_per_split(d, e), _per_split(d)], "jaxattn_l2vit_state")(k, v)
    return s.sum(axis=2), z.sum(axis=2)


def _fwd(st: _Static, q, k, v, tau):
    b, nq, h, d = q.shape
    e = v.shape[-1]
    s, z = _state(st, k, v)
    hi, lo, amax = split_state(s, q.dtype)
    taus = jnp.broadcast_to(tau[None, :, None], (b, h, 1))
    (o,) = _call(_out_kernel, st, (b, h, st.q_blocks),
                 [_block(st, d), _per_head(d, e), _per_head(d, e), _per_head(1), _per_head(d), _per_head(1)],
                 [jax.ShapeDtypeStruct((b, nq, h, e), q.dtype)], [_block(st, e)],
                 "jaxattn_l2vit_out")(q, hi, lo, amax, z, taus)
    return o, (s, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_global(st: _Static, q, k, v, tau):
    return _fwd(st, q, k, v, tau)[0]


def _vjp_fwd(st: _Static, q, k, v, tau):
    o, (s, z) = _fwd(st, q, k, v, tau)
    return o, (q, k, v, tau, s, z)


def _vjp_bwd(st: _Static, res, do):
    q, k, v, tau, s, z = res
    b, nq, h, d = q.shape
    e = v.shape[-1]
    f32 = jnp.float32
    do = do.astype(q.dtype)
    hi, lo, amax = split_state(s, q.dtype)
    taus = jnp.broadcast_to(tau[None, :, None], (b, h, 1))
    dq, ds, dz, dtau = _call(
        _dq_kernel, st, (b, h, st.q_splits),
        [_whole(nq, d), _whole(nq, e), _per_head(d, e), _per_head(d, e), _per_head(1), _per_head(d), _per_head(1)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, st.q_splits, d, e), f32),
         jax.ShapeDtypeStruct((b, h, st.q_splits, d), f32), jax.ShapeDtypeStruct((b, h, st.q_splits, 1), f32)],
        [_whole(nq, d), _per_split(d, e), _per_split(d), _per_split(1)],
        "jaxattn_l2vit_dq")(q, do, hi, lo, amax, z, taus)
    dhi, dlo, damax = split_state(ds.sum(axis=2), q.dtype)
    dk, dv = _call(
        _dkv_kernel, st, (b, h, st.k_blocks),
        [_block(st, d), _block(st, e), _per_head(d, e), _per_head(d, e), _per_head(1), _per_head(d)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [_block(st, d), _block(st, e)], "jaxattn_l2vit_dkv")(k, v, dhi, dlo, damax, dz.sum(axis=2))
    return dq, dk, dv, dtau.sum(axis=(0, 2, 3)).astype(tau.dtype)


_linear_global.defvjp(_vjp_fwd, _vjp_bwd)


def linear_global_kernel(q: jax.Array, k: jax.Array, v: jax.Array, tau: jax.Array, *, clamp: float,
                         config: LinearGlobalConfig | None = None, interpret: bool | None = None) -> jax.Array:
    """``q [B, Nq, H, d]``, ``k [B, Nk, H, d]``, ``v [B, Nk, H, e]`` (one dtype), ``tau [H]`` fp32
    -> ``[B, Nq, H, e]``; differentiable in q, k, v and tau. Any lengths and head dims up to
    ``MAX_HEAD_DIM`` (padded here)."""
    b, nq, h, d0 = q.shape
    nk, e0 = k.shape[1], v.shape[-1]
    d, e = max(16, _common.next_pow2(d0)), max(16, _common.next_pow2(e0))
    cfg = config or linear_global_config(max(d, e), q.dtype)
    nq_pad, nk_pad = _common.round_up(nq, cfg.block), _common.round_up(nk, cfg.block)
    block_dq = cfg.block_dq or cfg.block
    q_blocks, k_blocks, dq_blocks = nq_pad // cfg.block, nk_pad // cfg.block, nq_pad // block_dq

    def per(blocks: int) -> int:  # blocks per program of a reduction
        splits = max(1, min(cfg.splits or -(-TARGET_PROGRAMS // (b * h)), blocks))
        return -(-blocks // splits)

    st = _Static(clamp=float(clamp), block=cfg.block, block_dq=block_dq, q_blocks=q_blocks,
                 dq_blocks=dq_blocks, k_blocks=k_blocks, q_per=per(dq_blocks), k_per=per(k_blocks),
                 num_warps=cfg.num_warps, num_warps_dq=cfg.num_warps_dq or cfg.num_warps,
                 num_stages=cfg.num_stages, interpret=interpret,
                 exact=q.dtype == jnp.float32)
    pad = _common.pad_axis
    qp = pad(pad(q, 1, nq_pad), 3, d)
    kp = pad(pad(k, 1, nk_pad), 3, d)
    vp = pad(pad(v, 1, nk_pad), 3, e)
    out = _linear_global(st, qp, kp, vp, tau.astype(jnp.float32))
    return out[:, :nq, :, :e0]
