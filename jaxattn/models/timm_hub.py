"""timm's Hugging Face hub folders (``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``timm/halonet26t...``:
``config.json`` with ``architecture`` / ``model_args`` / ``pretrained_cfg``, and ``model.safetensors`` or
``pytorch_model.bin``) -> :class:`ViT` / :class:`Eva` / :class:`HaloNet`, through :func:`jaxattn.models.hf.load_pretrained`.

Architectures (:func:`vit_arch_args` knows their timm arguments): the original ViT / AugReg
``vit_{size}_patch{P}_{S}``, DeiT ``deit_*`` (not the distilled ones), DeiT III ``deit3_*`` (layer scale,
position embedding on the patches only), DINOv2 ``vit_{size}_patch14_dinov2`` and ``..._reg4_dinov2``
(layer scale, register tokens; ViT-g with its SwiGLU MLP), timm's mean-pooled ``vit_*_gap_{S}`` and register
``vit_*_reg{R}_gap_{S}`` (``fc_norm``), CLIP image towers ``vit_*_clip_*`` (pre-norm, quick GELU), SigLIP image
towers ``vit_*_siglip_{S}`` (no class token, attention pooling; tanh GELU where timm has it) and
``vit_*_siglip_gap_{S}``, for sizes tiny ... gigantic, so400m, giantopt; EVA-02 ``eva02_{size}_patch14_{S}``,
EVA-02 CLIP ``eva02_*_clip_{S}``, DINOv3 ``vit_{size}_patch16_dinov3[_qkvb]``, SBB ``vit_*_patch16_rope_reg*_gap_256``,
RoPE-ViT ``vit_*_patch16_rope[_mixed][_ape]_224`` and Perception Encoder ``vit_pe_core_*``, ``vit_pe_lang_*``,
``vit_pe_spatial_*`` (:func:`eva_arch_args`, into :class:`Eva`); C-RADIOv3 ``vit_*_patch16_radio_v3`` and
InternViT-300M ``vit_intern300m_patch14_448`` (no final norm); and ``halonet26t``, ``sehalonet33ts``.
``model_args`` that timm records (depth, img_size, patch_size, embed_dim, num_heads, mlp_ratio, qkv_bias,
class_token, global_pool, reg_tokens, no_embed_class, init_values, fc_norm, qk_norm, act_layer, in_chans,
num_classes, ...) apply; what the models here do not have (RMSNorm, parallel blocks, ...) raises ``ValueError``.
Overriding ``num_classes``, ``in_channels`` or ``image_size`` fits the weights as timm's
``pretrained=True`` does (:func:`adapt`: fresh classifier, adapted first conv, resampled position grid).
:func:`preprocessing` gives the checkpoint's input size, mean, std and crop.
The key and layout maps are :mod:`jaxattn.models.timm_weights`'.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.eva import Eva, EvaConfig
from jaxattn.models.halonet import HALONET_CONFIGS, HaloNet, HaloNetConfig
from jaxattn.models.timm_weights import ignore, timm_entries as entries
from jaxattn.models.vit import ACTIVATIONS, ViT, ViTConfig, resample_pos_embed

__all__ = ["adapt", "config_from_hf", "entries", "eva_arch_args", "hf_config", "preprocessing", "vit_arch_args"]

_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "medium": (512, 12, 8), "mediumd": (512, 20, 8),
              "betwixt": (640, 12, 10), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16),
              "little": (320, 14, 5), "wee": (256, 14, 4), "giant": (1408, 40, 16), "gigantic": (1664, 48, 16),
              "so400m": (1152, 27, 16), "giantopt": (1536, 40, 16)}
_VIT_MLP_RATIO = {"little": 5.6, "wee": 5.0, "giant": 48 / 11, "gigantic": 64 / 13, "so400m": 3.7362}
_S = "(?P<size>" + "|".join(_VIT_SIZES) + ")"
_P, _I, _R = r"_patch(?P<patch>\d+)", r"_(?P<img>\d+)", r"_reg(?P<reg>\d+)"
_GAP = {"class_token": False, "global_pool": "avg"}
_CLIP = {"pre_norm": True, "norm_eps": 1e-5}  # ("norm_eps": timm's norm_layer=partial(LayerNorm, eps=1e-5))
_SIGLIP = {"class_token": False, "global_pool": "map"}  # attention pooling (timm's AttentionPoolLatent)
_SIGLIP_GAP = {"class_token": False, "global_pool": "avg", "fc_norm": False}  # SigLIP towers without the MAP head
_TANH = {"act_layer": "gelu_tanh"}
_RADIO = {"reg_tokens": 7, "no_embed_class": True, "final_norm": False}
# DINOv2's ViT-g: 1536 wide, 24 heads, SwiGLU MLP (fc1 of 2 x 4096 outputs: timm's SwiGLUPacked)
_DINOV2_G = {"embed_dim": 1536, "num_heads": 24, "mlp_ratio": 2.66667 * 2, "mlp_layer": "SwiGLUPacked",
             "act_layer": "silu"}
# timm's ViT architectures (the model_args of their registry functions, by family): pattern, extra args
_VIT_ARCHS: list[tuple[re.Pattern, dict[str, Any]]] = [(re.compile(p), a) for p, a in [
    (rf"(?:vit|deit)_{_S}{_P}{_I}", {}),  # original ViT / AugReg / DeiT (not distilled)
    (rf"vit_{_S}{_P}{_I}_miil", {"qkv_bias": False}),
    (rf"deit3_{_S}{_P}{_I}", {"no_embed_class": True, "init_values": 1e-6}),  # DeiT III
    (rf"vit_(?P<size>giant){_P}(?:{_R})?_dinov2", {"init_values": 1e-5, "img_size": 518, **_DINOV2_G}),
    (rf"vit_{_S}{_P}(?:{_R})?_dinov2", {"init_values": 1e-5, "img_size": 518}),  # DINOv2 (with registers: reg4)
    (rf"vit_(?P<size>medium|betwixt){_P}_gap{_I}", {**_GAP, "qkv_bias": False, "init_values": 1e-6, "fc_norm": False}),
    (r"vit_(?P<size>base)_patch(?P<patch>16)_gap_(?P<img>224)", {**_GAP, "fc_norm": False, "num_heads": 16}),
    (rf"vit_(?P<size>base|huge){_P}_gap{_I}", {**_GAP, "fc_norm": False}),
    (rf"vit_{_S}{_P}_clip{_I}", _CLIP),  # CLIP image towers (OpenAI, LAION, DFN, MetaCLIP; and their fine-tunes)
    (rf"vit_{_S}{_P}_clip_quickgelu{_I}", {**_CLIP, "act_layer": "quick_gelu"}),
    (rf"vit_(?P<size>base){_P}{_R}_gap{_I}", {**_GAP, "no_embed_class": True}),  # (no layer scale)
    (rf"vit_{_S}{_P}{_R}_gap{_I}", {**_GAP, "no_embed_class": True, "init_values": 1e-5}),  # register ViTs
    *[entry for pool, kind in (("", _SIGLIP), ("_gap", _SIGLIP_GAP)) for entry in [  # SigLIP image towers
        (rf"vit_(?P<size>base)_patch(?P<patch>32)_siglip{pool}{_I}", {**kind, **_TANH}),
        (rf"vit_(?P<size>large)_patch(?P<patch>16)_siglip{pool}_(?P<img>512)", {**kind, **_TANH}),
        (rf"vit_(?P<size>so400m|giantopt)_patch(?P<patch>16)_siglip{pool}{_I}", {**kind, **_TANH}),
        (rf"vit_{_S}{_P}_siglip{pool}{_I}", kind)]],
    # backbones without a norm after the blocks (final_norm=False): C-RADIOv3 (7 registers; base / large with layer
    # scale, giant 1536 wide with 24 heads) and InternViT-300M (InternVL's, layer scale 0.1)
    (r"vit_(?P<size>base|large)_patch(?P<patch>16)_radio_v3", {"img_size": 512, "init_values": 1e-5, **_RADIO}),
    (r"vit_(?P<size>huge)_patch(?P<patch>16)_radio_v3", {"img_size": 512, **_RADIO}),
    (r"vit_(?P<size>giant)_patch(?P<patch>16)_radio_v3",
     {"img_size": 512, "embed_dim": 1536, "num_heads": 24, "mlp_ratio": 4.0, **_RADIO}),
    (r"vit_intern300m_patch(?P<patch>14)_(?P<img>448)",
     {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, "init_values": 0.1, "final_norm": False,
      "dynamic_img_size": True}),
]]
# model_args a checkpoint may record with the value the models here implement (others: refused)
_VIT_FIXED = {"pos_embed": "learn", "weight_init": ""}
_MLP_LAYERS = {"Mlp": False, "SwiGLUPacked": True}  # timm's mlp_layer (by name) -> ViTConfig.glu_mlp
_VIT_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token",
             "global_pool", "reg_tokens", "no_embed_class", "init_values", "fc_norm", "dynamic_img_size", "pre_norm",
             "norm_eps", "act_layer", "qk_norm", "mlp_layer", "pool_include_prefix", "final_norm")
# training-time regularisation a checkpoint may record: no effect on the weights (fine-tuning sets its own)
_VIT_IGNORED = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def vit_arch_args(arch: str) -> dict[str, Any] | None:
    """timm's ``model_args`` of the ViT architecture ``arch`` (None: not one converted here)."""
    for pattern, extra in _VIT_ARCHS:
        if m := pattern.fullmatch(arch):
            g = m.groupdict()
            dim, depth, heads = _VIT_SIZES[g["size"]] if g.get("size") else (None, None, None)  # (or in extra)
            args = {"patch_size": int(g["patch"]), "embed_dim": dim, "depth": depth, "num_heads": heads,
                    "mlp_ratio": _VIT_MLP_RATIO.get(g.get("size"), 4.0), **extra}
            if g.get("img"):
                args["img_size"] = int(g["img"])
            if g.get("reg"):
                args.update(reg_tokens=int(g["reg"]), no_embed_class=True)
            return args
    return None


