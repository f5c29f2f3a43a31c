"""Every Mosaic GPU kernel (``impl="mosaic"``) and the flash kernels' Triton forward and backward
compile for an H100 (sm_90a) with XLA's own GPU compiler on this CPU-only machine
(:mod:`jaxattn.bench.aot`: jaxlib's CUDA plugin, the ``aot`` extra): Mosaic's LLVM pipeline and
ptxas accept them, they use WGMMA, fit one program's shared memory, and spill no registers.
Interpret mode checks the kernels' arithmetic; this checks what only a GPU compiler can."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from jaxattn.bench import aot
from jaxattn.bench import compile as cc

needs_aot = pytest.mark.skipif(aot.available() is not None,
                               reason=str(aot.available()) + " (pip install -e '.[aot]')")

MOSAIC_CASES = list(cc.FAMILIES["mosaic"]())


@needs_aot
@pytest.mark.parametrize("label,fn,args", MOSAIC_CASES, ids=[c[0] for c in MOSAIC_CASES])
def test_mosaic_kernels_compile_for_h100(label, fn, args):
    res = aot.compile_case(fn, args)
    assert res["ok"], res.get("error")
    mosaic = [k for k in res["kernels"] if k["backend"] == "mosaic"]
    assert len(mosaic) == 1, res["kernels"]
    k = mosaic[0]
    assert k["kernel"].startswith("jaxattn_mosaic_"), k
    assert aot.check(k) == "OK", k
    assert k["wgmma"] and 0 < k["shared"] <= aot.SMEM_PER_BLOCK, k
    # three warpgroups of 128 threads share the register file at launch (setmaxnreg rebalances it)
    assert 3 * 128 * k["registers"] <= aot.REGISTERS_PER_BLOCK, k
    for t in res["kernels"]:  # the Triton kernels the case also runs (quantisation, backward)
        assert t["backend"] == "mosaic" or aot.check(t) == "OK", t


@needs_aot
def test_flash_triton_kernels_compile_for_h100():
    """The flash forward, dq and dk/dv kernels at the target configuration (d128, bf16, causal):
    XLA's Triton emits WGMMA and no kernel spills; each softmax weight's exponent is one FMA per
    score in the forward and both backward kernels (``_common.fma``: at
    least a score tile's share per thread)."""
    from jaxattn.pallas import flash

    def loss(q, k, v):
        return jnp.sum(flash.flash_attention(q, k, v, causal=True, interpret=False)[0].astype(jnp.float32))

    q = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    with jax.default_matmul_precision("default"):
        res = aot.compile_case(jax.grad(loss, (0, 1, 2)), [q, kv, kv])
    assert res["ok"], res.get("error")
    kernels = {k["kernel"]: k for k in res["kernels"]}
    assert set(kernels) == {"jaxattn_flash_fwd", "jaxattn_flash_dq", "jaxattn_flash_dkdv"}, kernels
    variants = {k.get("variant") for k in kernels.values()}  # (the IR digests `bench compile` dedups cases by)
    assert variants == {None} or (len(variants) == 3 and None not in variants), variants  # (None: jax >= 0.11)
    assert tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11) or None not in variants, variants
    for k in kernels.values():
        assert k["wgmma"], k
        if "registers" in k:  # (a ptxas that reads XLA's PTX: the triton package's)
            assert aot.check(k) == "OK", k
    cfg = flash.flash_config(128, jnp.bfloat16)
    for name, tile, warps in (("fwd", cfg.block_q * cfg.block_k, cfg.num_warps),
                              ("dq", cfg.block_q_dq * cfg.block_k_dq, cfg.num_warps_bwd),
                              ("dkdv", cfg.block_q_dkv * cfg.block_k_dkv, cfg.num_warps_bwd)):
        assert kernels[f"jaxattn_flash_{name}"]["fma_f32"] >= tile // (32 * warps), kernels[f"jaxattn_flash_{name}"]


