"""``score_mod_tables``: arrays a ``score_mod`` reads by indexing (FlexAttention's captured tensors), gathered
inside the flash, block-sparse and decode kernels, with the floating tables' gradients scattered by the dq
kernel. Oracles: the same attention with the table expanded into an explicit additive ``[B, H, Sq, Sk]`` bias
by NumPy-side index arithmetic (a second formulation: gradients reach the table through XLA's gather), and
the dense fp32 reference calling ``score_mod`` on full index arrays; forward, lse, dq/dk/dv and the tables'
gradients over random shapes (GQA, causal, ragged lengths, every dtype), packed qkv, block-sparse layouts,
decoding; CUDA lowering; refusals by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import (SLOW_OFF_GPU, GRAD_TOL, assert_close, attention_inputs, count_triton_calls, lower_for_cuda,
                      random_attention_case, randn)
from jaxattn import BlockMask
from jaxattn.pallas import decode, flash
from jaxattn.reference import attention_reference


def relative(x, b, h, qi, ki, table):
    """A learned relative-position bias ``table [heads, sq + sk - 1]``: entry ``qi - ki + sk - 1``."""
    return x + table[h, qi - ki + (table.shape[1] - 1) // 2]


def _relative_bias(table, sq, sk):
    """``relative``'s logits offsets as an explicit ``[1, heads, sq, sk]`` bias (indices built in NumPy)."""
    idx = np.arange(sq)[:, None] - np.arange(sk)[None, :] + (table.shape[1] - 1) // 2
    return table[:, idx][None]


def t5_buckets(rel, num_buckets: int = 8, max_distance: int = 40):
    """T5's bidirectional relative-position buckets (int arithmetic and a log, as in the T5 paper's code)."""
    half = num_buckets // 2
    bucket = jnp.where(rel > 0, half, 0)
    n = jnp.abs(rel)
    exact = half // 2
    large = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / np.log(max_distance / exact)
                     * (half - exact)).astype(jnp.int32)
    return bucket + jnp.where(n < exact, n, jnp.minimum(large, half - 1))


def t5_mixed(x, b, h, qi, ki, buckets, slopes, docs):
    """T5 bucketed bias ``buckets [num_buckets, heads]`` (T5's layout), a learned per-head temperature
    ``slopes [heads]`` (a scalar read per tile), and an integer table ``docs [B, S]`` (per-row reads)
    penalising cross-document pairs: float and int tables, reads of three broadcast shapes."""
    same = docs[b, qi] == docs[b, ki]
    return x * (1.0 + 0.1 * slopes[h]) + buckets[t5_buckets(ki - qi), h] - jnp.where(same, 0.0, 1.5)


def _t5_bias(buckets, slopes, docs, bidx, sq, sk):
    """``t5_mixed``'s offsets as explicit arrays: (logit multiplier [1, H, 1, 1], bias [B, H, Sq, Sk]), from
    the buckets ``bidx [Sq, Sk]`` of each (query, key) pair."""
    bias = jnp.transpose(buckets[bidx], (2, 0, 1))[None]  # [1, H, Sq, Sk]
    same = docs[:, :sq, None] == docs[:, None, :sk]
    bias = bias - jnp.where(same, 0.0, 1.5)[:, None]
    return (1.0 + 0.1 * slopes)[None, :, None, None], bias


def _grads(loss, args):
    return jax.jit(jax.grad(loss, tuple(range(len(args))), has_aux=True))(*args)


