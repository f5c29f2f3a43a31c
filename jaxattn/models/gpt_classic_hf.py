"""GPT-2 (``GPT2LMHeadModel``) and GPT-NeoX / Pythia (``GPTNeoXForCausalLM``) checkpoints in the Hugging Face
layout <-> :class:`GPT` with the classic block: LayerNorms with biases (``norm="layer"``), biases on every
projection (``bias``), a plain MLP ``down(act(up(x)))`` (``mlp_gated=False``; GPT-2's tanh GELU ``gelu_new``,
Pythia's erf GELU), and

- GPT-2: learned absolute positions (``position="learned"``, ``max_positions = n_positions``), a tied head;
- GPT-NeoX: RoPE on each head's first ``rotary_pct`` of channels (``rotary_dim``), attention and MLP side by
  side on the block's input (``parallel_residual``, its ``use_parallel_residual``), an untied ``embed_out``.

Fused projections are split on the way in (:func:`prepare_state_dict`) and fused again on the way out
(:func:`export_state_dict`): GPT-2's ``attn.c_attn`` (a ``Conv1D``: weight ``[in, 3 dim]``, every head's q,
then k, then v columns) and GPT-NeoX's ``attention.query_key_value`` (a ``Linear``: weight ``[3 dim, in]``,
per head its q, k and v rows) become ``q_proj`` / ``k_proj`` / ``v_proj`` in ``Linear`` layout, and GPT-2's
other ``Conv1D`` weights are transposed to it, so one table serves both families:

=====================================  ==================================  =================================
GPT-2 key (``transformer.`` + ...)     GPT-NeoX key (``gpt_neox.`` + ...)  jaxattn variable
=====================================  ==================================  =================================
``wte.weight``                         ``embed_in.weight``                 ``embed.embedding``
``wpe.weight``                         (RoPE)                              ``pos_embed.embedding``
``h.i.ln_1`` (weight, bias)            ``layers.i.input_layernorm``        ``blocks.i.norm1``
``h.i.attn.c_attn`` (q part)           ``layers.i.attention.query_key_value``  ``blocks.i.attn.q``
``h.i.attn.c_attn`` (k, v parts)       (k, v rows of each head)            ``blocks.i.attn.kv`` (per head k | v)
``h.i.attn.c_proj``                    ``layers.i.attention.dense``        ``blocks.i.attn.o``
``h.i.ln_2``                           ``layers.i.post_attention_layernorm``  ``blocks.i.norm2``
``h.i.mlp.c_fc``                       ``layers.i.mlp.dense_h_to_4h``      ``blocks.i.mlp.up``
``h.i.mlp.c_proj``                     ``layers.i.mlp.dense_4h_to_h``      ``blocks.i.mlp.down``
``ln_f``                               ``final_layer_norm``                ``norm``
(tied)                                 ``embed_out.weight`` (top level)    ``head.kernel``
=====================================  ==================================  =================================

GPT-2 folders saved from ``GPT2Model`` (OpenAI's ``gpt2``: keys without ``transformer.``) load too. Options
:class:`GPT` cannot represent raise ``ValueError`` (GPT-2's ``scale_attn_by_inverse_layer_idx`` and cross
attention, GPT-NeoX without attention biases, activations other than GELU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.gpt import CLASSIC_FIELDS, FAMILY_FIELDS, GPT, GPTConfig, non_default
from jaxattn.models.gpt_hf import _kv, _scaling

__all__ = ["config_from_hf", "entries", "export_state_dict", "hf_config", "is_classic", "load_hf_state_dict",
           "prepare_state_dict", "to_hf_state_dict"]

_ARCH = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}
# Hugging Face's activation names -> GPTConfig.mlp_act (gelu_new / gelu_fast / gelu_pytorch_tanh: the tanh form)
_ACT = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# the names of each family's pieces (q_proj / k_proj / v_proj: the fused projection's parts, Linear layout)
_NAMES = {
    "gpt2": dict(embed="transformer.wte.weight", layer="transformer.h.{i}.", norm1="ln_1", norm2="ln_2",
                 attn="attn.", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj", final="transformer.ln_f",
                 head="lm_head.weight"),
    "gpt_neox": dict(embed="gpt_neox.embed_in.weight", layer="gpt_neox.layers.{i}.", norm1="input_layernorm",
                     norm2="post_attention_layernorm", attn="attention.", o="attention.dense", up="mlp.dense_h_to_4h",
                     down="mlp.dense_4h_to_h", final="gpt_neox.final_layer_norm", head="embed_out.weight"),
}
_GPT2_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (and attn.c_attn.weight, split)


def is_classic(cfg: GPTConfig) -> bool:
    """Whether ``cfg`` has the GPT-2 / GPT-NeoX block (this module's layouts, not :mod:`gpt_hf`'s)."""
    return cfg.position == "learned" or bool(non_default(cfg, CLASSIC_FIELDS))


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a GPT-2 or GPT-NeoX ``config.json`` dict; ``overrides`` set jaxattn-only
    fields (``dtype``, ``attn_impl``, ...)."""
    kind = raw.get("model_type")
    if kind not in _ARCH:
        raise ValueError(f"config.json: model_type {kind!r}: expected one of {sorted(_ARCH)}")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's GPT supports {want} only")

    act_field = "activation_function" if kind == "gpt2" else "hidden_act"
    act = raw.get(act_field, "gelu_new" if kind == "gpt2" else "gelu")
    if act not in _ACT:
        raise bad(act_field, " / ".join(sorted(_ACT)))
    common = dict(norm="layer", bias=True, mlp_gated=False, mlp_act=_ACT[act],
                  init_std=float(raw.get("initializer_range", 0.02)), vocab_size=int(raw["vocab_size"]))
    if kind == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if raw.get(flag, False):
                raise bad(flag, "false")
        if not raw.get("scale_attn_weights", True):
            raise bad("scale_attn_weights", "true")
        dim = int(raw.get("n_embd", 768))
        fields = dict(dim=dim, layers=int(raw.get("n_layer", 12)), heads=int(raw.get("n_head", 12)),
                      mlp_dim=int(raw.get("n_inner") or 4 * dim), position="learned",
                      max_positions=int(raw.get("n_positions", 1024)), norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                      tie_embeddings=bool(raw.get("tie_word_embeddings", True)))
    else:
        if not raw.get("attention_bias", True):
            raise bad("attention_bias", "true")
        dim, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        params = dict(raw.get("rope_parameters") or {})
        params.update(raw.get("rope_scaling") or {})
        theta = params.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", 10000.0)))
        pct = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", raw.get("rotary_pct", 0.25))))
        rotary = int(dim // heads * pct)  # (as transformers: int(head_size * rotary_pct))
        fields = dict(dim=dim, layers=int(raw["num_hidden_layers"]), heads=heads, mlp_dim=int(raw["intermediate_size"]),
                      rope_theta=float(theta), rope_scaling=_scaling(params, raw, bad),
                      rotary_dim=None if rotary == dim // heads else rotary,
                      parallel_residual=bool(raw.get("use_parallel_residual", True)),
                      norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
                      tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    return hf.with_overrides(GPTConfig(**common, **fields), overrides)


def _kind(cfg: GPTConfig) -> str:
    """The layout a classic-block model reads and writes: ``gpt2`` (learned positions) or ``gpt_neox``."""
    return "gpt2" if cfg.position == "learned" else "gpt_neox"


def _family(cfg: GPTConfig) -> str:
    """``gpt2`` (learned positions) or ``gpt_neox`` (RoPE) for an export, or a ValueError naming what neither
    holds (a loaded model may run other attention patterns, as ``layer_types``; its export may not)."""
    llama_only = non_default(cfg, tuple(f for f in FAMILY_FIELDS if f not in ("rotary_dim", "rope_scaling", "mlp_act")))
    plain = (cfg.norm, cfg.bias, cfg.mlp_gated) == ("layer", True, False) and cfg.mlp_act in ("gelu", "gelu_tanh")
    if not plain or llama_only or cfg.qkv_bias or (cfg.kv_heads or cfg.heads) != cfg.heads \
            or cfg.head_dim not in (None, cfg.dim // cfg.heads) or set(cfg.layer_types) != {"full"}:
        raise ValueError("a GPT-2 / GPT-NeoX layout has LayerNorms, biases everywhere, a plain GELU MLP (norm='layer', "
                         "bias=True, mlp_gated=False, mlp_act 'gelu' or 'gelu_tanh'), one kv head per head, full "
                         f"attention and no LLaMA-family options (set here: {llama_only or 'the block'})")
    if cfg.position == "learned":
        if cfg.parallel_residual or not cfg.tie_embeddings:
            raise ValueError("a GPT-2 layout (learned positions) has sequential residuals and a tied head")
        return "gpt2"
    if cfg.position != "rope":
        raise ValueError("a GPT-NeoX layout has RoPE (GPT-2: position='learned'), not ALiBi")
    return "gpt_neox"


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` for ``cfg``: ``gpt2`` (learned positions) or ``gpt_neox`` (RoPE)."""
    kind = _family(cfg)
    act = "gelu_new" if cfg.mlp_act == "gelu_tanh" else "gelu"
    out = {"architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
           "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings}
    if kind == "gpt2":
        ids = None if cfg.vocab_size <= 50256 else 50256  # (GPT2Config's bos / eos, past a small vocabulary)
        return {**out, "n_embd": cfg.dim, "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": cfg.hidden,
                "n_positions": cfg.max_positions, "n_ctx": cfg.max_positions, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True, "bos_token_id": ids,
                "eos_token_id": ids}
    pct = (cfg.rotary_dim or cfg.head_size) / cfg.head_size
    if int(cfg.head_size * pct) != (cfg.rotary_dim or cfg.head_size):
        raise ValueError(f"rotary_dim {cfg.rotary_dim} of {cfg.head_size}: no rotary_pct gives it")
    scaling = dict(cfg.rope_scaling)
    rope = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": pct, **scaling}
    return {**out, "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.hidden, "hidden_act": act, "layer_norm_eps": cfg.norm_eps,
            "use_parallel_residual": cfg.parallel_residual, "attention_bias": True,
            "rotary_pct": pct, "rotary_emb_base": cfg.rope_theta, "rope_theta": cfg.rope_theta,  # (transformers < 5)
            **({"rope_scaling": {**scaling, "rope_type": rope["rope_type"]}} if scaling else {}),
            "partial_rotary_factor": pct, "rope_parameters": rope,
            "max_position_embeddings": 2048 * int(max(1, scaling.get("factor", 1)))}


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A folder's ``state_dict`` on :func:`entries`' keys: the fused q/k/v projection split into ``q_proj`` /
    ``k_proj`` / ``v_proj`` (``Linear`` layout), GPT-2's ``Conv1D`` weights transposed, GPT-2 keys without the
    ``transformer.`` prefix (a ``GPT2Model`` save) given it. Numpy views where it can."""
    kind = raw.get("model_type")
    heads = int(raw.get("n_head", 12) if kind == "gpt2" else raw["num_attention_heads"])
    out = {}
    for key, value in state_dict.items():
        if kind == "gpt2" and key != "lm_head.weight" and not key.startswith("transformer."):
            key = "transformer." + key
        pre, _, name = key.rpartition(".")
        if kind == "gpt2" and key.endswith("attn.c_attn.weight"):  # [in, 3 dim]: q | k | v columns
            parts = np.split(np.asarray(value).T, 3, axis=0)
        elif kind == "gpt2" and key.endswith("attn.c_attn.bias"):
            parts = np.split(np.asarray(value), 3)
        elif kind == "gpt_neox" and key.endswith("attention.query_key_value." + name):  # per head q, k, v rows
            a = np.asarray(value)
            a = a.reshape(heads, 3, a.shape[0] // (3 * heads), *a.shape[1:])
            parts = [a[:, j].reshape(-1, *a.shape[3:]) for j in range(3)]
        else:
            out[key] = np.asarray(value).T if kind == "gpt2" and key.endswith(_GPT2_CONV1D) else value
            continue
        base = pre.rpartition(".")[0]  # the attention module
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            out[f"{base}.{proj}.{name}"] = part
    return out


def export_state_dict(raw: Mapping[str, Any], state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`prepare_state_dict` for a ``config.json`` of :func:`hf_config`."""
    kind = raw.get("model_type")
    heads = int(raw.get("n_head", 0) if kind == "gpt2" else raw["num_attention_heads"])
    out = {}
    for key, value in state_dict.items():
        pre, _, name = key.rpartition(".")
        if pre.endswith(("k_proj", "v_proj")):
            continue
        if not pre.endswith("q_proj"):
            out[key] = np.ascontiguousarray(value.T) if kind == "gpt2" and key.endswith(_GPT2_CONV1D) else value
            continue
        base = pre.rpartition(".")[0]
        q, k, v = (state_dict[f"{base}.{p}.{name}"] for p in ("q_proj", "k_proj", "v_proj"))
        if kind == "gpt2":
            fused = np.concatenate([q, k, v], axis=0)
            out[f"{base}.c_attn.{name}"] = np.ascontiguousarray(fused.T) if name == "weight" else fused
        else:
            per_head = [t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)]
            out[f"{base}.query_key_value.{name}"] = np.stack(per_head, axis=1).reshape(-1, *q.shape[1:])
    return out


def _layer_norm(key: str, norm) -> list[hf.Entry]:
    return [hf.same(key + ".weight", norm.weight), hf.same(key + ".bias", norm.bias)]


def _linear(key: str, lin) -> list[hf.Entry]:
    return [hf.linear(key + ".weight", lin.kernel), hf.same(key + ".bias", lin.bias)]


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    kind = _kind(cfg)
    n = _NAMES[kind]
    join_kv, split_kv = _kv(cfg.heads)
    out = [hf.same(n["embed"], model.embed.embedding)]
    if kind == "gpt2":
        out.append(hf.same("transformer.wpe.weight", model.pos_embed.embedding))
    for i, blk in enumerate(model.blocks):
        pre = n["layer"].format(i=i)
        attn = pre + n["attn"]
        out += _layer_norm(pre + n["norm1"], blk.norm1) + _layer_norm(pre + n["norm2"], blk.norm2)
        out += _linear(attn + "q_proj", blk.attn.q)
        out += [hf.Entry((attn + "k_proj." + p, attn + "v_proj." + p), getattr(blk.attn.kv, v), join_kv, split_kv)
                for p, v in (("weight", "kernel"), ("bias", "bias"))]
        out += _linear(pre + n["o"], blk.attn.o) + _linear(pre + n["up"], blk.mlp.up) + _linear(pre + n["down"], blk.mlp.down)
    out += _layer_norm(n["final"], model.norm)
    if model.head is not None:
        out.append(hf.linear(n["head"], model.head.kernel))
    return out


def _ignore(cfg: GPTConfig):
    """The causal-mask and RoPE buffers older checkpoints store, and a tied model's head."""
    head = _NAMES[_kind(cfg)]["head"]
    return lambda key: key.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                                     "rotary_emb.inv_freq")) or (key == head and cfg.tie_embeddings)


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under the family's own keys and layouts (fp32 numpy; fused as the folder's)."""
    return export_state_dict(hf_config(model.cfg), hf.to_state_dict(entries(model)))


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a GPT-2 / GPT-NeoX ``state_dict`` (the folder's keys) into ``model`` in place."""
    prepared = prepare_state_dict(hf_config(model.cfg), state_dict)
    hf.load_state_dict(entries(model), prepared, strict=strict, ignore=_ignore(model.cfg))


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict,
                            ignore=_ignore(cfg), where=where, param_dtype=param_dtype)
