"""Mixture-of-experts checkpoints in the Hugging Face layout (``GptOssForCausalLM``, ``MixtralForCausalLM``,
``Qwen3MoeForCausalLM``, ``Qwen2MoeForCausalLM``) <-> :class:`jaxattn.models.gpt.GPT` with ``moe_experts``; the rest of their blocks
is :mod:`jaxattn.models.gpt_hf`'s (which calls this module).

====================================================  ===================================  =====================
Hugging Face key (layer ``i``, expert ``j``)           jaxattn variable (``blocks.i.mlp``)  layout
====================================================  ===================================  =====================
gpt-oss ``mlp.router.weight`` / ``.bias``              ``router.kernel`` / ``.bias``        transposed / same
gpt-oss ``mlp.experts.gate_up_proj`` (+ ``_bias``)     ``gate_up`` (+ ``gate_up_bias``)      gate, up interleaved
                                                                                            -> gate | up halves
gpt-oss ``mlp.experts.down_proj`` (+ ``_bias``)        ``down`` (+ ``down_bias``)            same
gpt-oss ``self_attn.sinks``                            ``blocks.i.attn.sinks``               same
Mixtral ``block_sparse_moe.gate.weight``               ``router.kernel``                     transposed
Mixtral ``block_sparse_moe.experts.j.w1`` / ``w3``     ``gate_up[j]`` (gate | up)            transposed
Mixtral ``block_sparse_moe.experts.j.w2``              ``down[j]``                           transposed
Qwen3-MoE ``mlp.gate.weight``                          ``router.kernel``                     transposed
Qwen3-MoE ``mlp.experts.j.gate_proj`` / ``up_proj``    ``gate_up[j]`` (gate | up)            transposed
Qwen3-MoE ``mlp.experts.j.down_proj``                  ``down[j]``                           transposed
Qwen2-MoE: Qwen3-MoE's, and ``mlp.shared_expert.*``    ``shared_gate_up`` (gate | up),        transposed
``gate_proj`` / ``up_proj`` / ``down_proj``,            ``shared_down``, ``shared_gate``
``mlp.shared_expert_gate``
====================================================  ===================================  =====================

gpt-oss's released folders keep the experts' weights in MXFP4 (``*_blocks``: two e2m1 values per byte, low
nibble first, 32 per block; ``*_scales``: one E8M0 exponent per block, biased by 127). :func:`prepare_state_dict`
presents them as the dequantized ``[experts, in, out]`` arrays of the bf16 layout, one tensor at a time as the
loader reads it (with ``param_dtype="bfloat16"`` a 20B model loads in bf16 without an fp32 copy of the whole).
A model with ``moe_format="mxfp4"`` takes them as they are instead (:func:`hf_to_packed`: the same bytes,
rearranged, nothing rounded) and saves them back in gpt-oss's layout; from a float checkpoint (Mixtral,
Qwen-MoE, a bf16 gpt-oss) it quantizes each expert tensor as it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxattn.models import hf
from jaxattn.ops.mxfp4 import FP4_VALUES, MXFP4, dequantize, quantize_mxfp4

__all__ = ["FP4_VALUES", "dequantize_mxfp4", "MXFP4StateDict", "moe_fields", "expert_entries", "hf_moe_config",
           "hf_to_packed", "packed_to_hf"]

MOE_FAMILIES = ("gpt_oss", "mixtral", "qwen3_moe", "qwen2_moe")


def dequantize_mxfp4(blocks: Any, scales: Any) -> np.ndarray:
    """MXFP4 ``blocks [..., G, 16]`` uint8 and ``scales [..., G]`` uint8 -> fp32 ``[..., G * 32]``: byte ``b``
    holds values ``FP4[b & 15]`` then ``FP4[b >> 4]``, each block of 32 times ``2 ** (scale - 127)``."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.shape[-1] != 16 \
            or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks must be uint8 [..., G, 16] and scales uint8 [..., G], got blocks "
                         f"{blocks.dtype} {blocks.shape}, scales {scales.dtype} {scales.shape}")
    values = np.stack([FP4_VALUES[blocks & 15], FP4_VALUES[blocks >> 4]], axis=-1)  # [..., G, 16, 2]
    values = np.ldexp(values.reshape(*blocks.shape[:-1], 32), scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1)


