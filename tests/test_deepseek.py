"""DeepSeek-V2 / V3 (jaxattn.models.mla + DeepSeek routing, jaxattn.models.deepseek_hf): Hugging Face folders load
to the logits of a float64 numpy forward written from DeepSeek's math in the checkpoint layout (interleaved RoPE
pairs, MLA, softmax / group-limited / sigmoid routing with the selection bias, shared experts, dense first layers,
YaRN's mscale on the softmax scale); the latent cache's absorbed decoding gives the forward's logits; folders
round-trip; FP8 block-scaled weights dequantize; the multi-token-prediction layers are skipped; transformers'
own models agree (when installed)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_folder, assert_close, check_causal_lm_matches_transformers, lm_grads
from jaxattn.models import hf
from jaxattn.models.deepseek_hf import FP8BlockStateDict, config_from_hf, export_state_dict, prepare_state_dict
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.mla import MLAttention
from jaxattn.pallas.decode import latent_kernel_ok
from test_gpt_hf import TOKENS, scaled_inv_freq

_BASE = {"vocab_size": 80, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "kv_lora_rank": 24, "qk_nope_head_dim": 12,
         "qk_rope_head_dim": 8, "v_head_dim": 10, "moe_intermediate_size": 16, "n_shared_experts": 2,
         "num_experts_per_tok": 3, "first_k_dense_replace": 1, "tie_word_embeddings": False, "rope_theta": 10000.0,
         "max_position_embeddings": 64, "hidden_act": "silu"}
# V2: no query bottleneck, 8 experts, group-limited greedy softmax routing, weights not renormalized, YaRN with mscale
V2 = {**_BASE, "model_type": "deepseek_v2", "q_lora_rank": None, "n_routed_experts": 8, "topk_method": "group_limited_greedy",
      "n_group": 4, "topk_group": 2, "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
      "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32,
                       "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
# V3: a query bottleneck, sigmoid routing with the selection bias over groups, renormalized, scaled by 2.5
V3 = {**_BASE, "model_type": "deepseek_v3", "q_lora_rank": 20, "n_routed_experts": 8, "topk_method": "noaux_tc",
      "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
      "rope_interleave": True}


def random_state_dict(raw, seed=0, mtp_layer=False):
    rng = np.random.default_rng(seed)
    d, h, v = raw["hidden_size"], raw["num_attention_heads"], raw["vocab_size"]
    nope, rot, vd, rank = raw["qk_nope_head_dim"], raw["qk_rope_head_dim"], raw["v_head_dim"], raw["kv_lora_rank"]

    def w(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(v, d, s=1.0), "model.norm.weight": 1 + w(d, s=0.1), "lm_head.weight": w(v, d)}
    for i in range(raw["num_hidden_layers"] + int(mtp_layer)):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sd.update({p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
                   a + "kv_a_proj_with_mqa.weight": w(rank + rot, d), a + "kv_a_layernorm.weight": 1 + w(rank, s=0.1),
                   a + "kv_b_proj.weight": w(h * (nope + vd), rank), a + "o_proj.weight": w(d, h * vd)})
        if raw["q_lora_rank"]:
            q = raw["q_lora_rank"]
            sd.update({a + "q_a_proj.weight": w(q, d), a + "q_a_layernorm.weight": 1 + w(q, s=0.1),
                       a + "q_b_proj.weight": w(h * (nope + rot), q)})
        else:
            sd[a + "q_proj.weight"] = w(h * (nope + rot), d)
        m = p + "mlp."
        if i < raw["first_k_dense_replace"]:
            f = raw["intermediate_size"]
            sd.update({m + "gate_proj.weight": w(f, d), m + "up_proj.weight": w(f, d), m + "down_proj.weight": w(d, f)})
            continue
        f, fs = raw["moe_intermediate_size"], raw["moe_intermediate_size"] * raw["n_shared_experts"]
        sd[m + "gate.weight"] = w(raw["n_routed_experts"], d, s=1.0)
        if raw["model_type"] == "deepseek_v3":
            sd[m + "gate.e_score_correction_bias"] = w(raw["n_routed_experts"], s=0.5)
        for j in range(raw["n_routed_experts"]):
            e = f"{m}experts.{j}."
            sd.update({e + "gate_proj.weight": w(f, d), e + "up_proj.weight": w(f, d), e + "down_proj.weight": w(d, f)})
        s = m + "shared_experts."
        sd.update({s + "gate_proj.weight": w(fs, d), s + "up_proj.weight": w(fs, d), s + "down_proj.weight": w(d, fs)})
    return sd


def reference_logits(sd, raw, tokens):
    """float64 numpy forward of DeepSeek-V2 / V3 from the checkpoint's own layout."""
    W = {k: np.asarray(x, np.float64) for k, x in sd.items()}
    h, eps = raw["num_attention_heads"], raw["rms_norm_eps"]
    nope, rot, vd, rank = raw["qk_nope_head_dim"], raw["qk_rope_head_dim"], raw["v_head_dim"], raw["kv_lora_rank"]
    b, n = tokens.shape
    v3 = raw["model_type"] == "deepseek_v3"
    rope = raw.get("rope_scaling") or {}
    scale = (nope + rot) ** -0.5
    factor = 1.0
    if rope:  # YaRN: cos/sin times mscale(mscale) / mscale(mscale_all_dim); the softmax scale times mscale_all_dim's ^2
        def ms(m):
            return 0.1 * m * math.log(rope["factor"]) + 1.0

        factor = ms(rope["mscale"]) / ms(rope["mscale_all_dim"])
        scale *= ms(rope["mscale_all_dim"]) ** 2
    inv_freq = scaled_inv_freq({**raw, "rope_scaling": {**rope, "type": rope.get("type", "default")}} if rope else raw, rot)[0]
    ang = np.arange(n)[:, None] * inv_freq[None]
    cos, sin = np.cos(ang) * factor, np.sin(ang) * factor

    def rotate(x):  # interleaved pairs (x0, x1), (x2, x3): each pair a complex number times e^(i angle)
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
        return out

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

    def lin(x, name):
        return x @ W[name + ".weight"].T

    def silu(x):
        return x / (1 + np.exp(-x))

    def mlp(x, p):
        return lin(silu(lin(x, p + "gate_proj")) * lin(x, p + "up_proj"), p + "down_proj")

    def moe(y, p):
        e, k = raw["n_routed_experts"], raw["num_experts_per_tok"]
        groups, top_groups = raw["n_group"], raw["topk_group"]
        logits = lin(y, p + "gate")
        out = np.zeros_like(y)
        for t in np.ndindex(*y.shape[:2]):
            if v3:
                scores = 1 / (1 + np.exp(-logits[t]))
                choice = scores + W[p + "gate.e_score_correction_bias"]
                group_score = np.sort(choice.reshape(groups, -1), axis=-1)[:, -2:].sum(-1)
            else:
                z = np.exp(logits[t] - logits[t].max())
                scores = choice = z / z.sum()
                group_score = choice.reshape(groups, -1).max(-1)
            kept = np.argsort(-group_score, kind="stable")[:top_groups]
            allowed = np.repeat(np.isin(np.arange(groups), kept), e // groups)
            top = np.argsort(-np.where(allowed, choice, -np.inf), kind="stable")[:k]
            weights = scores[top]
            if raw["norm_topk_prob"]:
                weights = weights / (weights.sum() + 1e-20)
            weights = weights * raw["routed_scaling_factor"]
            for j, wj in zip(top, weights):
                out[t] += wj * mlp(y[t], f"{p}experts.{j}.")
        return out + mlp(y, p + "shared_experts.")

    x = W["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        y = norm(x, W[p + "input_layernorm.weight"])
        q = lin(norm(lin(y, a + "q_a_proj"), W[a + "q_a_layernorm.weight"]), a + "q_b_proj") if raw["q_lora_rank"] \
            else lin(y, a + "q_proj")
        q = q.reshape(b, n, h, nope + rot).transpose(0, 2, 1, 3)
        q_nope, q_pe = q[..., :nope], rotate(q[..., nope:])
        ckv = lin(y, a + "kv_a_proj_with_mqa")
        c, k_pe = norm(ckv[..., :rank], W[a + "kv_a_layernorm.weight"]), rotate(ckv[..., rank:])[:, None]
        kv = lin(c, a + "kv_b_proj").reshape(b, n, h, nope + vd).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        s = (q_nope @ k_nope.transpose(0, 1, 3, 2) + q_pe @ k_pe.transpose(0, 1, 3, 2)) * scale
        s = np.where(causal, s, -np.inf)
        p_ = np.exp(s - s.max(-1, keepdims=True))
        o = (p_ / p_.sum(-1, keepdims=True)) @ v  # [b, h, n, vd]
        x = x + lin(o.transpose(0, 2, 1, 3).reshape(b, n, h * vd), a + "o_proj")
        y = norm(x, W[p + "post_attention_layernorm.weight"])
        x = x + (mlp(y, p + "mlp.") if i < raw["first_k_dense_replace"] else moe(y, p + "mlp."))
    return lin(norm(x, W["model.norm.weight"]), "lm_head")


@pytest.mark.parametrize("raw", [V2, V3], ids=["v2-yarn-grouped-softmax", "v3-qlora-sigmoid-bias"])
def test_folder_gives_the_reference_logits_and_round_trips(tmp_path, raw):
    sd = random_state_dict(raw, seed=1, mtp_layer=raw is V3)  # (V3: an extra multi-token-prediction layer, skipped)
    model = hf.load_pretrained(hf_folder(tmp_path / "in", raw, sd), attn_impl="xla")
    cfg = model.cfg
    assert isinstance(model.blocks[0].attn, MLAttention) and cfg.kv_lora_rank == 24
    assert not hasattr(model.blocks[0].mlp, "router") and hasattr(model.blocks[1].mlp, "router")
    want = reference_logits(sd, raw, TOKENS)
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(model(jnp.asarray(TOKENS)), want, jnp.float32, "logits", tol=tol)
    hf.save_pretrained(model, tmp_path / "out")
    back = hf.read_state_dict(tmp_path / "out")
    for key, value in back.items():  # (the RoPE rows back in the checkpoint's interleaved order)
        np.testing.assert_allclose(value, sd[key], rtol=0, atol=0, err_msg=key)
    assert set(back) == {k for k in sd if not k.startswith(f"model.layers.{raw['num_hidden_layers']}.")}
    again = hf.load_pretrained(tmp_path / "out", attn_impl="xla")
    assert again.cfg == cfg
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))


