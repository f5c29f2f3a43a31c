"""``jaxattn.attention_qkvpacked``: q, k, v as the slots of one ``[B, S, 3, H, D]`` array (a fused
qkv projection's output). The flash kernels (interpret mode) read the slots in place and write one
packed gradient; checked against the fp32 oracle on the slices, forward and the packed gradient,
with ragged lengths and the kernel's features, and the packed operands in the CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from conftest import GRAD_TOL, TRITON_CALL, assert_close, lower_for_cuda, randn
from jaxattn.pallas._common import compile_for_gpu, poison_outputs
from jaxattn.reference import attention_reference

# (batch, seq, heads, head dim, dtype, options)
CASES = [
    (2, 77, 3, 32, jnp.float32, dict(causal=True)),
    (1, 130, 2, 64, jnp.bfloat16, dict()),
    (2, 96, 2, 32, jnp.float32, dict(causal=True, local_window_size=(20, 0), logits_soft_cap=5.0)),
    (1, 64, 2, 32, jnp.float16, dict(segment_ids="two")),
    (1, 50, 2, 48, jnp.float32, dict(causal=True)),  # head dim 48: 64-wide tiles, columns past 48 masked
    (2, 41, 3, 80, jnp.bfloat16, dict()),
]


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c[1]}d{c[3]}-{jnp.dtype(c[4]).name}-{sorted(c[5])}")
def test_matches_oracle_on_the_slices(case, impl):
    b, s, h, d, dtype, opts = case
    opts = dict(opts)
    if opts.get("segment_ids") == "two":
        opts["segment_ids"] = jnp.broadcast_to((jnp.arange(s) >= s // 3).astype(jnp.int32), (b, s))
    qkv = randn(jax.random.PRNGKey(s), (b, s, 3, h, d), dtype)
    ct = randn(jax.random.PRNGKey(1), (b, s, h, d), jnp.float32)
    ref_opts = {k: v for k, v in opts.items() if k != "segment_ids"}
    if "segment_ids" in opts:
        ref_opts.update(q_segment_ids=opts["segment_ids"], kv_segment_ids=opts["segment_ids"])

    def packed(qkv):
        out = jaxattn.attention_qkvpacked(qkv, impl=impl, **opts)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    def oracle(qkv):
        q, k, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
        out = attention_reference(q, k, v, **ref_opts)[0]
        return jnp.sum(out * ct), out

    with poison_outputs():
        (_, out), grad = jax.jit(jax.value_and_grad(packed, has_aux=True))(qkv)
    (_, ref_out), ref_grad = jax.jit(jax.value_and_grad(oracle, has_aux=True))(qkv)
    assert out.shape == (b, s, h, d) and out.dtype == dtype and grad.shape == qkv.shape
    assert_close(out, ref_out, dtype, "out")
    for i, name in enumerate("qkv"):
        assert_close(grad[:, :, i], ref_grad[:, :, i], dtype, f"d{name}", tol=GRAD_TOL)


@pytest.mark.parametrize("d", [64, 48])
def test_kernels_take_the_packed_array(d):
    """The forward, dq and dk/dv kernels read the ``[B, S, 3, H, D]`` array itself (no sliced
    copies), dk/dv write the packed gradient and dq updates it in place, also for a head dim that
    is not a power of two (the tiles' extra columns are masked, not padded copies)."""
    args = [jax.ShapeDtypeStruct((2, 197, 3, 4, d), jnp.bfloat16)]

    def loss(qkv):
        return jnp.sum(jaxattn.attention_qkvpacked(qkv, impl="pallas").astype(jnp.float32))

    with compile_for_gpu():  # (the GPU kernels, not interpret mode)
        text = lower_for_cuda(jax.grad(loss), *args)
    calls = [line for line in text.splitlines() if TRITON_CALL in line]
    assert len(calls) == 3, calls
    takes_packed = [f"tensor<2x197x3x4x{d}xbf16>" in line for line in calls]
    assert all(takes_packed), calls


def test_errors():
    qkv = jnp.zeros((1, 8, 3, 2, 32))
    with pytest.raises(ValueError, match="qkv must have rank 5"):
        jaxattn.attention_qkvpacked(qkv[0])
    with pytest.raises(ValueError, match="axis 2 of size 3"):
        jaxattn.attention_qkvpacked(qkv[:, :, :2])
    with pytest.raises(TypeError, match="_packed_qkv"):
        jaxattn.attention_qkvpacked(qkv, _packed_qkv=qkv)
    from jaxattn.pallas import flash

    with pytest.raises(ValueError, match="packed qkv"):
        flash.flash_attention(jnp.zeros((1, 8, 2, 32)), None, None)
