"""The split-KV decode kernel (interpret mode) against the fp32 oracle and against per-row
causal attention on the truncated cache; append_kv; errors; CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.pallas import decode as pdecode
from jaxattn.pallas import poison_outputs
from jaxattn.pallas._common import merge_partials
from jaxattn.reference.attention import attention_reference
from jaxattn.reference.decode import decode_reference
from conftest import TOL, TRITON_CALL, assert_close, count_triton_calls, lower_for_cuda, randn

# (batch, Sq, heads, kv_heads, S, d, dv, causal, num_splits, dtype)
CASES = [
    (3, 1, 8, 2, 300, 64, 64, True, None, jnp.float32),
    (2, 1, 4, 4, 129, 128, 128, True, 3, jnp.bfloat16),
    (2, 4, 6, 3, 100, 32, 32, True, 2, jnp.float16),
    (1, 40, 8, 1, 50, 64, 64, True, 2, jnp.bfloat16),  # 320 packed rows: several row tiles
    (2, 2, 4, 2, 203, 96, 80, True, 2, jnp.bfloat16),  # head dims off the powers of two, read unpadded
    (2, 5, 4, 1, 77, 40, 24, False, None, jnp.float32),
    (4, 1, 2, 1, 1000, 16, 16, True, 7, jnp.float32),
]


def _inputs(case, seed):
    b, sq, hq, hkv, s, d, dv, _, _, dtype = case
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k, v = randn(ks[0], (b, sq, hq, d), dtype), randn(ks[1], (b, s, hkv, d), dtype), randn(ks[2], (b, s, hkv, dv), dtype)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, s + 1, b)
    lengths[0] = s  # full cache
    if b > 1:
        lengths[-1] = rng.integers(0, sq + 1)  # short row: some (or all) queries see nothing
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def _some_slow(cases, n_default):
    """The first ``n_default`` cases run by default, the rest in the slow suite."""
    return [*cases[:n_default], *(pytest.param(c, marks=pytest.mark.slow) for c in cases[n_default:])]


@pytest.mark.parametrize("case", _some_slow(CASES, 5), ids=lambda c: "-".join(str(getattr(x, "__name__", x)) for x in c))
def test_kernel_matches_oracle(case):
    causal, splits, dtype = case[7], case[8], case[9]
    q, k, v, lengths = _inputs(case, seed=len(str(case)))
    with poison_outputs():
        out, lse = jaxattn.decode_attention(q, k, v, lengths, causal=causal, impl="pallas", num_splits=splits,
                                            return_lse=True)
    ref, ref_lse = decode_reference(q, k, v, lengths, causal=causal)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "out")
    assert_close(lse, ref_lse, jnp.float32, "lse", tol={jnp.dtype(jnp.float32): TOL[jnp.dtype(dtype)]})


def test_oracle_is_causal_attention_on_each_truncated_cache():
    """The decode oracle's mask equals ``jaxattn.attention``'s bottom-right causal rule applied to
    each row's first ``lengths[b]`` keys; the kernel agrees with that too."""
    case = (3, 3, 4, 2, 90, 32, 32, True, 2, jnp.float32)
    q, k, v, _ = _inputs(case, seed=7)
    lengths = jnp.asarray([90, 41, 3], jnp.int32)
    out = jaxattn.decode_attention(q, k, v, lengths, impl="pallas", num_splits=2)
    for b, n in enumerate(np.asarray(lengths)):
        want, _ = attention_reference(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)
        assert_close(out[b:b + 1], want, jnp.float32, f"row {b}")


def test_single_token_matches_jax_dot_product_attention_with_lengths():
    q, k, v, lengths = _inputs((3, 1, 8, 2, 200, 64, 64, True, None, jnp.float32), seed=3)
    lengths = jnp.maximum(lengths, 1)  # jax's padding mask needs a visible key
    want = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
    assert_close(jaxattn.decode_attention(q, k, v, lengths, impl="pallas"), want, jnp.float32)


