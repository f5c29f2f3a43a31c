"""HaloNet (Flax NNX): HaloAttn against a hand-written computation on the fp32 oracle, the
padding and downsampling paths, the registry's models, a jitted train step, weight conversion
and errors. timm parity itself is in test_timm_parity.py (needs torch + timm)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import assert_close
from jaxattn.models import (MODEL_CONFIGS, HaloAttn, HaloNetConfig, create_model, load_timm_state_dict,
                            to_timm_state_dict)
from jaxattn.models.halonet import param_count, timm_variables
from jaxattn.reference import halo as halo_ref

F32 = jnp.float32
_apply = nnx.jit(lambda m, x: m(x))  # one compile per model graph and input shape


@pytest.fixture(scope="module")
def tiny():
    """halonet-tiny as the image trainer builds it (built once: eager init compiles per shape)."""
    return create_model("halonet-tiny", rngs=nnx.Rngs(0), num_classes=10, image_size=32, in_channels=1,
                        dtype="float32", attn_impl="xla")


@partial(jax.jit, static_argnames=("heads", "dqk", "dv", "block", "halo", "stride", "avg_down", "spe"))
def _hand(x, wq, wkv, rel_h, rel_w, *, heads, dqk, dv, block, halo, stride, avg_down, spe):
    sub = 1 if avg_down else stride
    q = jnp.einsum("bhwc,cd->bhwd", x[:, ::sub, ::sub], wq, precision="highest")
    kv = jnp.einsum("bhwc,cd->bhwd", x, wkv, precision="highest")
    b, h, w, _ = kv.shape
    q = q.reshape(*q.shape[:3], heads, dqk)
    kv = kv.reshape(b, h, w, heads, dqk + dv)
    o = halo_ref.halo_reference(q, kv[..., :dqk], kv[..., dqk:], rel_h, rel_w, block_size=block,
                                halo_size=halo, stride=sub, scale_pos_embed=spe)
    o = o.reshape(*o.shape[:3], heads * dv)
    if avg_down:
        o = o.reshape(b, h // 2, 2, w // 2, 2, -1).mean(axis=(2, 4))
    return o


def _hand_halo_attn(layer: HaloAttn, x, *, stride, avg_down=False):
    """timm HaloAttn written out from the layer's raw weights: 1x1 convs as matmuls on the
    (subsampled) map, per-head [k | v] split of kv, the per-query oracle, head-major merge."""
    return _hand(x, layer.q.kernel[...][0, 0], layer.kv.kernel[...][0, 0], layer.pos_embed.height_rel[...],
                 layer.pos_embed.width_rel[...], heads=layer.num_heads, dqk=layer.dim_head_qk, dv=layer.dim_head_v,
                 block=layer.block_size, halo=layer.halo_size, stride=stride, avg_down=avg_down,
                 spe=layer.scale_pos_embed)


@pytest.mark.parametrize("stride,scale_pos_embed,avg_down", [(1, False, False), (2, True, False), (2, False, True)])
def test_halo_attn_matches_hand_written(stride, scale_pos_embed, avg_down):
    layer = HaloAttn(12, 16, stride=stride, num_heads=2, block_size=4, halo_size=1, scale_pos_embed=scale_pos_embed,
                     avg_down=avg_down, impl="xla", rngs=nnx.Rngs(0))
    assert layer.dim_head_qk == 8 and layer.dim_head_v == 8
    x = jax.random.normal(jax.random.key(1), (2, 8, 12, 12), F32)
    out = _apply(layer, x)
    assert out.shape == (2, 8 // stride, 12 // stride, 16)
    assert_close(out, _hand_halo_attn(layer, x, stride=stride, avg_down=avg_down), F32, "HaloAttn")


def test_halo_attn_qk_ratio_dim_head_and_odd_block_stride():
    # explicit dim_head; odd block with stride 2 falls back to average pooling (timm)
    layer = HaloAttn(8, 8, stride=2, num_heads=2, dim_head=4, block_size=3, halo_size=1, impl="xla", rngs=nnx.Rngs(0))
    assert layer.use_avg_pool and layer.block_stride == 1 and layer.dim_head_qk == 4
    x = jax.random.normal(jax.random.key(2), (1, 6, 6, 8), F32)
    assert_close(_apply(layer, x), _hand_halo_attn(layer, x, stride=2, avg_down=True), F32, "odd block")
    assert HaloAttn(16, qk_ratio=0.5, num_heads=2, rngs=nnx.Rngs(0)).dim_head_qk == 4


@pytest.mark.parametrize("stride,hw", [(1, (10, 6)), (2, (7, 9))])
def test_halo_attn_pads_non_multiple_sizes(stride, hw):
    """Sizes that are not block multiples: equal to running on the zero-padded map and cropping
    (without qkv bias, padded pixels project to zero q/k/v, like the halo border)."""
    layer = HaloAttn(8, 8, stride=stride, num_heads=2, block_size=4, halo_size=1, impl="xla", rngs=nnx.Rngs(0))
    h, w = hw
    x = jax.random.normal(jax.random.key(3), (2, h, w, 8), F32)
    out = _apply(layer, x)
    ho, wo = -(-h // stride), -(-w // stride)
    assert out.shape == (2, ho, wo, 8)
    hp, wp = -(-h // 4) * 4, -(-w // 4) * 4
    padded = _hand_halo_attn(layer, jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0))), stride=stride)
    assert_close(out, padded[:, :ho, :wo], F32, "padded")
    assert bool(jnp.isfinite(out).all())


def test_halo_attn_pallas_forward_tiny():
    """One tiny forward through the Pallas kernel (interpret mode on CPU)."""
    layer = HaloAttn(8, 8, num_heads=1, block_size=4, halo_size=1, impl="pallas", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 4, 8, 8), F32)
    assert_close(_apply(layer, x), _hand_halo_attn(layer, x, stride=1), F32, "pallas")


def test_halonet_tiny_eval_mode_and_shapes(tiny):
    model = nnx.clone(tiny)
    assert model.cfg.layout == ("b", "bh", "h") and param_count(model) < 400_000
    assert model.stem.conv1.bn.use_running_average is False  # NNX default: train mode
    model.eval()
    assert model.stem.conv1.bn.use_running_average is True
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 1), F32)
    mean = model.stem.conv1.bn.mean[...]
    e1, e2 = _apply(model, x), _apply(model, x.at[2:].set(0.0))
    assert e1.shape == (4, 10) and e1.dtype == F32 and bool(jnp.isfinite(e1).all())
    assert_close(e2[:2], e1[:2], F32, "eval is per-example")
    np.testing.assert_array_equal(model.stem.conv1.bn.mean[...], mean)  # running stats untouched
    model.train()
    assert model.stem.conv1.bn.use_running_average is False


def test_halonet_other_sizes_channels_and_bf16_abstract():
    # odd sizes and other channel counts (maps are padded to block multiples); bfloat16 compute
    for kw, shape, dt in (({"num_classes": 3, "in_channels": 3}, (1, 40, 24, 3), F32),
                          ({"dtype": "bfloat16"}, (2, 32, 32, 1), jnp.bfloat16)):
        m = nnx.eval_shape(lambda: create_model("halonet-tiny", rngs=nnx.Rngs(1), attn_impl="xla", **kw))
        out = nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct(shape, dt))
        assert out.shape == (shape[0], kw.get("num_classes", 10)) and out.dtype == F32


# Parameter counts: timm 1.0.x ``create_model`` for its models (exact); the paper's table (M, one
# decimal) for H0-H7 (H6 counts 43.46 M, the paper prints 43.4).
EXACT = {"halonet26t": 12_480_288, "sehalonet33ts": 13_691_712}
PAPER_M = {"halonet-h0": 5.5, "halonet-h1": 8.1, "halonet-h2": 9.4, "halonet-h3": 11.8, "halonet-h4": 19.1,
           "halonet-h5": 30.7, "halonet-h6": 43.4, "halonet-h7": 67.4}
# Abstract construction of the deep H models is slow under tracing (NNX's RNG counter updates
# scan the whole trace), so the fast run covers one model per code path.
_FAST = {"halonet26t", "sehalonet33ts", "halonet-h0", "halonet-h5"}


@pytest.mark.parametrize("name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in [*EXACT, *PAPER_M]])
def test_registry_builds_abstractly_with_published_param_counts(name):
    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0)))
    n = param_count(model)
    if name in EXACT:
        assert n == EXACT[name]
    else:
        assert abs(n / 1e6 - PAPER_M[name]) < 0.06, n
    keys = {k for k, _, _ in timm_variables(model)}
    if name == "sehalonet33ts":  # timm state_dict names (SE, final conv, strided halo block)
        assert {"stem.conv3.conv.weight", "stages.1.0.attn.fc1.weight", "stages.1.2.self_attn.kv.weight",
                "stages.3.0.self_attn.pos_embed.height_rel", "stages.3.0.post_attn.running_var",
                "final_conv.conv.weight", "head.fc.weight"} <= keys


@pytest.mark.parametrize("name,size", [("halonet-h0", 200),
                                       pytest.param("halonet-h3", 320, marks=pytest.mark.slow)])
def test_big_model_forward_shape_abstract(name, size):
    """200 px leaves H0's maps at 50 / 25 / 13 / 7 (block 8): every halo stage pads."""
    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), num_classes=5, attn_impl="xla"))
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, size, size, 3), F32))
    assert out.shape == (2, 5) and out.dtype == F32


