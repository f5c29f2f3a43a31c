"""ViT (Flax NNX): shapes, attention weights vs an independent numpy oracle, pallas vs xla, bf16,
input errors, registry entries, dropout/drop-path modes, timm key layout, and a jitted grad step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import MODEL_CONFIGS, ViT, ViTConfig, create_model
from jaxattn.models.vit import load_timm_state_dict, to_timm_state_dict

TINY = ViTConfig(image_size=8, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2, heads=2,
                 attn_impl="xla")


def _images(cfg: ViTConfig, batch: int = 2, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, cfg.image_size, cfg.image_size, cfg.in_channels))


def _params(model: nnx.Module) -> dict:
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def _randomize_biases(model: nnx.Module, seed: int = 0) -> None:
    """Zero-init biases / unit LayerNorm scales would hide bugs: make every 1-D parameter random."""
    rng = np.random.default_rng(seed)
    for _, v in _params(model):
        if v.ndim == 1:
            v[...] = jnp.asarray(rng.standard_normal(v.shape) * 0.3 + (v[...] if v[...].any() else 0.0), v.dtype)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes(pool):
    cfg = dataclasses.replace(TINY, pool=pool)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    x = _images(cfg)
    n = 4 + (pool == "cls")
    assert cfg.num_tokens == n
    assert model.pos_embed.shape == (1, n, 32)
    assert (model.cls_token is None) == (pool == "mean")
    logits = model(x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert model.features(x).shape == (2, n, 32)
    assert model.pool_features(x).shape == (2, 32)
    if pool == "mean":
        np.testing.assert_allclose(model.pool_features(x), model.features(x).mean(1), atol=1e-6)
    # no head: pooled features; a fresh head via reset_classifier
    assert ViT(dataclasses.replace(cfg, num_classes=0), rngs=nnx.Rngs(0))(x).shape == (2, 32)
    model.reset_classifier(7, rngs=nnx.Rngs(1))
    assert model(x).shape == (2, 7) and model.cfg.num_classes == 7
    model.reset_classifier(0, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(model(x), model.pool_features(x))


def test_intermediates():
    """Block outputs (timm's forward_intermediates): the last one normalised is features(); earlier ones are the
    block chain's own outputs; index forms and layouts; errors name the argument."""
    cfg = dataclasses.replace(TINY, image_size=12, depth=3, reg_tokens=2)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    _randomize_biases(model)
    x = _images(cfg)
    (last, prefix), = model.intermediates(x, 1, norm=True, return_prefix_tokens=True)
    tokens = model.features(x)
    assert last.shape == (2, 3, 3, 32) and prefix.shape == (2, 3, 32)
    np.testing.assert_allclose(last.reshape(2, 9, 32), tokens[:, 3:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prefix, tokens[:, :3], rtol=1e-6, atol=1e-6)
    h = model._embed(x)
    chain = []
    for block in model.blocks:
        h = block(h)
        chain.append(h[:, 3:])
    got = model.intermediates(x, [-1, 0], output_fmt="NLC")  # block order, not normalised
    assert len(got) == 2 and got[0].shape == (2, 9, 32)
    for g, want in zip(got, [chain[0], chain[2]]):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)
    assert len(model.intermediates(x)) == 3
    for bad, match in [(dict(indices=4), "1 <= n <= depth 3"), (dict(indices=[3]), r"\[-3, 3\)"),
                       (dict(output_fmt="NCHW"), "output_fmt")]:
        with pytest.raises(ValueError, match=match):
            model.intermediates(x, **bad)


def test_timm_architecture_names_build_fresh_models():
    from jaxattn.models.registry import check_model_kind, model_config

    cfg = model_config("vit_so400m_patch14_siglip_384.webli")  # (the tag is ignored)
    assert (cfg.dim, cfg.depth, cfg.pool, cfg.image_size, cfg.grid) == (1152, 27, "map", 384, 27)
    m = create_model("vit_base_patch16_siglip_224", rngs=nnx.Rngs(0), depth=1, dim=64, heads=4, image_size=32,
                     num_classes=3, attn_impl="xla")
    assert m.attn_pool is not None and not m.cfg.has_class_token and m(jnp.zeros((1, 32, 32, 3))).shape == (1, 3)
    check_model_kind("deit3_small_patch16_224", "image")
    with pytest.raises(ValueError, match="is an image model"):
        check_model_kind("vit_small_patch16_224", "lm")
    with pytest.raises(ValueError, match="a timm ViT architecture"):
        create_model("vit_nonexistent_patch16_224", rngs=nnx.Rngs(0))


def test_prefix_tokens_and_layer_scale():
    """Registers and a class token before the patches (position embedding on the patches only), mean
    pooling over the patches alone, fc_norm after it; attention maps cover every token; LayerScale
    at its initial value scales each branch (an initial scale of 1 is the plain block)."""
    cfg = dataclasses.replace(TINY, pool="mean", class_token=True, reg_tokens=2, no_embed_class=True, fc_norm=True,
                              layer_scale=1.0, attn_impl="xla")
    assert (cfg.num_prefix_tokens, cfg.num_tokens, cfg.pos_embed_len) == (3, 7, 4)
    model = ViT(cfg, rngs=nnx.Rngs(0))
    model.eval()
    x = _images(cfg)
    assert model.pos_embed.shape == (1, 4, 32) and model.reg_token.shape == (1, 2, 32) and model.norm is None
    tokens = model.features(x)
    assert tokens.shape == (2, 7, 32)
    pooled = model.fc_norm(tokens[:, 3:].mean(1))
    np.testing.assert_allclose(model.pool_features(x), pooled, atol=1e-6)
    logits, weights = model(x, return_attention=True)
    assert weights[0].shape == (2, 2, 7, 7)
    plain = ViT(dataclasses.replace(cfg, layer_scale=None), rngs=nnx.Rngs(0))
    plain.eval()
    np.testing.assert_allclose(plain(x), logits, atol=1e-6)  # same draws; gamma = 1
    for blk in model.blocks:
        blk.ls1.gamma[...] = jnp.zeros_like(blk.ls1.gamma[...])
        blk.ls2.gamma[...] = jnp.zeros_like(blk.ls2.gamma[...])
    dyn = ViT(dataclasses.replace(cfg, dynamic_img_size=True), rngs=nnx.Rngs(0))  # (same draws as `model`'s)
    dyn.eval()
    ref = ViT(cfg, rngs=nnx.Rngs(0))
    ref.eval()
    np.testing.assert_array_equal(dyn(x), ref(x))
    wide = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 16, 3))  # 2 x 4 patches: the 2 x 2 grid resampled
    assert dyn(wide).shape == (2, 5) and np.isfinite(np.asarray(dyn(wide))).all()
    with pytest.raises(ValueError, match="images must be 8x8"):
        model(wide)
    gone = model.features(x)  # zero scales: the blocks add nothing
    prefix = jnp.concatenate([model.cls_token[...], model.reg_token[...]], 1)
    embedded = jnp.concatenate([jnp.broadcast_to(prefix, (2, 3, 32)), model.patch_embed(x) + model.pos_embed[...]], 1)
    np.testing.assert_allclose(gone, embedded, atol=1e-6)