def test_split_counts_agree_and_empty_rows_are_zero():
    q, k, v, _ = _inputs((2, 2, 4, 2, 256, 32, 32, True, None, jnp.float32), seed=5)
    lengths = jnp.asarray([256, 1], jnp.int32)  # row 1: query 0 sits at position -1
    outs = [jaxattn.decode_attention(q, k, v, lengths, impl="pallas", num_splits=s, return_lse=True)
            for s in (1, 3, 16)]
    for o, lse in outs[1:]:
        assert_close(o, outs[0][0], jnp.float32, "splits")
    o, lse = outs[0]
    assert (o[1, 0] == 0).all() and jnp.isneginf(lse[1, 0]).all()
    assert jnp.isfinite(lse[1, 1]).all()


def test_merge_partials_is_exact():
    rng = np.random.default_rng(0)
    # two chunks of scores: the merged softmax equals the softmax over the concatenation
    s = rng.normal(size=(2, 10)).astype(np.float32)
    v = rng.normal(size=(10, 3)).astype(np.float32)
    parts = []
    for c in (slice(0, 4), slice(4, 10)):
        p = np.exp(s[:, c] - s[:, c].max(1, keepdims=True))
        parts.append(((p / p.sum(1, keepdims=True)) @ v[c], np.log(np.exp(s[:, c]).sum(1))))
    o = np.stack([p[0] for p in parts])[None]  # [1, splits, rows, 3]
    lse = np.stack([p[1] for p in parts])[None]
    out, merged = merge_partials(jnp.asarray(o), jnp.asarray(lse))
    p = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(out[0], (p / p.sum(1, keepdims=True)) @ v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[0], np.log(np.exp(s).sum(1)), rtol=1e-6)


def test_append_kv_writes_each_row_at_its_length():
    kc = jnp.zeros((2, 6, 1, 2))
    new = jnp.arange(2 * 2 * 2, dtype=jnp.float32).reshape(2, 2, 1, 2) + 1
    k2, v2, n = jaxattn.append_kv(kc, kc, new, -new, jnp.asarray([0, 3]))
    np.testing.assert_array_equal(n, [2, 5])
    np.testing.assert_array_equal(k2[0, :2], new[0])
    np.testing.assert_array_equal(k2[1, 3:5], new[1])
    assert (k2[0, 2:] == 0).all() and (k2[1, :3] == 0).all() and (k2[1, 5:] == 0).all()
    np.testing.assert_array_equal(v2, -k2)


def test_xla_path_is_differentiable_and_kernel_path_refuses():
    q, k, v, lengths = _inputs((2, 1, 4, 2, 40, 32, 32, True, None, jnp.float32), seed=1)
    g = jax.grad(lambda q: jaxattn.decode_attention(q, k, v, lengths, impl="xla").sum())(q)
    assert jnp.isfinite(g).all() and float(jnp.abs(g).max()) > 0
    with pytest.raises(NotImplementedError, match="inference-only"):
        jax.grad(lambda q: jaxattn.decode_attention(q, k, v, lengths, impl="pallas").sum())(q)


def test_bad_inputs():
    q, k, v = jnp.zeros((2, 1, 4, 32)), jnp.zeros((2, 16, 2, 32)), jnp.zeros((2, 16, 2, 32))
    with pytest.raises(ValueError, match=r"lengths must have shape \[batch\]"):
        jaxattn.decode_attention(q, k, v, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="lengths must have an integer dtype"):
        jaxattn.decode_attention(q, k, v, jnp.zeros((2,)))
    with pytest.raises(ValueError, match="num_splits"):
        jaxattn.decode_attention(q, k, v, num_splits=0)
    with pytest.raises(ValueError, match="divide"):
        jaxattn.decode_attention(jnp.zeros((2, 1, 3, 32)), k, v)
    with pytest.raises(ValueError, match="rank 4"):
        jaxattn.decode_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head dims up to 256"):
        big = jnp.zeros((2, 16, 2, 512))
        jaxattn.decode_attention(jnp.zeros((2, 1, 4, 512)), big, big, impl="pallas")
    with pytest.raises(ValueError, match="impl"):
        jaxattn.decode_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="k has shape"):
        jaxattn.append_kv(k, v, jnp.zeros((2, 1, 3, 32)), jnp.zeros((2, 1, 3, 32)), 0)


