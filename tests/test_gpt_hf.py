"""LLaMA / Qwen2 checkpoints in the Hugging Face layout -> GPT: a numpy forward written from the
transformers modeling math on the Hugging Face state_dict is the oracle; with transformers installed,
its own LlamaForCausalLM too."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.gpt_hf import config_from_hf, hf_config, load_hf_state_dict, to_hf_state_dict
from jaxattn.models.hf import hf_model_type, load_pretrained, read_config, save_pretrained
from jaxattn.models.safetensors_io import write_safetensors
from conftest import assert_close, assert_same_state_dict

F32 = jnp.float32
LOGITS_TOL = {jnp.dtype(F32): (2e-4, 2e-4)}  # float32 model against the float64 oracle, of the logits' scale

LLAMA = {"model_type": "llama", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "hidden_act": "silu",
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}
QWEN2 = {**LLAMA, "model_type": "qwen2", "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "tie_word_embeddings": True}
TOKENS = np.asarray([[3, 17, 59, 0, 8, 8, 41, 22, 5, 33, 66, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])


def random_hf_state_dict(raw, seed=0):
    rng = np.random.default_rng(seed)
    d, h, kv = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"]
    hd, f, v = raw.get("head_dim") or d // h, raw["intermediate_size"], raw["vocab_size"]

    def w(*shape, s=0.3):
        return rng.normal(0, s, shape).astype(np.float32)

    g = 0.0 if raw["model_type"].startswith("gemma") else 1.0  # Gemma's norms scale by 1 + weight
    sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": g + w(d, s=0.1)}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": g + w(d, s=0.1), p + "post_attention_layernorm.weight": g + w(d, s=0.1),
                   p + "self_attn.q_proj.weight": w(h * hd, d), p + "self_attn.k_proj.weight": w(kv * hd, d),
                   p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.o_proj.weight": w(d, h * hd),
                   p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                   p + "mlp.down_proj.weight": w(d, f)})
        if raw["model_type"] in ("qwen2", "qwen2_moe"):
            sd.update({p + "self_attn.q_proj.bias": w(h * hd), p + "self_attn.k_proj.bias": w(kv * hd),
                       p + "self_attn.v_proj.bias": w(kv * hd)})
        if raw["model_type"] in ("qwen3", "gemma3_text", "qwen3_moe"):
            sd.update({p + "self_attn.q_norm.weight": g + w(hd, s=0.2), p + "self_attn.k_norm.weight": g + w(hd, s=0.2)})
        if raw["model_type"] == "olmo2":  # post-norms only; q/k norms over every head at once
            del sd[p + "input_layernorm.weight"]
            sd.update({p + "post_feedforward_layernorm.weight": 1 + w(d, s=0.1),
                       p + "self_attn.q_norm.weight": 1 + w(h * hd, s=0.2),
                       p + "self_attn.k_norm.weight": 1 + w(kv * hd, s=0.2)})
        if raw["model_type"] in ("gemma2", "gemma3_text"):
            sd.update({p + "pre_feedforward_layernorm.weight": w(d, s=0.1), p + "post_feedforward_layernorm.weight": w(d, s=0.1)})
        if raw["model_type"] in MOE:  # experts instead of the MLP
            for name in ("gate_proj", "up_proj", "down_proj"):
                del sd[p + "mlp." + name + ".weight"]
            e, f = raw.get("num_local_experts") or raw["num_experts"], raw.get("moe_intermediate_size") or f
            if raw["model_type"] == "gpt_oss":  # biases everywhere, sinks, fused experts (gate / up interleaved)
                x = p + "mlp.experts."
                sd.update({p + "mlp.router.weight": w(e, d), p + "mlp.router.bias": w(e), x + "gate_up_proj": w(e, d, 2 * f),
                           x + "gate_up_proj_bias": w(e, 2 * f), x + "down_proj": w(e, f, d), x + "down_proj_bias": w(e, d),
                           p + "self_attn.sinks": w(h, s=1.0), p + "self_attn.o_proj.bias": w(d),
                           **{p + f"self_attn.{n}_proj.bias": w(m * hd) for n, m in (("q", h), ("k", kv), ("v", kv))}})
            else:
                x = p + ("block_sparse_moe." if raw["model_type"] == "mixtral" else "mlp.")
                names = ("w1", "w3", "w2") if raw["model_type"] == "mixtral" else ("gate_proj", "up_proj", "down_proj")
                sd[x + "gate.weight"] = w(e, d)
                for j in range(e):
                    sd.update({f"{x}experts.{j}.{names[0]}.weight": w(f, d), f"{x}experts.{j}.{names[1]}.weight": w(f, d),
                               f"{x}experts.{j}.{names[2]}.weight": w(d, f)})
                if raw["model_type"] == "qwen2_moe":  # the shared expert and its gate
                    s_ = raw["shared_expert_intermediate_size"]
                    sd.update({x + "shared_expert.gate_proj.weight": w(s_, d), x + "shared_expert.up_proj.weight": w(s_, d),
                               x + "shared_expert.down_proj.weight": w(d, s_), x + "shared_expert_gate.weight": w(1, d)})
    if not raw.get("tie_word_embeddings", raw["model_type"].startswith("gemma")):
        sd["lm_head.weight"] = w(v, d)
    return sd


def scaled_inv_freq(raw, hd, seq_len=None):
    """RoPE inverse frequencies of ``hd`` rotated channels and the cos/sin factor, from the formulas of each
    scaling (Llama 3.1's release, the YaRN paper with Hugging Face's defaults, LongRoPE as Phi-3 uses it:
    per-frequency factors, the long ones for a sequence of ``seq_len`` past the original context), in float64."""
    rope = {**(raw.get("rope_parameters") or {}), **(raw.get("rope_scaling") or {})}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    base = theta ** (-np.arange(0, hd, 2) / hd)
    if kind == "default":
        return base, 1.0
    if kind in ("longrope", "su") or raw["model_type"] == "phi3":  # (Phi-3's "su" / "yarn" are LongRoPE)
        ctx = raw.get("original_max_position_embeddings", 4096)
        factor = rope.get("factor") or raw["max_position_embeddings"] / ctx
        ext = np.asarray(rope["long_factor"] if seq_len is not None and seq_len > ctx else rope["short_factor"])
        return base / ext, rope.get("attention_factor") or math.sqrt(1 + math.log(factor) / math.log(ctx))
    factor = rope["factor"]
    if kind == "linear":
        return base / factor, 1.0
    ctx = rope.get("original_max_position_embeddings") or raw["max_position_embeddings"]
    if kind == "llama3":
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < ctx / rope["high_freq_factor"]:
                out.append(f)
            elif wavelen > ctx / rope["low_freq_factor"]:
                out.append(f / factor)
            else:
                t = (ctx / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
                out.append((1 - t) * f / factor + t * f)
        return np.asarray(out), 1.0
    assert kind == "yarn"
    # dimension 2i turns position * base[i] / (2 pi) times over the context: beta_fast turns -> keep the
    # frequency, beta_slow -> interpolate it, linear between (by dimension index, rounded outwards)
    def dim_for(turns):
        return hd * math.log(ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_for(rope.get("beta_fast", 32)), dim_for(rope.get("beta_slow", 1))
    if rope.get("truncate", True):  # (gpt-oss: truncate False keeps the fractional bounds)
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, hd - 1)
    out = []
    for i, f in enumerate(base):
        t = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        out.append(t * f / factor + (1 - t) * f)
    return np.asarray(out), rope.get("attention_factor") or 0.1 * math.log(factor) + 1.0


def reference_logits(sd, raw, tokens, call_lengths=None):
    """float64 numpy forward of transformers' LlamaForCausalLM / Qwen2 / Qwen3 / Mistral / Phi3 and Gemma /
    Gemma2 / Gemma3ForCausalLM. ``call_lengths[i]``: the sequence length of the forward call that rotated
    position ``i`` (LongRoPE's factors depend on it: a prefill, then decode steps; default all at once)."""
    W = {k: v.astype(np.float64) for k, v in sd.items()}
    kind = raw["model_type"]
    gemma = kind.startswith("gemma")
    d, h, kv = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"]
    hd, eps, b, n = raw.get("head_dim") or d // h, raw["rms_norm_eps"], *tokens.shape
    layers = raw["num_hidden_layers"]
    if kind in ("gemma2", "gpt_oss"):  # sliding / full alternate, sliding first
        types = raw.get("layer_types") or ["sliding" if (i + 1) % 2 else "full" for i in range(layers)]
    elif kind == "gemma3_text":
        types = ["sliding" if (i + 1) % raw["sliding_window_pattern"] else "full" for i in range(layers)]
    else:
        types = ["sliding" if raw.get("sliding_window") and kind != "qwen3_moe" else "full"] * layers
    types = [t.replace("_attention", "") for t in types]
    scale = raw.get("query_pre_attn_scalar", 256 if kind in ("gemma2", "gemma3_text") else hd) ** -0.5
    if kind == "gemma":
        scale = hd ** -0.5
    if kind == "granite":
        scale = raw["attention_multiplier"]
    res = raw.get("residual_multiplier", 1.0) if kind == "granite" else 1.0
    nope = [not f for f in raw.get("no_rope_layers", [1] * layers)] if kind == "smollm3" else [False] * layers
    attn_cap, final_cap = raw.get("attn_logit_softcapping"), raw.get("final_logit_softcapping")

    def norm(x, w):
        return (1 + w if gemma else w) * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))

    def act(g):
        if gemma:  # tanh GELU
            return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        return g / (1 + np.exp(-g))

    def softcap(x, cap):
        return x if cap is None else cap * np.tanh(x / cap)

    def moe_mlp(y, p):
        """Each token through its top-k experts (transformers' routers: gpt-oss, Mixtral and Qwen-MoE's
        norm_topk_prob softmax the chosen logits; Qwen-MoE without it keeps their full-softmax probabilities)."""
        k = raw["num_experts_per_tok"]
        router = {"gpt_oss": "mlp.router", "mixtral": "block_sparse_moe.gate"}.get(kind, "mlp.gate")
        logits = proj(y, p + router)  # [b, n, e]
        out = np.zeros_like(y)
        for t in np.ndindex(*y.shape[:2]):
            top = np.argsort(-logits[t], kind="stable")[:k]
            z = np.exp(logits[t] - logits[t].max())
            if kind in ("qwen3_moe", "qwen2_moe") and not raw.get("norm_topk_prob", False):
                weights = (z / z.sum())[top]
            else:
                weights = z[top] / z[top].sum()
            for j, wj in zip(top, weights):
                if kind == "gpt_oss":
                    x_ = p + "mlp.experts."
                    gu = y[t] @ W[x_ + "gate_up_proj"][j] + W[x_ + "gate_up_proj_bias"][j]
                    lim = raw.get("swiglu_limit", 7.0)
                    g, u = np.minimum(gu[::2], lim), np.clip(gu[1::2], -lim, lim)
                    hidden = (u + 1) * g / (1 + np.exp(-1.702 * g))
                    out[t] += wj * (hidden @ W[x_ + "down_proj"][j] + W[x_ + "down_proj_bias"][j])
                else:
                    x_ = f"{p}block_sparse_moe.experts.{j}." if kind == "mixtral" else f"{p}mlp.experts.{j}."
                    g_, u_, d_ = ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")
                    hidden = act(y[t] @ W[x_ + g_ + ".weight"].T) * (y[t] @ W[x_ + u_ + ".weight"].T)
                    out[t] += wj * (hidden @ W[x_ + d_ + ".weight"].T)
        if kind == "qwen2_moe":  # + sigmoid(y . gate) times the shared expert
            s_ = p + "mlp.shared_expert."
            shared = proj(act(proj(y, s_ + "gate_proj")) * proj(y, s_ + "up_proj"), s_ + "down_proj")
            out = out + shared / (1 + np.exp(-proj(y, p + "mlp.shared_expert_gate")))
        return out

    def proj(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    # (Phi-3: RoPE on the first rot channels)
    rot = int(hd * {**(raw.get("rope_parameters") or {}), **raw}.get("partial_rotary_factor", 1.0))
    call_lengths = [n] * n if call_lengths is None else call_lengths

    def rotation(layer_type):
        if kind == "gemma3_text" and layer_type == "sliding":  # plain RoPE at the local base
            inv_freq, attn_factor = scaled_inv_freq({"rope_theta": raw["rope_local_base_freq"]}, hd)
        else:
            inv_freq, attn_factor = np.stack([scaled_inv_freq(raw, rot, seq_len=c)[0] for c in call_lengths]), \
                scaled_inv_freq(raw, rot, seq_len=n)[1]
        emb = np.concatenate([np.arange(n)[:, None] * inv_freq] * 2, axis=-1)  # [n, rot]
        cos, sin = np.cos(emb)[None, None] * attn_factor, np.sin(emb)[None, None] * attn_factor

        def rotate(x):  # [b, heads, n, hd]
            xr, rest = x[..., :rot], x[..., rot:]
            x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
            return np.concatenate([xr * cos + np.concatenate([-x2, x1], -1) * sin, rest], -1)

        return rotate

    x = W["model.embed_tokens.weight"][tokens]
    if gemma:
        x = x * math.sqrt(d)
    if kind == "granite":
        x = x * raw["embedding_multiplier"]
    causal = np.tril(np.ones((n, n), bool))
    # sliding layers (Mistral, Gemma): key j visible to query i iff i - W < j <= i
    sliding = causal & (np.arange(n)[None, :] > np.arange(n)[:, None] - (raw.get("sliding_window") or n))
    for i in range(layers):
        p = f"model.layers.{i}."
        rotate = rotation(types[i])
        y = x if kind == "olmo2" else norm(x, W[p + "input_layernorm.weight"])
        q, k = proj(y, p + "self_attn.q_proj"), proj(y, p + "self_attn.k_proj")
        if kind == "olmo2":  # one RMSNorm over all heads' queries (keys), before the split into heads
            q, k = norm(q, W[p + "self_attn.q_norm.weight"]), norm(k, W[p + "self_attn.k_norm.weight"])
        q = q.reshape(b, n, h, hd).transpose(0, 2, 1, 3)
        k = k.reshape(b, n, kv, hd).transpose(0, 2, 1, 3)
        if kind in ("qwen3", "gemma3_text", "qwen3_moe"):  # per-head RMSNorm over head_dim, before RoPE
            q, k = norm(q, W[p + "self_attn.q_norm.weight"]), norm(k, W[p + "self_attn.k_norm.weight"])
        v = proj(y, p + "self_attn.v_proj").reshape(b, n, kv, hd).transpose(0, 2, 1, 3)
        if not nope[i]:
            q, k = rotate(q), rotate(k)
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # repeat_kv
        s = softcap(q @ k.transpose(0, 1, 3, 2) * scale, attn_cap)
        s = np.where(sliding if types[i] == "sliding" else causal, s, -np.inf)
        if p + "self_attn.sinks" in W:  # gpt-oss: one more logit per head in every row, carrying no value
            s = np.concatenate([s, np.broadcast_to(W[p + "self_attn.sinks"][None, :, None, None], (*s.shape[:3], 1))], -1)
        pr = np.exp(s - s.max(-1, keepdims=True))
        o = (pr / pr.sum(-1, keepdims=True))[..., :n] @ v
        a = proj(o.transpose(0, 2, 1, 3).reshape(b, n, h * hd), p + "self_attn.o_proj")
        if kind == "olmo2":  # x + norm(attn(x)), x + norm(mlp(x))
            x = x + norm(a, W[p + "post_attention_layernorm.weight"])
            m = proj(act(proj(x, p + "mlp.gate_proj")) * proj(x, p + "mlp.up_proj"), p + "mlp.down_proj")
            x = x + norm(m, W[p + "post_feedforward_layernorm.weight"])
        elif kind in ("gemma2", "gemma3_text"):  # post-norms on both branches
            x = x + norm(a, W[p + "post_attention_layernorm.weight"])
            y = norm(x, W[p + "pre_feedforward_layernorm.weight"])
            m = proj(act(proj(y, p + "mlp.gate_proj")) * proj(y, p + "mlp.up_proj"), p + "mlp.down_proj")
            x = x + norm(m, W[p + "post_feedforward_layernorm.weight"])
        elif kind in MOE:
            x = x + a
            x = x + moe_mlp(norm(x, W[p + "post_attention_layernorm.weight"]), p)
        else:
            x = x + a * res
            y = norm(x, W[p + "post_attention_layernorm.weight"])
            x = x + proj(act(proj(y, p + "mlp.gate_proj")) * proj(y, p + "mlp.up_proj"), p + "mlp.down_proj") * res
    x = norm(x, W["model.norm.weight"])
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["model.embed_tokens.weight"]
    return softcap(x @ head.T / raw.get("logits_scaling", 1.0), final_cap)


MISTRAL = {**LLAMA, "model_type": "mistral", "sliding_window": 5}
# Qwen3: per-head q/k RMSNorm, head_dim 16 apart from hidden_size / heads = 8, tied embeddings
QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
         "rope_theta": 1e6}