@needs_aot
def test_block_sparse_kernels_pipeline_as_deep_as_dense():
    """The block-sparse kernels read their key-block ids from a list; each loop iteration reads
    the next tile's id (``flash._loop_lists``), so Triton's software pipeline keeps as many K/V
    copies in flight in every loop as in the dense kernels' (reading the tile's own id, the
    forward's full-block loop lost a stage to that read: wait_group 0 where dense has 2)."""
    from jaxattn.ops.block_sparse import BlockMask
    from jaxattn.pallas import block_sparse, flash

    bm = BlockMask.power(4096, 256)

    def sparse(q, k, v):
        return jnp.sum(block_sparse.block_sparse_attention_kernel(
            q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
            kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
            interpret=False)[0].astype(jnp.float32))

    def dense(q, k, v):
        return jnp.sum(flash.flash_attention(q, k, v, interpret=False)[0].astype(jnp.float32))

    x = jax.ShapeDtypeStruct((1, 4096, 4, 128), jnp.bfloat16)
    waits = {}
    for name, fn in (("sparse", sparse), ("dense", dense)):
        res = aot.compile_case(jax.grad(fn, (0, 1, 2)), [x, x, x])
        assert res["ok"], res.get("error")
        waits[name] = {k["kernel"]: aot.loop_waits(k) for k in res["kernels"]}
    for kernel in ("jaxattn_flash_fwd", "jaxattn_flash_dq", "jaxattn_flash_dkdv"):
        [dense_wait] = set(waits["dense"][kernel])
        # full blocks, then partial ones (the dk/dv kernel: per GQA group member too)
        assert waits["sparse"][kernel] and set(waits["sparse"][kernel]) == {dense_wait}, (kernel, waits)
    assert waits["dense"]["jaxattn_flash_fwd"][0] > 0, waits  # (bf16 d128: three stages)


@needs_aot
def test_paged_decode_pipelines_as_deep_as_dense():
    """The paged decode kernel reads each key block's page from the block table one iteration
    ahead (``_common.listed_loop``): its loops keep as many copies in flight as the dense-cache
    kernel's (reading the page in the iteration that loads it, they kept none: 0 against 2)."""
    cases = {label: (fn, args) for _, label, fn, args in cc.family_cases(["decode"])}
    waits = {}
    for label in ("d128 bfloat16", "paged16 d128 bfloat16", "paged128 d128 bfloat16"):
        res = aot.compile_case(*cases[label])
        assert res["ok"], res.get("error")
        [k] = [k for k in res["kernels"] if k["kernel"] == "jaxattn_decode"]
        waits[label] = aot.loop_waits(k)
    assert waits["d128 bfloat16"] and min(waits["d128 bfloat16"]) > 0, waits
    assert waits["paged16 d128 bfloat16"] == waits["paged128 d128 bfloat16"] == waits["d128 bfloat16"], waits


@needs_aot
def test_landmark_kernels_one_exponent_per_score():
    """Landmark attention's kernels (block 64, d128, bf16) take one base-2 exponent per score, as
    flash attention: no natural ``exp`` (its range reduction is an ``fma.rm``) and, in every loop,
    ``ex2`` per WGMMA below what a second exponent per score would give. Per earlier-block tile,
    the forward issues 12 WGMMAs (m64, two dots) for 32 scores per thread (4 warps), the dq kernel
    20 for 16 (8 warps), the dk/dv kernel 20 for 16; the kernels before 2026-12-05 took 2 (forward)
    and 3 (backward) exponents per score: 5.5, 2.7 and 2.4 ex2 per WGMMA."""
    cases = [c for c in cc.FAMILIES["landmark"]() if c[0] == "block 64 d128 bfloat16"]
    assert len(cases) == 1, cc.FAMILIES["landmark"]()
    with jax.default_matmul_precision("default"):
        res = aot.compile_case(*cases[0][1:])
    assert res["ok"], res.get("error")
    kernels = {k["kernel"]: k for k in res["kernels"]}
    bounds = {"jaxattn_landmark_fwd": 4.0, "jaxattn_landmark_dq": 1.5, "jaxattn_landmark_dkdv": 1.5}
    assert set(bounds) <= set(kernels), kernels
    for name, bound in bounds.items():
        k = kernels[name]
        assert k["natural_exp"] == 0, k
        loops = [lp for lp in k["loops"] if lp["wgmma"]]
        assert loops and all(lp["ex2"] <= bound * lp["wgmma"] for lp in loops), (name, loops)


