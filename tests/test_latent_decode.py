"""Latent-cache decoding (jaxattn.latent_decode_attention: the decode kernel's latent mode, interpret mode) against an
explicit float64 formula and the dense reference: keys the cache's rows, values their first value_dim columns;
ragged and empty rows, several new tokens, causal or not, every dtype, forced splits; outputs poisoned; CUDA
lowering (DeepSeek-V3's 512 + 64 with 128 heads); bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, count_triton_calls, lower_for_cuda
import jaxattn
from jaxattn import latent_decode_attention
from jaxattn.pallas._common import compile_for_gpu, poison_outputs

TOL = {jnp.dtype(jnp.float32): (1e-5, 1e-5), jnp.dtype(jnp.bfloat16): (2e-2, 2e-2), jnp.dtype(jnp.float16): (4e-3, 4e-3)}
_slow = functools.partial(pytest.param, marks=pytest.mark.slow)


def explicit(q, cache, lengths, value_dim, causal, scale):
    """float64: softmax(scale q . cache_j) over the visible rows j, times cache_j[:value_dim]."""
    q, cache = np.asarray(q, np.float64), np.asarray(cache, np.float64)
    b, sq, h, _ = q.shape
    out = np.zeros((b, sq, h, value_dim))
    for bi in range(b):
        n = int(lengths[bi])
        for i in range(sq):
            last = n - sq + i if causal else n - 1
            if last < 0:  # (no visible key: zeros)
                continue
            keys = cache[bi, : last + 1, 0]
            s = scale * q[bi, i] @ keys.T  # [h, j]
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, i] = (p / p.sum(-1, keepdims=True)) @ keys[:, :value_dim]
    return out


CASES = [  # (batch, Sq, heads, latent, rope, S, lengths, causal, dtype, splits)
    (2, 1, 8, 32, 16, 77, [77, 30], True, jnp.float32, None),
    (3, 2, 4, 64, 16, 130, [130, 65, 0], True, jnp.bfloat16, 3),  # an empty row: zeros
    (2, 3, 2, 32, 32, 50, [50, 9], False, jnp.float16, None),
    _slow(1, 1, 16, 512, 64, 100, [100], True, jnp.bfloat16, 2),  # DeepSeek-V3's widths
    _slow(2, 1, 128, 256, 64, 33, [33, 17], True, jnp.float32, None),
]


@pytest.mark.parametrize("b,sq,h,lat,rope,s,lengths,causal,dtype,splits", CASES)
def test_matches_the_explicit_formula(b, sq, h, lat, rope, s, lengths, causal, dtype, splits):
    ks = jax.random.split(jax.random.key(s + h), 2)
    q = jax.random.normal(ks[0], (b, sq, h, lat + rope)).astype(dtype)
    cache = jax.random.normal(ks[1], (b, s, 1, lat + rope)).astype(dtype)
    n = jnp.asarray(lengths, jnp.int32)
    scale = (lat + rope) ** -0.5
    with poison_outputs():
        out, lse = latent_decode_attention(q, cache, n, value_dim=lat, causal=causal, impl="pallas", num_splits=splits,
                                           return_lse=True, scale=scale)
    assert out.shape == (b, sq, h, lat) and out.dtype == dtype
    want = explicit(q.astype(jnp.float32), cache.astype(jnp.float32), lengths, lat, causal, scale)
    assert_close(out, want, dtype, "out", tol=TOL)
    ref, ref_lse = latent_decode_attention(q, cache, n, value_dim=lat, causal=causal, impl="xla", return_lse=True,
                                           scale=scale)
    assert_close(out, ref, dtype, "out vs reference", tol=TOL)
    live = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[live], np.asarray(ref_lse)[live], rtol=1e-4, atol=1e-4)
    assert not np.isfinite(np.asarray(lse)[~live]).any()


def test_lowers_for_cuda_at_deepseek_v3_widths():
    q = jax.ShapeDtypeStruct((4, 1, 128, 576), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4, 4096, 1, 576), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((4,), jnp.int32)
    with compile_for_gpu():
        text = lower_for_cuda(lambda q, c, n: latent_decode_attention(q, c, n, value_dim=512), q, cache, n)
    assert count_triton_calls(text) == 1
    off = lower_for_cuda(lambda q, c, n: latent_decode_attention(q, c, n, value_dim=512), q, cache, n)
    assert count_triton_calls(off) == 0  # (auto off a GPU: XLA)


def test_bad_input():
    q, cache, n = jnp.ones((2, 1, 4, 48)), jnp.ones((2, 10, 1, 48)), jnp.asarray([3, 4])
    for args, kw, match in [((q, cache[:, :, :, :40], n), dict(value_dim=32), r"cache must be \[batch, S, 1, D\]"),
                            ((q, jnp.ones((2, 10, 2, 48)), n), dict(value_dim=32), r"\[batch, S, 1, D\]"),
                            ((q, cache, n), dict(value_dim=0), "value_dim"),
                            ((q, cache, n), dict(value_dim=40, impl="pallas"), "powers of two"),
                            ((q, cache.astype(jnp.bfloat16), n), dict(value_dim=32), "dtype"),
                            ((q[0], cache, n), dict(value_dim=32), "q must have rank 4")]:
        with pytest.raises(ValueError, match=match):
            latent_decode_attention(*args, **kw)
    # the kernel is inference-only; the XLA path differentiates
    with pytest.raises(Exception, match="inference-only"):
        jax.grad(lambda q: jnp.sum(latent_decode_attention(q, cache, n, value_dim=32, impl="pallas")))(q)
    g = jax.grad(lambda q: jnp.sum(latent_decode_attention(q, cache, n, value_dim=32, impl="xla")))(q)
    assert np.isfinite(np.asarray(g)).all()


def _pool(seed, lengths, page, width, dtype, spare=3):
    """A page pool with each row's pages at random places (unused pages hold noise), its tables, and the dense cache
    they describe, copied position by position."""
    rng = np.random.default_rng(seed)
    max_pages = -(-max(lengths) // page) + 1
    n_pages = len(lengths) * max_pages + spare
    pool = jax.random.normal(jax.random.key(seed), (n_pages, page, 1, width)).astype(dtype)
    tables = rng.permutation(n_pages)[: len(lengths) * max_pages].reshape(len(lengths), max_pages)
    flat = np.asarray(pool.astype(jnp.float32))
    dense = np.stack([[flat[tables[b, i // page], i % page] for i in range(max_pages * page)]
                      for b in range(len(lengths))])
    return pool, jnp.asarray(tables, jnp.int32), dense


PAGED = [  # (seed, Sq, heads, latent, rope, page, lengths, causal, dtype, splits)
    (0, 1, 8, 32, 16, 16, [40, 3, 16], True, jnp.float32, None),  # pages of one key block
    (1, 2, 4, 64, 16, 64, [130, 65], True, jnp.bfloat16, 2),  # a page of two key blocks (FlashMLA's 64)
    (2, 3, 2, 32, 32, 32, [50, 0], False, jnp.float16, None),  # an empty row
    _slow(3, 1, 16, 512, 64, 64, [200, 77], True, jnp.bfloat16, None),  # DeepSeek-V3's widths
]


@pytest.mark.parametrize("seed,sq,h,lat,rope,page,lengths,causal,dtype,splits", PAGED)
def test_paged_latent_cache(seed, sq, h, lat, rope, page, lengths, causal, dtype, splits):
    pool, tables, dense = _pool(seed, lengths, page, lat + rope, dtype)
    q = jax.random.normal(jax.random.key(seed + 100), (len(lengths), sq, h, lat + rope)).astype(dtype)
    n = jnp.asarray(lengths, jnp.int32)
    want = explicit(q.astype(jnp.float32), dense, lengths, lat, causal, 0.125)
    for impl in ("pallas", "xla"):
        with poison_outputs():
            out = jax.jit(lambda q, p, t, n: latent_decode_attention(
                q, p, n, value_dim=lat, block_tables=t, causal=causal, scale=0.125, impl=impl,
                num_splits=splits))(q, pool, tables, n)
        assert out.shape == (len(lengths), sq, h, lat) and out.dtype == dtype
        assert_close(out, want, dtype, f"{impl} out", tol=TOL)


def test_append_paged_latent_writes_each_row_into_its_pages():
    pool, tables, dense = _pool(7, [20, 33], 16, 48, jnp.float32)
    new = jax.random.normal(jax.random.key(8), (2, 3, 1, 48))
    n = jnp.asarray([20, 33], jnp.int32)
    pool2, n2 = jax.jit(jaxattn.append_paged_latent)(pool, tables, new, n)
    np.testing.assert_array_equal(np.asarray(n2), [23, 36])
    for b, start in enumerate((20, 33)):
        dense[b, start:start + 3] = np.asarray(new[b])
    q = jax.random.normal(jax.random.key(9), (2, 1, 4, 48))
    got = latent_decode_attention(q, pool2, n2, value_dim=32, block_tables=tables, impl="pallas")
    assert_close(got, explicit(q, dense, [23, 36], 32, True, 48 ** -0.5), jnp.float32, "after append", tol=TOL)
    untouched = np.setdiff1d(np.arange(pool.shape[0]), np.asarray(tables)[:, 1:3].ravel())  # (rows 20-35 lie there)
    np.testing.assert_array_equal(np.asarray(pool2)[untouched], np.asarray(pool)[untouched])


def test_paged_lowers_for_cuda_at_deepseek_v3_widths():
    q = jax.ShapeDtypeStruct((4, 2, 128, 576), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((4 * 64, 64, 1, 576), jnp.bfloat16)
    tables = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    n = jax.ShapeDtypeStruct((4,), jnp.int32)
    f = lambda q, p, t, n: latent_decode_attention(q, p, n, value_dim=512, block_tables=t)  # noqa: E731
    with compile_for_gpu():
        assert count_triton_calls(lower_for_cuda(f, q, pool, tables, n)) == 1


def test_paged_bad_input():
    q, pool, t, n = jnp.ones((2, 1, 4, 48)), jnp.ones((6, 16, 1, 48)), jnp.zeros((2, 3), jnp.int32), jnp.asarray([3, 4])
    for args, kw, match in [((q, pool, n), dict(block_tables=t[:1]), r"block_tables must have shape \[batch, max_pages\]"),
                            ((q, pool, n), dict(block_tables=t.astype(jnp.float32)), "integer dtype"),
                            ((q, pool[:, :, :, :40], n), dict(block_tables=t), r"\[num_pages, page_size, 1, D\]"),
                            ((q, jnp.ones((6, 24, 1, 48)), n), dict(block_tables=t, impl="pallas"), "page_size"),
                            ((q, pool, jnp.asarray([3, 4, 5])), dict(block_tables=t), r"lengths must have shape")]:
        with pytest.raises(ValueError, match=match):
            latent_decode_attention(*args, value_dim=32, **kw)
    with pytest.raises(ValueError, match=r"latent has shape"):
        jaxattn.append_paged_latent(pool, t, jnp.ones((2, 1, 1, 40)), n)


@pytest.mark.parametrize("fmt,paged", [(jnp.float8_e4m3fn, False), (jnp.float8_e4m3fn, True), (jnp.int8, True)])
def test_quantized_latent_cache(fmt, paged):
    """cache_scale: an FP8 / int8 latent cache (quantize_kv's) equals the explicit formula on the dequantized cache,
    and stays close to the full-precision cache; append_paged_latent quantizes new rows with the pool's scale."""
    lengths, lat, rope, page = [45, 20], 32, 16, 16
    pool, tables, _ = _pool(11, lengths, page, lat + rope, jnp.float32)
    stored, scale = jaxattn.quantize_kv(pool, dtype=fmt)
    assert stored.dtype == fmt and scale.shape == (1,)
    deq = np.asarray(stored.astype(jnp.float32)) * float(scale[0])
    dense = np.stack([[deq[tables[b, i // page], i % page] for i in range(tables.shape[1] * page)] for b in range(2)])
    q = jax.random.normal(jax.random.key(12), (2, 1, 4, lat + rope)).astype(jnp.bfloat16)
    n = jnp.asarray(lengths, jnp.int32)
    if paged:
        cache, kw = stored, dict(block_tables=tables)
    else:  # (the dense cache the tables describe, still quantized)
        cache, kw = jnp.asarray(np.stack([[np.asarray(stored)[tables[b, i // page], i % page]
                                           for i in range(tables.shape[1] * page)] for b in range(2)])), {}
    want = explicit(q.astype(jnp.float32), dense, lengths, lat, True, 0.125)
    full = explicit(q.astype(jnp.float32), np.stack([[np.asarray(pool)[tables[b, i // page], i % page]
                                                     for i in range(tables.shape[1] * page)] for b in range(2)]),
                    lengths, lat, True, 0.125)
    for impl in ("pallas", "xla"):
        with poison_outputs():
            out = latent_decode_attention(q, cache, n, value_dim=lat, cache_scale=scale, scale=0.125, impl=impl, **kw)
        assert out.dtype == jnp.bfloat16
        assert_close(out, want, jnp.bfloat16, f"{impl} vs the dequantized cache", tol=TOL)
        cos = np.sum(np.asarray(out, np.float32) * full) / np.linalg.norm(np.asarray(out, np.float32)) / np.linalg.norm(full)
        assert cos > 0.99, cos
    with pytest.raises(ValueError, match="needs cache_scale"):
        latent_decode_attention(q, cache, n, value_dim=lat, **kw)
    if paged:
        new = jax.random.normal(jax.random.key(13), (2, 1, 1, lat + rope))
        pool2, _ = jaxattn.append_paged_latent(stored, tables, new, n, cache_scale=scale)
        row = pool2[tables[0, 45 // page], 45 % page]
        np.testing.assert_array_equal(np.asarray(row.astype(jnp.float32)),
                                      np.asarray(jaxattn.quantize_kv(new[0, 0:1], scale, fmt)[0][0].astype(jnp.float32)))
        with pytest.raises(ValueError, match="pass cache_scale"):
            jaxattn.append_paged_latent(stored, tables, new, n)
