"""GPT-style decoder: shapes, causality, RoPE and attention against hand-written math."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models.gpt import GPT, GPTConfig, rope
from jaxattn.models.landmark import LandmarkGPTConfig


def _model(**kw):
    return GPT(GPTConfig(vocab_size=64, dim=32, layers=2, heads=4, attn_impl="xla", **kw), rngs=nnx.Rngs(0))


def test_causal_and_shapes():
    m = _model(kv_heads=2)
    t = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, 64)
    logits = m(t)
    assert logits.shape == (2, 24, 64) and logits.dtype == jnp.float32
    t2 = t.at[:, 12:].set((t[:, 12:] + 1) % 64)
    np.testing.assert_allclose(m(t2)[:, :12], logits[:, :12], atol=1e-5)
    assert np.abs(np.asarray(m(t2)[:, 12:] - logits[:, 12:])).max() > 1e-4


def test_rope_is_relative():
    """<rope(q, i), rope(k, j)> depends only on i - j."""
    q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, 16))
    dots = []
    for i, j in [(5, 2), (9, 6), (40, 37)]:
        qi = rope(q, jnp.array([i]), 10000.0)
        kj = rope(k, jnp.array([j]), 10000.0)
        dots.append(float(jnp.sum(qi * kj)))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5)


def test_partial_rotary_and_longrope():
    """rotary_dim: the first channels rotate as a head that narrow would, the rest pass unchanged; LongRoPE
    divides each frequency by its short factor up to the original context and by its long factor past it
    (chosen by the call's last position), cos/sin times sqrt(1 + ln(factor) / ln(original))."""
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, 2, 12))
    pos = jnp.arange(6) + 3
    part = rope(x, pos, 100.0, (), rotary_dim=8)
    np.testing.assert_array_equal(part[..., 8:], x[..., 8:])
    np.testing.assert_allclose(part[..., :8], rope(x[..., :8], pos, 100.0), rtol=1e-6, atol=1e-6)
    short, long = (1.0, 2.0, 4.0, 8.0), (3.0, 5.0, 7.0, 9.0)
    cfg = GPTConfig(dim=48, heads=4, rotary_dim=8, rope_scaling={"rope_type": "longrope", "short_factor": list(short),
                    "long_factor": long, "factor": 4.0, "original_max_position_embeddings": 9})
    attn = np.sqrt(1 + np.log(4.0) / np.log(9.0))

    def by_hand(positions, factors):  # float64: angle = position / (factor_i * 100^(2i/8))
        ang = np.asarray(positions, np.float64)[:, None] / (np.asarray(factors) * 100.0 ** (np.arange(0, 8, 2) / 8))
        cos, sin = np.cos(ang)[None, :, None] * attn, np.sin(ang)[None, :, None] * attn
        xf = np.asarray(x[:, :len(positions)], np.float64)
        x1, x2 = xf[..., :4], xf[..., 4:8]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., 8:]], -1)

    for positions, factors in [(pos, short), (pos + 1, long), (jnp.arange(2) + 7, short), (jnp.arange(2) + 8, long)]:
        got = rope(x[:, :len(positions)], positions, 100.0, cfg.rope_scaling, cfg.rotary_dim)
        np.testing.assert_allclose(got, by_hand(positions, factors), rtol=1e-5, atol=1e-5)
    assert hash(cfg) == hash(dataclasses.replace(cfg))  # (factor lists frozen into tuples)
    for kw, match in [(dict(rotary_dim=7), "rotary_dim must be a positive even"),
                      (dict(rotary_dim=14), "rotary_dim must be a positive even"),
                      (dict(rotary_dim=6), "one factor per rotated channel pair .3., got 4"),
                      (dict(rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long,
                                          "original_max_position_embeddings": 9}), "give factor"),
                      (dict(rope_scaling={"rope_type": "longrope", "short_factor": (1.0, 0.0, 1.0, 1.0), "factor": 2.0,
                                          "long_factor": long, "original_max_position_embeddings": 9}), "positive"),
                      (dict(rope_scaling={"rope_type": "longrope", "short_factor": "abc", "factor": 2.0,
                                          "long_factor": long, "original_max_position_embeddings": 9}), "list of numbers")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(cfg, **kw)


