"""LLaMA-family checkpoints in the Hugging Face layout (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MistralForCausalLM``) <-> :class:`GPT`, whose blocks are the same architecture:
pre-RMSNorm, RoPE (rotated halves; Llama 3.1's ``llama3``, ``linear`` and YaRN ``rope_scaling`` too), GQA,
SwiGLU, no biases except Qwen2's q/k/v, Qwen3's per-head q/k RMSNorm, a ``head_dim`` apart from
``hidden_size / heads`` (Qwen3, Mistral-Nemo). Mistral's ``sliding_window`` becomes
``layer_types=("window",)`` with that window (token-exact, as Mistral's mask); pass
``layer_types=("full",)`` to run full attention where every context fits the window.

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
``model.layers.i.mlp.gate_proj`` + ``up_proj``      ``blocks.i.mlp.gate_up`` (gate | up)      transposed, concatenated
``model.layers.i.mlp.down_proj``                    ``blocks.i.mlp.down``                     transposed
``model.norm.weight``                               ``norm.weight``                           same
``lm_head.weight``                                  ``head.kernel`` (untied configs only)     transposed
==================================================  ========================================  ==========

What :class:`GPT` cannot represent raises ``ValueError`` (``dynamic`` / ``longrope`` RoPE scaling, partial
rotary, an activation other than SiLU, MLP or output biases, Qwen2/Qwen3 sliding windows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.gpt import GPT, GPTConfig

__all__ = ["config_from_hf", "entries", "hf_config", "load_hf_state_dict", "to_hf_state_dict"]

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "mistral": "MistralForCausalLM"}


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a LLaMA / Qwen2 / Qwen3 / Mistral ``config.json`` dict; ``overrides`` set
    jaxattn-only fields (``dtype``, ``attn_impl``, ``layer_types``, ``window``, ``quantized``, ...)."""
    kind = raw.get("model_type")
    if kind not in _ARCH:
        raise ValueError(f"config.json: model_type {kind!r}: expected one of {sorted(_ARCH)}")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's GPT supports {want} only")

    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", '"silu"')
    # RoPE: transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older configs rope_theta
    # and rope_scaling at the top level
    rope = dict(raw.get("rope_parameters") or {})
    rope.update({k: v for k, v in (raw.get("rope_scaling") or {}).items()})  # (transformers < 5)
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind_of_rope = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind_of_rope not in ("default", "linear", "llama3", "yarn"):
        raise bad("rope_scaling" if raw.get("rope_scaling") else "rope_parameters",
                  'rope_type "default", "linear", "llama3" or "yarn"')
    if kind_of_rope in ("llama3", "yarn"):  # HF's fallbacks for these two
        scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
        if scaling.get("factor") is None and kind_of_rope == "yarn":
            scaling["factor"] = raw["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    scaling = {"rope_type": kind_of_rope, **scaling} if kind_of_rope != "default" else {}
    if float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
        raise bad("partial_rotary_factor", "1.0")
    if raw.get("mlp_bias", False):
        raise bad("mlp_bias", "false")
    if kind != "qwen2" and raw.get("attention_bias", False):  # (LLaMA's and Qwen3's also put one on o_proj)
        raise bad("attention_bias", "false (Qwen2's q/k/v biases are supported)")
    window = raw.get("sliding_window") if kind == "mistral" else None
    if kind in ("qwen2", "qwen3") and (raw.get("use_sliding_window", False)
                                       or set(raw.get("layer_types") or ()) - {"full_attention"}):
        raise bad("use_sliding_window", "false (every layer full_attention)")
    dim, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or dim // heads)
    fields = dict(
        vocab_size=int(raw["vocab_size"]), dim=dim, layers=int(raw["num_hidden_layers"]), heads=heads,
        kv_heads=int(raw.get("num_key_value_heads") or heads), mlp_dim=int(raw["intermediate_size"]),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))), rope_scaling=scaling,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
        head_dim=None if head_dim * heads == dim else head_dim,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", 0.02)))
    if window is not None:  # Mistral: every layer sees its last `sliding_window` keys (itself included)
        fields.update(layer_types=("window",), window=int(window))
    return hf.with_overrides(GPTConfig(**fields), overrides)


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` for ``cfg`` (``qwen3`` when it has q/k norms, ``qwen2`` when it has q/k/v biases,
    else ``llama``)."""
    if cfg.position != "rope":
        raise ValueError("only RoPE GPT models have a LLaMA / Qwen2 layout (this one has ALiBi)")
    if cfg.qk_norm and cfg.qkv_bias:
        raise ValueError("no Hugging Face layout has q/k norms and q/k/v biases alone (Qwen3's attention_bias "
                         "biases o_proj too)")
    kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    scaling = dict(cfg.rope_scaling)
    rope = {"rope_type": scaling.pop("rope_type", "default"), "rope_theta": cfg.rope_theta, **scaling}
    old_style = {"rope_scaling": {**scaling, "rope_type": rope["rope_type"]}} if scaling else {}
    return {"architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads or cfg.heads, "intermediate_size": cfg.hidden,
            "head_dim": cfg.head_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, **old_style,  # (transformers < 5)
            "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
            "max_position_embeddings": 4096 * int(max(1, scaling.get("factor", 1)))}


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


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    join_kv, split_kv = _kv(cfg.kv_heads or cfg.heads)
    out = [hf.same("model.embed_tokens.weight", model.embed.embedding)]
    for i, blk in enumerate(model.blocks):
        pre, attn = f"model.layers.{i}.", blk.attn
        out += [hf.same(pre + "input_layernorm.weight", blk.norm1.weight),
                hf.linear(pre + "self_attn.q_proj.weight", attn.q.kernel),
                hf.Entry((pre + "self_attn.k_proj.weight", pre + "self_attn.v_proj.weight"), attn.kv.kernel,
                         join_kv, split_kv),
                hf.linear(pre + "self_attn.o_proj.weight", attn.o.kernel),
                hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight),
                hf.Entry((pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"), blk.mlp.gate_up.kernel,
                         lambda g, u: np.concatenate([g.T, u.T], axis=1), lambda a: tuple(np.split(a.T, 2, axis=0))),
                hf.linear(pre + "mlp.down_proj.weight", blk.mlp.down.kernel)]
        if cfg.qk_norm:
            out += [hf.same(pre + "self_attn.q_norm.weight", attn.q_norm.weight),
                    hf.same(pre + "self_attn.k_norm.weight", attn.k_norm.weight)]
        if cfg.qkv_bias:
            out += [hf.same(pre + "self_attn.q_proj.bias", attn.q.bias),
                    hf.Entry((pre + "self_attn.k_proj.bias", pre + "self_attn.v_proj.bias"), attn.kv.bias,
                             join_kv, split_kv)]
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


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` into ``model`` in place."""
    hf.load_state_dict(entries(model), state_dict, strict=strict, ignore=_ignore(model.cfg))


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict,
                            ignore=_ignore(cfg), where=where, param_dtype=param_dtype)
