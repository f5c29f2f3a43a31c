"""timm's hub folders (config.json with architecture / model_args / pretrained_cfg, and weights) ->
ViT / HaloNet through jaxattn.models.hf; with timm installed, against timm's own models."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import create_model, hf
from jaxattn.models.timm_hub import config_from_hf, preprocessing
from jaxattn.models.timm_weights import to_timm_state_dict
from jaxattn.models.vit import ViT
from conftest import (assert_close, check_timm_export, check_timm_folder_matches_timm, layer_norm_np,
                      write_timm_folder)

PRE = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9,
       "interpolation": "bicubic", "num_classes": 7}
VIT_TINY = {"architecture": "vit_tiny_patch16_224", "num_classes": 7, "num_features": 192, "global_pool": "token",
            "model_args": {"depth": 2, "img_size": [32, 32], "patch_size": 8, "num_classes": 7, "in_chans": 3,
                           "global_pool": "token"}, "pretrained_cfg": PRE}


@pytest.mark.slow  # (18 s: the suite's budget; timm folders by default: the families' numpy checks)
def test_vit_folder(tmp_path, capsys):
    cfg = config_from_hf(VIT_TINY, attn_impl="xla")
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.image_size, cfg.num_classes, cfg.pool) == (
        192, 2, 3, 8, 32, 7, "cls")
    src = ViT(cfg, rngs=nnx.Rngs(2))
    src.eval()
    folder = write_timm_folder(tmp_path, VIT_TINY, to_timm_state_dict(src))
    assert hf.hf_model_type(folder) == "timm"
    model = hf.load_pretrained(folder, attn_impl="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(src(x)))
    assert preprocessing(VIT_TINY)["mean"] == (0.5, 0.5, 0.5)
    half = hf.load_pretrained(folder, attn_impl="xla", dtype="bfloat16", param_dtype="bfloat16")
    assert half.blocks[0].attn.qkv.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half(x)), np.asarray(
        hf.load_pretrained(folder, attn_impl="xla", dtype="bfloat16")(x)))  # bf16 matmuls cast the weights anyway
    quant = hf.load_pretrained(folder, attn_impl="xla", quantized=True)  # overrides reach the model
    assert quant.cfg.quantized
    from jaxattn.generate import main as generate_main
    from jaxattn.train.__main__ import main as train_main

    for run in (lambda: generate_main(["--checkpoint", str(folder), "--prompt-ids", "1"]),
                lambda: train_main(["lm", "--model", str(folder), "--out", str(tmp_path / "x")])):
        with pytest.raises(SystemExit):  # an image model where a language model is wanted: said so
            run()
        assert "timm image model" in capsys.readouterr().err


@pytest.mark.slow  # a whole halonet26t (the folder path itself is the ViT one's; test_halonet checks the keys)
def test_halonet_folder_keeps_batchnorm_statistics(tmp_path):
    src = create_model("halonet26t", rngs=nnx.Rngs(0), num_classes=5, attn_impl="xla")
    sd = to_timm_state_dict(src)
    rng = np.random.default_rng(0)
    sd = {k: (rng.uniform(0.5, 2.0, v.shape).astype(np.float32) if k.endswith("running_var") else v)
          for k, v in sd.items()}  # statistics that differ from a fresh model's
    raw = {"architecture": "halonet26t", "num_classes": 5, "global_pool": "avg",
           "model_args": {"num_classes": 5, "in_chans": 3, "global_pool": "avg"},
           "pretrained_cfg": {**PRE, "input_size": [3, 256, 256]}}
    folder = write_timm_folder(tmp_path, raw, sd)
    model = hf.load_pretrained(folder, attn_impl="xla")
    assert model.cfg.num_classes == 5 and model.cfg.image_size == 256
    np.testing.assert_array_equal(np.asarray(model.stem.conv1.bn.var[...]), sd["stem.conv1.bn.running_var"])
    from jaxattn.models.timm_weights import load_timm_state_dict

    load_timm_state_dict(src, sd)
    src.eval()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(src(x)), rtol=1e-6, atol=1e-6)


def test_unsupported_timm_configs():
    for change, match in [({"architecture": "vit_base_patch16_rope_2d_224"}, "not one jaxattn converts"),
                          ({"model_args": {"mlp_layer": "SwiGLU"}}, "mlp_layer 'SwiGLU'"),
                          ({"model_args": {"global_pool": "prr"}}, "global_pool 'prr'"),
                          ({"model_args": {"pos_embed": "none"}}, "pos_embed"),
                          ({"model_args": {"class_token": False}}, "needs class_token"),
                          ({"model_args": {"img_size": [32, 48]}}, "only square"),
                          ({"model_args": {"something_new": 1}}, "something_new")]:
        with pytest.raises(ValueError, match=match):
            config_from_hf({**VIT_TINY, **change})
    for arch in ("deit_base_distilled_patch16_224", "vit_giant_patch14_reg1_tipsv2", "vit_dwee_patch16_reg1_gap_256"):
        with pytest.raises(ValueError, match="not one jaxattn converts"):
            config_from_hf({**VIT_TINY, "architecture": arch})
    assert config_from_hf({**VIT_TINY, "architecture": "deit_small_patch16_224.fb_in1k", "model_args": {}}).heads == 6
    assert config_from_hf({**VIT_TINY, "model_args": {"drop_path_rate": 0.1, "fc_norm": None}}).pool == "cls"
    gap = config_from_hf({**VIT_TINY, "global_pool": "avg", "model_args": {"class_token": False, "fc_norm": False,
                                                                           "global_pool": "avg"}})
    assert (gap.pool, gap.has_class_token, gap.fc_norm) == ("mean", False, False)
    mae = config_from_hf({**VIT_TINY, "global_pool": "avg", "model_args": {}})  # class token kept, fc_norm (timm: auto)
    assert (mae.pool, mae.has_class_token, mae.fc_norm) == ("mean", True, True)


def _arch(arch):
    return config_from_hf({"architecture": arch + ".some_tag", "num_classes": 0})


def test_timm_architecture_arguments():
    """The families' timm arguments (as timm's registry functions give them)."""
    c = _arch("deit3_small_patch16_384")
    assert (c.dim, c.heads, c.image_size, c.no_embed_class, c.layer_scale, c.reg_tokens, c.pool) == (
        384, 6, 384, True, 1e-6, 0, "cls")
    c = _arch("vit_large_patch14_reg4_dinov2")
    assert (c.dim, c.depth, c.patch_size, c.image_size, c.reg_tokens, c.no_embed_class, c.layer_scale) == (
        1024, 24, 14, 518, 4, True, 1e-5)
    assert (c.num_tokens, c.pos_embed_len, c.num_classes) == (1 + 4 + 37 * 37, 37 * 37, 0)
    c = _arch("vit_base_patch14_dinov2")
    assert (c.reg_tokens, c.no_embed_class, c.pos_embed_len) == (0, False, 1 + 37 * 37)
    c = _arch("vit_base_patch14_reg4_dinov2")
    assert (c.dim, c.reg_tokens, c.layer_scale) == (768, 4, 1e-5)
    c = _arch("vit_medium_patch16_gap_256")
    assert (c.dim, c.heads, c.qkv_bias, c.pool, c.has_class_token, c.fc_norm, c.layer_scale) == (
        512, 8, False, "mean", False, False, 1e-6)
    c = _arch("vit_base_patch16_gap_224")
    assert (c.heads, c.fc_norm, c.layer_scale) == (16, False, None)
    c = _arch("vit_betwixt_patch16_reg4_gap_256")
    assert (c.dim, c.heads, c.reg_tokens, c.fc_norm, c.has_class_token, c.layer_scale, c.num_prefix_tokens) == (
        640, 10, 4, True, False, 1e-5, 4)
    c = _arch("vit_base_patch16_reg4_gap_256")
    assert (c.layer_scale, c.fc_norm, c.image_size) == (None, True, 256)
    c = _arch("vit_little_patch16_reg1_gap_256")
    assert (c.dim, c.depth, c.heads, c.mlp_ratio, c.reg_tokens) == (320, 14, 5, 5.6, 1)
    assert _arch("vit_base_patch16_224_miil").qkv_bias is False
    c = _arch("vit_giant_patch14_reg4_dinov2")  # SwiGLU: fc1 8192 wide, act(first half) * second half
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.glu_mlp, c.mlp_act, c.reg_tokens, c.layer_scale) == (
        1536, 40, 24, 8192, True, "silu", 4, 1e-5)
    c = _arch("vit_so400m_patch14_siglip_384")
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.pool, c.has_class_token, c.fc_norm, c.mlp_act, c.image_size) == (
        1152, 27, 16, 4304, "map", False, False, "gelu", 384)
    c = _arch("vit_so400m_patch16_siglip_gap_256")
    assert (c.pool, c.has_class_token, c.fc_norm, c.mlp_act) == ("mean", False, False, "gelu_tanh")
    assert [_arch(f"vit_{n}").mlp_act for n in ("base_patch32_siglip_256", "base_patch16_siglip_256",
                                                "large_patch16_siglip_512", "large_patch16_siglip_gap_384",
                                                "giantopt_patch16_siglip_384")] == [
        "gelu_tanh", "gelu", "gelu_tanh", "gelu", "gelu_tanh"]
    c = _arch("vit_giant_patch14_clip_224")
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.pre_norm, c.glu_mlp) == (1408, 40, 16, 6144, True, False)


def test_architecture_table_matches_timm():
    """Every timm ViT architecture the table accepts builds (on torch's meta device) the model our config
    describes: sizes, tokens, position embedding, layer scale, norms, pooling, block types (timm installed)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from timm.layers import LayerScale

    from jaxattn.models.timm_hub import _vit_config, vit_arch_args

    names = [n for n in timm.list_models(["vit_*", "deit_*", "deit3_*"]) if vit_arch_args(n) is not None]
    assert len(names) > 40
    for n in names:
        with torch.device("meta"):
            m = timm.create_model(n)
        c, blk = _vit_config(vit_arch_args(n), 1000, 3, None), m.blocks[0]
        got = (type(m).__name__, type(blk).__name__, type(blk.attn).__name__, type(blk.mlp).__name__, m.embed_dim,
               len(m.blocks), blk.attn.num_heads, blk.mlp.fc1.out_features, blk.attn.qkv.bias is not None,
               m.cls_token is not None, m.num_reg_tokens, m.no_embed_class, isinstance(blk.ls1, LayerScale),
               type(m.fc_norm).__name__ == "LayerNorm", m.global_pool, m.patch_embed.patch_size[0],
               m.patch_embed.img_size[0], type(m.norm_pre).__name__, type(blk.attn.q_norm).__name__, blk.norm1.eps,
               type(blk.mlp.act).__name__, m.patch_embed.proj.bias is not None, type(m.norm).__name__)
        want = ("VisionTransformer", "Block", "Attention", "GluMlp" if c.glu_mlp else "Mlp", c.dim, c.depth, c.heads, c.mlp_dim, c.qkv_bias,
                c.has_class_token, c.reg_tokens, c.no_embed_class, c.layer_scale is not None, c.fc_norm,
                {"cls": "token", "mean": "avg", "map": "map"}[c.pool], c.patch_size, c.image_size,
                "LayerNorm" if c.pre_norm else "Identity", "LayerNorm" if c.qk_norm else "Identity", c.norm_eps,
                {"gelu": "GELU", "quick_gelu": "QuickGELU", "gelu_tanh": "GELUTanh", "silu": "SiLU"}[c.mlp_act],
                not c.pre_norm, "LayerNorm" if c.final_norm and not c.fc_norm else "Identity")
        assert got == want, n


def timm_vit_forward(sd, args, images):
    """timm's ``VisionTransformer.forward`` (timm 1.0 ``vision_transformer.py``) in float64 numpy on its own
    ``state_dict`` and constructor arguments: patch conv, class / register tokens and position embedding
    (``_pos_embed``, with ``no_embed_class``), blocks with LayerScale ``ls1``/``ls2``, ``norm``, ``pool``
    ('token' / 'avg' after the prefix tokens / 'map': ``AttentionPoolLatent``), ``fc_norm``, ``head``; CLIP's
    ``norm_pre``, LayerNorm eps 1e-5 (``norm_eps``, timm's ``norm_layer``), ``act_layer`` (quick GELU, tanh GELU,
    SiLU), ``qk_norm``, and ``mlp_layer=SwiGLUPacked`` (``GluMlp`` with the gate first)."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    eps = args.get("norm_eps", 1e-6)
    ln = lambda x, name: layer_norm_np(x, w[name + ".weight"], w[name + ".bias"], eps)  # noqa: E731
    p, heads = args["patch_size"], args["num_heads"]
    pool, class_token = args.get("global_pool", "token"), args.get("class_token", True)
    fc_norm = pool == "avg" if args.get("fc_norm") is None else args["fc_norm"]
    final = args.get("final_norm", True)  # (False: neither norm nor fc_norm)
    x = np.asarray(images, np.float64)  # NHWC
    b, hh, ww, c = x.shape
    patches = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, -1, c * p * p)
    x = patches @ w["patch_embed.proj.weight"].reshape(len(w["patch_embed.proj.weight"]), -1).T \
        + w.get("patch_embed.proj.bias", 0.0)  # (none with CLIP's pre_norm)
    prefix = ([np.broadcast_to(w["cls_token"], (b, 1, x.shape[-1]))] if class_token else []) + \
             ([np.broadcast_to(w["reg_token"], (b,) + w["reg_token"].shape[1:])] if args.get("reg_tokens") else [])
    if args.get("no_embed_class"):
        x = np.concatenate(prefix + [x + w["pos_embed"]], 1)
    else:
        x = np.concatenate(prefix + [x], 1) + w["pos_embed"]
    if args.get("pre_norm"):
        x = ln(x, "norm_pre")
    n, dim = x.shape[1], x.shape[2]
    act = {"gelu": lambda h: 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2))),
           "quick_gelu": lambda h: h / (1 + np.exp(-1.702 * h)),
           "gelu_tanh": lambda h: 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
           "silu": lambda h: h / (1 + np.exp(-h))}[args.get("act_layer") or "gelu"]

    def mlp(h, name, glu=False):
        h = h @ w[name + ".fc1.weight"].T + w[name + ".fc1.bias"]
        h = act(h[..., :h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:] if glu else act(h)
        return h @ w[name + ".fc2.weight"].T + w[name + ".fc2.bias"]

    def softmax_attention(q, k, v):  # [b, heads, n, hd]
        s = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
        a = np.exp(s - s.max(-1, keepdims=True))
        return (a / a.sum(-1, keepdims=True)) @ v

    for i in range(args["depth"]):
        g = lambda k: w[f"blocks.{i}.{k}"]  # noqa: E731
        h = ln(x, f"blocks.{i}.norm1")
        qkv = h @ g("attn.qkv.weight").T + (g("attn.qkv.bias") if f"blocks.{i}.attn.qkv.bias" in w else 0)
        q, k, v = qkv.reshape(b, n, 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)
        if args.get("qk_norm"):
            q, k = ln(q, f"blocks.{i}.attn.q_norm"), ln(k, f"blocks.{i}.attn.k_norm")
        o = softmax_attention(q, k, v)
        h = o.transpose(0, 2, 1, 3).reshape(b, n, dim) @ g("attn.proj.weight").T + g("attn.proj.bias")
        x = x + h * (g("ls1.gamma") if f"blocks.{i}.ls1.gamma" in w else 1)
        h = mlp(ln(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp", args.get("mlp_layer") == "SwiGLUPacked")
        x = x + h * (g("ls2.gamma") if f"blocks.{i}.ls2.gamma" in w else 1)
    if final and not fc_norm:
        x = ln(x, "norm")
    num_prefix = int(class_token) + args.get("reg_tokens", 0)
    if pool == "map":
        t, hd = x[:, num_prefix:], dim // heads
        q = (w["attn_pool.latent"] @ w["attn_pool.q.weight"].T + w["attn_pool.q.bias"]).reshape(1, heads, 1, hd)
        kv = t @ w["attn_pool.kv.weight"].T + w["attn_pool.kv.bias"]
        k, v = kv.reshape(b, t.shape[1], 2, heads, hd).transpose(2, 0, 3, 1, 4)
        o = softmax_attention(np.broadcast_to(q, (b, heads, 1, hd)), k, v).transpose(0, 2, 1, 3).reshape(b, 1, dim)
        y = o @ w["attn_pool.proj.weight"].T + w["attn_pool.proj.bias"]
        x = (y + mlp(ln(y, "attn_pool.norm"), "attn_pool.mlp"))[:, 0]
    else:
        x = x[:, 0] if pool == "token" else x[:, num_prefix:].mean(1)
    if final and fc_norm:
        x = ln(x, "fc_norm")
    return x @ w["head.weight"].T + w["head.bias"]


# small timm configs of each family's options; the arch names give the rest (layer scale, registers, ...)
FAMILIES = [("deit3_small_patch16_224", {}),  # layer scale, position embedding on the patches only
            ("vit_small_patch14_reg4_dinov2", {}),  # + register tokens
            ("vit_small_patch14_dinov2", {}),
            ("vit_giant_patch14_dinov2", {"mlp_ratio": 4.0}),  # SwiGLU MLP (SiLU)
            ("vit_medium_patch16_reg4_gap_256", {}),  # no class token, registers, mean pooling, fc_norm
            ("vit_small_patch16_224", {"global_pool": "avg"}),  # MAE-style: class token kept, mean pooling, fc_norm
            ("vit_small_patch16_224", {"qk_norm": True, "global_pool": "map"}),  # (map over the patches only)
            ("vit_base_patch16_clip_224", {}),  # CLIP: norm_pre, LayerNorm eps 1e-5
            ("vit_base_patch16_clip_quickgelu_224", {}),  # + quick GELU
            ("vit_base_patch16_siglip_224", {}),  # SigLIP: no class token, attention pooling
            ("vit_base_patch32_siglip_gap_256", {}),  # mean pooling without fc_norm, tanh GELU
            ("vit_base_patch16_radio_v3", {}),  # C-RADIOv3: 7 registers, no final norm
            ("vit_intern300m_patch14_448", {})]  # InternViT-300M: layer scale 0.1, no final norm


# the default suite runs these; the rest are slow (their options overlap these)
DEFAULT_FAMILIES = {"vit_small_patch14_reg4_dinov2", "vit_medium_patch16_reg4_gap_256", "vit_base_patch16_radio_v3"}


@pytest.mark.parametrize("arch,extra", [
    pytest.param(a, e, id=a + "".join(f"-{k}" for k in e), marks=[] if a in DEFAULT_FAMILIES and not e else pytest.mark.slow)
    for a, e in FAMILIES])
def test_timm_families_match_numpy_timm(tmp_path, arch, extra):
    """Each family's folder loads and matches timm's forward written in float64 numpy on the state_dict
    (layer scale, register tokens, norms, the latent query and the MLP's input weights given random values, so
    each one counts)."""
    from jaxattn.models.timm_hub import vit_arch_args

    small = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 2 * vit_arch_args(arch)["patch_size"],
             "num_classes": 5, **extra}  # (the family's own options come from its architecture name)
    raw = {"architecture": arch, "num_classes": 5, "model_args": small,
           "pretrained_cfg": {**PRE, "input_size": [3, small["img_size"], small["img_size"]]}}
    cfg = config_from_hf(raw, attn_impl="xla")
    rng = np.random.default_rng(0)
    noisy = ("gamma", "token", "norm.weight", "norm_pre.weight", "norm_pre.bias", "latent", "fc1.weight",
             "fc2.weight", "head.weight")
    sd = {k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) if k.endswith(noisy)
          else v for k, v in to_timm_state_dict(ViT(cfg, rngs=nnx.Rngs(1))).items()}
    model = hf.load_pretrained(write_timm_folder(tmp_path, raw, sd), attn_impl="xla")
    x = rng.normal(size=(2, small["img_size"], small["img_size"], 3)).astype(np.float32)
    want = timm_vit_forward(sd, {**vit_arch_args(arch), **small}, x)
    assert_close(np.asarray(model(jnp.asarray(x))), want, jnp.float32, f"{arch} logits vs numpy timm",
                 tol={jnp.dtype(jnp.float32): (2e-5, 2e-5)})
    p = cfg.patch_size
    bigger = hf.load_pretrained(tmp_path, attn_impl="xla", image_size=small["img_size"] + p)  # the grid resampled
    grid = (small["img_size"] + p) // p
    assert bigger.pos_embed.shape[1] == grid * grid + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
    assert bigger(jnp.asarray(rng.normal(size=(1, grid * p, grid * p, 3)), jnp.float32)).shape == (1, 5)
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        config_from_hf(VIT_TINY, quantize=True)
    with pytest.raises(ValueError, match="halonet26t"):
        config_from_hf({"architecture": "halonet26t", "model_args": {"block_size": 4}})


@pytest.mark.parametrize("arch,kwargs,size", [("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8), 32),
                                              ("deit_small_patch16_224", dict(depth=2, img_size=32, patch_size=8), 32),
                                              ("deit3_small_patch16_224", dict(depth=2, img_size=32), 32),
                                              ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=28), 28),
                                              ("vit_medium_patch16_reg4_gap_256", dict(depth=2, img_size=32), 32),
                                              ("vit_small_patch16_224", dict(depth=2, img_size=32, global_pool="avg"), 32),
                                              ("vit_base_patch16_clip_quickgelu_224", dict(depth=2, img_size=32), 32),
                                              ("vit_base_patch16_siglip_224", dict(depth=2, img_size=32), 32),
                                              ("vit_base_patch32_siglip_gap_256", dict(depth=2, img_size=64), 64),
                                              ("vit_small_patch16_224", dict(depth=2, img_size=32, qk_norm=True,
                                                                             global_pool="map"), 32),
                                              ("vit_giant_patch14_dinov2", dict(depth=2, img_size=28, embed_dim=96,
                                                                                num_heads=4, mlp_ratio=4.0), 28),
                                              ("halonet26t", {}, 256)])
def test_matches_timm(tmp_path, arch, kwargs, size):
    """(layer scales, prefix tokens, the latent query and norms far from their init)"""
    check_timm_folder_matches_timm(tmp_path, arch, size, ("gamma", "_token", "latent", "norm.weight"), **kwargs)


def test_intermediates_match_timm():
    """ViT.intermediates = timm's forward_intermediates(intermediates_only=True) (NCHW there, NHWC here)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, depth=3, img_size=28).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith(("gamma", "_token", "norm.weight")):
                param.normal_()
    cfg = config_from_hf({"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0,
                          "model_args": {"depth": 3, "img_size": 28}}, attn_impl="xla")
    model = ViT(cfg, rngs=nnx.Rngs(0))
    from jaxattn.models.timm_weights import load_timm_state_dict

    load_timm_state_dict(model, {k: v.numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.forward_intermediates(torch.as_tensor(x).permute(0, 3, 1, 2), indices=[0, 2], norm=True,
                                         return_prefix_tokens=True, intermediates_only=True)
    got = model.intermediates(jnp.asarray(x), [0, 2], norm=True, return_prefix_tokens=True)
    for (gp, gx), (wp, wx) in zip(got, want):
        assert_close(np.asarray(gp), wp.permute(0, 2, 3, 1).numpy(), jnp.float32, "patches",
                     tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})
        assert_close(np.asarray(gx), wx.numpy(), jnp.float32, "prefix", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


def test_bench_vision_runs_a_timm_folder(tmp_path):
    """bench vision --infer-models FOLDER: the pretrained weights, quantized and not."""
    from jaxattn.bench import vision

    src = ViT(config_from_hf(VIT_TINY), rngs=nnx.Rngs(2))
    folder = write_timm_folder(tmp_path, VIT_TINY, to_timm_state_dict(src))
    recs = vision.inference_throughput(str(folder), batch=2, dtype="float32", steps=1, warmup=1, attn_impl="xla")
    assert [(r["mode"], r["weights"]) for r in recs] == [("infer", "pretrained"), ("infer-quantized", "pretrained")]
    assert 0.0 <= recs[1]["top1_agreement"] <= 1.0 and recs[0]["image_size"] == 32


def test_adapt_fits_another_task(tmp_path):
    """Other classes, channels and image size: fresh head, summed first conv, resampled position grid."""
    from jaxattn.models.timm_hub import adapt

    cfg = config_from_hf(VIT_TINY)
    sd = to_timm_state_dict(ViT(cfg, rngs=nnx.Rngs(2)))
    new = config_from_hf(VIT_TINY, num_classes=10, in_channels=1, image_size=16)
    out, fresh = adapt(new, sd)
    assert fresh == ["head.weight", "head.bias"] and "head.weight" not in out
    np.testing.assert_allclose(out["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].sum(1, keepdims=True),
                               rtol=1e-6)
    assert out["pos_embed"].shape == (1, 1 + 4, 192)  # class token + 2 x 2 patches of 8 px
    np.testing.assert_array_equal(out["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    same, none = adapt(cfg, sd)  # nothing to fit: unchanged
    assert none == [] and all(np.array_equal(same[k], sd[k]) for k in sd)
    rgb4, _ = adapt(config_from_hf(VIT_TINY, in_channels=4), sd)
    assert rgb4["patch_embed.proj.weight"].shape[1] == 4
    const = {**sd, "pos_embed": np.full_like(sd["pos_embed"], 0.25)}  # resampling keeps a constant grid
    np.testing.assert_allclose(adapt(new, const)[0]["pos_embed"], 0.25, rtol=1e-5)
    # a features-only checkpoint (DINOv2's: no head) fine-tunes with a fresh classifier; num_classes=0 drops one
    bare = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert adapt(cfg, bare)[1] == ["head.weight", "head.bias"]
    headless, fresh0 = adapt(config_from_hf(VIT_TINY, num_classes=0), sd)
    assert fresh0 == [] and "head.weight" not in headless
    raw0 = {**VIT_TINY, "num_classes": 0, "model_args": {**VIT_TINY["model_args"], "num_classes": 0}}
    folder = write_timm_folder(tmp_path, raw0, bare)
    tuned = hf.load_pretrained(folder, num_classes=4, attn_impl="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 32, 3))
    np.testing.assert_array_equal(tuned.pool_features(x), hf.load_pretrained(folder, attn_impl="xla")(x))
    assert tuned(x).shape == (1, 4)


def test_probe_a_timm_backbone(tmp_path):
    """train probe --backbone-ckpt FOLDER: the frozen backbone is the checkpoint's (no head), fitted to
    the data; 3-channel data is normalised with the checkpoint's mean and std."""
    from jaxattn.train import probe as probe_task
    from jaxattn.train.image import use_pretrained_stats
    from jaxattn.train.images import ImageData

    src = ViT(config_from_hf(VIT_TINY), rngs=nnx.Rngs(2))
    folder = write_timm_folder(tmp_path / "vit", VIT_TINY, to_timm_state_dict(src))
    prep = probe_task.prepare(probe_task.ProbeConfig(backbone_ckpt=str(folder), image_size=32), progress=False)
    backbone = prep["backbone"]
    assert backbone.cfg.num_classes == 0 and backbone.cfg.in_channels == prep["data"].channels == 1
    np.testing.assert_array_equal(np.asarray(backbone.blocks[0].attn.qkv.kernel[...]),
                                  np.asarray(src.blocks[0].attn.qkv.kernel[...]))
    rgb = ImageData(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int32), np.zeros((2, 32, 32, 3), np.uint8),
                    np.zeros(2, np.int32), ["a"], "test", flip=False)
    use_pretrained_stats(rgb, str(folder))
    assert rgb.mean.tolist() == [0.5, 0.5, 0.5] and rgb.std.tolist() == [0.5, 0.5, 0.5]


_SLOW = pytest.mark.slow  # (the options' forward is checked in the default suite by the families' numpy oracle)


@pytest.mark.parametrize("pool,options", [("cls", {}), ("mean", {}),
                                          pytest.param("cls", dict(reg_tokens=2, no_embed_class=True, layer_scale=0.5),
                                                       marks=_SLOW),
                                          pytest.param("mean", dict(class_token=True, fc_norm=True, layer_scale=0.5),
                                                       marks=_SLOW),
                                          pytest.param("cls", dict(pre_norm=True, norm_eps=1e-5, mlp_act="quick_gelu"),
                                                       marks=_SLOW),
                                          ("map", dict(qk_norm=True, glu_mlp=True, mlp_act="silu")),
                                          pytest.param("cls", dict(final_norm=False, reg_tokens=7, no_embed_class=True),
                                                       marks=_SLOW)])
def test_export_a_vit_as_a_timm_folder(tmp_path, pool, options):
    """save_pretrained(ViT): timm.create_model(architecture, **model_args) with its weights (timm installed),
    and our own loader, give the model's logits."""
    from jaxattn.models.vit import ViTConfig

    cfg = ViTConfig(image_size=32, patch_size=8, in_channels=3, num_classes=5, dim=64, depth=2, heads=4,
                    mlp_ratio=3.0, pool=pool, attn_impl="xla", **options)
    with pytest.raises(ValueError, match="save_pretrained takes"):
        hf.save_pretrained(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / "x")
    check_timm_export(ViT(cfg, rngs=nnx.Rngs(4)), tmp_path, 32)


def test_export_refuses_what_timm_lacks():
    from jaxattn.models.timm_hub import hf_config
    from jaxattn.models.vit import ViTConfig

    with pytest.raises(ValueError, match="gates"):
        hf_config(ViTConfig(gates="features"))
    with pytest.raises(ValueError, match="norm_eps 1e-05 .glu_mlp=True."):
        hf_config(ViTConfig(glu_mlp=True, norm_eps=1e-5))
    from jaxattn.models import MODEL_CONFIGS

    with pytest.raises(ValueError, match="timm's layouts"):
        hf_config(MODEL_CONFIGS["halonet-tiny"])
    assert hf_config(dataclasses.replace(MODEL_CONFIGS["halonet26t"], num_classes=3))["architecture"] == "halonet26t"


@pytest.mark.slow
def test_fine_tune_a_timm_folder_then_export_the_run(tmp_path):
    """train image --model FOLDER: the pretrained blocks load (lr 0 keeps them through the run), the
    classifier is new, dropout streams checkpoint, attention maps plot; python -m jaxattn.export writes
    the run as a timm folder with its normalisation, which loads back to the run's logits."""
    from jaxattn.export import main as export_main
    from jaxattn.train.__main__ import main as train_main
    from jaxattn.train.image import load_trained

    src = ViT(config_from_hf(VIT_TINY), rngs=nnx.Rngs(2))
    folder = write_timm_folder(tmp_path / "vit", VIT_TINY, to_timm_state_dict(src))
    out = tmp_path / "run"
    assert train_main(["image", "--model", str(folder), "--steps", "2", "--batch-size", "8", "--lr", "0",
                       "--eval-every", "2", "--eval-batch-size", "128", "--dropout", "0.1", "--drop-path", "0.1",
                       "--attn-drop", "0.1", "--out", str(out), "--no-progress", "--attn-impl", "xla",
                       "--ema-decay", "0.5"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == str(folder.resolve())
    assert (out / "attention.png").stat().st_size > 2000
    model, _, data, step = load_trained(out)  # the run's own weights after its 2 steps
    assert step == 2 and model.cfg.in_channels == 1 and model.cfg.num_classes == 10
    np.testing.assert_array_equal(np.asarray(model.blocks[1].mlp.fc2.kernel[...]),
                                  np.asarray(src.blocks[1].mlp.fc2.kernel[...]))
    assert export_main([str(out), str(tmp_path / "exported")]) == 0
    raw = json.loads((tmp_path / "exported" / "config.json").read_text())
    np.testing.assert_allclose(raw["pretrained_cfg"]["mean"], data.mean, rtol=1e-6)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))
    np.testing.assert_allclose(np.asarray(hf.load_pretrained(tmp_path / "exported", attn_impl="xla")(x)),
                               np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    from jaxattn.classify import main as classify_main  # a run classifies images too (its own resize, grey)

    png = _png(tmp_path / "digit.png", (20, 24), 5)
    assert classify_main([str(out), str(png), "--json", str(tmp_path / "p.json"), "--attn-impl", "xla"]) == 0
    from PIL import Image

    with Image.open(png) as im:
        x1 = (np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR).convert("L"), np.float32)[..., None]
              / 255.0 - data.mean) / data.std
    top = json.loads((tmp_path / "p.json").read_text())["predictions"][0]["top"][0]
    assert top["name"] == data.classes[int(np.argmax(np.asarray(model(jnp.asarray(x1[None], jnp.float32)))))]
    assert export_main([str(out), str(tmp_path / "ema"), "--ema"]) == 0  # (lr 0: the average is the weights)
    np.testing.assert_allclose(np.asarray(hf.load_pretrained(tmp_path / "ema", attn_impl="xla")(x)),
                               np.asarray(load_trained(out, ema=True)[0](x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "missing"), str(tmp_path / "x")])


def _png(path, size, seed, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


def test_classify_cli_scores_a_class_folder_tree(tmp_path, capsys):
    """python -m jaxattn.classify FOLDER IMAGES: timm's evaluation preprocessing (shorter side to
    floor(size / crop_pct), bicubic, centre crop, mean/std), the model's top classes by its label names,
    top-1 of a class-folder tree, the quantized path's agreement."""
    from PIL import Image

    from jaxattn.classify import main as classify_main

    names = ["cat", "dog", "emu"]
    pre = {**PRE, "num_classes": 3, "crop_pct": 0.875, "label_names": names}
    raw = {**VIT_TINY, "num_classes": 3, "model_args": {**VIT_TINY["model_args"], "num_classes": 3}, "pretrained_cfg": pre}
    src = ViT(config_from_hf(raw, attn_impl="xla"), rngs=nnx.Rngs(2))
    src.eval()
    folder = write_timm_folder(tmp_path / "vit", raw, to_timm_state_dict(src))
    files = [_png(tmp_path / "val" / "cat" / "a.png", (40, 50), 0), _png(tmp_path / "val" / "emu" / "b.png", (64, 48), 1),
             _png(tmp_path / "val" / "emu" / "c.png", (33, 33), 2, "L"), _png(tmp_path / "val" / "loose.png", (50, 40), 3)]

    def prepared(f):  # written out: the shorter side to floor(32 / 0.875) = 36, bicubic, centre 32 x 32
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            new = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
            im = im.resize(new, Image.BICUBIC)
            left, top = int(round((new[0] - 32) / 2)), int(round((new[1] - 32) / 2))
            x = np.asarray(im.crop((left, top, left + 32, top + 32)), np.float32) / 255.0
        return (x - 0.5) / 0.5

    probs = np.asarray(jax.nn.softmax(src(jnp.asarray(np.stack([prepared(f) for f in files]))), -1))
    out = tmp_path / "pred.json"
    assert classify_main([str(folder), str(tmp_path / "val"), "--json", str(out), "--quantized", "--attn-impl", "xla",
                          "--top", "2", "--batch-size", "3"]) == 0
    got = json.loads(out.read_text())
    assert [p["file"] for p in got["predictions"]] == list(map(str, files))
    for p, want in zip(got["predictions"], probs):
        assert [c["name"] for c in p["top"]] == [names[i] for i in np.argsort(-want)[:2]]
        np.testing.assert_allclose([c["prob"] for c in p["top"]], np.sort(want)[::-1][:2], rtol=1e-4, atol=1e-5)
    assert [p.get("label") for p in got["predictions"]] == [0, 2, 2, None]
    s = got["summary"]
    assert s["scored"] == 3 and s["top1"] == float(np.mean(probs[:3].argmax(1) == [0, 2, 2]))
    assert 0.0 <= s["quantized_top1_agreement"] <= 1.0
    assert "loose.png: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        classify_main([str(folder), str(tmp_path / "nothing")])
    assert "no such image file or folder" in capsys.readouterr().err
    raw0 = {**raw, "num_classes": 0, "model_args": {**raw["model_args"], "num_classes": 0}}
    headless = write_timm_folder(tmp_path / "features", raw0, {k: v for k, v in to_timm_state_dict(src).items()
                                                     if not k.startswith("head.")})
    with pytest.raises(SystemExit):
        classify_main([str(headless), str(files[0])])
    assert "has no classifier" in capsys.readouterr().err


def test_preprocessing_matches_timm_transforms(tmp_path):
    """The same input as timm's own evaluation transform (when timm is installed)."""
    pytest.importorskip("torch")
    timm_data = pytest.importorskip("timm.data")
    from PIL import Image

    from jaxattn.classify import timm_preprocess

    for size, crop_pct, mode, interp, shape in [(32, 0.875, "center", "bicubic", (40, 57)),
                                                (48, 0.9, "squash", "bilinear", (70, 50)), (24, 1.0, "center", "bicubic", (24, 31))]:
        pre = {"input_size": [3, size, size], "crop_pct": crop_pct, "crop_mode": mode, "interpolation": interp,
               "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
        im = Image.open(_png(tmp_path / f"{size}.png", shape, size))
        want = timm_data.create_transform(input_size=(3, size, size), crop_pct=crop_pct, crop_mode=mode,
                                          interpolation=interp, mean=pre["mean"], std=pre["std"])(im)
        got = timm_preprocess({"pretrained_cfg": pre})(im)
        np.testing.assert_allclose(got, want.permute(1, 2, 0).numpy(), atol=1e-5)


@pytest.mark.parametrize("arch", [pytest.param("vit_small_patch14_reg4_dinov2", marks=pytest.mark.slow),
                                  pytest.param("vit_small_patch16_224", marks=pytest.mark.slow)])
def test_dynamic_image_size(tmp_path, arch):
    """dynamic_img_size: any H x W of whole patches, the position grid resampled per call around the prefix
    tokens; at the configured size the plain forward, at another square size the model loaded for it."""
    p = 14 if "patch14" in arch else 16
    raw = {"architecture": arch, "num_classes": 5, "model_args": {"depth": 2, "img_size": 2 * p, "num_classes": 5},
           "pretrained_cfg": {**PRE, "input_size": [3, 2 * p, 2 * p]}}
    cfg = config_from_hf(raw, attn_impl="xla")
    folder = write_timm_folder(tmp_path, raw, to_timm_state_dict(ViT(cfg, rngs=nnx.Rngs(3))))
    dyn = hf.load_pretrained(folder, attn_impl="xla", dynamic_img_size=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 2 * p, 2 * p, 3)), jnp.float32)
    np.testing.assert_array_equal(dyn(x), hf.load_pretrained(folder, attn_impl="xla")(x))
    big = jnp.asarray(rng.normal(size=(2, 3 * p, 3 * p, 3)), jnp.float32)
    assert_close(dyn(big), hf.load_pretrained(folder, attn_impl="xla", image_size=3 * p)(big), jnp.float32, "resized",
                 tol={jnp.dtype(jnp.float32): (1e-6, 1e-6)})
    assert dyn(jnp.zeros((1, 3 * p, 2 * p, 3))).shape == (1, 5)  # not square
    with pytest.raises(ValueError, match="divisible by patch_size"):
        dyn(jnp.zeros((1, 3 * p + 1, 2 * p, 3)))
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref = timm.create_model(arch, num_classes=5, depth=2, img_size=2 * p, dynamic_img_size=True).eval()
    ref.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in to_timm_state_dict(dyn).items()})
    x = rng.normal(size=(2, 3 * p, 4 * p, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.as_tensor(x).permute(0, 3, 1, 2)).numpy()
    assert_close(dyn(jnp.asarray(x)), want, jnp.float32, "logits vs timm", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})
