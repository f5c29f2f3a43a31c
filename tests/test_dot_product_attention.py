"""jaxattn.dot_product_attention is jax.nn.dot_product_attention on jaxattn's kernels: JAX's own XLA
implementation is the oracle (outputs, residuals, gradients) over GQA, top-left causal and window masks with
T == S and T != S, bias and boolean masks, padding lengths and unbatched inputs, on the XLA path and the
Pallas kernels (interpret mode); the kernel path lowers for CUDA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import assert_close

TOL = {jnp.dtype(jnp.float32): (2e-5, 2e-5), jnp.dtype(jnp.bfloat16): (2e-2, 2e-2)}


def _inputs(b, t, s, n, k, h, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
    kk = jax.random.normal(ks[1], (b, s, k, h), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, k, h), jnp.float32).astype(dtype)
    return q, kk, v, ks[3]


# (b, t, s, n, k, options); every query keeps at least one key (JAX averages over fully masked rows)
CASES = {
    "mha": (2, 24, 24, 2, 2, {}),
    "gqa-causal": (2, 24, 24, 4, 2, {"is_causal": True}),
    "causal-t<s-top-left": (1, 16, 40, 2, 1, {"is_causal": True}),
    "causal-t>s-top-left": (1, 40, 16, 2, 2, {"is_causal": True}),
    "window": (2, 32, 32, 2, 2, {"local_window_size": (5, 2)}),
    "window-t<s": (1, 20, 36, 2, 1, {"local_window_size": (3, 4), "is_causal": False}),
    "window-int-causal": (1, 32, 32, 2, 2, {"local_window_size": 6, "is_causal": True}),
    "bias-mask": (2, 24, 30, 4, 2, {"bias": "bnts", "mask": "b1ts"}),
    "bias-causal-scale": (2, 24, 24, 2, 2, {"bias": "1nts", "is_causal": True, "scale": 0.3}),
    "padding": (3, 24, 28, 2, 2, {"query_seq_lengths": [24, 10, 1], "key_value_seq_lengths": [28, 5, 17]}),
    "padding-kv-causal": (2, 24, 24, 2, 1, {"key_value_seq_lengths": [7, 24], "is_causal": True}),
}


def _options(opts, b, t, s, n, key):
    opts = dict(opts)
    k1, k2 = jax.random.split(key)
    if opts.get("bias") == "bnts":
        opts["bias"] = jax.random.normal(k1, (b, n, t, s))
    elif opts.get("bias") == "1nts":
        opts["bias"] = jax.random.normal(k1, (1, n, t, s))
    if opts.get("mask") == "b1ts":
        m = jax.random.bernoulli(k2, 0.6, (b, 1, t, s))
        opts["mask"] = m.at[..., 0].set(True)  # (no fully masked row)
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in opts:
            opts[name] = jnp.asarray(opts[name], jnp.int32)
    return opts


def _check(name, impl, dtype, grads):
    b, t, s, n, k, opts = CASES[name]
    q, kk, v, key = _inputs(b, t, s, n, k, 32, dtype)
    opts = _options(opts, b, t, s, n, key)
    want, want_lse = jax.nn.dot_product_attention(q, kk, v, implementation="xla", return_residual=True, **opts)
    got, lse = jaxattn.dot_product_attention(q, kk, v, implementation=impl, return_residual=True, **opts)
    assert got.shape == want.shape and got.dtype == want.dtype and lse.shape == want_lse.shape
    assert_close(got, want, dtype, f"{name} {impl} output", tol=TOL)
    valid = np.ones((b, t), bool) if "query_seq_lengths" not in opts else \
        np.arange(t)[None] < np.asarray(opts["query_seq_lengths"])[:, None]
    assert_close(np.asarray(lse, np.float32)[valid], np.asarray(want_lse, np.float32)[valid], dtype,
                 f"{name} {impl} residual", tol=TOL)
    if not grads:
        return
    diff = [0, 1, 2] + (["bias"] if "bias" in opts else [])

    def loss(fn, q, kk, v, bias):
        o = dict(opts, **({"bias": bias} if bias is not None else {}))
        w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))
        return jnp.sum(fn(q, kk, v, **o).astype(jnp.float32) * w)

    ref = lambda *a, **kw: jax.nn.dot_product_attention(*a, implementation="xla", **kw)  # noqa: E731
    ours = lambda *a, **kw: jaxattn.dot_product_attention(*a, implementation=impl, **kw)  # noqa: E731
    argnums = (1, 2, 3) + ((4,) if "bias" in diff else ())
    args = (q, kk, v, opts.get("bias"))
    g_want = jax.grad(loss, argnums=argnums)(ref, *args)
    g_got = jax.grad(loss, argnums=argnums)(ours, *args)
    for which, a, w in zip(("dq", "dk", "dv", "dbias"), g_got, g_want):
        assert_close(a, w, dtype, f"{name} {impl} {which}", tol=TOL)


GRAD_CASES = ("gqa-causal", "causal-t>s-top-left", "window-t<s", "bias-mask", "padding")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("causal-t>s-top-left", "bias-mask",
                                                                                "padding", "window-t<s") else n
                                  for n in sorted(CASES)])  # (those three's gradients: on the kernels below)
def test_matches_jax_on_the_xla_path(name):
    _check(name, "xla", jnp.float32, grads=name in GRAD_CASES)


@pytest.mark.parametrize("name", ["gqa-causal", "causal-t<s-top-left", "window", "bias-mask",
                                  pytest.param("padding", marks=pytest.mark.slow)])
def test_matches_jax_on_the_kernels(name):
    _check(name, "pallas", jnp.float32, grads=name in ("bias-mask", "padding", "causal-t<s-top-left"))


def test_bf16_and_unbatched():
    _check("gqa-causal", "pallas", jnp.bfloat16, grads=False)
    q, k, v, _ = _inputs(1, 12, 12, 2, 1, 32, jnp.float32)
    want = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    got = jaxattn.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="pallas")
    assert got.shape == (12, 2, 32)
    assert_close(got, want, jnp.float32, "unbatched", tol=TOL)


def test_a_fully_masked_row_gives_zeros():
    """(The documented difference: JAX's XLA path averages the values there.)"""
    q, k, v, _ = _inputs(1, 4, 6, 2, 2, 32, jnp.float32)
    mask = jnp.ones((1, 1, 4, 6), bool).at[:, :, 2].set(False)
    out, lse = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation="xla", return_residual=True)
    assert (np.asarray(out[0, 2]) == 0).all() and np.isneginf(np.asarray(lse[0, 2])).all()
    assert np.isfinite(np.asarray(out)).all()