_EVA_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
_EVA_ARCH = re.compile(r"eva02_(?P<size>tiny|small|base|large)_patch(?P<patch>14)_(?P<img>\d+)")
_DINOV3_ARCH = re.compile(r"vit_(?:(?P<size>small|small_plus|base|large|huge_plus)_patch16_dinov3(?P<qkvb>_qkvb)?"
                          r"|(?P<tiny>tiny)_patch16_dinov3_qkvb|(?P<b7>7b)_patch16_dinov3)")
_DINOV3_SIZES = {"small_plus": (384, 12, 6), "huge_plus": (1280, 32, 20), "7b": (4096, 40, 32)}
_DINOV3_SWIGLU = {"small_plus": {"mlp_ratio": 4.0, "swiglu_align_to": 8}, "huge_plus": {"mlp_ratio": 4.0, "swiglu_align_to": 8},
                  "7b": {"mlp_ratio": 2.0, "swiglu_align_to": 64}}
# timm Eva arguments with the value EvaConfig implements (others: refused)
_EVA_FIXED = {"use_rot_pos_emb": True, "use_post_norm": False, "attn_only_layer_scale": False,
              "num_kv_heads": None, "gated_attn": False, "attn_head_dim": None}
_EVA_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qkv_fused",
             "swiglu_mlp", "scale_mlp", "ref_feat_shape", "global_pool", "class_token", "use_fc_norm", "num_reg_tokens",
             "no_embed_class", "dynamic_img_size", "qk_norm", "rope_type", "rope_temperature", "rope_rotate_half",
             "use_abs_pos_emb", "init_values", "norm_eps", "head_init_scale", "swiglu_align_to", "attn_type",
             "scale_attn_inner", "rope_grid_indexing", "rope_grid_offset", "use_pre_transformer_norm",
             "use_post_transformer_norm", "attn_pool_num_heads", "attn_pool_mlp_ratio")
