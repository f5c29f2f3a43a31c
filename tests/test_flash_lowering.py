"""Every flash kernel configuration lowers for CUDA on a CPU-only machine
(Pallas -> Triton IR happens at lowering, so shape/dtype rules are enforced)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from jaxattn.pallas import flash
from conftest import TRITON_CALL, count_triton_calls, lower_for_cuda


def _lower_fwd_bwd(d, dtype, *, causal, seg, bias_shape=None, bias_dtype=jnp.float32,
                   sq=200, sk=300, hq=4, hkv=2, dv=None, config=None, bias_grad=False):
    dv = dv or d
    args = [jax.ShapeDtypeStruct((2, sq, hq, d), dtype), jax.ShapeDtypeStruct((2, sk, hkv, d), dtype),
            jax.ShapeDtypeStruct((2, sk, hkv, dv), dtype)]
    if seg:
        args += [jax.ShapeDtypeStruct((2, sq), jnp.int32), jax.ShapeDtypeStruct((2, sk), jnp.int32)]
    if bias_shape:
        args.append(jax.ShapeDtypeStruct(bias_shape, bias_dtype))

    def loss(q, k, v, *extra):
        kw = {}
        if seg:
            kw.update(q_segment_ids=extra[0], kv_segment_ids=extra[1])
        if bias_shape:
            kw["bias"] = extra[-1]
        o, lse = flash.flash_attention(q, k, v, causal=causal, interpret=False, config=config, **kw)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    argnums = (0, 1, 2, len(args) - 1) if bias_grad else (0, 1, 2)
    text = lower_for_cuda(jax.value_and_grad(loss, argnums), *args)
    # forward, dq and dk/dv kernels are all Triton custom calls
    assert count_triton_calls(text) >= 3, "expected three Triton kernels"
    return text


@pytest.mark.parametrize("head_dim,itemsize", sorted(flash.CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
def test_table_entry_lowers(head_dim, itemsize, causal):
    for dtype in ([jnp.float32] if itemsize == 4 else [jnp.bfloat16, jnp.float16]):
        _lower_fwd_bwd(head_dim, dtype, causal=causal, seg=causal, sq=4096, sk=4096, hq=8, hkv=2)


@pytest.mark.parametrize(
    "bias_shape,bias_dtype",
    [((2, 4, 200, 300), jnp.float32), ((1, 1, 1, 300), jnp.bfloat16), ((2, 1, 200, 1), jnp.float32),
     ((2, 4, 200, 300), jnp.bool_), ((2, 1, 1, 300), jnp.bool_)],
)
def test_bias_variants_lower(bias_shape, bias_dtype):
    """Every kernel reads the bias as it is (the lengths 200 x 300 are off the tiles: no padded copy;
    the kernels mask its ragged tiles), and the dq kernel writes the bias gradient unpadded."""
    text = _lower_fwd_bwd(64, jnp.bfloat16, causal=True, seg=True, bias_shape=bias_shape, bias_dtype=bias_dtype)
    mlir = {jnp.float32: "f32", jnp.bfloat16: "bf16", jnp.bool_: "i8"}[bias_dtype]
    unpadded = "tensor<" + "x".join(map(str, bias_shape)) + f"x{mlir}>"
    calls = [line for line in text.splitlines() if TRITON_CALL in line]
    # (the signature ends each line: " : (operands) -> results"; the embedded kernel IR before it may hold "->")
    assert len(calls) == 3 and all(unpadded in line.rsplit(" -> ", 1)[0] for line in calls), (unpadded, calls)
    assert not [line for line in text.splitlines() if "stablehlo.pad" in line and unpadded in line]
    if bias_dtype != jnp.bool_:  # and the dq kernel that also writes the bias gradient
        text = _lower_fwd_bwd(64, jnp.bfloat16, causal=True, seg=True, bias_shape=bias_shape,
                              bias_dtype=bias_dtype, bias_grad=True)
        dq = [line for line in text.splitlines() if TRITON_CALL in line and "jaxattn_flash_dq" in line]
        assert dq and "tensor<2x4x200x300xf32>)" in dq[0].rsplit(" -> ", 1)[1], dq


@pytest.mark.parametrize("sq,sk", [(200, 200), (256, 200)])
def test_bias_loads_masked(sq, sk):
    """An unpadded bias is read through masked loads in the three kernels, its gradient written
    through masked stores: every load when the query rows are ragged (200), the tiles holding keys
    past the end when only the keys are (256 x 200). (Interpret mode shows a missing row mask, as
    NaN rows reach the dk/dv kernel; a missing column mask only reads past the array, which the
    length mask then hides.)"""
    from jaxattn.bench import compile as cc

    def loss(q, k, v, b):
        return jnp.sum(flash.flash_attention(q, k, v, bias=b, interpret=False)[0].astype(jnp.float32))

    args = [jax.ShapeDtypeStruct((1, n, 2, 64), jnp.bfloat16) for n in (sq, sk, sk)]
    try:
        kernels = cc.triton_kernels(cc.lower_for_cuda(jax.grad(loss, (0, 1, 2, 3)), *args,
                                                      jax.ShapeDtypeStruct((1, 2, sq, sk), jnp.float16)))
    except RuntimeError as e:  # a jax that compiles Triton during lowering (>= 0.11): no IR to read
        pytest.skip(str(e))
    assert {k.name for k in kernels} == {"jaxattn_flash_fwd", "jaxattn_flash_dq", "jaxattn_flash_dkdv"}
    every = all if sq % 64 else any
    for k in kernels:  # (f16: only the bias; q, k, v are bf16)
        loads = [line for line in k.ttir.splitlines() if "tt.load" in line and "!tt.ptr<f16>" in line]
        assert loads and every(re.search(r"tt\.load %\w+, %\w+", line) for line in loads), (k.name, loads)
        if k.name == "jaxattn_flash_dq":  # the logits' cotangent, fp32
            stores = [line for line in k.ttir.splitlines() if "tt.store" in line and "!tt.ptr<f32>" in line]
            assert stores and every(re.search(r"tt\.store %\w+, %\w+, %\w+", line) for line in stores), stores


@pytest.mark.parametrize("d,dv,sq,sk", [(80, 80, 77, 1000), (96, 64, 1, 513), (40, 200, 1000, 3)])
def test_ragged_shapes_lower_with_no_padded_copies(d, dv, sq, sk):
    """Lengths off the tiles and head dims off the powers of two: the three kernels take q, k, v
    (and dO) as they are and return the outputs unpadded (masked loads and stores in the kernels);
    the only pads left are of the small per-row delta and lse cotangent ``[B, H, Sq]``."""
    text = _lower_fwd_bwd(d, jnp.float16, causal=True, seg=False, dv=dv, sq=sq, sk=sk, hq=3, hkv=1)
    qkv = f"(tensor<2x{sq}x3x{d}xf16>, tensor<2x{sk}x1x{d}xf16>, tensor<2x{sk}x1x{dv}xf16>"
    calls = [line for line in text.splitlines() if TRITON_CALL in line]
    assert len(calls) == 3 and all(qkv in line for line in calls), calls
    assert f"-> (tensor<2x{sq}x3x{dv}xf16>, " in calls[0]  # the forward's output
    assert f"-> tensor<2x{sq}x3x{d}xf16>" in calls[1]  # dq
    assert f"-> (tensor<2x{sk}x1x{d}xf16>, tensor<2x{sk}x1x{dv}xf16>)" in calls[2]  # dk, dv
    pads = [line for line in text.splitlines() if "stablehlo.pad" in line]
    assert all(f"(tensor<2x3x{sq}xf32>" in line for line in pads), pads
