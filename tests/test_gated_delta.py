"""The gated delta rule (jaxattn.gated_delta_rule): the chunked forward kernel (interpret mode) and the XLA chunked
path against the token-by-token recurrence (jaxattn.reference.gated_delta_reference), outputs, final states and
the gradients of every input, on ragged lengths, d_k != d_v, with and without a decay and an initial state,
every dtype; outputs poisoned; one-token steps; CUDA lowering; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SLOW_OFF_GPU, assert_close, count_triton_calls, lower_for_cuda
from jaxattn import gated_delta_rule, gated_delta_rule_step
from jaxattn.pallas._common import compile_for_gpu, poison_outputs
from jaxattn.reference import gated_delta_reference

TOL = {jnp.dtype(jnp.float32): (2e-5, 2e-5), jnp.dtype(jnp.bfloat16): (3e-2, 3e-2), jnp.dtype(jnp.float16): (6e-3, 6e-3)}
GRAD_TOL = {jnp.dtype(jnp.float32): (1e-4, 1e-4), jnp.dtype(jnp.bfloat16): (6e-2, 6e-2),
            jnp.dtype(jnp.float16): (1e-2, 1e-2)}


def inputs(b, n, h, dk, dv, dtype, decay=True, state=True, seed=0, hk=None):
    ks = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731  (Gated DeltaNet's L2 norm)
    q = unit(jax.random.normal(ks[0], (b, n, hk or h, dk))).astype(dtype)
    k = unit(jax.random.normal(ks[1], (b, n, hk or h, dk))).astype(dtype)
    v = jax.random.normal(ks[2], (b, n, h, dv)).astype(dtype)
    g = -0.3 * jax.nn.softplus(jax.random.normal(ks[3], (b, n, h))) if decay else jnp.zeros((b, n, h))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, n, h)))
    s0 = 0.2 * jax.random.normal(ks[5], (b, h, dk, dv)) if state else None
    return q, k, v, g, beta, s0


CASES = [  # (batch, seq, heads, d_k, d_v, dtype, decay, initial state, q / k heads), slow
    ((2, 70, 3, 32, 64, jnp.float32, True, True, 3), False),  # a ragged last chunk, d_k != d_v
    ((1, 150, 4, 64, 64, jnp.bfloat16, True, False, 2), False),  # q / k heads shared by two value heads
    ((1, 33, 2, 16, 32, jnp.float16, False, True, 2), False),  # no decay: DeltaNet
    ((1, 1, 4, 128, 128, jnp.bfloat16, True, True, 4), True),  # one token
    ((1, 200, 2, 128, 128, jnp.float32, True, True, 1), True),
]
# the kernels on every case; the XLA path alone in fp32 by default
PARAMS = [pytest.param(impl, *case, marks=[pytest.mark.slow] if slow or (impl == "xla" and case[5] != jnp.float32)
                       else []) for case, slow in CASES for impl in ("pallas", "xla")]


@pytest.mark.parametrize("impl,b,n,h,dk,dv,dtype,decay,state,hk", PARAMS)
def test_matches_the_recurrence_forward_and_gradients(impl, b, n, h, dk, dv, dtype, decay, state, hk):
    q, k, v, g, beta, s0 = inputs(b, n, h, dk, dv, dtype, decay, state, hk=hk)
    with poison_outputs():  # (jitted: interpret mode's kernels run faster compiled than op by op)
        o, s = jax.jit(functools.partial(gated_delta_rule, return_state=True, impl=impl))(q, k, v, g, beta,
                                                                                         initial_state=s0)
    ro, rs = gated_delta_reference(q, k, v, g, beta, initial_state=s0)
    assert o.dtype == dtype and s.dtype == jnp.float32 and o.shape == (b, n, h, dv)
    assert_close(o, ro, dtype, "output", tol=TOL)
    assert_close(s, rs, dtype, "final state", tol=TOL)
    ct = jax.random.normal(jax.random.key(9), o.shape)
    ct_s = jax.random.normal(jax.random.key(10), s.shape)

    def loss(fn, q, k, v, g, beta, s0):
        out, st = fn(q, k, v, g, beta, s0)
        return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(st * ct_s)

    ours = functools.partial(loss, lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], return_state=True, impl=impl))
    ref = functools.partial(loss, lambda *a: gated_delta_reference(*a[:5], initial_state=a[5]))
    args = (q, k, v, g, beta, s0 if state else jnp.zeros((b, h, dk, dv)))
    with poison_outputs():
        got = jax.jit(jax.grad(ours, argnums=tuple(range(6))))(*args)
    want = jax.grad(ref, argnums=tuple(range(6)))(*(x.astype(jnp.float32) for x in args))
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dstate"), got, want):
        assert_close(a, e, dtype, name, tol=GRAD_TOL)


def test_steps_continue_the_forward():
    q, k, v, g, beta, s0 = inputs(2, 20, 4, 16, 16, jnp.float32, hk=2)
    o, s = gated_delta_rule(q[:, :12], k[:, :12], v[:, :12], g[:, :12], beta[:, :12], initial_state=s0,
                            return_state=True, impl="pallas")
    full = gated_delta_reference(q, k, v, g, beta, initial_state=s0)[0]
    for t in range(12, 20):
        out, s = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s)
        np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, t]), rtol=1e-5, atol=1e-5)


def test_lowers_for_cuda():
    q, k, v, g, beta, _ = (jax.ShapeDtypeStruct(x.shape, x.dtype) if x is not None else None
                           for x in inputs(1, 256, 2, 128, 128, jnp.bfloat16))

    def step(q, k, v, g, beta):
        return jax.value_and_grad(lambda *a: jnp.sum(gated_delta_rule(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4))(
            q, k, v, g, beta)

    with compile_for_gpu():
        text = lower_for_cuda(step, q, k, v, g, beta)
    assert count_triton_calls(text) == 2  # the forward kernel (writing the chunks' states) and the backward
    off = lower_for_cuda(lambda *a: step(*a), q, k, v, g, beta)  # (a fresh trace: auto off a GPU is XLA)
    assert count_triton_calls(off) == 0
    g4 = jax.ShapeDtypeStruct((*g.shape, 128), jnp.float32)  # a decay per key channel (Kimi Delta Attention)
    with compile_for_gpu():
        text = lower_for_cuda(step, q, k, v, g4, beta)
    # the products (channel_decay; again in the backward) and the forward; the backward and the products' backward
    assert count_triton_calls(text) == 5


def test_bad_input():
    q, k, v, g, beta, s0 = inputs(1, 8, 2, 16, 16, jnp.float32)
    for args, kw, match in [((q, k[..., :8], v, g, beta), {}, "k must have q's shape"),
                            ((q, k, v[:, :4], g, beta), {}, "v must be"),
                            ((q, k, v[:, :, :1], g[..., :1], beta[..., :1]), {}, "a multiple of q's 2"),
                            ((q, k, v, g[..., :1], beta), {}, "g must be"),
                            ((q, k, v, g, beta.astype(jnp.int32)), {}, "beta must be a floating"),
                            ((q, k, v, g, beta), {"initial_state": s0[:, :1]}, "initial_state must be"),
                            ((q[0], k, v, g, beta), {}, "q must have rank 4"),
                            ((q, k, v, g, beta), {"impl": "triton"}, "impl")]:
        with pytest.raises(ValueError, match=match):
            gated_delta_rule(*args, **kw)
    q3, k3, v3, g3, b3, _ = inputs(1, 8, 2, 24, 16, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        gated_delta_rule(q3, k3, v3, g3, b3, impl="pallas")
    assert gated_delta_rule(q3, k3, v3, g3, b3).shape == (1, 8, 2, 16)  # (auto: XLA takes any width)


@pytest.mark.parametrize("impl,dtype", [("pallas", jnp.float32), pytest.param("pallas", jnp.bfloat16, marks=SLOW_OFF_GPU),
                                        ("xla", jnp.float32),
                                        pytest.param("xla", jnp.bfloat16, marks=pytest.mark.slow)])
def test_decay_per_key_channel(impl, dtype):
    """Kimi Delta Attention: g [B, N, H, d_k], each key channel (state row) decaying at its own rate, some very fast
    (no overflow in the chunked form); the kernels (the recurrence's and channel_decay's products, outputs poisoned)
    and the XLA chunked path against the recurrence, forward and gradients; steps continue it."""
    q, k, v, _, beta, s0 = inputs(2, 37, 4, 16, 32, dtype, hk=2)
    g = -0.5 * jax.nn.softplus(2.0 * jax.random.normal(jax.random.key(3), (2, 37, 4, 16)))
    g = g.at[..., 0].set(-30.0)  # (a channel that forgets everything every step)
    with poison_outputs():
        o, s = jax.jit(functools.partial(gated_delta_rule, return_state=True, impl=impl))(q, k, v, g, beta,
                                                                                         initial_state=s0)
    ro, rs = gated_delta_reference(q, k, v, g, beta, initial_state=s0)
    assert_close(o, ro, dtype, "output", tol=TOL)
    assert_close(s, rs, dtype, "final state", tol=TOL)
    ct = jax.random.normal(jax.random.key(9), o.shape)

    def loss(fn, *a):
        out, st = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(st)

    args = (q, k, v, g, beta, s0)
    with poison_outputs():
        got = jax.jit(jax.grad(functools.partial(loss, lambda *a: gated_delta_rule(*a[:5], initial_state=a[5],
                                                                                    return_state=True, impl=impl)),
                               argnums=tuple(range(6))))(*args)
    want = jax.grad(functools.partial(loss, lambda *a: gated_delta_reference(*a[:5], initial_state=a[5])),
                    argnums=tuple(range(6)))(*(x.astype(jnp.float32) for x in args))
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dstate"), got, want):
        assert_close(a, e, dtype, name, tol=GRAD_TOL)
    o_head, st = gated_delta_rule(q[:, :30], k[:, :30], v[:, :30], g[:, :30], beta[:, :30], initial_state=s0,
                                  return_state=True, impl=impl)
    for t in range(30, 37):
        out, st = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], st)
        assert_close(out, ro[:, t], dtype, f"step {t}", tol=TOL)
    with pytest.raises(ValueError, match="per key channel"):
        gated_delta_rule(q, k, v, g[..., :3], beta)


@pytest.mark.parametrize("impl,channels", [("pallas", False), ("pallas", True),
                                           pytest.param("xla", True, marks=pytest.mark.slow)])
def test_packed_documents_equal_each_document_alone(impl, channels):
    """segment_ids: documents packed in a row (across chunk boundaries, one a single token; runs of equal ids, an
    id coming back) each run from a zero state, the initial state the first's; outputs, the final state (the last document's) and gradients equal the
    recurrence run on each document alone."""
    q, k, v, g, beta, s0 = inputs(2, 70, 4, 16, 32, jnp.float32, hk=2)
    if channels:  # (Kimi Delta Attention's per-channel decays)
        g = -0.3 * jax.nn.softplus(jax.random.normal(jax.random.key(4), (2, 70, 4, 16)))
    cuts = [[0, 16, 17, 40, 70], [0, 33, 64, 70]]  # (16: a chunk boundary; 16-17: one token)
    # (ids alternate: a document is a run of equal ids, so an id comes back in a later document)
    seg = jnp.asarray([np.repeat(np.arange(len(c) - 1) % 2, np.diff(c)) for c in cuts], jnp.int32)
    ct = jax.random.normal(jax.random.key(9), (2, 70, 4, 32))

    def loss(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, return_state=True, impl=impl)
        return jnp.sum(o * ct) + jnp.sum(s), (o, s)

    with poison_outputs():
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(q, k, v, g, beta, s0)

    def alone(q, k, v, g, beta, s0):  # the recurrence on each document by itself
        outs, finals = [], []
        for r, c in enumerate(cuts):
            row = []
            for i, (a, e) in enumerate(zip(c[:-1], c[1:])):
                sl = lambda x: x[r:r + 1, a:e]  # noqa: E731
                init = s0[r:r + 1] if i == 0 else None
                o1, s1 = gated_delta_reference(sl(q), sl(k), sl(v), sl(g), sl(beta), initial_state=init)
                row.append(o1)
            outs.append(jnp.concatenate(row, axis=1))
            finals.append(s1)
        o_all, s_all = jnp.concatenate(outs), jnp.concatenate(finals)
        return jnp.sum(o_all * ct) + jnp.sum(s_all), (o_all, s_all)

    (_, (ro, rs)), want = jax.value_and_grad(alone, argnums=tuple(range(6)), has_aux=True)(q, k, v, g, beta, s0)
    assert_close(o, ro, jnp.float32, "output", tol=TOL)
    assert_close(s, rs, jnp.float32, "final state", tol=TOL)
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dstate"), grads, want):
        assert_close(a, e, jnp.float32, name, tol=GRAD_TOL)
    ref_o, _ = gated_delta_reference(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
    assert_close(ref_o, ro, jnp.float32, "the oracle's own segment_ids", tol=TOL)
    with pytest.raises(ValueError, match="segment_ids must be an integer"):
        gated_delta_rule(q, k, v, g, beta, segment_ids=seg[:, :5])
