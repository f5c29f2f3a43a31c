"""GPT-2 (``GPT2LMHeadModel``), GPT-NeoX / Pythia (``GPTNeoXForCausalLM``), Phi-1 / 1.5 / 2 (``PhiForCausalLM``),
StarCoder2 (``Starcoder2ForCausalLM``), BLOOM, Falcon, OPT, StarCoder / SantaCoder (``gpt_bigcode``), GPT-J and CodeGen
checkpoints in the Hugging Face layout <-> :class:`GPT` with the classic
block: LayerNorms with biases (``norm="layer"``), biases on every projection (``bias``), a plain MLP
``down(act(up(x)))`` (``mlp_gated=False``; ``gelu_new`` / ``gelu_pytorch_tanh`` are the tanh GELU, Pythia's
``gelu`` the erf one), and

- GPT-2: learned absolute positions (``position="learned"``, ``max_positions = n_positions``), a tied head;
  StarCoder / SantaCoder (``gpt_bigcode``) the same with one kv head (``multi_query``) and ``Linear`` layouts;
- OPT: learned positions two rows into the table (``position_offset=2``), ReLU (``mlp_act="relu"``), pre-LayerNorm
  blocks (``do_layer_norm_before``); OPT-350m's post-LN blocks without a final norm (``post_ln``) and its
  narrower embeddings (``embed_dim = word_embed_proj_dim``) with ``project_in`` / ``project_out``;
- GPT-NeoX: RoPE on each head's first ``rotary_pct`` of channels (``rotary_dim``), attention and MLP side by
  side on the block's input (``parallel_residual``, its ``use_parallel_residual``), an untied ``embed_out``;
- Phi: attention and MLP side by side on one normed input (``parallel_residual`` + ``shared_norm``), partial
  rotary, GQA, a bias on the untied head (``head_bias``);
- StarCoder2: sequential blocks, GQA, whole-head RoPE, a sliding window on every layer (``layer_types=
  ("window",)``, Mistral's semantics), a tied head.
- BLOOM (``BloomForCausalLM``): ALiBi instead of position embeddings (``position="alibi"``: the flash and decode
  kernels' ``alibi_slopes``, BLOOM's slopes, its per-key bias equal under the softmax), a LayerNorm on the
  embeddings (``embed_norm``), per-head fused ``self_attention.query_key_value`` as GPT-NeoX's, a tied head;
- Falcon (``FalconForCausalLM``): no biases on the projections (``bias=False``; 7B / 40B / 180B), whole-head RoPE,
  attention and MLP side by side on one norm (``parallel_attn``: ``shared_norm``) or on two (the new decoder
  architecture's ``ln_attn`` / ``ln_mlp``) or sequential, multi-query or grouped kv heads; its fused
  ``query_key_value`` holds, per kv group, the group's query heads, then one key and one value head (GPT-NeoX's
  and BLOOM's are the one-head groups of that layout). Falcon-RW (``alibi``) adds ALiBi to ``q . k`` before the
  ``1 / sqrt(head_dim)`` scaling: BLOOM's slopes times ``alibi_scale = head_dim ** -0.5``.
- GPT-J (``GPTJForCausalLM``) and CodeGen (``CodeGenForCausalLM``): Phi's block (one LayerNorm before attention
  and MLP side by side) with biases on the MLP only (``bias=False``, ``mlp_bias=True``), a bias on the untied head,
  and RoPE on each head's first ``rotary_dim`` channels rotated in interleaved pairs (``rotate_every_two``): the
  load permutes those query / key channels to rotate-half order (even channels, then odd ones), which leaves every
  ``q . k`` as it was, and the export permutes them back. CodeGen fuses q, v, k (in that order) into ``qkv_proj``
  over 4 model-parallel groups of heads; its export is a GPT-J folder (the same block).

Each family's keys are renamed to family-neutral ones (``layers.i.attn.q_proj.weight``, ...) that
:func:`entries` reads (:func:`prepare_state_dict`) and back (:func:`export_state_dict`); fused projections are
split on the way in and fused again on the way out: GPT-2's ``attn.c_attn`` (a ``Conv1D``: weight ``[in, 3
dim]``, every head's q, then k, then v columns) and GPT-NeoX's ``attention.query_key_value`` (a ``Linear``:
weight ``[3 dim, in]``, per head its q, k and v rows); GPT-2's other ``Conv1D`` weights are transposed:

====================  =================================  ===================================  =========================
jaxattn variable      GPT-2 (``transformer.`` + ...)     GPT-NeoX (``gpt_neox.`` + ...)      Phi / StarCoder2 (``model.`` + ...)
====================  =================================  ===================================  =========================
``embed``             ``wte``                            ``embed_in``                         ``embed_tokens``
``pos_embed``         ``wpe``                            (RoPE)                               (RoPE)
``blocks.i.norm1``    ``h.i.ln_1``                       ``layers.i.input_layernorm``         ``layers.i.input_layernorm``
``blocks.i.attn.q``   ``h.i.attn.c_attn`` (q columns)    ``...attention.query_key_value``     ``...self_attn.q_proj``
``blocks.i.attn.kv``  ``h.i.attn.c_attn`` (k, v)         (k, v rows of each head)             ``...k_proj``, ``v_proj``
``blocks.i.attn.o``   ``h.i.attn.c_proj``                ``...attention.dense``               ``...dense`` / ``o_proj``
``blocks.i.norm2``    ``h.i.ln_2``                       ``...post_attention_layernorm``      (Phi: none) / same
``blocks.i.mlp.up``   ``h.i.mlp.c_fc``                   ``...mlp.dense_h_to_4h``             ``...mlp.fc1`` / ``c_fc``
``blocks.i.mlp.down`` ``h.i.mlp.c_proj``                 ``...mlp.dense_4h_to_h``             ``...mlp.fc2`` / ``c_proj``
``norm``              ``ln_f``                           ``final_layer_norm``                 ``final_layernorm`` / ``norm``
``head``              (tied)                             ``embed_out`` (top level)            ``lm_head`` (top level)
====================  =================================  ===================================  =========================

GPT-2 folders saved from ``GPT2Model`` (OpenAI's ``gpt2``: keys without ``transformer.``) load too. An export
writes the family :func:`hf_config` picks from the block (a sequential GPT-NeoX with whole-head RoPE is
StarCoder2's block and saves as one). Options :class:`GPT` cannot represent raise ``ValueError`` (GPT-2's
``scale_attn_by_inverse_layer_idx`` and cross attention, GPT-NeoX without attention biases, Phi's
``qk_layernorm``, activations other than GELU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.gpt import CLASSIC_FIELDS, FAMILY_FIELDS, GPT, GPTConfig, non_default
from jaxattn.models.gpt_hf import _kv, _scaling, rope_parameters

__all__ = ["config_from_hf", "entries", "export_state_dict", "hf_config", "is_classic", "load_hf_state_dict",
           "prepare_state_dict", "to_hf_state_dict"]

_ARCH = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "phi": "PhiForCausalLM",
         "starcoder2": "Starcoder2ForCausalLM", "bloom": "BloomForCausalLM", "falcon": "FalconForCausalLM",
         "opt": "OPTForCausalLM", "gpt_bigcode": "GPTBigCodeForCausalLM", "gptj": "GPTJForCausalLM",
         "codegen": "CodeGenForCausalLM"}
# Hugging Face's activation names -> GPTConfig.mlp_act (gelu_new / gelu_fast / gelu_pytorch_tanh: the tanh form)
_ACT = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
        "relu": "relu"}
# each family's names of the pieces (q_proj / k_proj / v_proj: the fused projection's parts, Linear layout);
# prepare_state_dict renames them to the family-neutral keys entries() reads
_NAMES = {
    "gpt2": dict(embed="transformer.wte.weight", layer="transformer.h.{i}.", norm1="ln_1", norm2="ln_2",
                 attn="attn.", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj", final="transformer.ln_f",
                 head="lm_head"),
    "gpt_neox": dict(embed="gpt_neox.embed_in.weight", layer="gpt_neox.layers.{i}.", norm1="input_layernorm",
                     norm2="post_attention_layernorm", attn="attention.", o="attention.dense", up="mlp.dense_h_to_4h",
                     down="mlp.dense_4h_to_h", final="gpt_neox.final_layer_norm", head="embed_out"),
    "phi": dict(embed="model.embed_tokens.weight", layer="model.layers.{i}.", norm1="input_layernorm", norm2=None,
                attn="self_attn.", o="self_attn.dense", up="mlp.fc1", down="mlp.fc2", final="model.final_layernorm",
                head="lm_head"),
    "bloom": dict(embed="transformer.word_embeddings.weight", embed_norm="transformer.word_embeddings_layernorm",
                  layer="transformer.h.{i}.", norm1="input_layernorm", norm2="post_attention_layernorm",
                  attn="self_attention.", o="self_attention.dense", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h",
                  final="transformer.ln_f", head="lm_head"),
    "opt": dict(embed="model.decoder.embed_tokens.weight", pos="model.decoder.embed_positions.weight",
                layer="model.decoder.layers.{i}.", norm1="self_attn_layer_norm", norm2="final_layer_norm",
                attn="self_attn.", o="self_attn.out_proj", up="fc1", down="fc2", final="model.decoder.final_layer_norm",
                head="lm_head", project_in="model.decoder.project_in.weight",
                project_out="model.decoder.project_out.weight"),
    "falcon": dict(embed="transformer.word_embeddings.weight", layer="transformer.h.{i}.", attn="self_attention.",
                   o="self_attention.dense", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", final="transformer.ln_f",
                   head="lm_head"),  # (its norms: _names)
    "starcoder2": dict(embed="model.embed_tokens.weight", layer="model.layers.{i}.", norm1="input_layernorm",
                       norm2="post_attention_layernorm", attn="self_attn.", o="self_attn.o_proj", up="mlp.c_fc",
                       down="mlp.c_proj", final="model.norm", head="lm_head"),
}
_NAMES["gpt_bigcode"] = _NAMES["gpt2"]  # (GPT-2's names, Linear layouts)
_NAMES["gptj"] = _NAMES["codegen"] = dict(  # (CodeGen's q, k, v: split from its qkv_proj)
    embed="transformer.wte.weight", layer="transformer.h.{i}.", norm1="ln_1", norm2=None, attn="attn.",
    o="attn.out_proj", up="mlp.fc_in", down="mlp.fc_out", final="transformer.ln_f", head="lm_head")
_GPTJ = ("gptj", "codegen")
CODEGEN_MP = 4  # CodeGen's qkv_proj: 4 model-parallel groups of heads, each its q | v | k rows
_GPT2_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (and attn.c_attn.weight, split)


def _names(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The family's piece names; Falcon's norms by its block: two before attention and MLP side by side
    (``ln_attn``, ``ln_mlp``: the new decoder architecture), one for both (``input_layernorm``), or a sequential
    block's two (``input_layernorm``, ``post_attention_layernorm``)."""
    n = dict(_NAMES[raw.get("model_type")])
    if raw.get("model_type") == "falcon":
        new = raw.get("new_decoder_architecture", False)
        if new and (raw.get("num_ln_in_parallel_attn") or 2) == 2:
            n.update(norm1="ln_attn", norm2="ln_mlp")
        else:
            n.update(norm1="input_layernorm", norm2=None if new or raw.get("parallel_attn", True)
                     else "post_attention_layernorm")
    return n


