"""Attention sinks (gpt-oss): a learned logit per query head in every row's softmax, with no value.
The reference against a NumPy softmax over the logits with the sink appended; the flash kernels
(interpret mode, poisoned outputs) and the XLA path against the reference over random shapes (ragged,
GQA, causal and not, every dtype), forward, lse and the gradients of q, k, v and the sinks; rows with
no visible key; dropout, segments and packed qkv; block-sparse, decode, paged decode and varlen; the CUDA
lowering; bad sinks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import (SLOW_OFF_GPU, GRAD_TOL, assert_close, attention_inputs, count_triton_calls, lower_for_cuda,
                      random_attention_case)
from jaxattn.pallas import flash
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import attention_reference


def _sinks(key, hq):
    return jax.random.normal(key, (hq,), jnp.float32) * 2.0


def test_reference_is_a_softmax_with_the_sink_appended():
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((1, n, 2, 8)).astype(np.float32) for n in (5, 7, 7))
    sinks = np.array([0.5, -1.0], np.float32)
    out, lse = attention_reference(*(jnp.asarray(x) for x in (q, k, v)), causal=True, sinks=jnp.asarray(sinks))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    s = np.where(np.arange(7)[None, :] <= np.arange(5)[:, None] + 2, s, -np.inf)
    ext = np.concatenate([s, np.broadcast_to(sinks[None, :, None, None], (1, 2, 5, 1))], -1)
    w = np.exp(ext - ext.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", w[..., :7], v), atol=1e-5)
    np.testing.assert_allclose(lse, np.swapaxes(np.log(np.exp(ext).sum(-1)), 1, 2), atol=1e-5)


@pytest.mark.parametrize("seed", [*range(6), *(pytest.param(s, marks=pytest.mark.slow) for s in range(6, 12))])
def test_kernel_matches_reference(seed):
    c = random_attention_case(seed)
    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    q, k, v, do = attention_inputs(ks[0], c)
    sinks = _sinks(ks[1], c["hq"])
    window = (int(np.random.default_rng(seed).integers(0, 30)), None) if seed % 3 == 2 else None

    def loss(fn):
        def f(q, k, v, sinks):
            o, lse = fn(q, k, v, sinks)
            return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(jnp.sin(lse)), (o, lse)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))

    kw = dict(causal=c["causal"], local_window_size=window)
    with poison_outputs():
        (_, (out, lse)), grads = loss(lambda q, k, v, s: flash.flash_attention(q, k, v, sinks=s, **kw))(q, k, v, sinks)
    (_, (ref, ref_lse)), ref_grads = loss(lambda q, k, v, s: attention_reference(q, k, v, sinks=s, **kw))(
        q, k, v, sinks)
    assert_close(out, ref, c["dtype"], f"out {c}")
    assert_close(lse, ref_lse, jnp.float32 if c["dtype"] == jnp.float32 else c["dtype"], f"lse {c}")
    for name, g, rg in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert_close(g, rg, c["dtype"], f"{name} {c}", tol=GRAD_TOL)
    assert float(jnp.abs(grads[3]).max()) > 1e-3  # the sinks matter


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_rows_with_no_key_and_the_public_op(impl):
    """Causal with q_len > kv_len: the first rows see no key and give zeros with lse = the sink;
    the sinks lower every other row's weights (the output shrinks by 1 - p_sink)."""
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(ks[0], (2, 20, 4, 32))
    k, v = (jax.random.normal(kk, (2, 12, 2, 32)) for kk in ks[1:3])
    sinks = jnp.asarray([3.0, -2.0, 0.0, 1.0])
    out, lse = jaxattn.attention(q, k, v, causal=True, sinks=sinks, impl=impl, return_lse=True)
    plain, plain_lse = jaxattn.attention(q, k, v, causal=True, impl=impl, return_lse=True)
    assert bool(jnp.all(out[:, :8] == 0)) and bool(jnp.all(lse[:, :8] == sinks))
    p_sink = jnp.exp(sinks - lse[:, 8:])[..., None]
    assert_close(out[:, 8:], plain[:, 8:] * (1 - p_sink), jnp.float32, "rescaled")
    assert_close(lse[:, 8:], jnp.logaddexp(plain_lse[:, 8:], sinks), jnp.float32, "lse")


def test_sinks_with_dropout_segments_and_packed_qkv():
    """Sinks beside dropout (the sink joins the normaliser, never the dropped weights), segment ids and
    packed qkv: the kernel against the XLA path, which draws the same dropout mask."""
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    qkv = jax.random.normal(ks[0], (2, 45, 3, 4, 32))
    seg = jnp.asarray([[0] * 20 + [1] * 25, [2] * 45])
    sinks = _sinks(ks[1], 4)
    w = jax.random.normal(ks[2], (2, 45, 4, 32))
    kw = dict(causal=True, segment_ids=seg, dropout_rate=0.25, dropout_rng=jax.random.PRNGKey(9), return_lse=True)

    def run(impl, packed):
        def f(qkv, sinks):
            if packed:
                o, lse = jaxattn.attention_qkvpacked(qkv, sinks=sinks, impl=impl, **kw)
            else:
                o, lse = jaxattn.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], sinks=sinks, impl=impl, **kw)
            return jnp.sum(o * w) + jnp.sum(jnp.cos(lse)), (o, lse)
        return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(qkv, sinks)

    (_, (ref, ref_lse)), ref_g = run("xla", False)
    for packed in (False, True):
        (_, (out, lse)), g = run("pallas", packed)
        assert_close(out, ref, jnp.float32, f"out packed={packed}")
        assert_close(lse, ref_lse, jnp.float32, f"lse packed={packed}")
        for name, a, b in zip(("dqkv", "dsinks"), g, ref_g):
            assert_close(a, b, jnp.float32, f"{name} packed={packed}", GRAD_TOL)
    plain = jaxattn.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], sinks=sinks, impl="xla",
                              **{**kw, "dropout_rate": 0.0, "dropout_rng": None})[0]
    assert float(jnp.abs(ref - plain).max()) > 0.05  # the dropout is real