@needs_aot
def test_sage_kernel_softmax_instructions():
    """The Sage attention kernel (d128, bf16): WGMMA for both dots, the int32 scores converted
    without ``cvt.rn.f32.s32`` (exp2's rate on Hopper; ``sage.exact_float``), and one FMA per score
    for the exponent and per accumulator element for the FP8 partial."""
    from jaxattn.pallas import sage

    x = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16)
    with jax.default_matmul_precision("default"):
        res = aot.compile_case(lambda q, k, v: sage.sage_attention_kernel(q, k, v, interpret=False), [x, x, x])
    assert res["ok"], res.get("error")
    [k] = [k for k in res["kernels"] if k["kernel"] == "jaxattn_sage_fwd"]
    cfg = sage.sage_config(128)
    per_thread = cfg.block_q * cfg.block_k // (32 * cfg.num_warps)
    assert k["wgmma"] and k["i2f"] == 0 and k["fma_f32"] >= 2 * per_thread, k


LINEAR_GLOBAL_CASES = list(cc.FAMILIES["linear_global"]())


@needs_aot
@pytest.mark.parametrize("label,fn,args", LINEAR_GLOBAL_CASES, ids=[c[0] for c in LINEAR_GLOBAL_CASES])
def test_linear_global_kernels_compile_for_h100(label, fn, args):
    """L2ViT's four kernels at every table entry impl="auto" runs: no spills; two-byte ones on WGMMA."""
    res = aot.compile_case(fn, args)
    assert res["ok"], res.get("error")
    kernels = {k["kernel"]: k for k in res["kernels"]}
    assert {"jaxattn_l2vit_state", "jaxattn_l2vit_out"} <= set(kernels), kernels
    for k in kernels.values():
        if "registers" in k:
            assert aot.check(k) == "OK", k
    if "bfloat16" in label:
        assert kernels["jaxattn_l2vit_out"]["wgmma"], kernels


@needs_aot
@pytest.mark.parametrize("op", ["attention", "halo", "halo_kv", "linear_global", "lightning"])
def test_ops_run_no_xla_work_around_their_kernels(op):
    """``bench traffic``: the forward and the forward + backward of these ops are their kernels
    and at most 5 % of the kernels' bytes in XLA ops (attention: the backward's ``rowsum(dO * O)``;
    halo: the relative logits are projected, and their cotangent taken back to q and to the tables,
    in-kernel; L2ViT: the small [d, e] state's hi/lo split; Lightning: no zero initial state), and
    the count can fail: XLA's own graph of the same op writes far more."""
    from jaxattn.bench import traffic

    records = {r["mode"]: r for r in traffic.run([op], progress=False)}
    assert set(records) == {"fwd", "fwd+bwd"}
    for mode, rec in records.items():
        assert rec["kernels"] >= (1 if mode == "fwd" else 3), rec
        # (Lightning: no zero state; halo_kv: no slices of the packed kv map, no concatenated dk, dv)
        assert rec["xla_bytes"] <= (0.05 * rec["kernel_bytes"] if op in ("attention", "linear_global") else
                                    0.001 * rec["kernel_bytes"]), rec
    fwd = records["fwd"]
    if op == "linear_global":
        import jaxattn

        xla = traffic.summarize(traffic.compiled_ops(
            lambda q, k, v, t: jaxattn.linear_global_attention(q, k, v, temperature=t, impl="xla"),
            [jax.ShapeDtypeStruct((16, 4096, 32, 64), jnp.bfloat16)] * 3 + [jax.ShapeDtypeStruct((32,), jnp.float32)]))
        assert xla["kernels"] == 0 and xla["xla_bytes"] > 4 * fwd["kernel_bytes"], xla


