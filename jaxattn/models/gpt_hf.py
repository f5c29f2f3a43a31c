"""LLaMA-family and Gemma checkpoints in the Hugging Face layout (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``Phi3ForCausalLM`` (fused weights split by
:func:`prepare_state_dict`), ``GraniteForCausalLM`` (multipliers), ``SmolLM3ForCausalLM`` (NoPE layers),
``Olmo2ForCausalLM`` (post-norm blocks), ``GemmaForCausalLM``, ``Gemma2ForCausalLM``,
``Gemma3ForCausalLM``; the mixtures of experts ``GptOssForCausalLM``, ``MixtralForCausalLM``,
``Qwen3MoeForCausalLM``, ``Qwen2MoeForCausalLM`` through :mod:`jaxattn.models.moe_hf`) <-> :class:`GPT`, whose blocks are the same architecture: pre-RMSNorm, RoPE
(rotated halves; Llama 3.1's ``llama3``, ``linear`` and YaRN ``rope_scaling`` too), GQA, a gated MLP,
no biases except Qwen2's q/k/v, Qwen3's per-head q/k RMSNorm, a ``head_dim`` apart from
``hidden_size / heads`` (Qwen3, Mistral-Nemo, Gemma). Mistral's ``sliding_window`` becomes
``layer_types=("window",)`` with that window (token-exact, as Mistral's mask); pass
``layer_types=("full",)`` to run full attention where every context fits the window.

Gemma's blocks are GPT config fields: RMSNorms scaling by ``1 + weight`` (``norm_offset=1``), tanh-GELU
gating (``mlp_act="gelu_tanh"``), embeddings times ``sqrt(hidden_size)`` (``embed_scale``); Gemma 2 / 3
add norms on both branch outputs (``post_norms``), ``query_pre_attn_scalar`` (``attn_scale``), sliding and
full layers interleaved (``layer_types=("window", "full")``, Gemma 3's 5:1), Gemma 2's tanh soft caps on
the attention logits (``attn_softcap``, in the flash and decode kernels) and the output logits
(``final_softcap``), and Gemma 3's q/k norms and local RoPE base (``local_rope_theta``; its RoPE scaling is
the global layers').

``jaxattn.models.hf.load_pretrained(folder, layer_types=("power", "power", "power", "full"))`` runs a
pretrained model with another attention pattern (PowerAttention, sliding window, ...) for continued
pretraining as in the PowerAttention paper; ``quantized=True`` runs it with SageAttention.

==================================================  ========================================  ==========
Hugging Face key                                    jaxattn variable                          layout
==================================================  ========================================  ==========
``model.embed_tokens.weight``                       ``embed.embedding``                       same
``model.layers.i.input_layernorm.weight``           ``blocks.i.norm1.weight``                 same
``model.layers.i.self_attn.q_proj`` (+ bias)         ``blocks.i.attn.q``                       transposed
``model.layers.i.self_attn.k_proj`` + ``v_proj``    ``blocks.i.attn.kv`` (per kv head k | v)   transposed, interleaved
``model.layers.i.self_attn.q_norm`` / ``k_norm``    ``blocks.i.attn.q_norm`` / ``k_norm``      same (Qwen3)
``model.layers.i.self_attn.o_proj``                 ``blocks.i.attn.o``                       transposed
``model.layers.i.post_attention_layernorm.weight``  ``blocks.i.norm2.weight``                 same
  (Gemma 2 / 3: the attention output's norm)        ``blocks.i.attn_post_norm.weight``        same
``...pre_feedforward_layernorm`` (Gemma 2 / 3)      ``blocks.i.norm2.weight``                 same
``...post_feedforward_layernorm`` (Gemma 2 / 3)     ``blocks.i.mlp_post_norm.weight``         same
``model.layers.i.mlp.gate_proj`` + ``up_proj``      ``blocks.i.mlp.gate_up`` (gate | up)      transposed, concatenated
``model.layers.i.mlp.down_proj``                    ``blocks.i.mlp.down``                     transposed
``model.norm.weight``                               ``norm.weight``                           same
``lm_head.weight``                                  ``head.kernel`` (untied configs only)     transposed
==================================================  ========================================  ==========

What :class:`GPT` cannot represent raises ``ValueError`` (``dynamic`` / ``longrope`` RoPE scaling, partial
rotary, an activation other than SiLU (LLaMA family) or tanh GELU (Gemma), MLP or output biases, Qwen2/Qwen3
sliding windows, Gemma 3's bidirectional attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf, moe_hf
from jaxattn.models.gpt import CLASSIC_FIELDS, FAMILY_FIELDS, GPT, GPTConfig, non_default

__all__ = ["config_from_hf", "entries", "hf_config", "load_hf_state_dict", "prepare_state_dict", "to_hf_state_dict"]

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
         "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "gemma": "GemmaForCausalLM",
         "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
         "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
GEMMA = ("gemma", "gemma2", "gemma3_text")
# what transformers' Gemma2Config assumes when config.json leaves these out
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256}
# transformers' Gemma3TextConfig defaults (the multimodal folders' text_config often leaves them out)
_GEMMA3_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "max_position_embeddings": 131072}
# Gemma 3's multimodal folders (model_type gemma3): the language model's keys under one of these prefixes
_GEMMA3_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                    ("language_model.lm_head.", "lm_head."))
_LAYER = {"sliding_attention": "window", "full_attention": "full"}
# GptOssConfig's RoPE when config.json names none
_GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def _scaling(params: Mapping[str, Any], raw: Mapping[str, Any], bad) -> dict[str, Any]:
    """The ``GPTConfig.rope_scaling`` dict of one set of RoPE parameters (``{}``: plain RoPE)."""
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    phi3 = raw.get("model_type") == "phi3"
    if phi3 and kind in ("su", "yarn"):  # Phi-3's first names for LongRoPE (as transformers reads them)
        kind = "longrope"
    if kind not in ("default", "linear", "llama3", "yarn", "longrope") or phi3 and kind not in ("default", "longrope"):
        raise bad("rope_scaling" if raw.get("rope_scaling") else "rope_parameters",
                  'rope_type "default" or "longrope"' if phi3 else
                  'rope_type "default", "linear", "llama3", "yarn" or "longrope"')
    if kind in ("llama3", "yarn", "longrope"):  # Hugging Face's fallbacks: a top-level original context wins
        old = "original_max_position_embeddings"
        if old in raw:
            scaling[old] = raw[old]
        elif phi3:  # (Phi3Config's default)
            scaling[old] = 4096
        scaling.setdefault(old, raw.get("max_position_embeddings"))
        if scaling.get("factor") is None and kind in ("yarn", "longrope"):
            scaling["factor"] = raw.get("max_position_embeddings", 4096 if phi3 else None) / scaling[old]
    return {"rope_type": kind, **scaling} if kind != "default" else {}


def _period(types: list[str]) -> tuple[str, ...]:
    """The shortest prefix that ``GPTConfig.layer_types`` cycles into ``types``."""
    p = next(p for p in range(1, len(types) + 1) if all(t == types[i % p] for i, t in enumerate(types)))
    return tuple(types[:p])


def linear_layer_kinds(raw: Mapping[str, Any], recurrent: str, bad) -> list[str] | None:
    """A hybrid model's ``layer_types`` (``"linear_attention"`` / ``"full_attention"`` per layer) as jaxattn kinds
    (``recurrent`` / ``"full"``), or None where config.json has none."""
    if not raw.get("layer_types"):
        return None
    layers, table = int(raw["num_hidden_layers"]), {"linear_attention": recurrent, "full_attention": "full"}
    types = list(raw["layer_types"])
    if set(types) - set(table) or len(types) != layers:
        raise bad("layer_types", f"{layers} entries 'linear_attention' / 'full_attention'")
    return [table[t] for t in types]


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a LLaMA / Qwen2 / Qwen3 / Mistral / Gemma 1-3 ``config.json`` dict;
    ``overrides`` set jaxattn-only fields (``dtype``, ``attn_impl``, ``layer_types``, ``window``, ...)."""
    kind = raw.get("model_type")
    if kind == "gemma3":  # a multimodal Gemma 3 (4B and up): its language model alone
        return config_from_hf(_gemma3_text(raw), **overrides)
    if kind not in _ARCH:
        raise ValueError(f"config.json: model_type {kind!r}: expected one of {sorted(_ARCH) + ['gemma3']}")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's GPT supports {want} only")

    gemma = kind in GEMMA
    if kind == "gemma2":
        raw = {**_GEMMA2_DEFAULTS, **raw}
    if kind == "gemma3_text":
        raw = {**_GEMMA3_DEFAULTS, **raw}
    act_field = "hidden_activation" if kind in ("gemma2", "gemma3_text") else "hidden_act"
    act = raw.get(act_field) or ("gelu_pytorch_tanh" if gemma else "silu")
    if kind == "gemma" and act == "gelu":  # the first releases' value, meant as the tanh form (as transformers)
        act = "gelu_pytorch_tanh"
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise bad(act_field, '"gelu_pytorch_tanh"' if gemma else '"silu"')
    # RoPE: transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...} (Gemma 3: one per layer type);
    # older configs rope_theta / rope_scaling / rope_local_base_freq at the top level
    params = dict(raw.get("rope_parameters") or {})
    per_type = "full_attention" in params or "sliding_attention" in params
    glob = dict(params.get("full_attention") or {}) if per_type else params
    glob.update(raw.get("rope_scaling") or {})
    if kind == "gpt_oss" and "rope_type" not in glob and "type" not in glob:
        glob = {**_GPT_OSS_ROPE, **glob}
    theta = float(glob.get("rope_theta", raw.get("rope_theta", {"gemma3_text": 1e6, "gpt_oss": 150000.0}.get(
        kind, 10000.0))))
    local = dict(params.get("sliding_attention") or {}) if per_type else {}
    local_theta = None
    if kind == "gemma3_text":
        if _scaling(local, raw, bad):
            raise bad("rope_parameters", "plain RoPE on the sliding layers")
        local_theta = float(local.get("rope_theta", raw.get("rope_local_base_freq", 10000.0)))
    partial = float(glob.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if partial != 1.0 and kind != "phi3":  # (transformers' other families rotate whole heads)
        raise bad("partial_rotary_factor", "1.0 (partial rotary: Phi-3 folders)")
    if raw.get("mlp_bias", False):
        raise bad("mlp_bias", "false")
    if kind not in ("qwen2", "gpt_oss", "qwen2_moe") and raw.get("attention_bias", False):  # (LLaMA's, Qwen3's and Gemma's also bias o_proj)
        raise bad("attention_bias", "false (Qwen2's q/k/v biases are supported)")
    if raw.get("use_bidirectional_attention", False):
        raise bad("use_bidirectional_attention", "false (causal attention)")
    dim, heads, layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
    head_dim = int(raw.get("head_dim") or dim // heads)
    window = raw.get("sliding_window")
    if kind in ("gemma2", "gemma3_text", "gpt_oss"):  # sliding and full layers interleaved
        types = raw.get("layer_types")
        if types is None:
            period = int(raw.get("sliding_window_pattern", 6)) if kind == "gemma3_text" else 2
            types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
        if set(types) - set(_LAYER) or len(types) != layers:
            raise bad("layer_types", f"{layers} entries 'sliding_attention' / 'full_attention'")
        layer_types = _period([_LAYER[t] if window else "full" for t in types])
    elif kind in ("qwen2", "qwen3", "smollm3", "olmo2", "qwen3_moe", "qwen2_moe"):
        if raw.get("use_sliding_window", False) or set(raw.get("layer_types") or ()) - {"full_attention"}:
            raise bad("use_sliding_window", "false (every layer full_attention)")
        layer_types = ("full",)
    else:  # Mistral, Phi-3: every layer sees its last `sliding_window` keys (itself included)
        layer_types = ("window",) if kind in ("mistral", "phi3", "mixtral") and window else ("full",)
    scalar = raw.get("query_pre_attn_scalar") if kind in ("gemma2", "gemma3_text") else None
    fields = dict(
        vocab_size=int(raw["vocab_size"]), dim=dim, layers=layers, heads=heads,
        kv_heads=int(raw.get("num_key_value_heads") or heads), mlp_dim=int(raw["intermediate_size"]),
        rope_theta=theta, rope_scaling=_scaling(glob, raw, bad), local_rope_theta=local_theta,
        rotary_dim=int(head_dim * partial) if partial != 1.0 else None,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=kind in ("qwen2", "qwen2_moe"), qk_norm=kind in ("qwen3", "gemma3_text", "qwen3_moe"),
        head_dim=None if head_dim * heads == dim else head_dim,
        tie_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
        init_std=float(raw.get("initializer_range", 0.02)), layer_types=layer_types)
    if window and "window" in layer_types:
        fields["window"] = int(window)
    if kind in moe_hf.MOE_FAMILIES:  # experts in every layer's MLP (gpt-oss: biases, sinks, its clamped GLU)
        fields.update(moe_hf.moe_fields(kind, raw, bad))
    if kind == "smollm3":  # NoPE layers: no_rope_layers[i] = 0 runs layer i without RoPE
        flags = raw.get("no_rope_layers")
        if flags is None:
            every = int(raw.get("no_rope_layer_interval", 4))
            flags = [int((i + 1) % every != 0) for i in range(layers)]
        if len(flags) != layers:
            raise bad("no_rope_layers", f"{layers} entries")
        fields["rope_layers"] = _period([bool(f) for f in flags])
    if kind == "olmo2":  # post-norm blocks, one RMSNorm over all heads' queries (keys)
        fields.update(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_full=True)
    if kind == "granite":
        fields.update(embed_multiplier=float(raw.get("embedding_multiplier", 1.0)),
                      residual_multiplier=float(raw.get("residual_multiplier", 1.0)),
                      logits_divisor=float(raw.get("logits_scaling", 1.0)),
                      attn_scale=float(raw.get("attention_multiplier", 1.0)))
    if gemma:
        fields.update(mlp_act="gelu_tanh", norm_offset=1.0, embed_scale=True, post_norms=kind != "gemma",
                      attn_scale=None if scalar in (None, head_dim) else float(scalar) ** -0.5,
                      attn_softcap=raw.get("attn_logit_softcapping"), final_softcap=raw.get("final_logit_softcapping"))
    return hf.with_overrides(GPTConfig(**fields), overrides)


def _gemma3_text(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A multimodal Gemma 3 ``config.json``'s language model as a ``gemma3_text`` one."""
    text = dict(raw.get("text_config") or {})
    return {**text, "model_type": "gemma3_text",
            "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A ``state_dict`` in the LLaMA key layout: Phi-3's fused ``self_attn.qkv_proj`` (q, then k, then v rows)
    and ``mlp.gate_up_proj`` (gate, then up) split into LLaMA's projections (numpy views, no copies); a
    multimodal Gemma 3's language model without its prefix (the vision tower and projector left out); other
    families' as they are."""
    if raw.get("model_type") == "gemma3":
        out = {}
        for key, value in state_dict.items():
            for old, new in _GEMMA3_PREFIXES:
                if key.startswith(old):
                    out[new + key[len(old):]] = value
        if not out:
            raise ValueError("a Gemma 3 folder without language-model weights (language_model.model.* or "
                             "model.language_model.*)")
        return out
    if raw.get("model_type") != "phi3":
        return moe_hf.prepare_state_dict(raw, state_dict)  # (gpt-oss's MXFP4 experts, dequantized as read)
    out, table = {}, _phi3_fused(raw)
    for key, value in state_dict.items():
        fused = next((f for f in table if key.endswith(f"{f}.weight")), None)
        if fused is None:
            out[key] = value
            continue
        pre, start = key[: -len(f"{fused}.weight")], 0
        for part, rows in table[fused]:
            out[f"{pre}{part}.weight"] = value[start:start + rows]
            start += rows
    return out


def _phi3_fused(raw: Mapping[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Phi-3's fused projections: each one's LLaMA parts in row order, with their row counts."""
    h, d = int(raw["num_attention_heads"]), int(raw["hidden_size"])
    hd = int(raw.get("head_dim") or d // h)
    kv, f = int(raw.get("num_key_value_heads") or h), int(raw["intermediate_size"])
    return {"self_attn.qkv_proj": [("self_attn.q_proj", h * hd), ("self_attn.k_proj", kv * hd),
                                   ("self_attn.v_proj", kv * hd)],
            "mlp.gate_up_proj": [("mlp.gate_proj", f), ("mlp.up_proj", f)]}


_GRANITE = ("embed_multiplier", "residual_multiplier", "logits_divisor", "attn_scale")
_GEMMA_ONLY = ("norm_offset", "embed_scale", "post_norms", "attn_softcap", "final_softcap", "local_rope_theta")


def _family(cfg: GPTConfig) -> str:
    """The Hugging Face model_type that holds ``cfg``, or a ValueError naming what none does."""
    from jaxattn.models.gpt_classic_hf import is_classic

    if is_classic(cfg):
        raise ValueError("this GPT has the GPT-2 / GPT-NeoX block (LayerNorm, biases, plain MLP, learned positions or "
                         "parallel residuals): jaxattn.models.gpt_classic_hf has its layouts")
    if cfg.position != "rope":
        raise ValueError("only RoPE GPT models have a LLaMA / Qwen / Gemma layout (this one has ALiBi)")
    if cfg.kv_lora_rank or "lightning" in cfg.layer_types:
        raise ValueError("multi-head latent attention and lightning layers have their own layouts: "
                         "jaxattn.models.deepseek_hf and minimax_hf (hf.save_pretrained picks them)")
    if "delta" in cfg.layer_types or cfg.attn_output_gate:
        raise ValueError("Gated DeltaNet ('delta') layers and gated attention (attn_output_gate) have Qwen3-Next's "
                         "layout: jaxattn.models.qwen3_next_hf (hf.save_pretrained picks it)")
    if cfg.norm_residual:
        raise ValueError("no Hugging Face layout holds norm_residual blocks outside MiniMax's; save the model with "
                         "jaxattn's own checkpoints")
    deepseek = [f for f in ("moe_dim", "moe_dense_layers", "moe_groups", "moe_score_bias", "moe_routed_scale",
                            "moe_bias_update_rate") if getattr(cfg, f) != getattr(GPTConfig(), f)]
    if deepseek or cfg.moe_scoring != "softmax" or not cfg.moe_shared_gate:
        raise ValueError(f"DeepSeek's routing ({deepseek or 'moe_scoring / moe_shared_gate'}) exports with multi-head "
                         "latent attention only (jaxattn.models.deepseek_hf)")
    if cfg.moe_experts:
        return _moe_family(cfg)
    if cfg.attn_sinks:
        raise ValueError("attention sinks export as gpt-oss: a mixture of experts (moe_experts) with mlp_act='gpt_oss' "
                         "and bias=True")
    if cfg.rotary_dim is not None:  # partial rotary: Phi-3's layout (Phi-4-mini), LLaMA's blocks otherwise
        odd = non_default(cfg, tuple(f for f in (*FAMILY_FIELDS, "qkv_bias") if f not in ("rope_scaling", "rotary_dim")))
        if odd or cfg.layer_types not in (("full",), ("window",)) \
                or dict(cfg.rope_scaling).get("rope_type", "longrope") != "longrope":
            raise ValueError("partial rotary (rotary_dim) exports as Phi-3: LLaMA's blocks, every layer 'full' or "
                             f"every layer 'window', plain RoPE or LongRoPE (set here: {odd or cfg.rope_scaling})")
        return "phi3"
    gemma = (cfg.norm_offset, cfg.embed_scale, cfg.mlp_act) == (1.0, True, "gelu_tanh")
    olmo = (cfg.pre_norms, cfg.post_norms, cfg.qk_norm, cfg.qk_norm_full) == (False, True, True, True)
    if olmo and not gemma:
        odd = non_default(cfg, ("qkv_bias", "rope_layers", "mlp_act", "norm_offset", "embed_scale", "attn_softcap",
                               "final_softcap", "local_rope_theta", *_GRANITE))
        if odd:
            raise ValueError(f"an OLMo 2 layout has LLaMA's blocks otherwise: {odd} set")
        return "olmo2"
    if not cfg.pre_norms or cfg.qk_norm_full:
        raise ValueError("post-norm-only blocks and whole-width q/k norms are OLMo 2's: pre_norms=False, post_norms, "
                         "qk_norm and qk_norm_full together")
    if not gemma:
        odd = non_default(cfg, (*_GEMMA_ONLY, "mlp_act"))
        if odd:
            raise ValueError(f"no Hugging Face layout has this GPT: {odd} set without the rest of "
                             "Gemma's (norm_offset=1, embed_scale, mlp_act='gelu_tanh')")
        if cfg.qk_norm and cfg.qkv_bias:
            raise ValueError("no Hugging Face layout has q/k norms and q/k/v biases alone (Qwen3's attention_bias "
                             "biases o_proj too)")
        granite = bool(non_default(cfg, _GRANITE))
        if sum([granite, bool(cfg.rope_layers), cfg.qk_norm or cfg.qkv_bias]) > 1:
            raise ValueError("no Hugging Face layout has more than one of Granite's multipliers (or attn_scale), "
                             "NoPE layers (rope_layers, SmolLM3) and Qwen's q/k norms or biases")
        if granite:
            return "granite"
        if cfg.rope_layers:
            return "smollm3"
        if cfg.layer_types == ("window",) and not (cfg.qk_norm or cfg.qkv_bias):
            return "mistral"  # (every layer windowed: Mistral's sliding_window; Phi-3's export this way too)
        return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    if not cfg.tie_embeddings or set(cfg.layer_types) - {"full", "window"} \
            or non_default(cfg, ("qkv_bias", "rope_layers", "embed_multiplier", "residual_multiplier",
                                                  "logits_divisor")):
        raise ValueError("a Gemma layout has no q/k/v biases, a tied head, only 'full' / 'window' layers, RoPE in "
                         "every layer and none of Granite's multipliers")
    if cfg.post_norms:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if non_default(cfg, ("qk_norm", "attn_scale", "attn_softcap", "final_softcap", "local_rope_theta")) or set(cfg.layer_types) != {"full"}:
        raise ValueError("a Gemma (1) layout has none of qk_norm, attn_scale, softcaps, local_rope_theta, windows: "
                         "set post_norms for Gemma 2 / 3")
    return "gemma"


def _moe_family(cfg: GPTConfig) -> str:
    """The mixture-of-experts family of ``cfg``: ``gpt_oss`` (biases, sinks, its clamped GLU), ``qwen3_moe``
    (q/k norms), ``mixtral``; a ValueError names what none of them has."""
    odd = non_default(cfg, tuple(f for f in (*FAMILY_FIELDS, *CLASSIC_FIELDS)
                                 if f not in ("qk_norm", "rope_scaling", "mlp_act", "bias")))
    if odd:
        raise ValueError(f"the mixture-of-experts layouts (gpt-oss, Mixtral, Qwen3-MoE) have LLaMA's blocks "
                         f"otherwise: {odd} set")
    if cfg.mlp_act == "gpt_oss":
        if not (cfg.bias and cfg.attn_sinks and cfg.moe_renormalize) or cfg.qk_norm or cfg.qkv_bias or cfg.moe_shared_dim \
                or cfg.tie_embeddings or set(cfg.layer_types) - {"full", "window"}:
            raise ValueError("a gpt-oss layout has bias=True, attn_sinks, moe_renormalize, an untied head, "
                             "'full' / 'window' layers, and no q/k norms")
        return "gpt_oss"
    if cfg.mlp_act != "silu" or cfg.bias or cfg.attn_sinks:
        raise ValueError("Mixtral and Qwen-MoE layouts have SiLU experts without biases or attention sinks "
                         "(gpt-oss's: mlp_act='gpt_oss')")
    if cfg.qkv_bias or cfg.moe_shared_dim:
        if not (cfg.qkv_bias and cfg.moe_shared_dim) or cfg.qk_norm or cfg.layer_types != ("full",):
            raise ValueError("a Qwen2-MoE layout has q/k/v biases, a shared expert (moe_shared_dim), no q/k "
                             "norms and full-attention layers")
        return "qwen2_moe"
    if cfg.qk_norm:
        if cfg.layer_types != ("full",):
            raise ValueError("a Qwen3-MoE layout has full-attention layers only")
        return "qwen3_moe"
    if not cfg.moe_renormalize or cfg.layer_types not in (("full",), ("window",)):
        raise ValueError("a Mixtral layout renormalizes its top-k weights (moe_renormalize) and has every layer "
                         "'full' or every layer 'window'")
    return "mixtral"


def rope_parameters(cfg: GPTConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(scaling, rope_parameters)`` of ``cfg``: its RoPE scaling's fields without the type, and transformers 5's
    ``rope_parameters`` (type, base, those fields)."""
    scaling = dict(cfg.rope_scaling)
    return scaling, {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": cfg.rope_theta, **scaling}


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` for ``cfg``: ``llama``, ``mistral`` (every layer a sliding window), ``qwen2`` (q/k/v
    biases), ``qwen3`` (q/k norms), ``granite`` (its multipliers), ``smollm3`` (NoPE layers), ``olmo2``
    (post-norm blocks, whole-width q/k norms), or with
    Gemma's blocks ``gemma``, ``gemma2`` (post-norms) or ``gemma3_text`` (post-norms and q/k norms)."""
    kind = _family(cfg)
    scaling, rope = rope_parameters(cfg)
    old_style = {"rope_scaling": {**scaling, "rope_type": rope["rope_type"]}} if scaling else {}
    out = {"architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
           "num_key_value_heads": cfg.kv_heads or cfg.heads, "intermediate_size": cfg.hidden,
           "head_dim": cfg.head_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, **old_style,  # (transformers < 5)
           "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
           "max_position_embeddings": 4096 * int(max(1, scaling.get("factor", 1)))}
    if kind == "mistral":
        out["sliding_window"] = cfg.window
    if kind in moe_hf.MOE_FAMILIES:
        out.update(moe_hf.hf_moe_config(kind, cfg))
    if kind == "mixtral":
        out["sliding_window"] = cfg.window if cfg.layer_types == ("window",) else None
    if kind == "phi3":  # (pad id: not Phi3Config's default 32000, past a small vocabulary)
        partial = cfg.rotary_dim / cfg.head_size
        if int(cfg.head_size * partial) != cfg.rotary_dim:
            raise ValueError(f"rotary_dim {cfg.rotary_dim} of {cfg.head_size}: no partial_rotary_factor gives it")
        rope["partial_rotary_factor"] = partial
        out.update(partial_rotary_factor=partial, pad_token_id=None,
                   sliding_window=cfg.window if cfg.layer_types == ("window",) else None)
        if scaling:  # Phi3Config reads rope_scaling before rope_parameters, and its top-level original context
            old = scaling["original_max_position_embeddings"]
            keep = [n for n in ("attention_factor", "factor") if n in scaling]
            if "factor" in scaling and round(old * scaling["factor"]) == old * scaling["factor"]:
                keep.remove("factor")  # (as Phi-3 folders: max_position_embeddings / original gives it)
            out.update(original_max_position_embeddings=old, rope_scaling={
                "type": "longrope", **{n: scaling[n] for n in ("short_factor", "long_factor", *keep)}})
    if rope["rope_type"] == "longrope":  # the context the factor reaches
        out["max_position_embeddings"] = round(scaling["original_max_position_embeddings"] * scaling.get("factor", 1))
    if kind == "granite":
        out.update(embedding_multiplier=cfg.embed_multiplier, residual_multiplier=cfg.residual_multiplier,
                   logits_scaling=cfg.logits_divisor,
                   attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.head_size ** -0.5)
    if kind == "smollm3":  # (pad id unknown here: not SmolLM3Config's default 128004, past a small vocabulary)
        out.update(no_rope_layers=[int(cfg.layer_has_rope(i)) for i in range(cfg.layers)], pad_token_id=None)
    if kind in GEMMA:
        out.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", attention_bias=False)
    if kind in ("gemma2", "gemma3_text", "gpt_oss"):
        out.update(layer_types=[{"window": "sliding_attention", "full": "full_attention"}[cfg.layer_type(i)]
                                for i in range(cfg.layers)], sliding_window=cfg.window)
    if kind in ("gemma2", "gemma3_text"):
        scalar = cfg.attn_scale ** -2 if cfg.attn_scale else cfg.head_size  # transformers wants an int
        out.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                   attn_logit_softcapping=cfg.attn_softcap,
                   final_logit_softcapping=cfg.final_softcap)
    if kind == "gemma3_text":
        local = cfg.local_rope_theta or cfg.rope_theta
        out.update(rope_local_base_freq=local, rope_parameters={
            "full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}})
    return out


def export_state_dict(raw: Mapping[str, Any], state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`prepare_state_dict` for a ``config.json`` of :func:`hf_config`: Phi-3's fused
    ``qkv_proj`` and ``gate_up_proj`` from LLaMA's projections; other families' as they are."""
    if raw.get("model_type") != "phi3":
        return state_dict
    out, table = dict(state_dict), _phi3_fused(raw)
    for key in state_dict:
        for fused, parts in table.items():
            if key.endswith(f"{parts[0][0]}.weight"):
                pre = key[: -len(f"{parts[0][0]}.weight")]
                out[f"{pre}{fused}.weight"] = np.concatenate([out.pop(f"{pre}{p}.weight") for p, _ in parts])
    return out


def _kv(kv_heads: int):
    """HF's separate k, v ``[kv_heads * d, ...]`` <-> our per-head ``[k_h | v_h]`` columns (kernels ``[in, out]``
    after the transpose, biases 1-D)."""
    def join(k, v):
        if k.ndim == 2:
            k, v = k.T, v.T
        kk, vv = k.reshape(*k.shape[:-1], kv_heads, -1), v.reshape(*v.shape[:-1], kv_heads, -1)
        return np.concatenate([kk, vv], axis=-1).reshape(*k.shape[:-1], -1)

    def split(a):
        a = a.reshape(*a.shape[:-1], kv_heads, 2, -1)
        k, v = a[..., 0, :].reshape(*a.shape[:-3], -1), a[..., 1, :].reshape(*a.shape[:-3], -1)
        return (k.T, v.T) if k.ndim == 2 else (k, v)

    return join, split


def entries(model: GPT, packed_keys: bool | None = None) -> list[hf.Entry]:
    """``packed_keys``: a ``moe_format="mxfp4"`` gpt-oss model's experts under gpt-oss's MXFP4 keys
    (default), else under the float keys (quantized as they are read)."""
    cfg = model.cfg
    if packed_keys is None:
        packed_keys = cfg.moe_format == "mxfp4"
    join_kv, split_kv = _kv(cfg.kv_heads or cfg.heads)
    moe = _moe_family(cfg) if cfg.moe_experts else None
    out = [hf.same("model.embed_tokens.weight", model.embed.embedding)]
    for i, blk in enumerate(model.blocks):
        pre, attn = f"model.layers.{i}.", blk.attn
        if cfg.post_norms:  # Gemma 2/3, OLMo 2: post_attention_layernorm is the attention output's
            out += [hf.same(pre + "post_attention_layernorm.weight", blk.attn_post_norm.weight),
                    hf.same(pre + "post_feedforward_layernorm.weight", blk.mlp_post_norm.weight)]
            if cfg.pre_norms:
                out.append(hf.same(pre + "pre_feedforward_layernorm.weight", blk.norm2.weight))
        else:
            out.append(hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight))
        if cfg.pre_norms:
            out.append(hf.same(pre + "input_layernorm.weight", blk.norm1.weight))
        out += [hf.linear(pre + "self_attn.q_proj.weight", attn.q.kernel),
                hf.Entry((pre + "self_attn.k_proj.weight", pre + "self_attn.v_proj.weight"), attn.kv.kernel,
                         join_kv, split_kv),
                hf.linear(pre + "self_attn.o_proj.weight", attn.o.kernel)]
        if moe:
            out += moe_hf.expert_entries(moe, pre, blk.mlp, cfg.moe_experts, packed_keys)
        else:
            out += [hf.Entry((pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"), blk.mlp.gate_up.kernel,
                             lambda g, u: np.concatenate([g.T, u.T], axis=1), lambda a: tuple(np.split(a.T, 2, axis=0))),
                    hf.linear(pre + "mlp.down_proj.weight", blk.mlp.down.kernel)]
        if cfg.qk_norm:
            out += [hf.same(pre + "self_attn.q_norm.weight", attn.q_norm.weight),
                    hf.same(pre + "self_attn.k_norm.weight", attn.k_norm.weight)]
        if cfg.qkv_bias or cfg.bias:  # (Qwen2: q, k, v; gpt-oss: o too)
            out += [hf.same(pre + "self_attn.q_proj.bias", attn.q.bias),
                    hf.Entry((pre + "self_attn.k_proj.bias", pre + "self_attn.v_proj.bias"), attn.kv.bias,
                             join_kv, split_kv)]
        if cfg.bias:
            out.append(hf.same(pre + "self_attn.o_proj.bias", attn.o.bias))
        if cfg.attn_sinks:
            out.append(hf.same(pre + "self_attn.sinks", attn.sinks))
    out.append(hf.same("model.norm.weight", model.norm.weight))
    if model.head is not None:
        out.append(hf.linear("lm_head.weight", model.head.kernel))
    return out


def _ignore(cfg: GPTConfig):
    """RoPE buffers some checkpoints store, and a tied model's ``lm_head.weight``."""
    return lambda key: key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_embeddings)


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face's keys and layouts (fp32 numpy)."""
    return hf.to_state_dict(entries(model))


def _mxfp4_source(cfg: GPTConfig, state_dict: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """``(state_dict, packed_keys)``: a ``moe_format="mxfp4"`` model reads gpt-oss's packed experts as they
    are (not dequantized by :class:`moe_hf.MXFP4StateDict`)."""
    if cfg.moe_format != "mxfp4":
        return state_dict, False
    raw = state_dict.raw if isinstance(state_dict, moe_hf.MXFP4StateDict) else state_dict
    return raw, any(k.endswith("_blocks") for k in raw)


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` into ``model`` in place."""
    state_dict, packed = _mxfp4_source(model.cfg, state_dict)
    hf.load_state_dict(entries(model, packed), state_dict, strict=strict, ignore=_ignore(model.cfg))


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    state_dict, packed = _mxfp4_source(cfg, state_dict)
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), lambda m: entries(m, packed), state_dict,
                            strict=strict, ignore=_ignore(cfg), where=where, param_dtype=param_dtype)
