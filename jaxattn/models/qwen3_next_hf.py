"""Qwen3-Next and Qwen3.5 checkpoints in the Hugging Face layout (``Qwen3NextForCausalLM``, ``model_type:
qwen3_next``: Qwen3-Next-80B-A3B; ``Qwen3_5ForCausalLM``, ``qwen3_5_text``, and the language model of the
multimodal ``Qwen3_5ForConditionalGeneration`` folders, ``qwen3_5``: the dense Qwen3.5 models, text only; the
Qwen3.5 mixtures of experts likewise, ``qwen3_5_moe_text`` / ``qwen3_5_moe``) <->
:class:`jaxattn.models.gpt.GPT` with Gated DeltaNet layers (``"delta"``,
:mod:`jaxattn.models.deltanet`) and gated softmax attention layers (``"full"``, ``attn_output_gate``), RMSNorms
scaling by ``1 + weight`` (``norm_offset=1``; the delta layers' gated norm by ``weight``), per-head q/k norms,
partial RoPE (``rotary_dim``) and Qwen2-MoE-style experts (a sigmoid-gated shared expert; top-k renormalized).

=========================================================  ==========================================  ==========
Hugging Face key (layer ``i``)                              jaxattn variable (``blocks.i.``)             layout
=========================================================  ==========================================  ==========
``input_layernorm`` / ``post_attention_layernorm``           ``norm1`` / ``norm2``                       same
``linear_attn.in_proj_qkvz`` (per key head q, k, v, z)       ``attn.q``, ``attn.k``, ``attn.v``, ``attn.z``  split, transposed
``linear_attn.in_proj_ba`` (per key head b, a)               ``attn.b``, ``attn.a``                      split, transposed
Qwen3.5: ``linear_attn.in_proj_qkv`` (all q, all k, all v)   ``attn.q``, ``attn.k``, ``attn.v``          split, transposed
Qwen3.5: ``linear_attn.in_proj_z`` / ``in_proj_b`` / ``_a``   ``attn.z`` / ``attn.b`` / ``attn.a``        transposed
``linear_attn.conv1d.weight`` ``[C, 1, K]``                   ``attn.conv`` ``[K, C]``                    transposed
``linear_attn.A_log``, ``dt_bias``, ``norm.weight``          ``attn.A_log``, ``attn.dt_bias``, ``attn.norm``  same
``linear_attn.out_proj``                                     ``attn.out``                                transposed
``self_attn.q_proj`` (per head query, gate)                  ``attn.q``, ``attn.gate``                   split, transposed
``self_attn.k_proj`` + ``v_proj`` / ``o_proj``               ``attn.kv`` / ``attn.o``                    as LLaMA's
``self_attn.q_norm`` / ``k_norm``                            ``attn.q_norm`` / ``attn.k_norm``           same
``mlp.gate``, ``mlp.experts.j.*``, ``mlp.shared_expert*``    ``mlp.*``                                   as Qwen2-MoE's
=========================================================  ==========================================  ==========

:func:`prepare_state_dict` splits the fused projections into per-part keys (``linear_attn.q_proj`` ...,
``self_attn.gate_proj``) that :func:`entries` reads; :func:`export_state_dict` fuses them back. The
multi-token-prediction weights (``mtp.*``) and a multimodal folder's vision tower are not read. A model with
experts saves as Qwen3-Next, a dense one as Qwen3.5 (``qwen3_5_text``): a Qwen3.5-MoE model saves in Qwen3-Next's
layout (the same text model; Qwen3.5 splits the fused projections apart). Qwen3.5's multimodal RoPE
(``mrope_section``) is plain RoPE on text positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf, moe_hf
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.gpt_hf import _kv, _period, _scaling, linear_layer_kinds, rope_parameters

__all__ = ["config_from_hf", "entries", "export_state_dict", "hf_config", "load", "load_hf_state_dict",
           "prepare_state_dict", "to_hf_state_dict"]

_ARCH = {"qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM",
         "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
         "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
_MULTIMODAL = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
# a multimodal Qwen3.5 folder's language model, without its prefix
_QWEN3_5_PREFIXES = (("model.language_model.", "model."), ("lm_head.", "lm_head."))
_QKVZ, _BA, _QG = "linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight", "self_attn.q_proj.weight"
_QKV = "linear_attn.in_proj_qkv.weight"  # (Qwen3.5)


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a Qwen3-Next or Qwen3.5 ``config.json`` dict (``overrides``: jaxattn fields)."""
    if raw.get("model_type") not in _ARCH:
        raise ValueError(f"config.json: model_type {raw.get('model_type')!r}: expected one of {', '.join(_ARCH)}")
    raw = _text(raw)

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's Qwen3-Next supports {want} only")

    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", '"silu"')
    if raw.get("attention_bias", False):
        raise bad("attention_bias", "false")
    layers = int(raw["num_hidden_layers"])
    kinds = linear_layer_kinds(raw, "delta", bad)
    if kinds is None:  # (Qwen3NextConfig: a full layer every full_attention_interval layers)
        every = int(raw.get("full_attention_interval", 4))
        kinds = ["full" if (i + 1) % every == 0 else "delta" for i in range(layers)]
    dim, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or dim // heads)
    glob = {**(raw.get("rope_parameters") or {}), **(raw.get("rope_scaling") or {})}
    theta = float(glob.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rotary = int(head_dim * float(glob.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))))
    fields = dict(
        vocab_size=int(raw["vocab_size"]), dim=dim, layers=layers, heads=heads,
        kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=None if head_dim * heads == dim else head_dim,
        mlp_dim=int(raw["intermediate_size"]), layer_types=_period(kinds), rope_theta=theta,
        rope_scaling=_scaling(glob, raw, bad), rotary_dim=rotary if rotary != head_dim else None,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", 0.02)), qk_norm=True, norm_offset=1.0, attn_output_gate=True,
        delta_conv=int(raw.get("linear_conv_kernel_dim", 4)), delta_heads=int(raw.get("linear_num_value_heads", 32)),
        delta_key_heads=int(raw.get("linear_num_key_heads", 16)),
        delta_head_dim=int(raw.get("linear_key_head_dim", 128)),
        delta_value_dim=int(raw.get("linear_value_head_dim", 128)))
    if int(raw.get("num_experts", 0) or 0):
        fields.update(moe_hf.moe_fields("qwen2_moe", {"norm_topk_prob": True, **raw}, bad))
    return hf.with_overrides(GPTConfig(**fields), overrides)