@needs_aot
def test_lm_step_traffic():
    """``bench traffic --lm-step``: a TNL training step compiled for the H100 runs the Lightning
    kernels, and no XLA op writes a logits-sized scatter-add (the fused cross-entropy's point)."""
    from jaxattn.bench import traffic
    from jaxattn.models import MODEL_CONFIGS

    ops = traffic.lm_step_ops("tnl-tiny", batch=2, seq=64)
    kernels = {o["kernel"] for o in ops if "kernel" in o}
    assert any(k.startswith("jaxattn_lightning") for k in kernels), kernels
    logits_bytes = 2 * 64 * MODEL_CONFIGS["tnl-tiny"].vocab_size * 4
    # (the embedding's gradient is a scatter too, of [vocab, dim]: smaller here)
    assert not [o for o in ops if "scatter" in o["source"] and o["bytes"] >= logits_bytes], ops
    groups = traffic.by_source(ops)
    assert groups and groups == sorted(groups, key=lambda g: -g["bytes"])


def test_hlo_op_bytes():
    from jaxattn.bench.traffic import hlo_ops, shape_bytes

    assert shape_bytes("(bf16[2,8]{1,0}, f32[3]{0})") == 2 * 16 + 12
    hlo = """HloModule m
ENTRY %main (p: bf16[4,4]) -> bf16[4,4] {
  %p = bf16[4,4]{1,0} parameter(0)
  %fusion.1 = f32[4,4]{1,0} fusion(%p), kind=kLoop, calls=%c
  ROOT %k = bf16[4,4]{1,0} custom-call(%fusion.1), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "jaxattn_x"}
}
"""
    ops = hlo_ops(hlo)
    assert [(o["name"], o["bytes"], o.get("kernel")) for o in ops] == [("fusion.1", 64, None), ("k", 32, "jaxattn_x")]


@needs_aot
def test_a_kernel_that_cannot_fit_fails():
    """The check can fail: a Mosaic config whose K/V ring exceeds shared memory does not compile."""
    import dataclasses

    from jaxattn.pallas import flash, flash_mgpu

    cfg = dataclasses.replace(flash_mgpu.CONFIGS[128], block_kv=256, stages=4)  # 4 x 2 x 64 KiB

    def f(q, k, v):
        return flash.flash_attention(q, k, v, backend="mosaic", mosaic_config=cfg, interpret=False)[0]

    q = jax.ShapeDtypeStruct((1, 4096, 4, 128), jnp.bfloat16)
    res = aot.compile_case(f, [q, q, q])
    assert not res["ok"] and "shared memory" in res["error"], res


def test_parse_ptxas():
    text = """ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers"""
    assert aot.parse_ptxas(text) == {"k1": {"stack": 8, "spill_stores": 16, "spill_loads": 24, "registers": 255}}
    assert aot.check({"spill_stores": 16}) == "SPILLS"
    assert aot.check({"shared": aot.SMEM_PER_BLOCK + 1}).startswith("FAIL")


def test_compile_for_gpu_builds_the_gpu_kernels_on_a_cpu():
    """Inside ``compile_for_gpu()`` a trace builds the GPU kernels (impl="auto" picks them, none
    interpreted), as the compile-only sweeps need; outside, on a CPU, auto stays on XLA."""
    import jaxattn
    from jaxattn.bench.compile import lower_for_cuda
    from jaxattn.pallas import _common

    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)

    def f(q, k, v):
        return jaxattn.attention(q, k, v, causal=True)

    with _common.compile_for_gpu():
        assert _common.targets_gpu() and not _common.interpret_default()
        text = lower_for_cuda(f, q, q, q).as_text()
    assert "__gpu$xla.gpu.triton" in text
    if jax.default_backend() != "gpu":  # (a fresh function: jit caches traces by function)
        assert "__gpu$xla.gpu.triton" not in lower_for_cuda(lambda *a: f(*a), q, q, q).as_text()
        assert _common.interpret_default()


