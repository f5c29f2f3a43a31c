"""Kimi Linear (jaxattn.models.kimi_linear_hf; GPT with Kimi Delta Attention layers, NoPE multi-head latent attention
and DeepSeek-V3's experts): Hugging Face folders load to the logits of a float64 numpy forward written from Kimi
Linear's math in the checkpoint layout (the three depthwise convolutions, the low-rank per-channel forget gate, the
delta rule token by token with a decay per key channel, the sigmoid-gated RMSNorm, latent attention without RoPE,
sigmoid routing with the selection bias, shared experts, a dense first layer); the original config's
linear_attn_config reads the same; folders round-trip byte for byte; prefill then recurrent decoding (states and
latent caches) gives the forward; transformers' own model agrees (when installed)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_folder, assert_close, check_causal_lm_matches_transformers
from jaxattn.models import hf
from jaxattn.models.kimi_linear_hf import config_from_hf
from test_gpt_hf import TOKENS

RAW = {"model_type": "kimi_linear", "vocab_size": 80, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "kv_lora_rank": 24, "q_lora_rank": None,
       "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10, "moe_intermediate_size": 16,
       "n_shared_experts": 1, "num_local_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
       "norm_topk_prob": True, "routed_scaling_factor": 2.5, "tie_word_embeddings": False,
       "layer_types": ["linear_attention", "full_attention", "linear_attention"],
       "mlp_layer_types": ["dense", "sparse", "sparse"], "linear_num_heads": 2, "linear_head_dim": 8,
       "linear_conv_kernel_dim": 3}
# the original config's names: linear_attn_config (1-indexed layers), first_k_dense_replace
ORIGINAL = {**{k: v for k, v in RAW.items() if k not in ("layer_types", "mlp_layer_types", "linear_num_heads",
                                                         "linear_head_dim", "linear_conv_kernel_dim")},
            "first_k_dense_replace": 1, "linear_attn_config": {"num_heads": 2, "head_dim": 8, "short_conv_kernel_size": 3,
                                                               "kda_layers": [1, 3], "full_attn_layers": [2]}}
KINDS = ["kda", "full", "kda"]


def random_state_dict(raw, seed=0):
    rng = np.random.default_rng(seed)
    d, h, v = raw["hidden_size"], raw["num_attention_heads"], raw["vocab_size"]
    nope, rot, vd, rank = raw["qk_nope_head_dim"], raw["qk_rope_head_dim"], raw["v_head_dim"], raw["kv_lora_rank"]
    lh, ld, taps, f, e = 2, 8, 3, RAW["moe_intermediate_size"], RAW["num_local_experts"]

    def w(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd = {"model.embed_tokens.weight": w(v, d, s=1.0), "model.norm.weight": 1 + w(d, s=0.1), "lm_head.weight": w(v, d)}
    for i, kind in enumerate(KINDS):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        sd.update({p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1)})
        if kind == "kda":
            sd.update({a + f"{n}_proj.weight": w(lh * ld, d) for n in "qkv"})
            sd.update({a + f"{n}_conv1d.weight": w(lh * ld, 1, taps, s=0.5) for n in "qkv"})
            sd.update({a + "f_a_proj.weight": w(ld, d), a + "f_b_proj.weight": w(lh * ld, ld), a + "dt_bias": w(lh * ld),
                       a + "A_log": w(1, 1, lh, 1, s=0.5), a + "b_proj.weight": w(lh, d), a + "g_a_proj.weight": w(ld, d),
                       a + "g_b_proj.weight": w(lh * ld, ld), a + "o_norm.weight": 1 + w(ld, s=0.1),
                       a + "o_proj.weight": w(d, lh * ld)})
        else:
            sd.update({a + "q_proj.weight": w(h * (nope + rot), d), a + "kv_a_proj_with_mqa.weight": w(rank + rot, d),
                       a + "kv_a_layernorm.weight": 1 + w(rank, s=0.1), a + "kv_b_proj.weight": w(h * (nope + vd), rank),
                       a + "o_proj.weight": w(d, h * vd)})
        if i == 0:
            m = p + "mlp."
            sd.update({m + "gate_proj.weight": w(40, d), m + "up_proj.weight": w(40, d), m + "down_proj.weight": w(d, 40)})
            continue
        m = p + "block_sparse_moe."
        sd.update({m + "gate.weight": w(e, d, s=1.0), m + "gate.e_score_correction_bias": w(e, s=0.5),
                   m + "shared_experts.gate_proj.weight": w(f, d), m + "shared_experts.up_proj.weight": w(f, d),
                   m + "shared_experts.down_proj.weight": w(d, f)})
        for j in range(e):
            sd.update({f"{m}experts.{j}.w1.weight": w(f, d), f"{m}experts.{j}.w3.weight": w(f, d),
                       f"{m}experts.{j}.w2.weight": w(d, f)})
    return sd


def reference_logits(sd, raw, tokens):
    """float64 numpy forward of Kimi Linear from the checkpoint's layout."""
    W = {k: np.asarray(x, np.float64) for k, x in sd.items()}
    eps, h = raw["rms_norm_eps"], raw["num_attention_heads"]
    nope, rot, vd, rank = raw["qk_nope_head_dim"], raw["qk_rope_head_dim"], raw["v_head_dim"], raw["kv_lora_rank"]
    lh, ld = 2, 8
    tokens = np.asarray(tokens)
    b, n = tokens.shape

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

    def lin(x, name):
        return x @ W[name + ".weight"].T

    def silu(x):
        return x / (1 + np.exp(-x))

    def mlp(x, p, gate="gate_proj", up="up_proj", down="down_proj"):
        return lin(silu(lin(x, p + gate)) * lin(x, p + up), p + down)

    x = W["model.embed_tokens.weight"][tokens]
    for i, kind in enumerate(KINDS):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        y = norm(x, W[p + "input_layernorm.weight"])
        if kind == "kda":
            mixed = []
            for name in "qkv":  # each projection through its own depthwise causal convolution, then SiLU
                z, taps = lin(y, a + f"{name}_proj"), W[a + f"{name}_conv1d.weight"][:, 0, :]
                conv = np.zeros_like(z)
                for t in range(n):
                    for j in range(taps.shape[1]):
                        if t - taps.shape[1] + 1 + j >= 0:
                            conv[:, t] += taps[:, j] * z[:, t - taps.shape[1] + 1 + j]
                mixed.append(silu(conv).reshape(b, n, lh, ld))
            q, k, v = mixed
            q, k = (u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6) for u in (q, k))
            f = (lin(lin(y, a + "f_a_proj"), a + "f_b_proj") + W[a + "dt_bias"]).reshape(b, n, lh, ld)
            g = -np.exp(W[a + "A_log"].reshape(lh))[:, None] * np.log1p(np.exp(f))  # [b, n, H, d_k]
            beta = 1 / (1 + np.exp(-lin(y, a + "b_proj")))
            state, o = np.zeros((b, lh, ld, ld)), np.zeros((b, n, lh, ld))
            for t in range(n):  # S = (I - beta k kᵀ) diag(exp(g)) S + beta k vᵀ, rows of S decaying per channel
                state = np.exp(g[:, t])[..., None] * state
                pred = np.einsum("bhk,bhkv->bhv", k[:, t], state)
                state = state + np.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - pred))
                o[:, t] = ld ** -0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], state)
            gate = 1 / (1 + np.exp(-lin(lin(y, a + "g_a_proj"), a + "g_b_proj").reshape(b, n, lh, ld)))
            x = x + lin((norm(o, W[a + "o_norm.weight"]) * gate).reshape(b, n, -1), a + "o_proj")
        else:  # latent attention, no positional encoding
            q = lin(y, a + "q_proj").reshape(b, n, h, nope + rot)
            ckv = lin(y, a + "kv_a_proj_with_mqa")
            c, k_pe = norm(ckv[..., :rank], W[a + "kv_a_layernorm.weight"]), ckv[..., rank:]
            kv = lin(c, a + "kv_b_proj").reshape(b, n, h, nope + vd)
            k = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe[:, :, None], (b, n, h, rot))], -1)
            s = np.einsum("bqhd,bkhd->bhqk", q, k) * (nope + rot) ** -0.5
            s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            o = np.einsum("bhqk,bkhd->bqhd", pr / pr.sum(-1, keepdims=True), kv[..., nope:])
            x = x + lin(o.reshape(b, n, -1), a + "o_proj")
        y = norm(x, W[p + "post_attention_layernorm.weight"])
        if i == 0:
            x = x + mlp(y, p + "mlp.")
            continue
        m = p + "block_sparse_moe."
        scores = 1 / (1 + np.exp(-lin(y, m + "gate")))
        top = np.argsort(-(scores + W[m + "gate.e_score_correction_bias"]), -1, kind="stable")[..., :2]
        weights = np.take_along_axis(scores, top, -1)
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * raw["routed_scaling_factor"]
        moe = mlp(y, m + "shared_experts.")
        for j in range(RAW["num_local_experts"]):
            moe = moe + (weights * (top == j)).sum(-1, keepdims=True) * mlp(y, f"{m}experts.{j}.", "w1", "w3", "w2")
        x = x + moe
    return lin(norm(x, W["model.norm.weight"]), "lm_head")


