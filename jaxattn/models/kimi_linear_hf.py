"""Kimi Linear checkpoints in the Hugging Face layout (``KimiLinearForCausalLM``, ``model_type: kimi_linear``:
Kimi-Linear-48B-A3B) <-> :class:`jaxattn.models.gpt.GPT` with Kimi Delta Attention layers (``"kda"``,
:class:`jaxattn.models.deltanet.KimiDeltaLayer`: the gated delta rule with a decay per key channel), multi-head
latent attention layers without positional encoding (``"full"``, :mod:`jaxattn.models.mla`, ``rope_layers=(False,)``)
and DeepSeek-V3's mixture of experts (sigmoid routing with a selection bias, shared experts, dense first layers).

=======================================================  ====================================  ==============
Hugging Face key (layer ``i``, expert ``j``)              jaxattn variable (``blocks.i.``)       layout
=======================================================  ====================================  ==============
KDA: ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``       ``attn.q`` / ``attn.k`` / ``attn.v``    transposed
KDA: ``self_attn.{q,k,v}_conv1d.weight`` ``[C, 1, K]``    ``attn.conv`` ``[K, 3 C]``             transposed, stacked
KDA: ``f_a_proj``, ``f_b_proj``, ``dt_bias``, ``A_log``   ``attn.f_a``, ``f_b``, ``dt_bias``, ``A_log``  (A_log ``[1, 1, H, 1]``)
KDA: ``b_proj``, ``g_a_proj``, ``g_b_proj``, ``o_proj``   ``attn.b``, ``g_a``, ``g_b``, ``out``   transposed
KDA: ``o_norm.weight``                                    ``attn.norm``                          same
MLA: ``self_attn.q_proj``, ``kv_a_proj_with_mqa``, ...    ``attn.q``, ``attn.kv_a``, ...         as DeepSeek's
``block_sparse_moe.gate`` (+ ``e_score_correction_bias``)  ``mlp.router``, ``mlp.score_bias``     transposed, same
``block_sparse_moe.experts.j.w1/w3/w2``                   ``mlp.gate_up[j]``, ``mlp.down[j]``     as Mixtral's
``block_sparse_moe.shared_experts.*``, ``mlp.*`` (dense)  ``mlp.shared_*``, ``mlp.gate_up/down``   transposed
=======================================================  ====================================  ==============

The layer kinds come from ``layer_types`` or the original ``linear_attn_config`` (``kda_layers`` /
``full_attn_layers``, 1-indexed); the dense layers from ``mlp_layer_types`` or ``first_k_dense_replace``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import deepseek_hf, hf, moe_hf
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.gpt_hf import _period, linear_layer_kinds

__all__ = ["config_from_hf", "entries", "hf_config", "load", "load_hf_state_dict", "prepare_state_dict",
           "to_hf_state_dict"]

_ARCH = {"kimi_linear": "KimiLinearForCausalLM"}
# Kimi Linear's config names (as its release and transformers write them) -> DeepSeek's
_ALIASES = {"num_experts_per_token": "num_experts_per_tok", "moe_renormalize": "norm_topk_prob",
            "num_expert_group": "n_group", "num_experts": "num_local_experts", "num_shared_experts": "n_shared_experts",
            "model_max_length": "max_position_embeddings"}


def _kinds(raw: Mapping[str, Any], bad) -> list[str]:
    layers = int(raw["num_hidden_layers"])
    if (kinds := linear_layer_kinds(raw, "kda", bad)) is not None:
        return kinds
    lin = raw.get("linear_attn_config") or {}
    full = {int(i) - 1 for i in lin.get("full_attn_layers", [])}  # (1-indexed in the original config)
    if not full and not lin.get("kda_layers"):
        raise bad("layer_types", "layer_types or linear_attn_config's kda_layers / full_attn_layers")
    return ["full" if i in full else "kda" for i in range(layers)]


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a Kimi Linear ``config.json`` dict (``overrides``: jaxattn fields)."""
    if raw.get("model_type") not in _ARCH:
        raise ValueError(f"config.json: model_type {raw.get('model_type')!r}: expected 'kimi_linear'")
    raw = {**raw, **{ds: raw[kimi] for kimi, ds in _ALIASES.items() if kimi in raw}}

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's Kimi Linear supports {want} only")

    if raw.get("moe_router_activation_func", "sigmoid") != "sigmoid":
        raise bad("moe_router_activation_func", '"sigmoid"')
    kinds = _kinds(raw, bad)
    dense = raw.get("first_k_dense_replace", 0)
    if raw.get("mlp_layer_types"):
        types = list(raw["mlp_layer_types"])
        dense = types.index("sparse") if "sparse" in types else len(types)
        if set(types[dense:]) != {"sparse"} or set(types[:dense]) - {"dense"}:
            raise bad("mlp_layer_types", "'dense' layers first, then 'sparse' ones")
    experts = raw.get("num_local_experts", raw.get("num_experts", raw.get("n_routed_experts")))
    deepseek = {**{k: v for k, v in raw.items() if k not in ("layer_types", "model_type")},
                "model_type": "deepseek_v3", "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                "n_routed_experts": experts, "first_k_dense_replace": dense, "head_dim": None,
                "qk_nope_head_dim": raw.get("qk_nope_head_dim", 128), "num_key_value_heads": None}
    lin = raw.get("linear_attn_config") or {}
    cfg = deepseek_hf.config_from_hf(deepseek)
    cfg = dataclasses.replace(
        cfg, layer_types=_period(kinds), rope_layers=(False,), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        delta_heads=int(lin.get("num_heads", raw.get("linear_num_heads", 32))),
        delta_head_dim=int(lin.get("head_dim", raw.get("linear_head_dim", 128))),
        delta_conv=int(lin.get("short_conv_kernel_size", raw.get("linear_conv_kernel_dim", 4))),
        moe_aux_loss=float(raw.get("router_aux_loss_coef", raw.get("aux_loss_alpha", 0.001))))
    return hf.with_overrides(cfg, overrides)


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A Kimi Linear ``config.json`` for ``cfg`` (KDA and NoPE latent-attention layers, DeepSeek-V3's experts)."""
    h, hk, dk, dv = cfg.delta_dims
    if set(cfg.layer_types) != {"kda", "full"} or not cfg.kv_lora_rank or cfg.rope_layers != (False,) \
            or hk != h or dk != dv or not cfg.moe_experts:
        raise ValueError("a Kimi Linear layout has Kimi Delta Attention ('kda') and multi-head latent attention "
                         "('full', kv_lora_rank, rope_layers=(False,)) layers, one q / k head per value head of one "
                         "width, and DeepSeek-V3's mixture of experts")
    out = deepseek_hf.hf_config(cfg)
    for key in ("rope_interleave", "rope_parameters", "rope_scaling", "scoring_func", "topk_method", "moe_layer_freq",
                "aux_loss_alpha", "mlp_bias", "n_routed_experts"):
        out.pop(key, None)
    kinds = [cfg.layer_type(i) for i in range(cfg.layers)]
    out.update(architectures=[_ARCH["kimi_linear"]], model_type="kimi_linear", num_key_value_heads=cfg.heads,
               layer_types=["linear_attention" if k == "kda" else "full_attention" for k in kinds],
               mlp_layer_types=["dense" if i < cfg.moe_dense_layers else "sparse" for i in range(cfg.layers)],
               linear_num_heads=h, linear_head_dim=dk, linear_conv_kernel_dim=cfg.delta_conv,
               linear_attn_config={"num_heads": h, "head_dim": dk, "short_conv_kernel_size": cfg.delta_conv,
                                   "kda_layers": [i + 1 for i, k in enumerate(kinds) if k == "kda"],
                                   "full_attn_layers": [i + 1 for i, k in enumerate(kinds) if k == "full"]},
               moe_router_activation_func="sigmoid", router_aux_loss_coef=cfg.moe_aux_loss)
    out["num_local_experts"] = cfg.moe_experts
    return {_KIMI_NAMES.get(k, k): v for k, v in out.items()}


_KIMI_NAMES = {ds: kimi for kimi, ds in _ALIASES.items()}


def _convs(a: str, var: nnx.Variable) -> hf.Entry:
    """Three depthwise ``Conv1d`` weights ``[C, 1, K]`` (q, k, v) <-> our taps ``[K, 3 C]``."""
    keys = tuple(f"{a}{n}_conv1d.weight" for n in "qkv")
    return hf.Entry(keys, var, lambda *ws: np.concatenate([w[:, 0, :] for w in ws]).T,
                    lambda t: tuple(p.T[:, None, :] for p in np.split(t, 3, axis=1)))


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    out = hf.lm_entries(model)
    for i, blk in enumerate(model.blocks):
        pre, attn, mlp = f"model.layers.{i}.", blk.attn, blk.mlp
        a = pre + "self_attn."
        out += [hf.same(pre + "input_layernorm.weight", blk.norm1.weight),
                hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight)]
        if attn.kind == "kda":
            out += [hf.linear(f"{a}{n}_proj.weight", getattr(attn, n).kernel) for n in ("q", "k", "v", "b", "f_a", "f_b",
                                                                                      "g_a", "g_b")]
            out += [_convs(a, attn.conv), hf.same(a + "dt_bias", attn.dt_bias), hf.same(a + "o_norm.weight", attn.norm),
                    hf.Entry((a + "A_log",), attn.A_log, lambda w: w.reshape(-1), lambda x: (x.reshape(1, 1, -1, 1),)),
                    hf.linear(a + "o_proj.weight", attn.out.kernel)]
        else:
            out += deepseek_hf.mla_entries(a, attn)
        if not hasattr(mlp, "router"):  # a dense layer
            out += [deepseek_hf._gated(pre + "mlp.", mlp.gate_up.kernel),
                    hf.linear(pre + "mlp.down_proj.weight", mlp.down.kernel)]
            continue
        m = pre + "block_sparse_moe."
        out += moe_hf.expert_entries("mixtral", pre, mlp, cfg.moe_experts)  # (gate, experts.j.w1 / w3 / w2)
        out.append(hf.same(m + "gate.e_score_correction_bias", mlp.score_bias))
        if mlp.shared_gate_up is not None:
            s = m + "shared_experts."
            out += [deepseek_hf._gated(s, mlp.shared_gate_up.kernel),
                    hf.linear(s + "down_proj.weight", mlp.shared_down.kernel)]
    return out


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A dense layer's MLP under ``mlp.`` (the release's keys; a folder transformers saved has it under
    ``block_sparse_moe.`` beside the experts' keys)."""
    dense = re.compile(r"(.*\.)block_sparse_moe\.((gate|up|down)_proj\.weight)$")
    return {(f"{m[1]}mlp.{m[2]}" if (m := dense.match(key)) else key): value for key, value in state_dict.items()}


def _ignore(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face's keys (fp32 numpy)."""
    return hf.to_state_dict(entries(model))


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` into ``model`` in place."""
    hf.load_state_dict(entries(model), prepare_state_dict({}, state_dict), strict=strict, ignore=_ignore)


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict, ignore=_ignore,
                            where=where, param_dtype=param_dtype)
