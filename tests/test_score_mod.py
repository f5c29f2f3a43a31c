"""FlexAttention-style ``score_mod`` on the flash, block-sparse and decode kernels: each (capped) logit mapped by a
user function of (x, batch, head, q_idx, kv_idx) inside the kernels, the backward applying its derivative.
The oracle builds the same logits densely in fp32 from index arrays (or, for the relative-position bias,
as an explicit additive mask tensor: a second formulation of the same math); forward, lse and all three
gradients over random shapes (GQA, causal, ragged lengths, every dtype) in interpret mode; CUDA lowering;
refusals by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import (GRAD_TOL, assert_close, attention_inputs, count_triton_calls, lower_for_cuda,
                      random_attention_case, randn)
from jaxattn import BlockMask
from jaxattn.pallas import decode, flash
from jaxattn.reference import attention_reference


def rel_bias(x, b, h, qi, ki):  # per-head distance penalty (T5 / ALiBi-like) plus a per-batch offset
    return x - 0.05 * (h + 1) * jnp.abs(qi - ki).astype(x.dtype) + jnp.where(b == 1, 0.25, 0.0)


def nonlinear(x, b, h, qi, ki):  # a derivative that depends on x, key parity and head
    return 4.0 * jnp.tanh(x / 4.0) * (1.0 + 0.1 * (ki % 2)) + 0.01 * h * x * x


def _bias_tensor(batch, hq, sq, sk):
    """``rel_bias`` as an explicit additive [B, Hq, Sq, Sk] tensor (rows and keys by index)."""
    h = jnp.arange(hq)[None, :, None, None]
    dist = jnp.abs(jnp.arange(sq)[:, None] - jnp.arange(sk)[None, :]).astype(jnp.float32)
    return -0.05 * (h + 1) * dist + jnp.where(jnp.arange(batch) == 1, 0.25, 0.0)[:, None, None, None]


def _case(seed):
    return dict(random_attention_case(seed), mod=[rel_bias, nonlinear][seed // 3 % 2])


@pytest.mark.parametrize("seed", [0, 1, 5] + [pytest.param(s, marks=pytest.mark.slow) for s in (2, 3, 4)])
def test_kernel_matches_dense_oracle(seed):
    c = _case(seed)
    q, k, v, do = attention_inputs(jax.random.PRNGKey(seed), c)
    softcap = 30.0 if seed % 2 else None

    def kernel(q, k, v):
        o, lse = jaxattn.attention(q, k, v, causal=c["causal"], score_mod=c["mod"], logits_soft_cap=softcap,
                                   impl="pallas", return_lse=True)
        return (o.astype(jnp.float32) * do).sum() + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0).sum(), (o, lse)

    def oracle(q, k, v):
        if c["mod"] is rel_bias and softcap is None:  # the same logits as an explicit bias tensor
            o, lse = attention_reference(q, k, v, causal=c["causal"],
                                         mask=_bias_tensor(c["b"], c["hq"], c["sq"], c["sk"]))
        else:
            o, lse = attention_reference(q, k, v, causal=c["causal"], score_mod=c["mod"], logits_soft_cap=softcap)
        return (o * do).sum() + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0).sum(), (o, lse)

    gk, (ok, lk) = jax.jit(jax.grad(kernel, (0, 1, 2), has_aux=True))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    gr, (orf, lr) = jax.jit(jax.grad(oracle, (0, 1, 2), has_aux=True))(*f32)
    dt = c["dtype"]
    assert_close(ok, orf, dt, "out")
    assert_close(lk, lr, dt, "lse")
    for name, a, b in zip("qkv", gk, gr):
        assert_close(a, b, dt, f"d{name}", GRAD_TOL)
    # and the op's XLA path applies score_mod too: against the kernel (an independent implementation)
    xla = jaxattn.attention(*f32, causal=c["causal"], score_mod=c["mod"], logits_soft_cap=softcap, impl="xla")
    assert_close(ok, xla, dt, "kernel vs impl='xla'")


def test_block_sparse_score_mod_with_mask_fn():
    """Block-sparse layout (mask_mod) plus score_mod: the mask function's absolute positions (q_offset)
    reach score_mod too; forward and gradients against the dense masked oracle."""
    sq, sk = 70, 100
    bm = BlockMask.sliding_window(sq, 16, window=40, kv_len=sk)  # q_offset = 30
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (randn(kk, (1, n, 2, 32), jnp.float32) for kk, n in zip(ks, (sq, sk, sk)))
    do = randn(ks[3], q.shape, jnp.float32)

    def loss(impl, q, k, v):
        return (jaxattn.block_sparse_attention(q, k, v, bm, impl=impl, score_mod=rel_bias) * do).sum()

    def dense(q, k, v):  # absolute query positions 30.. in the distance
        h = jnp.arange(2)[None, :, None, None]
        dist = jnp.abs(jnp.arange(sq)[:, None] + 30 - jnp.arange(sk)[None, :]).astype(jnp.float32)
        bias = jnp.where(bm.dense()[None, None], -0.05 * (h + 1) * dist, -jnp.inf)
        return (attention_reference(q, k, v, mask=bias)[0] * do).sum()

    got = jax.grad(lambda *a: loss("pallas", *a), (0, 1, 2))(q, k, v)
    want = jax.grad(dense, (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, jnp.float32, f"d{name}", GRAD_TOL)
    xla = jax.grad(lambda *a: loss("xla", *a), (0, 1, 2))(q, k, v)
    assert_close(xla[0], want[0], jnp.float32, "xla dq", GRAD_TOL)


def test_lowers_for_cuda():
    """Forward, dq and dk/dv kernels with score_mod (and the soft cap) lower for CUDA."""
    args = [jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)]

    def loss(q, k, v):
        o, _ = flash.flash_attention(q, k, v, causal=True, score_mod=nonlinear, logits_soft_cap=50.0, interpret=False)
        return o.astype(jnp.float32).sum()

    assert count_triton_calls(lower_for_cuda(jax.grad(loss, (0, 1, 2)), *args)) >= 3
    cache = [jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16),
             jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.int32)]
    text = lower_for_cuda(lambda q, k, v, n: decode.decode_attention_kernel(q, k, v, n, score_mod=nonlinear,
                                                                            interpret=False)[0], *cache)
    assert count_triton_calls(text) == 1


def test_refusals_name_the_argument():
    q = jnp.zeros((1, 8, 2, 32))
    with pytest.raises(ValueError, match="score_mod must be a callable"):
        jaxattn.attention(q, q, q, score_mod=3.0)
    with pytest.raises(ValueError, match="score_mod must return one floating array"):
        jaxattn.attention(q, q, q, score_mod=lambda x, b, h, i, j: i > j)
    table = jnp.arange(16.0)
    for captured in (lambda x, b, h, i, j: x + table[h], lambda x, b, h, i, j: x * table[3]):  # (a 0-d array too)
        with pytest.raises(ValueError, match="score_mod closes over arrays"):
            jaxattn.attention(q, q, q, score_mod=captured)
    with pytest.raises(ValueError, match="failed to trace"):
        jaxattn.attention(q, q, q, score_mod=lambda x: x)
    with pytest.raises(ValueError, match="score_mod need impl='pallas'"):
        m = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
        jaxattn.attention(m, m, m, impl="mosaic", score_mod=rel_bias)


@pytest.mark.slow  # (17 s: the suite's budget)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_reproduces_the_causal_forward(dtype):
    """decode_attention / paged_decode_attention with score_mod (q_idx = each query's cache position) give
    the last rows of a causal forward over each row's own sequence (ragged lengths, GQA, several new
    tokens), kernel and XLA paths, with ALiBi and a soft cap on top."""
    b, s_max, hq, hkv, d, sq = 3, 64, 4, 2, 64, 3
    lengths = [64, 37, 5]
    ks = jax.random.split(jax.random.PRNGKey(8), 3)
    q = randn(ks[0], (b, sq, hq, d), dtype)
    k = randn(ks[1], (b, s_max, hkv, d), dtype)
    v = randn(ks[2], (b, s_max, hkv, d), dtype)
    slopes = jnp.asarray([0.02, 0.05, 0.1, 0.2])
    kw = dict(score_mod=nonlinear, logits_soft_cap=30.0, alibi_slopes=slopes)
    want = []
    for r, n in enumerate(lengths):  # the same queries as the last rows of a causal forward over n keys
        full_q = jnp.concatenate([jnp.zeros((1, n - sq, hq, d), dtype), q[r:r + 1]], axis=1)
        want.append(attention_reference(full_q, k[r:r + 1, :n], v[r:r + 1, :n], causal=True,
                                        score_mod=nonlinear, logits_soft_cap=30.0, alibi_slopes=slopes)[0][:, -sq:])
    want = jnp.concatenate(want)
    lens = jnp.asarray(lengths, jnp.int32)
    for impl in ("pallas", "xla"):
        got = jax.jit(lambda q, k, v: jaxattn.decode_attention(q, k, v, lens, impl=impl, num_splits=2, **kw))(q, k, v)
        assert_close(got, want, dtype, f"decode {impl}")
    page = 16
    perm = np.random.default_rng(0).permutation(b * s_max // page).reshape(b, s_max // page)
    pages = lambda x: jnp.zeros((b * s_max // page, page, *x.shape[2:]), x.dtype).at[jnp.asarray(perm)].set(  # noqa: E731
        x.reshape(b, s_max // page, page, *x.shape[2:]))
    got = jaxattn.paged_decode_attention(q, pages(k), pages(v), jnp.asarray(perm, jnp.int32), lens, impl="pallas", **kw)
    assert_close(got, want, dtype, "paged decode")
