"""Granite 4.0 hybrid checkpoints in the Hugging Face layout (``GraniteMoeHybridForCausalLM``, ``model_type:
granitemoehybrid``: Granite-4.0-H-Micro / -Tiny / -Small) <-> :class:`jaxattn.models.gpt.GPT` with Mamba-2 layers
(``"mamba2"``, :mod:`jaxattn.models.mamba2`) and softmax attention layers (``"full"``; without positional encoding
when ``position_embedding_type`` is ``"nope"``, as released), Granite's multipliers (embeddings, residual branches,
attention scale, logits), and in every block either Granite-MoE's experts (softmax over the top-k logits) plus an
ungated shared MLP, or (no experts) the shared MLP alone as a dense gated MLP.

=====================================================  =====================================  ========================
Hugging Face key (layer ``i``)                          jaxattn variable (``blocks.i.``)        layout
=====================================================  =====================================  ========================
``input_layernorm`` / ``post_attention_layernorm``      ``norm1`` / ``norm2``                   same
``mamba.in_proj`` (z, x, B, C, dt rows)                 ``attn.z``, ``x``, ``B``, ``C``, ``dt``   split, transposed
``mamba.conv1d.weight`` ``[x | B | C, 1, K]`` / bias    ``attn.conv`` ``[K, C | B | x]`` / ``conv_bias``  transposed, reordered
``mamba.A_log``, ``D``, ``dt_bias``, ``norm.weight``    ``attn.A_log``, ``D``, ``dt_bias``, ``norm``  same
``mamba.out_proj``                                      ``attn.out``                            transposed
``self_attn.q_proj`` / ``k_proj`` + ``v_proj`` / ``o_proj``  ``attn.q`` / ``attn.kv`` / ``attn.o``   as LLaMA's
``block_sparse_moe.router.layer``                       ``mlp.router``                          transposed
``block_sparse_moe.input_linear`` ``[E, gate | up, d]``  ``mlp.gate_up`` ``[E, d, gate | up]``    transposed
``block_sparse_moe.output_linear`` ``[E, d, I]``        ``mlp.down`` ``[E, I, d]``              transposed
``shared_mlp.input_linear`` / ``output_linear``         ``mlp.shared_gate_up`` / ``shared_down``  transposed
                                                        (no experts: ``mlp.gate_up`` / ``down``)
=====================================================  =====================================  ========================

:func:`prepare_state_dict` splits ``mamba.in_proj`` into per-part keys (``mamba.{z,x,B,C,dt}_proj``) that
:func:`entries` reads; :func:`export_state_dict` fuses them back. Hugging Face's gated RMSNorm normalizes all of a
layer's channels at once, which is the Mamba-2 layer's per-group norm with one group: ``mamba_n_groups`` must be 1
(as released).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import gpt_hf, hf
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.gpt_hf import _kv, _period

__all__ = ["config_from_hf", "entries", "export_state_dict", "hf_config", "load", "load_hf_state_dict",
           "prepare_state_dict", "to_hf_state_dict"]

_ARCH = {"granitemoehybrid": "GraniteMoeHybridForCausalLM"}
_PARTS = ("z", "x", "B", "C", "dt")  # mamba.in_proj's rows, in order
_IN_PROJ = "mamba.in_proj.weight"


def _layout(raw: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(heads, groups, d_state, head_dim)`` of a config's Mamba-2 layers."""
    return (int(raw.get("mamba_n_heads", 128)), int(raw.get("mamba_n_groups", 1)), int(raw.get("mamba_d_state", 256)),
            int(raw.get("mamba_d_head", 64)))


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a Granite 4.0 hybrid ``config.json`` dict (``overrides``: jaxattn fields)."""
    if raw.get("model_type") not in _ARCH:
        raise ValueError(f"config.json: model_type {raw.get('model_type')!r}: expected 'granitemoehybrid'")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's Granite 4.0 hybrid supports {want} only")

    layers = int(raw["num_hidden_layers"])
    kinds = raw.get("layer_types") or raw.get("layers_block_type")
    if not kinds or len(kinds) != layers or set(kinds) - {"mamba", "attention"}:
        raise bad("layer_types", f"{layers} entries of 'mamba' or 'attention'")
    h, groups, d_state, d_head = _layout(raw)
    if groups != 1:
        raise bad("mamba_n_groups", "1 (Hugging Face's gated RMSNorm spans every group)")
    if h * d_head != int(raw.get("mamba_expand", 2)) * int(raw["hidden_size"]):
        raise bad("mamba_n_heads", "mamba_n_heads * mamba_d_head = mamba_expand * hidden_size")
    for field, want in (("mamba_conv_bias", True), ("mamba_proj_bias", False), ("attention_bias", False)):
        if bool(raw.get(field, want)) != want:
            raise bad(field, str(want))
    limit = raw.get("time_step_limit", (0.0, float("inf")))
    if limit is not None and (float(limit[0]) != 0.0 or float(limit[1]) != float("inf")):
        raise bad("time_step_limit", "(0, inf) (no clamp)")
    position = raw.get("position_embedding_type", "rope")
    if position not in ("rope", "nope"):
        raise bad("position_embedding_type", "'rope' or 'nope'")
    experts = int(raw.get("num_local_experts", 0))
    shared = int(raw.get("shared_intermediate_size", 0))
    llama = {**raw, "model_type": "granite", "intermediate_size": shared if not experts else raw["intermediate_size"]}
    cfg = gpt_hf.config_from_hf(llama)
    fields: dict[str, Any] = dict(
        layer_types=_period(["mamba2" if k == "mamba" else "full" for k in kinds]),
        delta_heads=h, delta_key_heads=groups, delta_head_dim=d_state, delta_value_dim=d_head,
        delta_conv=int(raw.get("mamba_d_conv", 4)))
    if position == "nope":
        fields["rope_layers"] = (False,)
    if experts:
        fields.update(moe_experts=experts, moe_top_k=int(raw.get("num_experts_per_tok", 2)), moe_renormalize=True,
                      moe_shared_dim=shared, moe_shared_gate=False,
                      moe_aux_loss=float(raw.get("router_aux_loss_coef", 0.01)))
    return hf.with_overrides(dataclasses.replace(cfg, **fields), overrides)


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A Granite 4.0 hybrid ``config.json`` for ``cfg`` (Mamba-2 and softmax layers, Granite's multipliers)."""
    h, groups, d_state, d_head = cfg.delta_dims
    if set(cfg.layer_types) - {"mamba2", "full"} or groups != 1 or cfg.qkv_bias or cfg.kv_lora_rank \
            or (cfg.moe_experts and (not cfg.moe_shared_dim or cfg.moe_shared_gate or not cfg.moe_renormalize
                                     or cfg.moe_scoring != "softmax")):
        raise ValueError("a Granite 4.0 hybrid layout has Mamba-2 ('mamba2', one group) and softmax ('full') layers "
                         "and dense MLPs or experts (softmax over the top-k logits) with an ungated shared MLP")
    llama = dataclasses.replace(cfg, layer_types=("full",), moe_experts=0, moe_shared_dim=0, moe_shared_gate=True,
                                rope_layers=())  # (the softmax layers' part: Granite's layout)
    out = gpt_hf.hf_config(llama)
    for key in ("layer_types", "sliding_window", "max_window_layers", "use_sliding_window"):
        out.pop(key, None)
    rope = all(cfg.layer_has_rope(i) for i in range(cfg.layers))
    if not rope and any(cfg.layer_has_rope(i) for i in range(cfg.layers)):
        raise ValueError("a Granite 4.0 hybrid layout has RoPE in every softmax layer or in none")
    out.update(architectures=[_ARCH["granitemoehybrid"]], model_type="granitemoehybrid",
               layer_types=["mamba" if cfg.layer_type(i) == "mamba2" else "attention" for i in range(cfg.layers)],
               position_embedding_type="rope" if rope else "nope", mamba_n_heads=h, mamba_n_groups=groups,
               mamba_d_state=d_state, mamba_d_head=d_head, mamba_d_conv=cfg.delta_conv,
               mamba_expand=h * d_head // cfg.dim, mamba_conv_bias=True, mamba_proj_bias=False,
               attention_bias=False, num_local_experts=cfg.moe_experts,
               shared_intermediate_size=cfg.moe_shared_dim if cfg.moe_experts else cfg.mlp_dim,
               intermediate_size=cfg.mlp_dim, num_experts_per_tok=cfg.moe_top_k if cfg.moe_experts else 0,
               router_aux_loss_coef=cfg.moe_aux_loss)
    return out