def test_attention_layer_matches_math():
    m = _model()
    attn = m.blocks[0].attn
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 10, 32))
    pos = jnp.arange(10)
    wq, wkv, wo = (np.asarray(w.kernel[...], np.float64) for w in (attn.q, attn.kv, attn.o))
    q = (np.asarray(x, np.float64) @ wq).reshape(10, 4, 8)
    kv = (np.asarray(x, np.float64) @ wkv).reshape(10, 4, 16)
    k, v = kv[..., :8], kv[..., 8:]
    q = np.asarray(rope(jnp.asarray(q[None], jnp.float32), pos, 10000.0)[0], np.float64)
    k = np.asarray(rope(jnp.asarray(k[None], jnp.float32), pos, 10000.0)[0], np.float64)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(8)
    s = np.where(np.tril(np.ones((10, 10), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", p, v).reshape(10, 32) @ wo
    np.testing.assert_allclose(np.asarray(attn(x, pos)[0]), o, rtol=2e-4, atol=2e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="layer_types"):
        GPTConfig(layer_types=("dense",))
    with pytest.raises(ValueError, match="kv_heads"):
        GPTConfig(dim=32, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="tokens must have shape"):
        _model()(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="head_dim must be a positive even"):
        GPTConfig(head_dim=5)
    with pytest.raises(ValueError, match="qk_norm_full widens qk_norm"):
        GPTConfig(qk_norm_full=True)
    with pytest.raises(ValueError, match="needs pre_norms or post_norms"):
        GPTConfig(pre_norms=False)
    with pytest.raises(ValueError, match="rope_scaling must be a dict"):
        GPTConfig(rope_scaling=("linear",))
    with pytest.raises(ValueError, match="rope_type must be one of"):
        GPTConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling, rotary_dim and local_rope_theta need position='rope'"):
        GPTConfig(position="alibi", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="landmark models.*qk_norm"):
        LandmarkGPTConfig(qk_norm=True)
    # a dict is frozen into sorted items: configs stay hashable and compare equal however written
    a = GPTConfig(rope_scaling={"factor": 2.0, "rope_type": "linear"})
    assert a == GPTConfig(rope_scaling={"type": "linear", "factor": 2.0}) and hash(a)
    assert a.rope_scaling == (("rope_type", "linear"), ("factor", 2.0))


def test_head_dim_apart_from_dim_and_qk_norm():
    """head_dim sets the projections' widths; qk_norm RMS-normalises each head's query and key (unit RMS
    times the shared weight) before RoPE; linear RoPE scaling is RoPE at positions / factor."""
    m = _model(head_dim=24, qk_norm=True)
    attn = m.blocks[0].attn
    assert attn.q.kernel.shape == (32, 96) and attn.kv.kernel.shape == (32, 2 * 4 * 24)
    assert attn.o.kernel.shape == (96, 32) and attn.q_norm.weight.shape == (24,)
    assert m.init_cache(1, 8)[0][0].shape == (1, 8, 4, 24)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 32))
    y = attn(x, jnp.arange(6))
    attn.q.kernel[...] = 5.0 * attn.q.kernel[...]  # the query's scale is normalised away...
    np.testing.assert_allclose(attn(x, jnp.arange(6)), y, rtol=1e-5, atol=1e-6)
    attn.q_norm.weight[...] = 3.0 * attn.q_norm.weight[...]  # ...the norm's weight is not (logits x 3)
    assert not np.allclose(attn(x, jnp.arange(6)), y, atol=1e-3)
    q = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 2, 16))
    pos = jnp.arange(5) * 4
    np.testing.assert_allclose(rope(q, pos, 500.0, GPTConfig(rope_scaling={"rope_type": "linear", "factor": 4.0}).rope_scaling),
                               rope(q, pos // 4, 500.0), rtol=1e-5, atol=1e-6)


def test_power_layers_cover_full_causal_when_window_spans_sequence():
    """A PowerAttention layer whose window spans the whole sequence is exactly causal attention;
    with a short window it differs (so the sparse path really runs)."""
    import dataclasses

    full = _model()
    t = jax.random.randint(jax.random.PRNGKey(4), (1, 64), 0, 64)
    cfg = dataclasses.replace(full.cfg, layer_types=("power",), sparse_block=16, window=64, sink=16)
    wide = GPT(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(wide(t), full(t), atol=2e-5)
    narrow = GPT(dataclasses.replace(cfg, window=16, sink=0), rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(narrow(t)[:, 40:] - full(t)[:, 40:])).max() > 1e-4


def test_registry_builds_gpt_variants():
    from jaxattn.models import create_model

    m = create_model("power-gpt-tiny", rngs=nnx.Rngs(0), attn_impl="xla")
    assert [b.attn.kind for b in m.blocks] == ["power", "power", "power", "full"]
    assert m(jnp.zeros((1, 40), jnp.int32)).shape == (1, 40, 256)


def test_attention_sinks_are_learned_and_checked():
    """attn_sinks: one logit per head (zero at init) joins every softmax: the logits differ from the same
    model without it, the sinks get gradients, and a quantized (SageAttention) copy stays close."""
    t = jax.random.randint(jax.random.PRNGKey(0), (2, 24), 0, 64)
    m, plain = _model(attn_sinks=True, kv_heads=2), _model(kv_heads=2)
    assert m.blocks[0].attn.sinks[...].shape == (4,)
    assert float(jnp.abs(m(t) - plain(t)).max()) > 1e-3
    grads = nnx.grad(lambda m: jnp.mean(m(t) ** 2))(m)
    assert float(jnp.abs(grads.blocks[0].attn.sinks[...]).max()) > 0
    q = _model(attn_sinks=True, kv_heads=2, quantized=True)  # SageAttention with the sinks: close to full precision
    nnx.update(q, nnx.state(m, nnx.Param))
    assert float(jnp.abs(q(t) - m(t)).max()) < 0.05 * float(jnp.abs(m(t)).max())


GEN_CASES = {
    "full-gqa-xla": dict(kv_heads=2),
    "hybrid-xla": dict(layer_types=("power", "window", "sink", "full"), layers=4, sparse_block=16, window=32, sink=16),
    "hybrid-pallas": dict(layer_types=("power", "full"), kv_heads=1, sparse_block=16, window=32, sink=16,
                          attn_impl="pallas"),
    "alibi-gqa-pallas": dict(position="alibi", kv_heads=1, attn_impl="pallas"),
    # Qwen3-style heads wider than dim / heads with q/k norms, YaRN-scaled RoPE: cache and kernels agree
    "qknorm-headdim48-yarn-pallas": dict(head_dim=48, qk_norm=True, kv_heads=1, attn_impl="pallas", rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    # OLMo 2's post-norm blocks with whole-width q/k norms
    "olmo2-xla": dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_full=True, kv_heads=1),
    # SmolLM3's NoPE layers and Granite's multipliers through the cache
    "nope-granite-xla": dict(rope_layers=(True, False), embed_multiplier=2.0, residual_multiplier=0.5,
                             logits_divisor=3.0, attn_scale=0.2, kv_heads=1),
    # Gemma 2/3-style: soft-capped sliding-window and full layers (window on the flash / decode kernels' own
    # windows), a logit scale, post-norms, offset norms, GeGLU, scaled embeddings, local RoPE base, final cap
    "gemma-softcap-window-pallas": dict(layer_types=("window", "full"), window=8, attn_softcap=3.0, final_softcap=8.0,
                                        attn_scale=0.1, post_norms=True, norm_offset=1.0, embed_scale=True,
                                        mlp_act="gelu_tanh", qk_norm=True, local_rope_theta=100.0, kv_heads=1,
                                        attn_impl="pallas"),
    # gpt-oss-style: attention sinks on alternating sliding-window and full layers (flash and decode kernels)
    "gptoss-sinks-window-pallas": dict(layer_types=("window", "full"), window=8, attn_sinks=True, kv_heads=1,
                                       attn_impl="pallas"),
    # sinks on PowerAttention layers too (the block-sparse kernel's forward starts from them)
    "sinks-power-pallas": dict(layer_types=("power", "full"), kv_heads=1, sparse_block=16, window=32, sink=16,
                               attn_sinks=True, attn_impl="pallas"),
}


@pytest.mark.parametrize("name", sorted(GEN_CASES))
def test_generate_with_kv_cache_matches_parallel_forward(name):
    """Greedy decoding through the KV cache (decode_attention / one-row BlockMasks) gives the
    logits of the parallel forward over the generated text, past the sparse window."""
    kw = dict(GEN_CASES[name])
    impl = kw.pop("attn_impl", "xla")
    cfg = GPTConfig(vocab_size=64, dim=64, layers=kw.pop("layers", 2), heads=2, attn_impl=impl, **kw)
    m = GPT(cfg, rngs=nnx.Rngs(0))
    from jaxattn.models import generate

    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, 64)
    out, logits = generate(m, prompt, 50, temperature=0.0, return_logits=True)
    assert out.shape == (2, 71) and (out[:, :21] == prompt).all()
    full = nnx.jit(lambda m, t: m(t))(m, out[:, :-1])
    np.testing.assert_allclose(logits, full[:, 20:], atol=2e-5, rtol=1e-4)
    assert (jnp.argmax(logits, -1) == out[:, 21:]).all()


def test_cache_prefill_then_chunk_continues_the_sequence():
    """A prompt prefilled into the cache, then a 5-token chunk at offset 12, equals the
    parallel forward (multi-query decode_attention with the causal rule)."""
    m = _model(kv_heads=2)
    toks = jax.random.randint(jax.random.PRNGKey(4), (2, 17), 0, 64)
    full = nnx.jit(lambda m, t: m(t))(m, toks)  # jitted: eager op-by-op dispatch is slow on CPU
    _, cache = nnx.jit(lambda m, t: m.prefill(t, max_len=32))(m, toks[:, :12])
    logits, cache = nnx.jit(lambda m, t, c, o: m(t, cache=c, offset=o))(m, toks[:, 12:], cache,
                                                                      jnp.asarray(12, jnp.int32))
    np.testing.assert_allclose(logits, full[:, 12:], atol=2e-5, rtol=1e-4)
    assert cache[0][0].shape == (2, 32, 2, 8)
    assert (cache[0][0][:, 17:] == 0).all() and (cache[0][0][:, :17] != 0).any(axis=(2, 3)).all()


def test_generation_errors():
    from jaxattn.models import LandmarkGPT, create_model, generate

    m = _model()
    with pytest.raises(ValueError, match="max_len"):
        m.prefill(jnp.zeros((1, 9), jnp.int32), max_len=8)
    with pytest.raises(ValueError, match="init_cache"):
        m.init_cache(0, 8)
    with pytest.raises(ValueError, match="integer dtype"):
        generate(m, jnp.zeros((1, 3)), 2)
    with pytest.raises(ValueError, match="top_k"):
        generate(m, jnp.zeros((1, 3), jnp.int32), 2, top_k=65)
    lm = create_model("landmark-gpt-tiny", rngs=nnx.Rngs(0))
    assert isinstance(lm, LandmarkGPT)
    with pytest.raises(ValueError, match="no incremental decoding"):
        generate(lm, jnp.zeros((1, 3), jnp.int32), 2)


def test_alibi_position_is_linear_bias_not_rope():
    """position='alibi': ALiBi's slopes replace the rotary embedding (a different model from the
    same weights); layer kinds the kernels cannot bias raise."""
    m = _model(position="alibi")
    t = jax.random.randint(jax.random.PRNGKey(2), (1, 16), 0, 64)
    blk = m.blocks[0].attn
    assert blk.alibi_slopes().shape == (4,) and float(blk.alibi_slopes()[0]) == 0.25  # 2^(-8/4)
    rope_m = _model()
    assert not np.allclose(np.asarray(m(t)), np.asarray(rope_m(t)))
    with pytest.raises(ValueError, match="alibi"):
        GPTConfig(position="alibi", layer_types=("power", "full"))
    with pytest.raises(ValueError, match="position must be"):
        GPTConfig(position="absolute")


@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "int8"])
def test_quantized_kv_cache_generation_tracks_the_full_precision_cache(cache_dtype):
    """kv_cache_dtype: the prefill sets per-layer scales and stores the cache quantized; teacher-forced
    decode logits stay close to those of the compute-dtype cache (same weights, same tokens)."""
    kw = dict(vocab_size=64, dim=64, layers=2, heads=2, kv_heads=1, attn_impl="pallas", layer_types=("full", "window"),
              window=8)
    ref_m = GPT(GPTConfig(**kw), rngs=nnx.Rngs(0))
    q_m = GPT(GPTConfig(**kw, kv_cache_dtype=cache_dtype), rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 30), 0, 64)
    logits = {}
    for name, m in (("ref", ref_m), ("quant", q_m)):
        _, cache = nnx.jit(lambda m, t: m.prefill(t, max_len=32))(m, toks[:, :20])
        step = nnx.jit(lambda m, t, c, p: m.decode_step(t, c, p))
        out = []
        for t in range(20, 30):
            lg, cache = step(m, toks[:, t], cache, jnp.asarray(t, jnp.int32))
            out.append(lg)
        logits[name] = jnp.stack(out, 1)
        if name == "quant":
            assert cache[0][0].dtype == jnp.dtype(cache_dtype) and len(cache[0]) == 4
            assert (cache[0][2] != 1.0).all()  # scales came from the prompt
    ref, got = np.asarray(logits["ref"]), np.asarray(logits["quant"])
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05, np.linalg.norm(got - ref) / np.linalg.norm(ref)
    with pytest.raises(ValueError, match="quantized KV cache"):
        GPTConfig(kv_cache_dtype="int8", layer_types=("power", "full"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        GPTConfig(kv_cache_dtype="float16")


def test_dropout_modes_and_errors():
    """nanoGPT-style dropout (attention weights in the kernels, residual branches, embeddings) on
    full and block-sparse layers: random in train mode, off in eval mode (= the same weights without
    it), gradients finite."""
    kw = dict(vocab_size=64, dim=32, layers=2, heads=4, attn_impl="xla", layer_types=("full", "power"),
              sparse_block=16, window=16, sink=16)
    model = GPT(GPTConfig(dropout=0.2, **kw), rngs=nnx.Rngs(params=0, dropout=1))
    plain = GPT(GPTConfig(**kw), rngs=nnx.Rngs(params=0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 40), 0, 64)
    run = nnx.jit(lambda m, t: m(t))  # (jitted: eager dispatch made this test the suite's slowest)
    a, b = run(model, tokens), run(model, tokens)
    assert not np.allclose(a, b) and not np.allclose(a, run(plain, tokens))
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(model)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    model.eval()
    np.testing.assert_allclose(run(model, tokens), run(plain, tokens), atol=1e-5)
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="inference"):
        GPTConfig(dropout=0.1, quantized=True)
    from jaxattn.models import LandmarkGPTConfig

    with pytest.raises(ValueError, match="landmark attention has no dropout"):
        LandmarkGPTConfig(dropout=0.1)
    # ring attention layers keep the attention dropout, with the mask the plain layers draw
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))
    cfg = GPTConfig(dropout=0.2, vocab_size=64, dim=32, layers=1, heads=4, attn_impl="xla")
    ring, flat = (GPT(cfg, rngs=nnx.Rngs(params=0, dropout=3)) for _ in range(2))
    ring.enable_sequence_parallel(mesh)
    a_ring, a_flat = run(ring, tokens), run(flat, tokens)
    np.testing.assert_allclose(a_ring, a_flat, atol=1e-5)
    b_ring, b_flat = run(ring, tokens), run(flat, tokens)  # the next masks: again the same in both
    np.testing.assert_allclose(b_ring, b_flat, atol=1e-5)
    assert not np.allclose(a_ring, b_ring)


