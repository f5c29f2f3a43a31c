"""MiniMax-01 (jaxattn.models.minimax lightning layers, norm_residual blocks, jaxattn.models.minimax_hf): Hugging Face
folders load to the logits of a float64 numpy forward written from MiniMax's math in the checkpoint layout (the
lightning layers as the explicit decayed sum, MiniMax's decay schedule, the output norm and gate, GQA softmax
layers with partial RoPE, Mixtral-style experts, scaled normed residuals); the prefill and the recurrent decoding
(states for the lightning layers, a KV cache for the softmax ones) give the forward's logits on the kernels;
folders round-trip; transformers' own model agrees (when installed)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_folder, assert_close, check_causal_lm_matches_transformers, lm_grads
from jaxattn.models import hf
from jaxattn.models.gpt import GPTConfig
from jaxattn.models.minimax import minimax_slopes
from jaxattn.models.minimax_hf import config_from_hf
from test_gpt_hf import TOKENS

RAW = {"model_type": "minimax", "vocab_size": 80, "hidden_size": 48, "intermediate_size": 24, "num_hidden_layers": 4,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12, "rms_norm_eps": 1e-5,
       "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 10000.0, "block_size": 4,
       "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
       "full_attn_alpha_factor": 1.7, "full_attn_beta_factor": 0.9, "linear_attn_alpha_factor": 1.3,
       "linear_attn_beta_factor": 1.1, "mlp_alpha_factor": 1.5, "mlp_beta_factor": 0.8, "tie_word_embeddings": False}
# the original config's names and partial RoPE (8 of the 12 channels)
ORIGINAL = {**{k: v for k, v in RAW.items() if k != "layer_types" and not k.endswith("factor")},
            "attn_type_list": [0, 1, 0, 0], "rotary_dim": 8, "postnorm": True,
            "layernorm_full_attention_alpha": 1.7, "layernorm_full_attention_beta": 0.9,
            "layernorm_linear_attention_alpha": 1.3, "layernorm_linear_attention_beta": 1.1,
            "layernorm_mlp_alpha": 1.5, "layernorm_mlp_beta": 0.8}


def random_state_dict(raw, seed=0):
    rng = np.random.default_rng(seed)
    d, h, kv, hd = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]
    f, v, e = raw["intermediate_size"], raw["vocab_size"], raw["num_local_experts"]

    def w(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(v, d, s=1.0), "model.norm.weight": 1 + w(d, s=0.1), "lm_head.weight": w(v, d)}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sd.update({p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
                   p + "block_sparse_moe.gate.weight": w(e, d, s=1.0)})
        if _kinds(raw)[i] == "lightning":
            sd.update({a + "qkv_proj.weight": w(3 * h * hd, d), a + "output_gate.weight": w(h * hd, d),
                       a + "out_proj.weight": w(d, h * hd), a + "norm.weight": 1 + w(h * hd, s=0.1)})
        else:
            sd.update({a + "q_proj.weight": w(h * hd, d), a + "k_proj.weight": w(kv * hd, d),
                       a + "v_proj.weight": w(kv * hd, d), a + "o_proj.weight": w(d, h * hd)})
        for j in range(e):
            x = f"{p}block_sparse_moe.experts.{j}."
            sd.update({x + "w1.weight": w(f, d), x + "w3.weight": w(f, d), x + "w2.weight": w(d, f)})
    return sd


def _kinds(raw):
    if "layer_types" in raw:
        return ["lightning" if t == "linear_attention" else "full" for t in raw["layer_types"]]
    return ["full" if t else "lightning" for t in raw["attn_type_list"]]


def reference_logits(sd, raw, tokens):
    """float64 numpy forward of MiniMax-01 from the checkpoint's layout."""
    W = {k: np.asarray(x, np.float64) for k, x in sd.items()}
    h, kv, hd, eps = raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"], raw["rms_norm_eps"]
    layers, (b, n) = raw["num_hidden_layers"], tokens.shape
    scales = [raw.get(k, raw.get(o)) for k, o in (("full_attn_alpha_factor", "layernorm_full_attention_alpha"),
                                                 ("full_attn_beta_factor", "layernorm_full_attention_beta"),
                                                 ("linear_attn_alpha_factor", "layernorm_linear_attention_alpha"),
                                                 ("linear_attn_beta_factor", "layernorm_linear_attention_beta"),
                                                 ("mlp_alpha_factor", "layernorm_mlp_alpha"),
                                                 ("mlp_beta_factor", "layernorm_mlp_beta"))]
    rot = raw.get("rotary_dim") or hd
    inv = raw["rope_theta"] ** (-np.arange(0, rot, 2) / rot)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def norm(x, w, e=eps):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + e)

    def lin(x, name):
        return x @ W[name + ".weight"].T

    def silu(x):
        return x / (1 + np.exp(-x))

    def rotate(x):  # [b, heads, n, hd]: the first `rot` channels, halves
        r, rest = x[..., :rot], x[..., rot:]
        r1, r2 = r[..., : rot // 2], r[..., rot // 2:]
        return np.concatenate([r * cos + np.concatenate([-r2, r1], -1) * sin, rest], -1)

    x = W["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((n, n), bool))
    dist = np.arange(n)[:, None] - np.arange(n)[None, :]
    for i, kind in enumerate(_kinds(raw)):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        y = norm(x, W[p + "input_layernorm.weight"])
        if kind == "lightning":
            qkv = silu(lin(y, a + "qkv_proj")).reshape(b, n, h, 3 * hd)
            q, k, v = (t.transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
            s = minimax_slopes(h, i, layers).astype(np.float64)  # (the formula, checked below by hand)
            decay = np.where(causal, np.exp(-s[:, None, None] * np.maximum(dist, 0)), 0.0)  # [h, n, n]
            o = ((q @ k.transpose(0, 1, 3, 2)) * decay) @ v
            o = norm(o.transpose(0, 2, 1, 3).reshape(b, n, h * hd), W[a + "norm.weight"], 1e-6)
            out = lin(o / (1 + np.exp(-lin(y, a + "output_gate"))), a + "out_proj")
            alpha, beta = scales[2], scales[3]
        else:
            q = rotate(lin(y, a + "q_proj").reshape(b, n, h, hd).transpose(0, 2, 1, 3))
            k = rotate(lin(y, a + "k_proj").reshape(b, n, kv, hd).transpose(0, 2, 1, 3))
            v = lin(y, a + "v_proj").reshape(b, n, kv, hd).transpose(0, 2, 1, 3)
            k, v = np.repeat(k, h // kv, 1), np.repeat(v, h // kv, 1)
            s_ = np.where(causal, q @ k.transpose(0, 1, 3, 2) * hd ** -0.5, -np.inf)
            pr = np.exp(s_ - s_.max(-1, keepdims=True))
            o = (pr / pr.sum(-1, keepdims=True)) @ v
            out = lin(o.transpose(0, 2, 1, 3).reshape(b, n, h * hd), a + "o_proj")
            alpha, beta = scales[0], scales[1]
        x = alpha * y + beta * out  # (the residual is the normed input)
        y = norm(x, W[p + "post_attention_layernorm.weight"])
        logits = lin(y, p + "block_sparse_moe.gate")
        moe = np.zeros_like(y)
        for t in np.ndindex(b, n):
            z = np.exp(logits[t] - logits[t].max())
            probs = z / z.sum()
            top = np.argsort(-probs, kind="stable")[: raw["num_experts_per_tok"]]
            for j, wj in zip(top, probs[top] / probs[top].sum()):
                e = f"{p}block_sparse_moe.experts.{j}."
                moe[t] += wj * lin(silu(lin(y[t], e + "w1")) * lin(y[t], e + "w3"), e + "w2")
        x = scales[4] * y + scales[5] * moe
    return lin(norm(x, W["model.norm.weight"]), "lm_head")


def test_decay_schedule_by_hand():
    # base 2^(-8/4) = 1/4; layer 1 of 4: factor 1 - 1/(3 + 1e-5) + 1e-5
    f = 1 - 1 / (3 + 1e-5) + 1e-5
    np.testing.assert_allclose(minimax_slopes(4, 1, 4), [f / 4, f / 16, f / 64, f / 256], rtol=1e-6)


@pytest.mark.parametrize("raw", [RAW, ORIGINAL], ids=["transformers-config", "original-config-partial-rope"])
def test_folder_gives_the_reference_logits_and_round_trips(tmp_path, raw):
    sd = random_state_dict(raw, seed=1)
    model = hf.load_pretrained(hf_folder(tmp_path / "in", raw, sd), attn_impl="xla")
    assert [type(b.attn).__name__ for b in model.blocks] == ["LightningLayer", "Attention", "LightningLayer",
                                                             "LightningLayer"]
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, raw, TOKENS), jnp.float32, "logits", tol=tol)
    hf.save_pretrained(model, tmp_path / "out")
    back = hf.read_state_dict(tmp_path / "out")
    assert set(back) == set(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    again = hf.load_pretrained(tmp_path / "out", attn_impl="xla")
    assert again.cfg == model.cfg
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))


@pytest.mark.parametrize("impl", ["pallas", pytest.param("xla", marks=pytest.mark.slow)])
def test_recurrent_decoding_gives_the_forward(tmp_path, impl):
    """Prefill (Lightning kernel with its final state, flash for the softmax layer), then one token at a time:
    the lightning layers from their states, the softmax layer from its KV cache; a ragged prefill's short row as
    that prompt alone."""
    raw = {**RAW, "head_dim": 32, "hidden_size": 64}  # (the kernels' widths)
    model = hf.load_pretrained(hf_folder(tmp_path, raw, random_state_dict(raw, seed=2)), attn_impl=impl)
    tokens = jnp.asarray(TOKENS)
    full = model(tokens)
    logits, cache = model.prefill(tokens[:, :6], max_len=13)
    step = nnx.jit(lambda m, *a: m.decode_step(*a))  # (one compiled step for every token)
    assert cache[0][0].shape == (2, 4, 32, 32) and cache[1][0].shape == (2, 13, 2, 32)
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(logits, full[:, 5], jnp.float32, "prefill", tol=tol)
    for t in range(6, 13):
        logits, cache = step(model, tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=tol)
    # a ragged prefill: row 1's prompt is its first 4 tokens (the lightning layers' pads neither decay nor write)
    logits, _ = model.prefill(tokens[:, :6], max_len=13, lengths=jnp.asarray([6, 4]))
    alone, _ = model.prefill(tokens[1:, :4], max_len=13)
    assert_close(logits[1], alone[0], jnp.float32, "ragged prefill", tol=tol)


def test_training_step_and_bad_configs():
    loss, grads = lm_grads("minimax-tiny", layers=2)
    assert np.isfinite(float(loss))
    attn = grads.blocks[0].attn
    for g in (attn.qkv.kernel, attn.gate.kernel, attn.out.kernel, attn.norm.weight):
        assert np.abs(np.asarray(g[...])).max() > 0
    assert "slope" not in nnx.to_pure_dict(grads)["blocks"][0]["attn"]  # (fixed, not trained)
    for raw, match in [({**RAW, "sliding_window": 8}, "sliding_window"), ({**ORIGINAL, "postnorm": False}, "postnorm"),
                       ({**RAW, "layer_types": ["linear_attention"] * 3}, "layer_types")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf(raw)
    for fields, match in [(dict(residual_scales=(1.0,) * 6), "residual_scales"),
                          (dict(norm_residual=True, post_norms=True), "norm_residual"),
                          (dict(layer_types=("linear",)), "layer_types")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**fields)


def test_matches_transformers(tmp_path):
    """transformers' MiniMaxForCausalLM with random weights, saved by transformers: our logits and greedy tokens
    are theirs."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in RAW.items() if k not in ("model_type", "rope_theta")}
    config = transformers.MiniMaxConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": RAW["rope_theta"]})
    check_causal_lm_matches_transformers(tmp_path, transformers.MiniMaxForCausalLM(config), TOKENS)