# more of timm's Eva-built families: EVA-02 CLIP image towers, timm's SBB RoPE ViTs, RoPE-ViT (Heo et al. 2024:
# axial / mixed, with or without an absolute embedding), Meta's Perception Encoder (PE core)
_SBB_SIZES = {"medium": (512, 12, 8, True), "mediumd": (512, 20, 8, False), "betwixt": (640, 12, 10, True),
              "base": (768, 12, 12, True)}
_PE_SIZES = {"tiny": (192, 12, 3, 24), "small": (384, 12, 6, 24), "base": (768, 12, 12, 14), "large": (1024, 24, 16, 24),
             "gigantic": (1536, 50, 16, 32)}
# (width, depth, heads) of PE's lang / spatial towers, by kind and size
_PE_TOWERS = {("lang", "large"): (1024, 23, 16), ("lang", "gigantic"): (1536, 47, 16),
              ("spatial", "tiny"): (192, 12, 3), ("spatial", "small"): (384, 12, 6), ("spatial", "base"): (768, 12, 12),
              ("spatial", "large"): (1024, 24, 16), ("spatial", "gigantic"): (1536, 50, 16)}


def _pe_tower(m: re.Match) -> dict[str, Any] | None:
    """timm's ``model_args`` of ``vit_pe_{lang,spatial}_*``: PE core's RoPE blocks (32 x 32 reference grid), mean
    pooling with neither a final nor an fc norm; layer scale 0.1 in the lang and gigantic towers, whose
    gigantic ones have no class token and no grid offset."""
    if (m["kind"], m["size"]) not in _PE_TOWERS:
        return None
    dim, depth, heads = _PE_TOWERS[m["kind"], m["size"]]
    giant = m["size"] == "gigantic"
    return {"img_size": int(m["img"]), "patch_size": int(m["patch"]), "embed_dim": dim, "depth": depth,
            "num_heads": heads, "mlp_ratio": 8960 / 1536 if giant else 4.0, "attn_type": "rope",
            "use_rot_pos_emb": True, "ref_feat_shape": (32, 32), "rope_grid_indexing": "xy",
            "use_pre_transformer_norm": True, "use_post_transformer_norm": False, "use_fc_norm": False,
            "norm_eps": 1e-5, **({"class_token": False} if giant else {"rope_grid_offset": 1.0}),
            **({"init_values": 0.1} if giant or m["kind"] == "lang" else {}),
            **({"class_token": True} if m["kind"] == "lang" and not giant else {})}


