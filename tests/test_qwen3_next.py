"""Qwen3-Next and Qwen3.5 (jaxattn.models.qwen3_next_hf; GPT with Gated DeltaNet layers whose q / k heads are shared by two value
heads, gated softmax attention, zero-centred RMSNorms, partial RoPE, Qwen2-MoE-style experts): Hugging Face folders
load to the logits of a float64 numpy forward written from Qwen3-Next's math in the checkpoint layout (the fused
in_proj_qkvz / in_proj_ba per key head, the depthwise convolution, the delta rule token by token, the gated
RMSNorm, the query / gate rows of q_proj, 1 + w norms, routed and shared experts); folders round-trip byte for byte;
prefill then recurrent decoding gives the forward's logits on the kernels; training reaches the new parameters;
transformers' own model agrees (when installed)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_folder, assert_close, check_causal_lm_matches_transformers, lm_grads
from jaxattn.models import create_model, hf
from jaxattn.models.qwen3_next_hf import config_from_hf, hf_config
from test_gpt_hf import TOKENS

RAW = {"model_type": "qwen3_next", "vocab_size": 80, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 4,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
       "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "linear_conv_kernel_dim": 3, "linear_key_head_dim": 8,
       "linear_value_head_dim": 12, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "num_experts": 4,
       "num_experts_per_tok": 2, "moe_intermediate_size": 12, "shared_expert_intermediate_size": 16,
       "norm_topk_prob": True, "full_attention_interval": 2, "tie_word_embeddings": False}
# Qwen3.5's dense text model: in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, explicit layer types, multimodal RoPE
# parameters (plain RoPE on text); QWEN3_5 is the multimodal folder's config around it
DENSE = {**{k: v for k, v in RAW.items() if k not in ("num_experts", "full_attention_interval", "rope_theta",
                                                     "partial_rotary_factor", "model_type")},
         "model_type": "qwen3_5_text", "layer_types": ["linear_attention", "linear_attention", "full_attention",
                                                       "linear_attention"],
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [1, 1, 2], "mrope_interleaved": True}}
QWEN3_5 = {"model_type": "qwen3_5", "text_config": {k: v for k, v in DENSE.items() if k != "tie_word_embeddings"},
           "vision_config": {"depth": 2}, "tie_word_embeddings": False}


def _kinds(raw):
    if "layer_types" in raw:
        return ["delta" if t == "linear_attention" else "full" for t in raw["layer_types"]]
    return ["full" if (i + 1) % raw["full_attention_interval"] == 0 else "delta" for i in range(raw["num_hidden_layers"])]


def random_state_dict(raw, seed=0):
    rng = np.random.default_rng(seed)
    d, h, kv, hd = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]
    hv, hk = raw["linear_num_value_heads"], raw["linear_num_key_heads"]
    dk, dv, taps = raw["linear_key_head_dim"], raw["linear_value_head_dim"], raw["linear_conv_kernel_dim"]

    def w(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(raw["vocab_size"], d, s=1.0), "model.norm.weight": w(d, s=0.1),
          "lm_head.weight": w(raw["vocab_size"], d), "mtp.fc.weight": w(d, 2 * d)}  # (mtp.*: not read)
    for i, kind in enumerate(_kinds(raw)):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": w(d, s=0.1), p + "post_attention_layernorm.weight": w(d, s=0.1)})
        if kind == "delta" and raw["model_type"].startswith("qwen3_5"):
            a = p + "linear_attn."
            sd.update({a + "in_proj_qkv.weight": w(2 * hk * dk + hv * dv, d), a + "in_proj_z.weight": w(hv * dv, d),
                       a + "in_proj_b.weight": w(hv, d), a + "in_proj_a.weight": w(hv, d),
                       a + "conv1d.weight": w(2 * hk * dk + hv * dv, 1, taps, s=0.5), a + "A_log": w(hv, s=0.5),
                       a + "dt_bias": w(hv, s=0.5), a + "norm.weight": 1 + w(dv, s=0.1),
                       a + "out_proj.weight": w(d, hv * dv)})
        elif kind == "delta":
            a = p + "linear_attn."
            sd.update({a + "in_proj_qkvz.weight": w(2 * hk * dk + 2 * hv * dv, d), a + "in_proj_ba.weight": w(2 * hv, d),
                       a + "conv1d.weight": w(2 * hk * dk + hv * dv, 1, taps, s=0.5), a + "A_log": w(hv, s=0.5),
                       a + "dt_bias": w(hv, s=0.5), a + "norm.weight": 1 + w(dv, s=0.1),
                       a + "out_proj.weight": w(d, hv * dv)})
        else:
            a = p + "self_attn."
            sd.update({a + "q_proj.weight": w(2 * h * hd, d), a + "k_proj.weight": w(kv * hd, d),
                       a + "v_proj.weight": w(kv * hd, d), a + "o_proj.weight": w(d, h * hd),
                       a + "q_norm.weight": w(hd, s=0.1), a + "k_norm.weight": w(hd, s=0.1)})
        m = p + "mlp."
        if raw.get("num_experts"):
            e, f, fs = raw["num_experts"], raw["moe_intermediate_size"], raw["shared_expert_intermediate_size"]
            sd.update({m + "gate.weight": w(e, d, s=1.0), m + "shared_expert_gate.weight": w(1, d),
                       m + "shared_expert.gate_proj.weight": w(fs, d), m + "shared_expert.up_proj.weight": w(fs, d),
                       m + "shared_expert.down_proj.weight": w(d, fs)})
            for j in range(e):
                x = f"{m}experts.{j}."
                sd.update({x + "gate_proj.weight": w(f, d), x + "up_proj.weight": w(f, d), x + "down_proj.weight": w(d, f)})
        else:
            f = raw["intermediate_size"]
            sd.update({m + "gate_proj.weight": w(f, d), m + "up_proj.weight": w(f, d), m + "down_proj.weight": w(d, f)})
    return sd


def _rms(x, w, eps, offset):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (offset + w)


def _silu(x):
    return x / (1 + np.exp(-x))


def reference_logits(sd, raw, tokens):
    """float64 numpy forward of Qwen3-Next from the checkpoint's layout."""
    W = {k: np.asarray(x, np.float64) for k, x in sd.items()}
    eps = raw["rms_norm_eps"]
    h, kv, hd = raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]
    hv, hk = raw["linear_num_value_heads"], raw["linear_num_key_heads"]
    dk, dv, r = raw["linear_key_head_dim"], raw["linear_value_head_dim"], hv // hk
    tokens = np.asarray(tokens)
    b, n = tokens.shape
    x = W["model.embed_tokens.weight"][tokens]
    rope_params = raw.get("rope_parameters") or raw
    rot = int(hd * rope_params["partial_rotary_factor"])
    inv = 1.0 / rope_params["rope_theta"] ** (np.arange(0, rot, 2) / rot)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t):  # [b, n, heads, hd]: rotated halves on the first `rot` channels
        a, rest = t[..., :rot], t[..., rot:]
        half = np.concatenate([-a[..., rot // 2:], a[..., :rot // 2]], -1)
        return np.concatenate([a * cos[:, None] + half * sin[:, None], rest], -1)

    for i, kind in enumerate(_kinds(raw)):
        p = f"model.layers.{i}."
        y = _rms(x, W[p + "input_layernorm.weight"], eps, 1.0)
        if kind == "delta" and raw["model_type"].startswith("qwen3_5"):  # (Qwen3.5: separate projections)
            a = p + "linear_attn."
            mixed = y @ W[a + "in_proj_qkv.weight"].T
            z = (y @ W[a + "in_proj_z.weight"].T).reshape(b, n, hv, dv)
            beta_logit, alpha = y @ W[a + "in_proj_b.weight"].T, y @ W[a + "in_proj_a.weight"].T
        elif kind == "delta":
            a = p + "linear_attn."
            qkvz = (y @ W[a + "in_proj_qkvz.weight"].T).reshape(b, n, hk, 2 * dk + 2 * r * dv)
            q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
            v = qkvz[..., 2 * dk:2 * dk + r * dv].reshape(b, n, hv, dv)
            z = qkvz[..., 2 * dk + r * dv:].reshape(b, n, hv, dv)
            ba = (y @ W[a + "in_proj_ba.weight"].T).reshape(b, n, hk, 2 * r)
            beta_logit, alpha = ba[..., :r].reshape(b, n, hv), ba[..., r:].reshape(b, n, hv)
            mixed = np.concatenate([q.reshape(b, n, -1), k.reshape(b, n, -1), v.reshape(b, n, -1)], -1)
        if kind == "delta":
            taps = W[a + "conv1d.weight"][:, 0, :]  # [C, K]
            conv = np.zeros_like(mixed)
            for t in range(n):
                for j in range(taps.shape[1]):
                    src = t - taps.shape[1] + 1 + j
                    if src >= 0:
                        conv[:, t] += taps[:, j] * mixed[:, src]
            conv = _silu(conv)
            q = conv[..., :hk * dk].reshape(b, n, hk, dk)
            k = conv[..., hk * dk:2 * hk * dk].reshape(b, n, hk, dk)
            v = conv[..., 2 * hk * dk:].reshape(b, n, hv, dv)
            q, k = (np.repeat(u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6), r, axis=2) for u in (q, k))
            beta = 1 / (1 + np.exp(-beta_logit))
            g = -np.exp(W[a + "A_log"]) * np.log1p(np.exp(alpha + W[a + "dt_bias"]))
            state, o = np.zeros((b, hv, dk, dv)), np.zeros((b, n, hv, dv))
            for t in range(n):
                state = np.exp(g[:, t])[..., None, None] * state
                pred = np.einsum("bhk,bhkv->bhv", k[:, t], state)
                state = state + np.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - pred))
                o[:, t] = dk ** -0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], state)
            o = _rms(o, W[a + "norm.weight"], eps, 0.0) * _silu(z)
            out = o.reshape(b, n, -1) @ W[a + "out_proj.weight"].T
        else:
            a = p + "self_attn."
            qg = (y @ W[a + "q_proj.weight"].T).reshape(b, n, h, 2 * hd)
            q, gate = qg[..., :hd], qg[..., hd:]
            q = rope(_rms(q, W[a + "q_norm.weight"], eps, 1.0))
            k = rope(_rms((y @ W[a + "k_proj.weight"].T).reshape(b, n, kv, hd), W[a + "k_norm.weight"], eps, 1.0))
            v = (y @ W[a + "v_proj.weight"].T).reshape(b, n, kv, hd)
            k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
            s = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            o = np.einsum("bhqk,bkhd->bqhd", pr / pr.sum(-1, keepdims=True), v)
            out = (o.reshape(b, n, -1) / (1 + np.exp(-gate.reshape(b, n, -1)))) @ W[a + "o_proj.weight"].T
        x = x + out
        y = _rms(x, W[p + "post_attention_layernorm.weight"], eps, 1.0)
        m = p + "mlp."

        def mlp(pre, u):
            return (_silu(u @ W[pre + "gate_proj.weight"].T) * (u @ W[pre + "up_proj.weight"].T)) @ W[pre + "down_proj.weight"].T

        if raw.get("num_experts"):
            logits = y @ W[m + "gate.weight"].T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs = probs / probs.sum(-1, keepdims=True)
            top = np.argsort(-probs, -1)[..., :raw["num_experts_per_tok"]]
            weights = np.take_along_axis(probs, top, -1)
            weights = weights / weights.sum(-1, keepdims=True)
            moe = np.zeros_like(y)
            for j in range(raw["num_experts"]):
                wj = (weights * (top == j)).sum(-1, keepdims=True)
                moe += wj * mlp(f"{m}experts.{j}.", y)
            shared = 1 / (1 + np.exp(-(y @ W[m + "shared_expert_gate.weight"].T))) * mlp(m + "shared_expert.", y)
            x = x + moe + shared
        else:
            x = x + mlp(m, y)
    return _rms(x, W["model.norm.weight"], eps, 1.0) @ W["lm_head.weight"].T


