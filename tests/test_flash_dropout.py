"""Attention dropout: the flash kernels (interpret mode) against the fp32 oracle with the same keep
mask, forward, lse and gradients; the mask's statistics; unbiasedness; errors; CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, SLOW_OFF_GPU, assert_close, count_triton_calls, lower_for_cuda, randn
from jaxattn.pallas import _dropout, flash
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import attention_reference

SMALL = flash.FlashConfig(32, 16, 4, 2, 32, 16, 16, 32, 4, 2)


# (batch, sq, sk, hq, hkv, d, causal, shared, segments, dtype, rate)
CASES = [
    (2, 37, 53, 4, 2, 32, False, False, False, jnp.float32, 0.3),
    pytest.param((1, 64, 64, 3, 1, 64, True, False, True, jnp.float32, 0.1), marks=pytest.mark.slow),
    pytest.param((2, 19, 40, 2, 2, 32, True, True, False, jnp.float32, 0.5), marks=SLOW_OFF_GPU),
    (1, 48, 48, 4, 2, 64, True, False, False, jnp.bfloat16, 0.2),
    pytest.param((2, 33, 17, 2, 1, 32, False, False, False, jnp.float16, 0.3), marks=pytest.mark.slow),
]


def _case_id(c) -> str:
    return f"{c[1]}x{c[2]}h{c[3]}/{c[4]}{'c' if c[6] else ''}{'s' if c[7] else ''}{'g' if c[8] else ''}-{jnp.dtype(c[9]).name}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_oracle(case):
    batch, sq, sk, hq, hkv, d, causal, shared, seg, dtype, rate = case
    ks = jax.random.split(jax.random.PRNGKey(sq * sk), 6)
    q, k, v = randn(ks[0], (batch, sq, hq, d), dtype), randn(ks[1], (batch, sk, hkv, d), dtype), \
        randn(ks[2], (batch, sk, hkv, d), dtype)
    seed = _dropout.seed_from_key(ks[3])
    qs = kvs = None
    if seg:
        qs = kvs = jnp.repeat(jnp.arange(3), jnp.array([20, 30, 14]), total_repeat_length=sq)[None].repeat(batch, 0)
    kw = dict(causal=causal, dropout_rate=rate, dropout_seed=seed, dropout_shared=shared, q_segment_ids=qs,
              kv_segment_ids=kvs)
    w_o, w_l = randn(ks[4], (batch, sq, hq, d), jnp.float32), randn(ks[5], (batch, sq, hq), jnp.float32)

    def loss(fn):
        def f(q, k, v):
            o, lse = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l)
        return f

    def kernel(q, k, v):
        return flash.flash_attention(q, k, v, config=SMALL, **kw)

    def oracle(q, k, v):
        return attention_reference(q, k, v, **kw)

    with poison_outputs():
        (o, lse), grads = jax.jit(lambda *a: (kernel(*a), jax.grad(loss(kernel), (0, 1, 2))(*a)))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, lse_ref = oracle(*f32)
    assert_close(o, o_ref, dtype, "out")
    assert_close(lse, lse_ref, jnp.float32, "lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, jax.grad(loss(oracle), (0, 1, 2))(*f32)):
        assert_close(g, r, dtype, name, tol=GRAD_TOL)
    # the dropout is real: without it the output differs
    plain = attention_reference(*f32, causal=causal, q_segment_ids=qs, kv_segment_ids=kvs)[0]
    assert float(jnp.max(jnp.abs(o_ref - plain))) > 0.05


def test_mask_statistics():
    """Keep rate 1 - r (to within 5 sigma), no correlation between rows, heads, batch rows or seeds;
    the same seed gives the same mask."""
    rate, n = 0.25, 256
    seed = _dropout.seed_from_key(jax.random.PRNGKey(0))
    m = np.asarray(_dropout.keep_mask(seed, 2, 3, n, n, rate), np.float64)
    sigma = np.sqrt(rate * (1 - rate) / m.size)
    assert abs(m.mean() - (1 - rate)) < 5 * sigma
    per_head = m.reshape(6, -1)
    assert np.all(np.abs(per_head.mean(1) - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / per_head.shape[1]))
    corr = np.corrcoef(per_head)[np.triu_indices(6, 1)]
    assert np.all(np.abs(corr) < 5 / np.sqrt(per_head.shape[1]))
    rows = m[0, 0]
    assert abs(np.corrcoef(rows[:-1].ravel(), rows[1:].ravel())[0, 1]) < 5 / n  # neighbouring rows
    assert abs(np.corrcoef(rows[:, :-1].ravel(), rows[:, 1:].ravel())[0, 1]) < 5 / n  # neighbouring keys
    other = np.asarray(_dropout.keep_mask(_dropout.seed_from_key(jax.random.PRNGKey(1)), 2, 3, n, n, rate))
    assert abs(np.corrcoef(m.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(m.size)
    np.testing.assert_array_equal(m, np.asarray(_dropout.keep_mask(seed, 2, 3, n, n, rate)))


def test_offset_draws_a_block_of_the_larger_mask():
    seed = _dropout.seed_from_key(jax.random.PRNGKey(5))
    big = np.asarray(_dropout.keep_mask(seed, 3, 2, 40, 50, 0.3))
    part = np.asarray(_dropout.keep_mask(seed, 2, 2, 24, 30, 0.3, offset=(1, 16, 20)))
    np.testing.assert_array_equal(part, big[1:3, :, 16:40, 20:50])
    assert 0 < part.mean() < 1


@pytest.mark.slow
def test_kernel_shard_with_offset_is_part_of_the_whole():
    """The kernel on a (batch, query) shard with ``dropout_offset`` gives the rows of the whole
    problem's dropout attention (the oracle on the whole problem), forward and gradients against the
    oracle with the same offset; a key shard draws its columns (checked on the oracle's mask)."""
    ks = jax.random.split(jax.random.PRNGKey(6), 5)
    q, k, v = randn(ks[0], (2, 40, 4, 32), jnp.float32), randn(ks[1], (2, 50, 2, 32), jnp.float32), \
        randn(ks[2], (2, 50, 2, 32), jnp.float32)
    kw = dict(dropout_rate=0.3, dropout_rng=ks[3])
    whole = jaxattn.attention(q, k, v, impl="xla", **kw)
    with poison_outputs():
        part = jaxattn.attention(q[1:, 16:], k[1:], v[1:], impl="pallas", dropout_offset=(1, 16, 0), **kw)
    assert_close(part, whole[1:, 16:], jnp.float32, "shard vs whole")
    assert float(jnp.max(jnp.abs(part - jaxattn.attention(q[1:, 16:], k[1:], v[1:], impl="xla", **kw)))) > 0.05
    seed = _dropout.seed_from_key(ks[3])
    off = (1, 8, 20)
    w = randn(ks[4], (1, 20, 4, 32), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v)[0] * w)

    def kernel(q, k, v):
        return flash.flash_attention(q, k, v, causal=True, dropout_rate=0.3, dropout_seed=seed, dropout_offset=off,
                                     config=SMALL)

    def oracle(q, k, v):
        return attention_reference(q, k, v, causal=True, dropout_rate=0.3, dropout_seed=seed, dropout_offset=off)

    args = (q[:1, :20], k[:1, :30], v[:1, :30])
    assert_close(kernel(*args)[0], oracle(*args)[0], jnp.float32, "offset out")
    for name, g, r in zip(("dq", "dk", "dv"), jax.grad(loss(kernel), (0, 1, 2))(*args),
                          jax.grad(loss(oracle), (0, 1, 2))(*args)):
        assert_close(g, r, jnp.float32, name, tol=GRAD_TOL)


