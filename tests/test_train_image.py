"""Image classification on the shared loop: loaders, augmentation, BatchNorm state, optimizer
factories, training, exact resume, artefacts, CLI errors."""

from __future__ import annotations

import csv
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.train import loop
from jaxattn.train.image import ImageConfig, train
from jaxattn.train.images import (ImageData, augment_batch, load_digits, load_images, make_augment,
                                  random_crop_flip)
from jaxattn.train.metrics import classification_scores, confusion_matrix


class SmallCNN(nnx.Module):
    """Conv-BN-ReLU x2, 2x2 average pool, linear: the test model (no dependency on registered models)."""

    def __init__(self, rngs: nnx.Rngs, num_classes: int = 10, in_channels: int = 1, width: int = 16,
                 image_size: int = 16):
        self.c1 = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, momentum=0.8, rngs=rngs)
        self.c2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, momentum=0.8, rngs=rngs)
        self.head = nnx.Linear(2 * width * (image_size // 4) ** 2, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.c1(x)))
        x = nnx.avg_pool(nnx.relu(self.bn2(self.c2(x))), (2, 2), (2, 2))
        return self.head(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def digits16():
    return load_digits(16)


def small(digits: ImageData, n_train=256, n_test=64) -> ImageData:
    return ImageData(digits.x_train[:n_train], digits.y_train[:n_train], digits.x_test[:n_test],
                     digits.y_test[:n_test], digits.classes, digits.source, digits.flip)


def icfg(tmp_path, **kw):
    base = dict(image_size=16, batch_size=16, steps=6, warmup=2, lr=3e-3, eval_every=3, ckpt_every=3,
                log_every=1, eval_batch_size=64, out=str(tmp_path / "run"))
    base.update(kw)
    return ImageConfig(**base)


# -- data --------------------------------------------------------------------------------
def _cifar_rows(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_and_cifar100_pickles(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    rows = {}
    for i in (1, 2):
        rows[i] = _cifar_rows(5, i)
        _dump(c10 / f"data_batch_{i}", {b"data": rows[i], b"labels": [i, 0, 9, 3, i]})
    test = _cifar_rows(4, 9)
    test[0, :1024], test[0, 1024:2048], test[0, 2048:] = 10, 20, 30  # R, G, B planes
    _dump(c10 / "test_batch", {b"data": test, b"labels": [1, 2, 3, 4]})
    _dump(c10 / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    d = load_images(str(c10))
    assert d.x_train.shape == (10, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.y_train.dtype == np.int32 and d.y_train.tolist() == [1, 0, 9, 3, 1, 2, 0, 9, 3, 2]
    assert d.x_test.shape == (4, 32, 32, 3) and d.classes[3] == "c3" and d.num_classes == 10 and d.flip
    assert (d.x_test[0] == np.array([10, 20, 30], np.uint8)).all()
    np.testing.assert_array_equal(d.x_train[0, 0, :, 0], rows[1][0, :32])  # row-major planes
    assert load_images(str(c10), image_size=16).x_train.shape == (10, 16, 16, 3)

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    _dump(c100 / "train", {b"data": _cifar_rows(6, 3), b"fine_labels": [0, 99, 5, 5, 7, 1],
                           b"coarse_labels": [0] * 6})
    _dump(c100 / "test", {b"data": _cifar_rows(2, 4), b"fine_labels": [99, 2], b"coarse_labels": [0, 0]})
    _dump(c100 / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    d = load_images(str(c100))
    assert d.num_classes == 100 and d.y_train.tolist() == [0, 99, 5, 5, 7, 1] and d.y_test.tolist() == [99, 2]
    assert d.x_train.shape == (6, 32, 32, 3) and d.classes[99] == "f99"
    with pytest.raises(ValueError, match="CIFAR-10 needs"):
        load_images(str(c100), dataset="cifar10")


def _png(path, color):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), color, np.uint8)).save(path)


def test_image_folder_tree_and_single_root(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("val", 1)):
        for c, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 100))):
            for i in range(n):
                _png(root / split / c / f"{i}.png", color)
    d = load_images(str(root), image_size=8)
    assert d.x_train.shape == (6, 8, 8, 3) and d.x_test.shape == (2, 8, 8, 3) and d.classes == ["cat", "dog"]
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 1]
    assert (d.x_train[0] == [200, 0, 0]).all() and (d.x_test[1] == [0, 0, 100]).all()

    flat = tmp_path / "flat"
    for c in ("a", "b", "c"):
        for i in range(5):
            _png(flat / c / f"{i}.jpg", (i * 10, 50, 50))
    d1 = load_images(str(flat), image_size=8, val_fraction=0.2)
    d2 = load_images(str(flat), image_size=8, val_fraction=0.2)
    assert len(d1.x_train) == 12 and len(d1.x_test) == 3 and d1.num_classes == 3
    np.testing.assert_array_equal(d1.y_test, d2.y_test)  # the split depends only on the seed
    with pytest.raises(ValueError, match="no such file"):
        load_images(str(tmp_path / "missing"))
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_images(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ValueError, match="needs Pillow"):
        load_images(str(flat))


def test_image_folder_modes_and_unreadable_files(tmp_path, capsys):
    """Any Pillow mode becomes 8-bit RGB (16-bit grey scaled, not clipped white; palette, grey+alpha,
    CMYK JPEG); a file that is not an image is skipped and named, not a crash mid-load."""
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.full((6, 6), 32768, np.uint16)).save(root / "a" / "grey16.png")
    Image.fromarray(np.full((6, 6, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE).save(
        root / "a" / "pal.png")
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).convert("LA").save(root / "b" / "la.png")
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).convert("CMYK").save(root / "b" / "cmyk.jpg")
    (root / "b" / "broken.png").write_bytes(b"not a png")
    d = load_images(str(root), image_size=6, val_fraction=0.5)
    x = np.concatenate([d.x_train, d.x_test])
    y = np.concatenate([d.y_train, d.y_test])
    assert x.shape == (4, 6, 6, 3) and sorted(y.tolist()) == [0, 0, 1, 1]
    assert "skipped 1 unreadable image file(s):" in capsys.readouterr().out
    grey = x[np.flatnonzero((x == 128).all(axis=(1, 2, 3)))]
    assert len(grey) == 1  # 32768 / 65535 of full scale (Pillow's own conversion gives 255)
    assert any((im == (10, 200, 30)).all() for im in x)