@pytest.mark.parametrize("seed", [0, 1, 5] + [pytest.param(s, marks=pytest.mark.slow) for s in (2, 3, 4, 6, 7)])
def test_relative_table_matches_explicit_bias(seed):
    c = random_attention_case(seed, draw=100 + seed, max_q=80, max_k=100)
    q, k, v, do = attention_inputs(jax.random.PRNGKey(seed), c)
    # a [heads, sq + sk - 1] table (its center: row 0 against key 0 when sq == sk; one dtype per seed)
    n = 2 * max(c["sq"], c["sk"]) - 1
    table = randn(jax.random.split(jax.random.PRNGKey(seed), 5)[4], (c["hq"], n), [jnp.float32, jnp.bfloat16][seed % 2])

    def kernel(q, k, v, table):
        o, lse = jaxattn.attention(q, k, v, causal=c["causal"], score_mod=relative, score_mod_tables=(table,),
                                   impl="pallas", return_lse=True)
        return (o.astype(jnp.float32) * do).sum() + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0).sum(), (o, lse)

    def oracle(q, k, v, table):
        o, lse = attention_reference(q, k, v, causal=c["causal"], mask=_relative_bias(table, c["sq"], c["sk"]))
        return (o * do).sum() + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0).sum(), (o, lse)

    with jaxattn.pallas.poison_outputs():
        gk, (ok, lk) = _grads(kernel, (q, k, v, table))
    f32 = [x.astype(jnp.float32) for x in (q, k, v, table)]
    gr, (orf, lr) = _grads(oracle, f32)
    dt = c["dtype"]
    assert_close(ok, orf, dt, "out")
    assert_close(lk, lr, dt, "lse")
    tdt = jnp.bfloat16 if table.dtype == jnp.bfloat16 else dt  # (a bf16 table's gradient is rounded to bf16)
    for name, a, b, t in zip(["dq", "dk", "dv", "dtable"], gk, gr, [dt, dt, dt, tdt]):
        assert_close(a, b, t, name, GRAD_TOL)
    assert gk[3].dtype == table.dtype
    # the op's XLA path (score_mod on full index arrays, autodiff through the gather): the same numbers
    gx, (ox, _) = _grads(lambda *a: _xla_loss(c, do, *a), f32)
    assert_close(ok, ox, dt, "kernel vs impl='xla'")
    assert_close(gk[3], gx[3], tdt, "dtable vs impl='xla'", GRAD_TOL)


def _xla_loss(c, do, q, k, v, table):
    o, lse = jaxattn.attention(q, k, v, causal=c["causal"], score_mod=relative, score_mod_tables=(table,),
                               impl="xla", return_lse=True)
    return (o * do).sum() + 0.1 * jnp.where(jnp.isfinite(lse), lse, 0).sum(), (o, lse)


@pytest.mark.parametrize("dtype,causal", [(jnp.float32, True),
                                          pytest.param(jnp.bfloat16, False, marks=pytest.mark.slow)])
def test_t5_buckets_int_table_and_per_head_scalars(dtype, causal):
    """Three tables read at three broadcast shapes ([bq, bk], [bq, 1] and a scalar per tile), one integer;
    a derivative that depends on x and on a table (the temperature); packed documents of ragged lengths."""
    b, s, hq, hkv, d = 2, 70, 4, 2, 32
    ks = jax.random.split(jax.random.PRNGKey(11), 6)
    q = randn(ks[0], (b, s, hq, d), dtype)
    k = randn(ks[1], (b, s, hkv, d), dtype)
    v = randn(ks[2], (b, s, hkv, d), dtype)
    do = randn(ks[3], q.shape, jnp.float32)
    buckets = randn(ks[4], (8, hq), jnp.float32)
    slopes = randn(ks[5], (hq,), jnp.float32)
    docs = jnp.asarray(np.stack([np.repeat([0, 1, 2], [30, 25, 15]), np.repeat([5, 7], [9, 61])]), jnp.int32)

    def kernel(q, k, v, buckets, slopes):
        o = jaxattn.attention(q, k, v, causal=causal, score_mod=t5_mixed, score_mod_tables=(buckets, slopes, docs),
                              impl="pallas")
        return (o.astype(jnp.float32) * do).sum(), o

    bidx = np.asarray(t5_buckets(jnp.arange(s)[None, :] - jnp.arange(s)[:, None]))

    def oracle(q, k, v, buckets, slopes):  # the multiplier on scale q k^T: the scale itself, per head
        mult, bias = _t5_bias(buckets, slopes, docs, bidx, s, s)
        qs = q * mult[0, :, 0, 0][None, None, :, None]
        o, _ = attention_reference(qs, k, v, causal=causal, mask=bias)
        return (o * do).sum(), o

    gk, ok = _grads(kernel, (q, k, v, buckets, slopes))
    gr, orf = _grads(oracle, [x.astype(jnp.float32) for x in (q, k, v)] + [buckets, slopes])
    assert_close(ok, orf, dtype, "out")
    for name, a, e in zip(["dq", "dk", "dv", "dbuckets", "dslopes"], gk, gr):
        assert_close(a, e, dtype, name, GRAD_TOL)