_EVA_FAMILIES = (
    (re.compile(r"eva02_(?P<size>base|large)_patch(?P<patch>16|14)_clip_(?P<img>224|336)"), lambda m: {
        "img_size": int(m["img"]), "patch_size": int(m["patch"]), **dict(zip(("embed_dim", "depth", "num_heads"),
                                                                              _EVA_SIZES[m["size"]])),
        "qkv_fused": False, "mlp_ratio": 4 * 2 / 3, "swiglu_mlp": True, "scale_mlp": True, "scale_attn_inner": True,
        "use_rot_pos_emb": True, "ref_feat_shape": (16, 16), "global_pool": "token"}),
    (re.compile(r"vit_(?P<size>medium|mediumd|betwixt|base)_patch16_rope_reg(?P<reg>1|4)_gap_256"), lambda m: {
        "img_size": 256, "patch_size": 16, **dict(zip(("embed_dim", "depth", "num_heads", "qkv_bias"),
                                                      _SBB_SIZES[m["size"]])),
        "qkv_fused": True, "init_values": 1e-5, "class_token": False, "num_reg_tokens": int(m["reg"]),
        "use_rot_pos_emb": True, "use_abs_pos_emb": False, "ref_feat_shape": (16, 16)}),
    (re.compile(r"vit_(?P<size>small|base|large)_patch16_rope(?P<mixed>_mixed)?(?P<ape>_ape)?_224"), lambda m: {
        "patch_size": 16, **dict(zip(("embed_dim", "depth", "num_heads"), _EVA_SIZES[m["size"]])), "mlp_ratio": 4,
        "attn_type": "rope", "qkv_bias": True, "init_values": 1e-5, "class_token": True, "global_pool": "token",
        "use_abs_pos_emb": bool(m["ape"]), **({"no_embed_class": True} if m["ape"] else {}), "use_rot_pos_emb": True,
        "rope_grid_indexing": "xy", "rope_temperature": 10.0 if m["mixed"] else 100.0,
        **({"rope_type": "mixed"} if m["mixed"] else {})}),
    (re.compile(r"vit_pe_core_(?P<size>tiny|small|base|large|gigantic)_patch(?P<patch>16|14)_(?P<img>\d+)"),
     lambda m: (lambda dim, depth, heads, ref: {
         "img_size": int(m["img"]), "patch_size": int(m["patch"]), "embed_dim": dim, "depth": depth, "num_heads": heads,
         "mlp_ratio": 8960 / 1536 if m["size"] == "gigantic" else 4.0, "global_pool": "map", "attn_type": "rope",
         "use_pre_transformer_norm": True, "use_rot_pos_emb": True, "ref_feat_shape": (ref, ref),
         "rope_grid_indexing": "xy", "attn_pool_num_heads": 8, "attn_pool_mlp_ratio": 4.0, "norm_eps": 1e-5,
         **({"class_token": False} if m["size"] == "gigantic" else {"rope_grid_offset": 1.0})})(*_PE_SIZES[m["size"]])),
    # PE's language (for multimodal LLMs) and spatial (dense features) towers: no norm after the blocks
    (re.compile(r"vit_pe_(?P<kind>lang|spatial)_(?P<size>tiny|small|base|large|gigantic)_patch(?P<patch>16|14)_"
                r"(?P<img>\d+)"), _pe_tower),
)
def eva_arch_args(arch: str) -> dict[str, Any] | None:
    """timm's ``model_args`` of the EVA-02 (``eva02_{size}_patch14_{S}``) or DINOv3
    (``vit_{size}_patch16_dinov3[_qkvb]``) architecture ``arch``; None: not one. (``norm_eps``: timm's
    ``norm_layer=partial(LayerNorm, eps=1e-5)``.)"""
    if m := _DINOV3_ARCH.fullmatch(arch):
        size = m["size"] or m["tiny"] or m["b7"]
        dim, depth, heads = {**_EVA_SIZES, **_DINOV3_SIZES}[size]
        swiglu = {"swiglu_mlp": True, **_DINOV3_SWIGLU[size]} if size in _DINOV3_SWIGLU else {}
        return {**swiglu, "img_size": 256, "patch_size": 16, "dynamic_img_size": True, "embed_dim": dim,
                "depth": depth, "num_heads": heads, "qkv_bias": bool(m["qkvb"] or m["tiny"]), "init_values": 1e-5, "rope_type": "dinov3",
                "rope_temperature": 100, "rope_rotate_half": True, "use_rot_pos_emb": True, "use_abs_pos_emb": False,
                "num_reg_tokens": 4, "use_fc_norm": False, "norm_eps": 1e-5}
    for pattern, make in _EVA_FAMILIES:
        if m := pattern.fullmatch(arch):
            return make(m)  # (None: a name of the pattern timm does not register)
    if not (m := _EVA_ARCH.fullmatch(arch)):
        return None
    dim, depth, heads = _EVA_SIZES[m["size"]]
    args = {"img_size": int(m["img"]), "patch_size": int(m["patch"]), "embed_dim": dim, "depth": depth,
            "num_heads": heads, "mlp_ratio": 4 * 2 / 3, "swiglu_mlp": True, "use_rot_pos_emb": True,
            "ref_feat_shape": (16, 16)}
    if m["size"] in ("base", "large"):  # split q / k / v projections, LayerNorm inside the SwiGLU
        args.update(qkv_fused=False, scale_mlp=True)
    return args


