"""Paged-cache decode: the kernel (interpret mode) reading pages through block tables against the
dense fp32 oracle on the cache the tables describe (built here by explicit per-position copies,
not by the op's own gather), and append_paged_kv writing new tokens into their pages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import assert_close, count_triton_calls, lower_for_cuda, randn
from jaxattn.pallas import decode as pdecode
from jaxattn.pallas import poison_outputs
from jaxattn.reference.decode import decode_reference


def _paged_case(seed, batch, lengths, page, hkv, g, d, dv, sq, dtype, spare_pages=3):
    """A pool with each row's pages scattered at random (unused pages hold garbage) and the
    equivalent dense cache, written position by position."""
    rng = np.random.default_rng(seed)
    max_pages = max(-(-max(lengths) // page), 1) + 1
    n_pages = batch * max_pages + spare_pages
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    k_pages = randn(ks[0], (n_pages, page, hkv, d), dtype)
    v_pages = randn(ks[1], (n_pages, page, hkv, dv), dtype)
    tables = rng.permutation(n_pages)[: batch * max_pages].reshape(batch, max_pages)
    k_np, v_np = np.asarray(k_pages.astype(jnp.float32)), np.asarray(v_pages.astype(jnp.float32))
    dense_k = np.zeros((batch, max_pages * page, hkv, d), np.float32)
    dense_v = np.zeros((batch, max_pages * page, hkv, dv), np.float32)
    for b in range(batch):
        for pos in range(max_pages * page):
            dense_k[b, pos] = k_np[tables[b, pos // page], pos % page]
            dense_v[b, pos] = v_np[tables[b, pos // page], pos % page]
    q = randn(ks[2], (batch, sq, hkv * g, d), dtype)
    return (q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(dense_k, dtype), jnp.asarray(dense_v, dtype))


CASES = [  # seed, lengths, page_size, kv heads, groups, d, dv, Sq, dtype, extra
    (0, [37, 100, 1], 16, 2, 4, 64, 64, 1, jnp.bfloat16, {}),
    (1, [130, 64], 128, 1, 8, 128, 128, 1, jnp.float16, {}),  # pages of two tiles
    (2, [75, 200, 16], 32, 2, 2, 64, 32, 3, jnp.float32, {}),  # speculative: 3 new tokens
    (3, [300, 41], 16, 2, 1, 32, 32, 2, jnp.float32, {"local_window_size": (40, 0), "logits_soft_cap": 20.0}),
    (4, [90, 5], 128, 1, 4, 64, 64, 1, jnp.bfloat16, {"causal": False, "num_splits": 3}),
    (5, [70, 33], 16, 2, 2, 48, 40, 1, jnp.float32, {}),  # head dims off the powers of two: the pool unpadded
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_paged_kernel_matches_dense_oracle(case):
    seed, lengths, page, hkv, g, d, dv, sq, dtype, extra = case
    q, kp, vp, tables, lens, dk, dvv = _paged_case(seed, len(lengths), lengths, page, hkv, g, d, dv, sq, dtype)
    causal = extra.pop("causal", True)
    splits = extra.pop("num_splits", None)
    with poison_outputs():
        out, lse = jax.jit(lambda *a: jaxattn.paged_decode_attention(*a, impl="pallas", causal=causal,
                                                                     num_splits=splits, return_lse=True, **extra)
                           )(q, kp, vp, tables, lens)
    ref_out, ref_lse = decode_reference(q, dk, dvv, lens, causal=causal, **extra)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, "paged out")
    assert_close(lse, ref_lse, jnp.float32 if dtype == jnp.float32 else dtype, "paged lse")
    xla = jaxattn.paged_decode_attention(q, kp, vp, tables, lens, impl="xla", causal=causal, **extra)
    assert_close(xla, ref_out, dtype, "xla path")


def test_unused_table_entries_are_ignored():
    q, kp, vp, tables, lens, dk, dvv = _paged_case(7, 2, [50, 20], 16, 2, 2, 64, 64, 1, jnp.float32)
    ref = decode_reference(q, dk, dvv, lens)[0]
    junk = tables.at[1, 2:].set(0)  # row 1 uses 2 pages; later entries point anywhere
    for name, t in (("tables", tables), ("junk tables", junk)):
        assert_close(jaxattn.paged_decode_attention(q, kp, vp, t, lens, impl="pallas"), ref, jnp.float32, name)


@pytest.mark.slow
def test_append_paged_kv_then_decode():
    """Prefill into pages, then decode token by token with append_paged_kv: each step equals
    causal attention over the sequence so far."""
    b, hkv, g, d, page, steps, pre = 2, 2, 2, 32, 16, 5, 30
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    total = pre + steps
    k_all = randn(ks[0], (b, total, hkv, d), jnp.float32)
    v_all = randn(ks[1], (b, total, hkv, d), jnp.float32)
    q_all = randn(ks[2], (b, total, hkv * g, d), jnp.float32)
    max_pages = -(-total // page)
    tables = jnp.asarray(np.random.default_rng(0).permutation(10)[: b * max_pages].reshape(b, max_pages))
    kp = jnp.zeros((10, page, hkv, d), jnp.float32)
    vp = jnp.zeros((10, page, hkv, d), jnp.float32)
    kp, vp, lens = jaxattn.append_paged_kv(kp, vp, tables, k_all[:, :pre], v_all[:, :pre], 0)
    assert lens.tolist() == [pre, pre]
    for t in range(pre, total):
        kp, vp, lens = jaxattn.append_paged_kv(kp, vp, tables, k_all[:, t:t + 1], v_all[:, t:t + 1], lens)
        out = jaxattn.paged_decode_attention(q_all[:, t:t + 1], kp, vp, tables, lens, impl="pallas")
        ref = decode_reference(q_all[:, t:t + 1], k_all[:, :t + 1], v_all[:, :t + 1], lens)[0]
        assert_close(out, ref, jnp.float32, f"step {t}")


def test_paged_kernel_lowers_for_cuda():
    args = [jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((512, 16, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((512, 16, 8, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 64), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32)]
    text = lower_for_cuda(lambda *a: pdecode.paged_decode_attention_kernel(*a, interpret=False), *args)
    assert count_triton_calls(text) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(k_pages=np.zeros((4, 16, 3, 64), np.float32), v_pages=np.zeros((4, 16, 3, 64), np.float32)),
     "must divide q's 4 heads"),
    (dict(block_tables=np.zeros((3, 2), np.int32)), "block_tables must have shape"),
    (dict(block_tables=np.zeros((2, 2), np.float32)), "integer dtype"),
    (dict(v_pages=np.zeros((4, 8, 2, 64), np.float32)), "page_size"),
    (dict(k_pages=np.zeros((4, 16, 2, 32), np.float32)), "head dim"),
    (dict(k_pages=np.zeros((4, 16, 2, 64), np.float16)), "dtype"),
])
def test_bad_inputs(kwargs, match):
    args = dict(q=np.zeros((2, 1, 4, 64), np.float32), k_pages=np.zeros((4, 16, 2, 64), np.float32),
                v_pages=np.zeros((4, 16, 2, 64), np.float32), block_tables=np.zeros((2, 2), np.int32),
                lengths=np.array([3, 4], np.int32))
    args.update({k: jnp.asarray(v) for k, v in kwargs.items()})
    args = {k: jnp.asarray(v) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        jaxattn.paged_decode_attention(**args)


def test_kernel_needs_power_of_two_pages():
    q = jnp.zeros((1, 1, 2, 64))
    kp = jnp.zeros((4, 24, 2, 64))
    with pytest.raises(ValueError, match="page_size a power of two"):
        jaxattn.paged_decode_attention(q, kp, kp, jnp.zeros((1, 2), jnp.int32), 10, impl="pallas")
    # the XLA path takes any page size
    assert jaxattn.paged_decode_attention(q, kp, kp, jnp.zeros((1, 2), jnp.int32), 10, impl="xla").shape == (1, 1, 2, 64)