@pytest.mark.parametrize("kw", [
    dict(kv_heads=2),
    dict(layer_types=("full", "window"), window=6),  # window layers: the flash kernel's window with the masks
    dict(position="alibi"),
    dict(norm="layer", bias=True, mlp_gated=False, mlp_act="gelu", position="learned", max_positions=64),
    pytest.param(dict(layer_types=("window", "full"), window=6, attn_sinks=True),  # gpt-oss: sinks, per document
                 marks=pytest.mark.slow),
])
def test_packed_documents_equal_each_document_alone(kw):
    """segment_ids (runs of equal ids): each document attends within itself from position 0, so a
    packed row's logits and gradients are its documents' own (RoPE, ALiBi, learned positions)."""
    m = _model(**kw)
    toks = jax.random.randint(jax.random.PRNGKey(7), (2, 30), 0, 64)
    seg = jnp.asarray([[2] * 11 + [5] * 12 + [2] * 7, [0] * 30])
    docs = [(0, 11), (11, 23), (23, 30)]
    packed = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(m, toks, seg)
    fwd = nnx.jit(lambda m, t: m(t))  # (jitted: eager op-by-op dispatch is slow on CPU)
    np.testing.assert_allclose(packed[:1], jnp.concatenate([fwd(m, toks[:1, a:z]) for a, z in docs], 1), atol=2e-5)
    np.testing.assert_allclose(packed[1:], fwd(m, toks[1:]), atol=2e-5)
    assert float(jnp.abs(packed[:1, 11:] - fwd(m, toks[:1])[:, 11:]).max()) > 1e-3

    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(toks[:1], segment_ids=seg[:1]) ** 2)))(m)
    ref = nnx.jit(nnx.grad(lambda m: sum(jnp.sum(m(toks[:1, a:z]) ** 2) for a, z in docs)))(m)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


