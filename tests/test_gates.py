"""Hard-attention gates and gradient routing: gate parameters are updated only from the gate pass,
backbone parameters only from the backbone pass (which sees the updated gates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.models.gates import FeatureGate, GateParam, TokenGate, gate_scores, gate_summary, param_labels
from jaxattn.train.routing import BACKBONE, RoutedTrainer, make_trainer


class GatedMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.gate = FeatureGate(8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.gate(self.fc1(x))))


def _loss(model, batch, rng):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _batch():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return {"x": np.asarray(jax.random.normal(k1, (8, 6))), "y": np.asarray(jax.random.randint(k2, (8,), 0, 3))}


def _functional(model):
    """loss(gate_logits, backbone_params) written against a copy of the model."""
    gdef, gates, backbone, rest = nnx.split(model, GateParam, BACKBONE, ...)

    def loss(g, b, batch):
        return _loss(nnx.merge(gdef, g, b, rest), batch, None)

    return gates, backbone, loss


def _params(trainer):
    model = trainer.model  # copied to numpy: the train step donates the state's buffers
    return tuple(jax.tree.map(np.array, nnx.state(model, f)) for f in (GateParam, BACKBONE))


@pytest.mark.parametrize("mode", ["routed", "joint"])
def test_routing_updates(mode):
    lr_b, lr_g = 0.1, 0.5
    trainer = make_trainer(mode, GatedMLP, optax.sgd(lr_b), _loss, gate_tx=optax.sgd(lr_g), batch_size=8)
    g0, b0 = _params(trainer)
    gates, backbone, loss = _functional(trainer.model)
    gates, backbone = jax.tree.map(np.array, (gates, backbone))
    batch = _batch()
    trainer.train_step(batch)
    g1, b1 = _params(trainer)

    dg = jax.grad(loss, 0)(gates, backbone, batch)
    expect_g1 = jax.tree.map(lambda p, d: p - lr_g * d, g0, dg)
    # routed: the backbone pass sees the updated gates; joint: the gradients share one pass
    gates_seen = expect_g1 if mode == "routed" else gates
    db = jax.grad(loss, 1)(gates_seen, backbone, batch)
    expect_b1 = jax.tree.map(lambda p, d: p - lr_b * d, b0, db)
    for got, want in ((g1, expect_g1), (b1, expect_b1)):
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
    if mode == "routed":  # and it differs from the gradient at the old gates (the test can fail)
        db_old = jax.grad(loss, 1)(gates, backbone, batch)
        assert max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(db), jax.tree.leaves(db_old))) > 1e-6


def test_each_pass_differentiates_only_its_variables():
    trainer = make_trainer("routed", GatedMLP, optax.sgd(0.1), _loss, batch_size=8)
    model = trainer.model
    batch = jax.tree.map(lambda x: x[None], _batch())  # [accum=1, micro, ...]
    g_grads, _, _ = trainer._pass(model, GateParam, _loss, batch, jax.random.key(0))
    b_grads, _, _ = trainer._pass(model, BACKBONE, _loss, batch, jax.random.key(0))
    g_paths = {p for p, _ in nnx.to_flat_state(g_grads)}
    b_paths = {p for p, _ in nnx.to_flat_state(b_grads)}
    assert g_paths == {("gate", "logits")}
    assert b_paths == {("fc1", "kernel"), ("fc1", "bias"), ("fc2", "kernel"), ("fc2", "bias")}


def test_gate_modules():
    rngs = nnx.Rngs(0)
    g = FeatureGate(16, rngs=rngs)
    s = g.scores()
    assert s.shape == (16,) and float(jnp.abs(s - 0.5).max()) < 0.45  # sigmoid of small logits
    x = jnp.ones((2, 4, 4, 16))
    np.testing.assert_allclose(g(x), x * s)
    t = TokenGate(5, rngs=rngs)
    y = t(jnp.ones((2, 5, 3)))
    np.testing.assert_allclose(y[0, :, 0], t.scores())
    hard = gate_scores(jnp.array([-1.0, 0.5]), hard=True)
    np.testing.assert_array_equal(hard, [0.0, 1.0])
    np.testing.assert_allclose(jax.grad(lambda z: gate_scores(z, hard=True).sum())(jnp.array([0.0])), [0.25])
    with pytest.raises(ValueError, match="FeatureGate over 16"):
        g(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="TokenGate over 5"):
        t(jnp.ones((2, 4, 3)))
    labels = param_labels(GatedMLP(nnx.Rngs(0)))
    assert labels["gate"]["logits"] == "gate" and labels["fc1"]["kernel"] == "backbone"
    assert set(gate_summary(GatedMLP(nnx.Rngs(0)))) == {"gate/logits"}


def test_routed_trainer_needs_gates():
    with pytest.raises(ValueError, match="needs a model with gates"):
        RoutedTrainer(lambda rngs: nnx.Linear(2, 2, rngs=rngs), optax.sgd(0.1), _loss, batch_size=2)
    with pytest.raises(ValueError, match="gate mode"):
        make_trainer("sometimes", GatedMLP, optax.sgd(0.1), _loss, batch_size=2)


@pytest.mark.parametrize("gates,n", [("features", 4), ("tokens", 5)])
def test_vit_gates_route(gates, n):
    """A gated ViT trains under routing: the gates move, and scores start near 0.5."""
    from jaxattn.models.vit import ViT, ViTConfig

    cfg = ViTConfig(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=2, heads=2,
                    attn_impl="xla", gates=gates)

    def loss(model, batch, rng):
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()

    trainer = make_trainer("routed", lambda rngs: ViT(cfg, rngs=rngs), optax.adam(1e-3), loss, batch_size=4)
    before = {k: np.array(v) for k, v in gate_summary(trainer.model).items()}
    assert len(before) == n
    batch = {"x": np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32),
             "y": np.array([0, 1, 2, 0])}
    out = trainer.train_step(batch)
    assert np.isfinite(float(out["loss"])) and np.isfinite(float(out["gate_loss"]))
    after = gate_summary(trainer.model)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in before)


def test_halonet_stage_gates():
    from jaxattn.models import create_model

    m = nnx.eval_shape(lambda: create_model("halonet-tiny", rngs=nnx.Rngs(0), gates=True))
    shapes = {k: v.shape for k, v in nnx.to_flat_state(nnx.state(m, GateParam))}
    assert len(shapes) == len(m.cfg.channels)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["routed", "joint"])  # (joint: test_routing_updates)
def test_image_cli_with_gates(tmp_path, mode):
    import csv

    from jaxattn.train.__main__ import main

    out = tmp_path / mode
    assert main(["image", "--model", "vit-tiny", "--gates", "features", "--gate-mode", mode, "--steps", "4",
                 "--batch-size", "8", "--eval-every", "0", "--log-every", "2", "--attn-impl", "xla",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert rows and all(float(r["loss"]) > 0 for r in rows if r["loss"])
    assert ("train_gate_loss" in rows[0]) == (mode == "routed")
    with pytest.raises(SystemExit):
        main(["image", "--model", "tnl-tiny", "--gates", "features", "--steps", "1", "--out", str(tmp_path / "x")])