def test_image_folder_cache_decodes_once(tmp_path, monkeypatch):
    """Large folders are decoded once into a memory-mapped cache (here: any size); a second load maps
    it (same arrays, no decoding), and a changed file makes a new cache."""
    import jaxattn.train.images as images

    monkeypatch.setattr(images, "CACHE_MIN_IMAGES", 1)
    monkeypatch.setenv("JAXATTN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    for c, color in (("a", (200, 0, 0)), ("b", (0, 0, 100))):
        for i in range(4):
            _png(root / c / f"{i}.png", (color[0], i * 20, color[2]))
    (root / "b" / "broken.png").write_bytes(b"x")
    d1 = load_images(str(root), image_size=8, val_fraction=0.25)
    assert isinstance(d1.x_train, np.memmap) and len(d1.x_train) + len(d1.x_test) == 8
    assert len(list((tmp_path / "cache" / "images").glob("*/labels.npy"))) == 2  # both splits
    monkeypatch.setattr(images, "_to_rgb", None)  # no decoding on the second load
    d2 = load_images(str(root), image_size=8, val_fraction=0.25)
    np.testing.assert_array_equal(d1.x_train, d2.x_train)
    np.testing.assert_array_equal(d1.y_test, d2.y_test)
    monkeypatch.undo()
    monkeypatch.setattr(images, "CACHE_MIN_IMAGES", 1)
    monkeypatch.setenv("JAXATTN_CACHE", str(tmp_path / "cache"))
    _png(root / "a" / "0.png", (1, 2, 3))  # changed content (and size / time): decoded again
    d3 = load_images(str(root), image_size=8, val_fraction=0.25)
    assert any((im == (1, 2, 3)).all() for im in np.concatenate([d3.x_train, d3.x_test]))


def test_channel_stats_in_chunks_equal_numpy():
    from jaxattn.train.images import channel_stats

    x = np.random.default_rng(0).integers(0, 256, (2500, 5, 6, 3), dtype=np.uint8)
    x[:, :, :, 2] //= 7  # channels with different statistics
    mean, std = channel_stats(x, chunk=1000)  # two full chunks and a ragged one
    f = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, f.std(0), rtol=1e-5)


