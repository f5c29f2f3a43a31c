"""DeepSeek-V2 / V3 checkpoints in the Hugging Face layout (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``:
DeepSeek-V2(-Lite), V2.5, V3, R1, and the ``deepseek_v3`` folders of Kimi K2 and Moonlight) <->
:class:`jaxattn.models.gpt.GPT` with multi-head latent attention (:mod:`jaxattn.models.mla`) and DeepSeek's
mixture of experts (:mod:`jaxattn.models.moe`).

================================================  ==========================================  ============
Hugging Face key (layer ``i``, expert ``j``)       jaxattn variable (``blocks.i.``)            layout
================================================  ==========================================  ============
``self_attn.q_proj`` | ``q_a_proj``, ``q_b_proj``  ``attn.q`` | ``attn.q_a``, ``attn.q_b``      transposed
``self_attn.q_a_layernorm``                        ``attn.q_norm``                             same
``self_attn.kv_a_proj_with_mqa``                   ``attn.kv_a`` (``[c | k_pe]``)              transposed
``self_attn.kv_a_layernorm``, ``kv_b_proj``        ``attn.kv_norm``, ``attn.kv_b``              same, transposed
``self_attn.o_proj``                               ``attn.o``                                  transposed
``mlp.gate_proj`` / ``up_proj`` / ``down_proj``    ``mlp.gate_up`` / ``mlp.down`` (dense layers)  transposed
``mlp.gate.weight``                                ``mlp.router.kernel``                       transposed
``mlp.gate.e_score_correction_bias`` (V3)          ``mlp.score_bias``                          same
``mlp.experts.j.gate_proj`` / ``up_proj`` / ...    ``mlp.gate_up[j]`` / ``mlp.down[j]``        transposed
``mlp.shared_experts.*``                           ``mlp.shared_gate_up``, ``mlp.shared_down``  transposed
================================================  ==========================================  ============

DeepSeek's RoPE dims come in interleaved pairs ``(x0, x1), (x2, x3), ...`` (V2's complex rotation, V3's
``rope_interleave``); jaxattn rotates halves, so :func:`prepare_state_dict` reorders the RoPE rows of the
query and ``kv_a`` projections to evens-then-odds as they are read (the same rotation, the dot products
unchanged) and :func:`export_state_dict` puts them back. The softmax scale is ``(head_dim + qk_rope_dim) **
-0.5``, times YaRN's ``mscale(factor, mscale_all_dim) ** 2`` when the RoPE scaling gives one.

DeepSeek-V3's (and Kimi K2's) released weights are FP8 with one scale per 128 x 128 block
(``*.weight_scale_inv``): :class:`FP8BlockStateDict` dequantizes each tensor as the loader reads it (with
``param_dtype="bfloat16"`` nothing is held in fp32 but the tensor at hand); the layers past
``num_hidden_layers`` (V3's multi-token-prediction module) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf, moe_hf
from jaxattn.models.gpt import GPT, GPTConfig, yarn_mscale
from jaxattn.models.gpt_hf import _scaling, rope_parameters

__all__ = ["config_from_hf", "entries", "hf_config", "prepare_state_dict", "export_state_dict", "load",
           "load_hf_state_dict", "to_hf_state_dict", "FP8BlockStateDict"]

_ARCH = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a DeepSeek-V2 / V3 ``config.json`` dict (``overrides``: jaxattn fields)."""
    kind = raw.get("model_type")
    if kind not in _ARCH:
        raise ValueError(f"config.json: model_type {kind!r}: expected one of {sorted(_ARCH)}")

    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's DeepSeek supports {want} only")

    for field, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False), ("moe_layer_freq", 1)):
        if raw.get(field, want) != want:
            raise bad(field, repr(want))
    v3 = kind == "deepseek_v3"
    method = raw.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if method not in (("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")):
        raise bad("topk_method", '"noaux_tc"' if v3 else '"greedy" or "group_limited_greedy"')
    scoring = raw.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    if scoring != ("sigmoid" if v3 else "softmax"):
        raise bad("scoring_func", '"sigmoid"' if v3 else '"softmax"')
    glob = {**(raw.get("rope_parameters") or {}), **(raw.get("rope_scaling") or {})}
    theta = float(glob.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = _scaling(glob, raw, bad)
    nope, rope_dim = int(raw.get("qk_nope_head_dim", 128)), int(raw.get("qk_rope_head_dim", 64))
    scale = (nope + rope_dim) ** -0.5
    if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    experts = raw.get("n_routed_experts", raw.get("num_local_experts", raw.get("num_experts")))
    moe_dim = int(raw.get("moe_intermediate_size") or raw["intermediate_size"])
    grouped = method in ("group_limited_greedy", "noaux_tc")
    heads = int(raw["num_attention_heads"])
    fields = dict(
        vocab_size=int(raw["vocab_size"]), dim=int(raw["hidden_size"]), layers=int(raw["num_hidden_layers"]),
        heads=heads, mlp_dim=int(raw["intermediate_size"]), rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", 0.02)), attn_scale=scale,
        head_dim=nope, qk_rope_dim=rope_dim, v_head_dim=int(raw.get("v_head_dim", nope)),
        kv_lora_rank=int(raw.get("kv_lora_rank", 512)), q_lora_rank=int(raw.get("q_lora_rank") or 0))
    if experts:
        n_shared = int(raw.get("n_shared_experts") or 0)
        fields.update(
            moe_experts=int(experts), moe_top_k=int(raw["num_experts_per_tok"]), moe_dim=moe_dim,
            moe_dense_layers=int(raw.get("first_k_dense_replace", 0)), moe_scoring=scoring,
            moe_groups=int(raw.get("n_group") or 1) if grouped else 1,
            moe_topk_groups=int(raw.get("topk_group") or 1) if grouped else 1, moe_score_bias=v3,
            moe_routed_scale=float(raw.get("routed_scaling_factor", 1.0)),
            moe_renormalize=bool(raw.get("norm_topk_prob", False)), moe_shared_dim=n_shared * moe_dim,
            moe_shared_gate=False, moe_aux_loss=float(raw.get("aux_loss_alpha", 0.001)))
    return hf.with_overrides(GPTConfig(**fields), overrides)


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` for ``cfg``: ``deepseek_v3`` for sigmoid routing, else ``deepseek_v2``."""
    if not cfg.kv_lora_rank:
        raise ValueError("a DeepSeek layout has multi-head latent attention (kv_lora_rank > 0)")
    v3 = cfg.moe_scoring == "sigmoid"
    if cfg.moe_experts and (v3 != cfg.moe_score_bias or cfg.moe_shared_gate and cfg.moe_shared_dim
                            or cfg.moe_shared_dim % cfg.expert_hidden or cfg.mlp_has_bias or cfg.mlp_act != "silu"
                            or not v3 and cfg.moe_groups > 1 and cfg.moe_renormalize):
        raise ValueError("a DeepSeek layout has SiLU experts without biases, ungated shared experts as wide as a "
                         "multiple of an expert, and either sigmoid routing with a selection bias (V3) or softmax "
                         "routing without one (V2)")
    scaling, rope = rope_parameters(cfg)
    kind = "deepseek_v3" if v3 else "deepseek_v2"
    out = {"architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
           "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
           "num_key_value_heads": cfg.heads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
           "initializer_range": cfg.init_std, "attention_bias": False, "mlp_bias": False,
           "max_position_embeddings": 4096 * int(max(1, scaling.get("factor", 1))),
           "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank or None, "qk_nope_head_dim": cfg.head_size,
           "qk_rope_head_dim": cfg.qk_rope_dim, "v_head_dim": cfg.v_size, "head_dim": cfg.qk_rope_dim,
           "rope_interleave": True}
    if scaling:
        out["rope_scaling"] = {**scaling, "rope_type": rope["rope_type"]}
    if cfg.moe_experts:
        shared = cfg.moe_shared_dim // cfg.expert_hidden
        out.update(n_routed_experts=cfg.moe_experts, num_local_experts=cfg.moe_experts,
                   num_experts_per_tok=cfg.moe_top_k, moe_intermediate_size=cfg.expert_hidden,
                   first_k_dense_replace=cfg.moe_dense_layers, n_shared_experts=shared,
                   routed_scaling_factor=cfg.moe_routed_scale, norm_topk_prob=cfg.moe_renormalize,
                   n_group=cfg.moe_groups, topk_group=cfg.moe_topk_groups, moe_layer_freq=1,
                   aux_loss_alpha=cfg.moe_aux_loss, scoring_func=cfg.moe_scoring,
                   topk_method="noaux_tc" if v3 else ("group_limited_greedy" if cfg.moe_groups > 1 else "greedy"))
    else:  # (every layer dense)
        out.update(first_k_dense_replace=cfg.layers, n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0,
                   moe_intermediate_size=cfg.hidden)
    return out


# -- the RoPE rows: interleaved pairs in the checkpoints, halves here ------------------------------------------

def _rope_rows(raw: Mapping[str, Any], key: str) -> tuple[int, int] | None:
    """``(period, rope_dim)`` of a projection whose output rows hold RoPE dims: each ``period`` rows end in
    ``rope_dim`` RoPE rows (the queries: per head; ``kv_a``: once), or None."""
    nope, rope_dim = int(raw.get("qk_nope_head_dim", 128)), int(raw.get("qk_rope_head_dim", 64))
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        return nope + rope_dim, rope_dim
    if key.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return int(raw.get("kv_lora_rank", 512)) + rope_dim, rope_dim
    return None


def _permute(w: np.ndarray, period: int, rope_dim: int, inverse: bool) -> np.ndarray:
    """Rows of ``w [out, in]``: in each block of ``period``, the last ``rope_dim`` reordered from pairs to halves
    (``inverse``: back)."""
    order = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
    if inverse:
        order = np.argsort(order)
    blocks = np.asarray(w).reshape(-1, period, *np.shape(w)[1:])
    return np.concatenate([blocks[:, : period - rope_dim], blocks[:, period - rope_dim:][:, order]], axis=1).reshape(np.shape(w))


class _Reordered(Mapping):
    """A ``state_dict`` whose query / ``kv_a`` weights read with their RoPE rows as halves."""

    def __init__(self, raw: Mapping[str, Any], state_dict: Mapping[str, Any]):
        self._raw, self._sd = raw, state_dict

    def __getitem__(self, key: str) -> Any:
        value = self._sd[key]
        rows = _rope_rows(self._raw, key)
        return value if rows is None else _permute(value, *rows, inverse=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


class FP8BlockStateDict(Mapping):
    """A ``state_dict`` whose FP8 weights (DeepSeek-V3's and Kimi K2's release: ``name.weight`` e4m3 with
    ``name.weight_scale_inv`` ``[ceil(out / 128), ceil(in / 128)]``, one scale per 128 x 128 block) read as
    fp32 ``weight * scale`` when they are read."""

    def __init__(self, state_dict: Mapping[str, Any], block: tuple[int, int] = (128, 128)):
        self._sd, self._block = state_dict, tuple(block)
        self._keys = [k for k in state_dict if not k.endswith(".weight_scale_inv")]

    def __getitem__(self, key: str) -> Any:
        value = self._sd[key]
        scale_key = key + "_scale_inv"
        if key not in self._keys or scale_key not in self._sd:
            if key not in self._keys:
                raise KeyError(key)
            return value
        w, s = np.asarray(value).astype(np.float32), np.asarray(self._sd[scale_key]).astype(np.float32)
        (bo, bi), (o, i) = self._block, w.shape
        if s.shape != (-(-o // bo), -(-i // bi)):
            raise ValueError(f"{scale_key}: shape {s.shape}, expected one scale per {bo} x {bi} block of {key} {w.shape}")
        return w * np.repeat(np.repeat(s, bo, axis=0)[:o], bi, axis=1)[:, :i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def prepare_state_dict(raw: Mapping[str, Any], state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint with its RoPE rows in jaxattn's order (module docstring; V3's ``rope_interleave=False``
    folders already are) and FP8 block-quantized weights (``quantization_config.quant_method == "fp8"``)
    dequantized as they are read."""
    quant = raw.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8" or any(k.endswith(".weight_scale_inv") for k in state_dict):
        state_dict = FP8BlockStateDict(state_dict, tuple(quant.get("weight_block_size") or (128, 128)))
    if raw.get("model_type") == "deepseek_v3" and not raw.get("rope_interleave", True):
        return state_dict
    return _Reordered(raw, state_dict)


def export_state_dict(raw: Mapping[str, Any], state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`prepare_state_dict` for a ``config.json`` of :func:`hf_config`."""
    return {k: v if (rows := _rope_rows(raw, k)) is None else _permute(v, *rows, inverse=True)
            for k, v in state_dict.items()}


# -- weights ------------------------------------------------------------------------------------------------

def _gated(pre: str, kernel) -> hf.Entry:
    """``pre.gate_proj`` / ``pre.up_proj`` <-> a fused ``[in, gate | up]`` kernel."""
    return hf.Entry((pre + "gate_proj.weight", pre + "up_proj.weight"), kernel,
                    lambda g, u: np.concatenate([g.T, u.T], axis=1), lambda a: tuple(np.split(a.T, 2, axis=0)))


def mla_entries(a: str, attn) -> list[hf.Entry]:
    """A multi-head latent attention layer's entries under key prefix ``a`` (``model.layers.i.self_attn.``)."""
    out = [hf.linear(a + "kv_a_proj_with_mqa.weight", attn.kv_a.kernel), hf.same(a + "kv_a_layernorm.weight", attn.kv_norm.weight),
           hf.linear(a + "kv_b_proj.weight", attn.kv_b.kernel), hf.linear(a + "o_proj.weight", attn.o.kernel)]
    if attn.q is not None:
        return out + [hf.linear(a + "q_proj.weight", attn.q.kernel)]
    return out + [hf.linear(a + "q_a_proj.weight", attn.q_a.kernel), hf.same(a + "q_a_layernorm.weight", attn.q_norm.weight),
                  hf.linear(a + "q_b_proj.weight", attn.q_b.kernel)]


def entries(model: GPT) -> list[hf.Entry]:
    cfg = model.cfg
    out = hf.lm_entries(model)
    for i, blk in enumerate(model.blocks):
        pre, attn, mlp = f"model.layers.{i}.", blk.attn, blk.mlp
        out += [hf.same(pre + "input_layernorm.weight", blk.norm1.weight),
                hf.same(pre + "post_attention_layernorm.weight", blk.norm2.weight), *mla_entries(pre + "self_attn.", attn)]
        if not hasattr(mlp, "router"):  # a dense layer (first_k_dense_replace)
            out += [_gated(pre + "mlp.", mlp.gate_up.kernel), hf.linear(pre + "mlp.down_proj.weight", mlp.down.kernel)]
            continue
        # (Qwen3-MoE's keys: mlp.gate, mlp.experts.j.{gate,up,down}_proj; MXFP4 experts quantized as read)
        out += moe_hf.expert_entries("qwen3_moe", pre, mlp, cfg.moe_experts)
        if mlp.score_bias is not None:
            out.append(hf.same(pre + "mlp.gate.e_score_correction_bias", mlp.score_bias))
        if mlp.shared_gate_up is not None:
            s = pre + "mlp.shared_experts."
            out += [_gated(s, mlp.shared_gate_up.kernel), hf.linear(s + "down_proj.weight", mlp.shared_down.kernel)]
    return out


def _ignore(cfg: GPTConfig):
    """RoPE buffers, and the layers past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction module,
    which generation does not use)."""
    def ignore(key: str) -> bool:
        parts = key.split(".")
        past = len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= cfg.layers
        return key.endswith("rotary_emb.inv_freq") or past

    return ignore


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face's keys, in the checkpoints' RoPE order (fp32 numpy)."""
    return export_state_dict(hf_config(model.cfg), hf.to_state_dict(entries(model)))


def load_hf_state_dict(model: GPT, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a Hugging Face ``state_dict`` (in the checkpoints' RoPE order) into ``model`` in place."""
    hf.load_state_dict(entries(model), prepare_state_dict(hf_config(model.cfg), state_dict), strict=strict,
                       ignore=_ignore(model.cfg))


def load(cfg: GPTConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> GPT:
    return hf.fill_abstract(lambda: GPT(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict,
                            ignore=_ignore(cfg), where=where, param_dtype=param_dtype)
