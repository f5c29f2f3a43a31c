"""Flash attention kernel (interpret mode on CPU) against the fp32 oracle and
``jax.nn.dot_product_attention(implementation="xla")``: forward, lse and all
three gradients, over seeded random shapes, with outputs poisoned."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import SLOW_OFF_GPU, GRAD_TOL, assert_close, randn
from jaxattn.pallas import flash
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import attention_reference

SMALL = flash.FlashConfig(32, 16, 4, 2, 32, 16, 16, 32, 4, 2)  # many blocks on short sequences
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# jit-compiled so interpret-mode kernels compile once per test instead of dispatching op by op
attn = jax.jit(jaxattn.attention, static_argnames=("causal", "scale", "impl", "return_lse"))


def _case(seed: int) -> dict:
    r = np.random.default_rng(seed)
    hkv = int(r.choice([1, 2, 3]))
    d = int(r.choice([32, 48, 64, 96, 128]))
    sq = int(r.integers(1, 140))
    sk = sq if r.random() < 0.4 else int(r.integers(1, 140))
    return dict(
        batch=int(r.integers(1, 3)), sq=sq, sk=sk, hkv=hkv, hq=hkv * int(r.choice([1, 2, 4])),
        d=d, dv=d if r.random() < 0.7 else int(r.choice([32, 64])),
        causal=bool(r.random() < 0.5), seg=bool(r.random() < 0.35),
        dtype=DTYPES[seed % 3], cfg=SMALL if r.random() < 0.6 else None, seed=seed)


def _inputs(c: dict):
    ks = jax.random.split(jax.random.PRNGKey(c["seed"]), 6)
    q = randn(ks[0], (c["batch"], c["sq"], c["hq"], c["d"]), c["dtype"])
    k = randn(ks[1], (c["batch"], c["sk"], c["hkv"], c["d"]), c["dtype"])
    v = randn(ks[2], (c["batch"], c["sk"], c["hkv"], c["dv"]), c["dtype"])
    seg = None
    if c["seg"]:
        qs = jnp.sort(jax.random.randint(ks[3], (c["batch"], c["sq"]), 0, 3), axis=1)
        kvs = jnp.sort(jax.random.randint(ks[4], (c["batch"], c["sk"]), 0, 3), axis=1)
        seg = (qs, kvs)
    return q, k, v, seg, ks[5]


def _kernel(c, q, k, v, seg, bias=None):
    qs, kvs = seg if seg is not None else (None, None)
    return flash.flash_attention(q, k, v, causal=c["causal"], bias=bias, q_segment_ids=qs,
                                 kv_segment_ids=kvs, config=c["cfg"])


def _oracle(c, q, k, v, seg, bias=None):
    qs, kvs = seg if seg is not None else (None, None)
    return attention_reference(q, k, v, causal=c["causal"], mask=bias, q_segment_ids=qs,
                               kv_segment_ids=kvs)


def _loss(fn, w_o, w_l):
    def loss(q, k, v):
        o, lse = fn(q, k, v)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(lse * w_l)
    return loss


@pytest.mark.parametrize("seed", [*range(6), *(pytest.param(s, marks=pytest.mark.slow) for s in range(6, 18))])
def test_random_shapes_forward_and_grads(seed):
    c = _case(seed)
    q, k, v, seg, key = _inputs(c)
    with poison_outputs():
        out, lse = jax.jit(lambda *a: _kernel(c, *a, seg))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda *a: _oracle(c, *a, seg))(q, k, v)
    assert out.dtype == q.dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_close(out, ref_out, c["dtype"], f"out {c}")
    assert_close(lse, ref_lse, jnp.float32 if c["dtype"] == jnp.float32 else c["dtype"], f"lse {c}")
    if c["dv"] == c["d"] and bool(jnp.isfinite(ref_lse).all()):  # jax.nn: no empty rows, one head dim
        mask = None
        if seg is not None:
            mask = (seg[0][:, :, None] == seg[1][:, None, :])[:, None]
        assert_close(out, jax.jit(lambda *a: _jax_nn(*a, c["causal"], mask))(q, k, v), c["dtype"],
                     f"out vs jax.nn {c}")

    w_o = jax.random.normal(key, ref_out.shape)
    w_l = jax.random.normal(jax.random.fold_in(key, 1), ref_lse.shape)
    with poison_outputs():
        grads = jax.jit(jax.grad(_loss(lambda *a: _kernel(c, *a, seg), w_o, w_l), (0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(_loss(lambda *a: _oracle(c, *a, seg), w_o, w_l), (0, 1, 2)))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype
        assert_close(g, rg, c["dtype"], f"d{name} {c}", tol=GRAD_TOL)


def _jax_nn(q, k, v, causal, mask=None):
    sq, sk = q.shape[1], k.shape[1]
    if causal:  # bottom-right aligned, given explicitly (jax.nn's is_causal is top-left)
        tri = jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq)
        mask = tri[None, None] if mask is None else mask & tri[None, None]
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.nn.dot_product_attention(*f32, mask=mask, implementation="xla")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_public_op_matches_jax_nn(dtype, causal):
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q = randn(ks[0], (2, 77, 6, 64), dtype)
    k = randn(ks[1], (2, 101, 2, 64), dtype)
    v = randn(ks[2], (2, 101, 2, 64), dtype)
    expected = _jax_nn(q, k, v, causal)
    with poison_outputs():
        out = attn(q, k, v, causal=causal, impl="pallas")
    assert_close(out, expected, dtype, "pallas vs jax.nn")
    assert_close(attn(q, k, v, causal=causal, impl="xla"), expected, dtype, "xla vs jax.nn")

    def grads(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2)))(q, k, v)

    g_kernel = grads(lambda *a: attn(*a, causal=causal, impl="pallas"))
    g_nn = grads(lambda *a: _jax_nn(*a, causal))
    for name, a, b in zip("qkv", g_kernel, g_nn):
        assert_close(a, b, dtype, f"d{name} vs jax.nn", tol=GRAD_TOL)


@pytest.mark.parametrize(
    "mask_shape,kind",
    [((2, 4, 40, 56), "add"), ((1, 4, 1, 56), "add"), ((2, 1, 1, 56), "bool"),
     ((2, 4, 40, 56), "bool"), ((40, 1), "add")],
)
def test_masks_and_bias(mask_shape, kind):
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = randn(ks[0], (2, 40, 4, 32), jnp.float32)
    k = randn(ks[1], (2, 56, 4, 32), jnp.float32)
    v = randn(ks[2], (2, 56, 4, 32), jnp.float32)
    if kind == "add":
        mask = jax.random.normal(ks[3], mask_shape) * 2
    else:
        mask = jax.random.bernoulli(ks[3], 0.6, mask_shape).at[..., 0].set(True)
    with poison_outputs():
        out = attn(q, k, v, mask=mask, impl="pallas")
    full = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    expected = jax.nn.dot_product_attention(
        q, k, v, bias=full if kind == "add" else None, mask=full if kind == "bool" else None,
        implementation="xla")
    assert_close(out, expected, jnp.float32, f"mask {mask_shape} {kind}")

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v, mask=mask, impl=impl)))

    grads = [jax.jit(jax.grad(loss(impl), (0, 1, 2)))(q, k, v) for impl in ("pallas", "xla")]
    for a, b in zip(*grads):
        assert_close(a, b, jnp.float32, "mask grads", tol=GRAD_TOL)


@pytest.mark.parametrize("mask_shape,causal,dtype,softcap,seg", [
    ((2, 4, 37, 53), False, jnp.float32, None, False),
    ((1, 4, 37, 53), True, jnp.float32, None, True),    # shared over the batch; segments skip blocks
    ((2, 1, 1, 53), True, jnp.bfloat16, None, False),   # per-key bias (summed over heads and queries)
    ((1, 1, 37, 1), False, jnp.float32, None, False),   # per-query bias: zero gradient (softmax shift)
    ((2, 4, 37, 53), True, jnp.float32, 20.0, False),   # bias after the soft cap
])
def test_additive_mask_gradient(mask_shape, causal, dtype, softcap, seg):
    """A differentiated additive mask gets its gradient from the dq kernel (the logits' cotangent,
    summed over its broadcast dims), as the XLA path's autodiff gives it; GQA, ragged lengths."""
    ks = jax.random.split(jax.random.PRNGKey(5), 6)
    q = randn(ks[0], (2, 37, 4, 32), dtype)
    k, v = randn(ks[1], (2, 53, 2, 32), dtype), randn(ks[2], (2, 53, 2, 32), dtype)
    mask = jax.random.normal(ks[3], mask_shape, jnp.float32).astype(dtype)
    cot = randn(ks[4], (2, 37, 4, 32), jnp.float32)
    segs = (jnp.repeat(jnp.arange(2), jnp.array([20, 17]), total_repeat_length=37)[None].repeat(2, 0),
            jnp.repeat(jnp.arange(2), jnp.array([30, 23]), total_repeat_length=53)[None].repeat(2, 0)) if seg else None

    qs, kvs = segs if seg else (None, None)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)

    def kernel(q, k, v, m):  # small tiles: causal and segment block skipping leave tiles unvisited
        return flash.flash_attention(q, k, v, causal=causal, bias=m, logits_soft_cap=softcap, q_segment_ids=qs,
                                     kv_segment_ids=kvs, config=SMALL)[0]

    def oracle(q, k, v, m):
        return attention_reference(q, k, v, causal=causal, mask=m, logits_soft_cap=softcap, q_segment_ids=qs,
                                   kv_segment_ids=kvs)[0]

    with poison_outputs():
        grads = jax.jit(jax.grad(loss(kernel), argnums=range(4)))(q, k, v, mask)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, mask)]
    expected = jax.jit(jax.grad(loss(oracle), argnums=range(4)))(*f32)
    assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
    for name, g, r in zip(("dq", "dk", "dv", "dmask"), grads, expected):
        assert_close(g, r, dtype, f"{name} {mask_shape}", tol=GRAD_TOL)
    assert float(jnp.max(jnp.abs(expected[3]))) > (1e-3 if mask_shape[-1] > 1 else 0.0)


