"""varlen_attention (flash-attn's packed layout, cu_seqlens) against attention run on each
sequence alone, forward and gradients, through the kernel (interpret mode) and XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, assert_close, randn
from jaxattn.pallas import poison_outputs
from jaxattn.reference import attention_reference


_VARLEN_KW = {"causal": dict(causal=True), "window": dict(causal=True, local_window_size=(9, 0)),
              "alibi": dict(causal=False, alibi_slopes=jnp.asarray([0.5, 0.25, 0.125, 0.0625])),
              "cross": dict(cross=True)}


@pytest.mark.parametrize("impl,kw", [
    # (ALiBi and cross-attention with segment ids are also in the default suite's flash tests)
    # (the kernel's varlen path in the default suite: test_sinks's varlen case and the dropout test below)
    *[pytest.param("pallas", kw, id=f"{name}-pallas", marks=pytest.mark.slow)
      for name, kw in _VARLEN_KW.items()],
    *[pytest.param("xla", kw, id=f"{name}-xla", marks=pytest.mark.slow)
      for name, kw in _VARLEN_KW.items()],
])
def test_varlen_equals_each_sequence_alone(impl, kw):
    kw = dict(kw)
    cross = kw.pop("cross", False)
    lens_q = [17, 1, 40, 23]
    lens_k = [30, 5, 12, 9] if cross else lens_q
    cu_q, cu_k = np.cumsum([0, *lens_q]), np.cumsum([0, *lens_k])
    tq, tk = int(cu_q[-1]) + 3, int(cu_k[-1]) + (2 if cross else 3)  # a padded tail past the last sequence
    ks = jax.random.split(jax.random.PRNGKey(len(kw)), 4)
    q = randn(ks[0], (tq, 4, 32), jnp.float32)
    k, v = randn(ks[1], (tk, 2, 32), jnp.float32), randn(ks[2], (tk, 2, 32), jnp.float32)
    args = (jnp.asarray(cu_q, jnp.int32), jnp.asarray(cu_k, jnp.int32) if cross else None)
    f = lambda q, k, v: jaxattn.varlen_attention(q, k, v, *args, impl=impl, **kw)  # noqa: E731
    with poison_outputs():
        out = jax.jit(f)(q, k, v)
    assert out.shape == (tq, 4, 32) and (out[int(cu_q[-1]):] == 0).all()
    w = jax.random.normal(ks[3], out.shape)
    with poison_outputs():
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), (0, 1, 2)))(q, k, v)
    for i in range(4):
        sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        one = lambda q1, k1, v1: jaxattn.attention(q1[None], k1[None], v1[None], impl="xla", **kw)[0]  # noqa: E731
        assert_close(out[sq], one(q[sq], k[sk], v[sk]), jnp.float32, f"seq {i}")
        g1 = jax.grad(lambda *a: jnp.sum(one(*a) * w[sq]), (0, 1, 2))(q[sq], k[sk], v[sk])
        for name, g, rg, sl in zip("qkv", grads, g1, (sq, sk, sk)):
            assert_close(g[sl], rg, jnp.float32, f"d{name} seq {i}", tol=GRAD_TOL)


def test_varlen_dropout_kernel_matches_xla():
    """Dropout passes through (the mask is indexed by packed rows): kernel and XLA path agree."""
    cu = jnp.asarray([0, 17, 40, 63], jnp.int32)
    ks = jax.random.split(jax.random.PRNGKey(9), 4)
    q, k, v = (randn(kk, (63, 2, 32), jnp.float32) for kk in ks[:3])
    kw = dict(causal=True, dropout_rate=0.25, dropout_rng=ks[3])
    with poison_outputs():
        a = jaxattn.varlen_attention(q, k, v, cu, impl="pallas", **kw)
    b = jaxattn.varlen_attention(q, k, v, cu, impl="xla", **kw)
    assert_close(a, b, jnp.float32, "dropout")
    assert not np.allclose(b, jaxattn.varlen_attention(q, k, v, cu, impl="xla", causal=True))


def test_varlen_errors():
    q = jnp.zeros((10, 2, 32))
    cu = jnp.asarray([0, 4, 10])
    with pytest.raises(ValueError, match="causal varlen"):
        jaxattn.varlen_attention(q, q, q, cu, cu, causal=True)
    with pytest.raises(ValueError, match="cu_seqlens_q must be an int array"):
        jaxattn.varlen_attention(q, q, q, jnp.asarray([0.0, 10.0]))
    with pytest.raises(ValueError, match="rank 3"):
        jaxattn.varlen_attention(q[None], q[None], q[None], cu)
    with pytest.raises(ValueError, match="total_q"):
        jaxattn.varlen_attention(q, q[:5], q[:5], cu)


def test_varlen_score_mod_with_tables_equals_each_sequence_alone():
    """score_mod over packed rows: a learned relative table (index differences are in-sequence relative
    positions) and a per-token table of sequence starts (positions from each sequence's first token), kernel
    forward and gradients (q, k, v, the table) against each sequence alone through the dense reference."""
    lens = [13, 40, 1, 26]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, h, d, n = int(cu[-1]), 2, 32, 2 * max(lens) - 1
    ks = jax.random.split(jax.random.PRNGKey(12), 5)
    q, k, v = (randn(kk, (total, h, d), jnp.float32) for kk in ks[:3])
    do = randn(ks[3], q.shape, jnp.float32)
    table = randn(ks[4], (h, n), jnp.float32)
    starts = jnp.asarray(np.repeat(cu[:-1], lens), jnp.int32)  # each packed row's sequence start

    def packed_mod(x, b, hh, qi, ki, table, starts):
        return x + table[hh, qi - ki + max(lens) - 1] - 0.05 * (qi - starts[qi]).astype(x.dtype)

    def local_mod(x, b, hh, qi, ki, table):
        return x + table[hh, qi - ki + max(lens) - 1] - 0.05 * qi.astype(x.dtype)

    def packed(q, k, v, table):
        o = jaxattn.varlen_attention(q, k, v, jnp.asarray(cu), causal=True, impl="pallas", score_mod=packed_mod,
                                     score_mod_tables=(table, starts))
        return (o * do).sum(), o

    def alone(q, k, v, table):
        outs = [attention_reference(q[None, a:b], k[None, a:b], v[None, a:b], causal=True,
                                                      score_mod=local_mod, score_mod_tables=(table,))[0][0]
                for a, b in zip(cu[:-1], cu[1:])]
        o = jnp.concatenate(outs)
        return (o * do).sum(), o

    got, og = jax.jit(jax.grad(packed, (0, 1, 2, 3), has_aux=True))(q, k, v, table)
    want, ow = jax.jit(jax.grad(alone, (0, 1, 2, 3), has_aux=True))(q, k, v, table)
    assert_close(og, ow, jnp.float32, "out")
    for name, a, b in zip(["dq", "dk", "dv", "dtable"], got, want):
        assert_close(a, b, jnp.float32, name, GRAD_TOL)