def test_bad_input_is_named():
    q, k, v, _ = _inputs(2, 8, 8, 2, 2, 32, jnp.float32)
    for kwargs, match in [(dict(mask=jnp.ones((1, 1, 8, 8))), "mask must be boolean"),
                          (dict(bias=jnp.ones((1, 1, 1, 8, 8))), "bias must have at most 4 dims"),
                          (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), r"query_seq_lengths must be int \[batch\]"),
                          (dict(key_value_seq_lengths=jnp.ones((2,))), "key_value_seq_lengths must be int"),
                          (dict(implementation="flash"), "implementation must be")]:
        with pytest.raises(ValueError, match=match):
            jaxattn.dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="share one dtype"):
        jaxattn.dot_product_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="value must have the key's shape"):
        jaxattn.dot_product_attention(q, k, v[:, :4])


def test_kernel_path_lowers_for_cuda():
    from conftest import count_triton_calls, lower_for_cuda
    from jaxattn.pallas._common import compile_for_gpu

    q, k, v, _ = _inputs(2, 64, 64, 4, 2, 64, jnp.bfloat16)
    bias = jnp.zeros((1, 4, 64, 64), jnp.float32)
    lens = jnp.asarray([64, 30], jnp.int32)

    def f(q, k, v, bias):
        return jaxattn.dot_product_attention(q, k, v, bias, is_causal=True, key_value_seq_lengths=lens,
                                             implementation="pallas")

    with compile_for_gpu():
        assert count_triton_calls(lower_for_cuda(f, q, k, v, bias)) == 1
        grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
        assert count_triton_calls(lower_for_cuda(grad, q, k, v, bias)) >= 3  # forward, dq, dk/dv
