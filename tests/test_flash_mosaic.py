"""The Mosaic GPU (FlashAttention-3) forward, ``jaxattn.attention(impl="mosaic")``: on a CPU it
runs in Mosaic GPU's interpret mode (warpgroups, mbarriers and TMA copies simulated; unwritten
memory reads as NaN), against the fp32 oracle, forward, lse and gradients (the backward is the
Triton kernels'), over seeded random shapes; its race detector; every configuration lowers for
CUDA; unsupported input raises."""

from __future__ import annotations

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, SLOW_OFF_GPU, assert_close, randn
from jaxattn.bench.compile import lower_for_cuda
from jaxattn.pallas import flash, flash_mgpu
from jaxattn.reference import attention_reference

pytestmark = [
    pytest.mark.skipif(not flash_mgpu.available(), reason="no Pallas Mosaic GPU backend"),
    # .ci/gpu's quick check hung on this GPU: the compiled kernel would hang these tests too
    pytest.mark.skipif(os.environ.get("JAXATTN_NO_MOSAIC") == "hang", reason="the Mosaic kernels hung here"),
]

LSE_TOL = {jnp.dtype(jnp.float32): (2e-3, 2e-3)}
ON_GPU = jax.default_backend() == "gpu"


def _skip_causal_on_buggy_ptxas(causal: bool) -> None:
    """Compiled with CUDA 12.8.0-12.9.0, the causal kernel is refused (a ptxas miscompilation)."""
    if causal and ON_GPU and not flash_mgpu.causal_supported():
        pytest.skip(f"CUDA runtime {flash_mgpu.cuda_runtime_version()}: causal impl='mosaic' refused (ptxas bug)")
attn = jax.jit(jaxattn.attention, static_argnames=("causal", "impl", "return_lse"))


def _case(seed: int) -> dict:
    r = np.random.default_rng(seed)
    hkv = int(r.choice([1, 2]))
    sq = int(r.integers(1, 260))
    return dict(batch=int(r.integers(1, 3)), sq=sq, sk=sq if r.random() < 0.3 else int(r.integers(1, 300)),
                hkv=hkv, hq=hkv * int(r.choice([1, 2])), d=int(r.choice([64, 128])), causal=bool(seed % 2),
                dtype=[jnp.bfloat16, jnp.float16][seed // 2 % 2], seed=seed)


def _inputs(c: dict):
    ks = jax.random.split(jax.random.PRNGKey(c["seed"]), 4)
    q = randn(ks[0], (c["batch"], c["sq"], c["hq"], c["d"]), c["dtype"])
    k = randn(ks[1], (c["batch"], c["sk"], c["hkv"], c["d"]), c["dtype"])
    v = randn(ks[2], (c["batch"], c["sk"], c["hkv"], c["d"]), c["dtype"])
    return q, k, v, randn(ks[3], q.shape, c["dtype"])


@pytest.mark.parametrize("seed", [pytest.param(0, marks=SLOW_OFF_GPU)] + [pytest.param(s, marks=pytest.mark.slow)
                                                                          for s in (1, 2, 3)])
# 0: bf16 non-causal, 3: fp16 causal; 1, 2 the other pairs (the causal forward also runs in test_gradients_match_oracle)
def test_forward_matches_oracle(seed):
    c = _case(seed)
    _skip_causal_on_buggy_ptxas(c["causal"])
    q, k, v, _ = _inputs(c)
    out, lse = attn(q, k, v, causal=c["causal"], impl="mosaic", return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=c["causal"])
    assert_close(out, ref, c["dtype"], f"out {c}")
    assert_close(lse, ref_lse, jnp.float32, f"lse {c}", tol=LSE_TOL)
    # the same as the Triton kernel (an independent implementation of the same scheme)
    assert_close(out, attn(q, k, v, causal=c["causal"], impl="pallas"), c["dtype"], f"vs triton {c}")


@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.slow),
                                    pytest.param(True, marks=SLOW_OFF_GPU)])  # (interpret mode: the suite's budget)
