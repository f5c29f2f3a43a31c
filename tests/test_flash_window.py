"""Local windows and logits soft cap in the flash kernels (interpret mode) against the fp32
oracle and jax.nn.dot_product_attention, forward and gradients; block skipping is checked by
poisoning keys/queries that no visited block may touch."""

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

SMALL = flash.FlashConfig(32, 16, 4, 2, 32, 16, 16, 32, 4, 2)  # many blocks on short sequences
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _case(seed: int) -> dict:
    r = np.random.default_rng(1000 + seed)
    hkv = int(r.choice([1, 2]))
    sq = int(r.integers(1, 160))
    sk = sq if r.random() < 0.5 else int(r.integers(1, 160))
    side = lambda: None if r.random() < 0.25 else int(r.integers(0, 70))  # noqa: E731
    window = (side(), side())
    return dict(batch=int(r.integers(1, 3)), sq=sq, sk=sk, hkv=hkv, hq=hkv * int(r.choice([1, 2])),
                d=int(r.choice([32, 64])), causal=bool(r.random() < 0.5),
                window=None if window == (None, None) else window,
                cap=None if r.random() < 0.5 else float(r.choice([1.0, 5.0, 30.0])),
                seg=bool(r.random() < 0.25), dtype=DTYPES[seed % 3], cfg=SMALL if r.random() < 0.7 else None,
                seed=seed)


@pytest.mark.parametrize("seed", [*range(6), *(pytest.param(s, marks=pytest.mark.slow) for s in range(6, 12))])
def test_random_windows_and_caps_forward_and_grads(seed):
    c = _case(seed)
    ks = jax.random.split(jax.random.PRNGKey(c["seed"]), 6)
    q = randn(ks[0], (c["batch"], c["sq"], c["hq"], c["d"]), c["dtype"])
    k = randn(ks[1], (c["batch"], c["sk"], c["hkv"], c["d"]), c["dtype"]) * 2  # large logits: the cap bites
    v = randn(ks[2], (c["batch"], c["sk"], c["hkv"], c["d"]), c["dtype"])
    w_o = randn(ks[3], (c["batch"], c["sq"], c["hq"], c["d"]), jnp.float32)
    qs = kvs = None
    if c["seg"]:
        qs = jnp.sort(jax.random.randint(ks[4], (c["batch"], c["sq"]), 0, 3), axis=1)
        kvs = jnp.sort(jax.random.randint(ks[5], (c["batch"], c["sk"]), 0, 3), axis=1)
    kw = dict(causal=c["causal"], local_window_size=c["window"], logits_soft_cap=c["cap"],
              q_segment_ids=qs, kv_segment_ids=kvs)

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (o, lse)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))

    with poison_outputs():
        (_, (out, lse)), grads = loss(lambda q, k, v: flash.flash_attention(q, k, v, config=c["cfg"], **kw))(q, k, v)
    (_, (ref, ref_lse)), ref_grads = loss(lambda q, k, v: attention_reference(q, k, v, **kw))(q, k, v)
    assert_close(out, ref, c["dtype"], f"out {c}")
    assert_close(lse, ref_lse, jnp.float32 if c["dtype"] == jnp.float32 else c["dtype"], f"lse {c}")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, c["dtype"], f"d{name} {c}", tol=GRAD_TOL)


@pytest.mark.parametrize("window", [5, (40, 0), (None, 9), pytest.param((0, 17), marks=pytest.mark.slow),
                                    pytest.param((33, None), marks=pytest.mark.slow)])
def test_public_op_matches_jax_nn_local_window(window):
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (randn(kk, (2, 120, 4, 32), jnp.float32) for kk in ks)
    want = jax.nn.dot_product_attention(q, k, v, local_window_size=_jax_window(window), implementation="xla")
    assert_close(jaxattn.attention(q, k, v, local_window_size=window, impl="pallas"), want, jnp.float32, "window")
    assert_close(jaxattn.attention(q, k, v, local_window_size=window, impl="xla"), want, jnp.float32, "xla")


def _jax_window(w):
    """jax.nn takes ints only: an unbounded side becomes longer than the sequence."""
    return w if isinstance(w, int) else tuple(10_000 if s is None else s for s in w)


def test_soft_cap_matches_formula_and_bounds_logits():
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    q, k, v = (randn(kk, (1, 64, 2, 32), jnp.float32) * 4 for kk in ks)
    cap = 2.0
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
    p = jax.nn.softmax(cap * jnp.tanh(s / cap), axis=-1)
    want = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    assert_close(jaxattn.attention(q, k, v, logits_soft_cap=cap, impl="pallas"), want, jnp.float32, "cap")
    _, lse = jaxattn.attention(q, k, v, logits_soft_cap=cap, impl="pallas", return_lse=True)
    assert float(lse.max()) <= cap + np.log(64) + 1e-5  # every capped logit is below cap


def test_blocks_outside_the_window_are_skipped():
    """NaN keys/values that only skipped blocks hold must not reach the output (0 * NaN = NaN
    in any visited block), nor NaN queries the dk/dv kernel must skip."""
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    n, w = 512, 64
    q = randn(ks[0], (1, 64, 2, 32), jnp.float32)  # the last 64 positions of a 512-key cache
    k, v = (randn(kk, (1, n, 1, 32), jnp.float32) for kk in ks[1:3])
    k_bad, v_bad = k.at[:, :300].set(jnp.nan), v.at[:, :300].set(jnp.nan)
    run = jax.jit(lambda q, k, v: flash.flash_attention(q, k, v, causal=True, local_window_size=(w, None),
                                                        config=SMALL))
    out, _ = run(q, k_bad, v_bad)
    ref, _ = attention_reference(q, k, v, causal=True, local_window_size=(w, None))
    assert_close(out, ref, jnp.float32, "forward")
    dq = jax.jit(jax.grad(lambda q: jnp.sum(run(q, k_bad, v_bad)[0])))(q)
    assert bool(jnp.isfinite(dq).all())
    # dk/dv: queries 0..63 and 448..511 are NaN; keys 200..299 are seen by queries 200..363 only
    # (causal below, window above), so their grads stay finite
    qf = randn(ks[3], (1, n, 2, 32), jnp.float32).at[:, :64].set(jnp.nan).at[:, 448:].set(jnp.nan)
    dk, dv = jax.jit(jax.grad(lambda k, v: jnp.sum(jnp.nan_to_num(run(qf, k, v)[0])), (0, 1)))(k, v)
    assert bool(jnp.isfinite(dk[:, 200:300]).all() and jnp.isfinite(dv[:, 200:300]).all())


def test_bad_window_and_cap():
    x = jnp.zeros((1, 8, 2, 32))
    for bad in (-1, (3,), (1, -2), (1.5, 2), "left", True):
        with pytest.raises(ValueError, match="local_window_size"):
            jaxattn.attention(x, x, x, local_window_size=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="logits_soft_cap"):
            jaxattn.attention(x, x, x, logits_soft_cap=bad)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_window_and_cap_lower_for_cuda(dtype):
    args = [jax.ShapeDtypeStruct((2, 4096, 8, 128), dtype), jax.ShapeDtypeStruct((2, 4096, 2, 128), dtype),
            jax.ShapeDtypeStruct((2, 4096, 2, 128), dtype)]

    def loss(q, k, v):
        o, _ = flash.flash_attention(q, k, v, causal=True, local_window_size=(1024, None), logits_soft_cap=50.0,
                                     interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    assert count_triton_calls(lower_for_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)) >= 3
