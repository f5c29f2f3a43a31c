"""timm's Hugging Face hub folders (``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``, ``timm/halonet26t...``:
``config.json`` with ``architecture`` / ``model_args`` / ``pretrained_cfg``, and ``model.safetensors`` or
``pytorch_model.bin``) -> :class:`ViT` / :class:`HaloNet`, through :func:`jaxattn.models.hf.load_pretrained`.

Architectures: ``vit_{tiny,small,base,large,huge}_patch{P}_{S}`` and DeiT's ``deit_{tiny,small,base}_patch16_{S}``
(not the distilled or DeiT III ones) (class token pooling, or ``global_pool="avg"``
with ``class_token=False, fc_norm=False``), ``halonet26t``, ``sehalonet33ts``; ``model_args`` that timm records
(depth, img_size, patch_size, embed_dim, num_heads, mlp_ratio, qkv_bias, in_chans, num_classes, ...) apply.
What the models here do not have (register tokens, layer scale, ``fc_norm``, ``qk_norm``, ...) raises
``ValueError``. Overriding ``num_classes``, ``in_channels`` or ``image_size`` fits the weights as timm's
``pretrained=True`` does (:func:`adapt`: fresh classifier, adapted first conv, resampled position grid).
:func:`preprocessing` gives the checkpoint's input size, mean, std and crop.
The key and layout maps are :mod:`jaxattn.models.timm_weights`'.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.halonet import HALONET_CONFIGS, HaloNet, HaloNetConfig
from jaxattn.models.timm_weights import ignore, timm_entries as entries
from jaxattn.models.vit import ViT, ViTConfig

__all__ = ["adapt", "config_from_hf", "entries", "hf_config", "preprocessing"]

_VIT = re.compile(r"(?:vit|deit)_(tiny|small|base|large|huge)_patch(\d+)_(\d+)")  # DeiT: ViT weights, same model
_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
              "huge": (1280, 32, 16)}
# model_args a checkpoint may record with the value the models here implement (others: refused)
_VIT_FIXED = {"reg_tokens": 0, "no_embed_class": False, "fc_norm": False, "init_values": None, "pre_norm": False,
              "qk_norm": False, "final_norm": True, "dynamic_img_size": False, "pos_embed": "learn",
              "weight_init": ""}
# training-time regularisation a checkpoint may record: no effect on the weights (fine-tuning sets its own)
_VIT_IGNORED = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def _size(value: Any, what: str) -> int:
    """timm's int or (h, w) image size; square only."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json: {what} {list(value)}: only square images are supported")
        value = value[0]
    return int(value)


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> ViTConfig | HaloNetConfig:
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
    elif m := _VIT.fullmatch(arch):
        dim, depth, heads = _VIT_SIZES[m.group(1)]
        class_token = bool(args.pop("class_token", True))
        for k in _VIT_IGNORED:
            args.pop(k, None)
        if args.get("fc_norm", False) is None and (pool or "token") == "token":
            args.pop("fc_norm")  # timm's "auto": no fc_norm for token pooling
        if (pool or "token") == "token" and class_token:
            vit_pool = "cls"
        elif pool == "avg" and not class_token and args.get("fc_norm") is False:
            vit_pool = "mean"
        else:
            raise ValueError(f"config.json: global_pool {pool!r} with class_token={class_token}: supported are "
                             "'token' with a class token, and 'avg' with class_token=False and fc_norm=False")
        if vit_pool == "mean":
            args.pop("fc_norm")  # (False, checked above)
        bad = {k: v for k, v in args.items() if k in _VIT_FIXED and v != _VIT_FIXED[k]}
        unknown = sorted(set(args) - set(_VIT_FIXED) - {"depth", "img_size", "patch_size", "embed_dim", "num_heads",
                                                         "mlp_ratio", "qkv_bias"})
        if bad or unknown:
            raise ValueError(f"config.json: model_args {bad or unknown} are not supported by jaxattn's ViT")
        cfg = ViTConfig(image_size=_size(args.get("img_size", int(m.group(3))), "img_size"),
                        patch_size=int(args.get("patch_size", int(m.group(2)))), in_channels=in_chans,
                        num_classes=num_classes, dim=int(args.get("embed_dim", dim)),
                        depth=int(args.get("depth", depth)), heads=int(args.get("num_heads", heads)),
                        mlp_ratio=float(args.get("mlp_ratio", 4.0)), qkv_bias=bool(args.get("qkv_bias", True)),
                        pool=vit_pool)
    else:
        raise ValueError(f"config.json: timm architecture {arch!r} is not one jaxattn converts "
                         "(vit_/deit_{tiny,small,base,large,huge}_patch{P}_{S}, halonet26t, sehalonet33ts)")
    return hf.with_overrides(cfg, overrides)


