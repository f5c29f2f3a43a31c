"""Flash attention forward on Pallas's Mosaic GPU backend (Hopper, sm_90a).

The FlashAttention-3 scheme (Shah et al., 2024) for the forward pass, beside the Triton
kernels of :mod:`jaxattn.pallas.flash` (which keep the backward: ``impl="mosaic"`` runs this
forward and the Triton dq and dk/dv kernels, through the same ``jax.custom_vjp``):

* **warp specialization**: a program owns ``2 * block_q`` query rows of one (batch, head) and
  runs three warpgroups. A producer warpgroup streams K and V blocks with TMA into a ring of
  ``stages`` shared-memory slots (mbarriers: "loaded" per slot, and "consumed", which both
  consumers arrive on). Two consumer warpgroups own ``block_q`` rows each, and hold their
  scores and output accumulator in registers (``setmaxnreg``: 232 for consumers, 40 for the
  producer).
* **ping-pong scheduling** (``pingpong``): a two-arrival barrier orders the consumers so that
  one runs its softmax while the other's matrix products use the tensor cores.
* **WGMMA** for ``Q K^T`` (K transposed as a shared-memory view) and ``P V`` (P from registers).
  The ``P V`` product goes to a fresh accumulator that is added to the rescaled output (one
  FADD per element and step; an in-place accumulator needs ``pl.run_state``, which Mosaic GPU's
  interpret mode lacks, and this kernel keeps one code path for the GPU and the CPU tests).
* online softmax in base 2 with the logit scale folded into one FMA; key blocks below the
  causal diagonal run without a mask; the diagonal and the padded tail are masked.

Rows with no visible key give zeros and ``lse = -inf``, as the Triton kernel. Inputs arrive
padded (rows to ``2 * block_q``, keys to ``block_kv``); causal alignment is bottom-right, from
the true lengths. Head dims 64 and 128 (q, k and v alike), bf16 or fp16.

On a CPU the same kernel runs in Mosaic GPU's interpret mode (jax >= 0.10, which simulates the
warpgroups, barriers and TMA copies), so tests check it against the oracle without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the Mosaic GPU forward: ``block_q`` rows per consumer warpgroup (two per
    program), ``block_kv`` keys per step, ``stages`` K/V shared-memory slots."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    pingpong: bool = True
    # P V accumulates in place into the output (``pl.run_state``, FlashAttention-3's form) instead
    # of a fresh accumulator plus an add. GPU only: the interpreter lacks run_state and runs the
    # fresh-accumulator form (the same sums), so on a CPU only CUDA lowering checks this form.
    inplace_pv: bool = False

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one WGMMA row tile per warpgroup), got {self.block_q}")
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, got {self.stages}")


# Head dim -> config. Shared memory per program: Q/O 2*64*d, and stages * 2 * block_kv * d for
# K and V (2 bytes each): d = 128, 2 stages = 160 KiB; d = 64, 3 stages = 112 KiB.
CONFIGS: dict[int, MosaicConfig] = {
    64: MosaicConfig(64, 128, 3),
    128: MosaicConfig(64, 128, 2),
}


def mosaic_config(head_dim: int) -> MosaicConfig:
    try:
        return CONFIGS[head_dim]
    except KeyError:
        raise ValueError(f"impl='mosaic' supports head dims {HEAD_DIMS}, got {head_dim}") from None


def available() -> bool:
    """Whether this jax has Pallas's Mosaic GPU backend."""
    try:
        return importlib.util.find_spec("jax.experimental.pallas.mosaic_gpu") is not None
    except Exception:  # noqa: BLE001 - an older or stripped jax
        return False


def interpret_params(**kw: Any) -> Any:
    """Mosaic GPU interpret-mode parameters (``detect_races=True`` runs its race detector;
    unwritten memory reads as NaN). Private in jax 0.10-0.11."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(**kw)


def races_found() -> bool:
    """Whether the last interpreted kernel run with ``detect_races=True`` found a data race."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    return bool(interpret_pallas_call.get_races().races_found)


