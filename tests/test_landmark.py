"""Landmark attention: oracle properties, XLA and Pallas (interpret) paths vs the dense oracle
(forward and gradients), top-k retrieval, CUDA lowering of the kernels, the model, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GRAD_TOL, assert_close, count_triton_calls, lower_for_cuda, randn
from flax import nnx

from jaxattn.models.gpt import rope
from jaxattn.models.landmark import LandmarkGPT, LandmarkGPTConfig, insert_landmarks, regular_index
from jaxattn.ops.landmark import landmark_attention, landmark_retrieval_attention
from jaxattn.pallas import _common
from jaxattn.reference.landmark import landmark_reference


def _qkv(seed, b, s, h, hkv, d, dtype=jnp.float32, sq=None):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (randn(ks[0], (b, sq or s, h, d), dtype), randn(ks[1], (b, s, hkv, d), dtype),
            randn(ks[2], (b, s, hkv, d), dtype), randn(ks[3], (b, sq or s, h, d), jnp.float32))


# ---------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("s,L", [(23, 5), pytest.param(7, 3, marks=pytest.mark.slow)])
def test_oracle_weights(s, L):
    q, k, v, _ = _qkv(s, 2, s, 2, 1, 8)
    o, w = jax.jit(functools.partial(landmark_reference, block_len=L, return_weights=True))(q, k, v)
    w = np.asarray(w)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    pos = np.arange(s)
    assert (w[..., pos % L == L - 1] == 0).all(), "landmarks must get weight 0"
    assert (w[..., pos[None] > pos[:, None]] == 0).all(), "no weight on future keys"
    assert (w >= 0).all()
    # block 0 queries: plain causal softmax over the regular keys j <= i
    sc = np.einsum("bqhd,bkhd->bhqk", np.asarray(q), np.repeat(np.asarray(k), 2, 2)) / np.sqrt(8)
    i = L - 2
    e = np.exp(sc[..., i, : i + 1] - sc[..., i, : i + 1].max(-1, keepdims=True))
    np.testing.assert_allclose(w[..., i, : i + 1], e / e.sum(-1, keepdims=True), atol=1e-5)
    # a query in block 1: block 0's total weight is p(L_0) of the outer softmax, spread by the
    # inner softmax of block 0's regular keys
    i = L + 1
    if i < s:
        outer = np.concatenate([sc[..., i, L: i + 1], sc[..., i, L - 1: L]], -1)
        p = np.exp(outer - outer.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(w[..., i, : L - 1].sum(-1), p[..., -1], atol=1e-5)
        inner = np.exp(sc[..., i, : L - 1] - sc[..., i, : L - 1].max(-1, keepdims=True))
        inner /= inner.sum(-1, keepdims=True)
        np.testing.assert_allclose(w[..., i, : L - 1], p[..., -1:] * inner, atol=1e-5)
    np.testing.assert_allclose(o, np.einsum("bhqk,bkhe->bqhe", w, np.repeat(np.asarray(v), 2, 2)), atol=1e-5)


# ---------------------------------------------------------------------------- fwd + grads


def _check_vs_oracle(impl, b, s, h, hkv, d, L, dtype, seed):
    q, k, v, do = _qkv(seed, b, s, h, hkv, d, dtype)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)

    ref = functools.partial(landmark_reference, block_len=L)
    ours = lambda q, k, v: landmark_attention(q, k, v, block_len=L, impl=impl)  # noqa: E731
    with _common.poison_outputs():
        o, grads = jax.jit(lambda q, k, v: (ours(q, k, v), jax.grad(loss(ours), (0, 1, 2))(q, k, v)))(q, k, v)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    assert o.dtype == dtype and o.shape == (b, s, h, d)
    o_ref, g_ref = jax.jit(lambda q, k, v: (ref(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)))(q32, k32, v32)
    assert_close(o, o_ref, dtype, f"{impl} out")
    for name, g, e in zip("qkv", grads, g_ref):
        assert g.dtype == dtype
        assert_close(g, e, dtype, f"{impl} d{name}", tol=GRAD_TOL)


@pytest.mark.parametrize("b,s,h,hkv,d,L,dtype", [
    (1, 37, 2, 1, 16, 6, jnp.float32),  # ragged S, GQA
    pytest.param(2, 64, 4, 2, 32, 16, jnp.float32, marks=pytest.mark.slow),  # S a multiple of the block
    pytest.param(1, 50, 3, 3, 24, 9, jnp.float32, marks=pytest.mark.slow),  # odd head dim / block
    (1, 41, 4, 1, 32, 8, jnp.bfloat16),
])
def test_xla_matches_oracle(b, s, h, hkv, d, L, dtype):
    _check_vs_oracle("xla", b, s, h, hkv, d, L, dtype, seed=s)


@pytest.mark.parametrize("b,s,h,hkv,d,L,dtype", [
    (2, 37, 4, 2, 16, 6, jnp.float32),  # ragged S, GQA, block padded 6 -> 16
    (1, 45, 2, 1, 24, 9, jnp.bfloat16),  # head dim padded 24 -> 32, MQA
])
def test_pallas_matches_oracle(b, s, h, hkv, d, L, dtype):
    _check_vs_oracle("pallas", b, s, h, hkv, d, L, dtype, seed=s + 1)


@pytest.mark.slow
def test_pallas_block_of_32_matches_xla():
    """A block that fills its tile exactly (no row padding) and several kv tiles."""
    q, k, v, do = _qkv(3, 1, 100, 2, 2, 16)
    f = lambda impl: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda q, k, v: jnp.sum(landmark_attention(q, k, v, block_len=32, impl=impl) * do), (0, 1, 2)))
    with _common.poison_outputs():
        (lp, gp) = f("pallas")(q, k, v)
    lx, gx = f("xla")(q, k, v)
    assert_close(lp, lx, jnp.float32, "loss")
    for a, e in zip(gp, gx):
        assert_close(a, e, jnp.float32, "grad", tol=GRAD_TOL)


# ---------------------------------------------------------------------------- retrieval


def test_retrieval_with_all_blocks_equals_full():
    q, k, v, _ = _qkv(5, 2, 47, 4, 2, 16)
    full = jax.jit(functools.partial(landmark_attention, block_len=7, impl="xla"))(q, k, v)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def retrieve(q, start, stop, top_k):
        return landmark_retrieval_attention(q[:, start:stop], k[:, :stop], v[:, :stop], block_len=7,
                                            top_k=top_k, q_offset=start)

    for start, stop, top_k in ((46, 47, 100), (0, 47, 7), (20, 30, 7)):  # decode step, all, middle chunk
        assert_close(retrieve(q, start, stop, top_k), full[:, start:stop], jnp.float32, f"{start}:{stop}")


def test_retrieval_small_k_equals_restricted_oracle():
    L, K, s, sq = 6, 2, 53, 9
    q, k, v, _ = _qkv(6, 2, s, 4, 2, 16)
    out, idx = jax.jit(functools.partial(landmark_retrieval_attention, block_len=L, top_k=K, return_blocks=True))(
        q[:, -sq:], k, v)
    # independent selection: numpy scores of every query against every earlier landmark
    qn, kn = np.asarray(q[:, -sq:]), np.repeat(np.asarray(k), 2, axis=2)
    n_blocks = -(-s // L)
    allowed = np.zeros((2, 4, sq, n_blocks), bool)
    for r in range(sq):
        c = (s - sq + r) // L
        lm = kn[:, np.arange(c) * L + L - 1]  # [B, c, H, D]
        sc = np.einsum("bhd,bghd->bhg", qn[:, r], lm)
        top = np.argsort(-sc, axis=-1)[..., :K]
        np.put_along_axis(allowed[:, :, r], top, True, axis=-1)
        np.testing.assert_array_equal(np.sort(np.asarray(idx[:, :, r]), -1), np.sort(top, -1))
    allowed_full = np.ones((2, 4, s, n_blocks), bool)
    allowed_full[:, :, -sq:] = allowed
    ref_fn = jax.jit(functools.partial(landmark_reference, block_len=L))
    ref = ref_fn(q, k, v, allowed_blocks=jnp.asarray(allowed_full))[:, -sq:]
    assert_close(out, ref, jnp.float32, "top-k retrieval")
    assert not np.allclose(out, ref_fn(q, k, v)[:, -sq:], atol=1e-3)  # the restriction matters


@pytest.mark.slow
def test_retrieval_rope_inside():
    q, k, v, _ = _qkv(7, 1, 40, 2, 1, 16)
    pos = jnp.arange(40)
    qr, kr = rope(q, pos, 500.0), rope(k, pos, 500.0)
    full = landmark_attention(qr, kr, v, block_len=8, impl="xla")
    for mp in ("absolute", "contiguous"):  # with every block retrieved the slots are the true places
        out = landmark_retrieval_attention(q[:, -12:], k, v, block_len=8, top_k=10, rope_theta=500.0,
                                           memory_positions=mp)
        assert_close(out, full[:, -12:], jnp.float32, mp)
    a = landmark_retrieval_attention(q[:, -3:], k, v, block_len=8, top_k=2, rope_theta=500.0)
    b = landmark_retrieval_attention(qr[:, -3:], kr, v, block_len=8, top_k=2)
    assert_close(a, b, jnp.float32, "absolute rope == pre-rotated")


# ---------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize("L,d,dtype", [(16, 32, jnp.bfloat16), (32, 64, jnp.bfloat16), (51, 64, jnp.float16),
                                      (64, 128, jnp.bfloat16), (65, 64, jnp.float32), (9, 16, jnp.float32),
                                      (128, 128, jnp.bfloat16)])
def test_kernels_lower_for_cuda(L, d, dtype):
    args = [jax.ShapeDtypeStruct((2, 300, 8, d), dtype), jax.ShapeDtypeStruct((2, 300, 2, d), dtype),
            jax.ShapeDtypeStruct((2, 300, 2, d), dtype)]

    def loss(q, k, v):
        return jnp.sum(landmark_attention(q, k, v, block_len=L, impl="pallas", interpret=False).astype(jnp.float32))

    text = lower_for_cuda(jax.value_and_grad(loss, (0, 1, 2)), *args)
    assert count_triton_calls(text) >= 3, "expected forward, dq and dk/dv Triton kernels"


# ---------------------------------------------------------------------------- model


def test_insert_landmarks():
    t = jnp.arange(1, 11)[None]
    out = insert_landmarks(t, 3, 0)
    np.testing.assert_array_equal(out[0], [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 10])
    np.testing.assert_array_equal(out[0, regular_index(10, 3)], np.arange(1, 11))


def test_model_retrieval_with_all_blocks_matches_training_path():
    cfg = LandmarkGPTConfig(vocab_size=17, landmark_id=16, dim=32, layers=1, heads=2, mem_freq=5, eval_chunk=16,
                            attn_impl="xla")
    graphdef, state = nnx.split(LandmarkGPT(cfg, rngs=nnx.Rngs(0)))
    run = jax.jit(lambda state, tokens, top_k: nnx.merge(graphdef, state)(tokens, top_k=top_k), static_argnums=2)
    tokens = insert_landmarks(jax.random.randint(jax.random.key(0), (2, 40), 0, 16), 5, 16)
    full = run(state, tokens, None)
    assert full.shape == (2, tokens.shape[1], 17)
    assert_close(run(state, tokens, 100), full, jnp.float32, "retrieval model")


# ---------------------------------------------------------------------------- errors


def test_errors():
    q, k, v, _ = _qkv(0, 1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="block_len"):
        landmark_attention(q, k, v, block_len=1)
    with pytest.raises(ValueError, match="block_len"):
        landmark_attention(q, k, v, block_len=4.0)
    with pytest.raises(ValueError, match="impl"):
        landmark_attention(q, k, v, block_len=4, impl="cuda")
    with pytest.raises(ValueError, match="self-attention"):
        landmark_attention(q, k[:, :8], v[:, :8], block_len=4)
    with pytest.raises(ValueError, match="dtype"):
        landmark_attention(q.astype(jnp.int32), k, v, block_len=4)
    with pytest.raises(ValueError, match="rank 4"):
        landmark_attention(q[0], k, v, block_len=4)
    with pytest.raises(ValueError, match="kv heads"):
        landmark_attention(jnp.zeros((1, 16, 3, 8)), jnp.zeros((1, 16, 2, 8)), jnp.zeros((1, 16, 2, 8)), block_len=4)
    with pytest.raises(ValueError, match="top_k"):
        landmark_retrieval_attention(q, k, v, block_len=4, top_k=0)
    with pytest.raises(ValueError, match="q_offset"):
        landmark_retrieval_attention(q[:, :4], k, v, block_len=4, top_k=2, q_offset=14)
    with pytest.raises(ValueError, match="memory_positions"):
        landmark_retrieval_attention(q, k, v, block_len=4, top_k=2, memory_positions="near")
    with pytest.raises(ValueError, match="mem_freq"):
        LandmarkGPTConfig(mem_freq=0)


# ---------------------------------------------------------------------------- experiment


def test_passkey_batch_plants_the_key_it_asks_for():
    from jaxattn.train.landmark_experiment import DIGITS, passkey_batch

    tokens, answer = passkey_batch(np.random.default_rng(0), 8, 300)
    assert tokens.shape == (8, 300) and list(answer) == list(range(300 - DIGITS, 300))
    for row in tokens:
        text = bytes(row.astype(np.uint8)).decode()
        key = text[-DIGITS:]
        assert key.isdigit() and text.endswith(f"What is the pass key? The pass key is {key}")
        assert text.count(f"The pass key is {key}. Remember it.") == 1  # planted once, before the question
    keys = {bytes(r[-DIGITS:].astype(np.uint8)) for r in tokens}
    assert len(keys) > 1, "keys must vary"
    with pytest.raises(ValueError, match="sequence length n must be >= 79"):
        passkey_batch(np.random.default_rng(0), 1, 78)
    passkey_batch(np.random.default_rng(0), 1, 79)


def test_landmark_model_loads_plain_gpt_weights():
    """Stage 2 of the experiment starts the landmark model from a plain GPT: the parameter trees
    match, and with one block (mem_freq >= length) the two models compute the same logits."""
    from jaxattn.models.gpt import GPT, GPTConfig

    base = dict(dim=32, layers=2, heads=2, attn_impl="xla")
    plain = GPT(GPTConfig(vocab_size=257, **base), rngs=nnx.Rngs(0))
    lm = LandmarkGPT(LandmarkGPTConfig(vocab_size=257, landmark_id=256, mem_freq=64, **base), rngs=nnx.Rngs(1))
    nnx.update(lm, nnx.state(plain, nnx.Param))
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
    assert_close(lm(tokens), plain(tokens), jnp.float32, "logits")


@pytest.mark.slow  # trains and evaluates two tiny models end to end (~1 min)
def test_landmark_experiment_writes_results(tmp_path):
    from jaxattn.train.landmark_experiment import main

    out = tmp_path / "RESULTS.md"
    assert main(["--pretrain-steps", "3", "--pretrain-seq", "80", "--adapt-steps", "2", "--steps", "2", "--seq", "96",
                 "--batch", "2", "--eval-len", "192", "--eval-samples", "2", "--results", str(out)]) == 0
    text = out.read_text()
    assert "landmark-experiment:begin" in text and text.count("| landmark |") == 4 and text.count("| plain |") == 2