def test_mask_gradient_only_when_differentiated(monkeypatch):
    """The dq kernel writes the [B, H, Sq, Sk] logits' cotangent only for a differentiated additive
    mask; a constant mask (or a bool one) costs nothing extra."""
    q = k = v = jnp.ones((1, 32, 2, 32), jnp.float32)
    seen = []
    real = flash._dq_call

    def spy(st, *args, **kw):
        seen.append(st.bias_grad)
        return real(st, *args, **kw)

    monkeypatch.setattr(flash, "_dq_call", spy)

    def dq_variants(mask, argnums):
        seen.clear()
        jax.make_jaxpr(jax.grad(lambda q, k, v, m: jnp.sum(jaxattn.attention(q, k, v, mask=m, impl="pallas")),
                                argnums))(q, k, v, mask)
        return seen[:]

    add = jnp.zeros((1, 2, 32, 32), jnp.float32)
    assert dq_variants(add, (0, 1, 2)) == [False]
    assert dq_variants(add, (0, 3)) == [True]
    assert dq_variants(add > 0, (0,)) == [False]


def test_fully_masked_rows_are_zero_not_nan():
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = randn(ks[0], (1, 48, 2, 32), jnp.bfloat16)
    k = randn(ks[1], (1, 20, 2, 32), jnp.bfloat16)
    v = randn(ks[2], (1, 20, 2, 32), jnp.bfloat16)
    # causal with q_len > kv_len: the first 28 query rows see no key
    with poison_outputs():
        out, lse = jax.jit(lambda *a: attn(*a, causal=True, impl="pallas", return_lse=True))(q, k, v)
    assert not jnp.isnan(out.astype(jnp.float32)).any()
    assert (out[:, :28] == 0).all() and (out[:, 28:] != 0).any()
    assert jnp.isneginf(lse[:, :28]).all() and jnp.isfinite(lse[:, 28:]).all()
    ref_out, _ = attention_reference(q, k, v, causal=True)
    assert_close(out, ref_out, jnp.bfloat16)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v, causal=True, impl="pallas")
                                                 .astype(jnp.float32)), (0, 1, 2)))(q, k, v)
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in g)
    assert (g[0][:, :28] == 0).all()
    # a -inf bias row and a bool mask row behave the same way
    mask = jnp.ones((1, 1, 48, 20), bool).at[:, :, 5].set(False)
    out2 = attn(q, k, v, mask=mask, impl="pallas")
    assert (out2[:, 5] == 0).all() and not jnp.isnan(out2.astype(jnp.float32)).any()