def test_gradients_match_oracle(causal):
    _skip_causal_on_buggy_ptxas(causal)
    c = dict(batch=1, sq=150, sk=214, hkv=1, hq=2, d=64, causal=causal, dtype=jnp.bfloat16, seed=7)
    q, k, v, do = _inputs(c)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    got = jax.jit(jax.grad(loss(lambda *a: jaxattn.attention(*a, causal=causal, impl="mosaic")), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda *a: attention_reference(*a, causal=causal)[0]), (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, c["dtype"], f"d{name}", tol=GRAD_TOL)


@pytest.mark.slow
def test_rows_without_keys_are_zero():
    """Causal with more queries than keys: the first rows see no key (bottom-right alignment)."""
    _skip_causal_on_buggy_ptxas(True)
    c = dict(batch=1, sq=200, sk=70, hkv=1, hq=1, d=64, causal=True, dtype=jnp.float16, seed=3)
    q, k, v, _ = _inputs(c)
    out, lse = attn(q, k, v, causal=True, impl="mosaic", return_lse=True)
    empty = c["sq"] - c["sk"]
    assert np.all(np.asarray(out[:, :empty]) == 0) and np.all(np.isneginf(np.asarray(lse[:, :empty])))
    ref, _ = attention_reference(q, k, v, causal=True)
    assert_close(out, ref, c["dtype"], "out")


@pytest.mark.parametrize("scale", [pytest.param(-0.3, marks=SLOW_OFF_GPU), pytest.param(0.0, marks=pytest.mark.slow)])
def test_nonpositive_scale(scale):
    _skip_causal_on_buggy_ptxas(True)
    c = dict(batch=1, sq=70, sk=90, hkv=1, hq=1, d=64, causal=True, dtype=jnp.bfloat16, seed=5)
    q, k, v, _ = _inputs(c)
    out = jaxattn.attention(q, k, v, causal=True, scale=scale, impl="mosaic")
    assert_close(out, attention_reference(q, k, v, causal=True, scale=scale)[0], c["dtype"], "out")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a CPU simulation; the GPU runs the compiled kernel")
@pytest.mark.parametrize("pingpong", [pytest.param(True, marks=pytest.mark.slow), False])
def test_no_data_races(pingpong):
    """The interpreter's happens-before race detector over the warp-specialized pipeline.
    Causal offset 64 (kv_len - q_len): in each tile the first consumer needs one key block fewer
    than the second (it drains that block: waits and releases it), three blocks cycle through
    two ring slots, and the last block holds padded keys."""
    q_len, kv_len = 200, 264
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = randn(ks[0], (1, 256, 1, 64), jnp.bfloat16)
    k = randn(ks[1], (1, 384, 1, 64), jnp.bfloat16)
    v = randn(ks[2], (1, 384, 1, 64), jnp.bfloat16)
    cfg = dataclasses.replace(flash_mgpu.CONFIGS[64], stages=2, pingpong=pingpong)
    for tile in (0, 128):  # the consumers' key-block counts differ (hi: 1 vs 2, then 2 vs 3)
        _, hi0 = flash_mgpu._key_blocks(tile, 64, causal=True, offset=64, kv_len=kv_len, block_kv=128)
        _, hi1 = flash_mgpu._key_blocks(tile + 64, 64, causal=True, offset=64, kv_len=kv_len, block_kv=128)
        assert int(hi0) + 1 == int(hi1)
    out, lse = flash_mgpu.forward(q, k, v, causal=True, scale=0.125, q_len=q_len, kv_len=kv_len, config=cfg,
                                  interpret=flash_mgpu.interpret_params(detect_races=True))
    out.block_until_ready()
    assert not flash_mgpu.races_found()
    ref, ref_lse = attention_reference(q[:, :q_len], k[:, :kv_len], v[:, :kv_len], causal=True, scale=0.125)
    assert_close(out[:, :q_len], ref, jnp.bfloat16, "out")
    assert_close(jnp.swapaxes(lse, 1, 2)[:, :q_len], ref_lse, jnp.float32, "lse", tol=LSE_TOL)


@pytest.mark.parametrize("d,causal,dtype,pingpong,inplace", [
    *itertools.product(flash_mgpu.HEAD_DIMS, [False, True], ["bfloat16", "float16"], [True, False], [False]),
    *itertools.product(flash_mgpu.HEAD_DIMS, [False, True], ["bfloat16"], [True], [True])])
def test_lowers_for_cuda(d, causal, dtype, pingpong, inplace):
    """Pallas lowers the kernel to a Mosaic GPU custom call (register layouts, WGMMA operand
    shapes and shared-memory transforms are checked here); ragged lengths, GQA."""
    q = jax.ShapeDtypeStruct((2, 512, 4, d), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((2, 384, 2, d), jnp.dtype(dtype))
    cfg = dataclasses.replace(flash_mgpu.CONFIGS[d], pingpong=pingpong, inplace_pv=inplace)
    text = lower_for_cuda(lambda q, k, v: flash_mgpu.forward(
        q, k, v, causal=causal, scale=0.1, q_len=500, kv_len=300, config=cfg), q, kv, kv).as_text()
    assert "mosaic_gpu" in text


def test_attention_lowers_for_cuda_with_backward():
    """Differentiated: the Mosaic forward and the Triton backward kernels."""
    q = jax.ShapeDtypeStruct((1, 1000, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    f = jax.grad(lambda q, k, v: jnp.sum(flash.flash_attention(
        q, k, v, causal=True, backend="mosaic", interpret=False)[0].astype(jnp.float32)), (0, 1, 2))
    text = lower_for_cuda(f, q, kv, kv).as_text()
    assert "mosaic_gpu" in text and "triton" in text.lower()


@pytest.mark.parametrize("kw,match", [
    (dict(d=96), "head dims"),
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(mask=True), "mask"),
    (dict(segment_ids=True), "segment_ids"),
    (dict(local_window_size=8), "local_window_size"),
    (dict(logits_soft_cap=30.0), "logits_soft_cap"),
    (dict(dropout_rate=0.1), "dropout_rate"),
])
def test_unsupported_input_raises(kw, match):
    d, dtype = kw.pop("d", 64), kw.pop("dtype", jnp.bfloat16)
    q = jnp.zeros((1, 16, 2, d), dtype)
    if kw.pop("mask", False):
        kw["mask"] = jnp.ones((1, 1, 16, 16), bool)
    if kw.pop("segment_ids", False):
        kw["segment_ids"] = jnp.zeros((1, 16), jnp.int32)
    if "dropout_rate" in kw:
        kw["dropout_rng"] = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=match):
        jaxattn.attention(q, q, q, impl="mosaic", **kw)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="pl.run_state: compiled for a GPU only")
@pytest.mark.parametrize("causal", [False, True])
def test_inplace_pv_on_gpu(causal):
    _skip_causal_on_buggy_ptxas(causal)
    c = dict(batch=2, sq=1000, sk=1100, hkv=2, hq=4, d=128, causal=causal, dtype=jnp.bfloat16, seed=11)
    q, k, v, _ = _inputs(c)
    cfg = dataclasses.replace(flash_mgpu.CONFIGS[128], inplace_pv=True)
    out, lse = flash.flash_attention(q, k, v, causal=causal, backend="mosaic", mosaic_config=cfg)
    ref, ref_lse = attention_reference(q, k, v, causal=causal)
    assert_close(out, ref, c["dtype"], "out")
    assert_close(lse, ref_lse, jnp.float32, "lse", tol=LSE_TOL)


@pytest.mark.parametrize("version,ok", [(None, True), (12060, True), (12080, False), (12090, False),
                                        (12091, True), (13000, True)])
def test_causal_refused_where_ptxas_miscompiles(monkeypatch, version, ok):
    """CUDA 12.8.0 to 12.9.0 miscompile the causal mask of this kernel family (as jax's bundled
    attention_mgpu notes): compiled for such a GPU, causal=True raises instead of returning garbage."""
    monkeypatch.setattr(flash_mgpu, "cuda_runtime_version", lambda: version)
    assert flash_mgpu.causal_supported() is ok
    if ok:
        flash_mgpu._check_causal()
    else:
        with pytest.raises(ValueError, match="ptxas miscompilation.*impl='pallas'"):
            flash_mgpu._check_causal()


def test_config_validation():
    with pytest.raises(ValueError, match="block_q"):
        flash_mgpu.MosaicConfig(block_q=128)
    with pytest.raises(ValueError, match="block_kv"):
        flash_mgpu.MosaicConfig(block_kv=96)
    with pytest.raises(ValueError, match="stages"):
        flash_mgpu.MosaicConfig(stages=1)


# ----------------------------------------------------------------------------
# SageAttention2 on the same pipeline: jaxattn.sage_attention(impl="mosaic").
# ----------------------------------------------------------------------------

SAGE_CASES = [  # (sq, sk, d, causal, granularity, dtype, kind, smooth_q): the causal one drains a block
    pytest.param(150, 200, 64, False, "block", jnp.bfloat16, "random", False, marks=pytest.mark.slow),
    pytest.param(200, 264, 128, True, "warp", jnp.float16, "outlier", False, marks=pytest.mark.slow),
    pytest.param(200, 150, 64, True, "warp", jnp.bfloat16, "outlier", True,  # q_bar . K^T per key block; reversed
                 marks=SLOW_OFF_GPU),
]


def _sage_inputs(sq, sk, d, dtype, kind, seed=0):
    from test_sage import _inputs as sage_inputs

    return sage_inputs(1, sq, sk, 2, 1, d, dtype, seed=seed, kind=kind)


@pytest.mark.parametrize("sq,sk,d,causal,granularity,dtype,kind,smooth_q", SAGE_CASES)
def test_sage_matches_emulation(sq, sk, d, causal, granularity, dtype, kind, smooth_q):
    """The INT8/FP8 kernel against the jnp emulation of the same quantisation (same groups:
    128-row Q blocks or 16-row warps, 128-key K blocks), and against fp32 attention."""
    from test_sage import _assert_matches_emulation

    from jaxattn.pallas import sage
    from jaxattn.reference import sage as sage_ref

    _skip_causal_on_buggy_ptxas(causal)
    q, k, v = _sage_inputs(sq, sk, d, dtype, kind)
    out = jax.jit(lambda q, k, v: jaxattn.sage_attention(q, k, v, causal=causal, qk_granularity=granularity,
                                                         smooth_q=smooth_q, impl="mosaic"))(q, k, v)
    b = sage.mosaic_blocks(sq, sk, granularity, d)
    expected = sage_ref.sage_reference(q, k, v, block_q=b.block_q, block_k=b.block_k, q_group=b.q_group,
                                       causal=causal, scale=d ** -0.5, smooth_q=smooth_q, smooth_k=True)
    _assert_matches_emulation(out, expected, dtype)
    m = sage_ref.accuracy_metrics(out, attention_reference(q, k, v, causal=causal)[0])
    assert m["cos_sim"] >= 0.999 and m["rel_l1"] <= 0.05, m


def test_sage_offset_matches_the_triton_kernel():
    from jaxattn.pallas import sage

    assert flash_mgpu.P_OFFSET == sage.P_OFFSET and flash_mgpu.FP8_DTYPE == sage.FP8_DTYPE


def test_sage_mosaic_checks_its_correction_shape():
    q8 = jnp.zeros((1, 128, 2, 64), jnp.int8)
    x = flash_mgpu.SageInputs(q8, jnp.zeros((1, 2, 128)), q8, jnp.zeros((1, 2, 1)),
                              jnp.zeros((1, 2, 64, 128), flash_mgpu.FP8_DTYPE), jnp.zeros((1, 2, 64)),
                              correction=jnp.zeros((1, 2, 2, 128)))
    with pytest.raises(ValueError, match="correction must have shape"):
        flash_mgpu.sage_forward(x, causal=False, q_len=128, kv_len=128, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("d,causal,pingpong", list(itertools.product(flash_mgpu.HEAD_DIMS, [False, True],
                                                                     [True, False])))
def test_sage_lowers_for_cuda(d, causal, pingpong):
    """The quantised mode lowers: s8 WGMMA with a transposed K operand, FP8 WGMMA from the P tile
    in shared memory and transposed V^T blocks, the scale vectors in WGMMA row/column layouts."""
    b, sq, sk, hq, hkv = 2, 512, 384, 4, 2
    f32, i8 = jnp.float32, jnp.int8
    x = flash_mgpu.SageInputs(
        jax.ShapeDtypeStruct((b, sq, hq, d), i8), jax.ShapeDtypeStruct((b, hq, sq), f32),
        jax.ShapeDtypeStruct((b, sk, hkv, d), i8), jax.ShapeDtypeStruct((b, hkv, sk // 128), f32),
        jax.ShapeDtypeStruct((b, hkv, d, sk), flash_mgpu.FP8_DTYPE), jax.ShapeDtypeStruct((b, hkv, d), f32))
    cfg = dataclasses.replace(flash_mgpu.CONFIGS[d], pingpong=pingpong)
    text = lower_for_cuda(lambda *a: flash_mgpu.sage_forward(
        flash_mgpu.SageInputs(*a), causal=causal, q_len=500, kv_len=300, out_dtype=jnp.bfloat16, config=cfg),
        *x).as_text()
    assert "mosaic_gpu" in text


def test_interpreter_thread_check(monkeypatch):
    """A CPU pool too small for the interpreter's concurrent warpgroups raises, instead of hanging."""
    monkeypatch.setenv("NPROC", "2")
    q = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="NPROC"):
        flash_mgpu.forward(q, q, q, causal=False, scale=1.0, q_len=128, kv_len=128, interpret=True)


@pytest.mark.slow
def test_sage_bench_times_the_mosaic_kernels():
    """On a GPU bench sage times impl="mosaic" (Sage and bf16) beside the Triton kernels; its
    Mosaic Sage peer runs here (interpreted) and agrees with the Triton Sage kernel."""
    from jaxattn.bench import sage as sage_bench

    case = sage_bench.Case(1, 128, 2, 64, True, "bfloat16")
    ops = sage_bench.peers(case, interpret=False)
    assert {"jaxattn-mosaic", "flash-mosaic"} <= set(ops)
    assert "jaxattn-mosaic" not in sage_bench.peers(dataclasses.replace(case, dtype="float32"), interpret=False)
    q, k, v, none = sage_bench.inputs(case)
    mosaic = np.asarray(ops["jaxattn-mosaic"](q, k, v, none), np.float32)
    triton = np.asarray(jaxattn.sage_attention(q, k, v, causal=True, impl="pallas"), np.float32)
    assert np.abs(mosaic - triton).max() <= 0.05 * np.abs(triton).max()  # different K groups: 128 vs 64 keys


@pytest.mark.parametrize("kind,cc,ok", [("NVIDIA A100", "8.0", False), ("NVIDIA H100", "9.0", True),
                                        ("NVIDIA B200", "10.0", False)])
def test_only_hopper_gpus_run_it(monkeypatch, kind, cc, ok):
    """On a GPU other than sm_90 (older, or Blackwell: no WGMMA) the kernel raises instead of
    failing in Mosaic's compiler."""
    class Device:
        platform, device_kind, compute_capability = "gpu", kind, cc

    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    if ok:
        flash_mgpu._check_device()
    else:
        with pytest.raises(ValueError, match="Hopper"):
            flash_mgpu._check_device()


@pytest.mark.slow
def test_vit_runs_on_the_mosaic_kernels():
    """``attn_impl="mosaic"``: a bf16 ViT's attention (and, quantized, its Sage attention) on the
    Mosaic GPU kernels gives the XLA path's logits."""
    from flax import nnx

    from jaxattn.models.vit import ViT, ViTConfig

    cfg = ViTConfig(image_size=16, patch_size=4, in_channels=1, num_classes=5, dim=128, depth=1, heads=2,
                    attn_impl="xla", dtype="bfloat16")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 1))
    for quantized in (False, True):
        c = dataclasses.replace(cfg, quantized=quantized)
        want = np.asarray(ViT(c, rngs=nnx.Rngs(0))(x), np.float32)
        got = np.asarray(ViT(dataclasses.replace(c, attn_impl="mosaic"), rngs=nnx.Rngs(0))(x), np.float32)
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max(), quantized


# ----------------------------------------------------------------------------
# Block-sparse attention on the same pipeline: block_sparse_attention(impl="mosaic").
# ----------------------------------------------------------------------------


def _power_case():
    n = 300
    bm = jaxattn.BlockMask.power(n, block=128, window=128, sink=128)
    c = dict(batch=1, sq=n, sk=n, hkv=1, hq=2, d=64, causal=False, dtype=jnp.bfloat16, seed=2)
    return bm, c, _inputs(c)


@pytest.mark.slow
def test_block_sparse_matches_oracle():
    """PowerAttention lists (sink, window, power-of-two distances; partial blocks masked by the
    pattern, ragged tail): forward and lse against the dense masked oracle."""
    bm, c, (q, k, v, _) = _power_case()
    out, lse = jaxattn.block_sparse_attention(q, k, v, bm, impl="mosaic", return_lse=True)
    ref, ref_lse = jaxattn.block_sparse_attention(q, k, v, bm, impl="xla", return_lse=True)
    assert_close(out, ref, c["dtype"], "out")
    assert_close(lse, ref_lse, jnp.float32, "lse", tol=LSE_TOL)


@pytest.mark.slow
def test_block_sparse_gradients_match_oracle():
    """The Mosaic forward's lse feeds the Triton block-sparse backward."""
    bm, c, (q, k, v, do) = _power_case()

    def loss(impl):
        return lambda q, k, v: jnp.sum(jaxattn.block_sparse_attention(q, k, v, bm, impl=impl)
                                       .astype(jnp.float32) * do.astype(jnp.float32))

    got = jax.jit(jax.grad(loss("mosaic"), (0, 1, 2)))(q, k, v)
    want = jax.grad(loss("xla"), (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, c["dtype"], f"d{name}", tol=GRAD_TOL)


@pytest.mark.parametrize("pattern", ["power", "window", "causal", "dilated"])
def test_block_sparse_lowers_for_cuda(pattern):
    """Each ready pattern's mask function (integer division, remainder, bit tests) lowers into the
    Mosaic kernel's register layouts; the forward and the Triton backward, differentiated."""
    from jaxattn.pallas import block_sparse

    n = 4096
    bm = {"power": lambda: jaxattn.BlockMask.power(n, block=256, window=1280, sink=256),
          "window": lambda: jaxattn.BlockMask.sliding_window(n, window=1000, block=128),
          "causal": lambda: jaxattn.BlockMask.causal(n, block=128),
          "dilated": lambda: jaxattn.BlockMask.dilated(n, block=128, window=1024, dilation=2)}[pattern]()
    q = jax.ShapeDtypeStruct((1, n, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, n, 2, 128), jnp.bfloat16)

    def f(q, k, v):
        return jnp.sum(block_sparse.block_sparse_attention_kernel(
            q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
            kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
            backend="mosaic", interpret=False)[0].astype(jnp.float32))

    assert "mosaic_gpu" in lower_for_cuda(jax.grad(f, (0, 1, 2)), q, kv, kv).as_text()


def test_block_sparse_mosaic_needs_large_mask_blocks():
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="mask blocks"):
        jaxattn.block_sparse_attention(q, q, q, jaxattn.BlockMask.causal(256, block=64), impl="mosaic")


@pytest.mark.parametrize("switched_on", [False, True])
def test_auto_picks_mosaic_on_hopper_only_when_switched_on(monkeypatch, switched_on):
    """``impl="auto"`` on a Hopper GPU (here: compiling for one) runs the Mosaic forward when
    ``AUTO_ON_HOPPER`` is set and the inputs are ones it takes; the Triton kernel otherwise."""
    from jaxattn.bench.compile import lower_for_cuda
    from jaxattn.pallas import _common

    monkeypatch.setattr(flash_mgpu, "AUTO_ON_HOPPER", switched_on)
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    mask = jnp.ones((1, 1, 256, 256), bool)
    with _common.compile_for_gpu():  # (fresh functions: jit caches traces by function)
        plain = lower_for_cuda(lambda q, k, v: jaxattn.attention(q, k, v, causal=True), q, q, q).as_text()
        masked = lower_for_cuda(lambda q, k, v: jaxattn.attention(q, k, v, mask=mask), q, q, q).as_text()
    assert ("mosaic_gpu" in plain) is switched_on and ("__gpu$xla.gpu.triton" in plain) is not switched_on
    assert "mosaic_gpu" not in masked and "__gpu$xla.gpu.triton" in masked