@pytest.mark.parametrize("d,size", sorted(pdecode.CONFIGS) + [(32, 2), (80, 2)])
def test_configs_lower_for_cuda(d, size):
    dtypes = [jnp.float32] if size == 4 else [jnp.bfloat16, jnp.float16]
    for dtype in dtypes:
        args = [jax.ShapeDtypeStruct((3, 2, 32, d), dtype), jax.ShapeDtypeStruct((3, 8191, 8, d), dtype),
                jax.ShapeDtypeStruct((3, 8191, 8, d), dtype), jax.ShapeDtypeStruct((3,), jnp.int32)]
        text = lower_for_cuda(lambda q, k, v, n: pdecode.decode_attention_kernel(q, k, v, n, interpret=False),
                              *args)
        assert count_triton_calls(text) == 1
        # the kernel reads the cache as it is (8191 rows, any head dim): no padded copy per step
        cache = f"tensor<3x8191x8x{d}x{jnp.dtype(dtype).name.replace('float', 'f')}>"
        call = next(line for line in text.splitlines() if TRITON_CALL in line)
        assert call.count(cache) >= 2, call[-400:]


# (batch, Sq, heads, kv_heads, S, d, causal, window, soft cap, num_splits, dtype)
WINDOW_CASES = [
    (3, 1, 8, 2, 300, 64, True, (50, None), None, None, jnp.float32),
    (2, 4, 4, 2, 200, 32, True, (17, 0), 5.0, 3, jnp.bfloat16),
    (2, 3, 4, 4, 150, 32, False, (30, 1), None, 2, jnp.float16),
    (2, 1, 4, 1, 120, 64, True, None, 2.0, None, jnp.float32),
    (1, 40, 8, 1, 90, 32, True, (8, None), 30.0, 2, jnp.float32),
]


@pytest.mark.parametrize("case", _some_slow(WINDOW_CASES, 3), ids=lambda c: "-".join(str(getattr(x, "__name__", x)) for x in c))
def test_window_and_soft_cap_match_oracle(case):
    b, sq, hq, hkv, s, d, causal, window, cap, splits, dtype = case
    q, k, v, lengths = _inputs((b, sq, hq, hkv, s, d, d, causal, splits, dtype), seed=s + sq)
    kw = dict(causal=causal, local_window_size=window, logits_soft_cap=cap)
    with poison_outputs():
        out, lse = jaxattn.decode_attention(q, k * 3, v, lengths, impl="pallas", num_splits=splits,
                                            return_lse=True, **kw)
    ref, ref_lse = decode_reference(q, k * 3, v, lengths, **kw)
    assert_close(out, ref, dtype, "out")
    assert_close(lse, ref_lse, jnp.float32, "lse", tol={jnp.dtype(jnp.float32): TOL[jnp.dtype(dtype)]})
    # the same rule as jaxattn.attention on each row's truncated cache
    for row, n in enumerate(np.asarray(lengths)):
        if n:
            want, _ = attention_reference(q[row:row + 1], (k * 3)[row:row + 1, :n], v[row:row + 1, :n], **kw)
            assert_close(out[row:row + 1], want, dtype, f"row {row}")


def test_window_skips_cache_blocks_below_it():
    """NaN cache entries far below every query's window must not reach the output."""
    q, k, v, _ = _inputs((2, 2, 4, 2, 1024, 32, 32, True, None, jnp.float32), seed=11)
    lengths = jnp.asarray([1024, 700], jnp.int32)
    k_bad, v_bad = k.at[:, :500].set(jnp.nan), v.at[:, :500].set(jnp.nan)
    out = jaxattn.decode_attention(q, k_bad, v_bad, lengths, local_window_size=(100, None), impl="pallas",
                                   num_splits=4)
    ref, _ = decode_reference(q, k, v, lengths, local_window_size=(100, None))
    assert_close(out, ref, jnp.float32, "window skip")