def test_packed_documents_on_quantized_layers():
    """quantized=True: the Sage kernels take the documents too (close to the full-precision model's packed
    logits, far from its unpacked ones)."""
    toks = jax.random.randint(jax.random.PRNGKey(8), (1, 40), 0, 64)
    seg = jnp.asarray([[0] * 17 + [1] * 23])
    plain, quant = _model(head_dim=64), _model(head_dim=64, quantized=True)
    ref = plain(toks, segment_ids=seg)
    got = quant(toks, segment_ids=seg)
    assert float(jnp.abs(got - ref).max()) < 0.05 < float(jnp.abs(ref - plain(toks)).max())


def test_packed_documents_refusals():
    toks = jnp.zeros((1, 16), jnp.int32)
    seg = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="need full or sliding-window attention layers; this model has 'power'"):
        _model(layer_types=("power",), sparse_block=16, window=32, sink=16)(toks, segment_ids=seg)
    m = _model()
    with pytest.raises(ValueError, match="without a cache"):
        m(toks, segment_ids=seg, cache=m.init_cache(1, 16))
    with pytest.raises(ValueError, match=r"segment_ids must be int \[batch, seq\] = \(1, 16\)"):
        m(toks, segment_ids=seg.astype(jnp.float32))


def test_rope_takes_per_row_positions():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 3, 8))
    pos = jnp.asarray([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    out = rope(x, pos, 10000.0)
    for b in range(2):
        np.testing.assert_allclose(out[b:b + 1], rope(x[b:b + 1], pos[b], 10000.0), atol=1e-6)


@pytest.mark.parametrize("model", [pytest.param("gpt-window-pallas", marks=pytest.mark.slow),
                                   pytest.param("gpt2-learned", marks=pytest.mark.slow), "tnl-lrpe", "gpt-recurrent"])
def test_ragged_prompts_generate_as_each_prompt_alone(model):
    """generate(prompt_lengths=...): right-padded prompts of different lengths in one batch give each
    row's tokens and logits as that prompt alone (GPT: per-row cache positions, the recurrent layers' states and
    convolution histories stopping at each row's length; TNL: pads rotated first as their own document); the
    result is prompt, new tokens, then pad_id; pads never count as seen."""
    from jaxattn.models import TNL, TNLConfig, generate

    if model == "tnl-lrpe":
        m = TNL(TNLConfig(vocab_size=64, dim=32, layers=3, heads=2, glu_dim=48, lrpe_layers=(0, 2)), rngs=nnx.Rngs(0))
    elif model == "gpt2-learned":
        m = _model(norm="layer", bias=True, mlp_gated=False, mlp_act="gelu", position="learned", max_positions=64)
    elif model == "gpt-recurrent":  # Gated DeltaNet, Kimi Delta, MiniMax's lightning and Mamba-2 layers
        m = GPT(GPTConfig(vocab_size=64, dim=32, layers=5, heads=2, layer_types=("delta", "kda", "lightning",
                                                                                  "mamba2", "full"),
                          attn_impl="xla", init_std=0.1), rngs=nnx.Rngs(0))
    else:
        m = GPT(GPTConfig(vocab_size=64, dim=64, layers=2, heads=2, layer_types=("full", "window"), window=4,
                          attn_impl="pallas"), rngs=nnx.Rngs(0))
    prompts = [[5, 9, 3, 7, 1, 2, 8], [11, 4], [6, 6, 6, 2, 9]]
    padded = jnp.asarray([p + [63] * (7 - len(p)) for p in prompts])
    lengths = [len(p) for p in prompts]
    out, logits = generate(m, padded, 6, temperature=0.0, prompt_lengths=lengths, return_logits=True, pad_id=-1,
                           repetition_penalty=1.3)
    assert out.shape == (3, 13)
    for b, p in enumerate(prompts):
        alone, ref = generate(m, jnp.asarray([p]), 6, temperature=0.0, return_logits=True, repetition_penalty=1.3)
        np.testing.assert_array_equal(out[b, :len(p) + 6], alone[0])
        assert (out[b, len(p) + 6:] == -1).all()
        np.testing.assert_allclose(logits[b], ref[0], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"prompt_lengths must be 3 ints in 1..7"):
        generate(m, padded, 2, prompt_lengths=[7, 0, 3])
    if model == "gpt2-learned":
        with pytest.raises(ValueError, match="block-sparse"):
            generate(_model(layer_types=("power",), sparse_block=16, window=32, sink=16), padded, 2,
                     prompt_lengths=lengths)