def _fused_groups(raw: Mapping[str, Any]) -> int | None:
    """The groups of a fused ``query_key_value``, whose rows are, per group, its query heads, then one key head
    and one value head (GPT-NeoX, BLOOM, Falcon's MHA: a group per head; Falcon's multi-query: one; its new
    decoder architecture: one per kv head); None: no such projection."""
    kind = raw.get("model_type")
    if kind in ("gpt_neox", "bloom"):
        return _heads(raw)
    if kind == "gpt_bigcode":  # (multi-query: q | k | v rows; else per head q, k, v)
        return 1 if raw.get("multi_query", True) else _heads(raw)
    if kind != "falcon":
        return None
    if raw.get("new_decoder_architecture", False):
        return int(raw.get("num_kv_heads") or _heads(raw))
    return 1 if raw.get("multi_query", True) else _heads(raw)


def _key_map(raw: Mapping[str, Any]) -> dict[str, str]:
    """Family-neutral key (what :func:`entries` reads) -> the family's key, weights and biases alike."""
    layers = _layers(raw)
    n = _names(raw)
    out = {"embed.weight": n["embed"], "pos_embed.weight": n.get("pos", "transformer.wpe.weight"),
           **{f"{p}.weight": n[p] for p in ("project_in", "project_out") if p in n},
           **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in (("norm", n["final"]), ("head", n["head"]),
                                                                  ("embed_norm", n.get("embed_norm"))) if theirs
              for p in ("weight", "bias")}}
    pieces = (("norm1", n["norm1"]), ("norm2", n["norm2"]), ("attn.o", n["o"]), ("mlp.up", n["up"]),
              ("mlp.down", n["down"]), *((f"attn.{x}", n["attn"] + x) for x in ("q_proj", "k_proj", "v_proj")))
    for i in range(layers):
        pre = n["layer"].format(i=i)
        out.update((f"layers.{i}.{ours}.{p}", f"{pre}{theirs}.{p}") for ours, theirs in pieces if theirs
                   for p in ("weight", "bias"))
    return out