@needs_aot
def test_sweep_compile_only_mode():
    """``bench attention --compile-only``: every JAX peer of a GPU case is compiled for the
    compile-only H100 instead of timed (cuDNN may be missing here); none is timed."""
    from jaxattn.bench import attention

    case = attention.Case(1, 1024, 4, 128, True, "bfloat16", "fwd")
    recs = {r["impl"]: r for r in attention.run([case], warmup=0, runs=1, interpret=False, progress=False,
                                                 compile_only=True)}
    assert {"jaxattn", "xla", "jaxattn-mosaic", "jax-pallas"} <= set(recs), recs
    for name, r in recs.items():
        assert r["ms"] is None
        assert "compile_s" in r or "cuDNN" in r.get("error", ""), (name, r)


@needs_aot
@pytest.mark.slow  # (whole-model steps; each kernel's own CUDA compile is in the default suite)
def test_model_steps_compile_only(tmp_path, capsys):
    """``bench tnl`` / ``bench vision`` with ``--compile-only``: the jitted training and inference
    steps of whole models (abstract weights: nothing allocated) compile for the H100."""
    import json

    from jaxattn.bench.__main__ import main

    out = tmp_path / "tnl.json"
    assert main(["tnl", "--model", "tnl-tiny", "--batch", "2", "--seq", "256", "--compile-only",
                 "--json", str(out)]) == 0
    [rec] = json.loads(out.read_text())["records"]
    assert rec["compile_s"] > 0 and "ms" not in rec
    out = tmp_path / "vision.json"
    assert main(["vision", "--train-models", "vit-tiny", "--infer-models", "vit-tiny", "--batch", "2",
                 "--compile-only", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [r["mode"] for r in recs] == ["train", "infer", "infer-quantized"]
    assert all(r.get("compile_s", 0) > 0 for r in recs), recs
    assert "compiled in" in capsys.readouterr().out


@needs_aot
@pytest.mark.slow
def test_remat_step_keeps_less_for_the_backward():
    """The LM trainer's --remat, compiled for the H100: the step's scratch memory (the activations
    kept for the backward) shrinks (tnl-385m at batch 8 x 2048: 17.6 -> 2.9 GiB)."""
    from jaxattn.bench.tnl import train_step_throughput

    kw = dict(batch=8, seq=1024, dtype="bfloat16", steps=1, compile_only=True)
    plain = train_step_throughput("tnl-tiny", **kw)
    remat = train_step_throughput("tnl-tiny", remat=True, **kw)
    assert remat["remat"] and not plain["remat"]
    assert 0 < remat["temp_gib"] < 0.5 * plain["temp_gib"], (plain, remat)


@needs_aot
@pytest.mark.slow
def test_gpu_dry_run(tmp_path):
    """``.ci/gpu-dry``: every sweep ``.ci/gpu`` runs compiles for the compile-only H100 (cuDNN aside)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(["bash", str(root / ".ci" / "gpu-dry")], capture_output=True, text=True, timeout=2400,
                         env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "no failures" in run.stdout


@pytest.mark.slow
@needs_aot
def test_image_step_traffic_cli(capsys, tmp_path):
    """``bench traffic --image-step``: a HaloNet training step compiled for the H100 runs all four
    halo kernels (forward, dq, dk/dv, the tables' gradient) and prints the grouped table."""
    from jaxattn.bench.__main__ import main

    path = tmp_path / "t.json"
    assert main(["traffic", "--image-step", "halonet-tiny", "--batch", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "halonet-tiny training step, batch 2" in out and "jaxattn_halo_dq" in out, out
    kernels = {r["what"] for r in json.loads(path.read_text())["records"]}
    assert {"jaxattn_halo_fwd", "jaxattn_halo_dq", "jaxattn_halo_dkv", "jaxattn_halo_dtab"} <= kernels, kernels
    assert main(["traffic", "--image-step", "halonet-tiny", "--lm-step", "tnl-tiny"]) == 2
    assert main(["traffic", "--image-step", "vit-s"]) == 2
    assert "unknown model 'vit-s'" in capsys.readouterr().err
