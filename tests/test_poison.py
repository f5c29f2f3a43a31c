"""The poisoning mechanism itself: an element a kernel forgets to write shows NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxattn.pallas import _common
from conftest import count_triton_calls, lower_for_cuda


def _half_writer(x):
    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)  # only the first of two blocks is written
        def _():
            o_ref[...] = x_ref[...] + 1

    spec = pl.BlockSpec((16, 32), lambda i: (i, 0))
    return _common.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(2,), in_specs=[spec],
        out_specs=[spec], num_warps=4, num_stages=1, interpret=True, name="half_writer")(x)[0]


def test_unwritten_elements_show_as_nan():
    x = jnp.zeros((32, 32), jnp.float32)
    with _common.poison_outputs():
        out = _half_writer(x)
    assert (out[:16] == 1).all()
    assert jnp.isnan(out[16:]).all()


def test_poisoned_kernel_lowers_for_cuda():
    def f(x):
        return _common.pallas_call(
            lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...]),
            out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)], grid=(2,),
            in_specs=[pl.BlockSpec((16, 32), lambda i: (i, 0))],
            out_specs=[pl.BlockSpec((16, 32), lambda i: (i, 0))],
            num_warps=4, num_stages=1, interpret=False, name="copy")(x)[0]

    x = jax.ShapeDtypeStruct((32, 32), jnp.bfloat16)
    with _common.poison_outputs():
        text = lower_for_cuda(f, x)
    assert count_triton_calls(text) > 0