@pytest.mark.parametrize("raw", [RAW, DENSE], ids=["qwen3-next", "qwen3.5"])
def test_folder_gives_the_reference_logits_and_round_trips(tmp_path, raw):
    sd = random_state_dict(raw, seed=1)
    model = hf.load_pretrained(hf_folder(tmp_path / "in", raw, sd), attn_impl="xla")
    assert [b.attn.kind for b in model.blocks] == _kinds(raw)
    assert model.cfg.delta_dims == (4, 2, 8, 12) and model.cfg.rotary_dim == 8
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, raw, TOKENS), jnp.float32, "logits", tol=tol)
    hf.save_pretrained(model, tmp_path / "out")
    back = hf.read_state_dict(tmp_path / "out")
    assert set(back) == set(sd) - {"mtp.fc.weight"}
    for key in back:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == raw["model_type"]
    again = hf.load_pretrained(tmp_path / "out", attn_impl="xla")
    assert again.cfg == model.cfg
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))


def test_multimodal_qwen3_5_folder_loads_its_language_model(tmp_path):
    sd = random_state_dict(DENSE, seed=2)
    prefixed = {("lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k[len("model."):]
                 if k.startswith("model.") else k): v for k, v in sd.items()}
    prefixed["model.visual.patch_embed.proj.weight"] = np.ones((4, 3), np.float32)  # (the vision tower: not read)
    model = hf.load_pretrained(hf_folder(tmp_path, QWEN3_5, prefixed), attn_impl="xla")
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, DENSE, TOKENS), jnp.float32, "logits",
                 tol={jnp.dtype(jnp.float32): (2e-4, 2e-4)})


