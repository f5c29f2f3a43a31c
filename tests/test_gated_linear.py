"""Gated linear attention (jaxattn.gated_linear_attention: Mamba-2's SSD / simple GLA with one decay per head, GLA
with one per key channel) on the gated delta kernels' delta=False mode (interpret mode, outputs poisoned) and the
XLA chunked path, against the token-by-token recurrence: outputs, final states and the gradients of q, k, v, g and
the initial state; ragged lengths, shared q / k heads, d_k != d_v, bf16; packed documents and the varlen form;
steps; sequence parallel; CUDA lowering; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SLOW_OFF_GPU, assert_close, count_triton_calls, lower_for_cuda
from jaxattn import gated_delta_rule, gated_linear_attention, gated_linear_attention_step
from jaxattn.pallas._common import compile_for_gpu, poison_outputs
from jaxattn.reference import gated_linear_reference

TOL = {jnp.dtype(jnp.float32): (2e-5, 2e-5), jnp.dtype(jnp.bfloat16): (3e-2, 3e-2)}
GRAD_TOL = {jnp.dtype(jnp.float32): (1e-4, 1e-4), jnp.dtype(jnp.bfloat16): (6e-2, 6e-2)}


def inputs(b, n, h, hk, dk, dv, dtype, channels, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = (0.5 * jax.random.normal(ks[0], (b, n, hk, dk))).astype(dtype)
    k = (0.5 * jax.random.normal(ks[1], (b, n, hk, dk))).astype(dtype)
    v = jax.random.normal(ks[2], (b, n, h, dv)).astype(dtype)
    g = -0.2 * jax.nn.softplus(jax.random.normal(ks[3], (b, n, h, dk) if channels else (b, n, h)))
    if channels:
        g = g.at[..., 0].set(-25.0)  # (a channel that forgets at once: no overflow in the chunked form)
    s0 = 0.3 * jax.random.normal(ks[4], (b, h, dk, dv))
    return q, k, v, g, s0


HEAD = (2, 70, 4, 2, 16, 32, jnp.float32, False)  # (batch, seq, heads, q / k heads, d_k, d_v, dtype, per channel)
CHANNEL = (1, 37, 2, 2, 32, 16, jnp.float32, True)  # GLA
BF16 = (1, 90, 2, 1, 16, 16, jnp.bfloat16, False)
# HEAD: Mamba-2's shape, groups of heads sharing B (k) and C (q). The kernels on every case; XLA's chunked path on
# GLA's by default (one decay per head: the chunked path test_gated_delta checks, beta aside; slow)
PARAMS = [("pallas", *HEAD), ("pallas", *CHANNEL), pytest.param("pallas", *BF16, marks=SLOW_OFF_GPU),
          pytest.param("xla", *HEAD, marks=pytest.mark.slow), ("xla", *CHANNEL)]


@pytest.mark.parametrize("impl,b,n,h,hk,dk,dv,dtype,channels", PARAMS)
def test_matches_the_recurrence(impl, b, n, h, hk, dk, dv, dtype, channels):
    q, k, v, g, s0 = inputs(b, n, h, hk, dk, dv, dtype, channels)
    ct = jax.random.normal(jax.random.key(9), (b, n, h, dv))
    ct_s = jax.random.normal(jax.random.key(10), s0.shape)

    def loss(fn, *a):
        o, s = fn(*a)
        return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s * ct_s), (o, s)

    ours = functools.partial(loss, lambda q, k, v, g, s0: gated_linear_attention(
        q, k, v, g, initial_state=s0, return_state=True, impl=impl))
    with poison_outputs():
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(ours, argnums=tuple(range(5)), has_aux=True))(q, k, v, g, s0)
    ref = functools.partial(loss, lambda q, k, v, g, s0: gated_linear_reference(q, k, v, g, initial_state=s0))
    (_, (ro, rs)), want = jax.value_and_grad(ref, argnums=tuple(range(5)), has_aux=True)(
        *(x.astype(jnp.float32) for x in (q, k, v, g, s0)))
    assert o.dtype == dtype and o.shape == (b, n, h, dv) and s.dtype == jnp.float32
    assert_close(o, ro, dtype, "output", tol=TOL)
    assert_close(s, rs, dtype, "final state", tol=TOL)
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dstate"), grads, want):
        assert_close(a, e, dtype, name, tol=GRAD_TOL)


def test_steps_continue_the_forward():
    q, k, v, g, s0 = inputs(2, 20, 4, 2, 16, 16, jnp.float32, False)
    full = gated_linear_reference(q, k, v, g, initial_state=s0)[0]
    _, s = gated_linear_attention(q[:, :12], k[:, :12], v[:, :12], g[:, :12], initial_state=s0, return_state=True,
                                  impl="pallas")
    for t in range(12, 20):
        out, s = gated_linear_attention_step(q[:, t], k[:, t], v[:, t], g[:, t], s)
        np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, t]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_documents_packed_and_varlen(impl):
    """segment_ids (each document from a zero state) and cu_seqlens (each from its own state, its own final state)
    equal the recurrence on each document alone."""
    lengths = [5, 0, 16, 1, 30]
    q, k, v, g, _ = inputs(1, sum(lengths), 2, 1, 16, 16, jnp.float32, True)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    s0 = 0.3 * jax.random.normal(jax.random.key(5), (len(lengths), 2, 16, 16))
    with poison_outputs():
        o, s = jax.jit(lambda *a: gated_linear_attention(*a[:4], initial_state=a[4], cu_seqlens=a[5], return_state=True,
                                                         impl=impl))(q, k, v, g, s0, jnp.asarray(cu, jnp.int32))
        seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
        o_seg = gated_linear_attention(q, k, v, g, segment_ids=seg, impl=impl)
    for i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
        sl = lambda x: x[:, a:e]  # noqa: E731
        if a == e:
            assert_close(s[i], s0[i], jnp.float32, "empty document's state", tol=TOL)
            continue
        ro, rs = gated_linear_reference(sl(q), sl(k), sl(v), sl(g), initial_state=s0[i:i + 1])
        assert_close(sl(o), ro, jnp.float32, f"document {i}", tol=TOL)
        assert_close(s[i:i + 1], rs, jnp.float32, f"document {i} state", tol=TOL)
        assert_close(sl(o_seg), gated_linear_reference(sl(q), sl(k), sl(v), sl(g))[0], jnp.float32,
                     f"packed document {i}", tol=TOL)


def test_lowers_for_cuda():
    sds = jax.ShapeDtypeStruct
    q, v = sds((1, 256, 2, 128), jnp.bfloat16), sds((1, 256, 4, 128), jnp.bfloat16)

    def step(q, k, v, g):
        return jax.grad(lambda *a: jnp.sum(gated_linear_attention(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(
            q, k, v, g)

    with compile_for_gpu():
        assert count_triton_calls(lower_for_cuda(step, q, q, v, sds((1, 256, 4), jnp.float32))) == 2
        assert count_triton_calls(lower_for_cuda(step, q, q, v, sds((1, 256, 4, 128), jnp.float32))) == 5


def test_bad_input():
    q, k, v, g, s0 = inputs(1, 8, 2, 2, 16, 16, jnp.float32, False)
    for args, kw, match in [((q, k, v, g[..., :1]), {}, "g must be"),
                            ((q, k[..., :8], v, g), {}, "k must have q's shape"),
                            ((q, k, v, g), {"initial_state": s0[:, :1]}, "initial_state must be"),
                            ((q, k, v, g), {"impl": "cuda"}, "impl")]:
        with pytest.raises(ValueError, match=match):
            gated_linear_attention(*args, **kw)
    with pytest.raises(ValueError, match="gated_linear_attention"):  # (the delta rule needs its beta)
        gated_delta_rule(q, k, v, g, None)


SP_SCRIPT = """
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    import jaxattn
    from jaxattn.ops._spmd import shard_map
    from jaxattn.reference import gated_linear_reference

    mesh = Mesh(np.array(jax.devices()), ("sp",))
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    for channels in (False, True):
        q, k = (0.5 * jax.random.normal(key, (2, 64, 2, 16)) for key in ks[:2])
        v = jax.random.normal(ks[2], (2, 64, 4, 16))
        g = -0.2 * jax.nn.softplus(jax.random.normal(ks[3], (2, 64, 4, 16) if channels else (2, 64, 4)))
        s0 = 0.3 * jax.random.normal(ks[4], (2, 4, 16, 16))
        seq = P(None, "sp")

        def loss(fn, q, k, v, g, s0):
            o, s = fn(q, k, v, g, s0)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s), (o, s)

        def sp(q, k, v, g, s0):
            return shard_map(lambda *a: jaxattn.gated_linear_attention(*a[:4], initial_state=a[4], return_state=True,
                                                                         sequence_axis="sp", impl="pallas"),
                             mesh=mesh, in_specs=(seq, seq, seq, seq, P()), out_specs=(seq, P()))(q, k, v, g, s0)

        ref = lambda q, k, v, g, s0: gated_linear_reference(q, k, v, g, initial_state=s0)
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(lambda *a: loss(sp, *a), argnums=tuple(range(5)),
                                                        has_aux=True))(q, k, v, g, s0)
        (_, (ro, rs)), want = jax.value_and_grad(lambda *a: loss(ref, *a), argnums=tuple(range(5)), has_aux=True)(
            q, k, v, g, s0)
        check(o, ro, 1e-4, "output")
        check(s, rs, 1e-4, "final state")
        for name, a, e in zip(("dq", "dk", "dv", "dg", "ds0"), grads, want):
            check(a, e, 1e-4, name)
        print(f"channels={channels} ok")
    print("SP-OK")
"""


@pytest.mark.slow
def test_sequence_parallel_on_four_devices():
    """sequence_axis inside a shard_map over 4 forced CPU devices (the gated delta rule's affine composition, without
    the delta rule): outputs, final state and gradients equal the recurrence on the whole sequence."""
    from conftest import run_on_cpu_devices

    out = run_on_cpu_devices(SP_SCRIPT)
    assert "SP-OK" in out and "channels=True ok" in out, out