def test_digits_split_normalisation_and_batches(digits16):
    d = digits16
    assert d.x_train.shape == (1437, 16, 16, 1) and d.x_test.shape == (360, 16, 16, 1)
    assert d.x_train.dtype == np.uint8 and not d.flip and d.num_classes == 10
    assert np.bincount(d.y_test).min() >= 35  # stratified
    np.testing.assert_array_equal(load_digits(16).y_test, d.y_test)
    x = d.normalize(d.x_train)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-3)
    assert load_digits(32).x_train.shape[1:] == (32, 32, 1)
    b = d.train_batch(seed=3, step=7, batch_size=100)
    np.testing.assert_array_equal(b["image"], d.train_batch(3, 7, 100)["image"])
    assert b["image"].shape == (100, 16, 16, 1) and b["label"].dtype == np.int32
    assert not np.array_equal(b["label"], d.train_batch(3, 8, 100)["label"])
    # each epoch is a permutation: the first 50 examples of a 50-image set are all of them
    x = np.zeros((50, 2, 2, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(50)
    ids = ImageData(x, np.arange(50) % 10, x[:5], np.arange(5), d.classes, "ids", False)
    pos = np.concatenate([ids.train_batch(1, s, 8)["image"][:, 0, 0, 0] for s in range(7)])
    assert sorted(pos[:50]) == list(range(50)) and len(set(pos[50:])) == 6


@pytest.mark.slow
def test_augmentations():
    x = jnp.asarray(np.random.default_rng(0).integers(1, 256, (8, 6, 5, 3)), jnp.uint8)
    key = jax.random.key(1)
    same = augment_batch(x, key, padding=0, flip=False)
    np.testing.assert_array_equal(same, x)
    flipped = np.asarray(augment_batch(x, key, padding=0, flip=True))
    mirrored = [bool((f == np.asarray(i)[:, ::-1]).all()) for f, i in zip(flipped, x)]
    kept = [bool((f == np.asarray(i)).all()) for f, i in zip(flipped, x)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    cropped = np.asarray(augment_batch(x, key, padding=2, flip=False))
    assert cropped.shape == x.shape and cropped.dtype == np.uint8
    for c, i in zip(cropped, np.asarray(x)):  # a window of the zero-padded image
        p = np.pad(i, ((2, 2), (2, 2), (0, 0)))
        assert any((p[dy:dy + 6, dx:dx + 5] == c).all() for dy in range(5) for dx in range(5))
    assert len({np.asarray(c).tobytes() for c in cropped}) == 8
    both = augment_batch(x, key, padding=2, flip=True)
    np.testing.assert_array_equal(both, augment_batch(x, key, padding=2, flip=True))
    # the step's keys are a function of (seed, step) only
    a1, l1 = loop.step_keys(0, 5)
    a2, _ = loop.step_keys(0, 5)
    a3, _ = loop.step_keys(0, 6)
    np.testing.assert_array_equal(augment_batch(x, a1), augment_batch(x, a2))
    assert not np.array_equal(augment_batch(x, a1), augment_batch(x, a3))
    assert not np.array_equal(jax.random.key_data(a1), jax.random.key_data(l1))
    # per-example keys follow global position: the [accum, micro] layout gives the same result
    aug = make_augment(2, True)
    flat = loop.apply_augment(aug, {"image": x}, a1)["image"]
    nested = loop.apply_augment(aug, {"image": x.reshape(2, 4, 6, 5, 3)}, a1, lead_dims=2)["image"]
    np.testing.assert_array_equal(flat, np.asarray(nested).reshape(x.shape))
    np.testing.assert_array_equal(random_crop_flip(x[0], key, padding=0, flip=False), x[0])
    # RandAugment after the crop / flip, per example, uint8 (its ops: tests/test_randaugment.py)
    from jaxattn.train.randaugment import rand_augment

    ra = make_augment(0, False, dict(num_ops=2, prob=1.0))
    got = np.asarray(loop.apply_augment(ra, {"image": x}, a1)["image"])
    keys = jax.random.split(a1, 8)
    one = jax.jit(lambda im, k: rand_augment(im, jax.random.split(k)[1], num_ops=2, prob=1.0))
    want = [np.asarray(one(x[i], keys[i])) for i in range(8)]
    np.testing.assert_array_equal(got, np.stack(want))
    assert got.dtype == np.uint8 and not np.array_equal(got, x)


def test_mixup_and_cutmix():
    """timm's batch-mode Mixup / CutMix: blend or paste with the mirrored batch, lam the kept share;
    the target lam * y + (1 - lam) * y_partner (label-smoothed) in the loss; a pure function of the key."""
    from jaxattn.train.image import classification_loss
    from jaxattn.train.images import mix_batch

    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 10, 8, 3)), jnp.uint8)
    y = jnp.arange(6) % 4
    xf = np.asarray(x, np.float32)
    lams = []
    for i in range(40):
        key = jax.random.key(i)
        m, partner, lam = mix_batch(x, y, key, mixup=0.8)
        np.testing.assert_array_equal(partner, np.asarray(y)[::-1])
        np.testing.assert_allclose(m, float(lam) * xf + (1 - float(lam)) * xf[::-1], rtol=1e-5, atol=1e-3)
        lams.append(float(lam))
        c, _, lam_c = mix_batch(x, y, key, cutmix=1.0)
        from_partner = (np.asarray(c) == xf[::-1]).all(-1) & ~(xf == xf[::-1]).all(-1)
        assert ((np.asarray(c) == xf) | (np.asarray(c) == xf[::-1])).all()  # each pixel from one image
        frac = from_partner[0].mean()  # one box for the whole batch
        assert all((f == from_partner[0]).all() for f in from_partner[:3])
        np.testing.assert_allclose(1 - float(lam_c), frac, atol=1e-6)
    assert 0.3 < np.mean(lams) < 0.7 and min(lams) < 0.2 and max(lams) > 0.8  # Beta(0.8, 0.8)
    np.testing.assert_array_equal(mix_batch(x, y, jax.random.key(3), mixup=0.8, cutmix=1.0)[0],
                                  mix_batch(x, y, jax.random.key(3), mixup=0.8, cutmix=1.0)[0])
    kinds = set()
    for i in range(30):  # both on: some batches cut, some blended
        m, _, lam = mix_batch(x, y, jax.random.key(100 + i), mixup=0.8, cutmix=1.0)
        kinds.add(bool(((np.asarray(m) == xf) | (np.asarray(m) == xf[::-1])).all()))
    assert kinds == {True, False}
    off, _, lam = mix_batch(x, y, jax.random.key(0), mixup=0.8, prob=0.0)
    np.testing.assert_array_equal(off, xf)
    assert float(lam) == 1.0
    with pytest.raises(ValueError, match="one of them > 0"):
        mix_batch(x, y, jax.random.key(0))

    class Fixed(nnx.Module):  # logits that ignore the input
        def __call__(self, images):
            return jnp.tile(jnp.asarray([[2.0, -1.0, 0.5, 0.0]]), (images.shape[0], 1))

    lam = 0.3
    batch = {"image": x, "label": y, "mix_label": y[::-1], "mix_lam": jnp.float32(lam)}
    loss, _ = classification_loss(Fixed(), batch, 0.0, 1.0, num_classes=4, label_smoothing=0.1)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray([2.0, -1.0, 0.5, 0.0])))
    smooth = lambda t: np.eye(4)[t] * 0.9 + 0.1 / 4  # noqa: E731
    target = lam * smooth(np.asarray(y)) + (1 - lam) * smooth(np.asarray(y)[::-1])
    np.testing.assert_allclose(float(loss), -(target * logp).sum(-1).mean(), rtol=1e-6)


