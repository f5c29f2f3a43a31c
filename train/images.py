"""Image-classification data with no download by default, and JAX augmentations.

* ``digits`` (default): scikit-learn's bundled 8x8 greyscale digits (1797 images, 10 classes),
  upsampled bilinearly to ``image_size``, split by a fixed seed (stratified) into train and test;
  no default augmentation (flips change digits' meaning; crops only slow short CPU runs down).
* CIFAR-10 / CIFAR-100 in their standard python-pickle layout (``cifar-10-batches-py/``:
  ``data_batch_1..5``, ``test_batch``, ``batches.meta``; ``cifar-100-python/``: ``train``, ``test``,
  ``meta``, fine labels).
* An image folder: ``root/{train,val|test}/<class>/*.png|jpg`` or ``root/<class>/*`` split by seed
  (read with Pillow, converted to RGB, resized to ``image_size``). Folders of ``CACHE_MIN_IMAGES``
  images or more are decoded once into a memory-mapped ``uint8`` file under ``$JAXATTN_CACHE``
  (default ``~/.cache/jaxattn``), keyed by the files' paths, sizes and times and the image size:
  later runs map it instead of decoding again, and it need not fit in memory.

Images are held as ``uint8 [N, H, W, C]``; batches are a pure function of ``(seed, step)``
(a fresh permutation per epoch). Normalisation (per-channel mean/std of the training split) and the
augmentations (random crop with zero padding, horizontal flip) run in JAX inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
CACHE_MIN_IMAGES = 5000  # image folders at least this large are decoded once into a memory-mapped cache
DATASETS = ["auto", "digits", "cifar10", "cifar100", "folder"]


@dataclasses.dataclass
class ImageData:
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str
    flip: bool  # whether horizontal flips preserve labels (the default augmentation)
    crop: bool = True  # whether random crops are a default augmentation
    mean: np.ndarray = dataclasses.field(init=False)  # float32 [C], per channel, in [0, 1] units
    std: np.ndarray = dataclasses.field(init=False)

    def __post_init__(self):
        for name in ("x_train", "x_test"):
            x = getattr(self, name)
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{name}: expected uint8 [N, H, W, C], got {x.dtype} {x.shape}")
        self.y_train = np.asarray(self.y_train, np.int32)
        self.y_test = np.asarray(self.y_test, np.int32)
        if len(self.x_train) == 0 or len(self.x_test) == 0:
            raise ValueError(f"{self.source}: empty train or test split "
                             f"({len(self.x_train)} / {len(self.x_test)} images)")
        ys = np.concatenate([self.y_train, self.y_test])
        if ys.min() < 0 or ys.max() >= len(self.classes):
            raise ValueError(f"{self.source}: labels outside [0, {len(self.classes)})")
        self.mean, self.std = channel_stats(self.x_train)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.x_train.shape[1]

    @property
    def channels(self) -> int:
        return self.x_train.shape[-1]

    def normalize(self, images):
        """``uint8`` images -> float32 ``(x / 255 - mean) / std`` (NumPy or JAX arrays)."""
        return normalize(images, self.mean, self.std)

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """``{"image": uint8 [B, H, W, C], "label": int32 [B]}``: examples ``step*B .. step*B+B-1``
        of the stream of per-epoch permutations seeded by ``(seed, epoch)``."""
        idx = stream_indices(seed, step, batch_size, len(self.x_train))
        return {"image": self.x_train[idx], "label": self.y_train[idx]}

    def test_batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """The test split in order as ``(batch, n_valid)``; the last batch is padded (with copies of
        the first image) to ``batch_size`` so that one compiled evaluation serves all batches."""
        return padded_batches(self.x_test, self.y_test, batch_size, "image")


def channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32, in [0, 1] units) of uint8 images ``[N, H, W, C]``, summed
    over chunks of images (no float64 copy of the whole set: 1.2 GB for CIFAR-10)."""
    c = x.shape[-1]
    total, squares = np.zeros(c, np.float64), np.zeros(c, np.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        total += part.sum(0)
        squares += (part * part).sum(0)
    n = max(1, len(x) * x.shape[1] * x.shape[2])
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x1A6E]).permutation(n)


def stream_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Indices of examples ``step*B .. step*B+B-1`` of the stream of per-epoch permutations of
    ``range(n)`` seeded by ``(seed, epoch)`` (a pure function of its arguments: exact resume)."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = pos // n
    idx = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        idx[sel] = _permutation(seed, int(e), n)[pos[sel] % n]
    return idx


