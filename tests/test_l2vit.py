"""L²ViT: linear global attention (KV-first op vs the quadratic oracle), window attention,
the model against logits of the reference PyTorch implementation, training, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import GRAD_TOL, assert_close
from jaxattn import linear_global_attention
from jaxattn.models import MODEL_CONFIGS, create_model
from jaxattn.models.l2vit import (L2ViT, L2ViTConfig, LinearAttention, WindowAttention, load_reference_state_dict,
                                  param_count, reference_shapes, to_reference_state_dict)
from jaxattn.reference.linear_global import linear_global_reference

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
# jitted (one compile per shape instead of one per primitive: compiles dominate on CPU)
_op = jax.jit(linear_global_attention, static_argnames=("clamp", "impl"))
_ref = jax.jit(linear_global_reference, static_argnames=("clamp",))


def _qkv(rng, b, nq, nk, h, d, e, dtype=F32, scale=1.0):
    q = scale * rng.standard_normal((b, nq, h, d))
    k = scale * rng.standard_normal((b, nk, h, d))
    v = rng.standard_normal((b, nk, h, e))
    tau = rng.uniform(0.05, 1.0, (h,))
    return (*(jnp.asarray(a, jnp.float32).astype(dtype) for a in (q, k, v)), jnp.asarray(tau, jnp.float32))


def _np_linear(q, k, v, tau, clamp):
    """The formula in float64 numpy (one triple product per query), plus the unclamped denominators."""
    q, k, v = (np.maximum(np.asarray(a, np.float64), 0) if i < 2 else np.asarray(a, np.float64)
               for i, a in enumerate((q, k, v)))
    num = np.einsum("bihd,bjhd,bjhe->bihe", q, k, v, optimize=True)
    den = np.einsum("bihd,bjhd->bih", q, k)
    return np.asarray(tau, np.float64)[:, None] * num / np.maximum(den, clamp)[..., None], den


# ---------------------------------------------------------------------------------------------
# the op

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("seed", range(3))
def test_kv_first_matches_quadratic(dtype, seed):
    rng = np.random.default_rng(seed)
    b, h = rng.integers(1, 3), rng.integers(1, 4)
    nq, nk = rng.integers(1, 70), rng.integers(1, 70)
    nq = nk if seed % 2 else nq  # self- and cross-length
    d, e = rng.choice([4, 8, 16]), rng.choice([4, 8, 12])
    q, k, v, tau = _qkv(rng, b, nq, nk, h, d, e, dtype, scale=float(rng.choice([0.3, 1.0, 3.0])))
    out = _op(q, k, v, temperature=tau)
    assert out.dtype == dtype and out.shape == (b, nq, h, e)
    ref = _ref(q, k, v, tau)
    assert_close(out, ref, dtype, f"seed {seed}")
    if dtype == F32:  # the oracle itself against float64 numpy
        np.testing.assert_allclose(np.asarray(ref),
                                   _np_linear(q, k, v, tau, 100.0)[0], rtol=1e-4, atol=1e-4)


def test_jit_and_scalar_temperature():
    q, k, v, _ = _qkv(np.random.default_rng(1), 2, 33, 33, 3, 8, 8)
    out = jax.jit(lambda q, k, v: linear_global_attention(q, k, v, temperature=0.5, impl="xla"))(q, k, v)
    assert_close(out, _ref(q, k, v, 0.5), F32)


def test_clamp_small_denominator():
    """Tiny features: every denominator is below 100, so o = τ φ(q)ᵀ Σ φ(k) vᵀ / 100 and the
    output is linear in k's scale; large features: unclamped, invariant to k's scale."""
    rng = np.random.default_rng(2)
    q, k, v, tau = _qkv(rng, 2, 40, 40, 2, 8, 8, scale=0.05)
    expect, den = _np_linear(q, k, v, tau, 100.0)
    assert den.max() < 100
    out = _op(q, k, v, temperature=tau)
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5, atol=1e-9)
    out2 = _op(q, 2 * k, v, temperature=tau)
    np.testing.assert_allclose(np.asarray(out2), 2 * np.asarray(out), rtol=1e-5, atol=1e-9)

    q, k, v, tau = _qkv(rng, 2, 40, 40, 2, 8, 8, scale=6.0)
    q, k = jnp.abs(q), jnp.abs(k)  # all features active -> large denominators
    assert _np_linear(q, k, v, tau, 100.0)[1].min() > 100
    a = _op(q, k, v, temperature=tau)
    b = _op(q, 3 * k, v, temperature=tau)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)

    # a tiny clamp gives plain normalised ReLU linear attention
    out = _op(q, k, v, temperature=tau, clamp=1e-6)
    np.testing.assert_allclose(np.asarray(out), _np_linear(q, k, v, tau, 0.0)[0], rtol=1e-5, atol=1e-5)


def test_no_active_query_features_gives_zeros():
    q, k, v, tau = _qkv(np.random.default_rng(3), 1, 9, 9, 2, 4, 4)
    q = -jnp.abs(q)  # φ(q) = 0
    out = _op(q, k, v, temperature=tau)
    assert np.array_equal(np.asarray(out), np.zeros(out.shape))
    g = jax.jit(jax.grad(lambda q, k: linear_global_attention(q, k, v, temperature=tau).sum(), (0, 1)))(q, k)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_gradients_match_oracle_autodiff(scale):
    rng = np.random.default_rng(4)
    q, k, v, tau = _qkv(rng, 2, 37, 29, 3, 8, 6, scale=scale)
    ct = jnp.asarray(rng.standard_normal((2, 37, 3, 6)), jnp.float32)

    def loss(fn):
        return lambda q, k, v, t: jnp.sum(fn(q, k, v, t) * ct)

    got = jax.jit(jax.grad(loss(lambda q, k, v, t: linear_global_attention(q, k, v, temperature=t)),
                           (0, 1, 2, 3)))(q, k, v, tau)
    want = jax.jit(jax.grad(loss(linear_global_reference), (0, 1, 2, 3)))(q, k, v, tau)
    for name, g, w in zip("qkvt", got, want):
        assert_close(g, w, F32, f"d{name}", tol=GRAD_TOL)
    assert float(jnp.abs(got[3]).max()) > 0


def test_op_errors():
    q, k, v, tau = _qkv(np.random.default_rng(5), 1, 8, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="q must have rank 4"):
        linear_global_attention(q[0], k, v, temperature=tau)
    with pytest.raises(ValueError, match="must share one dtype"):
        linear_global_attention(q, k.astype(jnp.bfloat16), v, temperature=tau)
    with pytest.raises(ValueError, match="kv length"):
        linear_global_attention(q, k, v[:, :5], temperature=tau)
    with pytest.raises(ValueError, match="no GQA"):
        linear_global_attention(q, k[:, :, :1], v[:, :, :1], temperature=tau)
    with pytest.raises(ValueError, match=r"temperature must be a scalar or have shape \[heads\]"):
        linear_global_attention(q, k, v, temperature=jnp.ones((3,)))
    with pytest.raises(ValueError, match="temperature must be floating"):
        linear_global_attention(q, k, v, temperature=jnp.ones((2,), jnp.int32))
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="clamp must be"):
            linear_global_attention(q, k, v, temperature=tau, clamp=bad)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_global_attention(q, k, v, temperature=tau, impl="cuda")
    with pytest.raises(ValueError, match="clamp must be a static"):
        jax.jit(lambda c: linear_global_attention(q, k, v, temperature=tau, clamp=c))(1.0)


# ---------------------------------------------------------------------------------------------
# layers and model. Models are built abstractly (nnx.eval_shape) and filled from numpy through the
# reference state_dict converter: eager initialisers compile one XLA program per parameter shape.

def _weights(model, seed: int = 1234, std: float = 0.3) -> dict[str, np.ndarray]:
    """Random reference-layout weights (non-zero biases, BN statistics and temperatures)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(reference_shapes(model).items()):
        if key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("temperature"):
            out[key] = rng.uniform(0.1, 0.5, shape).astype(np.float32)
        elif len(shape) > 1:
            out[key] = (std * rng.standard_normal(shape)).astype(np.float32)
        else:
            one = 1.0 if key.endswith("weight") and "norm" in key else 0.0
            out[key] = (0.1 * rng.standard_normal(shape) + one).astype(np.float32)
    return out