def test_segment_ids_single_array_equals_block_diagonal():
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    q, k, v = (randn(kk, (2, 50, 2, 64), jnp.float16) for kk in ks)
    seg = jnp.array([[0] * 20 + [1] * 30, [0] * 7 + [1] * 40 + [2] * 3])
    with poison_outputs():
        out = attn(q, k, v, segment_ids=seg, causal=True, impl="pallas")
    # packed sequences: each segment alone gives the same rows
    for b, (lo, hi) in [(0, (0, 20)), (0, (20, 50)), (1, (7, 47)), (1, (47, 50))]:
        alone = attention_reference(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi], causal=True)[0]
        assert_close(out[b:b + 1, lo:hi], alone, jnp.float16, f"segment {b} {lo}:{hi}")


def test_auto_uses_xla_on_cpu_and_scale():
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    q, k, v = (randn(kk, (1, 33, 2, 40), jnp.float32) for kk in ks)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(attn(q, k, v, scale=0.3),
                                      attn(q, k, v, scale=0.3, impl="xla"))
    expected = jax.nn.dot_product_attention(q, k, v, scale=0.3, implementation="xla")
    assert_close(attn(q, k, v, scale=0.3, impl="pallas"), expected, jnp.float32)


def test_jit_and_vmap():
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q, k, v = (randn(kk, (3, 1, 24, 2, 32), jnp.float32) for kk in ks)
    f = jax.jit(jax.vmap(lambda q, k, v: attn(q, k, v, causal=True, impl="pallas")))
    expected = jax.vmap(lambda q, k, v: attention_reference(q, k, v, causal=True)[0])(q, k, v)
    assert_close(f(q, k, v), expected, jnp.float32)