# RoPE scalings, with a short original context so that every regime shows at head_dim 8 and 13 positions
LLAMA31 = {**LLAMA, "rope_theta": 100.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 40}}
YARN = {**QWEN2, "rope_theta": 100.0, "max_position_embeddings": 16384,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 190}}
LINEAR = {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.5}}
# Gemma: MQA, head_dim 16, tanh GeGLU, (1 + w) norms, embeddings x sqrt(hidden), tied, the legacy "gelu" name
GEMMA = {"model_type": "gemma", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 48, "hidden_act": "gelu", "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0}
# Gemma 2: sliding / full layers, post-norms, a logit scale apart from head_dim, both soft caps small enough to bite
GEMMA2 = {**GEMMA, "model_type": "gemma2", "num_hidden_layers": 4, "num_key_value_heads": 2, "hidden_activation":
          "gelu_pytorch_tanh", "query_pre_attn_scalar": 24, "sliding_window": 5, "attn_logit_softcapping": 2.0,
          "final_logit_softcapping": 3.0}
# Gemma 3: q/k norms, 2 sliding : 1 full, a local RoPE base and linear scaling on the global layers only
GEMMA3 = {**GEMMA, "model_type": "gemma3_text", "num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 8,
          "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 8, "sliding_window": 4,
          "sliding_window_pattern": 3, "rope_theta": 50.0, "rope_local_base_freq": 7.0,
          "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "max_position_embeddings": 64}
# Phi-3: LLaMA blocks with fused qkv_proj / gate_up_proj weights and a sliding window on every layer
PHI3 = {**LLAMA, "model_type": "phi3", "sliding_window": 6, "rope_theta": 10000.0, "original_max_position_embeddings": 64,
        "pad_token_id": 0}
# Phi-3.5-mini: LongRoPE ("su", its first name), an original context of 8 < 13 tokens: the long factors
_LONG = {"short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [1.1, 2.5, 6.0, 17.0]}
PHI35 = {**PHI3, "max_position_embeddings": 40, "original_max_position_embeddings": 8,
         "rope_scaling": {"type": "su", **_LONG}}
# Phi-4-mini: partial rotary (3/4 of head_dim 16), LongRoPE in rope_parameters (transformers 5), tied, no window
PHI4MINI = {**LLAMA, "model_type": "phi3", "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0,
            "tie_word_embeddings": True, "max_position_embeddings": 64, "original_max_position_embeddings": 8,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 200.0, "partial_rotary_factor": 0.75,
                                "short_factor": [1.0, 1.1, 1.5, 2.0, 3.0, 4.0],
                                "long_factor": [1.2, 1.9, 3.0, 7.0, 12.0, 30.0]}}
# IBM Granite: multipliers on the embeddings, each residual branch, the logit scale; logits divided
GRANITE = {**LLAMA, "model_type": "granite", "embedding_multiplier": 3.0, "residual_multiplier": 0.4,
           "attention_multiplier": 0.05, "logits_scaling": 2.5, "tie_word_embeddings": True}
# SmolLM3: NoPE layers (no_rope_layers[i] = 0: no rotary embedding in layer i); 3 layers, the middle one NoPE
SMOLLM3 = {**LLAMA, "model_type": "smollm3", "num_hidden_layers": 3, "no_rope_layers": [1, 0, 1], "pad_token_id": 0}
# OLMo 2: post-norm blocks (no input norm), one RMSNorm over all heads' queries / keys
OLMO2 = {**LLAMA, "model_type": "olmo2", "pad_token_id": 0}
# gpt-oss: biased attention with sinks, sliding / full layers, YaRN without truncation, 4 experts (top 2) with
# biases and the clamped GLU (a small limit, so that the clamps bite), untied
GPT_OSS = {**LLAMA, "model_type": "gpt_oss", "head_dim": 8, "num_hidden_layers": 3, "sliding_window": 5,
           "num_local_experts": 4, "num_experts_per_tok": 2, "swiglu_limit": 1.0, "max_position_embeddings": 64,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16}}
# Mixtral: 4 experts, top 2, every layer a sliding window; Qwen3-MoE: q/k norms, top-3 of 5 narrower experts,
# the full softmax's probabilities (norm_topk_prob false)
MIXTRAL = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6}
QWEN3_MOE = {**QWEN3, "model_type": "qwen3_moe", "num_experts": 5, "num_experts_per_tok": 3,
             "moe_intermediate_size": 24, "norm_topk_prob": False, "tie_word_embeddings": False}
