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
  FADD per element and step; ``inplace_pv`` accumulates in place with ``pl.run_state``, which
  Mosaic GPU's interpret mode lacks, so the CPU tests check the fresh-accumulator form).
* online softmax in base 2 with the logit scale folded into one FMA; key blocks below the
  causal diagonal run without a mask; the diagonal and the padded tail are masked.
* :func:`sage_forward`: SageAttention2 on the same pipeline (INT8 scores on ``s8`` WGMMA, P in
  e4m3 staged in shared memory for the FP8 WGMMA, two-level accumulation).

Rows with no visible key give zeros and ``lse = -inf``, as the Triton kernel. Inputs arrive
padded (rows to ``2 * block_q``, keys to ``block_kv``); causal alignment is bottom-right, from
the true lengths. Head dims 64 and 128 (q, k and v alike), bf16 or fp16.

On a CPU the same kernel runs in Mosaic GPU's interpret mode (jax >= 0.10, which simulates the
warpgroups, barriers and TMA copies, and has a race detector), so tests check it against the
oracle without a GPU. The interpreter lacks register layouts and WGMMA's transposed and register
operands: on that path only, layout casts are identities and the two products are ``jnp`` dots
of the same shared-memory tiles. It needs XLA's CPU pool to hold 4 threads (``NPROC``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas import _common

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
FP8_DTYPE = jnp.float8_e4m3fn
P_OFFSET = 8.807  # SageAttention2: exp2(8.807) ~= 448 puts P in e4m3's range (as pallas.sage)

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


def interpreter_threads() -> int:
    """Threads of XLA's CPU client pool (``NPROC`` if set, else the CPU count), read when JAX
    starts. The interpreter runs a kernel's three warpgroups as three concurrent CPU executions
    inside a fourth; a pool smaller than 4 can leave a warpgroup unscheduled while the others
    wait on its barrier, which hangs."""
    try:
        return int(os.environ["NPROC"])
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# impl="auto" runs this forward instead of the Triton one on a Hopper GPU, for the inputs it takes
# (plain causal or non-causal attention, d 64/128, 16-bit), once a GPU run has shown it faster
# (BENCHMARKS.md, the jaxattn-mosaic peer vs jaxattn): False until then.
AUTO_ON_HOPPER = False


def _compute_capability() -> tuple[int | None, str]:
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", "") or "")
    try:
        return int(cc.split(".")[0]), cc
    except ValueError:
        return None, cc


def on_hopper() -> bool:
    """Kernels are built for a Hopper GPU (sm_90): the device is one, or a compile-only H100."""
    from jaxattn.pallas import _common

    if jax.default_backend() != "gpu":
        return _common.targets_gpu()  # (compiling for the compile-only H100 of jaxattn.bench.aot)
    return _compute_capability()[0] == 9


def _check_device() -> None:
    """Compiled for a GPU: the kernels are Hopper's (WGMMA, TMA, setmaxnreg: sm_90a; Blackwell's
    tensor cores take tcgen05, not WGMMA)."""
    dev = jax.devices()[0]
    major, cc = _compute_capability()
    if dev.platform != "gpu" or (major is not None and major != 9):
        raise ValueError(f"impl='mosaic' compiles for Hopper GPUs (sm_90); this device is "
                         f"{dev.device_kind} (compute capability {cc or 'unknown'}): use impl='pallas'")


def cuda_runtime_version() -> int | None:
    """The CUDA runtime that jaxlib bundles (e.g. 12090 for 12.9.0), or None (no CUDA jaxlib)."""
    try:
        from jax._src.lib import cuda_versions  # private; None in a CPU-only jaxlib
        return int(cuda_versions.cuda_runtime_get_version()) if cuda_versions is not None else None
    except Exception:  # noqa: BLE001 - an older or newer jaxlib without this helper
        return None


# ptxas of CUDA 12.8.0 up to (not including) 12.9.1 miscompiles causal masking in the FA3-style
# Mosaic GPU forward: jax's bundled attention_mgpu refuses causal=True there, and so do we.
PTXAS_CAUSAL_BUG = (12080, 12091)


def causal_supported() -> bool:
    """Whether this CUDA runtime compiles the causal Mosaic forward correctly (see PTXAS_CAUSAL_BUG)."""
    version = cuda_runtime_version()
    return version is None or not PTXAS_CAUSAL_BUG[0] <= version < PTXAS_CAUSAL_BUG[1]