def _text(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """A multimodal Qwen3.5 config's language model (``text_config``); other configs as they are."""
    if raw.get("model_type") not in _MULTIMODAL:
        return raw
    return {"tie_word_embeddings": raw.get("tie_word_embeddings", False), **raw.get("text_config", {}),
            "model_type": _MULTIMODAL[raw["model_type"]]}


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` for ``cfg``: Qwen3-Next with experts, Qwen3.5 (``qwen3_5_text``) without."""
    if set(cfg.layer_types) - {"delta", "full"} or not cfg.attn_output_gate or not cfg.qk_norm \
            or cfg.norm_offset != 1.0 or cfg.qkv_bias or cfg.bias or cfg.attn_sinks or cfg.mlp_act != "silu" \
            or (cfg.moe_experts and not cfg.moe_shared_dim) or cfg.qk_norm_full or cfg.post_norms:
        raise ValueError("a Qwen3-Next layout has Gated DeltaNet ('delta') and gated full-attention layers "
                         "(attn_output_gate, qk_norm, norm_offset=1), SiLU MLPs or Qwen2-MoE-style experts with a "
                         "shared expert, and no biases, sinks or post-norms")
    _, rope = rope_parameters(cfg)
    rope["partial_rotary_factor"] = (cfg.rotary_dim or cfg.head_size) / cfg.head_size
    h, hk, dk, dv = cfg.delta_dims
    kind = "qwen3_next" if cfg.moe_experts else "qwen3_5_text"
    out = {"architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.layers,
           "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads or cfg.heads,
           "head_dim": cfg.head_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "attention_bias": False,
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "partial_rotary_factor": rope["partial_rotary_factor"],
           "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
           "linear_conv_kernel_dim": cfg.delta_conv, "linear_num_value_heads": h, "linear_num_key_heads": hk,
           "linear_key_head_dim": dk, "linear_value_head_dim": dv,
           "layer_types": [{"delta": "linear_attention", "full": "full_attention"}[cfg.layer_type(i)]
                           for i in range(cfg.layers)]}
    if cfg.moe_experts:
        moe = moe_hf.hf_moe_config("qwen2_moe", cfg)
        moe.pop("use_sliding_window", None)
        out.update(moe)
        out["intermediate_size"] = cfg.hidden  # (the dense MLP's width; no dense layers here)
    return out


def _layout(raw: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    h, hk = int(raw.get("linear_num_value_heads", 32)), int(raw.get("linear_num_key_heads", 16))
    dk, dv = int(raw.get("linear_key_head_dim", 128)), int(raw.get("linear_value_head_dim", 128))
    return h, hk, dk, dv, int(raw.get("head_dim") or int(raw["hidden_size"]) // int(raw["num_attention_heads"]))


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The fused projections split into the per-part keys :func:`entries` reads: ``in_proj_qkvz`` (per key head:
    q, k, then its ``h / h_k`` value heads' v and z rows) into ``linear_attn.{q,k,v,z}_proj``, ``in_proj_ba`` (per
    key head its value heads' b, then a rows) into ``linear_attn.{b,a}_proj``, Qwen3.5's ``in_proj_qkv`` (all
    queries, keys, then values) into ``linear_attn.{q,k,v}_proj`` and its ``in_proj_{z,b,a}`` renamed, and
    ``self_attn.q_proj`` (per head query, then gate rows) into ``self_attn.q_proj`` and ``self_attn.gate_proj``;
    a multimodal Qwen3.5 folder's language model without its prefix (the vision tower left out)."""
    if raw.get("model_type") in _MULTIMODAL:
        state_dict = {new + key[len(old):]: value for key, value in state_dict.items()
                      for old, new in _QWEN3_5_PREFIXES if key.startswith(old)}
        if not state_dict:
            raise ValueError("a Qwen3.5 folder without language-model weights (model.language_model.*)")
    raw = _text(raw)
    h, hk, dk, dv, hd = _layout(raw)
    r = h // hk
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_QKV):
            pre = key[: -len(_QKV)] + "linear_attn."
            for name, part in zip("qkv", np.split(np.asarray(value), [hk * dk, 2 * hk * dk])):
                out[f"{pre}{name}_proj.weight"] = part
        elif (split := next((n for n in "zba" if key.endswith(f"linear_attn.in_proj_{n}.weight")), None)) is not None:
            out[key.replace(f"in_proj_{split}.weight", f"{split}_proj.weight")] = value
        elif key.endswith(_QKVZ):
            pre = key[: -len(_QKVZ)] + "linear_attn."
            w = np.asarray(value)
            w = w.reshape(hk, 2 * dk + 2 * r * dv, w.shape[-1])
            cuts = np.cumsum([dk, dk, r * dv])
            for name, part in zip("qkvz", np.split(w, cuts, axis=1)):
                out[f"{pre}{name}_proj.weight"] = part.reshape(-1, w.shape[-1])
        elif key.endswith(_BA):
            pre = key[: -len(_BA)] + "linear_attn."
            w = np.asarray(value).reshape(hk, 2 * r, -1)
            out[pre + "b_proj.weight"], out[pre + "a_proj.weight"] = (p.reshape(h, -1) for p in np.split(w, 2, axis=1))
        elif key.endswith(_QG) and "self_attn" in key:
            pre = key[: -len(_QG)] + "self_attn."
            w = np.asarray(value)
            w = w.reshape(-1, 2, hd, w.shape[-1])
            out[pre + "q_proj.weight"], out[pre + "gate_proj.weight"] = (w[:, j].reshape(-1, w.shape[-1]) for j in (0, 1))
        else:
            out[key] = value
    return out


def export_state_dict(raw: Mapping[str, Any], state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`prepare_state_dict` for a ``config.json`` of :func:`hf_config`."""
    h, hk, dk, dv, hd = _layout(raw)
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith("linear_attn.q_proj.weight") and raw.get("model_type") == "qwen3_5_text":
            pre = key[: -len("q_proj.weight")]
            out[pre + "in_proj_qkv.weight"] = np.concatenate([out.pop(f"{pre}{n}_proj.weight") for n in "qkv"])
            for n in "zba":
                out[f"{pre}in_proj_{n}.weight"] = out.pop(f"{pre}{n}_proj.weight")
        elif key.endswith("linear_attn.q_proj.weight"):
            pre = key[: -len("q_proj.weight")]
            q, k, v, z = (out.pop(f"{pre}{n}_proj.weight") for n in "qkvz")
            dim = q.shape[-1]
            parts = [x.reshape(hk, -1, dim) for x in (q, k, v, z)]
            out[pre + "in_proj_qkvz.weight"] = np.concatenate(parts, axis=1).reshape(-1, dim)
            b, a = (out.pop(f"{pre}{n}_proj.weight").reshape(hk, h // hk, dim) for n in "ba")
            out[pre + "in_proj_ba.weight"] = np.concatenate([b, a], axis=1).reshape(-1, dim)
        elif key.endswith("self_attn.gate_proj.weight"):
            pre = key[: -len("gate_proj.weight")]
            dim = state_dict[key].shape[-1]
            q, g = (out.pop(pre + n).reshape(-1, 1, hd, dim) for n in ("q_proj.weight", "gate_proj.weight"))
            out[pre + "q_proj.weight"] = np.concatenate([q, g], axis=1).reshape(-1, dim)
    return out


def _conv(key: str, var: nnx.Variable) -> hf.Entry:
    """A depthwise ``Conv1d`` weight ``[C, 1, K]`` <-> our taps ``[K, C]``."""
    return hf.Entry((key,), var, lambda w: w[:, 0, :].T, lambda t: (t.T[:, None, :],))


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    join_kv, split_kv = _kv(cfg.kv_heads or cfg.heads)
    out = hf.lm_entries(model)
    for i, blk in enumerate(model.blocks):
        pre, attn = f"model.layers.{i}.", blk.attn
        out += [hf.same(pre + "input_layernorm.weight", blk.norm1.weight),
                hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight)]
        if attn.kind == "delta":
            a = pre + "linear_attn."
            out += [hf.linear(f"{a}{n}_proj.weight", getattr(attn, n).kernel) for n in "qkvzba"]
            out += [_conv(a + "conv1d.weight", attn.conv), hf.same(a + "A_log", attn.A_log),
                    hf.same(a + "dt_bias", attn.dt_bias), hf.same(a + "norm.weight", attn.norm),
                    hf.linear(a + "out_proj.weight", attn.out.kernel)]
        else:
            a = pre + "self_attn."
            out += [hf.linear(a + "q_proj.weight", attn.q.kernel), hf.linear(a + "gate_proj.weight", attn.gate.kernel),
                    hf.Entry((a + "k_proj.weight", a + "v_proj.weight"), attn.kv.kernel, join_kv, split_kv),
                    hf.linear(a + "o_proj.weight", attn.o.kernel),
                    hf.same(a + "q_norm.weight", attn.q_norm.weight), hf.same(a + "k_norm.weight", attn.k_norm.weight)]
        if cfg.moe_experts:
            out += moe_hf.expert_entries("qwen2_moe", pre, blk.mlp, cfg.moe_experts)
        else:
            m = pre + "mlp."
            out += [hf.Entry((m + "gate_proj.weight", m + "up_proj.weight"), blk.mlp.gate_up.kernel,
                             lambda g, u: np.concatenate([g.T, u.T], axis=1), lambda k: tuple(np.split(k.T, 2, axis=0))),
                    hf.linear(m + "down_proj.weight", blk.mlp.down.kernel)]
    return out


def _ignore(key: str) -> bool:
    """The multi-token-prediction head (not part of the causal LM) and RoPE buffers."""
    return key.startswith("mtp.") or key.endswith("rotary_emb.inv_freq")


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face's keys (fp32 numpy), fused as in a Qwen3-Next folder."""
    return export_state_dict(hf_config(model.cfg), hf.to_state_dict(entries(model)))


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` (fused keys, as in a folder) into ``model`` in place."""
    hf.load_state_dict(entries(model), prepare_state_dict(hf_config(model.cfg), state_dict), strict=strict,
                       ignore=_ignore)


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict, ignore=_ignore,
                            where=where, param_dtype=param_dtype)