# Qwen2-MoE: q/k/v biases, top-2 of 4 experts (probabilities kept), a sigmoid-gated shared expert
QWEN2_MOE = {**QWEN2, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40, "norm_topk_prob": False}
MOE = ("gpt_oss", "mixtral", "qwen3_moe", "qwen2_moe")
CONFIGS = [LLAMA, QWEN2, MISTRAL, QWEN3, LLAMA31, YARN, LINEAR, GEMMA, GEMMA2, GEMMA3, PHI3, GRANITE, SMOLLM3, OLMO2,
           PHI35, PHI4MINI, GPT_OSS, MIXTRAL, QWEN3_MOE, QWEN2_MOE]
CONFIG_IDS = ["llama-gqa-untied", "qwen2-bias-tied", "mistral-window", "qwen3-qknorm-headdim", "llama3.1-rope",
              "qwen2-yarn", "llama-linear-rope", "gemma-mqa", "gemma2-softcap-window", "gemma3-qknorm-local-rope",
              "phi3-fused-window", "granite-multipliers", "smollm3-nope-layers", "olmo2-post-norms",
              "phi3.5-longrope", "phi4mini-partial-rotary-longrope", "gpt-oss-moe-sinks-biases", "mixtral-moe-window",
              "qwen3-moe-qknorm-unnormalized", "qwen2-moe-shared-expert"]