def _build(cfg: L2ViTConfig, **kw) -> L2ViT:
    model = nnx.eval_shape(lambda: L2ViT(cfg, rngs=nnx.Rngs(0)))
    load_reference_state_dict(model, _weights(model, **kw))
    return model


def test_temperature_init():
    la = LinearAttention(24, 3, rngs=nnx.Rngs(0))  # the real initialisers
    np.testing.assert_allclose(np.asarray(la.temperature[...]), np.full(3, 8 ** -0.5, np.float32))
    cfg = L2ViTConfig(depths=(2, 3), dims=(16, 48), heads=(2, 3), num_classes=3, in_channels=1)
    model = nnx.eval_shape(lambda: L2ViT(cfg, rngs=nnx.Rngs(0)))
    temps = sorted(k for k in reference_shapes(model) if k.endswith("temperature"))
    assert temps == ["stages.0.1.attn.temperature", "stages.1.1.attn.temperature"]  # odd blocks are LGA
    assert model.stages[1][1].attn.head_dim == 16 and model.stages[0][1].attn.head_dim == 8


def _window_oracle(x, wqkv, bqkv, wp, bp, heads, ws):
    """Per-window loops in float64: zero-pad right/bottom, full softmax inside each window
    (padded tokens unmasked), crop."""
    x, wqkv, bqkv, wp, bp = (np.asarray(a, np.float64) for a in (x, wqkv, bqkv, wp, bp))
    b, h, w, c = x.shape
    hp, wpad = -(-h // ws) * ws, -(-w // ws) * ws
    xp = np.zeros((b, hp, wpad, c))
    xp[:, :h, :w] = x
    out = np.zeros_like(xp)
    hd = c // heads
    for n in range(b):
        for r in range(0, hp, ws):
            for s in range(0, wpad, ws):
                t = xp[n, r:r + ws, s:s + ws].reshape(-1, c)
                qkv = t @ wqkv + bqkv
                o = np.zeros((t.shape[0], c))
                for hh in range(heads):
                    qh = qkv[:, hh * hd:(hh + 1) * hd]
                    kh = qkv[:, c + hh * hd:c + (hh + 1) * hd]
                    vh = qkv[:, 2 * c + hh * hd:2 * c + (hh + 1) * hd]
                    lg = qh @ kh.T / np.sqrt(hd)
                    p = np.exp(lg - lg.max(-1, keepdims=True))
                    o[:, hh * hd:(hh + 1) * hd] = (p / p.sum(-1, keepdims=True)) @ vh
                out[n, r:r + ws, s:s + ws] = (o @ wp + bp).reshape(ws, ws, c)
    return out[:, :h, :w]


@pytest.mark.parametrize("ws,h,w,heads", [(3, 7, 5, 2), (7, 9, 8, 1)])
def test_window_attention_matches_per_window_oracle(ws, h, w, heads):
    c = 8
    rng = np.random.default_rng(ws * 100 + h)
    wa = nnx.eval_shape(lambda: WindowAttention(c, heads, ws, impl="xla", rngs=nnx.Rngs(1)))
    for lin in (wa.qkv, wa.proj):  # non-zero biases, so the unmasked padded tokens matter
        lin.bias.set_value(jnp.asarray(0.5 * rng.standard_normal(lin.bias.shape), jnp.float32))
        lin.kernel.set_value(jnp.asarray(0.4 * rng.standard_normal(lin.kernel.shape), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
    want = _window_oracle(x, wa.qkv.kernel[...], wa.qkv.bias[...], wa.proj.kernel[...], wa.proj.bias[...],
                          heads, ws)
    assert_close(nnx.jit(lambda m, x: m(x))(wa, x), want, F32, f"window {ws} on {h}x{w}")


# Logits of the reference PyTorch L2ViT (ChuanyangZheng/L2ViT classification/models/l2vit.py,
# eval mode) with depths [2,2,2,2], dims [8,16,16,32], heads [1,2,2,4], 5 classes, the weights of
# _weights(seed=1234, std=0.3) and the input below: 36x44 -> 9x11 maps (7x7 windows padded to
# 14x14), then 5x6 (odd: padded before the next 2x2 merge), 3x3, 2x2.
_GOLDEN = np.array([[0.35777488, -1.5674169, 0.3848587, -0.9000334, 1.3905455],
                    [-0.18905635, -1.8285997, -0.5240893, -1.2335545, 1.4536391]], np.float32)


def test_matches_reference_pytorch_logits_and_batchnorm_modes():
    cfg = L2ViTConfig(depths=(2, 2, 2, 2), dims=(8, 16, 16, 32), heads=(1, 2, 2, 4), num_classes=5, attn_impl="xla")
    model = _build(cfg)
    w = _weights(model)
    back = to_reference_state_dict(model)
    assert set(back) == set(w) and all(np.array_equal(back[k], w[k]) for k in w)
    assert {k: v.shape for k, v in back.items()} == reference_shapes(model)
    x = np.random.default_rng(7).standard_normal((2, 3, 36, 44)).astype(np.float32).transpose(0, 2, 3, 1)
    fwd = nnx.jit(lambda m, x: m(x))
    model.eval()
    logits = fwd(model, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(logits), _GOLDEN, rtol=1e-4, atol=1e-4)
    mean0 = np.asarray(model.downsample_layers[0].bn1.mean[...]).copy()
    model.train()  # batch statistics; running averages move
    y = fwd(model, jnp.asarray(x))
    assert y.shape == (2, 5) and y.dtype == jnp.float32 and np.isfinite(np.asarray(y)).all()
    assert not np.allclose(np.asarray(model.downsample_layers[0].bn1.mean[...]), mean0)
    assert not np.allclose(np.asarray(y), _GOLDEN, atol=1e-3)
    with pytest.raises(ValueError, match="state_dict mismatch"):
        load_reference_state_dict(model, {k: v for k, v in w.items() if "head" not in k})


def test_registered_models_abstract_forward_and_params():
    out = jax.eval_shape(lambda xx: create_model("l2vit-mini", rngs=nnx.Rngs(0), attn_impl="xla")(xx),
                         jax.ShapeDtypeStruct((2, 32, 32, 1), F32))
    assert out.shape == (2, 10) and out.dtype == F32
    # the reference PyTorch L2ViT_Tiny has 28,596,781 parameters (README: 29M); S / B: slow test
    assert param_count(nnx.eval_shape(lambda: create_model("l2vit-t", rngs=nnx.Rngs(0)))) == 28_596_781


@pytest.mark.slow
@pytest.mark.parametrize("name,count", [("l2vit-s", 50_199_157), ("l2vit-b", 88_577_188)])
def test_param_count_small_base_match_reference(name, count):
    m = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0)))
    assert param_count(m) == count
    out = jax.eval_shape(lambda xx: create_model(name, rngs=nnx.Rngs(0), attn_impl="xla")(xx),
                         jax.ShapeDtypeStruct((1, 224, 224, 3), F32))
    assert out.shape == (1, 1000)