def test_random_erasing():
    """timm's RandomErasing (pixel mode): one box of 2-33 % of the image, aspect in [0.3, 3.3], filled with
    noise that is N(0, 1) after normalisation; untouched elsewhere; nothing with probability 0."""
    from jaxattn.train.images import random_erase

    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3)), jnp.uint8)
    mean, std = np.asarray([0.4, 0.5, 0.6], np.float32), np.asarray([0.2, 0.25, 0.3], np.float32)
    fills = []
    for i in range(30):
        out = np.asarray(random_erase(x, jax.random.key(i), mean, std, prob=1.0))
        changed = (out != np.asarray(x, np.float32)).any(-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert changed.sum() == h * w  # one rectangle
        assert 0.015 <= h * w / (40 * 30) <= 0.36 and 0.25 <= h / w <= 4.0
        fills.append((out[changed] / 255.0 - mean) / std)
    fills = np.concatenate(fills)
    assert abs(fills.mean()) < 0.05 and abs(fills.std() - 1.0) < 0.05
    np.testing.assert_array_equal(random_erase(x, jax.random.key(1), mean, std, prob=0.0), np.asarray(x, np.float32))
    np.testing.assert_array_equal(random_erase(x, jax.random.key(1), mean, std), random_erase(x, jax.random.key(1), mean, std))
    hits = [bool((np.asarray(random_erase(x, jax.random.key(i), mean, std, prob=0.25)) != np.asarray(x)).any())
            for i in range(200)]
    assert 0.15 < np.mean(hits) < 0.35


@pytest.mark.slow
def test_trainer_mixes_batches_with_the_step_key(tmp_path, digits16):
    """--erase-prob, --mixup / --cutmix reach the training loss: the trainer's loss is the loss of the batch
    erased and mixed with the key it is given (and differs from the plain loss)."""
    from jaxattn.train.image import ImageTrainer, classification_loss
    from jaxattn.train.images import mix_batch, random_erase

    d = small(digits16, n_train=32)
    trainer = ImageTrainer(icfg(tmp_path, mixup=0.8, cutmix=1.0, erase_prob=0.5), d, SmallCNN)
    model = trainer.model
    batch = {"image": jnp.asarray(d.x_train[:16]), "label": jnp.asarray(d.y_train[:16])}
    key = jax.random.key(7)
    got, _ = trainer.loss_fn(model, batch, key)
    keys = jax.random.split(jax.random.fold_in(key, 1), 16)  # erasing per image, then mixing
    erased = jnp.stack([random_erase(im, k, d.mean, d.std, prob=0.5) for im, k in zip(batch["image"], keys)])
    assert not np.array_equal(erased, np.asarray(batch["image"], np.float32))
    image, partner, lam = mix_batch(erased, batch["label"], key, mixup=0.8, cutmix=1.0)
    want, _ = classification_loss(model, {**batch, "image": image, "mix_label": partner, "mix_lam": lam},
                                  d.mean, d.std, num_classes=d.num_classes)
    plain, _ = classification_loss(model, batch, d.mean, d.std, num_classes=d.num_classes)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert abs(float(got) - float(plain)) > 1e-4


def test_weight_ema(tmp_path, digits16):
    """loop.with_ema: the moving average d * ema + (1 - d) * params with d = min(decay, (1 + n) / (10 + n)),
    kept in the optimizer state; ema_model / eval_step(ema=True) evaluate it, BatchNorm statistics as trained."""
    from jaxattn.train.image import classification_loss

    d = small(digits16, n_train=64)
    mean, std = d.mean, d.std

    def loss_fn(model, batch, rng):
        return classification_loss(model, batch, mean, std, num_classes=10)

    def eval_fn(model, batch):
        return {"loss": loss_fn(model, batch, None)[0]}

    t = loop.Trainer(SmallCNN, loop.with_ema(optax.sgd(0.5), 0.6), loss_fn, batch_size=16, eval_fn=eval_fn)
    ema = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(t.model, nnx.Param))}
    for n in range(1, 5):
        s = slice(16 * (n - 1), 16 * n)
        t.train_step({"image": d.x_train[s], "label": d.y_train[s]})
        dec = min(0.6, (1 + n) / (10 + n))
        ema = {k: dec * e + (1 - dec) * np.asarray(v)
               for (k, e), (_, v) in zip(ema.items(), nnx.to_flat_state(nnx.state(t.model, nnx.Param)))}
    got = dict(nnx.to_flat_state(nnx.state(t.ema_model, nnx.Param)))
    for k, want in ema.items():
        np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t.ema_model.bn1.mean[...], t.model.bn1.mean[...])
    batch = {"image": d.x_test[:32], "label": d.y_test[:32]}
    np.testing.assert_allclose(float(t.eval_step(batch, ema=True)["loss"]), float(eval_fn(t.ema_model, batch)["loss"]),
                               rtol=1e-5)
    assert abs(float(t.eval_step(batch, ema=True)["loss"]) - float(t.eval_step(batch)["loss"])) > 1e-4
    plain = loop.Trainer(SmallCNN, optax.sgd(0.5), loss_fn, batch_size=16)
    with pytest.raises(ValueError, match="no parameter EMA"):
        plain.eval_step(batch, ema=True)
    with pytest.raises(ValueError, match="EMA decay"):
        loop.with_ema(optax.sgd(0.1), 1.0)