def fused_phi3(sd):
    """A LLaMA-layout state_dict in Phi-3's fused layout (qkv_proj: q, k, v rows; gate_up_proj: gate, up)."""
    out = {}
    for key, value in sd.items():
        if key.endswith("self_attn.q_proj.weight"):
            pre = key[: -len("q_proj.weight")]
            out[pre + "qkv_proj.weight"] = np.concatenate([value, sd[pre + "k_proj.weight"], sd[pre + "v_proj.weight"]])
        elif key.endswith("mlp.gate_proj.weight"):
            pre = key[: -len("gate_proj.weight")]
            out[pre + "gate_up_proj.weight"] = np.concatenate([value, sd[pre + "up_proj.weight"]])
        elif not key.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            out[key] = value
    return out


def test_phi3_folder_with_fused_weights(tmp_path):
    """A Phi-3 folder (fused qkv_proj / gate_up_proj) loads to the reference logits with its sliding window."""
    sd = random_hf_state_dict(PHI3, seed=6)
    (tmp_path / "config.json").write_text(json.dumps(PHI3))
    write_safetensors(tmp_path / "model.safetensors", fused_phi3(sd))
    model = load_pretrained(tmp_path, attn_impl="xla")
    assert model.cfg.layer_types == ("window",) and model.cfg.window == 6
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, PHI3, TOKENS), F32, "phi3 logits", tol=LOGITS_TOL)


