"""ALiBi slopes in the flash kernels (interpret mode): forward and gradients against the fp32
oracle and against the same bias given as an explicit additive mask, with GQA, q_len != kv_len,
causal or not, windows, soft caps and segments; bad slopes raise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, assert_close, count_triton_calls, lower_for_cuda, randn
from jaxattn.pallas import flash
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import attention_reference

SMALL = flash.FlashConfig(32, 16, 4, 2, 32, 16, 16, 32, 4, 2)


def alibi_bias(slopes, sq, sk):
    """The explicit ``[B or 1, H, Sq, Sk]`` bias, written from the definition (position of query
    i is ``i + sk - sq``)."""
    p = np.arange(sq)[:, None] + (sk - sq)
    dist = np.abs(p - np.arange(sk)[None, :]).astype(np.float32)
    s = np.asarray(slopes, np.float32).reshape(-1, np.shape(slopes)[-1])
    return jnp.asarray(-s[:, :, None, None] * dist[None, None])


CASES = [  # batch, sq, sk, hq, hkv, d, dtype, causal, per-batch slopes, extra
    (2, 70, 70, 4, 2, 32, jnp.float32, True, False, {}),
    (1, 45, 100, 3, 1, 64, jnp.float32, False, True, {}),
    (2, 100, 60, 2, 2, 32, jnp.bfloat16, True, False, {"logits_soft_cap": 10.0}),
    (1, 90, 90, 2, 1, 32, jnp.float16, True, True, {"local_window_size": (30, 0)}),
    (2, 64, 64, 2, 2, 32, jnp.float32, False, False, {"segments": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_alibi_matches_oracle_and_explicit_bias(case):
    b, sq, sk, hq, hkv, d, dtype, causal, per_batch, extra = case
    ks = jax.random.split(jax.random.PRNGKey(sq + sk), 5)
    q, k, v = randn(ks[0], (b, sq, hq, d), dtype), randn(ks[1], (b, sk, hkv, d), dtype), randn(ks[2], (b, sk, hkv, d), dtype)
    base = 2.0 ** (-8.0 * (np.arange(hq) + 1) / hq)
    slopes = jnp.asarray(np.stack([base * (1 + i) for i in range(b)]) if per_batch else base, jnp.float32)
    kw = dict(extra)
    if kw.pop("segments", False):
        seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 44], b, 0))
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)

    def kernel(q, k, v):
        return flash.flash_attention(q, k, v, causal=causal, alibi_slopes=slopes, config=SMALL, **kw)

    def oracle(q, k, v):
        return attention_reference(q, k, v, causal=causal, alibi_slopes=slopes, **kw)

    def explicit(q, k, v):  # the same bias as a mask tensor through the kernel
        return flash.flash_attention(q, k, v, causal=causal, bias=alibi_bias(slopes, sq, sk), config=SMALL, **kw)

    with poison_outputs():
        out, lse = jax.jit(kernel)(q, k, v)
    ref, ref_lse = jax.jit(oracle)(q, k, v)
    assert_close(out, ref, dtype, "out vs oracle")
    assert_close(out, jax.jit(explicit)(q, k, v)[0], dtype, "out vs explicit bias")
    w = jax.random.normal(ks[3], ref.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v)[0].astype(jnp.float32) * w)

    with poison_outputs():
        grads = jax.jit(jax.grad(loss(kernel), (0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(loss(oracle), (0, 1, 2)))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, dtype, f"d{name}", tol=GRAD_TOL)


def test_public_op_alibi_and_errors():
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (randn(kk, (2, 40, 4, 32), jnp.float32) for kk in ks)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    pallas = jaxattn.attention(q, k, v, causal=True, alibi_slopes=slopes, impl="pallas")
    xla = jaxattn.attention(q, k, v, causal=True, alibi_slopes=slopes, impl="xla")
    assert_close(pallas, xla, jnp.float32, "pallas vs xla")
    assert not np.allclose(np.asarray(xla), np.asarray(jaxattn.attention(q, k, v, causal=True, impl="xla")))
    for bad, match in ((jnp.ones(3), "alibi_slopes must have shape"), (jnp.ones((3, 4)), "alibi_slopes must have shape"),
                       (jnp.ones(4, jnp.int32), "floating")):
        with pytest.raises(ValueError, match=match):
            jaxattn.attention(q, k, v, alibi_slopes=bad)


def test_alibi_lowers_for_cuda():
    args = [jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)] + [jax.ShapeDtypeStruct((2, 1024, 2, 128),
                                                                                         jnp.bfloat16)] * 2
    slopes = jnp.linspace(0.5, 0.01, 8)

    def loss(q, k, v):
        o, _ = flash.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    assert count_triton_calls(lower_for_cuda(jax.grad(loss, (0, 1, 2)), *args)) == 3