def test_qwen3_5_moe_folder_loads_and_saves_as_qwen3_next(tmp_path):
    """Qwen3.5's mixture of experts (in_proj_qkv / z / b / a, Qwen3-Next's experts): the reference logits; saved in
    Qwen3-Next's layout, which loads back to the same logits."""
    raw = {**DENSE, "model_type": "qwen3_5_moe_text", **{k: RAW[k] for k in RAW if "expert" in k or k == "norm_topk_prob"}}
    sd = random_state_dict(raw, seed=3)
    model = hf.load_pretrained(hf_folder(tmp_path / "in", raw, sd), attn_impl="xla")
    want = reference_logits(sd, raw, TOKENS)
    assert_close(model(jnp.asarray(TOKENS)), want, jnp.float32, "logits", tol={jnp.dtype(jnp.float32): (2e-4, 2e-4)})
    hf.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3_next"
    again = hf.load_pretrained(tmp_path / "out", attn_impl="xla")
    assert_close(again(jnp.asarray(TOKENS)), want, jnp.float32, "logits", tol={jnp.dtype(jnp.float32): (2e-4, 2e-4)})


@pytest.mark.slow  # (23 s; kernel decoding of recurrent layers by default: test_kimi_linear's, test_minimax's)
def test_recurrent_decoding_gives_the_forward():
    """Prefill (the gated delta kernel with its final state, flash for the gated softmax layer), then one token at a
    time: the delta layers from their states and convolution histories, the softmax layer from its KV cache."""
    model = create_model("qwen3-next-tiny", rngs=nnx.Rngs(0), attn_impl="pallas", init_std=0.1)  # (the kernels)
    tokens = jnp.asarray(TOKENS)
    full = model(tokens)
    logits, cache = model.prefill(tokens[:, :9], max_len=13)
    step = nnx.jit(lambda m, *a: m.decode_step(*a))  # (one compiled step for every token)
    assert cache[0][0].shape == (2, 4, 32, 32) and cache[3][0].shape == (2, 13, 2, 64)
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(logits, full[:, 8], jnp.float32, "prefill", tol=tol)
    for t in range(9, 13):
        logits, cache = step(model, tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=tol)