@pytest.mark.parametrize("raw", [pytest.param(PHI35, marks=pytest.mark.slow), PHI4MINI], ids=["phi3.5", "phi4mini"])
def test_longrope_switches_factors_past_the_original_context(tmp_path, raw):
    """LongRoPE: a sequence within the original context (8) uses the short factors, a longer one the long
    factors (the oracle's two regimes differ); a Phi-3 folder of either round-trips through save_pretrained
    (Phi-4-mini's partial rotary as Phi-3, fused weights); generation decodes each call with the factors
    its last position picks, as transformers."""
    sd = random_hf_state_dict(raw, seed=4)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(raw))
    write_safetensors(tmp_path / "in" / "model.safetensors", fused_phi3(sd))
    model = load_pretrained(tmp_path / "in", attn_impl="xla")
    cfg = model.cfg
    assert dict(cfg.rope_scaling)["factor"] == raw["max_position_embeddings"] / 8
    assert cfg.rotary_dim == (12 if raw is PHI4MINI else None)
    short, long = TOKENS[:, :8], TOKENS
    want_short = reference_logits(sd, raw, short)
    assert_close(model(jnp.asarray(short)), want_short, F32, "short", tol=LOGITS_TOL)
    want_long = reference_logits(sd, raw, long)
    assert_close(model(jnp.asarray(long)), want_long, F32, "long", tol=LOGITS_TOL)
    assert np.abs(want_long[:, :8] - want_short).max() > 1e-2  # (the factors differ where it matters)
    save_pretrained(model, tmp_path / "out")
    assert hf_model_type(tmp_path / "out") == ("phi3" if raw is PHI4MINI else "mistral")
    assert config_from_hf(json.loads((tmp_path / "out" / "config.json").read_text()), attn_impl="xla") == cfg
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "out", attn_impl="xla")(jnp.asarray(long))),
                                  np.asarray(model(jnp.asarray(long))))
    # a cache: the prompt (8 tokens) rotated with the short factors, then each step past 8 with the long ones
    logits, cache = model(jnp.asarray(short), cache=model.init_cache(2, 13), offset=0)
    assert_close(logits, want_short, F32, "prefill", tol=LOGITS_TOL)
    for t in (8, 9):
        step, cache = model(jnp.asarray(long[:, t:t + 1]), cache=cache, offset=t)
        want = reference_logits(sd, raw, long[:, :t + 1], call_lengths=[8] * 8 + list(range(9, t + 2)))
        assert_close(step[:, 0], want[:, t], F32, f"decode step {t}", tol=LOGITS_TOL)
    assert np.abs(want[:, 9] - want_long[:, 9]).max() > 1e-3  # (the cached short keys show)
    try:
        import torch
        import transformers
    except ImportError:
        return
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in").eval()  # its own cache, the same steps
    with torch.no_grad():
        out = ref(torch.as_tensor(short), use_cache=True)
        for t in (8, 9):
            out = ref(torch.as_tensor(long[:, t:t + 1]), past_key_values=out.past_key_values, use_cache=True)
    assert_close(out.logits[:, 0].numpy(), want[:, 9], F32, "transformers' decode step", tol=LOGITS_TOL)