def _key_blocks(q_first, rows: int, *, causal: bool, offset: int, kv_len: int, block_kv: int):
    """``(n_full, hi)`` for query rows ``q_first .. q_first + rows - 1``: key blocks ``[0, n_full)``
    are visible to every row and hold only real keys (no mask), ``[n_full, hi)`` need the mask
    (causal diagonal, padded keys), later ones are skipped. Row r sees keys ``j <= r + offset``."""
    n_kv, n_kv_full = -(-kv_len // block_kv), kv_len // block_kv
    if not causal:
        return jnp.int32(n_kv_full), jnp.int32(n_kv)
    last = q_first + (rows - 1) + offset  # the last row's last visible key
    hi = jnp.clip(lax.div(jnp.maximum(last + block_kv, 0), block_kv), 0, n_kv)
    full = lax.div(jnp.maximum(q_first + offset + 1, 0), block_kv)
    return jnp.minimum(jnp.minimum(full, n_kv_full), hi), hi


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float, q_len: int,
            kv_len: int, config: MosaicConfig | None = None,
            interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """Padded inputs ``q [B, Sq, Hq, d]``, ``k, v [B, Sk, Hkv, d]`` (``Sq`` a multiple of
    ``2 * block_q``, ``Sk`` of ``block_kv``; true lengths ``q_len``, ``kv_len``) ->
    ``out [B, Sq, Hq, d]`` (input dtype) and the natural-log ``lse [B, Hq, Sq]`` (fp32).
    ``interpret``: False (compile for the GPU), True, or :func:`interpret_params` (the CPU)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, q_pad, hq, d = q.shape
    kv_pad, hkv = k.shape[1], k.shape[2]
    cfg = config or mosaic_config(d)
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    if q_pad % (2 * bq) or kv_pad % bkv:
        raise ValueError(f"padded lengths {q_pad}, {kv_pad} must be multiples of {2 * bq} and {bkv}")
    if v.shape != k.shape or d not in HEAD_DIMS:
        raise ValueError(f"impl='mosaic' needs q, k, v head dims equal and in {HEAD_DIMS}; "
                         f"got {d}, {k.shape[-1]}, {v.shape[-1]}")
    if scale <= 0:  # the kernel scales each row's max of the raw scores: keep the scale positive
        q, scale = (-q, -scale) if scale < 0 else (jnp.zeros_like(q), 1.0)
    groups = hq // hkv
    n_tiles = q_pad // (2 * bq)
    offset = kv_len - q_len
    dtype = q.dtype
    c = float(scale) * LOG2E
    # Register layouts (WGMMA tiles and their rows) are annotations that the interpreter lacks.
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
    blocks = functools.partial(_key_blocks, causal=causal, offset=offset, kv_len=kv_len, block_kv=bkv)

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2, loaded_k, loaded_v,
               loaded_q, consumed_k, consumed_v, sched):
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        if causal:  # the heaviest query tiles first: balances the tail of the grid
            tile = n_tiles - 1 - tile
        wg = lax.axis_index("wg")
        cta_first = tile * (2 * bq)
        _, steps = blocks(cta_first, 2 * bq)  # key blocks the producer streams

        def sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            q_first = cta_first + wg * bq
            n_full, hi = blocks(q_first, bq)
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_first, bq), h], qo_smem, loaded_q.at[wg])
            plgpu.barrier_wait(loaded_q.at[wg])

            row_layout = plgpu.Layout.WGMMA.reduce(1)
            m = cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
            l = cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
            acc = cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(hi > 0)
            def _():
                plgpu.barrier_wait(loaded_k.at[0])

            if cfg.pingpong:
                pl.when(wg == 1)(sync)  # consumer 1 starts half a step behind consumer 0

            def step(j, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(j, stages)

                def qk_product(ref):
                    plgpu.wgmma(ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    if cfg.pingpong:
                        sync()  # the other consumer's softmax overlaps this product
                    return ref[...]

                if interpret:  # the interpreter lacks transposed WGMMA operands: the same product
                    s = lax.dot_general(qo_smem[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                    if cfg.pingpong:
                        sync()
                else:
                    s = pl.run_scoped(qk_product, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(consumed_k.at[slot])
                if masked:
                    rows = cast(lax.broadcasted_iota(jnp.int32, (bq, bkv), 0), plgpu.Layout.WGMMA) + q_first
                    keys = cast(lax.broadcasted_iota(jnp.int32, (bq, bkv), 1), plgpu.Layout.WGMMA) + j * bkv
                    keep = keys < kv_len
                    if causal:
                        keep = jnp.logical_and(keep, keys <= rows + offset)
                    s = jnp.where(keep, s, -jnp.inf)
                # online softmax in base 2: m holds the running max of the scaled logits
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                if cfg.pingpong:
                    plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(loaded_v.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(sched)  # the tensor cores are ours again

                def pv_issue(ref):
                    plgpu.wgmma(ref, p16, v_smem.at[slot])

                    @pl.when(j + 1 < hi)
                    def _():  # the next K block, while this product runs
                        plgpu.barrier_wait(loaded_k.at[lax.rem(j + 1, stages)])

                def pv_product(ref):
                    pv_issue(ref)
                    return ref[...]

                if interpret:  # the interpreter takes WGMMA operands from shared memory only
                    acc = acc + jnp.dot(p16, v_smem.at[slot][...], preferred_element_type=jnp.float32)
                    pl.when(j + 1 < hi)(lambda: plgpu.barrier_wait(loaded_k.at[lax.rem(j + 1, stages)]))
                elif cfg.inplace_pv:  # accumulate into the rescaled output
                    acc = pl.run_state(pv_issue)(plgpu.ACC.init(acc))
                else:
                    acc = acc + pl.run_scoped(pv_product, plgpu.ACC((bq, d), jnp.float32))
                plgpu.barrier_arrive(consumed_v.at[slot])
                return acc, m_new, l

            carry = (acc, m, l)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(n_full, hi, functools.partial(step, masked=True), carry)

            def drain(j, _):  # blocks streamed for the other consumer's rows only
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(loaded_k.at[slot])  # every phase is observed, as the
                plgpu.barrier_wait(loaded_v.at[slot])  # interpreter checks (the data is here)
                plgpu.barrier_arrive(consumed_k.at[slot])
                plgpu.barrier_arrive(consumed_v.at[slot])
                if cfg.pingpong:
                    sync()
                    sync()
                return _

            lax.fori_loop(hi, steps, drain, None)
            if cfg.pingpong:
                pl.when(wg == 0)(sync)

            empty = l == 0.0
            l_safe = jnp.where(empty, 1.0, l)
            out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            qo_smem[...] = out.astype(dtype)
            lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q_first, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_first, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(h, groups)

            def load(j, slot):
                rows = (b, pl.ds(j * bkv, bkv), kvh)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], loaded_k.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], loaded_v.at[slot])

            for i in range(min(stages, kv_pad // bkv)):
                pl.when(i < steps)(functools.partial(load, i, i))

            @pl.loop(stages, jnp.maximum(steps, stages))
            def _(j):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(consumed_k.at[slot])
                plgpu.barrier_wait(consumed_v.at[slot])
                load(j, slot)

            @pl.loop(jnp.maximum(steps - stages, 0), steps)
            def _(j):  # the last blocks' releases: the program ends with no copy or phase in flight
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(consumed_k.at[slot])
                plgpu.barrier_wait(consumed_v.at[slot])

    tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
    swizzle = plgpu.SwizzleTransform(128)
    smem = functools.partial(plgpu.SMEM, transforms=(tiling, swizzle))
    scratch = [
        smem((2, bq, d), dtype),  # Q, then O, per consumer
        smem((stages, bkv, d), dtype),
        smem((stages, bkv, d), dtype),
        plgpu.SMEM((2, bq), jnp.float32),  # lse per consumer
        plgpu.Barrier(num_barriers=stages),  # K loaded
        plgpu.Barrier(num_barriers=stages),  # V loaded
        plgpu.Barrier(num_barriers=2),  # Q loaded
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K consumed
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V consumed
        plgpu.Barrier(num_arrivals=2),  # ping-pong schedule
    ]
    out_type = (jax.ShapeDtypeStruct((batch, q_pad, hq, d), dtype),
                jax.ShapeDtypeStruct((batch, hq, q_pad), jnp.float32))
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch,
        grid=(hq, n_tiles, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(interpret if not isinstance(interpret, bool) else interpret_params()) if interpret else None,
    )(q, k, v)