@pytest.mark.parametrize("_", [pytest.param(0, marks=SLOW_OFF_GPU, id="kernels")])
def test_decode_paged_and_varlen_with_sinks(_):
    ks = jax.random.split(jax.random.PRNGKey(4), 5)
    b, n, hq, hkv, d = 3, 70, 4, 2, 32
    q = jax.random.normal(ks[0], (b, 1, hq, d))
    k, v = (jax.random.normal(kk, (b, n, hkv, d)) for kk in ks[1:3])
    lengths = jnp.asarray([70, 33, 1])
    sinks = _sinks(ks[3], hq)
    # (jitted: interpret mode's kernels run faster compiled than op by op)
    out = jax.jit(functools.partial(jaxattn.decode_attention, impl="pallas"))(q, k, v, lengths, sinks=sinks)
    dense = jaxattn.decode_attention(q, k, v, lengths, sinks=sinks, impl="xla")
    for i, length in enumerate(lengths.tolist()):
        ref, _ = attention_reference(q[i:i + 1], k[i:i + 1, :length], v[i:i + 1, :length], sinks=sinks)
        assert_close(out[i:i + 1], ref, jnp.float32, f"decode row {i}")
        assert_close(dense[i:i + 1], ref, jnp.float32, f"decode xla row {i}")
    # paged: the same cache cut into pages of 16 rows
    pages = 16
    n_pages = -(-n // pages)
    kp, vp = (jnp.pad(x, ((0, 0), (0, n_pages * pages - n), (0, 0), (0, 0))).reshape(b * n_pages, pages, hkv, d)
              for x in (k, v))
    table = jnp.arange(b * n_pages, dtype=jnp.int32).reshape(b, n_pages)
    paged = jax.jit(functools.partial(jaxattn.paged_decode_attention, impl="pallas"))(q, kp, vp, table, lengths,
                                                                                     sinks=sinks)
    assert_close(paged, out, jnp.float32, "paged")
    # varlen: two packed sequences, each as attention alone
    cu = jnp.asarray([0, 30, 70])
    x = jax.random.normal(ks[4], (70, hq, d))
    got = jax.jit(functools.partial(jaxattn.varlen_attention, causal=True, impl="pallas"))(x, x[:, :hkv], x[:, :hkv], cu,
                                                                                          sinks=sinks)
    for a, e in ((0, 30), (30, 70)):
        ref, _ = attention_reference(x[None, a:e], x[None, a:e, :hkv], x[None, a:e, :hkv], causal=True, sinks=sinks)
        assert_close(got[a:e], ref[0], jnp.float32, f"varlen {a}:{e}")


def test_block_sparse_with_sinks():
    """block_sparse_attention(sinks=): the block-sparse kernel (PowerAttention layout, GQA, ragged) against
    the dense masked reference, forward and gradients (the sinks' too)."""
    ks = jax.random.split(jax.random.PRNGKey(6), 5)
    n = 100
    q = jax.random.normal(ks[0], (2, n, 4, 32))
    k, v = (jax.random.normal(kk, (2, n, 2, 32)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (2, n, 4, 32))
    sinks = _sinks(ks[4], 4)
    mask = jaxattn.BlockMask.power(n, 16, 32, 16)

    def run(impl):
        def f(q, k, v, s):
            o, lse = jaxattn.block_sparse_attention(q, k, v, mask, sinks=s, impl=impl, return_lse=True)
            return jnp.sum(o * w) + jnp.sum(jnp.sin(lse)), (o, lse)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))(q, k, v, sinks)

    with poison_outputs():
        (_, (out, lse)), grads = run("pallas")
    (_, (ref, ref_lse)), ref_grads = run("xla")
    assert_close(out, ref, jnp.float32, "out")
    assert_close(lse, ref_lse, jnp.float32, "lse")
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert_close(a, b, jnp.float32, name, GRAD_TOL)


def test_bad_sinks_raise():
    x = jnp.zeros((1, 8, 2, 32))
    for bad, what in ((jnp.zeros((3,)), r"\[heads\] = \(2,\)"), (jnp.zeros((1, 2)), r"\[heads\] = \(2,\)"),
                      (jnp.zeros((2,), jnp.int32), "floating"), ([0.0, 1.0], "array")):
        with pytest.raises(ValueError, match=f"sinks.*{what}"):
            jaxattn.attention(x, x, x, sinks=bad)
    y = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="sinks"):
        jaxattn.attention(y, y, y, sinks=jnp.zeros((2,)), impl="mosaic")


def test_sinks_lower_for_cuda():
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, 2048, 8, 128), (2, 2048, 2, 128), (2, 2048, 2, 128))]
    args.append(jax.ShapeDtypeStruct((8,), jnp.float32))

    def loss(q, k, v, sinks):
        o, _ = flash.flash_attention(q, k, v, causal=True, local_window_size=(127, 0), sinks=sinks, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    assert count_triton_calls(lower_for_cuda(jax.value_and_grad(loss, (0, 1, 2, 3)), *args)) >= 3