@pytest.mark.parametrize("impl", ["pallas", pytest.param("xla", marks=pytest.mark.slow)])
def test_latent_cache_decoding_gives_the_forward(tmp_path, impl):
    """Prefill (the expanded heads, on the flash kernel) then absorbed decoding against the latent cache (the
    decode kernel's latent mode: a 32-wide latent and 16-wide RoPE keys), per-row positions too."""
    raw = {**V3, "qk_nope_head_dim": 24, "qk_rope_head_dim": 16, "v_head_dim": 32, "kv_lora_rank": 32}
    assert latent_kernel_ok(32 + 16, 32)
    model = hf.load_pretrained(hf_folder(tmp_path, raw, random_state_dict(raw, seed=2)), attn_impl=impl)
    tokens = jnp.asarray(TOKENS)
    full = model(tokens)
    logits, cache = model.prefill(tokens[:, :7], max_len=13)
    step = nnx.jit(lambda m, *a: m.decode_step(*a))  # (one compiled step for every token)
    assert cache[0][0].shape == (2, 13, 1, 32 + 16)
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(logits, full[:, 6], jnp.float32, "prefill", tol=tol)
    for t in range(7, 13):
        pos = jnp.asarray([t, t], jnp.int32) if t % 2 else jnp.asarray(t, jnp.int32)
        logits, cache = step(model, tokens[:, t], cache, pos)
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=tol)