def test_packed_qkv_and_only_the_table_differentiated():
    """attention_qkvpacked (the dq kernel fills its slot of the packed cotangent) with a table; and a loss
    differentiated only in the table (q, k, v symbolic zeros) gives the same table gradient."""
    b, s, h, d = 2, 45, 2, 32
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    qkv = randn(ks[0], (b, s, 3, h, d), jnp.float32)
    table = randn(ks[1], (h, 2 * s - 1), jnp.float32)
    do = randn(ks[2], (b, s, h, d), jnp.float32)

    def packed(qkv, table):
        return (jaxattn.attention_qkvpacked(qkv, causal=True, score_mod=relative, score_mod_tables=(table,),
                                            impl="pallas") * do).sum()

    def oracle(qkv, table):
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return (attention_reference(q, k, v, causal=True, mask=_relative_bias(table, s, s))[0] * do).sum()

    got = jax.jit(jax.grad(packed, (0, 1)))(qkv, table)
    want = jax.jit(jax.grad(oracle, (0, 1)))(qkv, table)
    assert_close(got[0], want[0], jnp.float32, "dqkv", GRAD_TOL)
    assert_close(got[1], want[1], jnp.float32, "dtable", GRAD_TOL)
    only = jax.jit(jax.grad(packed, 1))(qkv, table)
    assert_close(only, want[1], jnp.float32, "dtable alone", GRAD_TOL)


def test_block_sparse_with_a_table():
    """A block-sparse layout (mask_fn's absolute query positions reach score_mod and its table reads)."""
    sq, sk = 70, 100
    bm = BlockMask.sliding_window(sq, 16, window=40, kv_len=sk)  # q_offset = 30
    ks = jax.random.split(jax.random.PRNGKey(5), 5)
    q, k, v = (randn(kk, (1, n, 2, 32), jnp.float32) for kk, n in zip(ks, (sq, sk, sk)))
    do = randn(ks[3], q.shape, jnp.float32)
    table = randn(ks[4], (2, 2 * sk - 1), jnp.float32)

    def loss(q, k, v, table):
        return (jaxattn.block_sparse_attention(q, k, v, bm, impl="pallas", score_mod=relative,
                                               score_mod_tables=(table,)) * do).sum()

    def dense(q, k, v, table):  # absolute query positions 30.. index the table
        idx = np.arange(sq)[:, None] + 30 - np.arange(sk)[None, :] + sk - 1
        bias = jnp.where(bm.dense()[None, None], table[:, idx][None], -jnp.inf)
        return (attention_reference(q, k, v, mask=bias)[0] * do).sum()

    got = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, table)
    want = jax.jit(jax.grad(dense, (0, 1, 2, 3)))(q, k, v, table)
    for name, a, b in zip(["dq", "dk", "dv", "dtable"], got, want):
        assert_close(a, b, jnp.float32, name, GRAD_TOL)