@pytest.mark.parametrize("raw", [RAW, ORIGINAL], ids=["transformers-config", "original-config"])
def test_folder_gives_the_reference_logits_and_round_trips(tmp_path, raw):
    sd = random_state_dict(raw, seed=1)
    model = hf.load_pretrained(hf_folder(tmp_path / "in", raw, sd), attn_impl="xla")
    assert [b.attn.kind for b in model.blocks] == KINDS
    assert_close(model(jnp.asarray(TOKENS)), reference_logits(sd, raw, TOKENS), jnp.float32, "logits",
                 tol={jnp.dtype(jnp.float32): (2e-4, 2e-4)})
    hf.save_pretrained(model, tmp_path / "out")
    back = hf.read_state_dict(tmp_path / "out")
    assert set(back) == set(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
    again = hf.load_pretrained(tmp_path / "out", attn_impl="xla")
    assert again.cfg == model.cfg


def test_recurrent_decoding_gives_the_forward(tmp_path):
    """Prefill, then one token at a time: the KDA layers from their states and convolution histories, the latent
    attention layer from its latent cache."""
    model = hf.load_pretrained(hf_folder(tmp_path, RAW, random_state_dict(RAW, seed=2)), attn_impl="xla")
    tokens = jnp.asarray(TOKENS)
    full = model(tokens)
    logits, cache = model.prefill(tokens[:, :9], max_len=13)
    assert cache[0][0].shape == (2, 2, 8, 8) and cache[1][0].shape == (2, 13, 1, 24 + 8)
    step = nnx.jit(lambda m, *a: m.decode_step(*a))
    tol = {jnp.dtype(jnp.float32): (2e-4, 2e-4)}
    assert_close(logits, full[:, 8], jnp.float32, "prefill", tol=tol)
    for t in range(9, 13):
        logits, cache = step(model, tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=tol)


def test_bad_configs():
    for raw, match in [({**RAW, "moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
                       ({**RAW, "mlp_layer_types": ["sparse", "dense", "sparse"]}, "mlp_layer_types"),
                       ({**RAW, "layer_types": ["linear_attention"] * 2}, "layer_types"),
                       ({k: v for k, v in ORIGINAL.items() if k != "linear_attn_config"}, "layer_types")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf(raw)


def test_matches_transformers(tmp_path):
    """transformers' KimiLinearForCausalLM with random weights, saved by transformers: our logits and greedy tokens
    are theirs."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "KimiLinearForCausalLM"):
        pytest.skip("this transformers has no Kimi Linear")
    config = transformers.KimiLinearConfig(**{k: v for k, v in RAW.items() if k != "model_type"}, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2)
    # (greedy tokens from its full forward: transformers 5.25's cached generate for Kimi Linear gives other logits
    # than its own forward from the first new token on)
    check_causal_lm_matches_transformers(tmp_path, transformers.KimiLinearForCausalLM(config), TOKENS,
                                         greedy_by_forward=True)


def test_registry_model_trains():
    from conftest import lm_grads

    loss, grads = lm_grads("kimi-linear-tiny", layers=2, moe_dense_layers=1, layer_types=("kda", "full"))
    assert np.isfinite(float(loss))
    for g in (grads.blocks[0].attn.f_b.kernel, grads.blocks[1].attn.kv_b.kernel, grads.blocks[1].mlp.router.kernel):
        assert np.abs(np.asarray(g[...])).max() > 0


# Kimi-Linear-48B-A3B's config.json, its architecture fields (as the model card's repository lists them)
RAW_48B = {"model_type": "kimi_linear", "vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216,
           "moe_intermediate_size": 1024, "num_hidden_layers": 27, "num_attention_heads": 32, "num_key_value_heads": 32,
           "n_shared_experts": 1, "num_experts": 256, "num_experts_per_tok": 8, "routed_scaling_factor": 2.446,
           "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
           "moe_router_activation_func": "sigmoid", "num_expert_group": 1, "topk_group": 1, "moe_renormalize": True,
           "first_k_dense_replace": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "linear_attn_config": {"full_attn_layers": [4, 8, 12, 16, 20, 24, 27], "head_dim": 128, "num_heads": 32,
                                  "short_conv_kernel_size": 4,
                                  "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)]}}


def test_48b_registry_entry_is_the_config_and_has_48b_parameters():
    """The registry's kimi-linear-48b-a3b is what its config.json loads as (the fields that shape the model), and,
    abstract shapes only, holds about 48B parameters (49B counted)."""
    import dataclasses

    import jax

    from jaxattn.models import create_model
    from jaxattn.models.registry import MODEL_CONFIGS

    want, got = config_from_hf(RAW_48B), MODEL_CONFIGS["kimi-linear-48b-a3b"]
    fields = ("vocab_size", "dim", "layers", "heads", "head_dim", "qk_rope_dim", "v_head_dim", "kv_lora_rank",
              "q_lora_rank", "mlp_dim", "layer_types", "delta_heads", "delta_head_dim", "delta_conv", "moe_experts",
              "moe_top_k", "moe_dim", "moe_dense_layers", "moe_shared_dim", "moe_scoring", "moe_score_bias",
              "moe_renormalize", "moe_routed_scale", "norm_eps", "tie_embeddings", "rope_layers")
    diff = {f: (getattr(got, f), getattr(want, f)) for f in fields if getattr(got, f) != getattr(want, f)}
    assert not diff, diff
    assert {f.name for f in dataclasses.fields(got)} >= set(fields)
    model = nnx.eval_shape(lambda: create_model("kimi-linear-48b-a3b", rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 48e9 < total < 50e9, total
