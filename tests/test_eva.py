"""EVA-02 (jaxattn.models.eva): timm's Eva forward written in float64 numpy for both layouts (fused qkv with a
packed SwiGLU: EVA-02 Ti/S; split q/k/v with a normalised split SwiGLU: B/L) through timm hub folders; rotary
embedding properties; timm parity, architecture table and export when torch and timm are installed."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (assert_close, check_timm_export, check_timm_folder_matches_timm, layer_norm_np,
                      write_timm_folder)
from jaxattn.models import Eva, EvaConfig, create_model, hf
from jaxattn.models.eva import apply_rope, rope_sin_cos
from jaxattn.models.timm_hub import config_from_hf, eva_arch_args
from jaxattn.models.timm_weights import to_timm_state_dict

F32 = {jnp.dtype(jnp.float32): (2e-5, 2e-5)}
PRE = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9, "interpolation": "bicubic"}


def timm_eva_forward(sd, args, images):
    """timm's ``Eva.forward`` (timm 1.0 ``eva.py``; EVA-02 and DINOv3 options) in float64 numpy on its
    ``state_dict``: patch conv, class and register tokens (+ the position embedding when there is one), blocks
    (``EvaAttention`` rotating the patch tokens' q and k: ``RotaryEmbeddingCat``, positions scaled to
    ``ref_feat_shape``, or ``RotaryEmbeddingDinoV3``, centred positions; interleaved or half layout; fused
    ``qkv`` + ``q_bias`` / ``v_bias`` or ``q_proj`` / ``k_proj`` / ``v_proj``; ``GluMlp`` (gate first),
    ``SwiGLU`` with ``norm``, or ``Mlp`` (GELU); layer scale ``gamma_1`` / ``gamma_2``), mean pooling after the
    prefix tokens with ``fc_norm`` or after ``norm``, ``head``."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    eps = args.get("norm_eps", 1e-6)
    ln = lambda x, name: layer_norm_np(x, w[name + ".weight"], w[name + ".bias"], eps)  # noqa: E731
    silu = lambda h: h / (1 + np.exp(-h))  # noqa: E731
    gelu = lambda h: 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # noqa: E731
    p, heads = args["patch_size"], args["num_heads"]
    x = np.asarray(images, np.float64)
    b, hh, ww, c = x.shape
    grid = (hh // p, ww // p)
    patches = x.reshape(b, grid[0], p, grid[1], p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, -1, c * p * p)
    x = patches @ w["patch_embed.proj.weight"].reshape(len(w["patch_embed.proj.weight"]), -1).T \
        + w["patch_embed.proj.bias"]
    prefix = [np.broadcast_to(w[t], (b,) + w[t].shape[1:]) for t in ("cls_token", "reg_token") if t in w]
    x = np.concatenate(prefix + [x], 1) + w.get("pos_embed", 0.0)
    npt = sum(t.shape[1] for t in prefix)
    n, dim = x.shape[1], x.shape[2]
    d = dim // heads
    nb = d // 4  # rotary embedding
    bands = 1.0 / args.get("rope_temperature", 10000.0) ** (np.arange(nb) / nb)
    if args.get("rope_type") == "dinov3":  # periods temperature^(2i / (d/2)), centred coordinates in [-1, 1]
        t = [(np.arange(0.5, s) / s) * 2 - 1 for s in grid]
        bands = 2 * math.pi * bands
    else:
        t = [np.arange(s) / s * r for s, r in zip(grid, args["ref_feat_shape"])]
    pos = (np.stack(np.meshgrid(*t, indexing="ij"), -1)[..., None] * bands).reshape(-1, 2 * nb)
    half = args.get("rope_rotate_half", False)
    layout = (lambda a: np.concatenate([a, a], -1)) if half else (lambda a: np.repeat(a, 2, -1))  # noqa: E731
    sin, cos = layout(np.sin(pos)), layout(np.cos(pos))

    def rope(z):  # [b, heads, n, d]: the prefix tokens kept
        y = z[:, :, npt:]
        if half:
            r = np.concatenate([-y[..., d // 2:], y[..., :d // 2]], -1)
        else:
            r = np.stack([-y[..., 1::2], y[..., 0::2]], -1).reshape(y.shape)
        return np.concatenate([z[:, :, :npt], y * cos + r * sin], 2)

    for i in range(args["depth"]):
        g = lambda k: w[f"blocks.{i}.{k}"]  # noqa: E731
        has = lambda k: f"blocks.{i}.{k}" in w  # noqa: E731
        h = ln(x, f"blocks.{i}.norm1")
        split = lambda y: y.reshape(b, n, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
        if has("attn.qkv.weight"):
            bias = np.concatenate([g("attn.q_bias"), np.zeros(dim), g("attn.v_bias")]) if has("attn.q_bias") else 0
            q, k, v = (split(y) for y in np.split(h @ g("attn.qkv.weight").T + bias, 3, -1))
        else:
            q = split(h @ g("attn.q_proj.weight").T + g("attn.q_proj.bias"))
            k = split(h @ g("attn.k_proj.weight").T)
            v = split(h @ g("attn.v_proj.weight").T + g("attn.v_proj.bias"))
        q, k = rope(q), rope(k)
        s = q @ k.transpose(0, 1, 3, 2) * d ** -0.5
        a = np.exp(s - s.max(-1, keepdims=True))
        o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
        x = x + (o @ g("attn.proj.weight").T + g("attn.proj.bias")) * (g("gamma_1") if has("gamma_1") else 1)
        h = ln(x, f"blocks.{i}.norm2")
        if has("mlp.fc1_g.weight"):
            h = silu(h @ g("mlp.fc1_g.weight").T + g("mlp.fc1_g.bias")) * (h @ g("mlp.fc1_x.weight").T + g("mlp.fc1_x.bias"))
            h = ln(h, f"blocks.{i}.mlp.norm") if has("mlp.norm.weight") else h
        elif args.get("swiglu_mlp"):
            h = h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
            h = silu(h[..., :h.shape[-1] // 2]) * h[..., h.shape[-1] // 2:]
        else:
            h = gelu(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias"))
        x = x + (h @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")) * (g("gamma_2") if has("gamma_2") else 1)
    if "fc_norm.weight" in w:
        x = ln(x[:, npt:].mean(1), "fc_norm")
    else:
        x = ln(x, "norm")[:, npt:].mean(1)
    return x @ w["head.weight"].T + w["head.bias"]


SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 5}


@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "eva02_base_patch14_224", "vit_small_patch16_dinov3",
                                  "vit_base_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3"])
def test_folder_matches_numpy_timm(tmp_path, arch):
    """A timm folder of each layout loads (hf.load_pretrained) and matches timm's forward in float64 numpy;
    biases, norms, layer scales, prefix tokens and the SwiGLU gates are randomised so that each one counts."""
    size = 4 * eva_arch_args(arch)["patch_size"]  # a 4 x 4 grid
    small = {**SMALL, "img_size": size, **({"mlp_ratio": 3.1} if "plus" in arch else {})}  # (198 -> 200 wide)
    raw = {"architecture": arch + ".some_tag", "num_classes": 5, "model_args": small,
           "pretrained_cfg": {**PRE, "input_size": [3, size, size]}}
    cfg = config_from_hf(raw, attn_impl="xla")
    assert isinstance(cfg, EvaConfig) and cfg.qkv_split == (arch == "eva02_base_patch14_224") == cfg.mlp_norm
    rng = np.random.default_rng(0)
    noisy = ("bias", "norm.weight", "fc1_g.weight", "fc1.weight", "head.weight", "gamma_1", "gamma_2", "token",
             "attn.proj.weight", "qkv.weight", "q_proj.weight", "k_proj.weight")  # (attention made to matter)
    sd = {k: (v + rng.normal(0, 0.5 if k.endswith(noisy[:8]) else 0.2, v.shape)).astype(np.float32)
          if k.endswith(noisy) else v for k, v in to_timm_state_dict(Eva(cfg, rngs=nnx.Rngs(1))).items()}
    assert ("blocks.0.attn.q_bias" in sd) == (not cfg.qkv_split and cfg.qkv_bias)
    assert "blocks.0.attn.k_proj.bias" not in sd and ("pos_embed" in sd) == ("eva02" in arch)
    model = hf.load_pretrained(write_timm_folder(tmp_path, raw, sd), attn_impl="xla")
    assert type(model) is Eva
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    want = timm_eva_forward(sd, {**eva_arch_args(arch), **small}, x)
    assert_close(np.asarray(model(jnp.asarray(x))), want, jnp.float32, f"{arch} logits vs numpy timm", tol=F32)
    (last,) = model.intermediates(jnp.asarray(x), 1)
    assert last.shape == (2, 4, 4, 64)


def test_rotary_scores_depend_on_the_offset_only():
    """q . k after the rotation depends on the two patches' grid offset, not their positions (ref grid None)."""
    q = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (8,)), (1, 30, 1, 8))
    k = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (8,)), (1, 30, 1, 8))
    at = lambda r, c: r * 6 + c  # noqa: E731
    for kind, half in [("eva", False), ("dinov3", True)]:  # (DINOv3: centred positions, the half layout)
        rope = rope_sin_cos((5, 6), 8, temperature=100.0, kind=kind, half=half)
        qr, kr = apply_rope(q, rope, 0, half)[0, :, 0], apply_rope(k, rope, 0, half)[0, :, 0]
        np.testing.assert_allclose(qr[at(1, 1)] @ kr[at(2, 3)], qr[at(3, 2)] @ kr[at(4, 4)], rtol=1e-4)
        assert abs(float(qr[at(1, 1)] @ kr[at(2, 3)] - qr[at(1, 1)] @ kr[at(3, 2)])) > 1e-3, kind
    sin, cos = rope_sin_cos((5, 6), 8)
    prefixed = apply_rope(jnp.concatenate([q[:, :2], q], 1), (sin, cos), 2)
    np.testing.assert_array_equal(prefixed[:, :2], q[:, :2])  # prefix tokens are not rotated
    half, _ = rope_sin_cos((8, 8), 8, ref_grid=4)  # positions scaled to a 4 x 4 pretraining grid
    np.testing.assert_allclose(half[2 * 8 + 2], rope_sin_cos((4, 4), 8)[0][1 * 4 + 1], rtol=1e-6)


def test_cpu_config_trains_and_checks_its_options():
    model = create_model("eva02-tiny", rngs=nnx.Rngs(0), attn_impl="xla")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    loss = lambda m: jnp.mean(m(x) ** 2)  # noqa: E731
    grads = nnx.grad(loss)(model)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(nnx.state(grads)))
    assert float(jnp.abs(grads.blocks[0].attn.q_proj.kernel[...]).max()) > 0
    for bad, match in [(dict(dim=120), "divisible by 4"), (dict(glu_mlp=True, mlp_ratio=4.0), "not EVA-02 options"),
                       (dict(swiglu=False), "need swiglu=True"), (dict(rope_kind="2d"), "rope_kind"),
                       (dict(rope_ref_grid=0), "rope_ref_grid")]:
        with pytest.raises(ValueError, match=match):
            create_model("eva02-tiny", rngs=nnx.Rngs(0), **bad)
    with pytest.raises(ValueError, match="not supported by jaxattn's EVA-02"):
        config_from_hf({"architecture": "eva02_base_patch14_224", "model_args": {"scale_attn_inner": True}})


def test_pallas_matches_xla_and_lowers_for_cuda():
    """The rotated q / k through the Pallas flash kernel (interpret mode) = the XLA path; lowers for CUDA."""
    from conftest import count_triton_calls, lower_for_cuda
    from jaxattn.pallas._common import compile_for_gpu

    cfg = EvaConfig(image_size=16, patch_size=4, num_classes=3, dim=64, depth=1, heads=2, reg_tokens=1,
                    rope_kind="dinov3", rope_half=True, layer_scale=0.5, attn_impl="pallas")
    pallas = Eva(cfg, rngs=nnx.Rngs(0))
    xla = Eva(dataclasses.replace(cfg, attn_impl="xla"), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    np.testing.assert_allclose(pallas(x), xla(x), atol=2e-5, rtol=2e-5)
    graph, state = nnx.split(pallas)
    with compile_for_gpu():  # (the GPU kernels, not interpret mode)
        assert count_triton_calls(lower_for_cuda(lambda s, x: nnx.merge(graph, s)(x), state, x)) == 1


@pytest.mark.parametrize("options", [dict(qkv_split=False, mlp_norm=False, rope_ref_grid=None),
                                     dict(rope_kind="dinov3", rope_half=True, abs_pos_embed=False, reg_tokens=2,
                                          layer_scale=0.5, norm_eps=1e-5, swiglu=False, mlp_norm=False, mlp_act="gelu",
                                          qkv_split=False, qkv_bias=False, fc_norm=False, rope_ref_grid=None)],
                         ids=["eva02", "dinov3"])
def test_export_round_trip(tmp_path, options):
    """save_pretrained(Eva): our loader gives the same logits; with timm installed, timm.create_model(
    architecture, **model_args) with its weights too."""
    cfg = EvaConfig(image_size=28, patch_size=7, num_classes=3, dim=32, depth=2, heads=2, attn_impl="xla", **options)
    check_timm_export(Eva(cfg, rngs=nnx.Rngs(3)), tmp_path, 28)


@pytest.mark.parametrize("arch,size", [("eva02_tiny_patch14_224", 56), ("eva02_base_patch14_224", 42),
                                       ("vit_small_patch16_dinov3_qkvb", 48), ("vit_small_plus_patch16_dinov3", 48)])
def test_matches_timm(tmp_path, arch, size):
    check_timm_folder_matches_timm(tmp_path, arch, size, ("bias", "norm.weight", "gamma_1", "gamma_2", "_token"),
                                   depth=2, img_size=size, **({"mlp_ratio": 3.1} if "plus" in arch else {}))


def test_architecture_table_matches_timm():
    """Every timm EVA-02 architecture eva_arch_args accepts builds (torch's meta device) what our config describes."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from jaxattn.models.timm_hub import _eva_config

    names = [n for n in timm.list_models(["eva02_*", "vit_*dinov3*"]) if eva_arch_args(n) is not None]
    assert len(names) == 8 + 12, names
    for n in names:
        with torch.device("meta"):
            m = timm.create_model(n)
        c, blk = _eva_config(eva_arch_args(n), 1000, 3, None), m.blocks[0]
        got = (m.embed_dim, len(m.blocks), blk.attn.num_heads, blk.attn.qkv is None, type(blk.mlp).__name__,
               m.patch_embed.patch_size[0], m.patch_embed.img_size[0], type(m.rope).__name__,
               getattr(m.rope, "ref_feat_shape", None), m.global_pool, type(m.fc_norm).__name__,
               math.isclose(m.rope.temperature, c.rope_temperature), m.rope.rotate_half, m.pos_embed is not None,
               0 if m.reg_token is None else m.reg_token.shape[1], blk.gamma_1 is not None, blk.norm1.eps,
               blk.attn.q_bias is not None, (blk.mlp.fc1_g if hasattr(blk.mlp, "fc1_g") else blk.mlp.fc1).out_features)
        want = (c.dim, c.depth, c.heads, c.qkv_split,
                "Mlp" if not c.swiglu else "SwiGLU" if c.mlp_norm or c.swiglu_align else "GluMlp", c.patch_size,
                c.image_size,
                "RotaryEmbeddingCat" if c.rope_kind == "eva" else "RotaryEmbeddingDinoV3",
                (c.rope_ref_grid,) * 2 if c.rope_kind == "eva" else None, "avg",
                "LayerNorm" if c.fc_norm else "Identity", True, c.rope_half, c.abs_pos_embed, c.reg_tokens,
                c.layer_scale is not None, c.norm_eps, not c.qkv_split and c.qkv_bias,
                c.mlp_dim if not c.swiglu else 2 * c.mlp_dim if not (c.mlp_norm or c.swiglu_align)
                else -(-c.mlp_dim // max(c.swiglu_align, 1)) * max(c.swiglu_align, 1))
        assert got == want, n