def test_head_dim_256_and_unequal_value_dim():
    ks = jax.random.split(jax.random.PRNGKey(6), 3)
    q = randn(ks[0], (1, 40, 2, 256), jnp.bfloat16)
    k = randn(ks[1], (1, 40, 1, 256), jnp.bfloat16)
    v = randn(ks[2], (1, 40, 1, 96), jnp.bfloat16)
    with poison_outputs():
        out = attn(q, k, v, causal=True, impl="pallas")
    assert out.shape == (1, 40, 2, 96)
    assert_close(out, attention_reference(q, k, v, causal=True)[0], jnp.bfloat16)


def test_segment_block_ranges_exact_when_packed_conservative_otherwise():
    rng = np.random.default_rng(0)
    bq, bk = 16, 8
    for ids in ("packed", "cross", "shuffled"):
        sq, sk = (75, 75) if ids == "packed" else (75, 90)
        q_pad, kv_pad = 80, -(-sk // 16) * 16
        qs = np.sort(rng.integers(0, 6, (2, sq)), axis=1)
        ks = qs.copy() if ids == "packed" else np.sort(rng.integers(0, 6, (2, sk)), axis=1)
        if ids == "shuffled":
            qs, ks = rng.permuted(qs, axis=1), rng.permuted(ks, axis=1)
        qp = np.pad(qs, ((0, 0), (0, q_pad - sq)), constant_values=3)  # padding ids must not count
        kp = np.pad(ks, ((0, 0), (0, kv_pad - sk)), constant_values=3)
        for transposed in (False, True):
            r = np.asarray(flash.segment_block_ranges(jnp.asarray(qp), jnp.asarray(kp), sq, sk, bq, bk, transposed))
            a, b = (kp, qp) if transposed else (qp, kp)
            la, lb, ba, bb = (sk, sq, bk, bq) if transposed else (sq, sk, bq, bk)
            for n in range(2):
                for i in range(r.shape[1]):
                    rows = a[n, i * ba:min((i + 1) * ba, la)]
                    hit = [j for j in range(-(-b.shape[1] // bb))
                           if np.isin(b[n, j * bb:min((j + 1) * bb, lb)], rows).any()]
                    lo, hi = r[n, i]
                    assert all(lo <= j < hi for j in hit), (ids, transposed, n, i, hit, lo, hi)
                    if ids == "packed":  # self-attention over packed documents: exact
                        assert (lo, hi) == ((hit[0], hit[-1] + 1) if hit else (lo, lo)), (n, i, hit, lo, hi)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ids", ["packed", "shuffled", "cross"])
def test_segments_skip_blocks_and_match_oracle(causal, ids):
    """Many documents over several blocks: the kernel visits only the key blocks a tile's
    segments reach (ranges), and forward and gradients still match the oracle, for packed,
    interleaved and cross-attention ids (queries of a segment with no key give zero rows)."""
    rng = np.random.default_rng(len(ids) + causal)
    sq, sk = 150, 150 if ids != "cross" else 170
    lengths = rng.integers(5, 40, 12)
    qs = np.repeat(np.arange(12), lengths)[:sq]
    qs = np.pad(qs, (0, sq - len(qs)), constant_values=11)[None].repeat(2, 0)
    kvs = np.sort(rng.integers(0, 12, (2, sk)), axis=1) if ids == "cross" else qs.copy()
    if ids == "shuffled":
        perm = rng.permutation(sq)
        qs, kvs = qs[:, perm], kvs[:, perm]
    seg = (jnp.asarray(qs), jnp.asarray(kvs))
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v = (randn(kk, (2, n, 2, 32), jnp.float32) for kk, n in zip(ks, (sq, sk, sk)))
    c = dict(causal=causal, cfg=SMALL)
    with poison_outputs():
        out, lse = jax.jit(lambda *a: _kernel(c, *a, seg))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda *a: _oracle(c, *a, seg))(q, k, v)
    assert_close(out, ref_out, jnp.float32, f"out {ids}")
    assert bool((jnp.isfinite(lse) == jnp.isfinite(ref_lse)).all())
    w_o = jax.random.normal(ks[3], ref_out.shape)
    w_l = jax.random.normal(jax.random.fold_in(ks[3], 1), ref_lse.shape)
    with poison_outputs():
        grads = jax.jit(jax.grad(_loss(lambda *a: _kernel(c, *a, seg), w_o, w_l), (0, 1, 2)))(q, k, v)
    ref_grads = jax.jit(jax.grad(_loss(lambda *a: _oracle(c, *a, seg), w_o, w_l), (0, 1, 2)))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, jnp.float32, f"d{name} {ids}", tol=GRAD_TOL)
    if ids == "packed":  # most key blocks are skipped: the ranges are short
        r = flash.segment_block_ranges(jnp.pad(seg[0], ((0, 0), (0, 10))), jnp.pad(seg[1], ((0, 0), (0, 10))),
                                       sq, sk, SMALL.block_q, SMALL.block_k)
        assert float(jnp.mean(r[..., 1] - r[..., 0])) < 0.5 * (160 // SMALL.block_k)


@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.slow),
                                    pytest.param(True, marks=SLOW_OFF_GPU)])