def test_unbiased_over_seeds():
    """Averaged over masks, dropout attention is plain attention (XLA path, 400 keys)."""
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    q, k, v = (randn(kk, (1, 8, 2, 16), jnp.float32) for kk in ks)
    keys = jax.random.split(jax.random.PRNGKey(3), 400)
    outs = jax.vmap(lambda r: jaxattn.attention(q, k, v, dropout_rate=0.3, dropout_rng=r, impl="xla"))(keys)
    plain = jaxattn.attention(q, k, v, impl="xla")
    err = jnp.abs(outs.mean(0) - plain)
    assert float(jnp.max(err)) < 5 * float(jnp.max(outs.std(0))) / np.sqrt(400)


def test_public_op_paths_agree_and_rate_zero_is_plain():
    ks = jax.random.split(jax.random.PRNGKey(4), 4)
    q, k, v = (randn(kk, (2, 30, 4, 32), jnp.float32) for kk in ks[:3])
    kw = dict(causal=True, dropout_rate=0.2, dropout_rng=ks[3])
    with poison_outputs():
        a = jaxattn.attention(q, k, v, impl="pallas", **kw)
    assert_close(a, jaxattn.attention(q, k, v, impl="xla", **kw), jnp.float32, "pallas vs xla")
    plain = attention_reference(q, k, v, causal=True)[0]  # rate 0: no dropout, against the oracle
    assert_close(jaxattn.attention(q, k, v, impl="pallas", causal=True, dropout_rate=0.0, dropout_rng=ks[3]), plain,
                 jnp.float32, "rate 0")


def test_errors():
    q = jnp.zeros((1, 8, 2, 32))
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        jaxattn.attention(q, q, q, dropout_rate=1.0, dropout_rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="dropout_rate must be in"):
        jaxattn.attention(q, q, q, dropout_rate=-0.1, dropout_rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs dropout_rng"):
        jaxattn.attention(q, q, q, dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout_offset must be three integers"):
        jaxattn.attention(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), dropout_offset=(0, 4))
    with pytest.raises(ValueError, match="dropout_offset must be three integers"):
        jaxattn.attention(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), dropout_offset=(0, 1.5, 0))


@pytest.mark.parametrize("shared", [False, True])
def test_lowers_for_cuda(shared):
    args = [jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1,), jnp.int32)]

    def loss(q, k, v, seed):
        o, _ = flash.flash_attention(q, k, v, causal=True, dropout_rate=0.1, dropout_seed=seed,
                                     dropout_shared=shared, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    assert count_triton_calls(lower_for_cuda(jax.grad(loss, (0, 1, 2)), *args)) >= 3