def test_rope_scaling_reference_covers_every_regime():
    """The scaled configs above reach each branch of their formulas (else the tests below could not fail
    on one): llama3 keeps, blends and divides; YaRN extrapolates, ramps and interpolates."""
    inv, _ = scaled_inv_freq(LLAMA31, 8)
    base = 100.0 ** (-np.arange(0, 8, 2) / 8)
    assert np.isclose(inv[0], base[0]) and np.isclose(inv[-1], base[-1] / 8)
    assert any(b / 8 < i < b for i, b in zip(inv, base))
    inv, attn = scaled_inv_freq(YARN, 8)
    assert np.isclose(inv[0], 1.0) and np.isclose(inv[-1], base[-1] / 4) and attn > 1.1
    assert any(b / 4 < i < b for i, b in zip(inv, base))


@pytest.mark.parametrize("raw", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_gives_the_reference_logits(raw):
    sd = random_hf_state_dict(raw)
    cfg = config_from_hf(raw, attn_impl="xla")
    assert (cfg.kv_heads, cfg.norm_eps, cfg.qkv_bias, cfg.tie_embeddings, cfg.qk_norm) == (
        raw["num_key_value_heads"], raw["rms_norm_eps"], raw["model_type"] in ("qwen2", "qwen2_moe"),
        raw.get("tie_word_embeddings", True), raw["model_type"] in ("qwen3", "gemma3_text", "olmo2", "qwen3_moe"))
    model = GPT(cfg, rngs=nnx.Rngs(0))
    load_hf_state_dict(model, {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    want = reference_logits(sd, raw, TOKENS)
    assert_close(model(jnp.asarray(TOKENS)), want, F32, "logits", tol=LOGITS_TOL)
    assert_same_state_dict(to_hf_state_dict(model), sd)


@pytest.mark.parametrize("raw", [{**GEMMA2, "head_dim": 32},
                                 pytest.param({**GEMMA3, "head_dim": 32, "query_pre_attn_scalar": 32},
                                              marks=pytest.mark.slow)],
                         ids=["gemma2", "gemma3"])  # (the kernels take head dims from 32)
def test_gemma_on_the_pallas_kernels_and_lowers_for_cuda(raw):
    """Gemma 2's soft-capped, scaled sliding-window / full layers and Gemma 3's local RoPE through the Pallas
    flash kernel (interpret mode) give the reference logits; the forward lowers for CUDA with one flash
    kernel call per layer."""
    from conftest import count_triton_calls, lower_for_cuda
    from jaxattn.pallas._common import compile_for_gpu

    sd = random_hf_state_dict(raw, seed=5)
    model = GPT(config_from_hf(raw, attn_impl="pallas"), rngs=nnx.Rngs(0))
    load_hf_state_dict(model, sd)
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, raw, TOKENS), F32, "pallas logits", tol=LOGITS_TOL)
    graph, state = nnx.split(model)
    with compile_for_gpu():
        text = lower_for_cuda(lambda s, t: nnx.merge(graph, s)(t), state, jnp.asarray(TOKENS))
    assert count_triton_calls(text) == raw["num_hidden_layers"]


def test_folder_round_trip_other_attention_patterns_and_dropout(tmp_path):
    """save_pretrained / load_pretrained; overrides swap the attention pattern (PowerAttention with a
    window past the sequence is full causal attention) and keep the dropout streams working."""
    raw = {**QWEN2, "tie_word_embeddings": False}
    sd = random_hf_state_dict(raw, seed=4)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    write_safetensors(tmp_path / "model.safetensors", sd)
    assert hf_model_type(tmp_path) == "qwen2" and read_config(tmp_path).qkv_bias
    model = load_pretrained(tmp_path, attn_impl="xla")
    want = reference_logits(sd, raw, TOKENS)
    assert_close(model(jnp.asarray(TOKENS)), want, F32, "model logits", tol=LOGITS_TOL)
    power = load_pretrained(tmp_path, attn_impl="xla", layer_types=("power", "full"), sparse_block=4, window=16,
                            sink=4)
    assert_close(power(jnp.asarray(TOKENS)), want, F32, "power logits", tol=LOGITS_TOL)
    drop = load_pretrained(tmp_path, attn_impl="xla", dropout=0.5)
    drop.train()
    a, b = drop(jnp.asarray(TOKENS)), drop(jnp.asarray(TOKENS))
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)  # fresh masks per call
    save_pretrained(model, tmp_path / "out")
    again = load_pretrained(tmp_path / "out", attn_impl="xla")
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))
    assert config_from_hf(hf_config(model.cfg), attn_impl="xla") == model.cfg