def test_attention_weights_and_logits_unchanged():
    model = ViT(TINY, rngs=nnx.Rngs(0))
    x = _images(TINY)
    logits, weights = model(x, return_attention=True)
    assert len(weights) == TINY.depth
    for w in weights:
        assert w.shape == (2, 2, 5, 5) and w.dtype == jnp.float32
        assert float(w.min()) >= 0.0
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(logits, model(x))


def test_attention_matches_numpy_oracle():
    """A layer's output and weights vs softmax(Q K^T / sqrt(d)) V @ W_proj + b written in float64 numpy
    from the stored qkv / proj arrays."""
    model = ViT(TINY, rngs=nnx.Rngs(0))
    _randomize_biases(model)
    attn = model.blocks[1].attn
    x = np.random.default_rng(3).standard_normal((2, 5, 32)).astype(np.float32)
    out, w = attn(jnp.asarray(x), return_attention=True)

    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    qkv = x.astype(np.float64) @ f64(attn.qkv.kernel) + f64(attn.qkv.bias)  # [B, N, 3 * dim]
    qkv = qkv.reshape(2, 5, 3, 2, 16)  # timm's [3, heads, head_dim] channel order
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, H, N, d]
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(16)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(2, 5, 32)
    want = o @ f64(attn.proj.kernel) + f64(attn.proj.bias)
    np.testing.assert_allclose(np.asarray(w), p, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, dict(pool="map", qk_norm=True, glu_mlp=True, mlp_act="silu")],
                         ids=["plain", "map-qknorm-glu"])