@pytest.mark.slow
def test_jitted_train_step_has_finite_grads():
    # same shapes as the fixture, so init hits the compile cache; last-BN scales not zeroed so
    # the attention parameters get gradients on the first step
    model = create_model("halonet-tiny", rngs=nnx.Rngs(0), attn_impl="xla", zero_init_last=False)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(5), (8, 32, 32, 1), F32)
    y = jnp.arange(8) % 10

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    attn = model.stages[1][1].self_attn
    q0, mean0 = attn.q.kernel[...], model.stem.conv1.bn.mean[...]
    loss, grads = step(model, opt, x, y)  # train mode: batch statistics, running stats move
    assert not np.allclose(model.stem.conv1.bn.mean[...], mean0)
    assert bool(jnp.isfinite(loss)) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    g_attn = grads.stages[1][1].self_attn
    for g in (g_attn.q.kernel, g_attn.kv.kernel, g_attn.pos_embed.height_rel, g_attn.pos_embed.width_rel):
        assert float(jnp.abs(g[...]).max()) > 0
    assert not np.allclose(attn.q.kernel[...], q0)
    loss2, _ = step(model, opt, x, y)
    assert bool(jnp.isfinite(loss2))


@pytest.mark.parametrize("dtype", [F32, jnp.bfloat16])
def test_stem_max_pool_matches_numpy_and_differentiates_under_jit(dtype):
    # halonet-tiny has no stem pool; the paper configs do (a jitted grad through it once failed)
    from jaxattn.models.halonet import _max_pool3s2
    x = jax.random.permutation(jax.random.key(3), jnp.arange(7 * 9 * 3)).reshape(1, 7, 9, 3).astype(dtype)
    xp = np.pad(np.asarray(x, np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    want = np.stack([np.stack([xp[:, i:i + 3, j:j + 3].max(axis=(1, 2)) for j in range(0, 9, 2)], 1)
                     for i in range(0, 7, 2)], 1)
    out, grad = jax.jit(lambda x: (_max_pool3s2(x), jax.grad(lambda x: _max_pool3s2(x).astype(F32).sum())(x)))(x)
    assert out.dtype == dtype and out.shape == (1, 4, 5, 3)
    np.testing.assert_array_equal(np.asarray(out, np.float32), want)
    # distinct values (exact in bf16 below 256): each window's max gets one count per window it wins
    counts = np.zeros(xp.shape, np.float32)
    for i in range(0, 7, 2):
        for j in range(0, 9, 2):
            win = xp[:, i:i + 3, j:j + 3]
            hit = win == win.max(axis=(1, 2), keepdims=True)
            counts[:, i:i + 3, j:j + 3] += hit
    np.testing.assert_array_equal(np.asarray(grad, np.float32), counts[:, 1:-1, 1:-1])


def test_timm_state_dict_round_trip(tiny, tmp_path):
    """Through a .safetensors file (as timm's hub checkpoints are stored), read without torch."""
    from jaxattn.models.safetensors_io import read_state_dict, write_safetensors

    a = nnx.clone(tiny)
    b = create_model("halonet-tiny", rngs=nnx.Rngs(1), attn_impl="xla")
    write_safetensors(tmp_path / "model.safetensors", to_timm_state_dict(a))
    sd = read_state_dict(tmp_path)
    assert sd["stages.1.1.self_attn.kv.weight"].shape == (64 + 64, 64, 1, 1)  # OIHW
    assert sd["stages.1.1.self_attn.pos_embed.height_rel"].shape == (2 * 6 - 1, 16)
    assert sd["head.fc.weight"].shape == (10, 256) and sd["stem.conv1.conv.weight"].shape == (12, 1, 3, 3)
    load_timm_state_dict(b, {**sd, "stem.conv1.bn.num_batches_tracked": np.array(0)})
    a.eval()
    b.eval()
    x = jax.random.normal(jax.random.key(6), (4, 32, 32, 1), F32)
    np.testing.assert_array_equal(_apply(a, x), _apply(b, x))
    with pytest.raises(ValueError, match="missing"):
        load_timm_state_dict(b, {k: v for k, v in sd.items() if k != "head.fc.bias"})
    with pytest.raises(ValueError, match="shape"):
        load_timm_state_dict(b, {**sd, "head.fc.weight": np.zeros((3, 256), np.float32)})


def test_bad_inputs_and_configs_raise_clearly(tiny):
    model = tiny
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((2, 32, 32)))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.ones((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="float"):
        model(jnp.ones((2, 32, 32, 1), jnp.uint8))
    layer = HaloAttn(8, num_heads=2, block_size=4, halo_size=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        layer(jnp.ones((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="divisible"):
        HaloAttn(10, num_heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stride"):
        HaloAttn(8, stride=3, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl"):
        HaloAttn(8, num_heads=2, impl="cuda", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layout"):
        create_model("halonet-tiny", rngs=nnx.Rngs(0), layout=("b", "bx", "h"))
    with pytest.raises(ValueError, match="one entry per stage"):
        create_model("halonet-tiny", rngs=nnx.Rngs(0), channels=(64, 128))
    with pytest.raises(ValueError, match="attn_impl"):
        create_model("halonet-tiny", rngs=nnx.Rngs(0), attn_impl="fast")
    with pytest.raises(ValueError, match="bad override"):
        create_model("halonet-tiny", rngs=nnx.Rngs(0), vocab_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        dataclasses.replace(MODEL_CONFIGS["halonet-h0"], num_heads=(4, 8))
    assert isinstance(MODEL_CONFIGS["halonet26t"], HaloNetConfig)


@pytest.mark.slow
def test_remat_same_loss_grads_and_batch_stats():
    """``HaloNetConfig(remat=True)`` recomputes each block in the backward: the same loss, gradients
    and BatchNorm running statistics (updated once, not again by the recomputation)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))
    out = []
    for remat in (False, True):
        m = create_model("halonet-tiny", rngs=nnx.Rngs(0), remat=remat, attn_impl="xla")
        m.train()
        loss, g = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2)))(m)
        out.append((float(loss), jax.tree.leaves(nnx.state(g, nnx.Param)),
                    jax.tree.leaves(nnx.state(m, nnx.BatchStat))))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for a, b in zip(out[0][1] + out[0][2], out[1][1] + out[1][2]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert len(out[1][2]) > 10  # the running statistics were compared