@pytest.mark.parametrize("_", [pytest.param(0, marks=SLOW_OFF_GPU, id="kernel")])
def test_decode_with_a_table(_):
    """decode / paged decode kernels gather from a table at each query's cache position; same as the XLA
    path (the dense reference); the kernel path refuses a gradient."""
    b, s_max, hq, hkv, d, sq = 2, 64, 4, 2, 32, 2
    ks = jax.random.split(jax.random.PRNGKey(6), 4)
    q = randn(ks[0], (b, sq, hq, d), jnp.float32)
    k = randn(ks[1], (b, s_max, hkv, d), jnp.float32)
    v = randn(ks[2], (b, s_max, hkv, d), jnp.float32)
    table = randn(ks[3], (hq, 2 * s_max - 1), jnp.float32)
    lens = jnp.asarray([64, 23], jnp.int32)
    kw = dict(score_mod=relative, score_mod_tables=(table,))
    want = jaxattn.decode_attention(q, k, v, lens, impl="xla", **kw)
    got = jaxattn.decode_attention(q, k, v, lens, impl="pallas", num_splits=2, **kw)
    assert_close(got, want, jnp.float32, "decode")
    page = 16
    perm = np.random.default_rng(1).permutation(b * s_max // page).reshape(b, s_max // page)
    pages = lambda x: jnp.zeros((b * s_max // page, page, *x.shape[2:]), x.dtype).at[jnp.asarray(perm)].set(  # noqa: E731
        x.reshape(b, s_max // page, page, *x.shape[2:]))
    got = jaxattn.paged_decode_attention(q, pages(k), pages(v), jnp.asarray(perm, jnp.int32), lens, impl="pallas", **kw)
    assert_close(got, want, jnp.float32, "paged decode")
    with pytest.raises(NotImplementedError):
        jax.grad(lambda t: jaxattn.decode_attention(q, k, v, lens, impl="pallas", score_mod=relative,
                                                    score_mod_tables=(t,)).sum())(table)


def test_lowers_for_cuda():
    """Forward, dq (gathers and atomic adds) and dk/dv kernels with tables lower for CUDA; so does decode."""
    args = [jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((8, 8), jnp.float32),
            jax.ShapeDtypeStruct((8,), jnp.bfloat16), jax.ShapeDtypeStruct((2, 300), jnp.int32)]

    def loss(q, k, v, buckets, slopes, docs):
        o, _ = flash.flash_attention(q, k, v, causal=True, score_mod=t5_mixed, score_mod_tables=(buckets, slopes, docs),
                                     interpret=False)
        return o.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.grad(loss, (0, 1, 2, 3, 4)), *args)
    assert count_triton_calls(text) >= 3
    cache = [jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16),
             jax.ShapeDtypeStruct((2, 4096, 2, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.int32),
             jax.ShapeDtypeStruct((8, 8191), jnp.float32)]
    text = lower_for_cuda(lambda q, k, v, n, t: decode.decode_attention_kernel(
        q, k, v, n, score_mod=relative, score_mod_tables=(t,), interpret=False)[0], *cache)
    assert count_triton_calls(text) == 1


def test_refusals_name_the_argument():
    q = jnp.zeros((1, 8, 2, 32))
    table = jnp.zeros((2, 15))
    with pytest.raises(ValueError, match="score_mod_tables are read by a score_mod"):
        jaxattn.attention(q, q, q, score_mod_tables=(table,))
    with pytest.raises(ValueError, match="score_mod_tables must be a tuple or list"):
        jaxattn.attention(q, q, q, score_mod=relative, score_mod_tables=table)
    with pytest.raises(ValueError, match=r"score_mod_tables\[0\] must have rank >= 1"):
        jaxattn.attention(q, q, q, score_mod=lambda x, b, h, i, j, t: x * t[()], score_mod_tables=(jnp.float32(2),))
    with pytest.raises(ValueError, match=r"score_mod_tables\[0\] must be float16, bfloat16, float32"):
        jaxattn.attention(q, q, q, score_mod=relative, score_mod_tables=(table > 0,))
    with pytest.raises(ValueError, match="failed to trace"):  # one table too few for the function
        jaxattn.attention(q, q, q, score_mod=relative)
    with pytest.raises(ValueError, match="pass arrays it reads as score_mod_tables"):
        jaxattn.attention(q, q, q, score_mod=lambda x, b, h, i, j: x + table[h, i - j + 7])
    # a row read (the reference broadcasts it) or whole-table arithmetic: the kernels say how to read a table
    row = jnp.zeros((2, 1))
    with pytest.raises(TypeError, match="index every axis"):
        jaxattn.attention(q, q, q, score_mod=lambda x, b, h, i, j, t: x + t[h], score_mod_tables=(row,), impl="pallas")
    with pytest.raises(TypeError, match="tables are read-only views"):
        jaxattn.attention(q, q, q, score_mod=lambda x, b, h, i, j, t: x + jnp.sum(t), score_mod_tables=(row,),
                          impl="pallas")


def test_out_of_range_reads_wrap_and_clamp_as_jnp():
    """Indices past a table's ends read what jnp indexing reads (negatives wrap once, then clamp): the
    forward against the XLA path, which indexes real arrays; the table's gradient reaches the entries
    actually read (the oracle: the clamped indices built in NumPy; jnp's own gradient would drop the
    out-of-range reads' contributions, as XLA's scatter drops out-of-bounds updates)."""
    s, h, n = 37, 2, 7
    ks = jax.random.split(jax.random.PRNGKey(9), 4)
    q, k, v = (randn(kk, (1, s, h, 32), jnp.float32) for kk in ks[:3])
    table = randn(ks[3], (h, n), jnp.float32)

    def wild(x, b, hh, qi, ki, t):  # qi - ki in [-36, 36] against 7 entries
        return x + t[hh, qi - ki]

    rel = np.arange(s)[:, None] - np.arange(s)[None, :]
    idx = np.clip(np.where(rel < 0, rel + n, rel), 0, n - 1)

    def kernel(q, table):
        o = jaxattn.attention(q, k, v, score_mod=wild, score_mod_tables=(table,), impl="pallas")
        return (o * jnp.cos(o)).sum(), o

    def oracle(q, table):
        o = attention_reference(q, k, v, mask=table[:, idx][None])[0]
        return (o * jnp.cos(o)).sum(), o

    (gq_k, gt_k), o_k = jax.jit(jax.grad(kernel, (0, 1), has_aux=True))(q, table)
    (gq_r, gt_r), o_r = jax.jit(jax.grad(oracle, (0, 1), has_aux=True))(q, table)
    o_x = jaxattn.attention(q, k, v, score_mod=wild, score_mod_tables=(table,), impl="xla")
    assert_close(o_k, o_x, jnp.float32, "out vs impl='xla'")
    assert_close(o_k, o_r, jnp.float32, "out")
    assert_close(gq_k, gq_r, jnp.float32, "dq", GRAD_TOL)
    assert_close(gt_k, gt_r, jnp.float32, "dtable", GRAD_TOL)