def test_classification_scores_match_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    cm = confusion_matrix(y, p, 6)
    s = classification_scores(cm)
    assert cm.sum() == 200 and cm[5].sum() == 0
    assert s["acc"] == pytest.approx((y == p).mean())
    assert s["f1"] == pytest.approx(f1_score(y, p, average="macro"))


# -- the loop ----------------------------------------------------------------------------
class Tagged(nnx.Param):
    """A parameter kind trained by its own optimizer (like gate logits)."""


class Gated(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 3, rngs=rngs)
        self.gate = Tagged(jnp.zeros((4,)))

    def __call__(self, x):
        return self.lin(x * jax.nn.sigmoid(self.gate[...]))


def test_optimizer_factory_multi_transform_and_accumulation():
    def labels(model):
        return jax.tree.map(lambda v: "gate" if isinstance(v, Tagged) else "rest", nnx.state(model, nnx.Param),
                            is_leaf=lambda v: isinstance(v, nnx.Variable))

    def opt(model, gate_lr):
        return optax.multi_transform({"rest": optax.sgd(0.1), "gate": optax.sgd(gate_lr)}, labels(model))

    def loss_fn(model, batch, rng):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32), "y": rng.normal(size=(8, 3)).astype(np.float32)}
    t = loop.Trainer(Gated, lambda m: opt(m, 0.0), loss_fn, batch_size=8)
    w0, g0 = np.asarray(t.model.lin.kernel[...]), np.asarray(t.model.gate[...])
    t.step(batch)
    assert not np.allclose(t.model.lin.kernel[...], w0)
    np.testing.assert_array_equal(t.model.gate[...], g0)  # its optimizer has lr 0
    outs = []
    for accum in (1, 4):
        t = loop.Trainer(Gated, lambda m: opt(m, 1.0), loss_fn, batch_size=8, grad_accum=accum)
        loss = t.step(batch)
        outs.append((float(loss), np.asarray(t.model.gate[...])))
    assert not np.allclose(outs[0][1], g0)
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6)
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="--batch-size 8 must be divisible by --grad-accum 3"):
        loop.Trainer(Gated, optax.sgd(0.1), loss_fn, batch_size=8, grad_accum=3)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # (25 s: the suite's budget; image training by default: test_weight_ema)