def test_bad_configs():
    for change, match in [({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "missing keys .'high_freq_factor'"),
                          ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}, "rope_parameters"),
                          ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_scaling"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
                          ({"rope_scaling": {"rope_type": "linear", "factor": -1.0}}, "factor must be positive"),
                          ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta": 1}}, "unknown keys .'beta'"),
                          ({"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
                          ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]},
                           "use_sliding_window"),
                          ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
                          ({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
                          ({"head_dim": 7}, "head_dim"), ({"model_type": "gpt2"}, "model_type"),
                          ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
                          ({"model_type": "mixtral"}, "num_local_experts"),
                          ({**GPT_OSS, "swiglu_alpha": 1.5}, "swiglu_alpha"),
                          ({**GPT_OSS, "attention_bias": False}, "attention_bias"),
                          ({**QWEN3_MOE, "mlp_only_layers": [1]}, "mlp_only_layers")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf({**LLAMA, **change})
    for raw, change, match in [(GEMMA2, {"hidden_activation": "gelu"}, "hidden_activation"),
                               (GEMMA, {"hidden_act": "silu"}, "hidden_act"),
                               (GEMMA3, {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                               (GEMMA2, {"layer_types": ["full_attention"] * 3}, "layer_types"),
                               (GEMMA3, {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                                             "full_attention": {"rope_type": "default"}}},
                                "plain RoPE on the sliding layers")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf({**raw, **change})
    # Gemma 2's config.json may leave its soft caps out: transformers' defaults apply (50, 30)
    g2 = config_from_hf({k: v for k, v in GEMMA2.items() if "softcapping" not in k})
    assert (g2.attn_softcap, g2.final_softcap, g2.layer_types, g2.window) == (50.0, 30.0, ("window", "full"), 5)
    assert config_from_hf(GEMMA3).layer_types == ("window", "window", "full")
    for cfg, match in [(GPTConfig(embed_scale=True), "without the rest of Gemma"),
                       (GPTConfig(mlp_act="gelu_tanh"), "mlp_act"),
                       (dataclasses.replace(config_from_hf(GEMMA3), layer_types=("power", "full")), "only .full. / .window. layers"),
                       (dataclasses.replace(config_from_hf(GEMMA), qk_norm=True), "post_norms"),
                       (GPTConfig(attn_sinks=True), "attention sinks export as gpt-oss"),
                       (dataclasses.replace(config_from_hf(MIXTRAL), norm="layer"), r"LLaMA's blocks otherwise: \['norm'\]"),
                       (dataclasses.replace(config_from_hf(GPT_OSS), tie_embeddings=True), "an untied head"),
                       (dataclasses.replace(config_from_hf(MIXTRAL), mlp_act="gelu"), "SiLU experts"),
                       (dataclasses.replace(config_from_hf(QWEN3_MOE), layer_types=("window",)), "full-attention")]:
        with pytest.raises(ValueError, match=match):
            hf_config(cfg)
    assert config_from_hf({**LLAMA, "model_type": "mistral", "sliding_window": None}).layer_types == ("full",)
    assert config_from_hf(MISTRAL, layer_types=("full",)).layer_types == ("full",)  # override
    # transformers >= 5 keeps the RoPE base in rope_parameters
    new_style = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    assert config_from_hf({**new_style, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}).rope_theta == 1e6
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        config_from_hf(LLAMA, layer_type="power")
    model = GPT(config_from_hf(LLAMA), rngs=nnx.Rngs(0))
    sd = random_hf_state_dict(LLAMA)
    with pytest.raises(ValueError, match=r"k_proj.weight \(8, 32\), .*v_proj.weight \(8, 32\) does not fit the model.s \(32, 32\)"):
        load_hf_state_dict(model, {**sd, "model.layers.1.self_attn.k_proj.weight": np.zeros((8, 32), np.float32),
                                   "model.layers.1.self_attn.v_proj.weight": np.zeros((8, 32), np.float32)})


@pytest.mark.parametrize("raw", CONFIGS, ids=CONFIG_IDS)
def test_matches_transformers(tmp_path, raw):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kind = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3", "gemma": "Gemma",
            "granite": "Granite", "smollm3": "SmolLM3", "olmo2": "Olmo2", "gpt_oss": "GptOss", "mixtral": "Mixtral",
            "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe",
            "gemma2": "Gemma2", "gemma3_text": "Gemma3"}[raw["model_type"]]
    config_cls = getattr(transformers, kind + ("TextConfig" if kind == "Gemma3" else "Config"))
    model_cls = getattr(transformers, kind + "ForCausalLM")
    torch.manual_seed(0)
    ref = model_cls(config_cls(**{k: v for k, v in raw.items() if k != "model_type"})).eval()
    for p in ref.parameters():  # larger than the default init, so that every term shows
        torch.nn.init.normal_(p, 0.0, 0.3)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        want = ref(torch.as_tensor(TOKENS)).logits.numpy()
    got = np.asarray(load_pretrained(tmp_path, attn_impl="xla")(jnp.asarray(TOKENS)))
    assert_close(got, want, F32, "logits vs transformers", tol={jnp.dtype(F32): (1e-4, 1e-4)})


@pytest.mark.parametrize("raw", CONFIGS[3:], ids=CONFIG_IDS[3:])
def test_export_keeps_qk_norm_head_dim_and_rope_scaling(tmp_path, raw):
    """save_pretrained writes what config_from_hf reads back to the same config (and, with transformers
    installed, what its own classes load to the same logits)."""
    sd = random_hf_state_dict(raw, seed=3)
    model = GPT(config_from_hf(raw, attn_impl="xla"), rngs=nnx.Rngs(0))
    load_hf_state_dict(model, sd)
    save_pretrained(model, tmp_path)
    assert config_from_hf(hf_config(model.cfg), attn_impl="xla") == model.cfg
    # (Phi-3 saves as Mistral, the same blocks; with partial rotary as Phi-3, fused weights)
    assert hf_model_type(tmp_path) == ("phi3" if model.cfg.rotary_dim else
                                       {"phi3": "mistral"}.get(raw["model_type"], raw["model_type"]))
    again = load_pretrained(tmp_path, attn_impl="xla")
    want = np.asarray(model(jnp.asarray(TOKENS)))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), want)
    try:
        import torch
        import transformers
    except ImportError:
        return
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = ref(torch.as_tensor(TOKENS)).logits.numpy()
    assert_close(got, want, F32, "transformers on our export", tol={jnp.dtype(F32): (1e-4, 1e-4)})


def test_multimodal_gemma3_folder_loads_its_language_model(tmp_path):
    """A multimodal Gemma 3 folder (model_type gemma3: text_config, language_model.model.* keys beside the
    vision tower's) loads its language model to the reference logits; its eos ids come from
    generation_config.json; with transformers installed, Gemma3ForConditionalGeneration's own text logits
    match."""
    from jaxattn.generate import folder_eos_ids

    text = {k: v for k, v in GEMMA3.items() if k != "model_type"}
    raw = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
           "vision_config": {"hidden_size": 16}, "tie_word_embeddings": True}
    sd = random_hf_state_dict(GEMMA3, seed=8)
    stored = {"language_model." + k: v for k, v in sd.items()}
    stored["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((16, 3, 14, 14), np.float32)
    stored["multi_modal_projector.mm_input_projection_weight"] = np.zeros((16, 32), np.float32)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 60]}))
    write_safetensors(tmp_path / "model.safetensors", stored)
    assert hf_model_type(tmp_path) == "gemma3" and read_config(tmp_path).qk_norm
    model = load_pretrained(tmp_path, attn_impl="xla")
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, GEMMA3, TOKENS), F32, "gemma3 text logits",
                 tol=LOGITS_TOL)
    assert folder_eos_ids(tmp_path, 67) == [1, 60]
    try:
        import torch
        import transformers
    except ImportError:
        return
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=66, boi_token_index=64, eoi_token_index=65)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(TOKENS)).logits.numpy()
    got = np.asarray(load_pretrained(tmp_path / "hf", attn_impl="xla")(jnp.asarray(TOKENS)))
    assert_close(got, want, F32, "logits vs transformers' Gemma 3", tol={jnp.dtype(F32): (1e-4, 1e-4)})