def _check_causal() -> None:
    if not causal_supported():
        v = cuda_runtime_version()
        raise ValueError(f"impl='mosaic' with causal=True: this jaxlib's CUDA runtime {v // 1000}.{v % 1000 // 10} "
                         "has a ptxas miscompilation of causal masking (CUDA 12.8.0 to 12.9.0, as jax's bundled "
                         "attention_mgpu notes); use impl='pallas', or a jaxlib built with CUDA >= 12.9.1")


def _load_vector(plgpu, ref, layout):
    """``plgpu.load`` of a whole ref (jax 0.10 takes an index argument, later ones deprecate it)."""
    try:
        import inspect

        takes_idx = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty
    except (KeyError, TypeError, ValueError):
        takes_idx = False
    return plgpu.load(ref, (), layout=layout, optimized=False) if takes_idx else \
        plgpu.load(ref, layout=layout, optimized=False)


def _check_interpreter_threads() -> None:
    if interpreter_threads() < 4:
        raise RuntimeError(
            f"Mosaic GPU interpret mode needs XLA's CPU thread pool to hold 4 threads (it has "
            f"{interpreter_threads()}: NPROC or the CPU count), or it can hang: set NPROC=8 in the "
            "environment before JAX starts (the test suite does), or run impl='pallas'")


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


class SageInputs(NamedTuple):
    """Quantised operands for the SageAttention2 mode (:mod:`jaxattn.pallas.sage`'s prologue)."""

    q8: jax.Array  # int8 [B, Sq, Hq, d]
    q_rows: jax.Array  # fp32 [B, Hq, Sq]: per-row Q scale * sm_scale * log2(e)
    k8: jax.Array  # int8 [B, Sk, Hkv, d]
    k_scale: jax.Array  # fp32 [B, Hkv, Sk / block_kv]: one scale per key block
    v8t: jax.Array  # float8_e4m3fn [B, Hkv, d, Sk]: V transposed (K-major for the FP8 WGMMA)
    v_scale: jax.Array  # fp32 [B, Hkv, d]: per-channel V scale
    # smooth_q: fp32 [B, Hq, Sq / (2 * block_q), Sk], the exact q_bar . K^T term of each program's
    # query block, in base-2 units (added to the scores); None without Q smoothing
    correction: jax.Array | None = None


class SparseLists(NamedTuple):
    """A block-sparse layout (``flash.SparseSpec`` and its CSR lists): per query mask block of
    ``block_q`` rows, ``kv_index[r] = (start, n_full, n_visit)`` into ``kv_blocks``, the key mask
    blocks to visit (full ones first; partial ones apply ``mask_fn(q_pos, k_pos)``, with
    ``q_pos`` offset by ``q_offset[0]``)."""

    mask_fn: Any
    block_q: int
    block_k: int
    kv_index: jax.Array  # int32 [n_qb, 3]
    kv_blocks: jax.Array  # int32 [nnz]
    q_offset: jax.Array  # int32 [1]


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, scale: float, q_len: int,
            kv_len: int, config: MosaicConfig | None = None, sparse: SparseLists | None = None,
            interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """Padded inputs ``q [B, Sq, Hq, d]``, ``k, v [B, Sk, Hkv, d]`` (``Sq`` a multiple of
    ``2 * block_q``, ``Sk`` of ``block_kv``; true lengths ``q_len``, ``kv_len``) ->
    ``out [B, Sq, Hq, d]`` (input dtype) and the natural-log ``lse [B, Hq, Sq]`` (fp32).
    ``sparse``: visit only the listed key blocks (block-sparse attention; mask blocks of at least
    ``2 * block_q`` rows and ``block_kv`` keys); ``causal`` must then be False.
    ``interpret``: False (compile for the GPU), True, or :func:`interpret_params` (the CPU)."""
    d = q.shape[-1]
    if v.shape != k.shape or d not in HEAD_DIMS:
        raise ValueError(f"impl='mosaic' needs q, k, v head dims equal and in {HEAD_DIMS}; "
                         f"got {d}, {k.shape[-1]}, {v.shape[-1]}")
    if scale <= 0:  # the kernel scales each row's max of the raw scores: keep the scale positive
        q, scale = (-q, -scale) if scale < 0 else (jnp.zeros_like(q), 1.0)
    cfg = config or mosaic_config(d)
    if sparse is not None and (causal or sparse.block_q % (2 * cfg.block_q) or sparse.block_k % cfg.block_kv):
        raise ValueError(f"a block-sparse layout on the Mosaic kernel needs causal=False and mask blocks of a "
                         f"multiple of {2 * cfg.block_q} rows and {cfg.block_kv} keys; got causal={causal}, "
                         f"blocks {sparse.block_q} x {sparse.block_k}")
    return _attention(q, k, v, None, causal=causal, scale=scale, q_len=q_len, kv_len=kv_len, cfg=cfg,
                      out_dtype=q.dtype, interpret=interpret, sparse=sparse)


