"""Attention rollout, patch importance and the attention-map plots (jaxattn.viz, train hooks)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxattn.viz import attention_rollout, patch_importance, plot_image_attention, plot_token_attention


def _perm(p: list[int]) -> np.ndarray:
    """Attention matrix in which query i attends only to key p[i]."""
    m = np.zeros((len(p), len(p)))
    m[np.arange(len(p)), p] = 1.0
    return m[None, None]  # [B=1, heads=1, N, N]


def test_rollout_hand_computed_two_layers():
    a = np.array([[0.5, 0.5], [0.0, 1.0]])[None, None]
    r = attention_rollout([a, a])  # each layer: 0.5 A + 0.5 I = [[.75, .25], [0, 1]]
    np.testing.assert_allclose(r[0], [[0.5625, 0.4375], [0.0, 1.0]], atol=1e-12)


def test_rollout_composes_layers_in_order():
    # residual 0: rollout is the product of the layers, last layer on the left (query side):
    # output i reads layer-2 key p2[i], which read layer-1 key p1[p2[i]].
    p1, p2 = [1, 2, 0, 3], [0, 0, 3, 1]
    r = attention_rollout([_perm(p1), _perm(p2)], residual=0.0)[0]
    want = np.zeros((4, 4))
    for i in range(4):
        want[i, p1[p2[i]]] = 1.0
    np.testing.assert_array_equal(r, want)
    assert not np.array_equal(r, attention_rollout([_perm(p2), _perm(p1)], residual=0.0)[0])


def test_rollout_heads_averaged_rows_sum_to_one(rng):
    w = rng.random((3, 4, 5, 5))
    w /= w.sum(-1, keepdims=True)
    r = attention_rollout([w, w[:, ::-1]])
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-12)
    one = attention_rollout([w], residual=0.0)
    np.testing.assert_allclose(one, w.mean(1), atol=1e-12)
    eye = np.broadcast_to(np.eye(5), (3, 2, 5, 5))
    np.testing.assert_allclose(attention_rollout([eye, eye, eye]), np.broadcast_to(np.eye(5), (3, 5, 5)))


def test_patch_importance_cls_and_mean():
    # the class token (index 0) attends to patch 2 only; patches attend to themselves
    a = np.eye(5)
    a[0] = [0, 0, 0, 1, 0]
    imp = patch_importance([a[None, None]], rollout=False)
    np.testing.assert_allclose(imp, [[0, 0, 1, 0]])
    mean = patch_importance([np.eye(4)[None, None]], pool="mean")
    np.testing.assert_allclose(mean, [[0.25] * 4])
    roll = patch_importance([a[None, None]] * 2)
    assert roll.shape == (1, 4) and np.isclose(roll.sum(), 1.0) and roll[0].argmax() == 2


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="weights"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"weights\[0\].*\[batch, heads, N, N\]"):
        attention_rollout([np.ones((2, 3, 4))])
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        attention_rollout([np.ones((1, 1, 3, 3)), np.ones((1, 1, 4, 4))])
    with pytest.raises(ValueError, match="pool"):
        patch_importance([np.ones((1, 1, 3, 3))], pool="max")
    with pytest.raises(ValueError, match="residual"):
        attention_rollout([np.ones((1, 1, 3, 3))], residual=2.0)


def test_plots_write_pngs(tmp_path, rng):
    w = rng.random((2, 3, 17, 17))
    w /= w.sum(-1, keepdims=True)
    images = rng.integers(0, 255, (2, 16, 16, 1), dtype=np.uint8)
    assert plot_image_attention(images, [w, w], tmp_path / "img.png", titles=["a", "b"])
    assert (tmp_path / "img.png").stat().st_size > 2000
    with pytest.raises(ValueError, match="square grid"):
        plot_image_attention(images, [w[..., :16, :16]], tmp_path / "x.png", num_prefix_tokens=1)
    toks = [["the", "movie", "was", "great"], list("abc")]
    assert plot_token_attention(toks, [np.array([0.1, 0.2, 0.1, 0.6]), np.ones(3) / 3], tmp_path / "t.png",
                                rationales=[np.array([0, 0, 0, 1]), np.zeros(3)])
    assert (tmp_path / "t.png").stat().st_size > 2000
    with pytest.raises(ValueError, match="attention"):
        plot_token_attention(toks, [np.ones(4)], tmp_path / "y.png")
    with pytest.raises(ValueError, match=r"attention\[1\]"):
        plot_token_attention(toks, [np.ones(4), np.ones(2)], tmp_path / "y.png")


def test_image_trainer_hook_vit_and_not_halonet(tmp_path, rng):
    from flax import nnx

    from jaxattn.models import create_model
    from jaxattn.train.image import attention_weights, plot_attention_examples
    from jaxattn.train.images import ImageData

    x = rng.integers(0, 255, (12, 16, 16, 1), dtype=np.uint8)
    data = ImageData(x_train=x, y_train=np.arange(12) % 3, x_test=x[:4], y_test=np.arange(4) % 3,
                     classes=["a", "b", "c"], source="synthetic", flip=False)
    vit = create_model("vit-tiny", rngs=nnx.Rngs(0), num_classes=3, image_size=16, in_channels=1)
    vit.eval()
    got = attention_weights(vit, data.normalize(x[:2]))
    assert got is not None and got[0].shape == (2, 3) and len(got[1]) == vit.cfg.depth
    assert plot_attention_examples(vit, data, tmp_path / "a.png", n=4)
    assert (tmp_path / "a.png").stat().st_size > 2000
    halo = create_model("halonet-tiny", rngs=nnx.Rngs(0), num_classes=3, image_size=16, in_channels=1)
    halo.eval()
    assert attention_weights(halo, data.normalize(x[:2])) is None
    assert not plot_attention_examples(halo, data, tmp_path / "h.png") and not (tmp_path / "h.png").exists()
