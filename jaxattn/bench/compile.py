"""Compile every Pallas kernel for a real NVIDIA GPU on a machine without one.

``python -m jaxattn.bench compile [--arch 90] [--families flash sage ...] [--json PATH]``

Interpret mode checks a kernel's arithmetic and CUDA lowering checks that Pallas can emit its
Triton IR, but neither runs Triton's GPU compiler, where tile shapes meet the hardware: shared
memory per program, registers per thread, spills, whether dots become tensor-core (``wgmma``) MMAs.
This lowers each kernel family at production shapes for CUDA, takes the Triton IR out of the
StableHLO (jax < 0.11 embeds it in the ``__gpu$xla.gpu.triton`` custom call), and compiles it to a
cubin with the ``triton`` package (``pip install triton``; its bundled ptxas; no GPU or driver
needed) in a subprocess, starting with Triton's TTIR passes as XLA's pipeline does (``triton.compile``
on an IR file would skip them, and without the combine pass ``acc + dot`` keeps a second accumulator), then reports per kernel: shared memory, registers, spill bytes, MMA kind
and an occupancy estimate. A kernel fails the check when it does not compile or needs more shared
memory than one program may have on the target (it would fail to launch there).

The compiler that runs on a GPU is XLA's copy of Triton, not the ``triton`` release used here, so
the numbers are an estimate of it; a failure here is a bug to look at before a GPU session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# The custom call Pallas's Triton backend emits (exported as a constant from jax 0.11).
try:
    from jax.experimental.pallas.triton import CUSTOM_CALL_TARGET_NAME as TRITON_CALL
except ImportError:  # jax < 0.11
    TRITON_CALL = "__gpu$xla.gpu.triton"

# Shared memory one program (CTA) may use, with the opt-in carve-out, and per SM; registers per SM.
SMEM_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
SMEM_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472, 100: 233472}
REGISTERS_PER_SM = 65536
MAX_CTAS_PER_SM = 32

__all__ = ["TRITON_CALL", "TritonKernel", "cuda_lowering_target", "lower_for_cuda", "triton_kernels",
           "compile_kernels", "check", "family_cases", "FAMILIES", "run", "format_records"]


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Triton kernel as Pallas lowered it: its IR as text and its launch parameters."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def cuda_lowering_target() -> contextlib.AbstractContextManager:
    """Context that lets ``lower(lowering_platforms=("cuda",))`` work on a machine without a GPU.

    jax < 0.11 lowers Pallas Triton kernels for sm90 when no GPU is present; jax >= 0.11 asks
    for a target device, given as an abstract mesh whose abstract device is an H100.
    """
    if jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    device = AbstractDevice(device_kind="NVIDIA H100", num_cores=1, platform="cuda")
    return use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device))


def lower_for_cuda(fn: Callable, *args: Any) -> Any:
    """``jax.jit(fn)`` traced on ``args`` (arrays or ``ShapeDtypeStruct``) and lowered for CUDA."""
    with cuda_lowering_target():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _walk(op: Any) -> Iterator[Any]:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def triton_kernels(lowered: Any) -> list[TritonKernel]:
    """The distinct Triton kernels in a lowered computation, with their IR as text.

    Raises ``RuntimeError`` when the computation has Triton calls but this jax does not embed their
    IR (jax >= 0.11 compiles it during lowering, which needs a GPU plugin).
    """
    from jax._src.lib.mlir import ir

    module = lowered.compiler_ir("stablehlo")
    kernels: dict[TritonKernel, None] = {}  # distinct kernels, in order
    calls = 0
    for op in _walk(module.operation):
        if op.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CALL:
            continue
        calls += 1
        attrs = op.attributes
        if "mhlo.backend_config" not in attrs:
            continue
        cfg = ir.DictAttr(attrs["mhlo.backend_config"])
        if "ir" not in cfg:
            continue
        with ir.Context() as ctx:
            from jax._src.lib import triton as jtriton

            if hasattr(jtriton.dialect, "register_dialect"):
                jtriton.dialect.register_dialect(ctx)
            ttir = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes).operation.get_asm()

        def i32(key: str, cfg=cfg) -> int:
            return ir.IntegerAttr(cfg[key]).value

        kernels[TritonKernel(name=ir.StringAttr(cfg["name"]).value, ttir=ttir, num_warps=i32("num_warps"),
                             num_stages=i32("num_stages"),
                             grid=(i32("grid_x"), i32("grid_y"), i32("grid_z")))] = None
    if calls and not kernels:
        raise RuntimeError(f"this jax ({jax.__version__}) does not embed Triton IR in its custom calls; "
                           "run the check with jax < 0.11 or on a GPU")
    return list(kernels)


def triton_available(python: str | None = None) -> bool:
    """Whether ``python`` (default: this interpreter) can import the ``triton`` compiler."""
    run = subprocess.run([python or sys.executable, "-c", "import triton.backends.nvidia.compiler"],
                         capture_output=True, check=False)
    return run.returncode == 0


def compile_kernels(kernels: Sequence[TritonKernel], *, capability: int = 90,
                    python: str | None = None, timeout: float = 1800) -> list[dict]:
    """Compiles ``kernels`` for ``sm_<capability>`` with the ``triton`` package in a subprocess.

    Returns one dict per kernel (see ``_triton_worker``); ``python`` may name another interpreter
    that has ``triton`` installed (the worker imports neither jax nor jaxattn).
    """
    worker = os.path.join(os.path.dirname(__file__), "_triton_worker.py")
    with tempfile.TemporaryDirectory(prefix="jaxattn-ttir-") as tmp:
        manifest = []
        for i, k in enumerate(kernels):
            path = os.path.join(tmp, f"k{i}_{k.name}.ttir")
            with open(path, "w") as f:
                f.write(k.ttir)
            manifest.append({"path": path, "num_warps": k.num_warps, "num_stages": k.num_stages})
        mpath = os.path.join(tmp, "manifest.json")
        with open(mpath, "w") as f:
            json.dump(manifest, f)
        run = subprocess.run([python or sys.executable, worker, mpath, str(capability)],
                             capture_output=True, text=True, timeout=timeout, check=False)
        recs = {}
        for line in run.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                recs[rec.pop("path")] = rec
    out = []
    for k, item in zip(kernels, manifest):
        rec = recs.get(item["path"]) or {"ok": False, "error": f"worker gave no result: {run.stderr[-1500:]}"}
        out.append({"kernel": k.name, "num_warps": k.num_warps, "num_stages": k.num_stages,
                    "grid": list(k.grid), **rec})
    return out


def check(rec: dict, capability: int = 90) -> str:
    """``"OK"``, ``"SPILLS"`` (compiles, but registers spill to local memory: slow) or ``"FAIL: why"``."""
    if not rec.get("ok"):
        return "FAIL: " + (rec.get("error") or "did not compile").strip().splitlines()[0][:160]
    limit = SMEM_PER_BLOCK.get(capability, SMEM_PER_BLOCK[90])
    if rec["shared"] > limit:
        return f"FAIL: needs {rec['shared']} B of shared memory > {limit} B per program on sm_{capability}"
    if rec.get("spill_stores", 0) or rec.get("spill_loads", 0):
        return "SPILLS"
    return "OK"


def occupancy(rec: dict, capability: int = 90) -> int | None:
    """Programs per SM the registers and shared memory allow (an estimate: allocation granularity
    and the 1 KiB per-program reserve are approximated)."""
    if not rec.get("ok") or "registers" not in rec:
        return None
    threads = 32 * rec["num_warps"]
    by_regs = REGISTERS_PER_SM // max(1, -(-rec["registers"] // 8) * 8 * threads)
    smem = rec["shared"] + 1024
    by_smem = SMEM_PER_SM.get(capability, SMEM_PER_SM[90]) // smem
    return min(by_regs, by_smem, MAX_CTAS_PER_SM)


# ----------------------------------------------------------------------------------------------
# Kernel families at production shapes. Each case returns (function, abstract args); the function
# runs the kernels with interpret=False and, where a backward exists, differentiates them.
# ----------------------------------------------------------------------------------------------

def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def _dtype(size: int) -> Any:
    return jnp.float32 if size == 4 else jnp.bfloat16


def _total(*xs: jax.Array) -> jax.Array:
    return sum(jnp.sum(jnp.where(jnp.isfinite(x), x, 0).astype(jnp.float32)) for x in xs)


def _flash_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.pallas import flash

    def case(d, dtype, causal, s=4096, **kw):
        def loss(q, k, v):
            return _total(*flash.flash_attention(q, k, v, causal=causal, interpret=False, **kw))
        return jax.value_and_grad(loss, (0, 1, 2)), [_sds((1, s, 8, d), dtype), _sds((1, s, 2, d), dtype),
                                                    _sds((1, s, 2, d), dtype)]

    for d, size in sorted(flash.CONFIGS):
        for causal in (False, True):
            yield (f"d{d} {jnp.dtype(_dtype(size)).name}{' causal' if causal else ''}",
                   *case(d, _dtype(size), causal))
    yield "d128 bf16 causal window+softcap", *case(128, jnp.bfloat16, True, local_window_size=(1023, 0),
                                                    logits_soft_cap=30.0)
    seg = jnp.repeat(jnp.arange(8, dtype=jnp.int32), 512)[None]  # 8 packed documents
    yield "d128 bf16 causal segments", *case(128, jnp.bfloat16, True, q_segment_ids=seg, kv_segment_ids=seg)
    yield "d128 bf16 causal alibi", *case(128, jnp.bfloat16, True, alibi_slopes=jnp.geomspace(0.5, 2 ** -8, 8))
    # a ring attention hop: global positions read from an int32 [2] input (window and ALiBi over them)
    yield "d128 bf16 causal window+alibi position_offset", *case(
        128, jnp.bfloat16, True, local_window_size=(1023, 0), alibi_slopes=jnp.geomspace(0.5, 2 ** -8, 8),
        position_offset=(8192, 7168))
    # gpt-oss's layers: a sliding window with attention sinks (the forward reads one sink per head)
    yield "d128 bf16 causal window+sinks", *case(128, jnp.bfloat16, True, local_window_size=(127, 0),
                                                  sinks=jnp.zeros((8,), jnp.float32))
    yield "d128 bf16 causal dropout", *case(128, jnp.bfloat16, True, dropout_rate=0.1,
                                             dropout_seed=jnp.zeros((1,), jnp.int32))
    # (the score_mods bench attention times)
    from jaxattn.bench.attention import distance_penalty, relative_bias

    yield "d128 bf16 causal score_mod", *case(128, jnp.bfloat16, True, score_mod=distance_penalty)

    def table_loss(q, k, v, table):  # a learned relative-position bias table: gathers, and atomics in dq
        return _total(*flash.flash_attention(q, k, v, causal=True, score_mod=relative_bias, score_mod_tables=(table,),
                                             interpret=False))
    yield ("d128 bf16 causal score_mod table grad", jax.value_and_grad(table_loss, (0, 1, 2, 3)),
           [_sds((1, 4096, 8, 128), jnp.bfloat16), _sds((1, 4096, 2, 128), jnp.bfloat16),
            _sds((1, 4096, 2, 128), jnp.bfloat16), _sds((8, 2 * 4096 - 1), jnp.float32)])

    def ragged_loss(q, k, v):  # lengths off the tiles, head dims off the powers of two: masked tiles
        return _total(*flash.flash_attention(q, k, v, causal=True, interpret=False))
    yield ("d96/80 bf16 causal S=4001", jax.value_and_grad(ragged_loss, (0, 1, 2)),
           [_sds((1, 4001, 8, 96), jnp.bfloat16), _sds((1, 4001, 2, 96), jnp.bfloat16),
            _sds((1, 4001, 2, 80), jnp.bfloat16)])

    def bias_loss(q, k, v, bias):  # a learned bias [1, heads, S, S]: the dq kernel also writes its gradient
        return _total(*flash.flash_attention(q, k, v, causal=True, bias=bias, interpret=False))
    # (a length off the tiles: the bias and its gradient are read and written unpadded, masked)
    yield ("d128 bf16 causal bias grad S=2001", jax.value_and_grad(bias_loss, (0, 1, 2, 3)),
           [_sds((1, 2001, 8, 128), jnp.bfloat16), _sds((1, 2001, 2, 128), jnp.bfloat16),
            _sds((1, 2001, 2, 128), jnp.bfloat16), _sds((1, 8, 2001, 2001), jnp.bfloat16)])


def _lightning_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.pallas import lightning

    for d, size in sorted(lightning.CONFIGS):
        dtype = _dtype(size)

        def loss(q, k, v, s, s0):
            o, st = lightning.lightning_attention_kernel(q, k, v, s, s0, interpret=False)
            return _total(o, st)

        args = [_sds((1, 4096, 8, d), dtype)] * 3 + [_sds((8,), jnp.float32), _sds((1, 8, d, d), jnp.float32)]
        yield f"d{d} {jnp.dtype(dtype).name}", jax.grad(loss, (0, 1, 2, 4)), args
        if (d, size) == (128, 2):  # the chunked schemes' kernels, at the target head dim
            cfg = dataclasses.replace(lightning.CONFIGS[(d, size)], forward="chunked", backward="chunked")

            def chunked(q, k, v, s, s0, cfg=cfg):
                return _total(*lightning.lightning_attention_kernel(q, k, v, s, s0, config=cfg, interpret=False))

            yield f"d{d} {jnp.dtype(dtype).name} chunked", jax.grad(chunked, (0, 1, 2, 4)), args

            def packed(q, k, v, s, s0, seg):  # packed documents: the table's kernels with document masks
                return _total(*lightning.lightning_attention_kernel(q, k, v, s, s0, interpret=False, segment_ids=seg))

            # (the fused scan at this entry spills with or without documents: the table runs the chunked one)
            yield f"d{d} {jnp.dtype(dtype).name} packed", jax.grad(packed, (0, 1, 2, 4)), args + [_sds((1, 4096), jnp.int32)]


def _sage_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.pallas import sage

    for d in (64, 128):
        for gran, smooth_q, causal in (("block", False, False), ("warp", True, True)):
            def f(q, k, v, gran=gran, smooth_q=smooth_q, causal=causal):
                return sage.sage_attention_kernel(q, k, v, causal=causal, qk_granularity=gran,
                                                  smooth_q=smooth_q, interpret=False)

            args = [_sds((1, 8192, 8, d), jnp.bfloat16)] + [_sds((1, 8192, 8, d), jnp.bfloat16)] * 2
            yield f"d{d} {gran}{' smooth_q' if smooth_q else ''}{' causal' if causal else ''}", f, args


def _block_sparse_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.ops.block_sparse import BlockMask
    from jaxattn.pallas.block_sparse import block_sparse_attention_kernel

    for label, bm, d, dtype in (("power n=16384 B=256 d128 bf16", BlockMask.power(16384, 256), 128, jnp.bfloat16),
                                ("sliding window d64 f16", BlockMask.sliding_window(8192, 128, window=2048), 64,
                                 jnp.float16)):
        def loss(q, k, v, bm=bm):
            return _total(*block_sparse_attention_kernel(
                q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
                kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
                interpret=False))

        args = [_sds((1, bm.q_len, 8, d), dtype)] + [_sds((1, bm.kv_len, 8, d), dtype)] * 2
        yield label, jax.value_and_grad(loss, (0, 1, 2)), args


def _halo_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.ops import halo
    from jaxattn.pallas.halo import HaloConfig

    for hw, d, stride, scheme in ((64, 32, 1, "keys"), (32, 64, 1, "keys"), (64, 32, 2, "keys"),
                                  (64, 32, 1, "windows")):
        block, hsize, heads = 8, 3, 8
        win = block + 2 * hsize
        shapes = [(8, hw // stride, hw // stride, heads, d), (8, hw, hw, heads, d), (8, hw, hw, heads, d),
                  (2 * win - 1, d), (2 * win - 1, d)]

        def loss(*a, stride=stride, d=d, scheme=scheme):
            return _total(halo._halo(*a, block_size=8, halo_size=3, stride=stride, scale=d ** -0.5,
                                     scale_pos_embed=False, mask_padding=False, use_kernel=True,
                                     interpret=False, config=HaloConfig(backward=scheme)))

        label = f"{hw}x{hw} heads 8 d{d} b8 h3 stride {stride} bf16" + (" windows bwd" if scheme == "windows" else "")
        yield label, jax.grad(loss, argnums=range(5)), [_sds(s, jnp.bfloat16) for s in shapes]


def _landmark_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.ops.landmark import landmark_attention

    for d, dtype in ((128, jnp.bfloat16), (64, jnp.float32)):
        def loss(q, k, v):
            return _total(landmark_attention(q, k, v, block_len=64, impl="pallas", interpret=False))

        args = [_sds((1, 8192, 8, d), dtype)] + [_sds((1, 8192, 2, d), dtype)] * 2
        yield f"block 64 d{d} {jnp.dtype(dtype).name}", jax.value_and_grad(loss, (0, 1, 2)), args


def _decode_cases() -> Iterator[tuple[str, Callable, list]]:
    from jaxattn.pallas import decode

    def f(q, k, v, n):
        return decode.decode_attention_kernel(q, k, v, n, interpret=False)

    for d, size in sorted(decode.CONFIGS):
        dtype = _dtype(size)
        args = [_sds((8, 1, 32, d), dtype), _sds((8, 32768, 8, d), dtype), _sds((8, 32768, 8, d), dtype),
                _sds((8,), jnp.int32)]
        yield f"d{d} {jnp.dtype(dtype).name}", f, args

    yield ("d80 bfloat16 cache 32767 rows", f, [_sds((8, 1, 32, 80), jnp.bfloat16),
                                                *[_sds((8, 32767, 8, 80), jnp.bfloat16)] * 2, _sds((8,), jnp.int32)])

    def alibi(q, k, v, n):
        return decode.decode_attention_kernel(q, k, v, n, alibi_slopes=jnp.geomspace(0.5, 2 ** -8, 32),
                                              interpret=False)

    yield ("alibi d128 bfloat16", alibi, [_sds((8, 1, 32, 128), jnp.bfloat16),
                                          *[_sds((8, 32768, 8, 128), jnp.bfloat16)] * 2, _sds((8,), jnp.int32)])
    def fp8(q, k, v, n):
        return decode.decode_attention_kernel(q, k, v, n, k_scale=jnp.ones(8), v_scale=jnp.ones(8), interpret=False)

    yield ("fp8 cache d128 bfloat16", fp8, [_sds((8, 1, 32, 128), jnp.bfloat16),
                                            *[_sds((8, 32768, 8, 128), jnp.float8_e4m3fn)] * 2, _sds((8,), jnp.int32)])
    for (lat, size), _ in sorted(decode.LATENT_CONFIGS.items()):  # MLA's latent cache (DeepSeek-V3: 512 + 64)
        def latent(q, cache, n, lat=lat):
            return decode.latent_decode_attention_kernel(q, cache, n, value_dim=lat, interpret=False)

        dtype = _dtype(size)
        yield (f"latent {lat}+64 {jnp.dtype(dtype).name} 128 heads", latent,
               [_sds((8, 1, 128, lat + 64), dtype), _sds((8, 32768, 1, lat + 64), dtype), _sds((8,), jnp.int32)])

    def paged_latent(q, pool, tables, n):  # FlashMLA's layout: 64-row pages, two new tokens (speculative)
        return decode.latent_decode_attention_kernel(q, pool, n, value_dim=512, block_tables=tables, interpret=False)

    yield ("paged64 latent 512+64 bfloat16 128 heads", paged_latent,
           [_sds((8, 2, 128, 576), jnp.bfloat16), _sds((8 * 512, 64, 1, 576), jnp.bfloat16), _sds((8, 512), jnp.int32),
            _sds((8,), jnp.int32)])

    def fp8_latent(q, pool, tables, n):  # an FP8 latent cache (DeepSeek's FP8 KV), paged
        return decode.latent_decode_attention_kernel(q, pool, n, value_dim=512, block_tables=tables,
                                                     cache_scale=jnp.ones(1), interpret=False)

    yield ("paged64 fp8 latent 512+64 bfloat16 128 heads", fp8_latent,
           [_sds((8, 1, 128, 576), jnp.bfloat16), _sds((8 * 512, 64, 1, 576), jnp.float8_e4m3fn),
            _sds((8, 512), jnp.int32), _sds((8,), jnp.int32)])
    for page in (16, 128):  # paged cache: a 32k context per row in pages
        def paged(q, kp, vp, tables, n):
            return decode.paged_decode_attention_kernel(q, kp, vp, tables, n, interpret=False)

        pool = _sds((8 * 32768 // page, page, 8, 128), jnp.bfloat16)
        yield (f"paged{page} d128 bfloat16", paged,
               [_sds((8, 1, 32, 128), jnp.bfloat16), pool, pool, _sds((8, 32768 // page), jnp.int32),
                _sds((8,), jnp.int32)])


def _mosaic_cases() -> Iterator[tuple[str, Callable, list]]:
    """The Mosaic GPU forwards (``impl="mosaic"``): every table config, causal or not, the in-place
    P V form, Sage and block-sparse modes, and one differentiated case (its Triton backward).
    Only ``--compiler xla`` compiles Mosaic kernels (the ``triton`` path sees the backward only)."""
    from jaxattn.ops.block_sparse import BlockMask
    from jaxattn.pallas import flash, flash_mgpu, sage

    for d in sorted(flash_mgpu.CONFIGS):
        for causal in (False, True):
            for inplace in (False, True):
                cfg = dataclasses.replace(flash_mgpu.CONFIGS[d], inplace_pv=inplace)

                def f(q, k, v, causal=causal, cfg=cfg):
                    return flash.flash_attention(q, k, v, causal=causal, backend="mosaic", mosaic_config=cfg,
                                                 interpret=False)[0]

                args = [_sds((1, 8192, 8, d), jnp.bfloat16)] + [_sds((1, 8192, 2, d), jnp.bfloat16)] * 2
                yield f"d{d} bf16{' causal' if causal else ''}{' in-place PV' if inplace else ''}", f, args

    def loss(q, k, v):
        return _total(flash.flash_attention(q, k, v, causal=True, backend="mosaic", interpret=False)[0])

    yield ("d128 bf16 causal fwd+bwd", jax.value_and_grad(loss, (0, 1, 2)),
           [_sds((1, 8192, 8, 128), jnp.bfloat16)] + [_sds((1, 8192, 2, 128), jnp.bfloat16)] * 2)
    for d in sorted(flash_mgpu.CONFIGS):
        for causal in (False, True):
            # (smooth_q on the non-causal case: causal with smooth_q at d128 spills 16 B, a non-default pair)
            def sg(q, k, v, causal=causal, smooth_q=not causal):
                return sage.sage_attention_kernel(q, k, v, causal=causal, smooth_q=smooth_q, backend="mosaic",
                                                  interpret=False)

            yield (f"sage d{d}{' causal' if causal else ' smooth_q'}", sg,
                   [_sds((1, 8192, 8, d), jnp.bfloat16)] * 3)
    bm = BlockMask.power(16384, 256)

    def sparse(q, k, v):
        from jaxattn.pallas.block_sparse import block_sparse_attention_kernel

        return block_sparse_attention_kernel(
            q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
            kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
            backend="mosaic", interpret=False)[0]

    yield "block-sparse power n=16384 B=256 d128", sparse, [_sds((1, 16384, 8, 128), jnp.bfloat16)] * 3


def _linear_global_cases() -> Iterator[tuple[str, Callable, list]]:
    """The L2ViT kernels (forward and backward) at the table entries ``impl="auto"`` runs."""
    from jaxattn.pallas.linear_global import AUTO_MAX_HEAD_DIM, CONFIGS, linear_global_kernel

    for d, nbytes in sorted(CONFIGS):
        dtype = jnp.float32 if nbytes == 4 else jnp.bfloat16
        if d < 32 or d > AUTO_MAX_HEAD_DIM[nbytes]:
            continue

        def loss(q, k, v, tau):
            return _total(linear_global_kernel(q, k, v, tau, clamp=100.0, interpret=False))

        heads = max(1, 2048 // d)  # L2ViT-like width: 2048 channels
        yield (f"n=4096 heads {heads} d{d} {jnp.dtype(dtype).name}", jax.value_and_grad(loss, (0, 1, 2, 3)),
               [_sds((4, 4096, heads, d), dtype)] * 3 + [_sds((heads,), jnp.float32)])


def _grouped_matmul_cases() -> Iterator[tuple[str, Callable, list]]:
    """The grouped matmul kernels (forward, dlhs, drhs) at each config, on gpt-oss-20b's expert shapes."""
    from jaxattn.ops.mxfp4 import MXFP4, packed_rows
    from jaxattn.pallas.grouped_matmul import CONFIGS, grouped_matmul_kernel

    for nbytes in sorted(CONFIGS):
        dtype = _dtype(nbytes)

        def loss(lhs, rhs, sizes):
            return _total(grouped_matmul_kernel(lhs, rhs, sizes, out_dtype=jnp.float32, interpret=False))

        yield (f"{jnp.dtype(dtype).name} rows 16384 x 2880 -> 5760, 32 groups", jax.value_and_grad(loss, (0, 1)),
               [_sds((16384, 2880), dtype), _sds((32, 2880, 5760), dtype), _sds((32,), jnp.int32)])

        def loss_mxfp4(lhs, packed, sizes):  # (gpt-oss's packed experts: the lhs gradient only)
            return _total(grouped_matmul_kernel(lhs, MXFP4(packed), sizes, out_dtype=jnp.float32, interpret=False))

        yield (f"{jnp.dtype(dtype).name} mxfp4 rows 16384 x 2880 -> 5760, 32 groups", jax.value_and_grad(loss_mxfp4),
               [_sds((16384, 2880), dtype), _sds((32, packed_rows(2880), 5760), jnp.uint8), _sds((32,), jnp.int32)])


