"""MoH (Mixture-of-Head attention): layer vs the fp32 oracle (gates, output, gradients), all-ones gates
vs an independent multi-head attention, top-k, load balance, the parameter-free query-norm router,
the head-skipping inference path, MoH-ViT (configs, auxiliary loss in the image loss, a train step),
errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import GRAD_TOL, assert_close
from jaxattn.models import MODEL_CONFIGS, create_model
from jaxattn.models.moh import (MoHAttention, MoHViT, MoHViTConfig, check_moh_heads, load_balance_loss,
                                query_norm_router, routing_stats)
from jaxattn.models.vit import ViT, ViTConfig
from jaxattn.reference.moh import (load_balance_reference, moh_gates_reference, moh_reference,
                                   query_norm_gates_reference)
from jaxattn.train.image import ImageConfig, classification_loss, forward_with_aux_loss, make_image_trainer
from jaxattn.train.images import ImageData, normalize

F32 = jnp.float32
# (batch, tokens, heads, head_dim, shared_heads, top_k): every gate branch (h_s 0 / 1 / >1, K 0 / >0)
CASES = [(2, 7, 4, 8, 0, 2), (1, 9, 4, 4, 1, 2), (2, 5, 6, 4, 2, 3), (1, 6, 3, 8, 3, 0), (2, 8, 5, 4, 3, 1)]


def fill_params(module, seed: int, router_scale: float = 3.0):
    """Replaces every parameter by numpy draws at O(1) scale (biases 0.1 N(0,1), matrices
    N(0, 1/fan_in), routers x ``router_scale`` so router ties are negligible, LayerNorm scales 1 + ...)."""
    state = nnx.state(module, nnx.Param)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path)
        shape = tuple(leaf.shape)
        if len(shape) == 1 or "embed" in name or "cls_token" in name:
            v = 0.1 * rng.standard_normal(shape) + (1.0 if "scale" in name else 0.0)
        else:
            fan_in = int(np.prod(shape[:-1]))
            v = ((router_scale if "wg" in name else 1.0) / math.sqrt(fan_in)) * rng.standard_normal(shape)
        new.append(jnp.asarray(v, F32))
    nnx.update(module, jax.tree.unflatten(jax.tree.structure(state), new))
    return module


def make_layer(heads, head_dim, shared, k, *, router="learned", causal=False, seed=0, **kw) -> MoHAttention:
    """A layer (built abstractly, no initializer runs) with random O(1) parameters."""
    layer = nnx.eval_shape(lambda: MoHAttention(heads * head_dim, heads, shared_heads=shared, top_k=k, router=router,
                                                causal=causal, impl="xla", rngs=nnx.Rngs(0), **kw))
    return fill_params(layer, seed)


def layer_outputs(layer: MoHAttention, x: jax.Array) -> dict:
    """One jitted program: output + routing, output with all gates 1, and the head-skipping output."""
    gdef, state = nnx.split(layer)

    @jax.jit
    def f(s, x):
        m = nnx.merge(gdef, s)
        out, r = m(x, return_routing=True)
        res = dict(out=out, gates=r.gates, ones=m(x, gates=jnp.ones(x.shape[:2] + (m.heads,))))
        if r.probs is not None:
            res.update(probs=r.probs, mask=r.mask, index=r.index, sparse=m(x, sparse=True))
        return res

    return f(state, x)


def params_of(layer: MoHAttention) -> dict:
    get = lambda lin: None if lin is None else lin.kernel[...]  # noqa: E731
    return dict(qkv_w=layer.qkv.kernel[...], qkv_b=layer.qkv.bias[...], proj_w=layer.proj.kernel[...],
                proj_b=layer.proj.bias[...], wg=get(layer.wg), wg_0=get(layer.wg_0), wg_1=get(layer.wg_1))


def qkv_of(p: dict, x: jax.Array, heads: int):
    b, n, dim = x.shape
    qkv = (jnp.matmul(x.astype(F32), p["qkv_w"], precision="highest") + p["qkv_b"]).reshape(b, n, 3, heads, dim // heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def oracle(p: dict, x: jax.Array, heads: int, shared: int, k: int, *, causal: bool = False,
           router: str = "learned", gates=None):
    q, kk, v = qkv_of(p, x, heads)
    if gates is None:
        if router == "learned":
            gates = moh_gates_reference(x, p["wg"], p["wg_1"], p["wg_0"], heads=heads, shared_heads=shared,
                                        top_k=k)["gates"]
        else:
            gates = query_norm_gates_reference(q, shared_heads=shared, top_k=k)
    return moh_reference(q, kk, v, gates, p["proj_w"], p["proj_b"], causal=causal)


def independent_mha(p: dict, x: jax.Array, heads: int) -> jax.Array:
    """Plain multi-head self-attention with a per-head python loop (numpy, float64)."""
    x64 = np.asarray(x, np.float64)
    w, bqkv = np.asarray(p["qkv_w"], np.float64), np.asarray(p["qkv_b"], np.float64)
    b, n, dim = x64.shape
    d = dim // heads
    qkv = (x64 @ w + bqkv).reshape(b, n, 3, heads, d)
    outs = []
    for h in range(heads):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        outs.append((s / s.sum(-1, keepdims=True)) @ v)
    return np.concatenate(outs, -1) @ np.asarray(p["proj_w"], np.float64) + np.asarray(p["proj_b"], np.float64)


def rand_x(b, n, dim, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, n, dim)), F32)


# -- the layer against the oracle -------------------------------------------------------------------
LAYER_CASES = [  # (case, router, causal)
    (CASES[0], "learned", False), (CASES[1], "learned", True), (CASES[2], "learned", False),
    (CASES[3], "learned", True), (CASES[4], "learned", False),
    ((1, 7, 6, 4, 3, 2), "query_norm", True), ((2, 5, 4, 8, 0, 3), "query_norm", False),
]


@pytest.mark.parametrize("case,router,causal", LAYER_CASES)
def test_layer_matches_oracle(case, router, causal):
    """Gates and output vs the oracle; all gates 1 = an independent multi-head attention; exactly K
    routed heads per token (the K most probable); the head-skipping path equals the dense one."""
    b, n, h, d, hs, k = case
    layer = make_layer(h, d, hs, k, router=router, causal=causal, seed=sum(case))
    x = rand_x(b, n, h * d, seed=n)
    p = params_of(layer)
    res = layer_outputs(layer, x)

    @jax.jit
    def reference(p, x):
        q, kk, v = qkv_of(p, x, h)
        if router == "learned":
            ref = moh_gates_reference(x, p["wg"], p["wg_1"], p["wg_0"], heads=h, shared_heads=hs, top_k=k)
        else:
            ref = {"gates": query_norm_gates_reference(q, shared_heads=hs, top_k=k)}
        return {**ref, "out": moh_reference(q, kk, v, ref["gates"], p["proj_w"], p["proj_b"], causal=causal)}

    ref = reference(p, x)
    if router == "learned" and k:
        np.testing.assert_array_equal(np.asarray(res["mask"]), np.asarray(ref["mask"]))
        assert_close(res["probs"], ref["probs"], F32, "router probs")
    if router == "query_norm":
        assert layer.wg is None and layer.wg_0 is None and layer.wg_1 is None  # parameter-free
        np.testing.assert_array_equal(np.asarray(res["gates"]), np.asarray(ref["gates"]))  # binary
    assert_close(res["gates"], ref["gates"], F32, "gates")
    assert_close(res["out"], ref["out"], F32, "output")
    if not causal:
        assert_close(res["ones"], independent_mha(p, x, h), F32, "gates=1 vs multi-head attention")
    assert np.abs(np.asarray(res["out"]) - np.asarray(res["ones"])).max() > 1e-3  # the gates are not trivially 1
    if k:
        g_r = np.asarray(res["gates"])[..., hs:]
        assert ((g_r != 0).sum(-1) == k).all()  # exactly K routed heads per token ...
        probs = np.asarray(res["probs"])
        np.testing.assert_array_equal(np.sort(np.asarray(res["index"]), -1),
                                      np.sort(np.argsort(-probs, -1)[..., :k], -1))  # ... the K most probable
        np.testing.assert_array_equal(g_r != 0, np.asarray(res["mask"]) > 0)
        assert_close(res["sparse"], res["out"], F32, "head-skipping path vs dense")


def test_oracle_with_unit_gates_is_multi_head_attention():
    b, n, h, d = 2, 5, 3, 4
    layer = make_layer(h, d, 3, 0, seed=2)
    x = rand_x(b, n, h * d, seed=3)
    p = params_of(layer)
    q, k, v = qkv_of(p, x, h)
    assert_close(moh_reference(q, k, v, jnp.ones((b, n, h)), p["proj_w"], p["proj_b"]), independent_mha(p, x, h),
                 F32, "oracle with gates 1")


def test_gradients_match_oracle():
    b, n, h, d, hs, k = CASES[2]  # h_s = 2, K = 3: every router (W_r, W_h, W_s) is used
    layer = make_layer(h, d, hs, k, seed=3)
    x = rand_x(b, n, h * d, seed=4)
    ct = rand_x(b, n, h * d, seed=5)
    gdef, state = nnx.split(layer)
    g_state, g_x = jax.jit(jax.grad(lambda s, xx: jnp.sum(nnx.merge(gdef, s)(xx) * ct), argnums=(0, 1)))(state, x)
    p = params_of(layer)
    g_ref, g_xref = jax.jit(jax.grad(lambda pp, xx: jnp.sum(oracle(pp, xx, h, hs, k) * ct), argnums=(0, 1)))(p, x)
    assert_close(g_x, g_xref, F32, "dx", tol=GRAD_TOL)
    names = {"qkv_w": ("qkv", "kernel"), "qkv_b": ("qkv", "bias"), "proj_w": ("proj", "kernel"),
             "proj_b": ("proj", "bias"), "wg": ("wg", "kernel"), "wg_0": ("wg_0", "kernel"), "wg_1": ("wg_1", "kernel")}
    checked = 0
    for key, (mod, leaf) in names.items():
        if p[key] is None:
            continue
        got = g_state[mod][leaf][...]
        assert_close(got, g_ref[key], F32, f"d{key}", tol=GRAD_TOL)
        checked += 1
        if key.startswith("wg"):
            assert float(jnp.abs(got).max()) > 0, f"router {key} gets no gradient"
    assert checked == sum(v is not None for v in p.values())


def test_gate_sums_follow_the_two_stage_weights():
    b, n, h, d, hs, k = 3, 11, 8, 4, 2, 3
    layer = make_layer(h, d, hs, k, seed=7)
    x = rand_x(b, n, h * d, seed=8)
    gates = np.asarray(layer_outputs(layer, x)["gates"], np.float64)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.wg_0.kernel[...], np.float64)
    a = 2 * np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(gates[..., hs:].sum(-1), k * a[..., 1], rtol=1e-5)  # routed gates sum to K a2
    np.testing.assert_allclose(gates[..., :hs].sum(-1), hs * a[..., 0], rtol=1e-5)  # shared gates to h_s a1
    layer1 = make_layer(4, 4, 1, 2, seed=9)  # one shared head: g_s = a1 * 1, no W_s
    x1 = rand_x(2, 5, 16, seed=10)
    assert layer1.wg_1 is None
    l1 = np.asarray(x1, np.float64) @ np.asarray(layer1.wg_0.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(layer_outputs(layer1, x1)["gates"])[..., 0],
                               2 * np.exp(l1[..., 0]) / np.exp(l1).sum(-1), rtol=1e-5)


# -- load balance --------------------------------------------------------------------------------
def test_load_balance_hand_example():
    probs = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    mask = jnp.array([[1.0, 0, 0], [0, 1, 0]])  # top-1 of each token
    # P = [0.3, 0.45, 0.25], f = [0.5, 0.5, 0]: E * sum P f = 3 * (0.15 + 0.225) = 1.125
    assert float(load_balance_loss(probs, mask)) == pytest.approx(1.125, abs=1e-6)
    assert float(load_balance_reference(probs, mask)) == pytest.approx(1.125, abs=1e-6)
    # the original's form mean(P * f) * E * E; uniform routing gives K
    assert float(load_balance_loss(jnp.full((5, 4), 0.25), jnp.tile(jnp.array([1.0, 1, 0, 0]), (5, 1)))) == pytest.approx(2.0)
    # gradient flows through P only: d/dprobs = E * f / T
    g = jax.grad(lambda pr: load_balance_loss(pr, mask))(probs)
    np.testing.assert_allclose(np.asarray(g), np.tile(3 * np.array([0.5, 0.5, 0.0]) / 2, (2, 1)), atol=1e-6)


def test_layer_sows_load_balance_only_when_training_under_capture():
    layer = make_layer(5, 4, 1, 2, seed=11)
    x = rand_x(2, 6, 20, seed=12)
    gdef, state = nnx.split(layer)

    @jax.jit
    def run(s, x):
        m = nnx.merge(gdef, s)
        _, r = m(x, return_routing=True)  # plain call: nothing sown
        plain = nnx.state(m, nnx.Intermediate)
        _, inter = nnx.capture(m, nnx.Intermediate)(x)
        return r.probs, r.mask, plain, inter

    probs, mask, plain, inter = run(state, x)
    assert len(jax.tree.leaves(plain)) == 0
    sown = inter["aux_loss"].get_value()
    assert len(sown) == 1
    assert float(sown[0]) == pytest.approx(float(load_balance_reference(probs, mask)), rel=1e-5)
    layer.eval()  # eval mode: no loss
    gdef, state = nnx.split(layer)
    inter = jax.jit(lambda s, x: nnx.capture(nnx.merge(gdef, s), nnx.Intermediate)(x)[1])(state, x)
    assert "aux_loss" not in inter


# -- the parameter-free query-norm router (MoH-LLaMA3) --------------------------------------------------
def test_query_norm_router_hand_example():
    q = np.zeros((1, 1, 4, 2), np.float32)
    q[0, 0, 1:] = [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]  # routed-head norms 5, 1, 2
    probs, mask, _ = query_norm_router(jnp.asarray(q[:, :, 1:]), 2)
    norms = np.array([5.0, 1.0, 2.0])
    z = norms / norms.std(ddof=1)  # torch.std: unbiased
    np.testing.assert_allclose(np.asarray(probs[0, 0]), np.exp(z) / np.exp(z).sum(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mask[0, 0]), [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(query_norm_gates_reference(jnp.asarray(q), shared_heads=1, top_k=2))[0, 0],
                                  [1, 1, 0, 1])
    layer = make_layer(4, 4, 1, 2, router="query_norm")
    gdef, state = nnx.split(layer)
    inter = jax.jit(lambda s, x: nnx.capture(nnx.merge(gdef, s), nnx.Intermediate)(x)[1])(state, rand_x(1, 3, 16))
    assert "aux_loss" not in inter  # no load-balance loss for the parameter-free router


# -- MoH-ViT -----------------------------------------------------------------------------------------
def small_cfg(**kw) -> MoHViTConfig:
    base = dict(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=2, heads=4,
                shared_heads=(4, 1), top_k=(0, 2), attn_impl="xla")
    base.update(kw)
    return MoHViTConfig(**base)


def small_moh_vit(seed: int = 0, **kw) -> MoHViT:
    return fill_params(nnx.eval_shape(lambda: MoHViT(small_cfg(**kw), rngs=nnx.Rngs(0))), seed)


def count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_moh_vit_swaps_attention_and_counts_parameters():
    cfg = small_cfg()
    model = small_moh_vit()
    assert [type(b.attn).__name__ for b in model.blocks] == ["MoHAttention", "MoHAttention"]
    base = nnx.eval_shape(lambda: ViT(ViTConfig(**{f: getattr(cfg, f) for f in ViTConfig.__dataclass_fields__}),
                                      rngs=nnx.Rngs(0)))
    # layer 0: all 4 heads shared (W_s 16x4); layer 1: W_r 16x3 + W_h 16x2 (h_s = 1: no W_s)
    assert count(model) - count(base) == 16 * 4 + 16 * 3 + 16 * 2
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), F32)
    stats = routing_stats(model, x)
    assert stats["routed_active"] == pytest.approx(2 / 3) and stats["heads_active"] == pytest.approx((1 + 0.75) / 2)
    assert 0.9 <= stats["balance"] <= 3 / 2 + 1e-6  # ~1 when used evenly, at most E / K
    model.eval()
    gdef, state = nnx.split(model)
    logits, weights = jax.jit(lambda s, x: nnx.merge(gdef, s)(x, return_attention=True))(state, x)
    assert logits.shape == (2, 3) and len(weights) == 2 and weights[0].shape == (2, 4, 5, 5)
    for b in model.blocks:  # sparse inference in eval mode gives the dense logits
        b.attn.sparse_inference = True
    gdef_s, state_s = nnx.split(model)
    assert_close(jax.jit(lambda s, x: nnx.merge(gdef_s, s)(x))(state_s, x), logits, F32, "sparse_inference")


class PlainModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(x.reshape(x.shape[0], -1))


def test_image_loss_adds_weighted_mean_of_layer_losses():
    model = small_moh_vit(1, depth=3, shared_heads=(4, 1, 0), top_k=(0, 2, 1))
    vit = fill_params(nnx.eval_shape(lambda: PlainModel(nnx.Rngs(0))), 2)  # any model without aux_loss_weight
    batch = {"image": np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1)).astype(np.uint8),
             "label": jnp.array([0, 1, 2, 1])}
    mean, std = np.array([0.5], np.float32), np.array([0.25], np.float32)
    images = jnp.asarray(normalize(batch["image"], mean, std))
    gdef, state = nnx.split(model)
    vdef, vstate = nnx.split(vit)

    @jax.jit
    def run(s, vs, batch):
        m, v = nnx.merge(gdef, s), nnx.merge(vdef, vs)
        logits, inter = nnx.capture(m, nnx.Intermediate)(images)
        return (classification_loss(m, batch, mean, std, num_classes=3), logits, inter,
                classification_loss(v, batch, mean, std, num_classes=3), v(images), forward_with_aux_loss(v, images)[1])

    (loss, metrics), logits, inter, (loss_v, metrics_v), logits_v, aux_v = run(state, vstate, batch)
    per_layer = [v for path, var in nnx.to_flat_state(inter) if path[-1] == "aux_loss" for v in var.get_value()]
    assert len(per_layer) == 2  # the K = 0 layer has no routed heads and no loss
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    want = 0.01 * (per_layer[0] + per_layer[1]) / 2
    assert float(metrics["aux_loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(loss) == pytest.approx(float(ce + want), rel=1e-6)
    # a model without aux_loss_weight is called as before and gets no auxiliary term
    assert aux_v is None and set(metrics_v) == {"acc"}
    ce_v = optax.softmax_cross_entropy_with_integer_labels(logits_v, batch["label"]).mean()
    assert float(loss_v) == pytest.approx(float(ce_v), rel=1e-6)


@pytest.mark.slow  # ~16 s of CPU (trainer construction + the jitted scan/grad/AdamW step)
def test_train_steps_include_load_balance_loss():
    rng = np.random.default_rng(0)
    data = ImageData(rng.integers(0, 256, (32, 8, 8, 1)).astype(np.uint8), rng.integers(0, 3, 32),
                     rng.integers(0, 256, (8, 8, 8, 1)).astype(np.uint8), rng.integers(0, 3, 8),
                     ["a", "b", "c"], "synthetic", False)
    cfg = ImageConfig(model="moh-vit-tiny", image_size=8, batch_size=8, steps=2, warmup=1)
    trainer = make_image_trainer(cfg, data, lambda rngs: small_moh_vit(3, depth=1, shared_heads=1, top_k=2))
    outs = [trainer.train_step(data.train_batch(0, s, 8)) for s in range(2)]
    for o in outs:
        assert 0 < float(o["aux_loss"]) and np.isfinite(float(o["loss"]))
    assert trainer.step_count == 2


def test_registered_configs():
    for name in ("moh-vit-tiny", "moh-vit-s", "moh-vit-b"):
        assert isinstance(MODEL_CONFIGS[name], MoHViTConfig)
    tiny, vit = MODEL_CONFIGS["moh-vit-tiny"], MODEL_CONFIGS["vit-tiny"]
    for f in ("image_size", "patch_size", "in_channels", "dim", "depth", "heads", "mlp_ratio", "num_classes"):
        assert getattr(tiny, f) == getattr(vit, f)
    assert MODEL_CONFIGS["moh-vit-s"].active_fraction == pytest.approx((4 * 12 + 6 * 9 + 2 * 8) / 144)
    assert MODEL_CONFIGS["moh-vit-b"].active_fraction == pytest.approx((2 * 12 + 2 * 9 + 6 * 6 + 2 * 5) / 144)
    m = nnx.eval_shape(lambda: create_model("moh-vit-tiny", rngs=nnx.Rngs(0), depth=1))
    assert isinstance(m, MoHViT) and m.aux_loss_weight == 0.01
    assert count(m) == count(nnx.eval_shape(lambda: create_model("vit-tiny", rngs=nnx.Rngs(0), depth=1))) + 128 * 5


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,shared,k,router,match", [
    (4, 1, 4, "learned", "top_k must be in"),
    (4, 1, -1, "learned", "top_k must be in"),
    (4, 5, 0, "learned", "shared_heads must be in"),
    (4, -1, 2, "learned", "shared_heads must be in"),
    (4, 2, 0, "learned", "top_k=0"),
    (4, 4, 1, "learned", "top_k must be in"),
    (4, 1, 2, "bogus", "router must be one of"),
    (4, 4, 0, "query_norm", "query_norm"),
])
def test_bad_heads_raise(heads, shared, k, router, match):
    with pytest.raises(ValueError, match=match):
        check_moh_heads(heads, shared, k, router)
    with pytest.raises(ValueError, match=match):
        MoHAttention(8 * heads, heads, shared_heads=shared, top_k=k, router=router, rngs=nnx.Rngs(0))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        MoHAttention(10, 4, shared_heads=1, top_k=2, rngs=nnx.Rngs(0))
    layer = make_layer(4, 4, 1, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, tokens, 16\]"):
        layer(jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(jnp.ones((3, 16)))
    with pytest.raises(ValueError, match="floating"):
        layer(jnp.ones((1, 3, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"gates must have shape \[batch, tokens, heads\] = \(1, 3, 4\)"):
        jax.eval_shape(lambda x, g: layer(x, gates=g), jnp.ones((1, 3, 16)), jnp.ones((1, 3, 3)))
    with pytest.raises(ValueError, match="sparse=True"):
        jax.eval_shape(lambda x, g: layer(x, gates=g, sparse=True), jnp.ones((1, 3, 16)), jnp.ones((1, 3, 4)))
    with pytest.raises(ValueError, match="layer 1: top_k must be in"):
        small_cfg(top_k=(0, 4))
    with pytest.raises(ValueError, match="one value per layer"):
        small_cfg(top_k=(0, 2, 2))
    with pytest.raises(ValueError, match="quantized"):
        small_cfg(quantized=True)
    with pytest.raises(ValueError, match="balance_loss_weight"):
        small_cfg(balance_loss_weight=-1.0)


def test_moh_experiment_merge_writes_results_table(tmp_path):
    """The experiment's report from saved runs (no training): table rows, settings and verdict."""
    import json

    from jaxattn.train import moh_experiment

    rows = [dict(model=m, seed=s, steps=300, lr=3e-3, warmup=30, acc=a, f1=a - 0.01, seconds=10.0, params=p,
                 **({"heads_active": 0.75, "routed_active": 0.667, "balance": 0.98} if m.startswith("moh") else {}))
            for m, p, accs in (("vit-tiny", 805258, (0.95, 0.96)), ("moh-vit-tiny", 807818, (0.951, 0.959)))
            for s, a in zip((0, 1), accs)]
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(rows))
    res = tmp_path / "RESULTS.md"
    assert moh_experiment.main(["--merge", str(runs), "--results", str(res)]) == 0
    text = res.read_text()
    assert "<!-- moh-experiment:begin -->" in text and "AdamW lr 0.003 (warmup 30" in text
    assert "| moh-vit-tiny | 807,818 | 0.9550 ± 0.0057 |" in text and "| 0.750 | 0.667 | 0.980 |" in text
    assert "matches multi-head attention within seed noise" in text