def test_training_step_and_generation():
    from jaxattn.models import create_model, generate

    loss, grads = lm_grads("deepseek-tiny", layers=2)
    assert np.isfinite(float(loss))
    attn = grads.blocks[1].attn
    for g in (attn.kv_a.kernel, attn.kv_b.kernel, attn.q_b.kernel, grads.blocks[1].mlp.router.kernel):
        assert np.abs(np.asarray(g[...])).max() > 0
    assert "score_bias" not in nnx.to_pure_dict(grads)["blocks"][1]["mlp"]  # (a buffer, not trained)
    model = create_model("deepseek-tiny", rngs=nnx.Rngs(0), attn_impl="xla", layers=2)
    assert isinstance(model.blocks[0].attn, MLAttention)
    out = generate(model, jnp.asarray([[1, 2, 3]]), max_new_tokens=4, temperature=0.0)
    assert out.shape == (1, 7)


def test_auxiliary_loss_free_balancing_moves_the_bias_in_train_mode_only():
    """DeepSeek-V3's balancing: each training forward adds rate * sign(mean load - load_i) to expert i's selection
    bias (no gradient); eval mode leaves it; the LM trainer carries it from step to step."""
    from jaxattn.models import create_model
    from jaxattn.models.moe import MoE
    from jaxattn.train.lm import LMConfig, Trainer, get_batch

    m = MoE(16, 32, 8, 2, scoring="sigmoid", score_bias=True, bias_update_rate=0.01, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (40, 16))
    _, experts, _ = m.route(x)
    load = np.bincount(np.asarray(experts).ravel(), minlength=8)
    m(x)
    np.testing.assert_array_equal(np.asarray(m.score_bias[...]), 0.0)  # (eval mode: unchanged)
    m.train()
    m(x)
    np.testing.assert_allclose(np.asarray(m.score_bias[...]), 0.01 * np.sign(load.mean() - load), rtol=1e-6)
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoE(16, 32, 8, 2, bias_update_rate=0.01, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="moe_bias_update_rate"):
        GPTConfig(moe_experts=8, moe_bias_update_rate=0.1)

    toks = np.frombuffer(bytes(range(256)) * 20, np.uint8).astype(np.int32)
    factory = lambda rngs: create_model("deepseek-tiny", rngs=rngs, layers=2, attn_impl="xla")  # noqa: E731
    t = Trainer(LMConfig(seq_len=32, batch_size=4, warmup=1, steps=3), factory)
    for s in range(2):
        t.step(get_batch(toks, seed=0, step=s, batch=4, seq_len=32))
    bias = np.asarray(t.model.blocks[1].mlp.score_bias[...])
    assert np.abs(bias).max() > 0 and np.allclose(bias * 1000, np.round(bias * 1000), atol=1e-3)  # (steps of 0.001)