def hf_to_packed(blocks: Any, scales: Any) -> np.ndarray:
    """gpt-oss's MXFP4 ``blocks [E, N, G, 16]`` and ``scales [E, N, G]`` of matrices ``[E, N, 32 G]`` (``[out,
    in]``) -> the packed ``[E, 17 G, N]`` of their transposes ``[E, 32 G, N]`` (:mod:`jaxattn.ops.mxfp4`)."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.ndim < 2 or blocks.shape[-1] != 16 \
            or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks must be uint8 [..., G, 16] and scales uint8 [..., G], got blocks "
                         f"{blocks.dtype} {blocks.shape}, scales {scales.dtype} {scales.shape}")
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # [.., N, G, 32]
    ours = codes[..., :16] | (codes[..., 16:] << 4)  # [..., N, G, 16]: rows i and 16 + i of each group
    n, g = blocks.shape[-3], blocks.shape[-2]
    ours = np.moveaxis(ours, -3, -1).reshape(*blocks.shape[:-3], g * 16, n)
    return np.concatenate([ours, np.moveaxis(scales, -2, -1)], axis=-2)


def packed_to_hf(packed: Any) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`hf_to_packed`: ``(blocks [E, N, G, 16], scales [E, N, G])``."""
    packed = np.asarray(packed).astype(np.uint8)
    *lead, rows, n = packed.shape
    g = MXFP4(packed).shape[-2] // 32
    ours = np.moveaxis(packed[..., : 16 * g, :].reshape(*lead, g, 16, n), -1, -3)  # [..., N, G, 16]
    codes = np.concatenate([ours & 15, ours >> 4], axis=-1)  # [..., N, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.astype(np.uint8), np.moveaxis(packed[..., 16 * g:, :], -1, -2).copy()


