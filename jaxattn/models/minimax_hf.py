"""MiniMax-01 checkpoints in the Hugging Face layout (``MiniMaxForCausalLM``, ``model_type: minimax``: MiniMax-Text-01,
MiniMax-M1) <-> :class:`jaxattn.models.gpt.GPT` with lightning layers (:mod:`jaxattn.models.minimax`), softmax
layers, a Mixtral-style mixture of experts in every layer and MiniMax's scaled normed residuals.

=================================================  =====================================  ==========
Hugging Face key (layer ``i``, expert ``j``)        jaxattn variable (``blocks.i.``)        layout
=================================================  =====================================  ==========
``input_layernorm`` / ``post_attention_layernorm``  ``norm1`` / ``norm2``                   same
lightning: ``self_attn.qkv_proj``                   ``attn.qkv`` (per head ``[q | k | v]``)   transposed
lightning: ``self_attn.output_gate``, ``out_proj``  ``attn.gate``, ``attn.out``             transposed
lightning: ``self_attn.norm``                       ``attn.norm``                           same
softmax: ``self_attn.q_proj`` / ``k_proj`` + ``v_proj`` / ``o_proj``  ``attn.q`` / ``attn.kv`` / ``attn.o``  as LLaMA's
``block_sparse_moe.gate``, ``.experts.j.w1/w3/w2``  ``mlp.router``, ``mlp.gate_up[j]``, ``mlp.down[j]``  as Mixtral's
=================================================  =====================================  ==========

The lightning layers' decay buffers (``slope_rate``, ``query_decay``, ...) are computed from the config, not
read. ``layer_types`` (``linear_attention`` / ``full_attention``) or the original ``attn_type_list`` (0 / 1) give
each layer's kind; ``rotary_dim`` (the original config's partial RoPE) is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf, moe_hf
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.gpt_hf import _kv, _period, _scaling, linear_layer_kinds, rope_parameters

__all__ = ["config_from_hf", "entries", "hf_config", "load", "load_hf_state_dict", "to_hf_state_dict"]

_ARCH = {"minimax": "MiniMaxForCausalLM"}
_SCALES = ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
           "mlp_alpha_factor", "mlp_beta_factor")
# the original config.json's names of the same factors
_ORIGINAL_SCALES = ("layernorm_full_attention_alpha", "layernorm_full_attention_beta", "layernorm_linear_attention_alpha",
                    "layernorm_linear_attention_beta", "layernorm_mlp_alpha", "layernorm_mlp_beta")


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a MiniMax ``config.json`` dict (``overrides``: jaxattn fields)."""
    if raw.get("model_type") not in _ARCH:
        raise ValueError(f"config.json: model_type {raw.get('model_type')!r}: expected 'minimax'")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's MiniMax supports {want} only")

    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", '"silu"')
    if raw.get("sliding_window") is not None:
        raise bad("sliding_window", "null")
    if not raw.get("postnorm", True):
        raise bad("postnorm", "true (each residual is the branch's normed input)")
    layers = int(raw["num_hidden_layers"])
    kinds = linear_layer_kinds(raw, "lightning", bad)
    if kinds is None and raw.get("attn_type_list"):  # (the original config: 0 lightning, 1 softmax)
        kinds = ["full" if int(t) else "lightning" for t in raw["attn_type_list"]]
    elif kinds is None:  # (MiniMaxConfig's default)
        kinds = ["full" if (i + 1) % 2 else "lightning" for i in range(layers)]
    dim, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or dim // heads)
    glob = {**(raw.get("rope_parameters") or {}), **(raw.get("rope_scaling") or {})}
    theta = float(glob.get("rope_theta", raw.get("rope_theta", 1e6)))
    rotary = raw.get("rotary_dim")
    partial = float(glob.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rotary = int(rotary) if rotary else int(head_dim * partial)
    fields = dict(
        vocab_size=int(raw["vocab_size"]), dim=dim, layers=layers, heads=heads,
        kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=None if head_dim * heads == dim else head_dim,
        mlp_dim=int(raw["intermediate_size"]), layer_types=_period(kinds), rope_theta=theta,
        rope_scaling=_scaling(glob, raw, bad), rotary_dim=rotary if rotary != head_dim else None,
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", 0.02)), norm_residual=True,
        residual_scales=tuple(float(raw.get(k, raw.get(o, 1.0))) for k, o in zip(_SCALES, _ORIGINAL_SCALES)),
        moe_experts=int(raw.get("num_local_experts", 8)), moe_top_k=int(raw.get("num_experts_per_tok", 2)),
        moe_aux_loss=float(raw.get("router_aux_loss_coef", 0.001)))
    return hf.with_overrides(GPTConfig(**fields), overrides)


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A MiniMax ``config.json`` for ``cfg`` (lightning and full layers, experts in every layer)."""
    if not cfg.norm_residual or not cfg.moe_experts or set(cfg.layer_types) - {"lightning", "full"} \
            or cfg.qkv_bias or cfg.bias or cfg.qk_norm or cfg.attn_sinks or not cfg.moe_renormalize \
            or cfg.moe_shared_dim or cfg.mlp_act != "silu":
        raise ValueError("a MiniMax layout has lightning and full layers with norm_residual blocks and a Mixtral-style "
                         "mixture of experts (renormalized top-k, SiLU experts) in every layer, without biases")
    scaling, rope = rope_parameters(cfg)
    if cfg.rotary_dim:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_size
    out = {"architectures": [_ARCH["minimax"]], "model_type": "minimax", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.layers,
           "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads or cfg.heads,
           "head_dim": cfg.head_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
           "initializer_range": cfg.init_std, "sliding_window": None, "num_local_experts": cfg.moe_experts,
           "num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_loss,
           "layer_types": [{"lightning": "linear_attention", "full": "full_attention"}[cfg.layer_type(i)]
                           for i in range(cfg.layers)],
           **dict(zip(_SCALES, cfg.residual_scales or (1.0,) * 6))}
    if cfg.rotary_dim:
        out["rotary_dim"] = cfg.rotary_dim
    return out


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    join_kv, split_kv = _kv(cfg.kv_heads or cfg.heads)
    out = hf.lm_entries(model)
    for i, blk in enumerate(model.blocks):
        pre, attn = f"model.layers.{i}.", blk.attn
        a = pre + "self_attn."
        out += [hf.same(pre + "input_layernorm.weight", blk.norm1.weight),
                hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight)]
        if attn.kind == "lightning":
            out += [hf.linear(a + "qkv_proj.weight", attn.qkv.kernel), hf.linear(a + "output_gate.weight", attn.gate.kernel),
                    hf.linear(a + "out_proj.weight", attn.out.kernel), hf.same(a + "norm.weight", attn.norm.weight)]
        else:
            out += [hf.linear(a + "q_proj.weight", attn.q.kernel),
                    hf.Entry((a + "k_proj.weight", a + "v_proj.weight"), attn.kv.kernel, join_kv, split_kv),
                    hf.linear(a + "o_proj.weight", attn.o.kernel)]
        out += moe_hf.expert_entries("mixtral", pre, blk.mlp, cfg.moe_experts)
    return out


def _ignore(key: str) -> bool:
    """The lightning layers' decay buffers (from the config) and RoPE buffers."""
    return key.endswith(("slope_rate", "query_decay", "key_decay", "diagonal_decay", "rotary_emb.inv_freq"))


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face's keys (fp32 numpy)."""
    return hf.to_state_dict(entries(model))


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` into ``model`` in place."""
    hf.load_state_dict(entries(model), state_dict, strict=strict, ignore=_ignore)


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict, ignore=_ignore,
                            where=where, param_dtype=param_dtype)