def test_training_step_and_bad_configs():
    loss, grads = lm_grads("qwen3-next-tiny", layers=4)
    assert np.isfinite(float(loss))
    for g in (grads.blocks[3].attn.gate.kernel, grads.blocks[0].attn.z.kernel, grads.blocks[0].attn.conv,
              grads.blocks[3].attn.q_norm.weight):
        assert np.abs(np.asarray(g[...])).max() > 0
    for raw, match in [({**RAW, "hidden_act": "gelu"}, "hidden_act"), ({**RAW, "attention_bias": True}, "attention_bias"),
                       ({**DENSE, "layer_types": ["linear_attention"] * 3}, "layer_types"),
                       ({**RAW, "linear_num_value_heads": 3}, "delta_heads"), ({**RAW, "model_type": "qwen3"}, "qwen3_next")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf(raw)
    with pytest.raises(ValueError, match="Qwen3-Next layout"):  # (its softmax layers without the output gate)
        hf_config(create_model("qwen3-next-tiny", rngs=nnx.Rngs(0), attn_output_gate=False).cfg)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_matches_transformers(tmp_path, family):
    """transformers' Qwen3NextForCausalLM / Qwen3_5ForCausalLM with random weights, saved by transformers: our
    logits and greedy tokens are theirs."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3_5ForCausalLM"):
        pytest.skip("this transformers has no Qwen3-Next / Qwen3.5")
    if family == "qwen3_next":
        fields = {k: v for k, v in RAW.items() if k not in ("model_type", "rope_theta", "partial_rotary_factor")}
        config = transformers.Qwen3NextConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                         "partial_rotary_factor": 0.5})
        ref = transformers.Qwen3NextForCausalLM(config)
    elif family == "qwen3_5":
        config = transformers.Qwen3_5TextConfig(**{k: v for k, v in DENSE.items() if k != "model_type"})
        ref = transformers.Qwen3_5ForCausalLM(config)
    else:
        config = transformers.Qwen3_5MoeTextConfig(**{k: v for k, v in DENSE.items() if k != "model_type"},
                                                   num_experts=4)
        ref = transformers.Qwen3_5MoeForCausalLM(config)
    check_causal_lm_matches_transformers(tmp_path, ref, TOKENS)


@pytest.mark.slow  # (14 s: the suite's budget; kimi-linear-48b-a3b's count by default)
def test_80b_config_has_80b_parameters():
    """Abstract shapes only: the registry's qwen3-next-80b-a3b holds Qwen3-Next-80B-A3B's 80B parameters."""
    model = nnx.eval_shape(lambda: create_model("qwen3-next-80b-a3b", rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 79e9 < total < 82e9, total
