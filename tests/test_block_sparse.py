"""Block-sparse attention: BlockMask lists against the set formulas (numpy), the kernel
(interpret mode, outputs poisoned) against a dense masked softmax built element-wise from
each pattern's formula, gradients, ragged lengths, GQA, 16-bit dtypes, empty rows,
single-token decode, CUDA lowering and input errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, assert_close, count_triton_calls, lower_for_cuda, randn
from jaxattn.ops import block_sparse as bs
from jaxattn.ops.block_sparse import BlockMask
from jaxattn.pallas import flash
from jaxattn.pallas._common import poison_outputs
from jaxattn.pallas.block_sparse import block_sparse_attention_kernel
from jaxattn.reference import block_sparse as ref

# ---------------------------------------------------------------------------------------
# Block lists (numpy only).
# ---------------------------------------------------------------------------------------


def _visits(bm: BlockMask, row: int) -> tuple[list[int], list[int]]:
    start, n_full, n_visit = (int(x) for x in np.asarray(bm.kv_index)[row])
    blocks = [int(b) for b in np.asarray(bm.kv_blocks)[start:start + n_visit]]
    return blocks[:n_full], blocks[n_full:]


@pytest.mark.parametrize("n,block,w", [(1024, 64, 5), (1000, 16, 1), (2048, 128, 2), (333, 32, 3)])
def test_power_lists_equal_set_formula(n, block, w):
    bm = BlockMask.power(n, block, window=w * block, sink=block)
    assert (bm.block_q, bm.block_k) == (block, block)
    sets = ref.power_block_sets(-(-n // block), w)
    ragged = n % block != 0
    last = -(-n // block) - 1
    for qb, expected in enumerate(sets):
        full, partial = _visits(bm, qb)
        assert set(full) | set(partial) == expected, qb
        assert len(full) + len(partial) == len(expected)  # no duplicates
        # the diagonal block is partial (causal); so is a ragged last key block
        assert set(partial) == {qb} | ({last} & expected if ragged else set()), qb
        assert full == sorted(full)
    # out-degree <= sink + window + log2(n_blocks) + 1
    assert max(len(s) for s in sets) <= 1 + w + int(np.log2(max(1, last))) + 1
    np.testing.assert_array_equal(np.asarray(bm.dense()),
                                  ref.power_mask(n, block=block, window_blocks=w, sink=block))


def test_power_receptive_field_doubles():
    """Paper §4.1: every block within distance 2^d of the last one is reachable in d layers
    (hops through the key-block sets), even with no local window (W = 1)."""
    sets = ref.power_block_sets(300, 1)
    last, reach = 299, {299}
    for depth in range(1, 10):
        reach |= {j for i in reach for j in sets[i]}
        assert set(range(max(0, last - 2 ** depth + 1), last + 1)) <= reach, depth


def _patterns(b: int):
    return [bs.Causal(), bs.SlidingWindow(37), bs.SlidingWindow(100, 70), bs.Power(b, 1, 0),
            bs.Power(b, 3, b), bs.Power(b, 5, 7), bs.Dilated(b, 2, 6, 0), bs.Dilated(b, 3, 7, 20)]


@pytest.mark.parametrize("b", [16, 24, 64])
def test_interval_states_equal_elementwise(b):
    """The fast interval builder classifies every block as the element mask does."""
    for pat in _patterns(b):
        for q_len, kv_len, off in [(200, 200, 0), (1, 300, 299), (1, 300, 150), (77, 513, 400), (5, 9, 0)]:
            for bq, bk in [(16, 16), (32, 16), (16, 64)]:
                fast = bs._states_from_intervals(pat, q_len, kv_len, off, bq, bk)
                slow = bs._states_elementwise(pat, q_len, kv_len, off, bq, bk)
                np.testing.assert_array_equal(fast, slow, err_msg=f"{pat} {q_len} {kv_len} {off} {bq} {bk}")


def test_lists_are_the_states_and_their_transpose():
    bm = BlockMask.sink_window(300, 32, window=70, sink=20)
    states = np.asarray(bm.block_states())
    for index, blocks, st in ((bm.kv_index, bm.kv_blocks, states), (bm.q_index, bm.q_blocks, states.T)):
        index, blocks = np.asarray(index), np.asarray(blocks)
        for r in range(st.shape[0]):
            start, n_full, n_visit = index[r]
            row = blocks[start:start + n_visit]
            assert list(row[:n_full]) == list(np.flatnonzero(st[r] == bs.FULL))
            assert list(row[n_full:]) == list(np.flatnonzero(st[r] == bs.PARTIAL))
    assert bm.density == (states != 0).mean() and 0 < bm.density < 1


def test_constructors_match_formulas():
    n = 157
    cases = [
        (BlockMask.causal(n, 32), ref.causal_mask(n)),
        (BlockMask.sliding_window(n, 16, window=40), ref.sliding_window_mask(n, window=40)),
        (BlockMask.sink_window(n, 64, window=30, sink=9), ref.sliding_window_mask(n, window=30, sink=9)),
        (BlockMask.dilated(n, 16, window=96, dilation=2, sink=3),
         ref.dilated_mask(n, block=16, window_blocks=6, dilation=2, sink=3)),
        (BlockMask.power(n, 24, window=48, sink=5), ref.power_mask(n, block=24, window_blocks=2, sink=5)),
        (BlockMask.causal(3, 64, kv_len=90, q_offset=40), ref.causal_mask(3, 90, q_offset=40)),
    ]
    for bm, expected in cases:
        np.testing.assert_array_equal(np.asarray(bm.dense()), expected, err_msg=repr(bm))
    assert BlockMask.power(100, 256).block_k == 128  # paper default B = 256 -> 128 tiles
    assert BlockMask.causal(1, 128, kv_len=500).block_q == 16  # decode: small query blocks


# ---------------------------------------------------------------------------------------
# Kernel vs oracle (interpret mode).
# ---------------------------------------------------------------------------------------


def _inputs(seed, b, sq, sk, hq, hkv, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = randn(ks[0], (b, sq, hq, d), dtype)
    k = randn(ks[1], (b, sk, hkv, d), dtype)
    v = randn(ks[2], (b, sk, hkv, d), dtype)
    w_o = jax.random.normal(ks[3], (b, sq, hq, d))
    w_l = jax.random.normal(ks[4], (b, sq, hq))
    return q, k, v, w_o, w_l


def _weighted(out, lse, w_o, w_l):
    return jnp.sum(out.astype(jnp.float32) * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l)


def _check(bm: BlockMask, expected_mask: np.ndarray, *, dtype=jnp.float32, hq=2, hkv=1, d=32, seed=0,
           config=None, grads=True, segments=None):
    """The kernel against the dense oracle on ``expected_mask`` (and, with ``segments`` = (q ids, kv ids)
    ``[1, len]``, only within a segment)."""
    q, k, v, w_o, w_l = _inputs(seed, 1, bm.q_len, bm.kv_len, hq, hkv, d, dtype)
    seg = {}
    if segments is not None:
        qs, ks = (np.asarray(s) for s in segments)
        expected_mask = expected_mask & (qs[0][:, None] == ks[0][None, :])
        seg = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))

    def kernel(q, k, v):
        return block_sparse_attention_kernel(
            q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
            kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
            config=config, **seg)

    def loss(fn):  # one jitted program each: forward, and the backward when grads
        def f(q, k, v):
            out, lse = fn(q, k, v)
            return _weighted(out, lse, w_o, w_l), (out, lse)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True) if grads else fn)

    oracle = functools.partial(ref.block_sparse_reference, mask=expected_mask)
    with poison_outputs():
        got = loss(kernel)(q, k, v)
    want = loss(oracle)(q, k, v)
    if grads:  # ((loss, (out, lse)), (dq, dk, dv))
        ((_, (out, lse)), got), ((_, (ref_out, ref_lse)), want) = got, want
    else:
        (out, lse), (ref_out, ref_lse) = got, want
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, jnp.float32 if dtype == jnp.float32 else dtype, "lse")
    if grads:
        for name, g, w in zip("qkv", got, want):
            assert g.dtype == dtype
            assert_close(g, w, dtype, f"d{name}", tol=GRAD_TOL)
    return out, lse


def test_power_ragged_gqa_fp32():
    """N = 200 is not a multiple of B = 32; mask blocks 64 > kernel tiles (sub-tiling)."""
    bm = BlockMask.power(200, 32, window=64, sink=32, tile=64)
    _check(bm, ref.power_mask(200, block=32, window_blocks=2, sink=32), hq=4, hkv=2)


@pytest.mark.parametrize("dtype,hq,hkv", [(jnp.float32, 4, 2), (jnp.bfloat16, 2, 1)])
def test_segments_on_top_of_the_layout(dtype, hq, hkv):
    """Packed sequences: keys only within the query's segment and the layout, inside full blocks too
    (segments start mid-block, at a mask block boundary (64) and one past it); cross attention too."""
    ids = np.searchsorted([50, 64, 65, 130], np.arange(200), side="right")[None].astype(np.int32)
    bm = BlockMask.power(200, 32, window=64, sink=32, tile=64)
    out, lse = _check(bm, ref.power_mask(200, block=32, window_blocks=2, sink=32), dtype=dtype, hq=hq, hkv=hkv,
                      segments=(ids, ids))
    plain = _check(bm, ref.power_mask(200, block=32, window_blocks=2, sink=32), dtype=dtype, hq=hq, hkv=hkv,
                   grads=False)[0]
    assert float(jnp.abs(out.astype(jnp.float32) - plain.astype(jnp.float32)).max()) > 0.1
    # cross attention with its own ids: q rows 0..95 at q_offset 40 against 150 keys
    bmx = BlockMask.dilated(96, 16, window=64, dilation=2, kv_len=150, q_offset=40)
    qs = (np.arange(96)[None] + 40) // 70
    ks = np.arange(150)[None] // 70
    _check(bmx, np.asarray(bmx.dense()), segments=(qs.astype(np.int32), ks.astype(np.int32)), grads=False)


def test_public_op_segment_ids_and_refusals():
    q, k, v, _, _ = _inputs(3, 2, 96, 96, 2, 1, 32, jnp.float32)
    bm = BlockMask.power(96, 16, window=32, sink=16)
    seg = jnp.asarray(np.stack([np.arange(96) // 40, np.zeros(96)]), jnp.int32)
    outs = [jaxattn.block_sparse_attention(q, k, v, bm, segment_ids=seg, impl=impl) for impl in ("xla", "pallas")]
    assert_close(outs[1], outs[0], jnp.float32)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, len\]"):
        jaxattn.block_sparse_attention(q, k, v, bm, segment_ids=seg[:, :90])
    with pytest.raises(ValueError, match="q_segment_ids and kv_segment_ids go together"):
        block_sparse_attention_kernel(q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k,
                                      kv_index=bm.kv_index, kv_blocks=bm.kv_blocks, q_index=bm.q_index,
                                      q_blocks=bm.q_blocks, q_offset=bm.q_offset, q_segment_ids=seg)


def test_sparse_config_table_overrides_the_flash_table(monkeypatch):
    """``pallas.block_sparse.CONFIGS`` (what ``bench tune sparse`` fills) wins over the flash table
    for its key, and the kernel runs it (here 16-row tiles, one pipeline stage: still exact)."""
    from jaxattn.pallas import block_sparse as pbs

    assert pbs.sparse_config(100, jnp.float32) == flash.flash_config(100, jnp.float32)
    own = flash.FlashConfig(16, 16, 4, 1, 16, 16, 16, 16, 4, 1)
    monkeypatch.setitem(pbs.CONFIGS, (128, 4), own)
    assert pbs.sparse_config(100, jnp.float32) is own
    assert pbs.sparse_config(64, jnp.float32) == flash.flash_config(64, jnp.float32)
    seen = []
    run = flash.run_padded
    monkeypatch.setattr(flash, "run_padded", lambda st, *a, **kw: seen.append(st.cfg) or run(st, *a, **kw))
    bm = BlockMask.power(96, 16, window=32, sink=16)
    _check(bm, ref.power_mask(96, block=16, window_blocks=2, sink=16), d=100, hq=2, hkv=1)
    assert seen and all(c is own for c in seen)


def test_sliding_window_bf16():
    bm = BlockMask.sliding_window(160, 32, window=48)
    _check(bm, ref.sliding_window_mask(160, window=48), dtype=jnp.bfloat16, hq=2, hkv=2, seed=1)


def test_sink_window_fp16_multi_subtiles():
    cfg = flash.FlashConfig(16, 16, 4, 1, 16, 16, 16, 16, 4, 1)  # 64-blocks walked as 4x4 tiles
    bm = BlockMask.sink_window(190, 64, window=50, sink=20)
    _check(bm, ref.sliding_window_mask(190, window=50, sink=20), dtype=jnp.float16, seed=2, config=cfg)


def test_dilated_and_user_predicate_cross_lengths():
    bm = BlockMask.dilated(96, 16, window=64, dilation=2, kv_len=150, q_offset=40)
    expected = ref.dilated_mask(96, 150, block=16, window_blocks=4, dilation=2, q_offset=40)
    _check(bm, expected, seed=3, grads=False)

    def stripes(qi, kj):  # element-level pattern: every block is partial
        return (kj <= qi) & ((qi - kj) % 3 != 1)

    bm = BlockMask.from_fn(stripes, 100, 130, 32)
    p, j = np.arange(100)[:, None] + 30, np.arange(130)[None, :]
    _check(bm, (j <= p) & ((p - j) % 3 != 1), seed=4)


def test_dropout_kernel_matches_xla():
    """Attention dropout through the block-sparse kernels (the same mask as the dense XLA path),
    forward and gradients."""
    bm = BlockMask.power(200, 32, window=64, sink=32, tile=64)
    q, k, v, w_o, _ = _inputs(7, 1, 200, 200, 4, 2, 32, jnp.float32)
    kw = dict(dropout_rate=0.2, dropout_rng=jax.random.PRNGKey(3))

    def run(impl):
        f = lambda q, k, v: jnp.sum(jaxattn.block_sparse_attention(q, k, v, bm, impl=impl, **kw) * w_o)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)

    with poison_outputs():
        (got, g_got) = run("pallas")
    want, g_want = run("xla")
    assert_close(got, want, jnp.float32, "loss")
    for name, a, b in zip("qkv", g_got, g_want):
        assert_close(a, b, jnp.float32, f"d{name}", tol=GRAD_TOL)
    plain = jnp.sum(jaxattn.block_sparse_attention(q, k, v, bm, impl="xla") * w_o)
    assert abs(float(plain - want)) > 1e-3


def test_empty_rows_give_zeros():
    def gappy(qi, kj):  # query rows 16..47 see nothing; others a causal window
        return (kj <= qi) & (qi - kj < 40) & ((qi < 16) | (qi >= 48))

    bm = BlockMask.from_fn(gappy, 120, block=16)
    expected = np.asarray(bm.dense())
    assert not expected[16:48].any()
    out, lse = _check(bm, expected, seed=5)
    assert (np.asarray(out[:, 16:48]) == 0).all() and np.isneginf(np.asarray(lse[:, 16:48])).all()


def test_single_token_decode_static_and_traced_position():
    cache, pos = 300, 237
    ks = jax.random.split(jax.random.PRNGKey(6), 3)
    q = randn(ks[0], (2, 1, 4, 32), jnp.float32)
    k = randn(ks[1], (2, cache, 2, 32), jnp.float32)
    v = randn(ks[2], (2, cache, 2, 32), jnp.float32)
    expected = ref.power_mask(1, cache, block=16, window_blocks=2, sink=16, q_offset=pos)
    ref_out, ref_lse = ref.block_sparse_reference(q, k, v, expected)

    def step(q, k, v, p):
        bm = BlockMask.power(1, 16, window=32, sink=16, kv_len=cache, q_offset=p)
        return jaxattn.block_sparse_attention(q, k, v, bm, impl="pallas", return_lse=True)

    with poison_outputs():
        static = jax.jit(functools.partial(step, p=pos))(q, k, v)
        traced = jax.jit(step)(q, k, v, jnp.int32(pos))
    for out, lse in (static, traced):
        assert_close(out, ref_out, jnp.float32, "decode out")
        assert_close(lse, ref_lse, jnp.float32, "decode lse")
    traced_mask = jax.jit(lambda p: BlockMask.power(1, 16, window=32, sink=16, kv_len=cache,
                                                    q_offset=p).block_states())(pos)
    static_mask = BlockMask.power(1, 16, window=32, sink=16, kv_len=cache, q_offset=pos)
    np.testing.assert_array_equal(np.asarray(traced_mask), static_mask.block_states())


def test_power_default_tiles_bf16_gqa():
    """Table tiles (128 x 64 forward, 64 x 128 dk/dv) under 128 mask blocks, N = 777."""
    bm = BlockMask.power(777, 64, window=128, sink=64, tile=128)
    _check(bm, ref.power_mask(777, block=64, window_blocks=2, sink=64), dtype=jnp.bfloat16, hq=4, hkv=1,
           d=64, seed=8)


def test_public_op_xla_and_auto_paths():
    q, k, v, _, _ = _inputs(7, 2, 70, 70, 4, 2, 16, jnp.float32)
    bm = BlockMask.power(70, 16, window=32)
    expected = ref.power_mask(70, block=16, window_blocks=2)
    ref_out, ref_lse = jax.jit(ref.block_sparse_reference)(q, k, v, expected)
    # a BlockMask is a pytree: it can be a jit argument
    out, lse = jax.jit(lambda q, k, v, m: jaxattn.block_sparse_attention(
        q, k, v, m, impl="xla", return_lse=True))(q, k, v, bm)
    assert_close(out, ref_out, jnp.float32, "xla out")
    assert_close(lse, ref_lse, jnp.float32, "xla lse")
    out2 = jax.jit(lambda q, k, v: jaxattn.power_attention(q, k, v, block=16, window=32))(q, k, v)
    assert_close(out2, ref_out, jnp.float32, "power_attention (auto: XLA for d=16 on CPU)")


# ---------------------------------------------------------------------------------------
# CUDA lowering (fwd + bwd: three Triton kernels).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,dtype,d,packed", [
    (lambda: BlockMask.power(4096, 256), jnp.bfloat16, 128, False),
    (lambda: BlockMask.power(4096, 256), jnp.bfloat16, 128, True),  # segment ids
    (lambda: BlockMask.power(1000, 100, window=300, sink=50), jnp.float16, 80, False),
    (lambda: BlockMask.sliding_window(777, 64, window=200), jnp.float32, 64, True),
    (lambda: BlockMask.causal(1, 128, kv_len=1000, q_offset=700), jnp.bfloat16, 256, False),
])
def test_lowers_for_cuda(make, dtype, d, packed):
    bm = make()
    args = [jax.ShapeDtypeStruct((2, bm.q_len, 4, d), dtype), jax.ShapeDtypeStruct((2, bm.kv_len, 2, d), dtype),
            jax.ShapeDtypeStruct((2, bm.kv_len, 2, d), dtype)]
    seg = dict(q_segment_ids=jnp.zeros((2, bm.q_len), jnp.int32),
               kv_segment_ids=jnp.zeros((2, bm.kv_len), jnp.int32)) if packed else {}

    def loss(q, k, v):
        o, lse = block_sparse_attention_kernel(
            q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
            kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
            interpret=False, **seg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    text = lower_for_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)
    assert count_triton_calls(text) >= 3


# ---------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------


def test_bad_inputs():
    q = jnp.zeros((1, 64, 2, 32))
    bm = BlockMask.causal(64, 32)
    with pytest.raises(ValueError, match="block_mask is built for"):
        jaxattn.block_sparse_attention(q, q, q, BlockMask.causal(32, 32))
    with pytest.raises(ValueError, match="block_mask must be a jaxattn.BlockMask"):
        jaxattn.block_sparse_attention(q, q, q, np.ones((64, 64), bool))
    with pytest.raises(ValueError, match="q must have rank 4"):
        jaxattn.block_sparse_attention(q[0], q, q, bm)
    with pytest.raises(ValueError, match="kv heads"):
        jaxattn.block_sparse_attention(jnp.zeros((1, 64, 3, 32)), q, q, bm)
    with pytest.raises(ValueError, match="head dims 32..256"):
        jaxattn.block_sparse_attention(jnp.zeros((1, 64, 2, 8)), jnp.zeros((1, 64, 2, 8)),
                                       jnp.zeros((1, 64, 2, 8)), bm, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        jaxattn.block_sparse_attention(q, q, q, bm, impl="cuda")
    with pytest.raises(ValueError, match="power of two >= 16"):
        BlockMask.causal(64, 48)
    with pytest.raises(ValueError, match="window must be a multiple of block"):
        BlockMask.power(64, 16, window=40)
    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        BlockMask.sink_window(64, 16, window=8, sink=-1)
    with pytest.raises(ValueError, match="q_offset"):
        BlockMask.causal(64, 16, kv_len=32)
    with pytest.raises(ValueError, match="q_offset must be an int >= 0"):
        BlockMask.causal(4, 16, kv_len=32, q_offset=-3)
    with pytest.raises(ValueError, match="mask_fn must be callable"):
        BlockMask.from_fn(None, 64)
    with pytest.raises(ValueError, match=r"kv_index must have shape \[2, 3\]"):
        block_sparse_attention_kernel(q, q, q, mask_fn=bm.mask_fn, block_q=32, block_k=32,
                                      kv_index=np.zeros((3, 3), np.int32), kv_blocks=bm.kv_blocks,
                                      q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=0)
