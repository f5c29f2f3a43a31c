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
    prefix tokens with ``fc_norm`` or after ``norm``, ``head``. Also: ``AttentionRope`` (a bias on the keys too),
    ``scale_attn_inner`` (a LayerNorm on the heads' output), ``rope_grid_indexing='xy'`` and ``rope_grid_offset``,
    ``RotaryEmbeddingMixed`` (learned per block and head frequencies), ``norm_pre`` without a patch bias,
    class-token pooling and ``AttentionPoolLatent`` (``global_pool='map'``)."""
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
        + w.get("patch_embed.proj.bias", 0.0)
    prefix = [np.broadcast_to(w[t], (b,) + w[t].shape[1:]) for t in ("cls_token", "reg_token") if t in w]
    if args.get("no_embed_class"):
        x = np.concatenate(prefix + [x + w["pos_embed"]], 1)
    else:
        x = np.concatenate(prefix + [x], 1) + w.get("pos_embed", 0.0)
    if "norm_pre.weight" in w:
        x = ln(x, "norm_pre")
    npt = sum(t.shape[1] for t in prefix)
    n, dim = x.shape[1], x.shape[2]
    d = dim // heads
    nb = d // 4  # rotary embedding
    bands = 1.0 / args.get("rope_temperature", 10000.0) ** (np.arange(nb) / nb)
    xy = args.get("rope_grid_indexing") == "xy"  # coordinates (column, row) instead of (row, column)
    off = args.get("rope_grid_offset", 0.0)
    if args.get("rope_type") == "dinov3":  # periods temperature^(2i / (d/2)), centred coordinates in [-1, 1]
        t = [(np.arange(0.5, s) / s) * 2 - 1 for s in grid]
        bands = 2 * math.pi * bands
    elif args.get("rope_type") == "mixed":  # plain indices; learned frequencies below
        t = [np.arange(s, dtype=np.float64) for s in grid]
    else:
        ref = args.get("ref_feat_shape") or grid  # (none: the indices themselves)
        t = [(np.arange(s) + off) / s * r for s, r in zip(grid, ref)]
    coords = np.stack(np.meshgrid(*t, indexing="ij"), -1).reshape(-1, 2)  # (row, column) per patch
    coords = coords[:, ::-1] if xy else coords
    half = args.get("rope_rotate_half", False)
    layout = (lambda a: np.concatenate([a, a], -1)) if half else (lambda a: np.repeat(a, 2, -1))  # noqa: E731
    if args.get("rope_type") == "mixed":  # angle = x fx + y fy, per block and head: [depth, heads, N, d / 2]
        f = w["rope.freqs"]
        pos = coords[:, 0, None] * f[0][:, :, None] + coords[:, 1, None] * f[1][:, :, None]
    else:
        pos = (coords[..., None] * bands).reshape(-1, 2 * nb)[None, None]
    tables = [(layout(np.sin(pos[min(i, len(pos) - 1)])), layout(np.cos(pos[min(i, len(pos) - 1)])))
              for i in range(args["depth"])]

    def rope(z, sin, cos):  # [b, heads, n, d]: the prefix tokens kept
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
        bias = lambda k: g(k) if has(k) else 0.0  # noqa: E731
        if has("attn.qkv.weight"):  # EvaAttention: q_bias / v_bias; AttentionRope: the qkv linear's own bias
            qkv_b = np.concatenate([g("attn.q_bias"), np.zeros(dim), g("attn.v_bias")]) if has("attn.q_bias") \
                else bias("attn.qkv.bias")
            q, k, v = (split(y) for y in np.split(h @ g("attn.qkv.weight").T + qkv_b, 3, -1))
        else:
            q = split(h @ g("attn.q_proj.weight").T + bias("attn.q_proj.bias"))
            k = split(h @ g("attn.k_proj.weight").T + bias("attn.k_proj.bias"))
            v = split(h @ g("attn.v_proj.weight").T + bias("attn.v_proj.bias"))
        q, k = rope(q, *tables[i]), rope(k, *tables[i])
        s = q @ k.transpose(0, 1, 3, 2) * d ** -0.5
        a = np.exp(s - s.max(-1, keepdims=True))
        o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
        if has("attn.norm.weight"):  # scale_attn_inner
            o = ln(o, f"blocks.{i}.attn.norm")
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
    if "norm.weight" in w:
        x = ln(x, "norm")
    pool = args.get("global_pool", "avg")
    if pool == "map":  # AttentionPoolLatent: a latent query over every token, then a GELU MLP residual
        ph = args.get("attn_pool_num_heads") or heads
        pd = dim // ph
        q = (w["attn_pool.latent"] @ w["attn_pool.q.weight"].T + w["attn_pool.q.bias"]).reshape(1, 1, ph, pd)
        kv = (x @ w["attn_pool.kv.weight"].T + w["attn_pool.kv.bias"]).reshape(b, n, 2, ph, pd)
        s = np.einsum("qhd,bkhd->bhqk", q[0], kv[:, :, 0]) * pd ** -0.5
        a = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bhqk,bkhd->bqhd", a / a.sum(-1, keepdims=True), kv[:, :, 1]).reshape(b, dim)
        o = o @ w["attn_pool.proj.weight"].T + w["attn_pool.proj.bias"]
        hdn = gelu(ln(o, "attn_pool.norm") @ w["attn_pool.mlp.fc1.weight"].T + w["attn_pool.mlp.fc1.bias"])
        x = o + hdn @ w["attn_pool.mlp.fc2.weight"].T + w["attn_pool.mlp.fc2.bias"]
    elif pool == "token":
        x = x[:, 0]
    else:
        x = x[:, npt:].mean(1)
    if "fc_norm.weight" in w:
        x = ln(x, "fc_norm")
    return x @ w["head.weight"].T + w["head.bias"]


SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 5}


@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3", "eva02_base_patch16_clip_224",
                                  "vit_medium_patch16_rope_reg1_gap_256", "vit_small_patch16_rope_mixed_ape_224",
                                  "vit_pe_core_tiny_patch16_384", "vit_pe_spatial_tiny_patch16_512",
                                  *(pytest.param(a, marks=pytest.mark.slow) for a in [  # (their options overlap)
                                      "vit_pe_lang_large_patch14_448",
                                      "eva02_base_patch14_224", "vit_base_patch16_dinov3_qkvb",
                                      "vit_small_plus_patch16_dinov3", "vit_small_patch16_rope_224",
                                      "vit_pe_core_gigantic_patch14_448"])])
def test_folder_matches_numpy_timm(tmp_path, arch):
    """A timm folder of each layout loads (hf.load_pretrained) and matches timm's forward in float64 numpy;
    biases, norms, layer scales, prefix tokens and the SwiGLU gates are randomised so that each one counts."""
    size = 4 * eva_arch_args(arch)["patch_size"]  # a 4 x 4 grid
    small = {**SMALL, "img_size": size, **({"mlp_ratio": 3.1} if "plus" in arch else {})}  # (198 -> 200 wide)
    raw = {"architecture": arch + ".some_tag", "num_classes": 5, "model_args": small,
           "pretrained_cfg": {**PRE, "input_size": [3, size, size]}}
    cfg = config_from_hf(raw, attn_impl="xla")
    assert isinstance(cfg, EvaConfig) and cfg.qkv_split == arch.startswith("eva02_base") == cfg.mlp_norm
    rng = np.random.default_rng(0)
    noisy = ("bias", "norm.weight", "fc1_g.weight", "fc1.weight", "head.weight", "gamma_1", "gamma_2", "token",
             "latent", "attn.proj.weight", "qkv.weight", "q_proj.weight", "k_proj.weight", "kv.weight",
             "pos_embed")  # (attention made to matter)
    sd = {k: (v + rng.normal(0, 0.5 if k.endswith(noisy[:8]) else 0.2, v.shape)).astype(np.float32)
          if k.endswith(noisy) else v for k, v in to_timm_state_dict(Eva(cfg, rngs=nnx.Rngs(1))).items()}
    rope_attn = cfg.attn_type == "rope"
    assert ("blocks.0.attn.q_bias" in sd) == (not cfg.qkv_split and cfg.qkv_bias and not rope_attn)
    assert ("blocks.0.attn.qkv.bias" in sd) == rope_attn and "blocks.0.attn.k_proj.bias" not in sd
    assert ("pos_embed" in sd) == ("eva02" in arch or "ape" in arch or "_pe_" in arch)
    assert ("rope.freqs" in sd) == ("mixed" in arch) and ("attn_pool.latent" in sd) == ("pe_core" in arch)
    assert ("blocks.1.attn.norm.weight" in sd) == ("clip" in arch) and ("norm_pre.weight" in sd) == ("_pe_" in arch)
    tower = "pe_lang" in arch or "pe_spatial" in arch  # (no norm after the blocks at all)
    assert ("norm.weight" in sd or "fc_norm.weight" in sd) != tower and cfg.final_norm != tower
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


@pytest.mark.slow
def test_cpu_config_trains():
    model = create_model("eva02-tiny", rngs=nnx.Rngs(0), attn_impl="xla")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    loss = lambda m: jnp.mean(m(x) ** 2)  # noqa: E731
    grads = nnx.grad(loss)(model)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(nnx.state(grads)))
    assert float(jnp.abs(grads.blocks[0].attn.q_proj.kernel[...]).max()) > 0


def test_cpu_config_checks_its_options():
    for bad, match in [(dict(dim=120), "divisible by 4"), (dict(glu_mlp=True, mlp_ratio=4.0), "not EVA-02 options"),
                       (dict(swiglu=False), "need swiglu=True"), (dict(rope_kind="2d"), "rope_kind"),
                       (dict(rope_ref_grid=0), "rope_ref_grid")]:
        with pytest.raises(ValueError, match=match):
            create_model("eva02-tiny", rngs=nnx.Rngs(0), **bad)
    for args in ({"use_post_norm": True}, {"attn_type": "diff"}, {"rope_grid_indexing": "yx"}, {"gated_attn": True},
                 {"rope_type": "mixed", "rope_grid_offset": 1.0}, {"rope_type": "mrope"}):
        with pytest.raises(ValueError, match="not supported by jaxattn's EVA-02"):
            config_from_hf({"architecture": "eva02_base_patch14_224", "model_args": args})


MIXED = EvaConfig(image_size=16, patch_size=4, num_classes=3, dim=32, depth=2, heads=2, rope_kind="mixed",
                  rope_ref_grid=None, attn_type="rope", rope_xy=True, swiglu=False, mlp_norm=False, mlp_act="gelu",
                  pool="cls", fc_norm=False, attn_impl="xla")


@pytest.mark.slow
def test_mixed_rope_learns_its_frequencies():
    """RoPE-ViT's mixed embedding: one table per block and head from the learned rope.freqs (which get
    gradients); the intermediates see the same per-block tables."""
    cfg = MIXED
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain = Eva(cfg, rngs=nnx.Rngs(0))
    assert plain.rope.freqs.shape == (2, 2, 2, 8)  # (x, y; depth; heads; head_dim / 2)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(plain)
    assert float(jnp.abs(grads.rope.freqs[...]).max()) > 0
    last = plain.intermediates(x, 1, norm=True, return_prefix_tokens=True)[0]
    np.testing.assert_allclose(plain.head(last[1][:, 0]), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mixed_rope_remats():
    """Activation checkpointing with per-block rotary tables gives the same loss and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain, remat = Eva(MIXED, rngs=nnx.Rngs(0)), Eva(dataclasses.replace(MIXED, remat=True), rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    (l1, g1), (l2, g2) = nnx.value_and_grad(loss)(plain), nnx.value_and_grad(loss)(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(g1.rope.freqs[...], g2.rope.freqs[...], rtol=1e-5, atol=1e-7)


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
                                          qkv_split=False, qkv_bias=False, fc_norm=False, rope_ref_grid=None),
                                     dict(attn_type="rope", rope_xy=True, rope_offset=1.0, pre_norm=True, pool="map",
                                          pool_heads=4, pool_mlp_ratio=2.0, pool_act="gelu", pool_include_prefix=True,
                                          swiglu=False, mlp_norm=False, mlp_act="gelu", qkv_split=False, norm_eps=1e-5,
                                          fc_norm=False, rope_ref_grid=3),
                                     dict(attn_type="rope", rope_kind="mixed", rope_xy=True, rope_temperature=10.0,
                                          layer_scale=0.1, swiglu=False, mlp_norm=False, mlp_act="gelu", pool="cls",
                                          qkv_split=False, fc_norm=False, rope_ref_grid=None, abs_pos_embed=False),
                                     dict(attn_norm=True, pool="cls", fc_norm=False),
                                     dict(attn_type="rope", rope_xy=True, rope_offset=1.0, pre_norm=True, swiglu=False,
                                          mlp_norm=False, mlp_act="gelu", qkv_split=False, norm_eps=1e-5, fc_norm=False,
                                          final_norm=False, rope_ref_grid=3)],
                         ids=["eva02", "dinov3", "pe-core", "rope-vit-mixed", "eva02-clip", "pe-spatial"])