def _gated_delta_cases() -> Iterator[tuple[str, Callable, list]]:
    """The gated delta rule's chunked forward and backward kernels at Gated DeltaNet's head dims (Qwen3-Next:
    128 / 128), and Kimi Delta Attention's (a decay per key channel)."""
    from jaxattn.pallas.gated_delta import gated_delta_kernel

    def fwd(q, k, v, g, beta):
        return gated_delta_kernel(q, k, v, g, beta, scale=0.088, interpret=False)

    def loss(q, k, v, g, beta):
        o, s = fwd(q, k, v, g, beta)
        return _total(o) + jnp.sum(s)

    def packed_loss(q, k, v, g, beta, seg):  # packed documents: the segment masks in both kernels
        o, s = gated_delta_kernel(q, k, v, g, beta, scale=0.088, segment_ids=seg, interpret=False)
        return _total(o) + jnp.sum(s)

    for dk, dv in ((128, 128), (64, 64)):
        dtype = jnp.bfloat16
        args = [_sds((2, 4096, 16, dk), dtype), _sds((2, 4096, 16, dk), dtype), _sds((2, 4096, 16, dv), dtype),
                _sds((2, 4096, 16), jnp.float32), _sds((2, 4096, 16), jnp.float32)]
        yield f"dk{dk} dv{dv} bfloat16 n=4096", fwd, args
        yield f"dk{dk} dv{dv} bfloat16 n=4096 fwd+bwd", jax.value_and_grad(loss, (0, 1, 2, 3, 4)), args
    yield ("dk128 dv128 bfloat16 n=4096 packed fwd+bwd", jax.value_and_grad(packed_loss, (0, 1, 2, 3, 4)),
           [_sds((2, 4096, 16, 128), jnp.bfloat16), _sds((2, 4096, 16, 128), jnp.bfloat16),
            _sds((2, 4096, 16, 128), jnp.bfloat16), _sds((2, 4096, 16), jnp.float32), _sds((2, 4096, 16), jnp.float32),
            _sds((2, 4096), jnp.int32)])
    kda = [_sds((2, 4096, 16, 128), jnp.bfloat16)] * 3 + [_sds((2, 4096, 16, 128), jnp.float32),
                                                          _sds((2, 4096, 16), jnp.float32)]
    yield "dk128 dv128 bfloat16 n=4096 per-channel decays", fwd, kda  # Kimi Delta Attention
    yield "dk128 dv128 bfloat16 n=4096 per-channel decays fwd+bwd", jax.value_and_grad(loss, (0, 1, 2, 3, 4)), kda

    def varlen_loss(q, k, v, g, beta, s0, begin, end):  # documents on chunk boundaries, each with its own states
        o, s = gated_delta_kernel(q, k, v, g, beta, scale=0.088, initial_state=s0, documents=(begin, end),
                                  interpret=False)
        return _total(o) + jnp.sum(s)

    def gla_loss(q, k, v, g):  # gated linear attention (delta=False): Mamba-2's SSD, GLA per key channel
        o, s = gated_delta_kernel(q, k, v, g, None, scale=0.088, delta=False, interpret=False)
        return _total(o) + jnp.sum(s)

    for label, g in (("", (2, 4096, 16)), (" per-channel decays", (2, 4096, 16, 128))):
        yield (f"gated linear dk128 dv128 bfloat16 n=4096{label} fwd+bwd", jax.value_and_grad(gla_loss, (0, 1, 2, 3)),
               [*[_sds((2, 4096, 16, 128), jnp.bfloat16)] * 3, _sds(g, jnp.float32)])
    for label, g in (("", (1, 8192, 16)), (" per-channel decays", (1, 8192, 16, 128))):
        yield (f"dk128 dv128 bfloat16 n=8192 varlen 32 documents{label} fwd+bwd",
               jax.value_and_grad(varlen_loss, (0, 1, 2, 3, 4, 5)),
               [*[_sds((1, 8192, 16, 128), jnp.bfloat16)] * 3, _sds(g, jnp.float32), _sds((1, 8192, 16), jnp.float32),
                _sds((32, 16, 128, 128), jnp.float32), *[_sds((32,), jnp.int32)] * 2])


