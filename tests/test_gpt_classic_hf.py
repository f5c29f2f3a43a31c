"""GPT-2 and GPT-NeoX (Pythia) checkpoints in the Hugging Face layout -> GPT with the classic block
(LayerNorm, biases, plain GELU MLP, learned positions / partial rotary and parallel residuals): a float64
numpy forward written from transformers' modeling math on the folder's own keys (fused c_attn /
query_key_value, Conv1D layouts) is the oracle; the KV-cache decode reproduces the forward; save_pretrained
writes the folder's layout back; with transformers installed, its GPT2LMHeadModel / GPTNeoXForCausalLM
give the same logits on our folders and we on theirs."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, layer_norm_np
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.gpt_classic_hf import config_from_hf, hf_config, load_hf_state_dict, to_hf_state_dict
from jaxattn.models.hf import hf_model_type, load_pretrained, save_pretrained
from jaxattn.models.safetensors_io import write_safetensors

F32 = jnp.float32
TOL = {jnp.dtype(F32): (2e-4, 2e-4)}
GPT2 = {"model_type": "gpt2", "vocab_size": 67, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 24,
        "n_inner": 48, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
NEOX = {"model_type": "gpt_neox", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48, "hidden_act": "gelu", "rotary_pct": 0.5,
        "rotary_emb_base": 500.0, "max_position_embeddings": 64, "layer_norm_eps": 1e-5,
        "use_parallel_residual": True, "tie_word_embeddings": False}
NEOX_SEQ = {**NEOX, "use_parallel_residual": False, "rotary_pct": 1.0, "hidden_act": "gelu_new",
            "tie_word_embeddings": True}
PHI = {"model_type": "phi", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "intermediate_size": 48, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
       "rope_theta": 300.0, "layer_norm_eps": 1e-5, "max_position_embeddings": 64}
STARCODER2 = {"model_type": "starcoder2", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
              "hidden_act": "gelu_pytorch_tanh", "rope_theta": 500.0, "sliding_window": 5, "norm_epsilon": 1e-5,
              "max_position_embeddings": 64, "tie_word_embeddings": True}
# 6 heads: ALiBi's slopes for a head count that is not a power of two
BLOOM = {"model_type": "bloom", "vocab_size": 67, "hidden_size": 48, "n_layer": 2, "n_head": 6, "layer_norm_epsilon": 1e-5}
_FALCON = {"model_type": "falcon", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "rope_theta": 500.0, "layer_norm_epsilon": 1e-5, "bias": False, "alibi": False}
FALCON = {**_FALCON, "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}  # Falcon-7B's
FALCON_NEW = {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 48}  # Falcon-40B's
FALCON_SEQ = {**_FALCON, "multi_query": False, "parallel_attn": False, "bias": True}  # sequential, MHA, biases
# Falcon-RW: FALCON_SEQ's block with ALiBi (added before the 1 / sqrt(head_dim) scaling); 6 heads
FALCON_RW = {**FALCON_SEQ, "alibi": True, "hidden_size": 48, "num_attention_heads": 6}
OPT = {"model_type": "opt", "vocab_size": 67, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
       "ffn_dim": 48, "max_position_embeddings": 24, "activation_function": "relu", "word_embed_proj_dim": 32}
# OPT-350m: post-LN blocks (no final norm), 16-wide embeddings projected in to 32 and back out
OPT350 = {**OPT, "do_layer_norm_before": False, "word_embed_proj_dim": 16}
BIGCODE = {"model_type": "gpt_bigcode", "vocab_size": 67, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 24,
           "n_inner": 48, "multi_query": True}  # StarCoder / SantaCoder: GPT-2 with one kv head, Linear layouts
# GPT-J: interleaved RoPE on 4 of 8 channels; CodeGen: qkv_proj over 4 groups of 2 heads, whole-head interleaved RoPE
GPTJ = {"model_type": "gptj", "vocab_size": 67, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_inner": 48,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_positions": 64}
CODEGEN = {"model_type": "codegen", "vocab_size": 67, "n_embd": 64, "n_layer": 2, "n_head": 8, "rotary_dim": 8,
           "n_inner": 48, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "n_positions": 64, "n_ctx": 64}
CONFIGS = [GPT2, NEOX, NEOX_SEQ, PHI, STARCODER2, BLOOM, FALCON, FALCON_NEW, FALCON_SEQ, OPT, BIGCODE, GPTJ, CODEGEN,
           FALCON_RW, OPT350]
IDS = ["gpt2", "neox-parallel-partial-rotary", "neox-sequential-tied", "phi-shared-norm-gqa", "starcoder2-gqa-window",
       "bloom-alibi-6-heads", "falcon-multi-query-parallel", "falcon-new-architecture-gqa", "falcon-sequential-bias",
       "opt-relu-offset-positions", "starcoder-multi-query", "gptj-interleaved-partial-rotary", "codegen-grouped-qkv",
       "falcon-rw-scaled-alibi", "opt350m-post-ln-projected"]

TOKENS = np.asarray([[3, 17, 59, 0, 8, 8, 41, 22, 5, 33, 66, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])


def random_state_dict(raw, seed=0, prefix=True):
    """The folder's own keys and layouts: GPT-2's Conv1D weights [in, out] and fused c_attn, NeoX's fused
    query_key_value [3 dim, dim] (per head q, k, v rows); buffers older checkpoints hold too."""
    rng = np.random.default_rng(seed)
    w = lambda *shape, s=0.3: rng.normal(0, s, shape).astype(np.float32)  # noqa: E731
    v = raw["vocab_size"]
    if raw["model_type"] == "gpt2":
        d, f, t = raw["n_embd"], raw["n_inner"], "transformer." if prefix else ""
        sd = {t + "wte.weight": w(v, d), t + "wpe.weight": w(raw["n_positions"], d),
              t + "ln_f.weight": 1 + w(d, s=0.1), t + "ln_f.bias": w(d, s=0.1)}
        for i in range(raw["n_layer"]):
            p = f"{t}h.{i}."
            sd.update({p + "ln_1.weight": 1 + w(d, s=0.1), p + "ln_1.bias": w(d, s=0.1),
                       p + "ln_2.weight": 1 + w(d, s=0.1), p + "ln_2.bias": w(d, s=0.1),
                       p + "attn.c_attn.weight": w(d, 3 * d), p + "attn.c_attn.bias": w(3 * d),
                       p + "attn.c_proj.weight": w(d, d), p + "attn.c_proj.bias": w(d),
                       p + "mlp.c_fc.weight": w(d, f), p + "mlp.c_fc.bias": w(f),
                       p + "mlp.c_proj.weight": w(f, d), p + "mlp.c_proj.bias": w(d),
                       p + "attn.bias": np.tril(np.ones((1, 1, raw["n_positions"], raw["n_positions"]), bool))})
        return sd
    if raw["model_type"] in ("gptj", "codegen"):  # MLP and head biases only; CodeGen: fused qkv_proj [3 dim, dim]
        d, f = raw["n_embd"], raw["n_inner"]
        sd = {"transformer.wte.weight": w(v, d), "transformer.ln_f.weight": 1 + w(d, s=0.1),
              "transformer.ln_f.bias": w(d, s=0.1), "lm_head.weight": w(v, d), "lm_head.bias": w(v)}
        for i in range(raw["n_layer"]):
            p = f"transformer.h.{i}."
            proj = (("attn.qkv_proj", 3 * d, d),) if raw["model_type"] == "codegen" else tuple(
                (f"attn.{t}_proj", d, d) for t in "qkv")
            for name, o, i_ in (*proj, ("attn.out_proj", d, d)):
                sd[p + name + ".weight"] = w(o, i_)
            for name, o, i_ in (("mlp.fc_in", f, d), ("mlp.fc_out", d, f)):
                sd.update({p + name + ".weight": w(o, i_), p + name + ".bias": w(o)})
            sd.update({p + "ln_1.weight": 1 + w(d, s=0.1), p + "ln_1.bias": w(d, s=0.1),
                       p + "attn.masked_bias": np.asarray(-1e9, np.float32)})
        return sd
    if raw["model_type"] == "opt":
        d, f = raw["hidden_size"], raw["ffn_dim"]
        e = raw.get("word_embed_proj_dim") or d
        pre = "model.decoder."
        sd = {pre + "embed_tokens.weight": w(v, e), pre + "embed_positions.weight": w(raw["max_position_embeddings"] + 2, d)}
        if raw.get("do_layer_norm_before", True):
            sd.update({pre + "final_layer_norm.weight": 1 + w(d, s=0.1), pre + "final_layer_norm.bias": w(d, s=0.1)})
        if e != d:
            sd.update({pre + "project_in.weight": w(d, e), pre + "project_out.weight": w(e, d)})
        for i in range(raw["num_hidden_layers"]):
            p = f"{pre}layers.{i}."
            for name, o, i_ in (("self_attn.q_proj", d, d), ("self_attn.k_proj", d, d), ("self_attn.v_proj", d, d),
                                ("self_attn.out_proj", d, d), ("fc1", f, d), ("fc2", d, f)):
                sd.update({p + name + ".weight": w(o, i_), p + name + ".bias": w(o)})
            for name in ("self_attn_layer_norm", "final_layer_norm"):
                sd.update({p + name + ".weight": 1 + w(d, s=0.1), p + name + ".bias": w(d, s=0.1)})
        return sd
    if raw["model_type"] == "gpt_bigcode":  # Linear layouts; c_attn rows: q (every head), then one k and one v head
        d, f = raw["n_embd"], raw["n_inner"]
        hd = d // raw["n_head"]
        sd = {"transformer.wte.weight": w(v, d), "transformer.wpe.weight": w(raw["n_positions"], d),
              "transformer.ln_f.weight": 1 + w(d, s=0.1), "transformer.ln_f.bias": w(d, s=0.1)}
        for i in range(raw["n_layer"]):
            p = f"transformer.h.{i}."
            for name, o, i_ in (("attn.c_attn", d + 2 * hd, d), ("attn.c_proj", d, d), ("mlp.c_fc", f, d),
                                ("mlp.c_proj", d, f)):
                sd.update({p + name + ".weight": w(o, i_), p + name + ".bias": w(o)})
            for name in ("ln_1", "ln_2"):
                sd.update({p + name + ".weight": 1 + w(d, s=0.1), p + name + ".bias": w(d, s=0.1)})
        return sd
    if raw["model_type"] == "falcon":  # fused q / k / v: per kv group its query heads, then one k and one v head
        d, heads, kv = raw["hidden_size"], raw["num_attention_heads"], _falcon_kv(raw)
        f, hd, bias = raw.get("ffn_hidden_size") or 4 * d, d // heads, raw["bias"]
        sd = {"transformer.word_embeddings.weight": w(v, d), "transformer.ln_f.weight": 1 + w(d, s=0.1),
              "transformer.ln_f.bias": w(d, s=0.1)}
        for i in range(raw["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            for name, o, i_ in (("self_attention.query_key_value", (heads + 2 * kv) * hd, d),
                                ("self_attention.dense", d, d), ("mlp.dense_h_to_4h", f, d), ("mlp.dense_4h_to_h", d, f)):
                sd.update({p + name + ".weight": w(o, i_), **({p + name + ".bias": w(o)} if bias else {})})
            for name in _falcon_norms(raw):
                sd.update({p + name + ".weight": 1 + w(d, s=0.1), p + name + ".bias": w(d, s=0.1)})
        return sd
    if raw["model_type"] == "bloom":  # bigscience's folders: keys without "transformer.", per-head fused q / k / v
        d = raw["hidden_size"]
        sd = {"word_embeddings.weight": w(v, d), "word_embeddings_layernorm.weight": 1 + w(d, s=0.1),
              "word_embeddings_layernorm.bias": w(d, s=0.1), "ln_f.weight": 1 + w(d, s=0.1), "ln_f.bias": w(d, s=0.1)}
        for i in range(raw["n_layer"]):
            p = f"h.{i}."
            for name, o, i_ in (("self_attention.query_key_value", 3 * d, d), ("self_attention.dense", d, d),
                                ("mlp.dense_h_to_4h", 4 * d, d), ("mlp.dense_4h_to_h", d, 4 * d)):
                sd.update({p + name + ".weight": w(o, i_), p + name + ".bias": w(o)})
            for name in ("input_layernorm", "post_attention_layernorm"):
                sd.update({p + name + ".weight": 1 + w(d, s=0.1), p + name + ".bias": w(d, s=0.1)})
        return sd
    d, f = raw["hidden_size"], raw["intermediate_size"]
    if raw["model_type"] in ("phi", "starcoder2"):  # separate q / k / v projections (GQA), LLaMA's key names
        kvd = raw["num_key_value_heads"] * d // raw["num_attention_heads"]
        phi = raw["model_type"] == "phi"
        final = "model.final_layernorm" if phi else "model.norm"
        sd = {"model.embed_tokens.weight": w(v, d), final + ".weight": 1 + w(d, s=0.1), final + ".bias": w(d, s=0.1)}
        if phi:
            sd.update({"lm_head.weight": w(v, d), "lm_head.bias": w(v)})
        for i in range(raw["num_hidden_layers"]):
            p = f"model.layers.{i}."
            mlp = (("mlp.fc1", f, d), ("mlp.fc2", d, f)) if phi else (("mlp.c_fc", f, d), ("mlp.c_proj", d, f))
            norms = ("input_layernorm",) if phi else ("input_layernorm", "post_attention_layernorm")
            for name, o, i_ in (("self_attn.q_proj", d, d), ("self_attn.k_proj", kvd, d), ("self_attn.v_proj", kvd, d),
                                ("self_attn.dense" if phi else "self_attn.o_proj", d, d), *mlp):
                sd.update({p + name + ".weight": w(o, i_), p + name + ".bias": w(o)})
            for name in norms:
                sd.update({p + name + ".weight": 1 + w(d, s=0.1), p + name + ".bias": w(d, s=0.1)})
        return sd
    sd = {"gpt_neox.embed_in.weight": w(v, d), "gpt_neox.final_layer_norm.weight": 1 + w(d, s=0.1),
          "gpt_neox.final_layer_norm.bias": w(d, s=0.1)}
    if not raw.get("tie_word_embeddings"):
        sd["embed_out.weight"] = w(v, d)
    for i in range(raw["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "input_layernorm.bias": w(d, s=0.1),
                   p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
                   p + "post_attention_layernorm.bias": w(d, s=0.1),
                   p + "attention.query_key_value.weight": w(3 * d, d), p + "attention.query_key_value.bias": w(3 * d),
                   p + "attention.dense.weight": w(d, d), p + "attention.dense.bias": w(d),
                   p + "mlp.dense_h_to_4h.weight": w(f, d), p + "mlp.dense_h_to_4h.bias": w(f),
                   p + "mlp.dense_4h_to_h.weight": w(d, f), p + "mlp.dense_4h_to_h.bias": w(d),
                   p + "attention.rotary_emb.inv_freq": w(4)})
    return sd


def _falcon_kv(raw):
    if raw.get("new_decoder_architecture"):
        return raw.get("num_kv_heads") or raw["num_attention_heads"]
    return 1 if raw.get("multi_query", True) else raw["num_attention_heads"]


def _falcon_norms(raw):
    if raw.get("new_decoder_architecture"):
        return ("ln_attn", "ln_mlp")
    return ("input_layernorm",) if raw.get("parallel_attn", True) else ("input_layernorm", "post_attention_layernorm")


def _rotary(t, r, base):
    """RoPE on the first ``r`` channels of ``t [B, n, H, d]`` at positions 0..n-1, halves rotated (rotate_half)."""
    inv = 1.0 / base ** (np.arange(0, r, 2) / r)
    ang = np.arange(t.shape[1])[:, None] * inv[None]
    cos, sin = (np.concatenate([f(ang)] * 2, -1)[None, :, None] for f in (np.cos, np.sin))
    rot, rest = t[..., :r], t[..., r:]
    half = np.concatenate([-rot[..., r // 2:], rot[..., :r // 2]], -1)
    return np.concatenate([rot * cos + half * sin, rest], -1)


def _rotary_interleaved(t, r, base=10000.0):
    """GPT-J's RoPE on the first ``r`` channels of ``t [B, n, H, d]``: channels 2i and 2i + 1 rotate together at
    frequency i (``rotate_every_two`` with ``duplicate_interleave``d sines and cosines)."""
    inv = 1.0 / base ** (np.arange(0, r, 2) / r)
    ang = np.arange(t.shape[1])[:, None] * inv[None]
    cos, sin = (np.repeat(f(ang), 2, axis=-1)[None, :, None] for f in (np.cos, np.sin))
    rot, rest = t[..., :r], t[..., r:]
    every_two = np.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    return np.concatenate([rot * cos + every_two * sin, rest], -1)


def _gelu(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _bloom_slopes(heads):
    """transformers' build_alibi_tensor slopes: a geometric sequence for the closest power of two, then every
    other one of the sequence for twice that."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return np.asarray(slopes)