def _conv(key: str, var: nnx.Variable, widths: tuple[int, int, int], taps: bool) -> hf.Entry:
    """``mamba.conv1d`` (channels x | B | C; weight ``[C, 1, K]``) <-> our channels C | B | x (taps ``[K, C]``)."""
    x, b, c = widths

    def to_ours(w):
        w = w[:, 0, :].T if taps else w
        xs, bs, cs = np.split(w, [x, x + b], axis=-1)
        return np.concatenate([cs, bs, xs], axis=-1)

    def to_hf(w):
        cs, bs, xs = np.split(w, [c, c + b], axis=-1)
        w = np.concatenate([xs, bs, cs], axis=-1)
        return (w.T[:, None, :] if taps else w,)

    return hf.Entry((key,), var, to_ours, to_hf)


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    h, groups, d_state, d_head = cfg.delta_dims
    widths = (h * d_head, groups * d_state, groups * d_state)
    out = hf.lm_entries(model)
    for i, blk in enumerate(model.blocks):
        pre, attn, mlp = f"model.layers.{i}.", blk.attn, blk.mlp
        out += [hf.same(pre + "input_layernorm.weight", blk.norm1.weight),
                hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight)]
        if attn.kind == "mamba2":
            m = pre + "mamba."
            out += [hf.linear(f"{m}{n}_proj.weight", getattr(attn, n).kernel) for n in _PARTS]
            out += [_conv(m + "conv1d.weight", attn.conv, widths, True), _conv(m + "conv1d.bias", attn.conv_bias,
                                                                             widths, False),
                    hf.same(m + "A_log", attn.A_log), hf.same(m + "D", attn.D), hf.same(m + "dt_bias", attn.dt_bias),
                    hf.same(m + "norm.weight", attn.norm), hf.linear(m + "out_proj.weight", attn.out.kernel)]
        else:
            a = pre + "self_attn."
            out += [hf.linear(a + "q_proj.weight", attn.q.kernel),
                    hf.Entry((a + "k_proj.weight", a + "v_proj.weight"), attn.kv.kernel, *_kv(cfg.kv_heads or cfg.heads)),
                    hf.linear(a + "o_proj.weight", attn.o.kernel)]
        s = pre + "shared_mlp."
        if not cfg.moe_experts:
            out += [hf.linear(s + "input_linear.weight", mlp.gate_up.kernel),
                    hf.linear(s + "output_linear.weight", mlp.down.kernel)]
            continue
        e = pre + "block_sparse_moe."
        swap = lambda w: (np.swapaxes(w, 1, 2),)  # noqa: E731
        out += [hf.linear(e + "router.layer.weight", mlp.router.kernel),
                hf.Entry((e + "input_linear.weight",), mlp.gate_up, lambda w: np.swapaxes(w, 1, 2), swap),
                hf.Entry((e + "output_linear.weight",), mlp.down, lambda w: np.swapaxes(w, 1, 2), swap),
                hf.linear(s + "input_linear.weight", mlp.shared_gate_up.kernel),
                hf.linear(s + "output_linear.weight", mlp.shared_down.kernel)]
    return out


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``mamba.in_proj`` (rows z, x, B, C, dt) split into ``mamba.{z,x,B,C,dt}_proj`` for :func:`entries`."""
    h, groups, d_state, d_head = _layout(raw)
    cuts = np.cumsum([h * d_head, h * d_head, groups * d_state, groups * d_state])
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_IN_PROJ):
            pre = key[: -len(_IN_PROJ)] + "mamba."
            for name, part in zip(_PARTS, np.split(np.asarray(value), cuts)):
                out[f"{pre}{name}_proj.weight"] = part
        else:
            out[key] = value
    return out


def export_state_dict(raw: Mapping[str, Any], state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`prepare_state_dict`."""
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith("mamba.z_proj.weight"):
            pre = key[: -len("z_proj.weight")]
            out[pre + "in_proj.weight"] = np.concatenate([out.pop(f"{pre}{n}_proj.weight") for n in _PARTS])
    return out


def _ignore(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face's keys (fp32 numpy; ``mamba.in_proj`` fused)."""
    return export_state_dict({}, hf.to_state_dict(entries(model)))


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` into ``model`` in place."""
    h, groups, d_state, d_head = model.cfg.delta_dims
    raw = dict(mamba_n_heads=h, mamba_n_groups=groups, mamba_d_state=d_state, mamba_d_head=d_head)
    hf.load_state_dict(entries(model), prepare_state_dict(raw, state_dict), strict=strict, ignore=_ignore)


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict, ignore=_ignore,
                            where=where, param_dtype=param_dtype)
