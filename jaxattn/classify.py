"""``python -m jaxattn.classify MODEL INPUT [INPUT ...]``: classify images with a pretrained timm folder
(ViT / DeiT / DINOv2 / HaloNet hub folders, see docs/pretrained.md) or an image-task training run.

``INPUT``: image files, or folders of them. A folder of class folders (``root/<class>/*``, e.g. an
ImageNet ``val/`` tree) is also scored: top-1 / top-5 accuracy, its class folders matched to the
model's label names (or, without names, sorted folders to class indices, ImageNet's convention).
Images are prepared as the model was evaluated: a timm folder's ``pretrained_cfg`` (shorter side
resized to ``size / crop_pct`` with its interpolation, centre crop, its mean and std); a training run's
own resize and normalisation. ``--quantized`` also runs the SageAttention2 path (ViT) and reports its
top-1 agreement with full precision; ``--json`` writes every prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_INTERPOLATION = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS",
                  "box": "BOX", "hamming": "HAMMING"}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How images are turned into the model's input: ``size`` (square), ``crop_pct`` and ``crop_mode``
    (timm's ``center`` / ``squash``; None: a plain resize to ``size``, as the image trainer does),
    ``interpolation``, ``channels`` (1: greyscale), ``mean`` / ``std`` of the [0, 1] pixels."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    crop_pct: float | None = None
    crop_mode: str | None = None
    interpolation: str = "bilinear"

    def __call__(self, image) -> np.ndarray:
        """A PIL image -> float32 ``[size, size, channels]``, normalised."""
        from PIL import Image

        from jaxattn.train.images import _to_rgb

        im = _to_rgb(image)
        resample = getattr(Image, _INTERPOLATION.get(self.interpolation, "BICUBIC"))
        s = self.size
        if self.crop_pct is None:
            im = im.resize((s, s), resample)
        else:  # timm's transforms_imagenet_eval
            scale = math.floor(s / self.crop_pct)
            w, h = im.size
            if self.crop_mode == "squash":
                new = (scale, scale)
            else:  # "center": the shorter side to `scale`, the aspect ratio kept (torchvision's Resize(int))
                new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
            im = im.resize(new, resample)
            left, top = int(round((new[0] - s) / 2.0)), int(round((new[1] - s) / 2.0))  # torchvision CenterCrop
            im = im.crop((left, top, left + s, top + s))
        if self.channels == 1:
            im = im.convert("L")
        x = np.asarray(im, np.float32).reshape(s, s, -1) / 255.0
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def timm_preprocess(raw: dict[str, Any]) -> Preprocess:
    """The evaluation preprocessing a timm ``config.json`` records."""
    from jaxattn.models.timm_hub import preprocessing

    pre = preprocessing(raw)
    c, h, w = pre["input_size"]
    if h != w:
        raise ValueError(f"config.json: input_size {pre['input_size']}: only square inputs are supported")
    mode = pre["crop_mode"]
    if mode not in ("center", "squash"):
        raise ValueError(f"config.json: crop_mode {mode!r} is not supported (center, squash)")
    return Preprocess(size=int(h), mean=tuple(pre["mean"]), std=tuple(pre["std"]), channels=int(c),
                      crop_pct=pre["crop_pct"], crop_mode=mode, interpolation=pre["interpolation"])


def label_names(raw: dict[str, Any], num_classes: int) -> list[str] | None:
    """A timm folder's class names (``pretrained_cfg.label_names``, or the top level's), if it has them."""
    names = (raw.get("pretrained_cfg") or {}).get("label_names") or raw.get("label_names")
    return [str(n) for n in names] if isinstance(names, list) and len(names) == num_classes else None


def load(model_dir: str | Path, **overrides: Any):
    """``(model, Preprocess, label names or None, description)`` of a timm folder or an image-task run;
    ``overrides``: config fields such as ``dtype``, ``attn_impl``, ``quantized``."""
    from jaxattn.models import hf

    kind = hf.hf_model_type(model_dir)
    if kind == "timm":
        raw = hf.raw_config(model_dir)
        model = hf.load_pretrained(model_dir, **overrides)
        if not model.cfg.num_classes:
            raise ValueError(f"{model_dir} has no classifier (num_classes 0: a feature extractor such as DINOv2's); "
                             "fine-tune one with train image --model FOLDER, or probe it with train probe")
        return model, timm_preprocess(raw), label_names(raw, model.cfg.num_classes), Path(model_dir).name
    if kind is not None:
        raise ValueError(f"{model_dir} is a {kind} language model, not an image classifier")
    from jaxattn.train.image import load_trained

    model, icfg, data, step = load_trained(model_dir, flag="MODEL")
    if overrides:
        model = with_config(model, **overrides)
    pre = Preprocess(size=icfg.image_size, mean=tuple(map(float, data.mean)), std=tuple(map(float, data.std)),
                     channels=data.channels)
    return model, pre, list(data.classes), f"{icfg.model}, step {step}"


def with_config(model, **changes: Any):
    """The same model (its variables) under a config with ``changes`` that keep its parameters (``quantized``,
    ``attn_impl``, ``dtype``)."""
    from flax import nnx

    cfg = model.cfg
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise ValueError(f"{type(model).__name__} has no {', '.join(unknown)} option")
    new = nnx.eval_shape(lambda: type(model)(dataclasses.replace(cfg, **changes), rngs=nnx.Rngs(0)))
    nnx.update(new, nnx.state(model))
    new.eval()
    return new


def collect(inputs: Sequence[str | Path], names: list[str] | None
            ) -> tuple[list[Path], list[int | None], list[str]]:
    """``(files, labels, warnings)``: image files in order; a label per file from a class-folder tree
    (None for loose files)."""
    files: list[Path] = []
    labels: list[int | None] = []
    notes: list[str] = []
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
            labels.append(None)
            continue
        if not item.is_dir():
            raise ValueError(f"{item}: no such image file or folder")
        classes = sorted(p.name for p in item.iterdir() if p.is_dir())
        if classes:
            index = _class_index(classes, names, item, notes)
            for c in classes:
                for f in sorted(p for p in (item / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                    files.append(f)
                    labels.append(index[c])
        for f in sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            files.append(f)
            labels.append(None)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    return files, labels, notes


def _class_index(classes: list[str], names: list[str] | None, root: Path, notes: list[str]) -> dict[str, int]:
    if names is not None and set(classes) <= set(names):
        lookup = {n: i for i, n in enumerate(names)}
        return {c: lookup[c] for c in classes}
    notes.append(f"{root}: class folders matched to class indices in sorted order (0 .. {len(classes) - 1})"
                 + (" as they are not the model's label names" if names is not None else ""))
    return {c: i for i, c in enumerate(classes)}


def top_classes(model, batch_size: int, k: int):
    """A function ``images [batch_size, S, S, C] -> (probabilities [batch_size, k], classes [batch_size, k])``
    (jitted; the model's softmax, its ``k`` most likely classes)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    gdef, state = nnx.split(model)
    k = min(k, model.cfg.num_classes)
    step = jax.jit(lambda st, x: jax.lax.top_k(jax.nn.softmax(nnx.merge(gdef, st)(x).astype(jnp.float32), -1), k))
    return lambda x: tuple(np.asarray(a) for a in step(state, jnp.asarray(x)))


def classify(model, pre: Preprocess, files: Sequence[Path], *, batch_size: int = 32, k: int = 5, quantized=None,
             progress: bool = True) -> dict[str, Any]:
    """Streams ``files`` through ``pre`` and ``model`` a batch at a time (memory: one batch of images):
    ``{"kept": indices of the readable files, "prob" / "cls": [n, k] top classes, "quantized_cls": [n] (the
    quantized model's top class, with ``quantized``), "bad": unreadable files, "seconds"}``."""
    from PIL import Image
    from tqdm import tqdm

    from jaxattn.train.images import _padded

    run = top_classes(model, batch_size, k)
    qrun = top_classes(quantized, batch_size, 1) if quantized is not None else None
    kept, probs, classes, qcls, bad = [], [], [], [], []
    seconds = 0.0
    bar = tqdm(total=len(files), desc="classify", unit="img", disable=None if progress else True, leave=False)
    for s in range(0, len(files), batch_size):
        images = []
        for i in range(s, min(s + batch_size, len(files))):
            try:
                with Image.open(files[i]) as im:
                    images.append(pre(im))
                kept.append(i)
            except (OSError, ValueError) as e:
                bad.append(f"{files[i]} ({e})")
        bar.update(min(batch_size, len(files) - s))
        if not images:
            continue
        n = len(images)
        x = _padded(np.stack(images), 0, batch_size)  # (one compiled shape)
        t0 = time.perf_counter()
        p, c = run(x)
        if qrun is not None:
            qcls.append(qrun(x)[1][:n, 0])
        seconds += time.perf_counter() - t0
        probs.append(p[:n])
        classes.append(c[:n])
    bar.close()
    if not kept:
        raise ValueError("none of the images could be read")
    return {"kept": kept, "prob": np.concatenate(probs), "cls": np.concatenate(classes),
            "quantized_cls": np.concatenate(qcls) if qcls else None, "bad": bad, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxattn.classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a timm hub folder (ViT, DeiT, DINOv2, HaloNet) or an image-task run (--out folder)")
    p.add_argument("inputs", nargs="+", help="image files or folders (root/<class>/* folders are also scored)")
    p.add_argument("--top", type=int, default=5, help="classes listed per image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: float32)")
    p.add_argument("--attn-impl", choices=["auto", "pallas", "xla"], default=None)
    p.add_argument("--quantized", action="store_true",
                   help="also run the SageAttention2 path (ViT) and report its top-1 agreement")
    p.add_argument("--json", default=None, help="write every image's top classes and probabilities here")
    p.add_argument("--quiet", action="store_true", help="only the summary, no line per image")
    a = p.parse_args(argv)
    if a.top < 1 or a.batch_size < 1:
        p.error("--top and --batch-size must be >= 1")
    overrides = {k: v for k, v in (("dtype", a.dtype), ("attn_impl", a.attn_impl)) if v is not None}
    if importlib.util.find_spec("PIL") is None:
        p.error("reading images needs Pillow: pip install pillow")
    try:
        model, pre, names, what = load(a.model, **overrides)
        files, labels, notes = collect(a.inputs, names)
        quant = with_config(model, quantized=True) if a.quantized else None
    except ValueError as e:
        p.error(str(e))
    for n in notes:
        print(n, file=sys.stderr)
    k = max(a.top, 5)
    try:
        res = classify(model, pre, files, batch_size=a.batch_size, k=k, quantized=quant)
    except ValueError as e:
        p.error(str(e))
    if res["bad"]:
        bad = res["bad"]
        print(f"skipped {len(bad)} unreadable file(s): {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}",
              file=sys.stderr)
    files, labels = [files[i] for i in res["kept"]], [labels[i] for i in res["kept"]]
    n = len(files)
    probs, cls = res["prob"][:n], res["cls"][:n]
    name = (lambda c: names[c]) if names else str
    records = [{"file": str(f), "top": [{"class": int(c), "name": name(int(c)), "prob": float(pr)}
                                        for c, pr in zip(cs[:a.top], ps[:a.top])],
                **({"label": lab} if lab is not None else {})} for f, ps, cs, lab in zip(files, probs, cls, labels)]
    if not a.quiet:
        for r in records:
            print(f"{r['file']}: " + ", ".join(f"{c['name']} {c['prob']:.3f}" for c in r["top"]))
    summary = {"model": what, "images": n, "images_per_s": n / max(res["seconds"], 1e-9)}
    scored = [i for i, lab in enumerate(labels) if lab is not None]
    if scored:
        y = np.asarray([labels[i] for i in scored])
        summary.update(scored=len(scored), top1=float((cls[scored, 0] == y).mean()),
                       top5=float((cls[scored, :5] == y[:, None]).any(1).mean()))
    if quant is not None:
        q = res["quantized_cls"]
        summary["quantized_top1_agreement"] = float((q == cls[:, 0]).mean())
        if scored:
            summary["quantized_top1"] = float((q[scored] == y).mean())
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "predictions": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