def _eva_config(args: dict[str, Any], num_classes: int, in_chans: int, input_size: Any) -> EvaConfig:
    """An :class:`EvaConfig` from timm ``Eva`` arguments (its defaults where absent)."""
    rope = args.get("rope_type", "cat")
    bad = {} if rope in ("cat", "dinov3", "mixed") else {"rope_type": rope}
    for k in ("scale_mlp", "swiglu_align_to"):
        if args.get(k) and not args.get("swiglu_mlp"):
            bad[k] = "with a plain MLP"
    for k, allowed in (("attn_type", ("eva", "rope")), ("rope_grid_indexing", ("ij", "xy"))):
        if args.get(k) not in (None, *allowed):
            bad[k] = args[k]
    if rope == "mixed" and args.get("rope_grid_offset"):
        bad["rope_grid_offset"] = "with rope_type 'mixed'"
    args = _supported(args, _EVA_FIXED, _EVA_ARGS, "EVA-02", bad)
    pool, class_token = _pool(args, "avg", ("avg", "token", "map"), "Eva pools by 'avg', 'token' or 'map'")
    ref = args.get("ref_feat_shape") if rope == "cat" else None  # (timm's DINOv3 / mixed embeddings ignore it)
    fc_norm, swiglu, init_values = args.get("use_fc_norm"), bool(args.get("swiglu_mlp", False)), args.get("init_values")
    fc_norm = pool == "avg" if fc_norm is None else bool(fc_norm)
    post = args.get("use_post_transformer_norm")
    if post and fc_norm:
        raise ValueError("config.json: model_args use_post_transformer_norm and use_fc_norm together (two final norms) "
                         "are not supported by jaxattn's EVA-02")
    final_norm = fc_norm or post is None or bool(post)  # (post False: no norm on the tokens; with no fc_norm: none)
    pool_ratio = args.get("attn_pool_mlp_ratio")
    return EvaConfig(image_size=_size(args.get("img_size", input_size or 224), "img_size"),
                     patch_size=int(args.get("patch_size", 16)), in_channels=in_chans, num_classes=num_classes,
                     dim=int(args.get("embed_dim", 768)), depth=int(args.get("depth", 12)),
                     heads=int(args.get("num_heads", 12)), mlp_ratio=float(args.get("mlp_ratio", 4.0)),
                     qkv_bias=bool(args.get("qkv_bias", True)),
                     pool={"token": "cls", "avg": "mean", "map": "map"}[pool],
                     pool_heads=args.get("attn_pool_num_heads"), pool_act="gelu" if pool == "map" else None,
                     pool_include_prefix=pool == "map",  # (timm's Eva: the attention pool sees every token)
                     pool_mlp_ratio=None if pool_ratio is None else float(pool_ratio),
                     pre_norm=bool(args.get("use_pre_transformer_norm", False)),
                     attn_type=args.get("attn_type", "eva"), attn_norm=bool(args.get("scale_attn_inner", False)),
                     rope_xy=args.get("rope_grid_indexing") == "xy",
                     rope_offset=float(args.get("rope_grid_offset", 0.0)),
                     class_token=class_token, reg_tokens=int(args.get("num_reg_tokens", 0)),
                     no_embed_class=bool(args.get("no_embed_class", False)),
                     fc_norm=fc_norm, final_norm=final_norm,
                     dynamic_img_size=bool(args.get("dynamic_img_size", False)), qk_norm=bool(args.get("qk_norm", False)),
                     rope_ref_grid=None if ref is None else _size(ref, "ref_feat_shape"),
                     rope_temperature=float(args.get("rope_temperature", 10000.0)),
                     rope_kind={"cat": "eva", "dinov3": "dinov3", "mixed": "mixed"}[rope],
                     rope_half=bool(args.get("rope_rotate_half", False)),
                     abs_pos_embed=bool(args.get("use_abs_pos_emb", True)), layer_scale=None if init_values is None
                     else float(init_values), norm_eps=float(args.get("norm_eps", 1e-6)),
                     qkv_split=not args.get("qkv_fused", True), swiglu=swiglu, mlp_act="silu" if swiglu else "gelu",
                     mlp_norm=bool(args.get("scale_mlp", False)), swiglu_align=int(args.get("swiglu_align_to") or 0))


def _supported(args: dict[str, Any], fixed: dict[str, Any], known: tuple[str, ...], model: str,
               bad: dict[str, Any] | None = None) -> dict[str, Any]:
    """``args`` without training-time regularisation; a ValueError naming the arguments with a value the model
    does not implement (``fixed``, plus ``bad``) or that it does not know."""
    args = {k: v for k, v in args.items() if k not in _VIT_IGNORED}
    bad = {**(bad or {}), **{k: v for k, v in args.items() if k in fixed and v != fixed[k]}}
    unknown = sorted(set(args) - set(fixed) - set(known))
    if bad or unknown:
        raise ValueError(f"config.json: model_args {bad or unknown} are not supported by jaxattn's {model}")
    return args


def _pool(args: dict[str, Any], default: str, allowed: tuple[str, ...], what: str) -> tuple[str, bool]:
    """``(global_pool, class_token)`` of timm arguments, checked."""
    pool, class_token = args.get("global_pool", default), bool(args.get("class_token", True))
    if pool not in allowed:
        raise ValueError(f"config.json: global_pool {pool!r}: jaxattn's {what}")
    if pool == "token" and not class_token:
        raise ValueError("config.json: global_pool 'token' needs class_token=True")
    return pool, class_token


def _architecture(arch: str) -> tuple[dict[str, Any], Callable[..., ViTConfig]] | None:
    """The timm arguments of a ViT or Eva architecture name and the config builder for them; None: not one."""
    for arch_args, make in ((vit_arch_args, _vit_config), (eva_arch_args, _eva_config)):
        if (args := arch_args(arch)) is not None:
            return args, make
    return None