def test_training_steps_reduce_loss_eval_is_per_example():
    cfg = L2ViTConfig(depths=(2,), dims=(16,), heads=(2,), window_size=4, num_classes=3, in_channels=1,
                      attn_impl="xla")
    model = _build(cfg, std=0.05)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((12, 14, 15, 1)), jnp.float32)  # odd size: stem padding
    y = jnp.asarray(rng.integers(0, 3, 12))

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(8):
        loss, grads = step(model, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.85 * losses[0], losses
    assert float(jnp.abs(grads.stages[0][1].attn.temperature[...]).max()) > 0
    model.eval()
    fwd = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(fwd(model, x)[:4]), np.asarray(fwd(model, x[:4])), rtol=1e-5, atol=1e-5)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="one entry per stage"):
        L2ViTConfig(depths=(2, 2), dims=(16,), heads=(2,))
    with pytest.raises(ValueError, match="divisible by its heads"):
        L2ViTConfig(depths=(2,), dims=(16,), heads=(3,))
    with pytest.raises(ValueError, match="must be even"):
        L2ViTConfig(depths=(1,), dims=(9,), heads=(1,))
    with pytest.raises(ValueError, match="attn_impl"):
        L2ViTConfig(attn_impl="cuda")
    with pytest.raises(ValueError, match="clamp"):
        L2ViTConfig(clamp=0.0)
    with pytest.raises(ValueError, match="bad override"):
        create_model("l2vit-mini", rngs=nnx.Rngs(0), bogus=1)
    assert {"l2vit-mini", "l2vit-t", "l2vit-s", "l2vit-b"} <= set(MODEL_CONFIGS)
    model = nnx.eval_shape(lambda: L2ViT(L2ViTConfig(depths=(1,), dims=(8,), heads=(1,), in_channels=1),
                                         rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"images must be NHWC \[batch, height, width, 1\]"):
        model(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="float array"):
        model(jnp.zeros((1, 16, 16, 1), jnp.int32))