def test_tokenizer_json_adds_what_its_post_processor_says(tmp_path):
    """A tokenizer.json's post-processor adds the BOS (Llama 3, Gemma), as transformers' tokenizer does, with
    or without add_bos_token in tokenizer_config.json; add_bos_token prepends one where the file has no
    such step; decoding drops special tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    from jaxattn.models.hf import load_tokenizer

    def folder(name, post, tok_cfg):
        path = tmp_path / name
        path.mkdir()
        tk = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 4}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.add_special_tokens(["<unk>", "<bos>", "<eos>"])
        if post:
            tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        tk.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "bos_token": "<bos>", **tok_cfg}))
        (path / "config.json").write_text(json.dumps({**LLAMA, "bos_token_id": 1}))
        return path

    cases = [(folder("post", True, {}), [1, 3, 4, 3]), (folder("post-no-flag", True, {"add_bos_token": False}), [1, 3, 4, 3]),
             (folder("flag", False, {"add_bos_token": True}), [1, 3, 4, 3]), (folder("none", False, {}), [3, 4, 3])]
    for path, want in cases:
        tok = load_tokenizer(path)
        assert tok.encode("a b a").tolist() == want, path.name
        assert tok.decode([1, 3, 4]) == "a b"
    try:
        import transformers
    except ImportError:
        return
    for path, want in cases[:2]:  # where the file says, transformers agrees
        assert transformers.AutoTokenizer.from_pretrained(path)("a b a")["input_ids"] == want


def test_perplexity_sliding_windows(tmp_path, capsys):
    """python -m jaxattn.perplexity: every target scored once, each from its window alone (checked against the
    float64 reference forward of that window), and the CLI's perplexity is exp of their mean."""
    from jaxattn.perplexity import main as ppl_main, token_nll, windows

    for n, c, s in [(10, 4, 2), (11, 4, 4), (5, 8, 3), (2, 1, 1), (40, 7, 3)]:
        spans = windows(n, c, s)
        assert [t for _, e, f in spans for t in range(f, e)] == list(range(n - 1))
        assert all(0 < e - b <= c and b <= f < e and (f - b >= c - s or b == 0) for b, e, f in spans)
    with pytest.raises(ValueError, match="--stride"):
        windows(10, 4, 5)
    raw = LLAMA
    sd = random_hf_state_dict(raw, seed=2)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    write_safetensors(tmp_path / "model.safetensors", sd)
    tokens = np.random.default_rng(0).integers(0, raw["vocab_size"], 29).astype(np.int32)
    nll = token_nll(load_pretrained(tmp_path, attn_impl="xla"), tokens, context=8, stride=3, batch_size=2,
                    progress=False)
    want = np.full(28, np.nan)
    for b, e, f in windows(29, 8, 3):
        logits = reference_logits(sd, raw, tokens[None, b:e])[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        want[f:e] = -logp[np.arange(f - b, e - b), tokens[f + 1:e + 1]]
    np.testing.assert_allclose(nll, want, rtol=2e-4, atol=2e-4)
    np.save(tmp_path / "tokens.npy", tokens)
    assert ppl_main([str(tmp_path), str(tmp_path / "tokens.npy"), "--context", "8", "--stride", "3", "--batch-size", "2",
                     "--json", str(tmp_path / "ppl.json"), "--no-progress"]) == 0
    got = json.loads((tmp_path / "ppl.json").read_text())
    assert got["tokens_scored"] == 28 and abs(got["perplexity"] - math.exp(want.mean())) < 1e-3 * got["perplexity"]
    # another attention pattern on the same weights: a 2-token window sees less, so it scores otherwise
    assert ppl_main([str(tmp_path), str(tmp_path / "tokens.npy"), "--context", "8", "--stride", "3", "--no-progress",
                     "--model-args", "layer_types=window window=2"]) == 0
    windowed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(windowed["perplexity"] - got["perplexity"]) > 1e-3
    with pytest.raises(SystemExit):  # text without a tokenizer
        ppl_main([str(tmp_path), str(tmp_path / "config.json")])
    assert "needs the model's tokenizer" in capsys.readouterr().err