FAMILIES: dict[str, Callable[[], Iterable[tuple[str, Callable, list]]]] = {
    "flash": _flash_cases, "lightning": _lightning_cases, "sage": _sage_cases,
    "block_sparse": _block_sparse_cases, "halo": _halo_cases, "landmark": _landmark_cases,
    "decode": _decode_cases, "mosaic": _mosaic_cases, "linear_global": _linear_global_cases,
    "grouped_matmul": _grouped_matmul_cases, "gated_delta": _gated_delta_cases,
}


def family_cases(families: Iterable[str] | None = None) -> Iterator[tuple[str, str, Callable, list]]:
    """(family, case label, function, abstract args) for the named families (default: all)."""
    for fam in families or FAMILIES:
        if fam not in FAMILIES:
            raise ValueError(f"unknown kernel family {fam!r}; expected one of {sorted(FAMILIES)}")
        for label, fn, args in FAMILIES[fam]():
            yield fam, label, fn, args


def run(families: Iterable[str] | None = None, *, capability: int = 90, python: str | None = None,
        progress: bool = True) -> list[dict]:
    """Lowers every case, compiles its distinct kernels in one worker, and returns the records."""
    kernels: dict[TritonKernel, tuple[str, str]] = {}  # first (family, case) that lowers to each
    for fam, label, fn, args in family_cases(families):
        if progress:
            print(f"lowering {fam}: {label}", file=sys.stderr)
        for k in triton_kernels(lower_for_cuda(fn, *args)):
            kernels.setdefault(k, (fam, label))
    if progress:
        print(f"compiling {len(kernels)} kernels for sm_{capability} ...", file=sys.stderr)
    records = compile_kernels(list(kernels), capability=capability, python=python)
    for rec, (fam, label) in zip(records, kernels.values()):
        rec.update(family=fam, case=label, status=check(rec, capability), ctas_per_sm=occupancy(rec, capability))
    return records


def format_records(records: Sequence[dict]) -> str:
    """A markdown table, one row per kernel."""
    head = ("| family | case | kernel | warps | stages | grid | smem KiB | regs | spill B | MMA | CTAs/SM | "
            "compile s | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in records:
        cells = [r["family"], r["case"], r["kernel"], r["num_warps"], r["num_stages"], "x".join(map(str, r["grid"]))]
        if r.get("ok"):
            cells += [f"{r['shared'] / 1024:.1f}", r.get("registers", ""),
                      r.get("spill_stores", 0) + r.get("spill_loads", 0),
                      " ".join(r.get("mma_types") or []) or ("wgmma" if r.get("wgmma") else "mma" if r.get("mma")
                                                              else "none"), r.get("ctas_per_sm") or ""]
        else:
            cells += [""] * 5
        cells += [r.get("seconds", ""), r["status"]]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)
