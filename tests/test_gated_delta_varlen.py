"""gated_delta_rule(cu_seqlens=): documents packed in one row, each with its own initial and final state
(flash-linear-attention's varlen form), the kernels (interpret mode, outputs poisoned) and the XLA path against
the token-by-token recurrence run on each document alone: outputs, final states and the gradients of every input
and initial state; empty documents, one-token documents, lengths on and off the chunk size, per-channel decays,
shared q / k heads, bf16; traced offsets under jit; CUDA lowering; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SLOW_OFF_GPU, assert_close, count_triton_calls, lower_for_cuda
from jaxattn import gated_delta_rule
from jaxattn.pallas._common import compile_for_gpu, poison_outputs
from jaxattn.reference import gated_delta_reference

TOL = {jnp.dtype(jnp.float32): (2e-5, 2e-5), jnp.dtype(jnp.bfloat16): (3e-2, 3e-2)}
GRAD_TOL = {jnp.dtype(jnp.float32): (1e-4, 1e-4), jnp.dtype(jnp.bfloat16): (6e-2, 6e-2)}


def _inputs(lengths, h, hk, dk, dv, dtype, channels, seed=0):
    total, docs = sum(lengths), len(lengths)
    ks = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (1, total, hk, dk))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (1, total, hk, dk))).astype(dtype)
    v = jax.random.normal(ks[2], (1, total, h, dv)).astype(dtype)
    g = -0.3 * jax.nn.softplus(jax.random.normal(ks[3], (1, total, h, dk) if channels else (1, total, h)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, total, h)))
    s0 = 0.3 * jax.random.normal(ks[5], (docs, h, dk, dv))
    return q, k, v, g, beta, s0, jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)


def _alone(q, k, v, g, beta, s0, cu):
    """The recurrence on each document by itself, from its own initial state."""
    outs, finals = [], []
    for i in range(len(cu) - 1):
        a, e = int(cu[i]), int(cu[i + 1])
        if a == e:  # (an empty document keeps its state)
            finals.append(s0[i:i + 1])
            continue
        sl = lambda x: x[:, a:e]  # noqa: E731
        o, s = gated_delta_reference(sl(q), sl(k), sl(v), sl(g), sl(beta), initial_state=s0[i:i + 1])
        outs.append(o)
        finals.append(s)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(finals)


CASES = [  # (lengths, heads, q / k heads, d_k, d_v, dtype, per-channel decay)
    ([5, 0, 16, 1, 40], 4, 2, 16, 32, jnp.float32, False),  # empty, on the chunk, one token, off it
    ([70, 33], 2, 2, 32, 16, jnp.float32, True),  # Kimi Delta Attention's decays; longer than XLA's chunk
    ([0, 20, 9, 0], 2, 1, 16, 16, jnp.bfloat16, False),  # empty first and last
]
PARAMS = [pytest.param(impl, *case, marks=SLOW_OFF_GPU if case[5] == jnp.bfloat16 else
                       [pytest.mark.slow] if impl == "xla" and i == 0 else ())
          for i, case in enumerate(CASES) for impl in ("pallas", "xla")]


@pytest.mark.parametrize("impl,lengths,h,hk,dk,dv,dtype,channels", PARAMS)
def test_each_document_from_its_own_state(impl, lengths, h, hk, dk, dv, dtype, channels):
    q, k, v, g, beta, s0, cu = _inputs(lengths, h, hk, dk, dv, dtype, channels)
    ct = jax.random.normal(jax.random.key(9), (1, sum(lengths), h, dv))
    ct_s = jax.random.normal(jax.random.key(10), s0.shape)

    def loss(fn, q, k, v, g, beta, s0):
        o, s = fn(q, k, v, g, beta, s0)
        return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s * ct_s), (o, s)

    def ours(cu, *a):  # (offsets traced: a jit argument)
        return loss(lambda *b: gated_delta_rule(*b[:5], initial_state=b[5], cu_seqlens=cu, return_state=True,
                                                impl=impl), *a)

    args = (q, k, v, g, beta, s0)
    with poison_outputs():
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(ours, argnums=tuple(range(1, 7)), has_aux=True))(cu, *args)
    assert o.dtype == dtype and o.shape == (1, sum(lengths), h, dv) and s.shape == s0.shape
    ref = functools.partial(loss, lambda *a: _alone(*a, np.asarray(cu)))
    (_, (ro, rs)), want = jax.value_and_grad(ref, argnums=tuple(range(6)), has_aux=True)(
        *(x.astype(jnp.float32) for x in args))
    assert_close(o, ro, dtype, "output", tol=TOL)
    assert_close(s, rs, dtype, "final states", tol=TOL)
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dstates"), grads, want):
        assert_close(a, e, dtype, name, tol=GRAD_TOL)


def test_lowers_for_cuda():
    sds = jax.ShapeDtypeStruct
    q = sds((1, 1000, 4, 128), jnp.bfloat16)
    v = sds((1, 1000, 8, 128), jnp.bfloat16)
    gb = sds((1, 1000, 8), jnp.float32)
    s0, cu = sds((6, 8, 128, 128), jnp.float32), sds((7,), jnp.int32)

    def step(q, k, v, g, beta, s0, cu):
        def f(*a):
            o, s = gated_delta_rule(*a[:5], initial_state=a[5], cu_seqlens=cu, return_state=True)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(f, argnums=tuple(range(6)))(q, k, v, g, beta, s0)

    with compile_for_gpu():
        assert count_triton_calls(lower_for_cuda(step, q, q, v, gb, gb, s0, cu)) == 2
        g4 = sds((1, 1000, 8, 128), jnp.float32)  # per key channel: the products' kernels too
        assert count_triton_calls(lower_for_cuda(step, q, q, v, g4, gb, s0, cu)) == 5


def test_bad_input():
    q, k, v, g, beta, s0, cu = _inputs([3, 5], 2, 2, 16, 16, jnp.float32, False)
    for kw, match in [(dict(cu_seqlens=cu.astype(jnp.float32)), "cu_seqlens must be an integer"),
                      (dict(cu_seqlens=jnp.asarray([0, 3, 7])), "end at the row's 8 tokens"),
                      (dict(cu_seqlens=jnp.asarray([0, 5, 3, 8])), "never decrease"),
                      (dict(cu_seqlens=cu, initial_state=s0[:1]), r"\[documents, heads, d_k, d_v\] = \(2, 2, 16, 16\)"),
                      (dict(cu_seqlens=cu, segment_ids=jnp.zeros((1, 8), jnp.int32)), "exclusive")]:
        with pytest.raises(ValueError, match=match):
            gated_delta_rule(q, k, v, g, beta, **kw)
    two = lambda x: jnp.concatenate([x, x])  # noqa: E731
    with pytest.raises(ValueError, match="one row"):
        gated_delta_rule(two(q), two(k), two(v), two(g), two(beta), cu_seqlens=cu)