@pytest.mark.slow  # (quantizing on load: test_mxfp4's Mixtral folder)
def test_folder_with_experts_quantized_to_mxfp4_on_load(tmp_path):
    """moe_format='mxfp4': the routed experts quantized tensor by tensor as they load (the shared experts, dense
    layers and attention stay float); the logits follow the float model's within MXFP4's rounding."""
    from jaxattn.models.moe import MXFP4Weight
    from jaxattn.ops.mxfp4 import MXFP4, dequantize, quantize_mxfp4

    raw = {**V3, "hidden_size": 64, "moe_intermediate_size": 32}  # (MXFP4 groups of 32 along each input)
    folder = hf_folder(tmp_path, raw, random_state_dict(raw, seed=4))
    packed = hf.load_pretrained(folder, attn_impl="xla", moe_format="mxfp4")
    plain = hf.load_pretrained(folder, attn_impl="xla")
    mlp = packed.blocks[1].mlp
    assert isinstance(mlp.gate_up, MXFP4Weight) and not isinstance(mlp.shared_gate_up.kernel, MXFP4Weight)
    np.testing.assert_array_equal(np.asarray(mlp.down[...]), np.asarray(quantize_mxfp4(plain.blocks[1].mlp.down[...]).packed))
    for a, b in zip(packed.blocks[1:], plain.blocks[1:]):  # the dequantized experts in the float model: the same logits
        b.mlp.gate_up[...] = dequantize(MXFP4(a.mlp.gate_up[...]))
        b.mlp.down[...] = dequantize(MXFP4(a.mlp.down[...]))
    assert_close(packed(jnp.asarray(TOKENS)), plain(jnp.asarray(TOKENS)), jnp.float32, "logits",
                 tol={jnp.dtype(jnp.float32): (1e-5, 1e-5)})