def sage_forward(x: SageInputs, *, causal: bool, q_len: int, kv_len: int, out_dtype: Any,
                 config: MosaicConfig | None = None, interpret: Any = False) -> jax.Array:
    """SageAttention2 on the same pipeline: INT8 ``Q K^T`` on ``s8`` WGMMA (int32 scores times
    the row and key-block scales, base-2 units), online softmax with the P offset, P cast to e4m3
    and staged in shared memory (Hopper's FP8 WGMMA takes no register operand that Mosaic GPU
    emits), one FP8 product per key block into a fresh fp32 tile that is scaled by the per-channel
    V scale and added to the output (two-level accumulation). Padded as :func:`forward`;
    returns ``out [B, Sq, Hq, d]`` in ``out_dtype``."""
    d = x.q8.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"the Mosaic Sage kernel supports head dims {HEAD_DIMS}, got {d}")
    cfg = config or mosaic_config(d)
    if x.k_scale.shape[-1] * cfg.block_kv != x.k8.shape[1]:
        raise ValueError(f"k_scale needs one scale per {cfg.block_kv} keys, got {x.k_scale.shape}")
    batch, q_pad, hq, _ = x.q8.shape
    want = (batch, hq, q_pad // (2 * cfg.block_q), x.k8.shape[1])
    if x.correction is not None and tuple(x.correction.shape) != want:
        raise ValueError(f"correction must have shape {want} (one row per {2 * cfg.block_q} queries), "
                         f"got {tuple(x.correction.shape)}")
    return _attention(x.q8, x.k8, x.v8t, x, causal=causal, scale=1.0, q_len=q_len, kv_len=kv_len, cfg=cfg,
                      out_dtype=out_dtype, interpret=interpret)[0]


def _smem_transforms(plgpu, shape: tuple[int, ...], dtype: Any) -> tuple:
    """Tiling and swizzle for a tile whose rows are ``shape[-1]`` elements (WGMMA operands)."""
    row_bytes = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = min(128, row_bytes)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _attention(q, k, v, sage: SageInputs | None, *, causal: bool, scale: float, q_len: int, kv_len: int,
               cfg: MosaicConfig, out_dtype: Any, interpret: Any,
               sparse: SparseLists | None = None) -> tuple[jax.Array, jax.Array]:
    """The warp-specialized kernel; ``sage``: the quantised mode (``q, k`` int8, ``v`` is V^T
    e4m3), else 16-bit ``q, k, v``; ``sparse``: the listed key blocks only."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    batch, q_pad, hq, d = q.shape
    kv_pad, hkv = k.shape[1], k.shape[2]
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    if q_pad % (2 * bq) or kv_pad % bkv:
        raise ValueError(f"padded lengths {q_pad}, {kv_pad} must be multiples of {2 * bq} and {bkv}")
    quant = sage is not None
    groups = hq // hkv
    n_tiles = q_pad // (2 * bq)
    offset = kv_len - q_len
    c = float(scale) * LOG2E
    # Register layouts (WGMMA tiles and their rows) are annotations that the interpreter lacks.
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def iota(dim):  # positions in a score tile, in its WGMMA register layout
        if interpret:
            return lax.broadcasted_iota(jnp.int32, (bq, bkv), dim)
        return plgpu.broadcasted_iota(jnp.int32, (bq, bkv), dim, layout=plgpu.Layout.WGMMA)

    def load_vec(ref, layout):  # a vector from global memory, in a WGMMA row/column layout
        return ref[...] if interpret else _load_vector(plgpu, ref, layout)

    blocks = functools.partial(_key_blocks, causal=causal, offset=offset, kv_len=kv_len, block_kv=bkv)
    v_tile = (d, bkv) if quant else (bkv, d)  # V^T blocks in the quantised mode

    sub = sparse.block_k // bkv if sparse is not None else 1  # kernel key blocks per mask block

    def kernel(q_ref, k_ref, v_ref, *refs):
        index_ref = blocks_ref = qoff_ref = None
        if sparse is not None:
            index_ref, blocks_ref, qoff_ref, *refs = refs
        corr_ref = None
        if quant and sage.correction is not None:
            corr_ref, *refs = refs
        if quant:
            qs_ref, ks_ref, vs_ref, o_ref, lse_ref, q_smem2, o_smem2, p_smem2, *rest = refs
        else:
            qs_ref = ks_ref = vs_ref = p_smem2 = None
            o_ref, lse_ref, q_smem2, *rest = refs
            o_smem2 = q_smem2  # the output tile reuses Q's
        k_smem, v_smem, lse_smem2, loaded_k, loaded_v, loaded_q, consumed_k, consumed_v, sched = rest
        b, h = lax.axis_index("batch"), lax.axis_index("heads")
        tile = lax.axis_index("tiles")
        if causal or sparse is not None:  # the heaviest query tiles first: balances the grid's tail
            tile = n_tiles - 1 - tile
        wg = lax.axis_index("wg")
        cta_first = tile * (2 * bq)
        kvh = lax.div(h, groups)
        if sparse is None:
            _, steps = blocks(cta_first, 2 * bq)  # key blocks the producer streams

            def key_block(j):
                return j
        else:  # the program's rows lie in one mask row: its list, in kernel-sized key blocks
            row = lax.div(cta_first, sparse.block_q)
            start, steps = index_ref[row, 0], index_ref[row, 2] * sub

            def key_block(j):
                return blocks_ref[start + lax.div(j, sub)] * sub + lax.rem(j, sub)

        def sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]
            p_smem = p_smem2.at[wg] if quant else None
            q_first = cta_first + wg * bq
            if sparse is None:
                n_full, hi = blocks(q_first, bq)
            else:
                n_full, hi = index_ref[row, 1] * sub, steps
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_first, bq), h], q_smem, loaded_q.at[wg])
            if quant:
                q_scale = load_vec(qs_ref.at[b, h, pl.ds(q_first, bq)], row_layout)
                v_scale = load_vec(vs_ref.at[b, kvh], col_layout)
            plgpu.barrier_wait(loaded_q.at[wg])

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
                acc_type = jnp.int32 if quant else jnp.float32  # INT8 products are exact in int32
                kb = key_block(j)  # read before the product, so the loads' latency hides
                if quant:  # the key block's scale
                    k_scale = ks_ref[b, kvh, kb]

                def qk_product(ref):
                    plgpu.wgmma(ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    if cfg.pingpong:
                        sync()  # the other consumer's softmax overlaps this product
                    return ref[...]

                if interpret:  # the interpreter lacks transposed WGMMA operands: the same product
                    s = lax.dot_general(q_smem[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=acc_type)
                    if cfg.pingpong:
                        sync()
                else:
                    s = pl.run_scoped(qk_product, plgpu.ACC((bq, bkv), acc_type))
                plgpu.barrier_arrive(consumed_k.at[slot])
                if quant:  # base-2 logits: int32 scores times the row and key-block scales
                    s = cast(_common.exact_float(s), plgpu.Layout.WGMMA)  # (no cvt.rn.f32.s32)
                    s = s * lax.broadcast_in_dim(q_scale * k_scale, s.shape, [0])
                    if corr_ref is not None:  # smooth_q: this query block's q_bar . K^T, per key
                        corr = load_vec(corr_ref.at[b, h, tile, pl.ds(kb * bkv, bkv)], col_layout)
                        s = s + lax.broadcast_in_dim(corr, s.shape, [1])
                if masked:
                    rows = iota(0) + q_first
                    keys = iota(1) + kb * bkv
                    keep = keys < kv_len
                    if causal:
                        keep = jnp.logical_and(keep, keys <= rows + offset)
                    if sparse is not None:
                        keep = jnp.logical_and(keep, sparse.mask_fn(rows + qoff_ref[0], keys))
                    s = jnp.where(keep, s, -jnp.inf)
                # online softmax in base 2: m holds the running max of the scaled logits (Sage: minus
                # the offset that puts P in e4m3's range (0, 448])
                m_new = jnp.maximum(m, s.max(axis=1) - P_OFFSET if quant else s.max(axis=1) * c)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2((s if quant else s * c) - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                if quant:  # the FP8 product's A operand comes from shared memory
                    p_smem[...] = p.astype(FP8_DTYPE)
                    plgpu.commit_smem()
                    acc, l, m_new = lax.optimization_barrier((acc, l, m_new))
                    p_lo = p_smem
                else:
                    p_lo = p.astype(q.dtype)
                    acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
                if cfg.pingpong:
                    plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(loaded_v.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(sched)  # the tensor cores are ours again
                v_op = plgpu.transpose_ref(v_smem.at[slot], (1, 0)) if quant else v_smem.at[slot]

                def pv_issue(ref):
                    plgpu.wgmma(ref, p_lo, v_op)

                    @pl.when(j + 1 < hi)
                    def _():  # the next K block, while this product runs
                        plgpu.barrier_wait(loaded_k.at[lax.rem(j + 1, stages)])

                def pv_product(ref):
                    pv_issue(ref)
                    return ref[...]

                if interpret:  # the interpreter takes WGMMA operands from shared memory only
                    pv = lax.dot_general(p_lo[...] if quant else p_lo, v_smem.at[slot][...],
                                         (((1,), (1 if quant else 0,)), ((), ())), preferred_element_type=jnp.float32)
                    pl.when(j + 1 < hi)(lambda: plgpu.barrier_wait(loaded_k.at[lax.rem(j + 1, stages)]))
                elif cfg.inplace_pv and not quant:  # accumulate into the rescaled output
                    acc, pv = pl.run_state(pv_issue)(plgpu.ACC.init(acc)), None
                else:
                    pv = pl.run_scoped(pv_product, plgpu.ACC((bq, d), jnp.float32))
                plgpu.barrier_arrive(consumed_v.at[slot])
                if pv is not None:  # Sage: this block's FP8 partial, scaled per channel
                    acc = acc + (pv * lax.broadcast_in_dim(v_scale, pv.shape, [1]) if quant else pv)
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
            o_smem[...] = out.astype(out_dtype)
            lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(q_first, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_first, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(j, slot):
                keys = pl.ds(key_block(j) * bkv, bkv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh], k_smem.at[slot], loaded_k.at[slot])
                v_block = v_ref.at[b, kvh, :, keys] if quant else v_ref.at[b, keys, kvh]
                plgpu.copy_gmem_to_smem(v_block, v_smem.at[slot], loaded_v.at[slot])

            for i in range(stages if sparse is not None else min(stages, kv_pad // bkv)):
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

    def smem(shape, dtype):
        return plgpu.SMEM(shape, dtype, transforms=_smem_transforms(plgpu, shape, dtype))

    scratch = [smem((2, bq, d), q.dtype)]  # Q per consumer (16-bit: then its output tile)
    if quant:
        scratch += [smem((2, bq, d), out_dtype), smem((2, bq, bkv), FP8_DTYPE)]  # O, P per consumer
    scratch += [
        smem((stages, bkv, d), k.dtype),
        smem((stages, *v_tile), v.dtype),
        plgpu.SMEM((2, bq), jnp.float32),  # lse per consumer
        plgpu.Barrier(num_barriers=stages),  # K loaded
        plgpu.Barrier(num_barriers=stages),  # V loaded
        plgpu.Barrier(num_barriers=2),  # Q loaded
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # K consumed
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # V consumed
        plgpu.Barrier(num_arrivals=2),  # ping-pong schedule
    ]
    out_type = (jax.ShapeDtypeStruct((batch, q_pad, hq, d), out_dtype),
                jax.ShapeDtypeStruct((batch, hq, q_pad), jnp.float32))
    args = (q, k, v)
    if sparse is not None:
        args += (sparse.kv_index, sparse.kv_blocks, sparse.q_offset)
    if quant:
        if sage.correction is not None:
            args += (sage.correction,)
        args += (sage.q_rows, sage.k_scale, sage.v_scale)
    if interpret:
        _check_interpreter_threads()
    elif jax.default_backend() == "gpu":  # (lowering for CUDA on a CPU, as the tests do, is fine)
        _check_device()
        if causal:
            _check_causal()
    kernel.__name__ = f"jaxattn_mosaic_{'sage' if quant else 'flash' if sparse is None else 'sparse'}_fwd"
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch,
        grid=(hq, n_tiles, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=(interpret if not isinstance(interpret, bool) else interpret_params()) if interpret else None,
    )(*args)