def is_architecture(name: str) -> bool:
    """Whether ``name`` (a ``.tag`` ignored) is a timm ViT / Eva architecture converted here."""
    return isinstance(name, str) and _architecture(name.split(".")[0]) is not None


def _size(value: Any, what: str) -> int:
    """timm's int or (h, w) image size; square only."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json: {what} {list(value)}: only square images are supported")
        value = value[0]
    return int(value)


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> ViTConfig | EvaConfig | HaloNetConfig:
    """The model config of a timm ``config.json``; ``overrides`` set jaxattn-only fields (``dtype``,
    ``attn_impl``, ``quantized``, ...)."""
    arch = str(raw.get("architecture", "")).split(".")[0]
    args = dict(raw.get("model_args") or {})
    pre = raw.get("pretrained_cfg") or {}
    num_classes = int(args.pop("num_classes", raw.get("num_classes", pre.get("num_classes", 1000))))
    in_chans = int(args.pop("in_chans", (pre.get("input_size") or [3])[0]))
    pool = args.pop("global_pool", raw.get("global_pool"))
    if arch in ("halonet26t", "sehalonet33ts"):
        if pool not in (None, "avg"):
            raise ValueError(f"config.json: global_pool {pool!r}: {arch} here pools by averaging ('avg')")
        size = _size(args.pop("img_size", (pre.get("input_size") or [3, 256])[1:]), "img_size")
        if args:
            raise ValueError(f"config.json: model_args {sorted(args)} are not supported for {arch}")
        cfg = dataclasses.replace(HALONET_CONFIGS[arch], num_classes=num_classes, in_channels=in_chans,
                                  image_size=size)
    elif (found := _architecture(arch)) is not None:
        arch_args, make = found
        if pool is not None:
            arch_args["global_pool"] = pool
        arch_args.update(args)
        cfg = make(arch_args, num_classes, in_chans, (pre.get("input_size") or [3, 224, 224])[1:])
    else:
        raise ValueError(f"config.json: timm architecture {arch!r} is not one jaxattn converts "
                         "(ViT: vit_ / deit_ / deit3_{size}_patch{P}_{S}, vit_*_dinov2, vit_*_gap_{S}, vit_*_reg{R}_gap_{S}, "
                         "vit_*_clip_{S}, vit_*_siglip(_gap)_{S}; eva02_{size}_patch14_{S}, "
                         "vit_{size}_patch16_dinov3[_qkvb]; halonet26t, sehalonet33ts)")
    return hf.with_overrides(cfg, overrides)


def _vit_config(args: dict[str, Any], num_classes: int, in_chans: int, input_size: Any) -> ViTConfig:
    """A :class:`ViTConfig` from timm ``VisionTransformer`` arguments (its defaults where absent)."""
    args = _supported(args, _VIT_FIXED, _VIT_ARGS, "ViT")
    pool, class_token = _pool(args, "token", ("token", "avg", "map"), "ViT pools by the class token ('token'), "
                              "the mean of the patch tokens ('avg') or attention pooling ('map')")
    fc_norm, final_norm = args.get("fc_norm"), bool(args.get("final_norm", True))
    act = args.get("act_layer") or "gelu"
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: act_layer {args['act_layer']!r}: jaxattn's ViT has {sorted(ACTIVATIONS)}")
    mlp_layer = args.get("mlp_layer") or "Mlp"
    if mlp_layer not in _MLP_LAYERS:
        raise ValueError(f"config.json: mlp_layer {mlp_layer!r}: jaxattn's ViT has {sorted(_MLP_LAYERS)}")
    init_values = args.get("init_values")
    return ViTConfig(image_size=_size(args.get("img_size", input_size or 224), "img_size"),
                     patch_size=int(args.get("patch_size", 16)), in_channels=in_chans, num_classes=num_classes,
                     dim=int(args.get("embed_dim", 768)), depth=int(args.get("depth", 12)),
                     heads=int(args.get("num_heads", 12)), mlp_ratio=float(args.get("mlp_ratio", 4.0)),
                     qkv_bias=bool(args.get("qkv_bias", True)), pool={"token": "cls", "avg": "mean", "map": "map"}[pool],
                     class_token=None if class_token == (pool == "token") else class_token,
                     reg_tokens=int(args.get("reg_tokens", 0)), no_embed_class=bool(args.get("no_embed_class", False)),
                     layer_scale=float(init_values) if init_values else None,  # (timm: 0 = none)
                     # timm: fc_norm None = on for 'avg'; final_norm=False drops both final norms
                     fc_norm=(pool == "avg" if fc_norm is None else bool(fc_norm)) and final_norm, final_norm=final_norm,
                     dynamic_img_size=bool(args.get("dynamic_img_size", False)), pre_norm=bool(args.get("pre_norm", False)),
                     norm_eps=float(args.get("norm_eps", 1e-6)), mlp_act=act, qk_norm=bool(args.get("qk_norm", False)),
                     glu_mlp=_MLP_LAYERS[mlp_layer], pool_include_prefix=bool(args.get("pool_include_prefix", False)))


def hf_config(cfg: ViTConfig | HaloNetConfig) -> dict[str, Any]:
    """timm's hub ``config.json`` for ``cfg``: ``timm.create_model(architecture, **model_args)`` builds the model
    (a HaloNet must be one of timm's layouts; a ViT of any size is a ``vit_*`` architecture with its sizes)."""
    pre = {"input_size": [cfg.in_channels, cfg.image_size, cfg.image_size], "interpolation": "bicubic",
           "crop_pct": 0.9, "mean": [0.5] * cfg.in_channels, "std": [0.5] * cfg.in_channels,
           "num_classes": cfg.num_classes}
    args: dict[str, Any] = {"num_classes": cfg.num_classes, "in_chans": cfg.in_channels}
    # (timm.create_model drops None arguments, so "none" is written as a value the architecture cannot override)
    if isinstance(cfg, EvaConfig):
        return _eva_hf_config(cfg, pre)
    if isinstance(cfg, HaloNetConfig):
        task = {"num_classes", "in_channels", "image_size", "dtype", "attn_impl", "remat"}
        arch = next((n for n in ("halonet26t", "sehalonet33ts") if all(
            getattr(cfg, f.name) == getattr(HALONET_CONFIGS[n], f.name)
            for f in dataclasses.fields(cfg) if f.name not in task)), None)
        if arch is None:
            raise ValueError("only HaloNets with timm's layouts (halonet26t, sehalonet33ts) export to timm")
        args["global_pool"] = "avg"
    else:
        if cfg.gates != "none":
            raise ValueError("a ViT with gates has no timm counterpart")
        if (cfg.pool_heads, cfg.pool_mlp_ratio, cfg.pool_act) != (None, None, None):
            raise ValueError("timm's VisionTransformer pools with the blocks' heads, MLP ratio and activation "
                             "(pool_heads, pool_mlp_ratio, pool_act: None)")
        # a name timm registers whose norm layer and MLP type are the model's (model_args give every size
        # and option; timm's mlp_layer is a class, so it comes from the architecture)
        archs = {(1e-6, False): "vit_base_patch16_224", (1e-5, False): "vit_base_patch16_clip_224",
                 (1e-6, True): "vit_giant_patch14_dinov2"}
        if (cfg.norm_eps, cfg.glu_mlp) not in archs:
            raise ValueError(f"norm_eps {cfg.norm_eps} (glu_mlp={cfg.glu_mlp}): timm's ViTs have 1e-6 (or 1e-5, "
                             "CLIP's, with a plain MLP)")
        arch = archs[cfg.norm_eps, cfg.glu_mlp]
        args.update(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.dim, depth=cfg.depth,
                    num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                    global_pool={"cls": "token", "mean": "avg", "map": "map"}[cfg.pool], class_token=cfg.has_class_token,
                    reg_tokens=cfg.reg_tokens, no_embed_class=cfg.no_embed_class, init_values=cfg.layer_scale or 0.0,
                    fc_norm=cfg.fc_norm, dynamic_img_size=cfg.dynamic_img_size, pre_norm=cfg.pre_norm,
                    act_layer=cfg.mlp_act, qk_norm=cfg.qk_norm, pool_include_prefix=cfg.pool_include_prefix)
        if not cfg.final_norm:
            args["final_norm"] = False
    return {"architecture": arch, "num_classes": cfg.num_classes, "global_pool": args["global_pool"],
            "model_args": args, "pretrained_cfg": pre}


def _eva_hf_config(cfg: EvaConfig, pre: dict[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` of an :class:`EvaConfig`: every option in ``model_args``; the architecture gives
    what JSON cannot (the norm layer: eps 1e-6 EVA-02's, 1e-5 DINOv3's, which also has layer scale, and
    timm drops None arguments)."""
    # (eps 1e-5 without layer scale: PE core's norm layer, whose other defaults every model_arg overrides)
    arch = {1e-6: "eva02_base_patch14_224", 1e-5: "vit_small_patch16_dinov3" if cfg.layer_scale is not None
            else "vit_pe_core_base_patch16_224"}.get(cfg.norm_eps)
    if arch is None or cfg.mlp_act != ("silu" if cfg.swiglu else "gelu") or (
            cfg.pool == "map" and (cfg.pool_act or cfg.mlp_act) != "gelu") or cfg.pool_include_prefix != (cfg.pool == "map"):
        raise ValueError("an Eva exports to timm with LayerNorm eps 1e-6 or 1e-5, timm's Eva MLP activations "
                         "(SiLU in a SwiGLU, else GELU; GELU in the attention pool) and its pooling (the attention "
                         "pool over every token, the mean over the patches: pool_include_prefix = pool == 'map')")
    if cfg.rope_kind == "eva" and cfg.rope_ref_grid is None and cfg.dynamic_img_size:
        raise ValueError("rope_ref_grid=None with dynamic_img_size has no timm counterpart (timm's None is "
                         "dropped by create_model; set rope_ref_grid)")
    ref = cfg.rope_ref_grid or cfg.grid  # (positions scaled to the grid itself: the patch indices)
    pool = {"cls": "token", "mean": "avg", "map": "map"}[cfg.pool]
    args = {"num_classes": cfg.num_classes, "in_chans": cfg.in_channels, "img_size": cfg.image_size,
            "patch_size": cfg.patch_size, "embed_dim": cfg.dim, "depth": cfg.depth, "num_heads": cfg.heads,
            "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias, "qkv_fused": not cfg.qkv_split,
            "scale_mlp": cfg.mlp_norm, "ref_feat_shape": [ref, ref], "global_pool": pool,
            "class_token": cfg.has_class_token, "use_fc_norm": cfg.fc_norm, "num_reg_tokens": cfg.reg_tokens,
            "no_embed_class": cfg.no_embed_class, "dynamic_img_size": cfg.dynamic_img_size, "qk_norm": cfg.qk_norm,
            "rope_temperature": cfg.rope_temperature,
            "rope_type": {"eva": "cat", "dinov3": "dinov3", "mixed": "mixed"}[cfg.rope_kind],
            "rope_rotate_half": cfg.rope_half, "use_abs_pos_emb": cfg.abs_pos_embed, "swiglu_mlp": cfg.swiglu,
            "swiglu_align_to": cfg.swiglu_align, "init_values": cfg.layer_scale, "attn_type": cfg.attn_type,
            "scale_attn_inner": cfg.attn_norm, "rope_grid_indexing": "xy" if cfg.rope_xy else "ij",
            "rope_grid_offset": cfg.rope_offset, "use_pre_transformer_norm": cfg.pre_norm,
            "attn_pool_num_heads": cfg.pool_heads or cfg.heads,
            "attn_pool_mlp_ratio": cfg.mlp_ratio if cfg.pool_mlp_ratio is None else cfg.pool_mlp_ratio}
    if cfg.layer_scale is None:
        del args["init_values"]  # (eva02's default: none)
    if not cfg.final_norm:
        args["use_post_transformer_norm"] = False
    return {"architecture": arch, "num_classes": cfg.num_classes, "global_pool": pool,
            "model_args": args, "pretrained_cfg": pre}


def preprocessing(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's evaluation preprocessing: ``input_size`` (C, H, W), ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``, ``interpolation`` (timm's ``pretrained_cfg``; ImageNet statistics when absent)."""
    pre = raw.get("pretrained_cfg") or {}
    return {"input_size": tuple(pre.get("input_size", (3, 224, 224))),
            "mean": tuple(pre.get("mean", (0.485, 0.456, 0.406))), "std": tuple(pre.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": float(pre.get("crop_pct", 0.875)), "crop_mode": pre.get("crop_mode") or "center",
            "interpolation": pre.get("interpolation", "bicubic")}


def adapt(cfg: ViTConfig | HaloNetConfig, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint fitted to ``cfg`` as timm's ``pretrained=True`` loading does, for fine-tuning:
    another ``num_classes`` drops the classifier (a fresh one is initialised, also for a features-only
    checkpoint such as DINOv2's; ``num_classes=0`` drops it), another ``in_channels``
    adapts the first conv (one channel: the sum over RGB; more: RGB repeated, scaled by 3 / channels),
    another ViT image size resamples the position-embedding grid (bicubic, antialiased: as timm). Returns the adapted dict
    and the keys left out (to initialise)."""
    sd = dict(state_dict)
    halo = isinstance(cfg, HaloNetConfig)
    conv, head = ("stem.conv1.conv.weight", "head.fc") if halo else ("patch_embed.proj.weight", "head")
    head_keys = (head + ".weight", head + ".bias")
    if head_keys[0] in sd and np.shape(sd[head_keys[0]])[0] != cfg.num_classes:  # another task (or none): dropped
        for k in head_keys:
            sd.pop(k, None)
    fresh = list(head_keys) if cfg.num_classes and head_keys[0] not in sd else []  # a new classifier
    if conv in sd and np.shape(sd[conv])[1] != cfg.in_channels:
        w = np.asarray(sd[conv], np.float32)  # [out, in, kh, kw]
        if cfg.in_channels == 1:
            w = w.sum(1, keepdims=True)
        else:
            reps = -(-cfg.in_channels // w.shape[1])
            w = np.tile(w, (1, reps, 1, 1))[:, :cfg.in_channels] * (w.shape[1] / cfg.in_channels)
        sd[conv] = w
    if not halo and "pos_embed" in sd and np.shape(sd["pos_embed"])[1] != cfg.pos_embed_len:
        prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        sd["pos_embed"] = np.asarray(resample_pos_embed(jnp.asarray(sd["pos_embed"], jnp.float32), (cfg.grid, cfg.grid),
                                                        prefix))
    return sd, fresh


def load(cfg: ViTConfig | HaloNetConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str,
         param_dtype: Any = None):
    model_class = HaloNet if isinstance(cfg, HaloNetConfig) else Eva if isinstance(cfg, EvaConfig) else ViT

    def build():
        return model_class(cfg, rngs=nnx.Rngs(0))
    sd, fresh = adapt(cfg, state_dict)

    def kept(model):  # a fresh classifier keeps the model's own initialisation
        return [e for e in entries(model) if not set(e.keys) & set(fresh)]

    model = hf.fill_abstract(build, kept, sd, strict=strict, ignore=ignore, where=where, param_dtype=param_dtype)
    model.eval()  # a pretrained classifier: BatchNorm running statistics, no dropout (train() to fine-tune)
    return model