def test_window_and_cap_lower_for_cuda():
    args = [jax.ShapeDtypeStruct((3, 4, 32, 128), jnp.bfloat16), jax.ShapeDtypeStruct((3, 8192, 8, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((3, 8192, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((3,), jnp.int32)]
    text = lower_for_cuda(lambda q, k, v, n: pdecode.decode_attention_kernel(
        q, k, v, n, local_window_size=(4095, 0), logits_soft_cap=50.0, interpret=False), *args)
    assert count_triton_calls(text) == 1


@pytest.mark.parametrize("sq,causal,dtype", [(3, True, jnp.bfloat16), *(pytest.param(*c, marks=pytest.mark.slow)
                                             for c in [(1, True, jnp.float32), (2, False, jnp.float32)])])
def test_alibi_matches_attention_on_each_truncated_cache(sq, causal, dtype):
    """ALiBi decoding (dense and paged kernels, and the XLA path) equals jaxattn.attention with
    the same slopes on each row's own cache prefix: positions come from lengths, not the cache size."""
    b, s, hkv, g, d = 3, 96, 2, 2, 32
    ks = jax.random.split(jax.random.PRNGKey(sq), 3)
    q = randn(ks[0], (b, sq, hkv * g, d), dtype)
    k, v = randn(ks[1], (b, s, hkv, d), dtype), randn(ks[2], (b, s, hkv, d), dtype)
    lengths = jnp.asarray([96, 40, 7])
    slopes = jnp.asarray(np.stack([2.0 ** (-np.arange(1, hkv * g + 1)) * (i + 1) for i in range(b)]), jnp.float32)
    kw = dict(causal=causal, alibi_slopes=slopes)
    outs = {impl: jaxattn.decode_attention(q, k, v, lengths, impl=impl, **kw) for impl in ("pallas", "xla")}
    table = jnp.arange(b * s // 16, dtype=jnp.int32).reshape(b, s // 16)
    pool = lambda x: x.reshape(b * s // 16, 16, *x.shape[2:])  # noqa: E731
    outs["paged"] = jaxattn.paged_decode_attention(q, pool(k), pool(v), table, lengths, impl="pallas", **kw)
    for i, n in enumerate(lengths.tolist()):
        ref = jaxattn.attention(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], causal=causal,
                                alibi_slopes=slopes[i], impl="xla")
        for name, out in outs.items():
            assert_close(out[i:i + 1], ref, dtype, f"{name} row {i}")


@pytest.mark.parametrize("cache_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.int8])
def test_quantized_cache_matches_dequantized_oracle(cache_dtype):
    """A quantized cache (quantize_kv) through the dense and paged kernels equals the fp32 oracle on
    the dequantized cache, and stays close to full-precision attention (cosine, bf16 output)."""
    b, s, hkv, g, d = 2, 80, 2, 2, 64
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q = randn(ks[0], (b, 2, hkv * g, d), jnp.bfloat16)
    k = randn(ks[1], (b, s, hkv, d), jnp.float32) * jnp.asarray([1.0, 3.0])[:, None]  # heads of unequal range
    v = randn(ks[2], (b, s, hkv, d), jnp.float32)
    k8, k_scale = jaxattn.quantize_kv(k, dtype=cache_dtype)
    v8, v_scale = jaxattn.quantize_kv(v, dtype=cache_dtype)
    assert k8.dtype == cache_dtype and k_scale.shape == (hkv,)
    lengths = jnp.asarray([80, 33])
    deq = lambda x, sc: x.astype(jnp.float32) * sc[:, None]  # noqa: E731
    ref = decode_reference(q, deq(k8, k_scale), deq(v8, v_scale), lengths)[0]
    kw = dict(k_scale=k_scale, v_scale=v_scale)
    dense = jaxattn.decode_attention(q, k8, v8, lengths, impl="pallas", **kw)
    xla = jaxattn.decode_attention(q, k8, v8, lengths, impl="xla", **kw)
    table = jnp.arange(b * s // 16, dtype=jnp.int32).reshape(b, s // 16)
    pool = lambda x: x.reshape(b * s // 16, 16, *x.shape[2:])  # noqa: E731
    paged = jaxattn.paged_decode_attention(q, pool(k8), pool(v8), table, lengths, impl="pallas", **kw)
    for name, out in (("dense", dense), ("xla", xla), ("paged", paged)):
        assert out.dtype == jnp.bfloat16
        assert_close(out, ref, jnp.bfloat16, f"{name} vs dequantized oracle")
    full = decode_reference(q, k, v, lengths)[0]
    cos = jnp.sum(dense.astype(jnp.float32) * full) / (jnp.linalg.norm(dense.astype(jnp.float32)) * jnp.linalg.norm(full))
    # per-head scales; e4m3 keeps 3 mantissa bits, e5m2 2, int8 ~7: measured 0.9990 / 0.9936 / 0.9997
    floor = {jnp.float8_e4m3fn: 0.998, jnp.float8_e5m2: 0.99, jnp.int8: 0.999}[cache_dtype]
    assert float(cos) > floor, float(cos)


def test_append_to_quantized_cache_and_errors():
    b, s, hkv, d = 1, 32, 2, 32
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    k, v = randn(ks[0], (b, 20, hkv, d), jnp.float32), randn(ks[1], (b, 20, hkv, d), jnp.float32)
    _, k_scale = jaxattn.quantize_kv(k)
    _, v_scale = jaxattn.quantize_kv(v)
    kc = jnp.zeros((b, s, hkv, d), jnp.float8_e4m3fn)
    vc = jnp.zeros((b, s, hkv, d), jnp.float8_e4m3fn)
    kc, vc, n = jaxattn.append_kv(kc, vc, k[:, :12], v[:, :12], 0, k_scale=k_scale, v_scale=v_scale)
    kc, vc, n = jaxattn.append_kv(kc, vc, k[:, 12:], v[:, 12:], n, k_scale=k_scale, v_scale=v_scale)
    assert int(n[0]) == 20
    assert (kc[:, :20] == jaxattn.quantize_kv(k, k_scale)[0]).all() and (kc[:, 20:].astype(jnp.float32) == 0).all()
    q = randn(ks[2], (b, 1, hkv, d), jnp.float32)
    with pytest.raises(ValueError, match="k_scale and v_scale"):
        jaxattn.decode_attention(q, kc, vc, n)
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        jaxattn.decode_attention(q, kc, vc, n, k_scale=k_scale)
    with pytest.raises(ValueError, match=r"k_scale must be a float or a floating array \[kv_heads\]"):
        jaxattn.decode_attention(q, kc, vc, n, k_scale=jnp.ones(3), v_scale=v_scale)
    with pytest.raises(ValueError, match="pass k_scale"):
        jaxattn.append_kv(kc, vc, k[:, :1], v[:, :1], n)
    with pytest.raises(ValueError, match="dtype must be one of"):
        jaxattn.quantize_kv(k, dtype=jnp.bfloat16)


def test_quantized_cache_lowers_for_cuda():
    args = [jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16)] + [
        jax.ShapeDtypeStruct((4, 4096, 8, 128), jnp.float8_e4m3fn)] * 2 + [jax.ShapeDtypeStruct((4,), jnp.int32)]
    f = lambda q, k, v, n: pdecode.decode_attention_kernel(q, k, v, n, k_scale=jnp.ones(8), v_scale=jnp.ones(8),  # noqa: E731
                                                           interpret=False)
    assert count_triton_calls(lower_for_cuda(f, *args)) == 1
