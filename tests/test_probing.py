"""Probing (linear / attentive / efficient) on frozen tokens: the efficient probe against its fp32 oracle
(forward and gradients), per-query channel slices, parameter counts by formula, BatchNorm train/eval,
a frozen backbone under the probe trainer, the probe task end to end, and argument errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import GRAD_TOL, assert_close
from jaxattn.models.probing import (AttentiveProbe, EfficientProbe, LinearProbe, count_params, create_probe,
                                    probe_param_count)
from jaxattn.models.vit import ViT, ViTConfig
from jaxattn.reference.probing import batchnorm_reference, efficient_pool_reference, efficient_probe_reference
from jaxattn.train import probe as probe_task
from jaxattn.train.images import ImageData

F32 = jnp.float32


def _shapes(seed: int):
    r = np.random.default_rng(seed)
    m = int(r.choice([1, 2, 4, 8]))
    d_out = int(r.choice([1, 2]))
    c = m * d_out * int(r.integers(1, 5)) * 4
    return dict(b=int(r.integers(3, 7)), t=int(r.integers(2, 12)), c=c, m=m, d_out=d_out, k=int(r.integers(2, 6)))


def _params(p: EfficientProbe):
    return dict(queries=p.queries[...], w_v=p.v.kernel[...], head_w=p.head.kernel[...], head_b=p.head.bias[...],
                b_v=None if p.v.bias is None else p.v.bias[...])


@pytest.mark.parametrize("seed", [3])
def test_efficient_probe_matches_oracle_forward_and_grads(seed):
    s = _shapes(seed)
    bias = True
    p = EfficientProbe(s["c"], s["k"], num_queries=s["m"], d_out=s["d_out"], qkv_bias=bias, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(100 + seed), (s["b"], s["t"], s["c"]), F32) * 2.0
    labels = jnp.arange(s["b"]) % s["k"]
    pr = _params(p)
    # train mode: batch statistics

    def ref_loss(pr, x):
        logits = efficient_probe_reference(x, **pr)
        z = efficient_pool_reference(x, pr["queries"], pr["w_v"], pr["b_v"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), (logits, z)

    graphdef, params, rest = nnx.split(p, nnx.Param, ...)

    def loss(params, x):
        m = nnx.merge(graphdef, params, rest, copy=True)
        logits = m(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), (logits, m.pool(x))

    (_, (logits, z)), (g, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    (_, (rlogits, rz)), (rg, rgx) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(pr, x)
    assert_close(logits, rlogits, F32, "logits (train mode: batch statistics)")
    assert_close(z, rz, F32, "z")
    assert_close(g["queries"][...], rg["queries"], F32, "dQ", tol=GRAD_TOL)
    assert_close(g["v"]["kernel"][...], rg["w_v"], F32, "dW_v", tol=GRAD_TOL)
    assert_close(g["head"]["kernel"][...], rg["head_w"], F32, "dW_head", tol=GRAD_TOL)
    assert_close(g["head"]["bias"][...], rg["head_b"], F32, "db_head", tol=GRAD_TOL)
    if bias:
        assert_close(g["v"]["bias"][...], rg["b_v"], F32, "db_v", tol=GRAD_TOL)
    assert_close(gx, rgx, F32, "dx", tol=GRAD_TOL)
    assert float(jnp.abs(g["queries"][...]).max()) > 0  # the queries do get a gradient


def test_efficient_probe_defaults_and_init():
    p = EfficientProbe(128, 10, rngs=nnx.Rngs(0))
    assert (p.num_queries, p.d_out, p.out_dim) == (32, 1, 128)
    assert p.scale == pytest.approx(128 ** -0.5)
    q = np.asarray(p.queries[...])
    assert q.shape == (32, 128) and abs(q.std() - 0.02) < 0.002 and abs(q.mean()) < 0.002
    w = np.asarray(p.v.kernel[...])  # PyTorch nn.Linear default: U(+-1/sqrt(C))
    assert p.v.bias is None and np.abs(w).max() <= 128 ** -0.5 and w.std() > 0.8 * 128 ** -0.5 / np.sqrt(3)
    assert p.head.kernel[...].shape == (128, 10)
    assert not any(isinstance(v, nnx.Param) for v in jax.tree.leaves(nnx.state(p.norm), is_leaf=lambda v: isinstance(v, nnx.Variable)))


@pytest.mark.parametrize("seed", [1])
def test_each_query_reads_only_its_own_slice(seed):
    s = _shapes(seed + 10)
    m, c, d_out = max(s["m"], 2), s["c"], s["d_out"]
    c = m * d_out * 4
    p = EfficientProbe(c, 3, num_queries=m, d_out=d_out, rngs=nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed), (4, 7, c), F32)
    pool = nnx.jit(lambda m, x: m.pool(x))
    z0 = np.asarray(pool(p, x))
    w = (c // d_out) // m
    for q in range(m):
        outside = np.ones(c // d_out, bool)
        outside[q * w:(q + 1) * w] = False
        kernel = np.asarray(p.v.kernel[...]).copy()
        kernel[:, outside] += np.random.default_rng(q).normal(size=(c, outside.sum()))  # V channels outside slice q
        p2 = nnx.clone(p)
        p2.v.kernel[...] = jnp.asarray(kernel)
        z1 = np.asarray(pool(p2, x))
        np.testing.assert_array_equal(z1[:, q * w:(q + 1) * w], z0[:, q * w:(q + 1) * w])
        assert np.abs(z1[:, outside] - z0[:, outside]).max() > 1e-3  # the perturbation did change V
    # and query q's attention map moves its own slice only: perturb query 0
    p3 = nnx.clone(p)
    p3.queries[...] = p3.queries[...].at[0].add(3.0)
    z3 = np.asarray(pool(p3, x))
    np.testing.assert_array_equal(z3[:, w:], z0[:, w:])
    assert np.abs(z3[:, :w] - z0[:, :w]).max() > 1e-4


@pytest.mark.parametrize("c,k,m,d_out,heads,bias", [(128, 10, 32, 1, 16, False), (96, 7, 8, 2, 12, True),
                                                     (64, 3, 4, 4, 4, False), (48, 100, 16, 3, 3, False)])
def test_param_counts_by_formula(c, k, m, d_out, heads, bias):
    ep = nnx.eval_shape(lambda: EfficientProbe(c, k, num_queries=m, d_out=d_out, qkv_bias=bias, rngs=nnx.Rngs(0)))
    assert count_params(ep) == m * c + c * (c // d_out) + bias * (c // d_out) + (c // d_out) * k + k
    ap = nnx.eval_shape(lambda: AttentiveProbe(c, k, heads=heads, qkv_bias=bias, rngs=nnx.Rngs(0)))
    assert count_params(ap) == 2 * c * c + 2 * c * bias + c + c * k + k
    lp = nnx.eval_shape(lambda: LinearProbe(c, k, rngs=nnx.Rngs(0)))
    assert count_params(lp) == c * k + k
    assert probe_param_count("efficient", c, k, num_queries=m, d_out=d_out, qkv_bias=bias) == count_params(ep)
    assert probe_param_count("attentive", c, k, qkv_bias=bias) == count_params(ap)
    assert probe_param_count("linear", c, k) == count_params(lp)
    if d_out == 1 and not bias:  # EP is lighter than AP at d_out=1 whenever M < C + 1
        assert count_params(ep) < count_params(ap)


def test_attentive_probe_matches_plain_math():
    c, h, k, b, t = 32, 4, 5, 6, 9
    p = AttentiveProbe(c, k, heads=h, num_queries=2, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (b, t, c), F32)
    out = nnx.jit(lambda m, x: m(x))(p, x)

    @jax.jit
    def plain(x, wk, wv, q, hw, hb):
        # plain: token BN over (batch, tokens) -> per-head softmax(q k / sqrt(d)) v -> mean over queries -> BN -> linear
        xf = x.reshape(-1, c)
        xn = ((xf - xf.mean(0)) / jnp.sqrt(xf.var(0) + 1e-6)).reshape(b, t, c)
        kk = (xn @ wk).reshape(b, t, h, c // h)
        vv = (xn @ wv).reshape(b, t, h, c // h)
        q = q.reshape(2, h, c // h)
        a = jax.nn.softmax(jnp.einsum("qhd,bthd->bhqt", q, kk) / np.sqrt(c // h), -1)
        z = jnp.einsum("bhqt,bthd->bqhd", a, vv).reshape(b, 2, c).mean(1)
        return batchnorm_reference(z) @ hw + hb

    want = plain(x, p.k.kernel[...], p.v.kernel[...], p.queries[...], p.head.kernel[...], p.head.bias[...])
    assert_close(out, want, F32, "attentive probe")


def test_linear_probe_cls_and_mean():
    c, k = 16, 4
    x = jax.random.normal(jax.random.key(2), (5, 3, c), F32)
    ref = jax.jit(lambda f, w, b: batchnorm_reference(f) @ w + b)
    for pool, feat in (("cls", x[:, 0]), ("mean", x.mean(1))):
        p = LinearProbe(c, k, pool=pool, rngs=nnx.Rngs(0))
        assert_close(nnx.jit(lambda m, x: m(x))(p, x), ref(feat, p.head.kernel[...], p.head.bias[...]), F32, pool)


def test_batchnorm_train_vs_eval():
    c, k = 16, 3
    p = EfficientProbe(c, k, num_queries=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 5, c), F32) * 3 + 1
    pr = _params(p)
    call = nnx.jit(lambda m, x: m(x))
    z = efficient_pool_reference(x, pr["queries"], pr["w_v"])
    call(p, x)  # train mode: updates the running statistics (PyTorch momentum 0.1)
    mean, var = np.asarray(p.norm.mean[...]), np.asarray(p.norm.var[...])
    np.testing.assert_allclose(mean, 0.1 * np.asarray(z.mean(0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, 0.9 + 0.1 * np.asarray(z.var(0)), rtol=1e-5, atol=1e-6)
    train_out = call(p, x)
    p.eval()
    eval_out = call(p, x)
    assert_close(eval_out, efficient_probe_reference(x, **pr, running_mean=p.norm.mean[...],
                                                     running_var=p.norm.var[...]), F32, "eval mode")
    assert np.abs(np.asarray(eval_out - train_out)).max() > 1e-3
    # eval mode: an example's logits do not depend on the rest of the batch, nor update the statistics
    assert_close(call(p, x[:1]), eval_out[:1], F32, "eval, batch of one")
    np.testing.assert_allclose(np.asarray(p.norm.mean[...]), mean * 0.9 + 0.1 * np.asarray(z.mean(0)),
                               rtol=1e-6, atol=1e-7)
    p.train()
    assert_close(call(p, x), efficient_probe_reference(x, **pr), F32, "train mode again")


def _tiny_vit(seed=0) -> ViT:
    cfg = ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, heads=2,
                    attn_impl="xla")
    return ViT(cfg, rngs=nnx.Rngs(seed))


def _tiny_data(n=24) -> ImageData:
    r = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = (r.integers(0, 60, (n, 8, 8, 1)) + 60 * y[:, None, None, None]).astype(np.uint8)
    return ImageData(x[:16], y[:16], x[16:], y[16:], ["a", "b", "c"], "synthetic", flip=False, crop=False)


def test_backbone_stays_frozen_online():
    """Online features: backbone + probe in one model, AdamW with weight decay on the Trainer's
    ``wrt=PROBE_PARAMS``: after steps the backbone is bit-identical, the probe has moved."""
    backbone, data = _tiny_vit(), _tiny_data()
    cfg = probe_task.ProbeConfig(probe="efficient", features="online", steps=3, batch_size=8, lr=1e-2,
                                 weight_decay=0.1, warmup=0)
    make_backbone = probe_task._backbone_factory(backbone)
    trainer = probe_task.make_probe_trainer(
        cfg, lambda rngs: probe_task.FrozenBackboneProbe(
            make_backbone(rngs), EfficientProbe(16, 3, num_queries=4, rngs=rngs), "patch"),
        mean=data.mean, std=data.std, wrt=probe_task.PROBE_PARAMS)
    snap = lambda m: [np.array(v) for v in jax.tree.leaves(nnx.state(m, nnx.Param))]  # noqa: E731
    start = trainer.model  # (its arrays are the trainer's, donated by the step: copy them now)
    start_backbone, start_probe = snap(start.backbone), snap(start.probe)
    for step in range(3):
        loss = float(trainer.step(data.train_batch(0, step, 8)))
        assert np.isfinite(loss)
    model = trainer.model
    after = snap(model.backbone)
    for before in (snap(backbone), start_backbone):
        assert len(before) == len(after) > 0
        for x, y in zip(before, after):
            np.testing.assert_array_equal(x, y)  # bit-identical
    moved = [np.abs(x - y).max() for x, y in zip(start_probe, snap(model.probe))]
    assert min(moved) > 0  # every probe parameter trained
    assert float(np.abs(np.asarray(model.probe.norm.mean[...])).max()) > 0  # BN statistics carried


@pytest.mark.slow
def test_probe_task_cached_end_to_end(tmp_path):
    backbone, data = _tiny_vit(1), _tiny_data()
    prepared = {"backbone": backbone, "data": data, "backbone_info": {"model": "tiny"}}
    tokens = {"train": probe_task.extract_tokens(backbone, data.x_train, data.mean, data.std, 8),
              "test": probe_task.extract_tokens(backbone, data.x_test, data.mean, data.std, 8)}
    assert tokens["train"].shape == (16, 5, 16)  # class token + 4 patches
    want = backbone.features(data.normalize(data.x_test[:3]))
    np.testing.assert_allclose(tokens["test"][:3], np.asarray(want), rtol=1e-5, atol=1e-5)
    accs = {}
    for kind in ("attentive",):  # the experiment (train/probe_experiment.py) runs all three
        cfg = probe_task.ProbeConfig(probe=kind, steps=30, batch_size=8, heads=2, lr=3e-2,
                                     eval_every=15, ckpt_every=30, time_steps=2, out=str(tmp_path / kind))
        res = probe_task.train(cfg, prepared=prepared, tokens=tokens, progress=False)
        accs[kind] = res["test_acc"]
        assert res["ms_per_step"] > 0 and (tmp_path / kind / "summary.json").exists()
        assert (tmp_path / kind / "metrics.csv").exists()
    assert max(accs.values()) >= 0.5, accs  # separable synthetic classes are learnt (chance 1/3)
    # token selection
    t = jnp.asarray(tokens["test"])
    assert probe_task.select_tokens(t, "patch", True).shape[1] == 4
    assert probe_task.select_tokens(t, "cls", True).shape[1] == 1
    with pytest.raises(ValueError, match="class token"):
        probe_task.select_tokens(t, "cls", False)


def test_errors(tmp_path, capsys):
    r = nnx.Rngs(0)
    with pytest.raises(ValueError, match="num_queries"):
        EfficientProbe(48, 10, num_queries=32, rngs=r)  # 48 not divisible by 32 * 1
    with pytest.raises(ValueError, match="num_queries \\* d_out = 64"):
        EfficientProbe(96, 10, num_queries=32, d_out=2, rngs=r)
    with pytest.raises(ValueError, match="d_out"):
        EfficientProbe(30, 10, num_queries=1, d_out=4, rngs=r)
    with pytest.raises(ValueError, match="num_queries must be a positive"):
        EfficientProbe(32, 10, num_queries=0, rngs=r)
    with pytest.raises(ValueError, match="heads"):
        AttentiveProbe(30, 10, heads=16, rngs=r)
    with pytest.raises(ValueError, match="pool"):
        LinearProbe(16, 3, pool="max", rngs=r)
    with pytest.raises(ValueError, match="probe must be one of"):
        create_probe("mlp", 16, 3, rngs=r)
    p = EfficientProbe(32, 4, num_queries=8, rngs=r)
    with pytest.raises(ValueError, match=r"x must have rank 3 \[batch, tokens, 32\]"):
        p(jnp.zeros((2, 32)))
    with pytest.raises(ValueError, match="32 channels"):
        p(jnp.zeros((2, 5, 16)))
    with pytest.raises(ValueError, match="floating"):
        p(jnp.zeros((2, 5, 32), jnp.int32))
    with pytest.raises(ValueError, match="--features"):
        probe_task.ProbeConfig(features="disk")
    with pytest.raises(ValueError, match="--tokens"):
        probe_task.ProbeConfig(tokens="cls")
    # command line
    from jaxattn.train.__main__ import main
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text('{"model": "tnl-tiny"}')
    for argv, msg in ((["--probe", "nope"], "invalid choice"), (["--steps", "0"], "--steps must be >= 1"),
                      (["--backbone-ckpt", str(tmp_path / "missing")], "no config.json"),
                      (["--backbone-ckpt", str(tmp_path / "lm")], "a run of 'tnl-tiny', not of an image model")):
        with pytest.raises(SystemExit):
            main(["probe", *argv, "--out", str(tmp_path / "cli"), "--no-progress"])
        assert msg in capsys.readouterr().err