def test_pallas_matches_xla(options):
    """Pallas flash kernel (interpret mode on CPU; head_dim 32) vs the XLA path, same parameters; the
    options' paths (qk-normed q / k, attention pooling's one-query cross attention) run the kernel and lower
    for CUDA too."""
    cfg = dataclasses.replace(TINY, heads=1, depth=1, attn_impl="pallas", **options)
    pallas = ViT(cfg, rngs=nnx.Rngs(0))
    xla = ViT(dataclasses.replace(cfg, attn_impl="xla"), rngs=nnx.Rngs(0))
    _randomize_biases(pallas)
    nnx.update(xla, nnx.state(pallas, nnx.Param))
    x = _images(cfg)
    np.testing.assert_allclose(pallas(x), xla(x), atol=2e-5, rtol=2e-5)
    if options:
        from conftest import count_triton_calls, lower_for_cuda
        from jaxattn.pallas._common import compile_for_gpu

        graph, state = nnx.split(pallas)
        with compile_for_gpu():  # (the GPU kernels, not interpret mode)
            text = lower_for_cuda(lambda s, x: nnx.merge(graph, s)(x), state, x)
        assert count_triton_calls(text) == 2  # the block's attention and the pooling's


def test_bf16_compute_fp32_params():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    model = ViT(cfg, rngs=nnx.Rngs(0))
    ref = ViT(TINY, rngs=nnx.Rngs(0))
    assert all(v.dtype == jnp.float32 for _, v in _params(model))
    x = _images(cfg)
    logits, weights = model(x, return_attention=True)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert model.features(x).dtype == jnp.bfloat16
    np.testing.assert_allclose(weights[0].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(logits, ref(x), atol=5e-2, rtol=5e-2)


def test_image_size_not_divisible_by_the_patch_drops_the_remainder():
    """As timm (vit_so400m_patch14_siglip_384: 384 px, 14 px patches): the last rows and columns are dropped."""
    m8 = ViT(TINY, rngs=nnx.Rngs(0))
    m10 = ViT(dataclasses.replace(TINY, image_size=10), rngs=nnx.Rngs(0))
    assert m10.cfg.grid == 2 and m10.pos_embed.shape == m8.pos_embed.shape
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 3))
    np.testing.assert_array_equal(m10(x), m8(x[:, :8, :8]))
    with pytest.raises(ValueError, match=r"images must be 10x10"):
        m10(x[:, :8, :8])