def padded_batches(x_all: np.ndarray, y_all: np.ndarray, batch_size: int,
                   key: str) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """``({key: x, "label": y}, n_valid)`` in order; the last batch is padded with copies of the
    first example to ``batch_size``."""
    for s in range(0, len(x_all), batch_size):
        yield {key: _padded(x_all, s, batch_size), "label": _padded(y_all, s, batch_size)}, min(batch_size, len(x_all) - s)


def _padded(a: np.ndarray, start: int, batch_size: int) -> np.ndarray:
    """``a[start:start + batch_size]``, padded with copies of ``a[0]`` to ``batch_size`` rows."""
    x = a[start:start + batch_size]
    return x if len(x) == batch_size else np.concatenate([x, np.repeat(a[:1], batch_size - len(x), 0)])


def map_batches(fn: Callable[[np.ndarray], Any], x_all: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``x_all`` in batches of exactly ``batch_size`` (the last padded, so a jitted ``fn``
    compiles once), its rows for the real examples concatenated."""
    return np.concatenate([np.asarray(fn(_padded(x_all, s, batch_size)))[:min(batch_size, len(x_all) - s)]
                           for s in range(0, len(x_all), batch_size)])


# -- JAX transforms ------------------------------------------------------------------------
def normalize(images, mean, std):
    """``uint8`` (or [0, 255] float) images -> float32 ``(x / 255 - mean) / std`` per channel."""
    xp = jnp if isinstance(images, jax.Array) else np
    return ((images.astype(xp.float32) / 255.0 - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32))


def random_crop_flip(image: jax.Array, key: jax.Array, *, padding: int = 4, flip: bool = True) -> jax.Array:
    """One image ``[H, W, C]``: a random ``H x W`` crop of the image zero-padded by ``padding`` on
    every side, then (with ``flip``) a mirror left-right with probability 1/2."""
    h, w, _ = image.shape
    kc, kf = jax.random.split(key)
    if padding:
        padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        dy, dx = jax.random.randint(kc, (2,), 0, 2 * padding + 1)
        image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))
    if flip:
        image = jnp.where(jax.random.bernoulli(kf), image[:, ::-1], image)
    return image


def make_augment(padding: int, flip: bool, rand_augment: dict | None = None):
    """``augment(example, key)`` for the training loop: crop/flip ``example["image"]``, then RandAugment
    with the keywords ``rand_augment`` of :func:`jaxattn.train.randaugment.rand_augment` (uint8 images);
    ``None`` when all are off."""
    if not padding and not flip and not rand_augment:
        return None

    def augment(example, key):
        k_crop, k_ra = jax.random.split(key) if rand_augment else (key, None)  # (crops as before without it)
        image = random_crop_flip(example["image"], k_crop, padding=padding, flip=flip)
        if rand_augment:
            from jaxattn.train.randaugment import rand_augment as randaug

            image = randaug(image, k_ra, **rand_augment)
        return {**example, "image": image}

    return augment


def _box(h: int, w: int, y0, y1, x0, x1) -> jax.Array:
    """Bool ``[h, w]``: rows ``y0 <= y < y1`` and columns ``x0 <= x < x1`` (traced bounds)."""
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def random_erase(image: jax.Array, key: jax.Array, mean, std, *, prob: float = 0.25, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3) -> jax.Array:
    """timm's ``RandomErasing`` (``mode="pixel"``, one box) on one image ``[H, W, C]`` in pixel scale:
    with probability ``prob`` a box of area ``U(min_area, max_area) * H * W`` and aspect ratio log-uniform
    in ``[min_aspect, 1 / min_aspect]`` (the first of 10 draws that fits), at a uniform position, is filled
    with per-pixel noise that is ``N(0, 1)`` after normalisation by ``mean`` / ``std`` (timm erases the
    normalised tensor). Returns float32 in pixel scale (``[0, 255]`` for uint8 input, noise beyond it)."""
    h, w, c = image.shape
    k_apply, k_area, k_aspect, k_y, k_x, k_noise = jax.random.split(key, 6)
    tries = 10
    area = jax.random.uniform(k_area, (tries,), minval=min_area, maxval=max_area) * (h * w)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (tries,), minval=math.log(min_aspect), maxval=-math.log(min_aspect)))
    bh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    bw = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (bh < h) & (bw < w)
    first = jnp.argmax(fits)
    bh, bw = bh[first], bw[first]
    top = jax.random.randint(k_y, (), 0, jnp.maximum(h - bh, 1))
    left = jax.random.randint(k_x, (), 0, jnp.maximum(w - bw, 1))
    box = _box(h, w, top, top + bh, left, left + bw) & fits.any() & jax.random.bernoulli(k_apply, prob)
    noise = (jax.random.normal(k_noise, (h, w, c)) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)) * 255.0
    return jnp.where(box[:, :, None], noise, image.astype(jnp.float32))


def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array, *, mixup: float = 0.0, cutmix: float = 0.0,
              prob: float = 1.0, switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixup / CutMix over a batch, as timm's ``Mixup`` in its default ``"batch"`` mode: every image is
    mixed with the image at the mirrored batch position (``x[::-1]``) by one ``lam ~ Beta(a, a)``.
    Mixup (``a = mixup``) blends whole images, ``lam * x + (1 - lam) * x[::-1]``; CutMix (``a = cutmix``)
    pastes a box of relative side ``sqrt(1 - lam)`` centred at a uniform pixel (clipped at the border)
    and ``lam`` becomes the kept area. With both on, CutMix is chosen with ``switch_prob``; with
    ``1 - prob`` the batch is left as is (``lam = 1``). Returns float32 images (``[0, 255]`` scale
    when given uint8), the partner labels ``labels[::-1]`` and ``lam``: the target is
    ``lam * y + (1 - lam) * y[::-1]`` (:func:`jaxattn.train.image.classification_loss`)."""
    if mixup < 0 or cutmix < 0 or not (mixup or cutmix):
        raise ValueError(f"mixup and cutmix are Beta parameters >= 0, one of them > 0; got {mixup}, {cutmix}")
    b, h, w = images.shape[:3]
    k_apply, k_switch, k_lam, k_y, k_x = jax.random.split(key, 5)
    x = images.astype(jnp.float32)
    partner = x[::-1]
    use_cut = (jax.random.bernoulli(k_switch, switch_prob) if mixup and cutmix else jnp.asarray(bool(cutmix)))
    alpha = jnp.where(use_cut, cutmix or 1.0, mixup or 1.0)
    lam = jax.random.beta(k_lam, alpha, alpha)
    # CutMix box (timm's rand_bbox): sides int(H * sqrt(1 - lam)), centre uniform, clipped
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    box = _box(h, w, y0, y1, x0, x1)
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    mixed = jnp.where(use_cut, jnp.where(box[None, :, :, None], partner, x), lam * x + (1.0 - lam) * partner)
    lam = jnp.where(use_cut, lam_cut, lam)
    applied = jax.random.bernoulli(k_apply, prob)
    return jnp.where(applied, mixed, x), labels[::-1], jnp.where(applied, lam, 1.0).astype(jnp.float32)


def augment_batch(images: jax.Array, key: jax.Array, *, padding: int = 4, flip: bool = True) -> jax.Array:
    """:func:`random_crop_flip` over ``images [B, H, W, C]`` with keys ``split(key, B)``, as the
    training step applies it (with the step's key from :func:`jaxattn.train.loop.step_keys`)."""
    from jaxattn.train.loop import apply_augment

    aug = make_augment(padding, flip)
    return images if aug is None else apply_augment(aug, {"image": images}, key)["image"]


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``uint8 [N, H, W, C]`` to ``size x size`` (antialiased when shrinking)."""
    if images.shape[1:3] == (size, size):
        return images
    out = []
    for s in range(0, len(images), 2048):
        x = jnp.asarray(images[s:s + 2048], jnp.float32)
        y = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
        out.append(np.asarray(jnp.clip(jnp.round(y), 0, 255)).astype(np.uint8))
    return np.concatenate(out)


# -- datasets ------------------------------------------------------------------------------
def load_digits(image_size: int = 32, *, test_fraction: float = 0.2, split_seed: int = 0) -> ImageData:
    """scikit-learn's digits (0..16 greyscale 8x8) scaled to uint8, upsampled bilinearly, and split
    (stratified, ``split_seed``) into train and test."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ValueError("the default digits data needs scikit-learn: pip install scikit-learn") from None
    d = sk_digits()
    x8 = (d.images * (255.0 / 16.0))[..., None]  # [1797, 8, 8, 1] in [0, 255]
    x = jax.image.resize(jnp.asarray(x8, jnp.float32), (len(x8), image_size, image_size, 1), "bilinear")
    x = np.asarray(jnp.clip(jnp.round(x), 0, 255)).astype(np.uint8)
    tr, te = train_test_split(np.arange(len(x)), test_size=test_fraction, random_state=split_seed,
                              stratify=d.target)
    return ImageData(x[tr], d.target[tr], x[te], d.target[te], [str(i) for i in range(10)],
                     "sklearn-digits", flip=False, crop=False)


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_images(d: dict, path: Path) -> np.ndarray:
    if "data" not in d:
        raise ValueError(f"{path}: not a CIFAR batch (no 'data' entry)")
    x = np.asarray(d["data"], np.uint8)
    if x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{path}: CIFAR data must be [N, 3072] uint8, got {x.shape}")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _names(meta: Path, key: str, n: int) -> list[str]:
    if meta.exists():
        names = _unpickle(meta).get(key)
        if names is not None:
            return [s.decode() if isinstance(s, bytes) else str(s) for s in names]
    return [str(i) for i in range(n)]


def load_cifar(path: str | Path, image_size: int = 32, *, kind: str | None = None) -> ImageData:
    """CIFAR-10 (``data_batch_1..5`` + ``test_batch``) or CIFAR-100 (``train`` + ``test``, fine
    labels) from the python-pickle folder; ``kind`` is ``"cifar10"``/``"cifar100"`` or detected."""
    root = Path(path)
    kind = kind or cifar_kind(root)
    if kind == "cifar10":
        files = sorted(root.glob("data_batch_*"))
        if not files or not (root / "test_batch").exists():
            raise ValueError(f"--data {root}: CIFAR-10 needs data_batch_1..5 and test_batch")
        parts = [_unpickle(f) for f in files]
        x_tr = np.concatenate([_cifar_images(p, f) for p, f in zip(parts, files)])
        y_tr = np.concatenate([np.asarray(p["labels"]) for p in parts])
        test = _unpickle(root / "test_batch")
        x_te, y_te = _cifar_images(test, root / "test_batch"), np.asarray(test["labels"])
        classes = _names(root / "batches.meta", "label_names", 10)
    elif kind == "cifar100":
        if not (root / "train").is_file() or not (root / "test").is_file():
            raise ValueError(f"--data {root}: CIFAR-100 needs the files train and test")
        tr, te = _unpickle(root / "train"), _unpickle(root / "test")
        x_tr, y_tr = _cifar_images(tr, root / "train"), np.asarray(tr["fine_labels"])
        x_te, y_te = _cifar_images(te, root / "test"), np.asarray(te["fine_labels"])
        classes = _names(root / "meta", "fine_label_names", 100)
    else:
        raise ValueError(f"unknown CIFAR kind {kind!r}")
    return ImageData(resize(x_tr, image_size), y_tr, resize(x_te, image_size), y_te, classes, str(root), flip=True)


def cifar_kind(root: Path) -> str | None:
    if (root / "data_batch_1").is_file() or (root / "test_batch").is_file():
        return "cifar10"
    if (root / "train").is_file() and (root / "test").is_file():
        return "cifar100"
    return None


def _class_files(root: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(file, label)]`` of a ``root/<class>/*`` tree (sorted) and its class names."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: classes {unknown} are not in the training split's {classes}")
    files = [(f, label) for label, name in enumerate(classes) if (root / name).is_dir()
             for f in sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders")
    return files, classes


def _cache_root() -> Path:
    return Path(os.environ.get("JAXATTN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "jaxattn")


def _read_images(files: list[tuple[Path, int]], image_size: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [n, S, S, 3], int32 labels [n])`` of the readable files, in order. Unreadable files are
    skipped and named. ``CACHE_MIN_IMAGES`` files or more: decoded once into a memory-mapped file
    under :func:`_cache_root` (written row by row, so the set need not fit in memory)."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading an image folder needs Pillow: pip install pillow") from None
    from tqdm import tqdm

    cache = None
    if len(files) >= CACHE_MIN_IMAGES:
        h = hashlib.sha1(f"v1 {image_size}".encode())
        for f, label in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
        cache = _cache_root() / "images" / h.hexdigest()
        if (cache / "labels.npy").is_file():
            return np.load(cache / "images.npy", mmap_mode="r"), np.load(cache / "labels.npy")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"images.{os.getpid()}.tmp.npy"  # (per process: two runs may fill the cache at once)
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(files), image_size, image_size, 3))
    else:
        out = np.empty((len(files), image_size, image_size, 3), np.uint8)
    kept, bad = np.zeros(len(files), bool), []
    for i, (f, _) in enumerate(tqdm(files, desc=desc, unit="img", disable=None, leave=False)):
        try:
            with Image.open(f) as im:
                im = _to_rgb(im)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                out[i] = np.asarray(im, np.uint8)
            kept[i] = True
        except (OSError, ValueError) as e:  # a truncated or non-image file: skipped, and said so below
            bad.append(f"{f} ({e})")
    if bad:
        print(f"{desc}: skipped {len(bad)} unreadable image file(s): {'; '.join(bad[:3])}"
              + (" ..." if len(bad) > 3 else ""))
    if not kept.any():
        raise ValueError(f"{desc}: none of the {len(files)} image files could be read")
    labels = np.asarray([label for (_, label), k in zip(files, kept) if k], np.int32)
    if cache is None:
        return (out if kept.all() else out[kept]), labels
    if not kept.all():  # compact the rows of the readable files, a chunk at a time
        rows = np.flatnonzero(kept)
        dense_path = tmp.with_suffix(".dense.npy")
        dense = np.lib.format.open_memmap(dense_path, "w+", np.uint8, (len(rows), *out.shape[1:]))
        for j in range(0, len(rows), 4096):
            dense[j:j + 4096] = out[rows[j:j + 4096]]
        dense.flush()
        del out, dense
        os.replace(dense_path, tmp)
    else:
        out.flush()
        del out
    os.replace(tmp, cache / "images.npy")
    np.save(cache / "labels.npy", labels)  # last: its presence marks a complete cache
    return np.load(cache / "images.npy", mmap_mode="r"), labels


def _to_rgb(im):
    """8-bit RGB from any Pillow mode. 16-bit grey (``I;16``) is scaled by 255/65535, 32-bit integer
    or float grey (``I``, ``F``: no standard range) by its own maximum (Pillow's conversion clips
    them to 255, turning them white)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()) if a.size else 0.0, 1e-12)
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image_folder(path: str | Path, image_size: int = 32, *, val_fraction: float = 0.2,
                      split_seed: int = 0) -> ImageData:
    """``root/train/<class>/*`` with ``root/val`` (or ``root/test``) of the same classes, or a single
    ``root/<class>/*`` tree whose files are split by ``split_seed`` (``val_fraction`` held out)."""
    root = Path(path)
    val = next((root / v for v in ("val", "test") if (root / v).is_dir()), None)
    if (root / "train").is_dir() and val is not None:
        files, classes = _class_files(root / "train")
        x_tr, y_tr = _read_images(files, image_size, f"{root / 'train'}")
        x_te, y_te = _read_images(_class_files(val, classes)[0], image_size, f"{val}")
    else:
        if not any(p.is_dir() for p in root.iterdir()):
            raise ValueError(f"--data {root}: expected class folders (root/<class>/*.png) or "
                             "root/train/<class>/ and root/val/<class>/")
        files, classes = _class_files(root)
        perm = np.random.default_rng(split_seed).permutation(len(files))
        n_te = max(1, int(round(len(files) * val_fraction)))
        if n_te >= len(files):
            raise ValueError(f"--data {root}: {len(files)} images are too few to hold out {val_fraction:.0%}")
        te, tr = np.sort(perm[:n_te]), np.sort(perm[n_te:])  # each split read (and cached) on its own
        x_tr, y_tr = _read_images([files[i] for i in tr], image_size, f"{root} (train split)")
        x_te, y_te = _read_images([files[i] for i in te], image_size, f"{root} (held-out split)")
    return ImageData(x_tr, y_tr, x_te, y_te, classes, str(root), flip=True)


def load_images(data: str | None = None, *, dataset: str = "auto", image_size: int = 32,
                val_fraction: float = 0.2, split_seed: int = 0) -> ImageData:
    """The dataset named by ``dataset`` (``auto``: digits without ``data``, else detected from the
    folder's files)."""
    check_data_args(data, dataset)
    if data is None:
        return load_digits(image_size, test_fraction=val_fraction, split_seed=split_seed)
    root = Path(data)
    if dataset == "auto":
        dataset = cifar_kind(root) or "folder"
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(root, image_size, kind=dataset)
    return load_image_folder(root, image_size, val_fraction=val_fraction, split_seed=split_seed)


def check_data_args(data: str | None, dataset: str = "auto") -> None:
    """Cheap checks of ``--data``/``--dataset`` before anything is read."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r}: choose one of {DATASETS}")
    if data is None:
        if dataset not in ("auto", "digits"):
            raise ValueError(f"--dataset {dataset} needs --data PATH")
        return
    if dataset == "digits":
        raise ValueError("--dataset digits is bundled with scikit-learn and takes no --data")
    root = Path(data)
    if not root.exists():
        raise ValueError(f"--data {data}: no such file or folder")
    if not root.is_dir():
        raise ValueError(f"--data {data}: expected a folder (CIFAR python batches or class folders)")