def test_fp8_block_scaled_weights_dequantize_as_read():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    q = w.astype(jnp.float8_e4m3fn)
    scale = np.asarray([[2.0, 0.5], [4.0, 1.0], [0.25, 8.0]], np.float32)  # blocks of 2 x 4
    view = FP8BlockStateDict({"a.weight": np.asarray(q), "a.weight_scale_inv": scale, "b": w}, block=(2, 4))
    assert sorted(view) == ["a.weight", "b"]
    want = np.asarray(q).astype(np.float32) * np.repeat(np.repeat(scale, 2, 0)[:5], 4, 1)[:, :7]
    np.testing.assert_array_equal(view["a.weight"], want)
    assert view["a.weight"][4, 6] == float(np.asarray(q)[4, 6].astype(np.float32)) * 8.0
    with pytest.raises(KeyError):
        view["a.weight_scale_inv"]
    bad = FP8BlockStateDict({"a.weight": np.asarray(q), "a.weight_scale_inv": scale[:2]}, block=(2, 4))
    with pytest.raises(ValueError, match="one scale per 2 x 4 block"):
        bad["a.weight"]


def test_rope_rows_reorder_and_restore():
    sd = random_state_dict(V2, seed=3)
    view = prepare_state_dict(V2, sd)
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    np.testing.assert_array_equal(view[key][:24], sd[key][:24])  # the latent rows untouched
    np.testing.assert_array_equal(view[key][24:], sd[key][24:][[0, 2, 4, 6, 1, 3, 5, 7]])
    back = export_state_dict(V2, {k: np.asarray(view[k]) for k in view})
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_bad_configs():
    for raw, match in [({**V3, "topk_method": "greedy"}, "topk_method"), ({**V2, "scoring_func": "sigmoid"}, "scoring_func"),
                       ({**V2, "attention_bias": True}, "attention_bias"), ({**V2, "moe_layer_freq": 2}, "moe_layer_freq")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf(raw)
    for fields, match in [(dict(layer_types=("window",)), "layer_types"), (dict(qk_norm=True), "qk_norm"),
                          (dict(kv_cache_dtype="int8"), "kv_cache_dtype"), (dict(kv_heads=2), "kv_heads")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(dim=32, heads=4, kv_lora_rank=16, **fields)
    with pytest.raises(ValueError, match="moe_groups"):
        GPTConfig(moe_experts=6, moe_groups=4)
    model = GPT(GPTConfig(dim=32, heads=4, layers=1, kv_lora_rank=16, qk_rope_dim=8), rngs=nnx.Rngs(0))
    from jax.sharding import Mesh

    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 7
    plain = model(tokens)
    model.enable_sequence_parallel(Mesh(np.array(jax.devices()[:1]), ("seq",)), "seq")  # (ring attention: 1 shard)
    np.testing.assert_allclose(model(tokens), plain, rtol=1e-5, atol=1e-5)  # (4 shards: tests/test_gated_delta_sp.py)


@pytest.mark.parametrize("raw", [V2, V3], ids=["v2", "v3"])
def test_matches_transformers(tmp_path, raw):
    """transformers' DeepseekV2/V3ForCausalLM with random weights, saved by transformers: our logits and greedy
    tokens are theirs."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cls = {"deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
           "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[raw["model_type"]]
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "rope_scaling")}
    if "rope_scaling" in raw:
        fields["rope_parameters"] = {**{k: v for k, v in raw["rope_scaling"].items() if k != "type"},
                                     "rope_type": "yarn", "rope_theta": raw["rope_theta"]}
    check_causal_lm_matches_transformers(tmp_path, cls[1](cls[0](**fields)), TOKENS)