def test_training_improves_batchnorm_and_artifacts(tmp_path, digits16):
    cfg = icfg(tmp_path, steps=60, batch_size=32, lr=1e-2, warmup=5, eval_every=30, ckpt_every=60, log_every=10,
               eval_batch_size=128)
    r = train(cfg, model_factory=SmallCNN, data=digits16, progress=False)
    acc0, acc = r["history"][0][1]["test_acc"], r["test_acc"]
    assert acc > acc0 + 0.5 and acc > 0.8, (acc0, acc)  # measured: 0.10 -> 0.94
    out = tmp_path / "run"
    for name in ("metrics.csv", "curves.png", "confusion.png", "config.json", "summary.json"):
        assert (out / name).stat().st_size > 100, name
    rows = _rows(out / "metrics.csv")
    assert [r["step"] for r in rows if r["test_acc"]] == ["0", "30", "60"]
    assert all(r["loss"] and r["train_acc"] and r["lr"] and r["images_per_s"] for r in rows[1:])
    assert 0 <= float(rows[-1]["test_f1"]) <= 1 and r["confusion"].sum() == 360

    # BatchNorm: running statistics moved away from their init (mean 0, var 1) in training ...
    t = r["trainer"]
    bn = t.model.bn1
    assert np.abs(bn.mean[...]).max() > 1e-3 and np.abs(bn.var[...] - 1).max() > 1e-3
    # ... and evaluation runs the model in eval mode, on those statistics
    batch = next(digits16.test_batches(128))[0]
    x = digits16.normalize(jnp.asarray(batch["image"]))
    ce = optax.softmax_cross_entropy_with_integer_labels
    forward = nnx.jit(lambda m, x: m(x))
    eval_logits = forward(t.eval_model, x)
    np.testing.assert_allclose(t.eval_step(batch)["loss"], ce(eval_logits, batch["label"]), rtol=1e-5, atol=1e-6)
    train_mode = t.model
    train_mode.train()
    assert not np.allclose(eval_logits, forward(train_mode, x), atol=1e-3)  # batch stats != running stats
    np.testing.assert_array_equal(t.model.bn1.mean[...], bn.mean[...])  # the trainer's state is untouched


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, digits16):
    d = small(digits16)
    kw = dict(model_factory=SmallCNN, data=d, progress=False)
    # augmentation randomness and the weights' EMA must resume exactly too
    aug = dict(crop_padding=2, flip=True, mixup=0.8, cutmix=1.0, erase_prob=0.25, ema_decay=0.9)  # (RandAugment: same keys)
    full = train(icfg(tmp_path / "a", **aug), **kw)
    c = icfg(tmp_path / "b", **aug)
    assert train(c, stop_after=5, **kw)["stopped_at"] == 5  # step 3 is the last checkpoint
    resumed = train(c, resume=True, **kw)
    assert resumed["start"] == 3
    sa, sb = jax.tree.leaves(full["trainer"].state), jax.tree.leaves(resumed["trainer"].state)
    assert len(sa) == len(sb)
    for a, b in zip(sa, sb):  # params, BatchNorm stats, optimizer moments, step
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    def logged(run):  # every column but the wall-clock rate
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in _rows(tmp_path / run / "run/metrics.csv")]

    assert logged("a") == logged("b") and len(logged("a")) == 7
    assert logged("a")[-1]["test_acc_ema"] != "" and "test_acc_ema" in full


