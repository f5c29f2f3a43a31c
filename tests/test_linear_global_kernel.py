"""L²ViT linear global attention kernels (interpret mode) against the quadratic fp32 oracle:
forward and gradients (q, k, v, temperature), ragged lengths, padded head dims, both sides of the
clamp, split reductions, every dtype; impl dispatch; CUDA lowering of every config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GRAD_TOL, assert_close, count_triton_calls, lower_for_cuda
from jaxattn import linear_global_attention
from jaxattn.pallas import _common
from jaxattn.pallas.linear_global import CONFIGS, LinearGlobalConfig, linear_global_kernel
from jaxattn.reference.linear_global import linear_global_reference

F32 = jnp.dtype(jnp.float32)


def _inputs(seed, b, nq, nk, h, d, e, dtype, scale=1.0):
    rng = np.random.default_rng(seed)
    q, k = (scale * rng.standard_normal((b, n, h, d)) for n in (nq, nk))
    v = rng.standard_normal((b, nk, h, e))
    tau = jnp.asarray(rng.uniform(0.1, 1.0, (h,)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((b, nq, h, e)), jnp.float32)
    return (*(jnp.asarray(a, jnp.float32).astype(dtype) for a in (q, k, v)), tau, ct)


# (b, nq, nk, heads, d, e, clamp, splits). φ(q)·z runs ~85-3500 here: clamp 500 binds on about
# half the rows, 1e4 on all (no gradient through the normaliser), 1e-3 and 100 on none or few;
# splits 1 / 3 / auto (one per block here)
CASES = [
    (2, 77, 130, 3, 24, 40, 500.0, None),  # cross lengths, head dims padded to 32 / 64
    (1, 64, 64, 2, 16, 16, 100.0, 3),  # whole blocks, 3-way split of 2 blocks
    (1, 200, 33, 1, 64, 8, 1e4, 1),  # longer queries than keys, one program per reduction
    (1, 9, 150, 5, 128, 128, 1e-3, 2),  # widest head dims, odd heads, one query block
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{1}x{2}d{4}e{5}c{6:g}s{7}".format(*c))
def test_kernel_matches_oracle(case, dtype):
    b, nq, nk, h, d, e, clamp, splits = case
    q, k, v, tau, ct = _inputs(sum(case[:6]), b, nq, nk, h, d, e, dtype)
    block = 32 if jnp.dtype(dtype) == F32 else 64
    # the widest case runs the dq kernel on half blocks (as the d=128 table entry)
    cfg = LinearGlobalConfig(block, 8 if max(d, e) > 64 else 4, 2, splits, block_dq=block // 2 if d == 128 else None)
    up = [x.astype(jnp.float32) for x in (q, k, v)]

    def loss(fn, *a):
        return jnp.sum(fn(*a).astype(jnp.float32) * ct)

    def kernel(q, k, v, t):
        return linear_global_kernel(q, k, v, t, clamp=clamp, config=cfg)

    def oracle(q, k, v, t):
        return linear_global_reference(q, k, v, t, clamp=clamp)

    with _common.poison_outputs():  # jitted, traced inside the context
        out = jax.jit(kernel)(q, k, v, tau)
        grads = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=range(4)))(q, k, v, tau)
    want = jax.jit(oracle)(*up, tau)
    want_grads = jax.jit(jax.grad(lambda *a: loss(oracle, *a), argnums=range(4)))(*up, tau)
    assert out.dtype == dtype and out.shape == (b, nq, h, e)
    assert_close(out, want, dtype, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dtau"), grads, want_grads):
        assert g.dtype == (jnp.float32 if name == "dtau" else dtype), name
        assert_close(g, w, dtype, name, tol=GRAD_TOL)
    assert float(jnp.abs(grads[3]).max()) > 0


def test_normaliser_sides_both_reached():
    """The CASES reach both branches of ``max(φ(q)·z, clamp)``, in one case side by side (else
    the gradient test of one branch could not fail)."""
    fracs = []
    for b, nq, nk, h, d, e, clamp, _ in CASES:
        q, k, *_ = _inputs(sum((b, nq, nk, h, d, e)), b, nq, nk, h, d, e, jnp.float32)
        raw = jnp.einsum("bihd,bjhd->bhi", jax.nn.relu(q), jax.nn.relu(k))
        fracs.append(float(jnp.mean(raw > clamp)))
    assert max(fracs) == 1.0 and min(fracs) == 0.0 and any(0.2 < f < 0.8 for f in fracs), fracs


def test_zero_query_features_give_zeros():
    q, k, v, tau, ct = _inputs(3, 1, 40, 40, 2, 16, 16, jnp.float32)
    q = -jnp.abs(q)  # φ(q) = 0: output 0 and no gradient through the state
    kern = jax.jit(lambda *a: linear_global_attention(*a[:3], temperature=a[3], impl="pallas"))
    assert np.array_equal(np.asarray(kern(q, k, v, tau)), np.zeros((1, 40, 2, 16)))
    g = jax.jit(jax.grad(lambda *a: jnp.sum(kern(*a) * ct), argnums=range(4)))(q, k, v, tau)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)
    assert float(jnp.abs(g[1]).max()) == 0 and float(jnp.abs(g[2]).max()) == 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_two_byte_output_is_the_fp32_result_rounded_once(dtype):
    """The fp32 state meets two-byte inputs as a scaled hi + lo pair: the output's error is the
    rounding of the exact output to the dtype, no more (a plain cast of the state adds 5-10 %)."""
    q, k, v, tau, _ = _inputs(5, 1, 64, 640, 2, 128, 128, dtype)
    out = jax.jit(lambda *a: linear_global_kernel(*a, clamp=1e-3))(q, k, v, tau).astype(jnp.float32)
    want = linear_global_reference(*(x.astype(jnp.float32) for x in (q, k, v)), tau, clamp=1e-3)
    rounding = float(jnp.linalg.norm(want.astype(dtype).astype(jnp.float32) - want))
    assert float(jnp.linalg.norm(out - want)) <= 1.01 * rounding


def test_impl_dispatch():
    q, k, v, tau, _ = _inputs(6, 1, 32, 32, 2, 16, 16, jnp.bfloat16)

    def text(impl):
        return lower_for_cuda(lambda *a: linear_global_attention(*a[:3], temperature=a[3], impl=impl), q, k, v, tau)

    with _common.compile_for_gpu():
        assert count_triton_calls(text("pallas")) == 2  # state, out
        assert count_triton_calls(text("xla")) == 0
        assert count_triton_calls(text("auto")) == 2
    wide = jnp.zeros((1, 8, 2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dims up to 128"):
        linear_global_attention(wide, wide, wide, temperature=tau, impl="pallas")
    with _common.compile_for_gpu():  # too wide for the kernels: auto falls back to XLA
        assert count_triton_calls(lower_for_cuda(
            lambda a: linear_global_attention(a, a, a, temperature=tau), wide)) == 0


@pytest.mark.parametrize("key", sorted(CONFIGS), ids=lambda k: f"d{k[0]}x{k[1]}B")
def test_lowers_for_cuda(key):
    d, nbytes = key
    dtype = jnp.float32 if nbytes == 4 else jnp.bfloat16
    q, k, v, tau, ct = _inputs(7, 2, 300, 257, 3, d, d, dtype)

    def loss(q, k, v, t):
        return jnp.sum(linear_global_kernel(q, k, v, t, clamp=100.0).astype(jnp.float32) * ct)

    with _common.compile_for_gpu():
        text = lower_for_cuda(jax.grad(loss, argnums=range(4)), q, k, v, tau)
    assert count_triton_calls(text) == 4  # state, out, dq, dkv
