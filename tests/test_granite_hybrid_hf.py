"""Granite 4.0 hybrid folders (model_type granitemoehybrid: Mamba-2 and softmax layers, Granite's multipliers, experts
with an ungated shared MLP or a dense shared MLP alone): random weights under Hugging Face's keys and shapes, loaded
by jaxattn.models.hf, give the logits of a float64 numpy forward written here from transformers' GraniteMoeHybrid
(BambaMixer's Mamba-2 with the fused in_proj and x | B | C convolution channels, the gated RMSNorm over all
channels; Granite-MoE's top-k softmax router); the model saves back to the same tensors; unsupported configs
raise."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from jaxattn.models import hf
from jaxattn.models.safetensors_io import read_state_dict, write_safetensors

BASE = dict(model_type="granitemoehybrid", architectures=["GraniteMoeHybridForCausalLM"], vocab_size=97,
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=16,
            mamba_d_head=16, mamba_expand=2, mamba_d_conv=4, mamba_conv_bias=True, mamba_proj_bias=False,
            embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5,
            max_position_embeddings=64, tie_word_embeddings=True, hidden_act="silu")
MOE = dict(BASE, num_local_experts=4, num_experts_per_tok=2, intermediate_size=24, shared_intermediate_size=40,
           position_embedding_type="nope")
DENSE = dict(BASE, num_local_experts=0, intermediate_size=24, shared_intermediate_size=40,
             position_embedding_type="rope", rope_theta=10000.0, tie_word_embeddings=False)


def _weights(raw: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, L = raw["hidden_size"], raw["num_hidden_layers"]
    h, n, p, k = raw["mamba_n_heads"], raw["mamba_d_state"], raw["mamba_d_head"], raw["mamba_d_conv"]
    di, conv_dim = h * p, h * p + 2 * n
    hd = d // raw["num_attention_heads"]
    w = lambda *shape, s=0.15: (s * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": w(raw["vocab_size"], d, s=1.0), "model.norm.weight": 1 + w(d)}
    if not raw["tie_word_embeddings"]:
        sd["lm_head.weight"] = w(raw["vocab_size"], d)
    for i, kind in enumerate(raw["layer_types"]):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"], sd[pre + "post_attention_layernorm.weight"] = 1 + w(d), 1 + w(d)
        if kind == "mamba":
            m = pre + "mamba."
            sd.update({m + "in_proj.weight": w(2 * di + 2 * n + h, d), m + "conv1d.weight": w(conv_dim, 1, k, s=0.4),
                       m + "conv1d.bias": w(conv_dim), m + "A_log": np.log(rng.uniform(1, 8, h)).astype(np.float32),
                       m + "D": 1 + w(h), m + "dt_bias": w(h, s=1.0), m + "norm.weight": 1 + w(di),
                       m + "out_proj.weight": w(d, di)})
        else:
            a, kv = pre + "self_attn.", raw["num_key_value_heads"] * hd
            sd.update({a + "q_proj.weight": w(d, d), a + "k_proj.weight": w(kv, d), a + "v_proj.weight": w(kv, d),
                       a + "o_proj.weight": w(d, d)})
        e = raw["num_local_experts"]
        sd.update({pre + "shared_mlp.input_linear.weight": w(2 * raw["shared_intermediate_size"], d),
                   pre + "shared_mlp.output_linear.weight": w(d, raw["shared_intermediate_size"])})
        if e:
            f = raw["intermediate_size"]
            sd.update({pre + "block_sparse_moe.router.layer.weight": w(e, d, s=0.5),
                       pre + "block_sparse_moe.input_linear.weight": w(e, 2 * f, d),
                       pre + "block_sparse_moe.output_linear.weight": w(e, d, f)})
    return sd


def _rms(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _silu(x):
    return x / (1 + np.exp(-x))


def _mamba(sd, m, raw, x):
    h, n, p = raw["mamba_n_heads"], raw["mamba_d_state"], raw["mamba_d_head"]
    di, t = h * p, x.shape[0]
    proj = x @ sd[m + "in_proj.weight"].T
    z, xbc, dt = np.split(proj, [di, 2 * di + 2 * n], axis=-1)
    wconv, k = sd[m + "conv1d.weight"][:, 0, :], raw["mamba_d_conv"]
    conv = np.stack([sd[m + "conv1d.bias"] + sum(wconv[:, j] * xbc[s - k + 1 + j] for j in range(k)
                                                 if s - k + 1 + j >= 0) for s in range(t)])
    xs, b, c = np.split(_silu(conv), [di, di + n], axis=-1)
    dt = np.log1p(np.exp(dt + sd[m + "dt_bias"]))
    a = -np.exp(sd[m + "A_log"])
    xs = xs.reshape(t, h, p)
    state, y = np.zeros((h, n, p)), np.zeros((t, h, p))
    for s in range(t):
        state = np.exp(dt[s] * a)[:, None, None] * state + b[s][None, :, None] * (dt[s][:, None] * xs[s])[:, None, :]
        y[s] = np.einsum("n,hnp->hp", c[s], state) + sd[m + "D"][:, None] * xs[s]
    gated = y.reshape(t, di) * _silu(z)
    return _rms(gated, sd[m + "norm.weight"], raw["rms_norm_eps"]) @ sd[m + "out_proj.weight"].T


def _attention(sd, a, raw, x):
    t, heads, kvh = x.shape[0], raw["num_attention_heads"], raw["num_key_value_heads"]
    hd = raw["hidden_size"] // heads
    q = (x @ sd[a + "q_proj.weight"].T).reshape(t, heads, hd)
    k = (x @ sd[a + "k_proj.weight"].T).reshape(t, kvh, hd)
    v = (x @ sd[a + "v_proj.weight"].T).reshape(t, kvh, hd)
    if raw.get("position_embedding_type") == "rope":
        inv = raw["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(t)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
        rot = lambda u: np.concatenate([-u[..., hd // 2:], u[..., :hd // 2]], -1)  # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = np.repeat(k, heads // kvh, axis=1), np.repeat(v, heads // kvh, axis=1)
    s = np.einsum("thd,shd->hts", q, k) * raw["attention_multiplier"]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", pr, v).reshape(t, -1) @ sd[a + "o_proj.weight"].T


def _glu(x, w_in, w_out):
    g, u = np.split(x @ w_in.T, 2, axis=-1)
    return (_silu(g) * u) @ w_out.T


def _forward(sd, raw, tokens):
    sd = {key: np.asarray(v, np.float64) for key, v in sd.items()}
    x = sd["model.embed_tokens.weight"][tokens] * raw["embedding_multiplier"]
    eps, r = raw["rms_norm_eps"], raw["residual_multiplier"]
    for i, kind in enumerate(raw["layer_types"]):
        pre = f"model.layers.{i}."
        hn = _rms(x, sd[pre + "input_layernorm.weight"], eps)
        y = _mamba(sd, pre + "mamba.", raw, hn) if kind == "mamba" else _attention(sd, pre + "self_attn.", raw, hn)
        x = x + y * r
        hn = _rms(x, sd[pre + "post_attention_layernorm.weight"], eps)
        y = _glu(hn, sd[pre + "shared_mlp.input_linear.weight"], sd[pre + "shared_mlp.output_linear.weight"])
        if raw["num_local_experts"]:
            e = pre + "block_sparse_moe."
            logits = hn @ sd[e + "router.layer.weight"].T
            for s in range(hn.shape[0]):
                top = np.argsort(-logits[s])[:raw["num_experts_per_tok"]]
                gates = np.exp(logits[s, top] - logits[s, top].max())
                for j, g in zip(top, gates / gates.sum()):
                    y[s] += g * _glu(hn[s], sd[e + "input_linear.weight"][j], sd[e + "output_linear.weight"][j])
        x = x + y * r
    x = _rms(x, sd["model.norm.weight"], eps)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return x @ head.T / raw["logits_scaling"]


@pytest.mark.parametrize("raw", [MOE, pytest.param(DENSE, marks=pytest.mark.slow)], ids=["moe-nope", "dense-rope"])
def test_folder_loads_to_the_reference_logits_and_saves_back(raw, tmp_path):
    sd = _weights(raw, seed=len(raw))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    write_safetensors(tmp_path / "model.safetensors", sd)
    model = hf.load_pretrained(tmp_path)
    assert [model.cfg.layer_type(i) for i in range(3)] == ["mamba2", "full", "mamba2"]
    tokens = np.random.default_rng(0).integers(0, raw["vocab_size"], (1, 11))
    want = _forward(sd, raw, tokens[0])
    assert_close(model(jnp.asarray(tokens))[0], want, jnp.float32, "logits", tol={jnp.dtype(jnp.float32): (2e-4, 2e-4)})
    hf.save_pretrained(model, tmp_path / "saved")
    saved = read_state_dict(tmp_path / "saved")
    assert set(saved) == set(sd)
    for key, value in sd.items():
        np.testing.assert_allclose(np.asarray(saved[key]), value, rtol=0, atol=0, err_msg=key)
    again = hf.load_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(np.asarray(again(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))),
                               rtol=1e-6, atol=1e-6)


def test_unsupported_configs_raise():
    for change, match in [(dict(mamba_n_groups=2), "mamba_n_groups"), (dict(mamba_proj_bias=True), "mamba_proj_bias"),
                          (dict(time_step_limit=[0.001, 0.1]), "time_step_limit"),
                          (dict(layer_types=["mamba", "mlp", "mamba"]), "layer_types"),
                          (dict(mamba_n_heads=3), "mamba_expand")]:
        with pytest.raises(ValueError, match=match):
            hf._converter("granitemoehybrid").config_from_hf(dict(MOE, **change))