def test_segment_ranges_skip_blocks_no_query_can_see(causal):
    """Keys of a segment no query has, filling whole key blocks, are NaN: a visited block would
    spread it (0 * NaN) into the outputs and dq, a key block visited in dk/dv into its own grads;
    skipping keeps everything finite and equal to the oracle on finite keys."""
    qs = jnp.asarray([[0] * 32 + [2] * 32])  # query blocks of 32 (SMALL), one segment each
    kvs = jnp.asarray([[0] * 32 + [1] * 64 + [2] * 32])  # key blocks of 16: blocks 2..5 are all id 1
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    q = randn(ks[0], (1, 64, 2, 32), jnp.float32)
    k = randn(ks[1], (1, 128, 1, 32), jnp.float32)
    v = randn(ks[2], (1, 128, 1, 32), jnp.float32)
    hidden = (kvs[0] == 1)[None, :, None, None]
    k_nan, v_nan = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
    c = dict(causal=causal, cfg=SMALL)
    seg = (qs, kvs)
    out, lse = jax.jit(lambda *a: _kernel(c, *a, seg))(q, k_nan, v_nan)
    ref_out, ref_lse = _oracle(c, q, k, v, seg)
    assert_close(out, ref_out, jnp.float32, "out with unreachable NaN keys")
    w = jax.random.normal(ks[3], ref_out.shape)
    grads = jax.grad(_loss(lambda *a: _kernel(c, *a, seg), w, jnp.zeros_like(ref_lse)), (0, 1, 2))(q, k_nan, v_nan)
    ref_grads = jax.grad(_loss(lambda *a: _oracle(c, *a, seg), w, jnp.zeros_like(ref_lse)), (0, 1, 2))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, jnp.float32, f"d{name}", tol=GRAD_TOL)