def is_classic(cfg: GPTConfig) -> bool:
    """Whether ``cfg`` has the GPT-2 / GPT-NeoX block (this module's layouts, not :mod:`gpt_hf`'s)."""
    if cfg.moe_experts:  # (gpt-oss's biases: jaxattn.models.gpt_hf's layout)
        return False
    return cfg.position == "learned" or bool(non_default(cfg, CLASSIC_FIELDS))


def _rope(raw: Mapping[str, Any], bad, default_pct: float = 1.0) -> tuple[float, tuple, float]:
    """``(theta, rope_scaling, rotary fraction)`` from transformers 5's ``rope_parameters`` or the older fields."""
    params = dict(raw.get("rope_parameters") or {})
    params.update(raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))
    pct = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get("rotary_pct", default_pct)))
    return float(theta), _scaling(params, raw, bad), float(pct)


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a ``config.json`` dict of one of the families in :data:`_ARCH`; ``overrides``
    set jaxattn-only fields (``dtype``, ``attn_impl``, ...)."""
    kind = raw.get("model_type")
    if kind not in _ARCH:
        raise ValueError(f"config.json: model_type {kind!r}: expected one of {sorted(_ARCH)}")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's GPT supports {want} only")

    act_field = {"gpt2": "activation_function", "opt": "activation_function", "gpt_bigcode": "activation_function",
                 "gptj": "activation_function", "codegen": "activation_function", "falcon": "activation"}.get(kind, "hidden_act")
    act = raw.get(act_field, {"gpt2": "gelu_new", "gpt_neox": "gelu", "phi": "gelu_new", "falcon": "gelu",
                                 "opt": "relu", "gptj": "gelu_new", "codegen": "gelu_new"}.get(kind, "gelu_pytorch_tanh"))
    if kind == "bloom":  # (BLOOM's MLP: its own tanh GELU, no config field)
        act = "gelu_new"
    if act not in _ACT:
        raise bad(act_field, " / ".join(sorted(_ACT)))
    common = dict(norm="layer", bias=True, mlp_gated=False, mlp_act=_ACT[act],
                  init_std=float(raw.get("initializer_range", 0.02)), vocab_size=int(raw["vocab_size"]))
    if kind == "opt":  # learned positions 2 rows in, pre-LayerNorm blocks (OPT-350m: post-LN, projections), ReLU
        pre_ln = bool(raw.get("do_layer_norm_before", True))
        for flag, ok in (("layer_norm_elementwise_affine", True), ("_remove_final_layer_norm", False)):
            if raw.get(flag, ok) != ok and (pre_ln or flag[0] == "l"):
                raise bad(flag, repr(ok).lower())
        dim = int(raw.get("hidden_size", 768))
        proj = int(raw.get("word_embed_proj_dim") or dim)
        fields = dict(post_ln=not pre_ln, embed_dim=proj if proj != dim else None, dim=dim, layers=int(raw.get("num_hidden_layers", 12)), heads=int(raw.get("num_attention_heads", 12)),
                      mlp_dim=int(raw.get("ffn_dim", 3072)), position="learned", position_offset=2,
                      max_positions=int(raw.get("max_position_embeddings", 2048)), bias=bool(raw.get("enable_bias", True)),
                      norm_eps=1e-5, tie_embeddings=bool(raw.get("tie_word_embeddings", True)))
        return hf.with_overrides(GPTConfig(**{**common, **fields}), overrides)
    if kind in ("gpt2", "gpt_bigcode"):
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if raw.get(flag, False):
                raise bad(flag, "false")
        if not raw.get("scale_attn_weights", True):
            raise bad("scale_attn_weights", "true")
        dim = int(raw.get("n_embd", 768))
        fields = dict(dim=dim, layers=int(raw.get("n_layer", 12)), heads=int(raw.get("n_head", 12)),
                      mlp_dim=int(raw.get("n_inner") or 4 * dim), position="learned",
                      max_positions=int(raw.get("n_positions", 1024)), norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                      tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
                      kv_heads=1 if kind == "gpt_bigcode" and raw.get("multi_query", True) else None)
        return hf.with_overrides(GPTConfig(**common, **fields), overrides)
    if kind == "falcon":
        return hf.with_overrides(GPTConfig(**{**common, **_falcon_fields(raw, bad)}), overrides)
    if kind in _GPTJ:  # Phi's block, MLP biases only, interleaved partial rotary
        dim, heads = int(raw.get("n_embd", 4096)), int(raw.get("n_head", 16))
        if raw.get("rotary_dim") is None:
            raise bad("rotary_dim", "a number of rotated channels per head (GPT-J-6B, CodeGen: 64)")
        rotary = int(raw["rotary_dim"])
        if kind == "codegen" and heads % CODEGEN_MP:
            raise bad("n_head", f"a multiple of {CODEGEN_MP} (CodeGen's qkv_proj groups)")
        fields = dict(dim=dim, layers=int(raw.get("n_layer", 28)), heads=heads, mlp_dim=int(raw.get("n_inner") or 4 * dim),
                      rotary_dim=None if rotary == dim // heads else rotary, bias=False, mlp_bias=True,
                      parallel_residual=True, shared_norm=True, head_bias=True,
                      norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                      tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
        if fields["tie_embeddings"]:
            raise bad("tie_word_embeddings", "false (the lm_head has a bias)")
        return hf.with_overrides(GPTConfig(**{**common, **fields}), overrides)
    if kind == "bloom":  # ALiBi (the flash / decode kernels' alibi_slopes), a LayerNorm on the embeddings
        if raw.get("apply_residual_connection_post_layernorm", False):
            raise bad("apply_residual_connection_post_layernorm", "false")
        dim = int(raw.get("hidden_size") or raw.get("n_embed", 64))
        fields = dict(dim=dim, layers=int(raw.get("n_layer", 2)), heads=int(raw.get("n_head", 8)), mlp_dim=4 * dim,
                      position="alibi", embed_norm=True, norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                      tie_embeddings=bool(raw.get("tie_word_embeddings", True)))
        return hf.with_overrides(GPTConfig(**common, **fields), overrides)
    for flag, field in (("attention_bias", "gpt_neox"), ("use_bias", "starcoder2")):
        if kind == field and not raw.get(flag, True):
            raise bad(flag, "true")
    if kind == "phi" and raw.get("qk_layernorm", False):
        raise bad("qk_layernorm", "false")
    dim, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    theta, scaling, pct = _rope(raw, bad, {"gpt_neox": 0.25, "phi": 0.5}.get(kind, 1.0))
    if pct != 1.0 and kind == "starcoder2":
        raise bad("partial_rotary_factor", "1.0 (StarCoder2 rotates whole heads)")
    rotary = int(dim // heads * pct)  # (as transformers: int(head_size * rotary_pct))
    window = raw.get("sliding_window") if kind == "starcoder2" else None
    tied = bool(raw.get("tie_word_embeddings", kind == "starcoder2"))
    if kind == "phi" and tied:
        raise bad("tie_word_embeddings", "false (Phi's lm_head has a bias)")
    fields = dict(dim=dim, layers=int(raw["num_hidden_layers"]), heads=heads,
                  kv_heads=int(raw.get("num_key_value_heads") or heads), mlp_dim=int(raw["intermediate_size"]),
                  rope_theta=theta, rope_scaling=scaling, rotary_dim=None if rotary == dim // heads else rotary,
                  parallel_residual=bool(raw.get("use_parallel_residual", True)) if kind == "gpt_neox" else kind == "phi",
                  shared_norm=kind == "phi", head_bias=kind == "phi",
                  norm_eps=float(raw.get("norm_epsilon" if kind == "starcoder2" else "layer_norm_eps", 1e-5)),
                  tie_embeddings=tied, layer_types=("window",) if window else ("full",), **({"window": int(window)} if window else {}))
    return hf.with_overrides(GPTConfig(**common, **fields), overrides)


def _falcon_fields(raw: Mapping[str, Any], bad) -> dict[str, Any]:
    """Falcon's block: attention and MLP side by side (``parallel_attn``) on one norm, or on two (the new decoder
    architecture's ``ln_attn`` / ``ln_mlp``), or sequential; multi-query (one kv head), ``num_kv_heads`` groups
    (new architecture) or one kv head per head; biases on every projection or none (``bias``)."""
    dim, heads = int(raw.get("hidden_size") or raw.get("n_embed", 4544)), int(raw.get("num_attention_heads", 71))
    # Falcon-RW: ALiBi (BLOOM's slopes) added to q . k before the 1 / sqrt(head_dim) scaling: scaled slopes
    alibi = dict(position="alibi", alibi_scale=(dim // heads) ** -0.5) if raw.get("alibi", False) else {}
    new, parallel = bool(raw.get("new_decoder_architecture", False)), bool(raw.get("parallel_attn", True))
    if new and not parallel:
        raise bad("parallel_attn", "true with new_decoder_architecture")
    kv = int(raw.get("num_kv_heads") or heads) if new else 1 if raw.get("multi_query", True) else heads
    theta, scaling, _ = _rope(raw, bad)
    return dict(dim=dim, layers=int(raw.get("num_hidden_layers", 32)), heads=heads, kv_heads=kv,
                mlp_dim=int(raw.get("ffn_hidden_size") or 4 * dim), rope_theta=theta, rope_scaling=scaling,
                parallel_residual=parallel, bias=bool(raw.get("bias", False)),
                shared_norm=parallel and not (new and (raw.get("num_ln_in_parallel_attn") or 2) == 2),
                norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
                **alibi)


def _falcon_block(cfg: GPTConfig) -> dict[str, Any]:
    """The Falcon ``config.json`` fields that give ``cfg``'s block (and its fused projection's layout)."""
    kv = cfg.kv_heads or cfg.heads
    new = cfg.parallel_residual and (not cfg.shared_norm or kv not in (1, cfg.heads))
    return {"model_type": "falcon", "num_attention_heads": cfg.heads, "num_hidden_layers": cfg.layers, "num_kv_heads": kv,
            "new_decoder_architecture": new, "multi_query": kv == 1, "parallel_attn": cfg.parallel_residual,
            "num_ln_in_parallel_attn": (1 if cfg.shared_norm else 2) if new else None, "bias": cfg.bias,
            "alibi": cfg.position == "alibi"}


def _family(cfg: GPTConfig) -> str:
    """The family an export writes: ``gpt2`` / ``gpt_bigcode`` / ``opt`` (learned positions), ``falcon`` (no
    projection biases), ``bloom`` (ALiBi), ``phi`` (one norm before attention and MLP side by side), ``gpt_neox``
    (parallel residuals with two norms, or partial rotary), ``starcoder2`` (sequential, whole-head RoPE, GQA and
    sliding windows allowed); a ValueError names what none holds. (A loaded model may run other
    attention patterns, as ``layer_types``; its export may not.)"""
    llama_only = non_default(cfg, tuple(f for f in FAMILY_FIELDS if f not in ("rotary_dim", "rope_scaling", "mlp_act")))
    plain = (cfg.norm, cfg.mlp_gated) == ("layer", False) and cfg.mlp_act in ("gelu", "gelu_tanh", "relu")
    if not plain or llama_only or cfg.qkv_bias or cfg.head_dim not in (None, cfg.dim // cfg.heads) \
            or set(cfg.layer_types) - {"full", "window"} or len(set(cfg.layer_types)) > 1:
        raise ValueError("a GPT-2 / GPT-NeoX / Phi / StarCoder2 layout has LayerNorms and a plain MLP (norm='layer', "
                         "mlp_gated=False, mlp_act 'gelu', 'gelu_tanh' or OPT's 'relu'), every layer full (or every one "
                         f"a window) and no LLaMA-family options (set here: {llama_only or 'the block'})")
    kv, window = cfg.kv_heads or cfg.heads, cfg.layer_types == ("window",)
    gqa = kv != cfg.heads
    if cfg.position == "learned":  # GPT-2 (GPT-2 StarCoder with one kv head), OPT (its table offset 2)
        if cfg.parallel_residual or window or cfg.head_bias or cfg.embed_norm or kv not in (1, cfg.heads):
            raise ValueError("GPT-2 / StarCoder / OPT layouts (learned positions) have sequential residuals, a head "
                             "without bias, full attention, and one kv head per head (StarCoder: one in all)")
        if cfg.position_offset == 2:
            if gqa or cfg.norm_eps != 1e-5:
                raise ValueError("an OPT layout has one kv head per head and LayerNorm eps 1e-5")
            return "opt"
        if cfg.post_ln or cfg.embed_dim:
            raise ValueError("post-LN blocks (post_ln) and projected embeddings (embed_dim) are OPT-350m's: learned "
                             "positions with position_offset 2")
        if cfg.position_offset or not cfg.bias or not cfg.tie_embeddings or cfg.mlp_act == "relu":
            raise ValueError("a GPT-2 / StarCoder layout has position_offset 0 (OPT's: 2), biases, a tied head and GELU")
        return "gpt_bigcode" if kv == 1 and cfg.heads > 1 else "gpt2"
    if cfg.mlp_act == "relu" or cfg.post_ln or cfg.embed_dim:
        raise ValueError("ReLU MLPs, post-LN blocks (post_ln) and projected embeddings (embed_dim) are OPT's (learned "
                         "positions, position_offset 2)")
    if cfg.mlp_has_bias != cfg.bias:  # (GPT-J: biases on the MLP only)
        if cfg.bias or not cfg.shared_norm or not cfg.head_bias or cfg.position != "rope" or gqa or window \
                or cfg.embed_norm:
            raise ValueError("a GPT-J layout (biases on the MLP only) has one norm before attention and MLP side by "
                             "side (shared_norm), a bias on the untied head, RoPE, one kv head per head and full "
                             "attention")
        return "gptj"
    if cfg.position == "alibi" and cfg.alibi_scale != 1.0:  # (Falcon-RW: slopes scaled by 1 / sqrt(head_dim))
        if not math.isclose(cfg.alibi_scale, cfg.head_size ** -0.5) or cfg.embed_norm or cfg.head_bias or window \
                or not cfg.parallel_residual and kv not in (1, cfg.heads) or cfg.hidden != 4 * cfg.dim:
            raise ValueError("a Falcon-RW layout (ALiBi scaled by alibi_scale) has alibi_scale = head_dim ** -0.5, no "
                             "norm on the embeddings, a head without bias, full attention, a 4 x dim MLP, and in "
                             "sequential blocks one kv head or one per head")
        return "falcon"
    if not cfg.bias:  # (Falcon's projections have none; the other families' all have them)
        if cfg.position != "rope" or cfg.rotary_dim or window or cfg.head_bias or cfg.embed_norm \
                or not cfg.parallel_residual and kv not in (1, cfg.heads):
            raise ValueError("a Falcon layout (projections without biases) has whole-head RoPE, full attention, a head "
                             "without bias, and in sequential blocks one kv head or one per head")
        return "falcon"
    if cfg.embed_norm and cfg.position != "alibi":
        raise ValueError("a norm on the embeddings (embed_norm) is BLOOM's, whose blocks have ALiBi")
    if cfg.position == "alibi":
        kind = "bloom"
        if not cfg.embed_norm or cfg.parallel_residual or gqa or window or cfg.head_bias or cfg.hidden != 4 * cfg.dim \
                or cfg.mlp_act != "gelu_tanh":
            raise ValueError("a BLOOM layout (ALiBi) has a norm on the embeddings (embed_norm), sequential residuals, one "
                             "kv head per head, full attention, a 4 x dim tanh-GELU MLP and a head without bias")
    elif cfg.shared_norm:
        kind = "phi"
        if not cfg.head_bias or window:
            raise ValueError("a Phi layout has a bias on its (untied) head and full attention")
    elif cfg.parallel_residual or cfg.rotary_dim:
        kind = "gpt_neox"
        if gqa or window or cfg.head_bias:
            raise ValueError("a GPT-NeoX layout (parallel residuals or partial rotary) has one kv head per head, full "
                             "attention and a head without bias")
    else:
        kind = "starcoder2"
        if cfg.head_bias:
            raise ValueError("a StarCoder2 layout has a head without bias")
    return kind


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` for ``cfg``, of the family :func:`_family` picks."""
    kind = _family(cfg)
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.mlp_act]
    out = {"architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
           "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings}
    scaling, rope = rope_parameters(cfg)
    if kind == "falcon":
        return {**out, **_falcon_block(cfg), "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers,
                "num_attention_heads": cfg.heads, "ffn_hidden_size": cfg.hidden, "activation": act,
                "layer_norm_epsilon": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
                "max_position_embeddings": 2048 * int(max(1, scaling.get("factor", 1))), "bos_token_id": None,
                "eos_token_id": None}
    if kind == "gptj":
        return {**out, "n_embd": cfg.dim, "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": cfg.hidden,
                "rotary_dim": cfg.rotary_dim or cfg.head_size, "n_positions": 2048, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps, "bos_token_id": None, "eos_token_id": None}
    if kind == "bloom":
        return {**out, "hidden_size": cfg.dim, "n_layer": cfg.layers, "n_head": cfg.heads,
                "layer_norm_epsilon": cfg.norm_eps, "apply_residual_connection_post_layernorm": False,
                "bos_token_id": None, "eos_token_id": None}
    if kind == "opt":
        return {**out, "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
                "ffn_dim": cfg.hidden, "max_position_embeddings": cfg.max_positions, "do_layer_norm_before": not cfg.post_ln,
                "word_embed_proj_dim": cfg.embed_dim or cfg.dim, "enable_bias": cfg.bias, "activation_function": act,
                "layer_norm_elementwise_affine": True}
    if kind in ("gpt2", "gpt_bigcode"):
        ids = None if cfg.vocab_size <= 50256 else 50256  # (GPT2Config's bos / eos, past a small vocabulary)
        if kind == "gpt_bigcode":
            out["multi_query"] = True
        return {**out, "n_embd": cfg.dim, "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": cfg.hidden,
                "n_positions": cfg.max_positions, "n_ctx": cfg.max_positions, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True, "bos_token_id": ids,
                "eos_token_id": ids}
    pct = (cfg.rotary_dim or cfg.head_size) / cfg.head_size
    if int(cfg.head_size * pct) != (cfg.rotary_dim or cfg.head_size):
        raise ValueError(f"rotary_dim {cfg.rotary_dim} of {cfg.head_size}: no rotary fraction gives it")
    out.update(hidden_size=cfg.dim, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
               num_key_value_heads=cfg.kv_heads or cfg.heads, intermediate_size=cfg.hidden, hidden_act=act,
               rope_theta=cfg.rope_theta, **({"rope_scaling": {**scaling, "rope_type": rope["rope_type"]}} if scaling else {}),
               max_position_embeddings=2048 * int(max(1, scaling.get("factor", 1))))
    if kind == "starcoder2":
        return {**out, "norm_epsilon": cfg.norm_eps, "use_bias": True, "rope_parameters": rope,
                "sliding_window": cfg.window if cfg.layer_types == ("window",) else None,
                "bos_token_id": None, "eos_token_id": None}  # (Starcoder2Config's 50256 past a small vocabulary)
    rope["partial_rotary_factor"] = pct
    out.update(layer_norm_eps=cfg.norm_eps, partial_rotary_factor=pct, rope_parameters=rope)
    if kind == "phi":
        return {**out, "qk_layernorm": False, "bos_token_id": None, "eos_token_id": None}
    return {**out, "use_parallel_residual": cfg.parallel_residual, "attention_bias": True, "rotary_pct": pct,
            "rotary_emb_base": cfg.rope_theta}  # (transformers < 5's names)


def _split_fused(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Fused q/k/v projections as ``q_proj`` / ``k_proj`` / ``v_proj`` (Linear layout), GPT-2's other ``Conv1D``
    weights transposed, GPT-2 / BLOOM keys without ``transformer.`` given it."""
    kind, heads, groups = raw.get("model_type"), _heads(raw), _fused_groups(raw)
    out = {}
    for key, value in state_dict.items():
        if kind in ("gpt2", "bloom") and not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # (a save of the base model: OpenAI's gpt2, bigscience's bloom)
        pre, _, name = key.rpartition(".")
        if kind == "gpt2" and key.endswith("attn.c_attn.weight"):  # [in, 3 dim]: q | k | v columns
            parts = np.split(np.asarray(value).T, 3, axis=0)
        elif kind == "gpt2" and key.endswith("attn.c_attn.bias"):
            parts = np.split(np.asarray(value), 3)
        elif kind == "codegen" and key.endswith("attn.qkv_proj.weight"):  # per mp group: q | v | k rows
            a = np.asarray(value)
            a = a.reshape(CODEGEN_MP, 3, a.shape[0] // (3 * CODEGEN_MP), a.shape[1])
            q, v, k = (a[:, j].reshape(-1, a.shape[-1]) for j in range(3))
            parts = [q, k, v]
        elif groups and key.endswith(_fused_name(kind) + "." + name):  # per group: its q heads, k, v
            a = np.asarray(value)
            per = heads // groups
            a = a.reshape(groups, per + 2, a.shape[0] // (groups * (per + 2)), *a.shape[1:])
            parts = [a[:, :per].reshape(-1, *a.shape[3:]), a[:, per].reshape(-1, *a.shape[3:]),
                     a[:, per + 1].reshape(-1, *a.shape[3:])]
        else:
            out[key] = np.asarray(value).T if kind == "gpt2" and key.endswith(_GPT2_CONV1D) else value
            continue
        base = pre.rpartition(".")[0]  # the attention module
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            out[f"{base}.{proj}.{name}"] = part
    if kind in _GPTJ:  # interleaved rotary pairs -> rotate-half order
        perm = _rotary_order(raw)
        out = {k: _permute_heads(v, perm) if k.endswith(("attn.q_proj.weight", "attn.k_proj.weight")) else v
               for k, v in out.items()}
    return out


def _rotary_order(raw: Mapping[str, Any]) -> np.ndarray:
    """GPT-J's per-head channel order for rotate-half RoPE: the rotated channels' even ones, their odd ones,
    then the unrotated rest (its ``rotate_every_two`` pairs channels 2i and 2i + 1 at frequency i, as
    rotate-half pairs i and i + rotary_dim / 2)."""
    head_dim = int(raw["n_embd"]) // _heads(raw)
    rotary = int(raw.get("rotary_dim") or head_dim)
    return np.concatenate([np.arange(0, rotary, 2), np.arange(1, rotary, 2), np.arange(rotary, head_dim)])


def _permute_heads(w, order: np.ndarray) -> np.ndarray:
    """The output channels (rows, Linear layout) of every head of ``w`` in ``order``."""
    w = np.asarray(w)
    return w.reshape(-1, len(order), *w.shape[1:])[:, order].reshape(w.shape)


def _fused_name(kind: str) -> str:
    """The fused q/k/v projection's name: StarCoder's ``attn.c_attn``, else ``...attention.query_key_value``."""
    return "attn.c_attn" if kind == "gpt_bigcode" else "attention.query_key_value"


def _layers(raw: Mapping[str, Any]) -> int:
    gpt2_names = raw.get("model_type") in ("gpt2", "bloom", "gpt_bigcode", *_GPTJ)
    return int(raw.get("n_layer", 12) if gpt2_names else raw["num_hidden_layers"])


def _heads(raw: Mapping[str, Any]) -> int:
    gpt2_names = raw.get("model_type") in ("gpt2", "bloom", "gpt_bigcode", *_GPTJ)
    return int(raw.get("n_head", 12) if gpt2_names else raw["num_attention_heads"])


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A folder's ``state_dict`` on :func:`entries`' family-neutral keys (``layers.i.attn.q_proj.weight``, ...):
    fused q/k/v projections split (``Linear`` layout), GPT-2's ``Conv1D`` weights transposed; numpy views where it
    can. Keys it does not know stay as they are (a strict load names them)."""
    theirs = {v: k for k, v in _key_map(raw).items()}
    return {theirs.get(k, k): v for k, v in _split_fused(raw, state_dict).items()}


def export_state_dict(raw: Mapping[str, Any], state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`prepare_state_dict` for a ``config.json`` of :func:`hf_config`: the family's keys,
    fused projections and layouts."""
    kind, groups = raw.get("model_type"), _fused_groups(raw)
    if kind == "codegen":
        raise ValueError("export writes CodeGen's block as a GPT-J folder (model_type gptj)")
    names = _key_map(raw)
    state_dict = {names.get(k, k): v for k, v in state_dict.items()}
    if kind == "gptj":  # rotate-half order -> GPT-J's interleaved pairs
        back = np.argsort(_rotary_order(raw))
        state_dict = {k: _permute_heads(v, back) if k.endswith(("attn.q_proj.weight", "attn.k_proj.weight")) else v
                      for k, v in state_dict.items()}
    out = {}
    for key, value in state_dict.items():
        pre, _, name = key.rpartition(".")
        fused = kind == "gpt2" or groups is not None
        if fused and pre.endswith(("k_proj", "v_proj")):
            continue
        if not fused or not pre.endswith("q_proj"):
            out[key] = np.ascontiguousarray(value.T) if kind == "gpt2" and key.endswith(_GPT2_CONV1D) else value
            continue
        base = pre.rpartition(".")[0]
        q, k, v = (state_dict[f"{base}.{p}.{name}"] for p in ("q_proj", "k_proj", "v_proj"))
        if kind == "gpt2":
            fused = np.concatenate([q, k, v], axis=0)
            out[f"{base}.c_attn.{name}"] = np.ascontiguousarray(fused.T) if name == "weight" else fused
        else:  # per group: its query heads, its key, its value
            grouped = [t.reshape(groups, -1, q.shape[0] // _heads(raw), *t.shape[1:]) for t in (q, k, v)]
            out[f"{base}.{_fused_name(kind).rpartition('.')[2]}.{name}"] = np.concatenate(grouped, axis=1).reshape(-1, *q.shape[1:])
    return out


def _layer_norm(key: str, norm) -> list[hf.Entry]:
    return [hf.same(key + ".weight", norm.weight), hf.same(key + ".bias", norm.bias)]


def _linear(key: str, lin) -> list[hf.Entry]:
    return [hf.linear(key + ".weight", lin.kernel)] + ([hf.same(key + ".bias", lin.bias)] if lin.bias is not None else [])


def entries(model: GPT) -> list[hf.Entry]:
    """The variables on family-neutral keys (:func:`prepare_state_dict` / :func:`export_state_dict` map them)."""
    cfg = model.cfg
    join_kv, split_kv = _kv(cfg.kv_heads or cfg.heads)
    out = [hf.same("embed.weight", model.embed.embedding)]
    if model.embed_norm is not None:
        out += _layer_norm("embed_norm", model.embed_norm)
    if model.pos_embed is not None:
        out.append(hf.same("pos_embed.weight", model.pos_embed.embedding))
    for i, blk in enumerate(model.blocks):
        pre = f"layers.{i}."
        out += _layer_norm(pre + "norm1", blk.norm1) + _linear(pre + "attn.q_proj", blk.attn.q)
        if blk.norm2 is not None:
            out += _layer_norm(pre + "norm2", blk.norm2)
        out += [hf.Entry((f"{pre}attn.k_proj.{p}", f"{pre}attn.v_proj.{p}"), getattr(blk.attn.kv, v), join_kv, split_kv)
                for p, v in (("weight", "kernel"), ("bias", "bias")) if getattr(blk.attn.kv, v) is not None]
        out += _linear(pre + "attn.o", blk.attn.o) + _linear(pre + "mlp.up", blk.mlp.up) + _linear(pre + "mlp.down", blk.mlp.down)
    if model.norm is not None:  # (post-LN blocks: none)
        out += _layer_norm("norm", model.norm)
    out += [hf.linear(f"{p}.weight", getattr(model, p).kernel) for p in ("project_in", "project_out")
            if getattr(model, p) is not None]  # (OPT-350m)
    if model.head is not None:
        out += _linear("head", model.head)
    return out


def _ignore(cfg: GPTConfig):
    """The causal-mask and RoPE buffers older checkpoints store, and a tied model's head."""
    return lambda key: key.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                                     "rotary_emb.inv_freq", ".attn.causal_mask")) or (key == "head.weight" and cfg.tie_embeddings)


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under its export family's keys and layouts (fp32 numpy; fused as the folder's)."""
    return export_state_dict(hf_config(model.cfg), hf.to_state_dict(entries(model)))


def _detect(state_dict: Mapping[str, Any]) -> str:
    """A classic family from its keys."""
    keys = set(state_dict)
    for kind, probe in (("opt", "model.decoder.embed_tokens.weight"), ("codegen", "transformer.h.0.attn.qkv_proj.weight"),
                        ("gptj", "transformer.h.0.mlp.fc_in.weight"),
                        ("bloom", "transformer.word_embeddings_layernorm.weight"), ("bloom", "word_embeddings_layernorm.weight"),
                        ("falcon", "transformer.word_embeddings.weight"),
                        ("gpt_neox", "gpt_neox.embed_in.weight"), ("phi", "model.final_layernorm.weight"),
                        ("starcoder2", "model.embed_tokens.weight"), ("gpt2", "transformer.wte.weight"), ("gpt2", "wte.weight")):
        if probe in keys:
            return kind
    raise ValueError("state_dict: no GPT-2 / GPT-J (wte), GPT-NeoX (gpt_neox.embed_in), Phi (model.final_layernorm) or "
                     "StarCoder2 (model.embed_tokens) keys")


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a GPT-2 / GPT-NeoX / Phi / StarCoder2 ``state_dict`` (the folder's keys; the family read from them)
    into ``model`` in place."""
    cfg = model.cfg
    kind = _detect(state_dict)
    if kind == "gpt2" and (cfg.kv_heads or cfg.heads) == 1 and cfg.heads > 1:  # (StarCoder's keys are GPT-2's)
        kind = "gpt_bigcode"
    raw = _falcon_block(cfg) if kind == "falcon" else {  # (Falcon's layouts follow its block options)
        "model_type": kind, "n_layer": cfg.layers, "num_hidden_layers": cfg.layers, "n_head": cfg.heads,
        "num_attention_heads": cfg.heads, "n_embd": cfg.dim, "rotary_dim": cfg.rotary_dim}
    hf.load_state_dict(entries(model), prepare_state_dict(raw, state_dict), strict=strict, ignore=_ignore(cfg))


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict,
                            ignore=_ignore(cfg), where=where, param_dtype=param_dtype)
