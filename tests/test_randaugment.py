"""RandAugment's ops against PIL's own (ImageOps, ImageEnhance, Image.transform / rotate), which timm's
RandAugment applies; the policy's draws (ops, probability, magnitudes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxattn.train import randaugment as ra

FILL = (124, 116, 104)


def _images():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 5, 3)), np.ones((4, 4, 1)))[:, :, :]  # blocky, real-image-like
    low = rng.integers(60, 140, (24, 20, 3))  # low contrast: autocontrast / equalize have work to do
    return [a.astype(np.uint8) for a in (rng.integers(0, 256, (24, 20, 3)), smooth, low)]


def _pil(a):
    return Image.fromarray(a)


POINT_OPS = {  # name: (ours, PIL's), at a fixed argument
    "autocontrast": (lambda x: ra.auto_contrast(x.astype(jnp.float32)), ImageOps.autocontrast),
    "equalize": (ra.equalize, ImageOps.equalize),
    "posterize": (lambda x: ra.posterize(x, 3), lambda im: ImageOps.posterize(im, 3)),
    "solarize": (lambda x: ra.solarize(x.astype(jnp.float32), 170), lambda im: ImageOps.solarize(im, 170)),
    "color": (lambda x: ra.color(x.astype(jnp.float32), 1.7), lambda im: ImageEnhance.Color(im).enhance(1.7)),
    "contrast": (lambda x: ra.contrast(x.astype(jnp.float32), 0.4), lambda im: ImageEnhance.Contrast(im).enhance(0.4)),
    "brightness": (lambda x: ra.brightness(x.astype(jnp.float32), 1.3),
                   lambda im: ImageEnhance.Brightness(im).enhance(1.3)),
    "sharpness": (lambda x: ra.sharpness(x.astype(jnp.float32), 1.8),
                  lambda im: ImageEnhance.Sharpness(im).enhance(1.8)),
}


@pytest.mark.parametrize("name", list(POINT_OPS))
def test_pixel_ops_match_pil(name):
    ours, pil = POINT_OPS[name]
    for a in _images():
        got = np.asarray(jax.jit(ours)(jnp.asarray(a)), np.int32)
        want = np.asarray(pil(_pil(a)), np.int32)
        assert got.dtype == np.int32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1, (name, np.abs(got - want).max())


def test_solarize_add_is_timms_lut():
    a = _images()[0]
    lut = [min(255, i + 60) if i < 128 else i for i in range(256)]
    np.testing.assert_array_equal(ra.solarize_add(jnp.asarray(a, jnp.float32), 60), np.asarray(lut)[a])


@pytest.mark.parametrize("kind,arg", [("rotate", 20.0), ("rotate", -13.0), ("shear_x", 0.25), ("shear_y", -0.2),
                                      ("translate_x", 5.0), ("translate_y", -4.0)])
def test_geometric_ops_match_pil(kind, arg):
    """Bilinear resampling as PIL's: the same image up to interpolation rounding, and border pixels."""
    a = _images()[1]
    im = _pil(a)
    kw = dict(resample=Image.BILINEAR, fillcolor=FILL)
    matrix = {"shear_x": (1, arg, 0, 0, 1, 0), "shear_y": (1, 0, 0, arg, 1, 0), "translate_x": (1, 0, arg, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, arg)}.get(kind)
    if kind == "rotate":
        want = im.rotate(arg, **kw)
        got = ra.rotate(jnp.asarray(a), jnp.float32(arg), FILL)
    else:
        want = im.transform(im.size, Image.AFFINE, matrix, **kw)
        got = ra.affine(jnp.asarray(a), jnp.asarray(matrix, jnp.float32), FILL)
    diff = np.abs(np.asarray(got, np.int32) - np.asarray(want, np.int32))
    assert np.median(diff) <= 1 and np.mean(diff <= 2) > 0.85, (kind, np.mean(diff), np.mean(diff <= 2))


def test_policy_draws():
    """Every op is drawn; prob 0 is the identity; magnitude 0 with no noise leaves the magnitude-driven ops
    (except those that are not) as identities; the same key, the same image; bad input is refused."""
    a = jnp.asarray(_images()[1])
    keys = [jax.random.key(i) for i in range(60)]
    aug = jax.jit(lambda x, k: ra.rand_augment(x, k, num_ops=2, magnitude=9, magnitude_std=0.5, prob=1.0))
    outs = [np.asarray(aug(a, k)) for k in keys]
    assert sum(not np.array_equal(o, a) for o in outs) >= 50 and all(o.dtype == np.uint8 for o in outs)
    np.testing.assert_array_equal(aug(a, keys[3]), aug(a, keys[3]))
    off = jax.jit(lambda x, k: ra.rand_augment(x, k, prob=0.0))
    assert all(np.array_equal(off(a, k), a) for k in keys[:5])
    calm = jax.jit(lambda x, k: ra.rand_augment(x, k, magnitude=0.0, magnitude_std=0.0, prob=1.0,
                                                ops=("Rotate", "ShearX", "TranslateY", "Brightness", "Color")))
    for k in keys[:8]:
        assert np.abs(np.asarray(calm(a, k), np.int32) - np.asarray(a, np.int32)).max() <= 1
    grey = jnp.asarray(_images()[0][..., :1])
    assert ra.rand_augment(grey, keys[0], prob=1.0).shape == grey.shape
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        ra.rand_augment(a, keys[0], ops=("Warp",))
    with pytest.raises(ValueError, match="uint8"):
        ra.rand_augment(a.astype(jnp.float32), keys[0])