def test_cli_errors(tmp_path, capsys):
    from jaxattn.train.__main__ import main

    with pytest.raises(SystemExit):
        main(["image", "--model", "no-such-model", "--out", str(tmp_path / "x")])
    assert "--model 'no-such-model' is not a registered model" in capsys.readouterr().err
    # a model of the other task is named as such, with the task's own models (not a config error)
    with pytest.raises(SystemExit):
        main(["image", "--model", "tnl-tiny", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--model 'tnl-tiny' is a language model; `image` trains one of" in err and "'vit-tiny'" in err
    with pytest.raises(SystemExit):
        main(["lm", "--model", "vit-tiny", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "--model 'vit-tiny' is an image model; `lm` trains one of" in err and "'tnl-tiny'" in err
    assert "'vit-tiny'" not in err.split("trains one of")[1]
    with pytest.raises(SystemExit):
        main(["image", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["image", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["image", "--dataset", "cifar10"])
    assert "needs --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["image", "--model", "tnl-tiny", "--out", str(tmp_path / "x")])
    assert "tnl-tiny" in capsys.readouterr().err


@pytest.mark.slow  # the ViT image CLI with dropout streams and attention maps: also test_timm_hub's fine-tune run
def test_vit_tiny_cli_runs(tmp_path):
    from jaxattn.models import MODEL_CONFIGS
    from jaxattn.train.__main__ import main

    if "vit-tiny" not in MODEL_CONFIGS:
        pytest.skip("vit-tiny is not registered yet")
    out = tmp_path / "vit"
    assert main(["image", "--model", "vit-tiny", "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--image-size", "16",
                 "--eval-batch-size", "128", "--ckpt-every", "2", "--log-every", "1", "--out", str(out),
                 "--dropout", "0.1", "--drop-path", "0.1", "--attn-drop", "0.1",  # RNG streams in the checkpoint
                 "--no-progress"]) == 0
    rows = _rows(out / "metrics.csv")
    assert rows[-1]["step"] == "2" and rows[-1]["test_acc"] and np.isfinite(float(rows[-1]["loss"]))
    assert (out / "attention.png").stat().st_size > 2000  # ViT: attention maps of test images