def _attend(q, k, v, window=None, alibi=None):
    """Causal softmax attention, q [B, n, H, hd], k / v [B, n, KV, hd] (GQA: each kv head serves H / KV query
    heads); ``window``: each query sees its last ``window`` keys, itself included (Mistral's / StarCoder2's)."""
    n, rep = q.shape[1], q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if alibi is not None:  # (BLOOM's bias: slope x key position; the softmax drops the query's own shift)
        s = s + alibi[:, None, None] * np.arange(n)[None, None]
    i, j = np.arange(n)[:, None], np.arange(n)[None]
    s = np.where((j <= i) & (j > i - (window or n + 1)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def reference_logits(sd, raw, tokens):
    """float64 numpy forward of transformers' model of each family (GPT2LMHeadModel, GPTNeoXForCausalLM, ...) on
    the folder's own keys."""
    g = {k: np.asarray(a, np.float64) for k, a in sd.items()}
    lin = lambda x, key: x @ g[key + ".weight"].T + g.get(key + ".bias", 0.0)  # noqa: E731  (torch Linear)
    b, n = tokens.shape
    if raw["model_type"] in ("opt", "gpt_bigcode"):
        opt = raw["model_type"] == "opt"
        d, heads = (raw["hidden_size"], raw["num_attention_heads"]) if opt else (raw["n_embd"], raw["n_head"])
        hd = d // heads
        ln = lambda x, key: layer_norm_np(x, g[key + ".weight"], g[key + ".bias"], 1e-5)  # noqa: E731
        pre = "model.decoder." if opt else "transformer."
        emb = g[pre + ("embed_tokens.weight" if opt else "wte.weight")]
        post = opt and not raw.get("do_layer_norm_before", True)  # (OPT-350m: norms after the residual adds)
        proj = opt and pre + "project_in.weight" in g
        x = lin(emb[tokens], pre + "project_in") if proj else emb[tokens]
        x = x + g[pre + ("embed_positions.weight" if opt else "wpe.weight")][np.arange(n) + (2 if opt else 0)]
        for i in range(raw["num_hidden_layers" if opt else "n_layer"]):
            p = f"{pre}layers.{i}." if opt else f"{pre}h.{i}."
            if post:
                q, k, v = (lin(x, p + f"self_attn.{t}_proj").reshape(b, n, heads, hd) for t in "qkv")
                x = ln(x + lin(_attend(q, k, v).reshape(b, n, d), p + "self_attn.out_proj"), p + "self_attn_layer_norm")
                x = ln(x + lin(np.maximum(lin(x, p + "fc1"), 0), p + "fc2"), p + "final_layer_norm")
                continue
            h = ln(x, p + ("self_attn_layer_norm" if opt else "ln_1"))
            if opt:
                q, k, v = (lin(h, p + f"self_attn.{t}_proj").reshape(b, n, heads, hd) for t in "qkv")
            else:
                qkv = lin(h, p + "attn.c_attn")
                q = qkv[..., :d].reshape(b, n, heads, hd)
                k, v = qkv[..., d:d + hd][:, :, None], qkv[..., d + hd:][:, :, None]
            x = x + lin(_attend(q, k, v).reshape(b, n, d), p + ("self_attn.out_proj" if opt else "attn.c_proj"))
            h = ln(x, p + ("final_layer_norm" if opt else "ln_2"))
            act = np.maximum(lin(h, p + "fc1"), 0) if opt else _gelu(lin(h, p + "mlp.c_fc"), "gelu_tanh")
            x = x + lin(act, p + ("fc2" if opt else "mlp.c_proj"))
        if post:
            return (lin(x, pre + "project_out") if proj else x) @ emb.T
        x = ln(x, pre + ("final_layer_norm" if opt else "ln_f"))
        return (lin(x, pre + "project_out") if proj else x) @ emb.T
    if raw["model_type"] == "falcon":
        d, heads, eps, kv = raw["hidden_size"], raw["num_attention_heads"], raw["layer_norm_epsilon"], _falcon_kv(raw)
        hd, per = d // heads, heads // kv
        ln = lambda x, key: layer_norm_np(x, g[key + ".weight"], g[key + ".bias"], eps)  # noqa: E731
        rot = lambda t: t if raw.get("alibi") else _rotary(t, hd, raw["rope_theta"])  # noqa: E731
        x = g["transformer.word_embeddings.weight"][tokens]
        for i in range(raw["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            norms = _falcon_norms(raw)
            h = ln(x, p + norms[0])
            qkv = lin(h, p + "self_attention.query_key_value").reshape(b, n, kv, per + 2, hd)
            q, k, v = qkv[..., :per, :].reshape(b, n, heads, hd), qkv[..., per, :], qkv[..., per + 1, :]
            # (Falcon-RW: ALiBi added to q . k, then both scaled by 1 / sqrt(hd): the slopes scaled)
            alibi = _bloom_slopes(heads) / math.sqrt(hd) if raw.get("alibi") else None
            a = lin(_attend(rot(q), rot(k), v, alibi=alibi).reshape(b, n, d), p + "self_attention.dense")
            mlp = lambda y: lin(_gelu(lin(y, p + "mlp.dense_h_to_4h"), "gelu"), p + "mlp.dense_4h_to_h")  # noqa: E731
            if not raw.get("parallel_attn", True) and not raw.get("new_decoder_architecture"):
                x = x + a
                x = x + mlp(ln(x, p + "post_attention_layernorm"))
            else:
                x = x + a + mlp(ln(x, p + norms[1]) if len(norms) == 2 else h)
        return ln(x, "transformer.ln_f") @ g["transformer.word_embeddings.weight"].T
    if raw["model_type"] in ("gptj", "codegen"):  # one LayerNorm before attention and MLP side by side
        d, heads, eps, r = raw["n_embd"], raw["n_head"], raw["layer_norm_epsilon"], raw["rotary_dim"]
        hd = d // heads
        ln = lambda x, key: layer_norm_np(x, g[key + ".weight"], g[key + ".bias"], eps)  # noqa: E731
        x = g["transformer.wte.weight"][tokens]
        for i in range(raw["n_layer"]):
            p = f"transformer.h.{i}."
            h = ln(x, p + "ln_1")
            if raw["model_type"] == "codegen":  # 4 groups, each its q | v | k columns; heads group-major
                qkv = lin(h, p + "attn.qkv_proj").reshape(b, n, 4, 3, d // 4)
                q, v, k = (qkv[:, :, :, j].reshape(b, n, heads, hd) for j in range(3))
            else:
                q, k, v = (lin(h, p + f"attn.{t}_proj").reshape(b, n, heads, hd) for t in "qkv")
            o = _attend(_rotary_interleaved(q, r), _rotary_interleaved(k, r), v).reshape(b, n, d)
            x = x + lin(o, p + "attn.out_proj") + lin(_gelu(lin(h, p + "mlp.fc_in"), "gelu_tanh"), p + "mlp.fc_out")
        return lin(ln(x, "transformer.ln_f"), "lm_head")
    if raw["model_type"] == "bloom":
        d, heads, eps = raw["hidden_size"], raw["n_head"], raw["layer_norm_epsilon"]
        ln = lambda x, key: layer_norm_np(x, g[key + ".weight"], g[key + ".bias"], eps)  # noqa: E731
        x = ln(g["word_embeddings.weight"][tokens], "word_embeddings_layernorm")
        for i in range(raw["n_layer"]):
            p = f"h.{i}."
            qkv = lin(ln(x, p + "input_layernorm"), p + "self_attention.query_key_value").reshape(b, n, heads, 3, -1)
            o = _attend(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], alibi=_bloom_slopes(heads))
            x = x + lin(o.reshape(b, n, d), p + "self_attention.dense")
            h = _gelu(lin(ln(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h"), "gelu_tanh")
            x = x + lin(h, p + "mlp.dense_4h_to_h")
        return ln(x, "ln_f") @ g["word_embeddings.weight"].T
    if raw["model_type"] == "gpt2":
        t = "transformer." if "transformer.wte.weight" in g else ""
        d, heads, eps = raw["n_embd"], raw["n_head"], raw["layer_norm_epsilon"]
        x = g[t + "wte.weight"][tokens] + g[t + "wpe.weight"][np.arange(n)]
        for i in range(raw["n_layer"]):
            p = f"{t}h.{i}."
            h = layer_norm_np(x, g[p + "ln_1.weight"], g[p + "ln_1.bias"], eps)
            qkv = h @ g[p + "attn.c_attn.weight"] + g[p + "attn.c_attn.bias"]  # Conv1D: x @ W + b
            q, k, v = (a.reshape(b, n, heads, -1) for a in np.split(qkv, 3, axis=-1))
            x = x + _attend(q, k, v).reshape(b, n, d) @ g[p + "attn.c_proj.weight"] + g[p + "attn.c_proj.bias"]
            h = layer_norm_np(x, g[p + "ln_2.weight"], g[p + "ln_2.bias"], eps)
            m = _gelu(h @ g[p + "mlp.c_fc.weight"] + g[p + "mlp.c_fc.bias"], "gelu_tanh")
            x = x + m @ g[p + "mlp.c_proj.weight"] + g[p + "mlp.c_proj.bias"]
        x = layer_norm_np(x, g[t + "ln_f.weight"], g[t + "ln_f.bias"], eps)
        return x @ g[t + "wte.weight"].T
    kind = raw["model_type"]
    d, heads = raw["hidden_size"], raw["num_attention_heads"]
    eps = raw["norm_epsilon" if kind == "starcoder2" else "layer_norm_eps"]
    hd = d // heads
    r = int(hd * ({"gpt_neox": raw.get("rotary_pct"), "phi": raw.get("partial_rotary_factor")}.get(kind) or 1.0))
    rotary = lambda t: _rotary(t, r, raw.get("rotary_emb_base", raw.get("rope_theta")))  # noqa: E731

    act = "gelu" if raw["hidden_act"] == "gelu" else "gelu_tanh"
    if kind in ("phi", "starcoder2"):
        kv = raw["num_key_value_heads"]
        x = g["model.embed_tokens.weight"][tokens]
        for i in range(raw["num_hidden_layers"]):
            p = f"model.layers.{i}."
            ln = lambda y, name: layer_norm_np(y, g[p + name + ".weight"], g[p + name + ".bias"], eps)  # noqa: E731
            h = ln(x, "input_layernorm")
            q, k, v = (lin(h, p + f"self_attn.{t}_proj").reshape(b, n, hh, hd) for t, hh in (("q", heads), ("k", kv), ("v", kv)))
            o = _attend(rotary(q), rotary(k), v, raw.get("sliding_window")).reshape(b, n, d)
            if kind == "phi":  # attention and MLP side by side on one normed input
                x = x + lin(o, p + "self_attn.dense") + lin(_gelu(lin(h, p + "mlp.fc1"), act), p + "mlp.fc2")
            else:
                x = x + lin(o, p + "self_attn.o_proj")
                x = x + lin(_gelu(lin(ln(x, "post_attention_layernorm"), p + "mlp.c_fc"), act), p + "mlp.c_proj")
        final = "model.final_layernorm" if kind == "phi" else "model.norm"
        x = layer_norm_np(x, g[final + ".weight"], g[final + ".bias"], eps)
        if kind == "phi":
            return x @ g["lm_head.weight"].T + g["lm_head.bias"]
        return x @ g["model.embed_tokens.weight"].T
    x = g["gpt_neox.embed_in.weight"][tokens]
    for i in range(raw["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        h = layer_norm_np(x, g[p + "input_layernorm.weight"], g[p + "input_layernorm.bias"], eps)
        qkv = lin(h, p + "attention.query_key_value").reshape(b, n, heads, 3 * hd)
        q, k, v = np.split(qkv, 3, axis=-1)
        a = lin(_attend(rotary(q), rotary(k), v).reshape(b, n, d), p + "attention.dense")
        mlp = lambda y: lin(_gelu(lin(y, p + "mlp.dense_h_to_4h"), act), p + "mlp.dense_4h_to_h")  # noqa: E731
        norm2 = lambda y: layer_norm_np(y, g[p + "post_attention_layernorm.weight"], g[p + "post_attention_layernorm.bias"], eps)  # noqa: E731
        if raw["use_parallel_residual"]:
            x = x + a + mlp(norm2(x))
        else:
            x = x + a
            x = x + mlp(norm2(x))
    x = layer_norm_np(x, g["gpt_neox.final_layer_norm.weight"], g["gpt_neox.final_layer_norm.bias"], eps)
    return x @ (g["gpt_neox.embed_in.weight"] if raw.get("tie_word_embeddings") else g["embed_out.weight"]).T


def write_folder(path, raw, sd):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    write_safetensors(path / "model.safetensors", {k: np.ascontiguousarray(a) for k, a in sd.items()})
    return path


@pytest.mark.parametrize("raw", CONFIGS, ids=IDS)
def test_folder_gives_the_reference_logits_decodes_and_round_trips(tmp_path, raw):
    sd = random_state_dict(raw, seed=1)
    want = reference_logits(sd, raw, TOKENS)
    model = load_pretrained(write_folder(tmp_path / "in", raw, sd), attn_impl="xla")
    cfg = model.cfg
    gptj = raw["model_type"] in ("gptj", "codegen")
    assert (cfg.norm, cfg.bias, cfg.mlp_has_bias, cfg.mlp_gated) == ("layer", raw.get("bias", not gptj),
                                                                     raw.get("bias", True), False)
    assert cfg.position == {"gpt2": "learned", "bloom": "alibi", "opt": "learned", "gpt_bigcode": "learned"}.get(
        raw["model_type"], "alibi" if raw.get("alibi") else "rope")
    assert cfg.head_bias == (raw["model_type"] == "phi" or gptj) and cfg.shared_norm == (raw in (PHI, FALCON) or gptj)
    got = model(jnp.asarray(TOKENS))
    assert_close(got, want, F32, f"{raw['model_type']} logits", tol=TOL)
    again = GPT(cfg, rngs=nnx.Rngs(3))
    load_hf_state_dict(again, sd)  # (the family read from the keys)
    np.testing.assert_array_equal(again(jnp.asarray(TOKENS)), got)
    # prefill + token-by-token decode with the KV cache: the forward's logits (learned positions at the offsets)
    last, cache = nnx.jit(lambda m, t: m.prefill(t, 16))(model, jnp.asarray(TOKENS[:, :6]))
    assert_close(last, want[:, 5], F32, "prefill", tol=TOL)
    step = nnx.jit(lambda m, tok, c, pos: m.decode_step(tok, c, pos))
    for pos in range(6, TOKENS.shape[1]):
        logits, cache = step(model, jnp.asarray(TOKENS[:, pos]), cache, jnp.int32(pos))
        assert_close(logits, want[:, pos], F32, f"decode step {pos}", tol=TOL)
    # save_pretrained: the folder's own keys, layouts and values (fused and Conv1D again), the same config
    save_pretrained(model, tmp_path / "out")
    kind = {id(NEOX_SEQ): "starcoder2", id(FALCON_SEQ): "starcoder2", id(CODEGEN): "gptj"}.get(
        id(raw), raw["model_type"])  # (the same block)
    assert hf_model_type(tmp_path / "out") == kind
    assert config_from_hf(hf_config(cfg), attn_impl="xla") == cfg
    np.testing.assert_array_equal(load_pretrained(tmp_path / "out", attn_impl="xla")(jnp.asarray(TOKENS)), got)
    if kind != raw["model_type"]:
        return
    from jaxattn.models.safetensors_io import read_state_dict

    out = read_state_dict(tmp_path / "out")
    kept = {k: a for k, a in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    if raw is BLOOM:  # (saved as BloomForCausalLM does: under transformer.)
        kept = {"transformer." + k: a for k, a in kept.items()}
    assert sorted(out) == sorted(kept)
    for k, a in kept.items():
        np.testing.assert_array_equal(out[k], a, err_msg=k)
    np.testing.assert_array_equal(to_hf_state_dict(model)[sorted(kept)[0]], kept[sorted(kept)[0]])


def test_gpt2_saved_without_the_transformer_prefix(tmp_path):
    """OpenAI's gpt2 folder was saved from GPT2Model: keys ``h.0.attn.c_attn.weight``, ``wte.weight``, ..."""
    sd = random_state_dict(GPT2, seed=2, prefix=False)
    model = load_pretrained(write_folder(tmp_path, GPT2, sd), attn_impl="xla")
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, GPT2, TOKENS), F32, "unprefixed gpt2", tol=TOL)


def test_classic_block_trains_and_checks_its_arguments():
    """A classic-block GPT from a config (no folder): finite gradients through every new parameter, LoRA on
    its ``up`` layer; positions past the learned table, bad options and LLaMA layouts are refused."""
    from jaxattn.models.gpt_hf import hf_config as llama_config
    from jaxattn.models.lora import add_lora, lora_linears

    cfg = GPTConfig(vocab_size=64, dim=32, layers=2, heads=4, norm="layer", bias=True, mlp_gated=False,
                    mlp_act="gelu", position="learned", max_positions=16, attn_impl="xla")
    assert cfg.hidden == 128  # (4 dim for a plain MLP)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(model)
    flat = dict(nnx.to_flat_state(nnx.state(grads, nnx.Param)))
    for key in [("pos_embed", "embedding"), ("norm", "bias"), ("blocks", 0, "mlp", "up", "bias"),
                ("blocks", 1, "attn", "o", "bias"), ("blocks", 0, "attn", "kv", "bias")]:
        g = np.asarray(flat[key][...])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, key
    from jaxattn.models import create_model

    tiny = create_model("gpt2-tiny", rngs=nnx.Rngs(1), dim=32, layers=1, heads=2, attn_impl="xla")
    assert nnx.jit(lambda m, t: m(t))(tiny, tokens).shape == (2, 16, 256) and tiny.cfg.max_positions == 1024 and tiny.blocks[0].mlp.up.bias is not None
    add_lora(model, 2, targets=("up",))
    assert [p[-1] for p, _ in lora_linears(model)] == ["up", "up"]
    with pytest.raises(ValueError, match="17 positions, past the model's learned 16"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="max_len 20: the model's learned positions end at 16"):
        model.init_cache(1, 20)
    with pytest.raises(ValueError, match="norm must be 'rms' or 'layer'"):
        GPTConfig(norm="batch")
    with pytest.raises(ValueError, match="norm_offset .* needs norm='rms'"):
        GPTConfig(norm="layer", norm_offset=1.0)
    with pytest.raises(ValueError, match="parallel_residual .* needs pre_norms=True"):
        GPTConfig(parallel_residual=True, pre_norms=False, post_norms=True)
    with pytest.raises(ValueError, match="shared_norm .* needs parallel_residual"):
        GPTConfig(shared_norm=True)
    with pytest.raises(ValueError, match="head_bias .* needs tie_embeddings=False"):
        GPTConfig(head_bias=True)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        config_from_hf({**PHI, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="gpt_classic_hf has its layouts"):
        llama_config(cfg)
    with pytest.raises(ValueError, match="a GPT-2 / GPT-NeoX / Phi / StarCoder2 layout has LayerNorms"):
        hf_config(GPTConfig(norm="layer", bias=True, mlp_gated=False, mlp_act="silu"))
    with pytest.raises(ValueError, match="embed_norm.* is BLOOM's"):
        hf_config(GPTConfig(norm="layer", bias=True, mlp_gated=False, mlp_act="gelu", embed_norm=True))
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        config_from_hf({**BLOOM, "apply_residual_connection_post_layernorm": True})
    with pytest.raises(ValueError, match="position_offset .* needs position='learned'"):
        GPTConfig(position_offset=2)
    with pytest.raises(ValueError, match="_remove_final_layer_norm = True"):
        config_from_hf({**OPT, "_remove_final_layer_norm": True})
    with pytest.raises(ValueError, match="ReLU MLPs.* are OPT's"):
        hf_config(GPTConfig(norm="layer", bias=True, mlp_gated=False, mlp_act="relu"))
    for field in (dict(post_ln=True), dict(embed_dim=16)):
        with pytest.raises(ValueError, match="OPT-350m's: learned positions with position_offset 2"):
            hf_config(GPTConfig(norm="layer", bias=True, mlp_gated=False, mlp_act="gelu", position="learned", **field))
        with pytest.raises(ValueError, match="are OPT's"):
            hf_config(GPTConfig(norm="layer", bias=True, mlp_gated=False, mlp_act="gelu", **field))
    with pytest.raises(ValueError, match="post_ln moves the two block norms"):
        GPTConfig(post_ln=True, pre_norms=False, post_norms=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        config_from_hf({**GPT2, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="hidden_act = 'silu'"):
        config_from_hf({**NEOX, "hidden_act": "silu"})
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf({**NEOX, "attention_bias": False})


@pytest.mark.parametrize("raw", CONFIGS, ids=IDS)
def test_matches_transformers(tmp_path, raw):
    """transformers' own classes on a folder it saved (its layouts, its numerics), and on our export."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name = {"gpt2": "GPT2", "gpt_neox": "GPTNeoX", "phi": "Phi", "starcoder2": "Starcoder2",
            "bloom": "Bloom", "falcon": "Falcon", "opt": "OPT", "gpt_bigcode": "GPTBigCode", "gptj": "GPTJ",
            "codegen": "CodeGen"}[raw["model_type"]]
    conf = getattr(transformers, name + "Config")(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(0)
    ref = getattr(transformers, name + ("LMHeadModel" if name == "GPT2" else "ForCausalLM"))(conf).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    ref.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    with torch.no_grad():
        want = ref(torch.as_tensor(TOKENS)).logits.numpy()
    model = load_pretrained(tmp_path / "theirs", attn_impl="xla")
    assert_close(model(jnp.asarray(TOKENS)), want, F32, "logits vs transformers", tol={jnp.dtype(F32): (1e-4, 1e-4)})
    save_pretrained(model, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        got = again(torch.as_tensor(TOKENS)).logits.numpy()
    assert_close(got, want, F32, "transformers on our export", tol={jnp.dtype(F32): (1e-4, 1e-4)})


def test_gpt2_peft_adapter_on_conv1d_weights(tmp_path):
    """A PEFT LoRA adapter for GPT-2 (``fan_in_fan_out``: its Conv1D weights are ``[in, out]``, so the update
    is ``(B A)^T``) folds into an unprefixed gpt2 folder: the oracle on the merged weights; with PEFT installed,
    PEFT's own model on an adapter it saved."""
    sd = random_state_dict(GPT2, seed=4, prefix=False)
    folder = write_folder(tmp_path / "gpt2", GPT2, sd)
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 0.3, (2, 32)).astype(np.float32), rng.normal(0, 0.3, (96, 2)).astype(np.float32)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "fan_in_fan_out": True, "target_modules": ["c_attn"]}))
    write_safetensors(adapter / "adapter_model.safetensors",
                      {"base_model.model.transformer.h.1.attn.c_attn.lora_A.weight": a,
                       "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight": b})
    merged = {**sd, "h.1.attn.c_attn.weight": sd["h.1.attn.c_attn.weight"] + 4.0 * (b @ a).T}
    got = load_pretrained(folder, adapter=adapter, attn_impl="xla")(jnp.asarray(TOKENS))
    assert_close(got, reference_logits(merged, GPT2, TOKENS), F32, "gpt2 + fan_in_fan_out adapter", tol=TOL)
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{k: v for k, v in GPT2.items() if k != "model_type"}))
    for p in base.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    base.eval().save_pretrained(tmp_path / "theirs", safe_serialization=True)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                      fan_in_fan_out=True))
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0.0, 0.3)
    tuned.save_pretrained(tmp_path / "their-adapter")
    with torch.no_grad():
        want = tuned.eval()(torch.as_tensor(TOKENS)).logits.numpy()
    got = load_pretrained(tmp_path / "theirs", adapter=tmp_path / "their-adapter", attn_impl="xla")(jnp.asarray(TOKENS))
    assert_close(got, want, F32, "vs PEFT's GPT-2 adapter", tol={jnp.dtype(F32): (1e-4, 1e-4)})