class MXFP4StateDict(Mapping):
    """A ``state_dict`` whose MXFP4 pairs ``name_blocks`` / ``name_scales`` (gpt-oss's ``[experts, out, G, 16]``)
    read as ``name``: the dequantized ``[experts, in, out]`` fp32 array, computed when it is read."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self._sd = self.raw = state_dict  # (raw: the packed pairs as they are)
        self._packed = {k[: -len("_blocks")] for k in state_dict
                        if k.endswith("_blocks") and k[: -len("_blocks")] + "_scales" in state_dict}
        hidden = {f"{n}{s}" for n in self._packed for s in ("_blocks", "_scales")}
        self._keys = [k for k in state_dict if k not in hidden] + sorted(self._packed)

    def __getitem__(self, key: str) -> Any:
        if key in self._packed:
            return np.swapaxes(dequantize_mxfp4(self._sd[key + "_blocks"], self._sd[key + "_scales"]), -1, -2)
        if key not in self._keys:
            raise KeyError(key)
        return self._sd[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """gpt-oss: its MXFP4 expert weights as :class:`MXFP4StateDict` presents them; other layouts as they are."""
    if raw.get("model_type") == "gpt_oss" and any(k.endswith("_blocks") for k in state_dict):
        return MXFP4StateDict(state_dict)
    return state_dict


def moe_fields(kind: str, raw: Mapping[str, Any], bad) -> dict[str, Any]:
    """The :class:`GPTConfig` fields of a mixture-of-experts ``config.json`` (``bad(field, want)`` builds
    the ``ValueError`` of a value jaxattn cannot represent)."""
    experts = raw.get("num_local_experts", raw.get("num_experts"))
    top_k = raw.get("num_experts_per_tok", raw.get("experts_per_token"))
    if not experts or not top_k:
        raise bad("num_local_experts", "a mixture of experts with num_local_experts and num_experts_per_tok")
    fields = dict(moe_experts=int(experts), moe_top_k=int(top_k),
                  moe_aux_loss=float(raw.get("router_aux_loss_coef", 0.001)))
    if kind == "gpt_oss":
        if not raw.get("attention_bias", True):
            raise bad("attention_bias", "true (gpt-oss's biased projections)")
        if abs(float(raw.get("swiglu_alpha", 1.702)) - 1.702) > 1e-9:
            raise bad("swiglu_alpha", "1.702")
        fields.update(bias=True, mlp_act="gpt_oss", mlp_limit=float(raw.get("swiglu_limit", 7.0)), attn_sinks=True)
    elif kind in ("qwen3_moe", "qwen2_moe"):
        if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step", 1)) != 1:
            raise bad("mlp_only_layers", "[] with decoder_sparse_step 1 (experts in every layer)")
        fields.update(moe_renormalize=bool(raw.get("norm_topk_prob", False)),
                      mlp_dim=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]))
    if kind == "qwen2_moe":
        shared = int(raw.get("shared_expert_intermediate_size") or 0)
        if shared <= 0:
            raise bad("shared_expert_intermediate_size", "a positive width (Qwen2-MoE's shared expert)")
        fields["moe_shared_dim"] = shared
    return fields


def hf_moe_config(kind: str, cfg) -> dict[str, Any]:
    """The mixture-of-experts fields of ``cfg``'s ``config.json`` (``kind``: its model_type)."""
    out = {"num_local_experts": cfg.moe_experts, "num_experts_per_tok": cfg.moe_top_k,
           "router_aux_loss_coef": cfg.moe_aux_loss}
    if kind == "gpt_oss":
        out.update(attention_bias=True, swiglu_limit=cfg.mlp_limit, swiglu_alpha=1.702)
        if cfg.moe_format == "mxfp4":  # (as gpt-oss's release: its experts' *_blocks / *_scales)
            out["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    if kind in ("qwen3_moe", "qwen2_moe"):
        out.update(num_experts=cfg.moe_experts, norm_topk_prob=cfg.moe_renormalize, moe_intermediate_size=cfg.hidden,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if kind == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.moe_shared_dim, use_sliding_window=False)
    return out


def _interleaved() -> tuple:
    """gpt-oss's gate / up columns interleaved (gate at even ones) <-> our gate | up halves."""
    def join(a):
        return np.concatenate([a[..., ::2], a[..., 1::2]], axis=-1)

    def split(a):
        g, u = np.split(a, 2, axis=-1)
        return (np.stack([g, u], axis=-1).reshape(a.shape),)

    return join, split


def _stacked(experts: int, gated: bool) -> tuple:
    """Per-expert ``nn.Linear`` weights ``[out, in]`` (gated: each expert's gate then up) <-> ``[E, in, out]``
    (gate | up halves)."""
    def join(*ws):
        if not gated:
            return np.stack([w.T for w in ws])
        return np.concatenate([np.stack([w.T for w in ws[:experts]]), np.stack([w.T for w in ws[experts:]])], -1)

    def split(a):
        if not gated:
            return tuple(a[j].T for j in range(experts))
        g, u = np.split(a, 2, axis=-1)
        return (*(g[j].T for j in range(experts)), *(u[j].T for j in range(experts)))

    return join, split


def _quantizing(e: hf.Entry) -> hf.Entry:
    """``e`` for an MXFP4 variable: the float arrays it joins quantized, and dequantized to split."""
    return hf.Entry(e.keys, e.var, lambda *a: np.asarray(quantize_mxfp4(e.join(*a)).packed),
                    lambda packed: e.split(np.asarray(dequantize(MXFP4(np.asarray(packed, np.uint8))))))


def _packed_entry(key: str, var, columns: tuple | None = None) -> hf.Entry:
    """gpt-oss's ``key_blocks`` / ``key_scales`` <-> an MXFP4 variable (``columns``: a join / split of the
    output columns)."""
    cj, cs = columns or (lambda a: a, lambda a: (a,))
    return hf.Entry((key + "_blocks", key + "_scales"), var, lambda b, s: cj(hf_to_packed(b, s)),
                    lambda packed: packed_to_hf(cs(np.asarray(packed))[0]))


def expert_entries(kind: str, pre: str, mlp, experts: int, packed_keys: bool = False) -> list[hf.Entry]:
    """The entries of layer prefix ``pre`` (``model.layers.i.``)'s :class:`jaxattn.models.moe.MoE` ``mlp``;
    with MXFP4 experts, gpt-oss's packed ``*_blocks`` / ``*_scales`` keys if ``packed_keys``, else the
    float keys (quantized when read)."""
    out = _expert_entries(kind, pre, mlp, experts)
    if mlp.expert_format != "mxfp4":
        return out
    experts_vars = {id(mlp.gate_up), id(mlp.down)}
    if kind == "gpt_oss" and packed_keys:
        p = pre + "mlp.experts."
        packed = {id(mlp.gate_up): _packed_entry(p + "gate_up_proj", mlp.gate_up, _interleaved()),
                  id(mlp.down): _packed_entry(p + "down_proj", mlp.down)}
        return [packed.get(id(e.var), e) for e in out]
    return [_quantizing(e) if id(e.var) in experts_vars else e for e in out]


def _expert_entries(kind: str, pre: str, mlp, experts: int) -> list[hf.Entry]:
    if kind == "gpt_oss":
        join, split = _interleaved()
        p = pre + "mlp.experts."
        return [hf.linear(pre + "mlp.router.weight", mlp.router.kernel),
                hf.same(pre + "mlp.router.bias", mlp.router.bias),
                hf.Entry((p + "gate_up_proj",), mlp.gate_up, join, split),
                hf.Entry((p + "gate_up_proj_bias",), mlp.gate_up_bias, join, split),
                hf.same(p + "down_proj", mlp.down), hf.same(p + "down_proj_bias", mlp.down_bias)]
    if kind == "mixtral":
        p, (gate, up, down), router = pre + "block_sparse_moe.", ("w1", "w3", "w2"), "gate"
    else:  # qwen3_moe
        p, (gate, up, down), router = pre + "mlp.", ("gate_proj", "up_proj", "down_proj"), "gate"
    key = lambda j, name: f"{p}experts.{j}.{name}.weight"  # noqa: E731
    out = [hf.linear(f"{p}{router}.weight", mlp.router.kernel),
           hf.Entry(tuple(key(j, n) for n in (gate, up) for j in range(experts)), mlp.gate_up,
                    *_stacked(experts, True)),
           hf.Entry(tuple(key(j, down) for j in range(experts)), mlp.down, *_stacked(experts, False))]
    if kind == "qwen2_moe":  # the shared expert (a LLaMA MLP) and its sigmoid gate
        s = p + "shared_expert."
        out += [hf.Entry((s + "gate_proj.weight", s + "up_proj.weight"), mlp.shared_gate_up.kernel,
                         lambda g, u: np.concatenate([g.T, u.T], axis=1), lambda a: tuple(np.split(a.T, 2, axis=0))),
                hf.linear(s + "down_proj.weight", mlp.shared_down.kernel),
                hf.linear(p + "shared_expert_gate.weight", mlp.shared_gate.kernel)]
    return out