def test_export_round_trip(tmp_path, options):
    """save_pretrained(Eva): our loader gives the same logits; with timm installed, timm.create_model(
    architecture, **model_args) with its weights too."""
    cfg = EvaConfig(image_size=28, patch_size=7, num_classes=3, dim=32, depth=2, heads=2, attn_impl="xla", **options)
    check_timm_export(Eva(cfg, rngs=nnx.Rngs(3)), tmp_path, 28)


@pytest.mark.parametrize("arch,size", [("eva02_tiny_patch14_224", 56), ("eva02_base_patch14_224", 42),
                                       ("vit_small_patch16_dinov3_qkvb", 48), ("vit_small_plus_patch16_dinov3", 48),
                                       ("eva02_base_patch16_clip_224", 48), ("vit_medium_patch16_rope_reg1_gap_256", 48),
                                       ("vit_small_patch16_rope_mixed_224", 48), ("vit_small_patch16_rope_ape_224", 48),
                                       ("vit_pe_core_tiny_patch16_384", 48), ("vit_pe_spatial_tiny_patch16_512", 48),
                                       ("vit_pe_lang_large_patch14_448", 42)])
def test_matches_timm(tmp_path, arch, size):
    check_timm_folder_matches_timm(tmp_path, arch, size, ("bias", "norm.weight", "gamma_1", "gamma_2", "_token",
                                                          "latent", "pos_embed"),
                                   depth=2, img_size=size, **({"mlp_ratio": 3.1} if "plus" in arch else {}))