def hf_config(cfg: ViTConfig | HaloNetConfig) -> dict[str, Any]:
    """timm's hub ``config.json`` for ``cfg``: ``timm.create_model(architecture, **model_args)`` builds the model
    (a HaloNet must be one of timm's layouts; a ViT of any size is a ``vit_*`` architecture with its sizes)."""
    pre = {"input_size": [cfg.in_channels, cfg.image_size, cfg.image_size], "interpolation": "bicubic",
           "crop_pct": 0.9, "mean": [0.5] * cfg.in_channels, "std": [0.5] * cfg.in_channels,
           "num_classes": cfg.num_classes}
    args: dict[str, Any] = {"num_classes": cfg.num_classes, "in_chans": cfg.in_channels}
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
        arch = "vit_base_patch16_224"  # a name timm registers; model_args give every size
        args.update(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.dim, depth=cfg.depth,
                    num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                    **({"global_pool": "token"} if cfg.pool == "cls" else
                       {"global_pool": "avg", "class_token": False, "fc_norm": False}))
    return {"architecture": arch, "num_classes": cfg.num_classes, "global_pool": args["global_pool"],
            "model_args": args, "pretrained_cfg": pre}


def preprocessing(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's evaluation preprocessing: ``input_size`` (C, H, W), ``mean``, ``std``, ``crop_pct``,
    ``interpolation`` (timm's ``pretrained_cfg``; ImageNet statistics when absent)."""
    pre = raw.get("pretrained_cfg") or {}
    return {"input_size": tuple(pre.get("input_size", (3, 224, 224))),
            "mean": tuple(pre.get("mean", (0.485, 0.456, 0.406))), "std": tuple(pre.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": float(pre.get("crop_pct", 0.875)), "interpolation": pre.get("interpolation", "bicubic")}


def adapt(cfg: ViTConfig | HaloNetConfig, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint fitted to ``cfg`` as timm's ``pretrained=True`` loading does, for fine-tuning:
    another ``num_classes`` drops the classifier (a fresh one is initialised), another ``in_channels``
    adapts the first conv (one channel: the sum over RGB; more: RGB repeated, scaled by 3 / channels),
    another ViT image size resamples the position-embedding grid (bicubic). Returns the adapted dict
    and the keys left out (to initialise)."""
    sd = dict(state_dict)
    halo = isinstance(cfg, HaloNetConfig)
    conv, head = ("stem.conv1.conv.weight", "head.fc") if halo else ("patch_embed.proj.weight", "head")
    fresh = []
    if head + ".weight" in sd and np.shape(sd[head + ".weight"])[0] != cfg.num_classes:
        fresh = [k for k in (head + ".weight", head + ".bias") if sd.pop(k, None) is not None]
    if conv in sd and np.shape(sd[conv])[1] != cfg.in_channels:
        w = np.asarray(sd[conv], np.float32)  # [out, in, kh, kw]
        if cfg.in_channels == 1:
            w = w.sum(1, keepdims=True)
        else:
            reps = -(-cfg.in_channels // w.shape[1])
            w = np.tile(w, (1, reps, 1, 1))[:, :cfg.in_channels] * (w.shape[1] / cfg.in_channels)
        sd[conv] = w
    if not halo and "pos_embed" in sd:
        pos = np.asarray(sd["pos_embed"], np.float32)
        prefix = 1 if cfg.pool == "cls" else 0
        old, new = math.isqrt(pos.shape[1] - prefix), cfg.image_size // cfg.patch_size
        if old * old == pos.shape[1] - prefix and old != new:
            grid = pos[0, prefix:].reshape(old, old, -1)
            grid = np.asarray(jax.image.resize(jnp.asarray(grid), (new, new, grid.shape[-1]), "cubic"))
            sd["pos_embed"] = np.concatenate([pos[:, :prefix], grid.reshape(1, new * new, -1)], axis=1)
    return sd, fresh


def load(cfg: ViTConfig | HaloNetConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str):
    build = (lambda: HaloNet(cfg, rngs=nnx.Rngs(0))) if isinstance(cfg, HaloNetConfig) \
        else (lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    sd, fresh = adapt(cfg, state_dict)

    def kept(model):  # a fresh classifier keeps the model's own initialisation
        return [e for e in entries(model) if not set(e.keys) & set(fresh)]

    model = hf.fill_abstract(build, kept, sd, strict=strict, ignore=ignore, where=where)
    model.eval()  # a pretrained classifier: BatchNorm running statistics, no dropout (train() to fine-tune)
    return model