def test_input_errors():
    model = ViT(TINY, rngs=nnx.Rngs(0))
    bad = [
        (jnp.zeros((2, 12, 12, 3)), r"images must be 8x8 .*\[batch, 8, 8, 3\].*\(2, 12, 12, 3\)"),
        (jnp.zeros((8, 8, 3)), r"images must have rank 4 \[batch, 8, 8, 3\].*\(8, 8, 3\)"),
        (jnp.zeros((2, 8, 8, 1)), r"images must have 3 channels.*\(2, 8, 8, 1\)"),
        (jnp.zeros((2, 8, 8, 3), jnp.uint8), r"floating point.*uint8"),
        ([[0.0]], r"images must be an array"),
    ]
    for x, msg in bad:
        with pytest.raises(ValueError, match=msg):
            model(x)
    with pytest.raises(ValueError, match=r"divisible by patch_size 4.*\(2, 10, 10, 3\)"):  # another size: whole patches
        ViT(dataclasses.replace(TINY, dynamic_img_size=True), rngs=nnx.Rngs(0))(jnp.zeros((2, 10, 10, 3)))
    with pytest.raises(ValueError, match="image_size 3 must be >= patch_size 4"):
        dataclasses.replace(TINY, image_size=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        dataclasses.replace(TINY, heads=3)
    with pytest.raises(ValueError, match="pool must be"):
        dataclasses.replace(TINY, pool="max")
    with pytest.raises(ValueError, match="attn_impl"):
        dataclasses.replace(TINY, attn_impl="cuda")
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(TINY, dtype="int32")
    for bad, msg in [(dict(class_token=False), "pool='cls' needs the class token"),
                     (dict(reg_tokens=-1), "reg_tokens must be >= 0"), (dict(layer_scale=0.0), "layer_scale")]:
        with pytest.raises(ValueError, match=msg):
            dataclasses.replace(TINY, **bad)
    with pytest.raises(ValueError, match="bad override"):
        create_model("vit-tiny", rngs=nnx.Rngs(0), vocab_size=3)


def test_registry():
    """The image trainer's call; paper sizes built abstractly (no memory) with timm's parameter counts."""
    cfg = MODEL_CONFIGS["vit-tiny"]
    assert (cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.num_classes) == (32, 4, 1, 10)
    m = nnx.eval_shape(lambda: create_model("vit-tiny", rngs=nnx.Rngs(0), num_classes=3, image_size=16,
                                            in_channels=3, dtype="bfloat16", attn_impl="xla", pool=None))
    assert isinstance(m, ViT)
    assert (m.cfg.num_classes, m.cfg.image_size, m.cfg.in_channels, m.cfg.dtype, m.cfg.attn_impl, m.cfg.pool) == \
        (3, 16, 3, "bfloat16", "xla", "cls")
    assert m.pos_embed.shape == (1, 17, cfg.dim) and m.head.kernel.shape == (cfg.dim, 3)
    out = jax.eval_shape(lambda x: create_model("vit-tiny", rngs=nnx.Rngs(0), num_classes=3, image_size=16,
                                                in_channels=3, dtype="bfloat16")(x),
                         jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    timm_counts = {"vit-ti16": (192, 3, 5_717_416), "vit-s16": (384, 6, 22_050_664),
                   "vit-b16": (768, 12, 86_567_656)}
    for name, (dim, heads, count) in timm_counts.items():
        c = MODEL_CONFIGS[name]
        assert (c.dim, c.depth, c.heads, c.patch_size, c.image_size, c.num_classes) == (dim, 12, heads, 16, 224, 1000)
        m = nnx.eval_shape(lambda n=name: create_model(n, rngs=nnx.Rngs(0)))
        assert sum(int(np.prod(v.shape)) for _, v in _params(m)) == count, name
    out = jax.eval_shape(lambda x: create_model("vit-b16", rngs=nnx.Rngs(0))(x),
                         jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert out.shape == (1, 1000)


def test_dropout_modes():
    """Dropout / drop-path are random in train mode and off in eval mode (= the same model without them)."""
    cfg = dataclasses.replace(TINY, dropout=0.2, drop_path=0.3, attn_drop=0.25)
    model = ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    plain = ViT(TINY, rngs=nnx.Rngs(params=0))
    assert model.blocks[0].drop_path is None and model.blocks[1].drop_path.rate == pytest.approx(0.3)
    x = _images(cfg)
    assert not np.allclose(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    np.testing.assert_allclose(model(x), plain(x), atol=1e-6)
    model.train()
    assert not np.allclose(model(x), plain(x))


# the kernel's dropout itself is tested against the oracle in test_flash_dropout.py
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_attention_dropout(impl):
    """attn_drop alone: random in train mode (fresh masks per call, gradients flow), the plain
    model in eval mode."""
    base = dataclasses.replace(TINY, dim=64, attn_impl=impl)  # head dim 32 (the kernel's smallest)
    cfg = dataclasses.replace(base, attn_drop=0.3)
    model = ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    plain = ViT(base, rngs=nnx.Rngs(params=0))
    x = _images(cfg)
    a, b = model(x), model(x)
    assert not np.allclose(a, b) and not np.allclose(a, plain(x))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    model.eval()
    np.testing.assert_allclose(model(x), plain(x), atol=1e-6)
    with pytest.raises(ValueError, match="attn_drop"):
        ViTConfig(attn_drop=1.0)


def test_timm_layout_roundtrip():
    model = ViT(TINY, rngs=nnx.Rngs(0))
    _randomize_biases(model)
    sd = to_timm_state_dict(model)
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"]
    want = {"cls_token": (1, 1, 32), "pos_embed": (1, 5, 32), "patch_embed.proj.weight": (32, 3, 4, 4),
            "patch_embed.proj.bias": (32,), "norm.weight": (32,), "norm.bias": (32,), "head.weight": (5, 32),
            "head.bias": (5,)}
    assert set(sd) == set(want) | {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    assert {k: sd[k].shape for k in want} == want
    assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32) and sd["blocks.1.mlp.fc1.weight"].shape == (128, 32)
    # the patch conv in timm's layout is a per-patch matmul on NCHW pixels
    x = _images(TINY)
    xp = np.asarray(x).transpose(0, 3, 1, 2)[:, :, :4, :4]  # NCHW, first patch
    emb = np.einsum("bchw,ochw->bo", xp, sd["patch_embed.proj.weight"]) + sd["patch_embed.proj.bias"]
    np.testing.assert_allclose(model.patch_embed(x)[:, 0], emb, atol=1e-5)
    other = ViT(TINY, rngs=nnx.Rngs(1))
    load_timm_state_dict(other, sd)
    np.testing.assert_array_equal(other(x), model(x))
    with pytest.raises(ValueError, match="missing"):
        load_timm_state_dict(other, {k: v for k, v in sd.items() if k != "head.bias"})


def test_jitted_grad_step_finite():
    cfg = dataclasses.replace(TINY, pool="mean", dropout=0.1, drop_path=0.1)
    model = ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    _randomize_biases(model)
    x, y = _images(cfg), jnp.array([0, 3])

    @nnx.jit
    def grad_step(model, x, y):
        def loss_fn(model):
            logits = model(x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = grad_step(model, x, y)
    assert np.isfinite(float(loss))
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(_params(model))
    for path, g in flat:
        g = np.asarray(g[...])
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path


def test_quantized_switch_agrees_with_full_precision():
    """``quantized=True`` routes attention through ``jaxattn.sage_attention`` (INT8 QK, FP8 PV):
    same weights, logits close to the unquantized model's."""
    import dataclasses

    from jaxattn.models.vit import ViT, ViTConfig

    cfg = ViTConfig(image_size=16, patch_size=4, in_channels=1, num_classes=5, dim=128, depth=2, heads=2,
                    attn_impl="xla", dtype="bfloat16")
    model = ViT(cfg, rngs=nnx.Rngs(0))
    quant = ViT(dataclasses.replace(cfg, quantized=True), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 1))
    a, b = np.asarray(model(x)), np.asarray(quant(x))
    assert not np.array_equal(a, b)  # the quantized path really ran
    cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos > 0.99, cos


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlp_recomputed_gelu_matches_plain_formula(dtype):
    """The MLP's first layer (``activated_linear``: GELU recomputed in the backward) gives
    ``fc2(gelu(fc1(x)))`` as nnx.Linear computes it, value and gradients (parameters and input),
    and its jaxpr recomputes (a checkpoint) instead of keeping GELU's intermediates."""
    from jaxattn.models.vit import MLP

    mlp = MLP(12, 40, dtype=dtype, rngs=nnx.Rngs(0))
    graph, params = nnx.split(mlp)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 12))

    def loss(params, x, plain):
        m = nnx.merge(graph, params)
        y = m.fc2(jax.nn.gelu(m.fc1(x), approximate=False)) if plain else m(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    got = jax.value_and_grad(loss, (0, 1))(params, x, False)
    want = jax.value_and_grad(loss, (0, 1))(params, x, True)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    jaxpr = str(jax.make_jaxpr(lambda p, x: loss(p, x, False))(params, x))
    assert "checkpoint" in jaxpr or "remat" in jaxpr, jaxpr


@pytest.mark.slow
def test_remat_same_loss_and_grads_with_dropout():
    """``ViTConfig(remat=True)`` recomputes each block in the backward: same loss and gradients in
    train mode (dropout, stochastic depth and attention dropout draw the same masks)."""
    from flax import nnx

    from jaxattn.models import create_model

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))
    out = []
    for remat in (False, True):
        m = create_model("vit-tiny", rngs=nnx.Rngs(0), remat=remat, dropout=0.1, drop_path=0.1, attn_drop=0.1,
                         attn_impl="xla")
        m.train()
        loss, g = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2)))(m)
        out.append((float(loss), jax.tree.leaves(nnx.state(g, nnx.Param))))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