def test_architecture_table_matches_timm():
    """Every timm EVA-02 architecture eva_arch_args accepts builds (torch's meta device) what our config describes."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from jaxattn.models.timm_hub import _eva_config

    names = [n for n in timm.list_models(["eva02_*", "vit_*dinov3*", "vit_*rope*", "vit_pe_*"])
             if eva_arch_args(n) is not None]
    # EVA-02, DINOv3, EVA-02 CLIP, SBB, RoPE-ViT, PE core, PE lang and spatial
    assert len(names) == 8 + 12 + 3 + 4 + 12 + 5 + 7, names
    for n in names:
        with torch.device("meta"):
            m = timm.create_model(n)
        c, blk = _eva_config(eva_arch_args(n), 1000, 3, None), m.blocks[0]
        got = (m.embed_dim, len(m.blocks), blk.attn.num_heads, blk.attn.qkv is None, type(blk.mlp).__name__,
               m.patch_embed.patch_size[0], m.patch_embed.img_size[0], type(m.rope).__name__,
               getattr(m.rope, "ref_feat_shape", None), m.global_pool, type(m.fc_norm).__name__,
               math.isclose(m.rope.temperature, c.rope_temperature), getattr(m.rope, "rotate_half", False),
               m.pos_embed is not None, 0 if m.reg_token is None else m.reg_token.shape[1], blk.gamma_1 is not None,
               blk.norm1.eps, getattr(blk.attn, "q_bias", None) is not None,
               (blk.mlp.fc1_g if hasattr(blk.mlp, "fc1_g") else blk.mlp.fc1).out_features,
               type(blk.attn).__name__, getattr(m.rope, "grid_indexing", "ij"), float(getattr(m.rope, "grid_offset", 0.0)),
               type(blk.attn.norm).__name__, type(m.norm_pre).__name__, m.cls_token is not None,
               None if m.attn_pool is None else (m.attn_pool.num_heads, m.attn_pool.mlp.fc1.out_features),
               type(m.norm).__name__)
        want = (c.dim, c.depth, c.heads, c.qkv_split,
                "Mlp" if not c.swiglu else "SwiGLU" if c.mlp_norm or c.swiglu_align else "GluMlp", c.patch_size,
                c.image_size,
                {"eva": "RotaryEmbeddingCat", "dinov3": "RotaryEmbeddingDinoV3", "mixed": "RotaryEmbeddingMixed"}[c.rope_kind],
                None if c.rope_ref_grid is None else (c.rope_ref_grid,) * 2,
                {"cls": "token", "mean": "avg", "map": "map"}[c.pool],
                "LayerNorm" if c.fc_norm else "Identity", True, c.rope_half, c.abs_pos_embed, c.reg_tokens,
                c.layer_scale is not None, c.norm_eps, not c.qkv_split and c.qkv_bias and c.attn_type == "eva",
                c.mlp_dim if not c.swiglu else 2 * c.mlp_dim if not (c.mlp_norm or c.swiglu_align)
                else -(-c.mlp_dim // max(c.swiglu_align, 1)) * max(c.swiglu_align, 1),
                "AttentionRope" if c.attn_type == "rope" else "EvaAttention", "xy" if c.rope_xy else "ij",
                c.rope_offset, "LayerNorm" if c.attn_norm else "Identity", "LayerNorm" if c.pre_norm else "Identity",
                c.has_class_token, None if c.pool != "map" else (c.pool_heads or c.heads,
                                                                 int(c.dim * (c.pool_mlp_ratio or c.mlp_ratio))),
                "LayerNorm" if c.final_norm and not c.fc_norm else "Identity")
        assert got == want, n
