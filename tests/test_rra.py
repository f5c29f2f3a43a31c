"""Residual Relationship Attention + Relationship Position Encoding (jaxattn.models.rra): the math
against a numpy oracle, identity at init, batch-permutation equivariance, eval bypass, gradients, and
a short image-trainer run with ``rra=True``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models.rra import RBIClassifier, ResidualRelationshipAttention, relationship_position_encoding
from jaxattn.models.vit import ViT, ViTConfig

SMALL_VIT = ViTConfig(image_size=16, patch_size=4, in_channels=1, num_classes=10, dim=32, depth=1, heads=2)


def rpe_oracle(images: np.ndarray) -> np.ndarray:
    """Loops: PSNR_ij = -10 log10 MSE_ij, min-max over i != j, diagonal 1."""
    b = len(images)
    x = images.reshape(b, -1).astype(np.float64)
    psnr = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            psnr[i, j] = -10 * math.log10(max(np.mean((x[i] - x[j]) ** 2), 1e-10))
    off = ~np.eye(b, dtype=bool)
    lo, hi = psnr[off].min(), psnr[off].max()
    s = (psnr - lo) / (hi - lo)
    s[~off] = 1.0
    return s


def rra_oracle(m: ResidualRelationshipAttention, feats: np.ndarray, rel: np.ndarray | None) -> np.ndarray:
    w = {n: (np.asarray(getattr(m, n).kernel[...], np.float64), np.asarray(getattr(m, n).bias[...], np.float64))
         for n in "qkv"}
    b, d = feats.shape
    h, hd = m.heads, d // m.heads
    q, k, v = ((feats @ w[n][0] + w[n][1]).reshape(b, h, hd) for n in "qkv")
    out = np.zeros((b, h, hd))
    for head in range(h):
        logits = q[:, head] @ k[:, head].T / math.sqrt(hd)
        if rel is not None:
            logits = logits + rel
        a = np.exp(logits - logits.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        out[:, head] = a @ v[:, head]
    return feats + float(m.gamma[...]) * out.reshape(b, d)


def test_rpe_matches_oracle_and_is_a_relation():
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(5, 6, 6, 2)).astype(np.float32)
    s = np.asarray(relationship_position_encoding(jnp.asarray(imgs)))
    np.testing.assert_allclose(s, rpe_oracle(imgs), atol=2e-4)
    assert np.allclose(s, s.T) and np.allclose(np.diag(s), 1) and s.min() >= 0 and s.max() <= 1
    # nearer images are more related: a tiny perturbation of image 0 is its most similar partner
    imgs[3] = imgs[0] + 1e-2 * rng.normal(size=imgs[0].shape)
    s = np.asarray(relationship_position_encoding(jnp.asarray(imgs)))
    assert s[0, 3] == pytest.approx(1.0) and (s[0, [1, 2, 4]] < 0.99).all()
    # degenerate batches: all ones
    np.testing.assert_allclose(relationship_position_encoding(jnp.ones((2, 4, 4, 1))), np.ones((2, 2)))


@pytest.mark.parametrize("b,d,heads", [(7, 16, 1), (4, 24, 3)])
def test_rra_math_vs_oracle(b, d, heads):
    m = ResidualRelationshipAttention(d, heads=heads, gamma_init=0.7, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(b)
    feats = rng.normal(size=(b, d)).astype(np.float32)
    rel = rng.random((b, b)).astype(np.float32)
    for r in (None, rel):
        got = m(jnp.asarray(feats), None if r is None else jnp.asarray(r))
        assert got.shape == (b, d) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), rra_oracle(m, feats.astype(np.float64), r), atol=2e-5)


def test_rra_identity_at_init_and_gradients():
    m = ResidualRelationshipAttention(8, rngs=nnx.Rngs(0))  # gamma starts at 0
    x = jax.random.normal(jax.random.key(0), (5, 8))
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(x))

    def loss(mod, x):
        return jnp.sum(jnp.sin(mod(x)))

    g = nnx.grad(loss)(m, x)
    assert abs(float(g.gamma[...])) > 1e-6  # gamma learns first
    m.gamma[...] = jnp.asarray(0.5)
    g = nnx.grad(loss)(m, x)
    assert all(float(jnp.abs(getattr(g, n).kernel[...]).max()) > 0 for n in "qkv")
    with pytest.raises(ValueError, match=r"feats must be \[batch, 8\]"):
        m(jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match="relation must be"):
        m(x, jnp.zeros((4, 4)))


class TinyBackbone(nnx.Module):
    """A cheap stand-in backbone with the interface RBIClassifier reads: pool_features, head, num_features."""

    def __init__(self, rngs: nnx.Rngs, pixels: int = 256, num_features: int = 12, num_classes: int = 10):
        self.proj = nnx.Linear(pixels, num_features, rngs=rngs)
        self.head = nnx.Linear(num_features, num_classes, rngs=rngs)
        self.num_features = num_features

    def pool_features(self, images):
        return jnp.tanh(self.proj(images.reshape(images.shape[0], -1)))

    def __call__(self, images):
        return self.head(self.pool_features(images))


fwd = nnx.jit(lambda m, x: m(x))  # one compile per shape/mode instead of eager op-by-op dispatch


def _rbi(gamma=0.8):
    return RBIClassifier(TinyBackbone(nnx.Rngs(0)), rngs=nnx.Rngs(1), gamma_init=gamma)


def test_rbi_permutation_equivariant_and_eval_bypass():
    model = _rbi()
    imgs = jax.random.normal(jax.random.key(1), (6, 16, 16, 1))
    out = fwd(model, imgs)
    assert out.shape == (6, 10) and out.dtype == jnp.float32
    np.testing.assert_allclose(  # = head(RRA(features, RPE(images))) written out
        np.asarray(out), np.asarray(model.backbone.head(model.rra(model.backbone.pool_features(imgs),
                                                                  relationship_position_encoding(imgs)))),
        atol=1e-6)
    perm = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(np.asarray(fwd(model, imgs[perm])), np.asarray(out)[perm], atol=1e-5)
    plain = fwd(model.backbone, imgs)
    assert float(jnp.abs(out - plain).max()) > 1e-3  # training mode mixes the batch
    # a row's output depends on the other rows in training mode ...
    assert float(jnp.abs(fwd(model, imgs[:3]) - out[:3]).max()) > 1e-4
    model.eval()  # ... and not in eval mode: RRA is bypassed, output = the backbone's
    np.testing.assert_allclose(np.asarray(fwd(model, imgs)), np.asarray(plain), atol=1e-6)
    np.testing.assert_allclose(np.asarray(fwd(model, imgs[:3])), np.asarray(plain[:3]), atol=1e-6)
    model.train()
    np.testing.assert_allclose(np.asarray(fwd(model, imgs)), np.asarray(out), atol=1e-6)


def test_rbi_vit_zero_gamma_and_eval_equal_backbone_and_rejects_bad_backbone():
    model = RBIClassifier(ViT(SMALL_VIT, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), gamma_init=0.0)
    imgs = jax.random.normal(jax.random.key(2), (4, 16, 16, 1))
    plain = np.asarray(fwd(model.backbone, imgs))  # the ViT's own logits
    np.testing.assert_allclose(np.asarray(fwd(model, imgs)), plain, atol=1e-6)  # gamma 0: identity
    model.rra.gamma[...] = jnp.asarray(1.0)
    assert np.abs(np.asarray(fwd(model, imgs)) - plain).max() > 1e-4
    model.eval()
    np.testing.assert_allclose(np.asarray(fwd(model, imgs)), plain, atol=1e-6)
    with pytest.raises(ValueError, match="RBIClassifier needs a backbone"):
        RBIClassifier(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_rbi_halonet_backbone():
    from jaxattn.models import create_model

    bb = create_model("halonet-tiny", rngs=nnx.Rngs(0), num_classes=5, image_size=16, in_channels=1)
    model = RBIClassifier(bb, rngs=nnx.Rngs(1), gamma_init=0.5)
    imgs = jax.random.normal(jax.random.key(3), (3, 16, 16, 1))
    assert model(imgs).shape == (3, 5)
    model.eval()
    bb.eval()
    np.testing.assert_allclose(np.asarray(model(imgs)), np.asarray(bb(imgs)), atol=1e-5)


def test_image_training_with_rra(tmp_path, monkeypatch):
    from jaxattn.train.image import ImageConfig, default_model_factory, evaluate, make_image_trainer
    from jaxattn.train.images import ImageData, load_digits

    digits = load_digits(16)
    data = ImageData(digits.x_train[:128], digits.y_train[:128], digits.x_test[:64], digits.y_test[:64],
                     digits.classes, digits.source, digits.flip)
    cfg = ImageConfig(image_size=16, batch_size=16, steps=4, warmup=1, eval_every=4, ckpt_every=4, log_every=1,
                      eval_batch_size=64, out=str(tmp_path / "run"), rra=True, model="vit-tiny")
    # --rra wraps the registry's model (a cheap stand-in here)
    monkeypatch.setattr("jaxattn.models.create_model", lambda name, rngs, **kw: TinyBackbone(rngs))
    assert isinstance(default_model_factory(cfg, data)(nnx.Rngs(0)), RBIClassifier)
    # the trainer's jitted step (train mode: RRA on) and eval step (eval mode: RRA bypassed)
    trainer = make_image_trainer(cfg, data, lambda rngs: RBIClassifier(TinyBackbone(rngs), rngs=rngs))
    losses = [float(trainer.train_step(data.train_batch(cfg.seed, step, cfg.batch_size))["loss"])
              for step in range(cfg.steps)]
    assert np.isfinite(losses).all()
    scores, _ = evaluate(trainer, data, cfg.eval_batch_size)
    assert 0.0 <= scores["test_acc"] <= 1.0
    model = trainer.model
    assert float(jnp.abs(model.rra.gamma[...])) > 0  # the plug-in was trained
    # eval predictions are the backbone's alone: the same with any batch composition
    x = jnp.asarray(data.x_test[:8], jnp.float32)
    model.eval()
    np.testing.assert_allclose(np.asarray(model(x[:3])), np.asarray(model(x)[:3]), atol=1e-5)


def test_cli_has_rra_flag():
    import argparse

    from jaxattn.train.image import ImageConfig
    from jaxattn.train.loop import add_config_args, config_from_args

    p = argparse.ArgumentParser()
    add_config_args(p, ImageConfig)
    cfg = config_from_args(ImageConfig, vars(p.parse_args(["--rra"])))
    assert cfg.rra is True
