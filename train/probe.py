"""Probing a frozen ViT on the shared loop (:mod:`jaxattn.train.loop`):
``python -m jaxattn.train probe [--backbone-ckpt DIR] --probe {linear,attentive,efficient}``.

The backbone is a :class:`jaxattn.models.vit.ViT`: restored from an image-task run directory
(``--backbone-ckpt runs/image-vit-tiny``: its ``config.json`` and latest checkpoint), loaded from a
pretrained timm hub folder (``--backbone-ckpt vit_small_patch16_224.augreg_in21k``: fitted to the probe
data's channels and image size, normalised with the checkpoint's mean and std), or trained first
with the image task (``--backbone-steps`` steps of ``--backbone-model`` on the probe's data, into
``OUT/backbone``). Its tokens (``ViT.features``: after the final LayerNorm, class token first) are
extracted once (``--features cached``, the default: the probe trains on stored fp32 tokens) or
computed in every step under ``stop_gradient`` (``--features online``: backbone and probe in one
model, and only the probe's ``nnx.Param`` are optimised, via the Trainer's ``wrt`` filter).

Token selection as the original (``util/cls_features.py``): the attentive and efficient probes read
the patch tokens (``--tokens patch``) or class + patch tokens (``--tokens all``, the original's
``ep_all``); the linear probe reads the class token or the mean of the patch tokens (``--linear-pool``,
default: the backbone's own pooling). Only the probe is trained (AdamW + warmup-cosine, cross-entropy);
reports test accuracy, trainable parameters and the median step time (ms, after compilation), into
``OUT/summary.json``, with metrics, curves and checkpoints as every task.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.models.probing import PROBES, count_params, create_probe
from jaxattn.models.vit import ViT
from jaxattn.train import loop
from jaxattn.train.image import ImageConfig, _pretrained, evaluate
from jaxattn.train.images import (ImageData, check_data_args, load_images, map_batches, normalize, padded_batches,
                                  stream_indices)

__all__ = ["ProbeConfig", "FrozenBackboneProbe", "TokenData", "load_backbone", "train_backbone",
           "extract_tokens", "select_tokens", "make_probe_trainer", "time_steps", "train"]

FIELDS = ["step", "loss", "train_acc", "lr", "examples_per_s", "test_loss", "test_acc", "test_f1"]


@dataclasses.dataclass
class ProbeConfig:
    probe: str = "efficient"
    backbone_ckpt: str | None = None  # an image-task run directory; None: train one first
    backbone_model: str = "vit-tiny"
    backbone_steps: int = 150
    backbone_lr: float = 3e-3
    data: str | None = None  # None: the backbone run's data (--backbone-ckpt) or scikit-learn's digits
    dataset: str = "auto"
    image_size: int = 32
    val_fraction: float = 0.2
    features: str = "cached"  # cached: extract tokens once; online: frozen backbone in every step
    tokens: str = "patch"  # attentive / efficient probes: patch tokens or all (class + patch)
    linear_pool: str = "auto"  # linear probe: cls, mean, or auto (the backbone's pooling)
    num_queries: int | None = None  # None: 32 (efficient), 1 (attentive)
    d_out: int = 1
    heads: int = 16  # attentive probe
    batch_size: int = 64
    steps: int = 300
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batch_size: int = 256
    ckpt_every: int = 100
    log_every: int = 10
    time_steps: int = 20  # timed steps after training (0: skip)
    out: str | None = None

    def __post_init__(self):
        for name, ok in (("probe", PROBES), ("features", ("cached", "online")), ("tokens", ("patch", "all")),
                         ("linear_pool", ("auto", "cls", "mean"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {ok}, got {getattr(self, name)!r}")

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/probe-{self.probe}")


# -- the backbone ---------------------------------------------------------------------------
def load_backbone(ckpt_dir: str | Path, data: ImageData | None = None) -> tuple[ViT, ImageConfig, ImageData]:
    """``(backbone in eval mode, its ImageConfig, data)`` from an image-task run directory (its
    ``config.json`` and latest Orbax checkpoint); ``data`` defaults to the run's own data."""
    ckpt_dir = Path(ckpt_dir)
    from jaxattn.models import hf
    from jaxattn.train.image import load_trained, use_pretrained_stats

    if _pretrained(str(ckpt_dir)):  # a pretrained timm ViT folder, fitted to the data's channels and size
        if data is None:
            raise ValueError(f"--backbone-ckpt {ckpt_dir} is a timm folder: it needs the probe's data")
        use_pretrained_stats(data, str(ckpt_dir))
        model = hf.load_pretrained(ckpt_dir, num_classes=0, in_channels=data.channels, image_size=data.image_size)
        if not isinstance(model, ViT):
            raise ValueError(f"--backbone-ckpt {ckpt_dir}: {type(model).__name__} is not a ViT")
        return model, ImageConfig(model=str(ckpt_dir.resolve()), image_size=data.image_size, steps=0), data
    model, icfg, data, _ = load_trained(ckpt_dir, data, flag="--backbone-ckpt")
    if not isinstance(model, ViT):
        raise ValueError(f"--backbone-ckpt {ckpt_dir}: model {icfg.model!r} is not a ViT")
    return model, icfg, data


def train_backbone(cfg: ProbeConfig, data: ImageData, progress: bool = True) -> tuple[ViT, dict]:
    """Trains ``cfg.backbone_model`` with the image task on ``data`` into ``OUT/backbone``; returns the
    model (eval mode) and ``{"test_acc", "steps", "out"}``."""
    icfg = ImageConfig(model=cfg.backbone_model, data=cfg.data, dataset=cfg.dataset, image_size=cfg.image_size,
                       val_fraction=cfg.val_fraction, steps=cfg.backbone_steps, lr=cfg.backbone_lr,
                       warmup=min(30, max(1, cfg.backbone_steps // 10)), seed=cfg.seed,
                       eval_every=0, ckpt_every=max(1, cfg.backbone_steps), out=str(cfg.out_dir() / "backbone"))
    from jaxattn.train.image import train as train_image

    res = train_image(icfg, data=data, progress=progress)
    model = res["trainer"].eval_model
    if not isinstance(model, ViT):
        raise ValueError(f"--backbone-model {cfg.backbone_model!r} is not a ViT")
    return model, {"test_acc": res["test_acc"], "steps": cfg.backbone_steps, "out": res["out"]}


def extract_tokens(backbone: ViT, images: np.ndarray, mean, std, batch_size: int = 256) -> np.ndarray:
    """``ViT.features`` of uint8 ``images [N, H, W, C]`` (normalised with ``mean``/``std``) as fp32
    ``[N, T, dim]``, in batches (the last one padded)."""
    graphdef, state = nnx.split(backbone)

    @jax.jit
    def feats(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m.features(normalize(x, mean, std)).astype(jnp.float32)

    return map_batches(lambda x: feats(state, x), images, batch_size)


def select_tokens(tokens: jax.Array, which: str, has_cls: bool, num_prefix_tokens: int | None = None) -> jax.Array:
    """``tokens [B, T, C]`` (class token first when ``has_cls``, then any register tokens:
    ``num_prefix_tokens`` in all, default ``int(has_cls)``) -> what a probe reads: ``"all"``,
    ``"patch"`` (the patch tokens only), ``"cls"`` (``[B, 1, C]``)."""
    if which == "all":
        return tokens
    if which == "patch":
        return tokens[:, int(has_cls) if num_prefix_tokens is None else num_prefix_tokens:]
    if which == "cls":
        if not has_cls:
            raise ValueError("the class token was asked for but the backbone has none (pool='mean')")
        return tokens[:, :1]
    raise ValueError(f"token selection must be 'all', 'patch' or 'cls', got {which!r}")


def probe_tokens(cfg: ProbeConfig, has_cls: bool, backbone_pool: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(token selection, probe keywords)`` of ``cfg`` for a backbone with/without a class token
    (``backbone_pool``: its own pooling, what ``linear_pool="auto"`` uses; default: cls iff ``has_cls``)."""
    if cfg.probe == "linear":
        pool = cfg.linear_pool if cfg.linear_pool != "auto" else (backbone_pool or ("cls" if has_cls else "mean"))
        return ("cls", {"pool": "cls"}) if pool == "cls" else ("patch", {"pool": "mean"})
    if cfg.probe == "attentive":
        return cfg.tokens, {"heads": cfg.heads, "num_queries": cfg.num_queries}
    return cfg.tokens, {"num_queries": cfg.num_queries, "d_out": cfg.d_out}


class FrozenBackboneProbe(nnx.Module):
    """``images -> probe(select(stop_gradient(backbone.features(images))))``; the backbone is not
    trained when the optimizer's ``wrt`` is :data:`PROBE_PARAMS` (it also never sees train mode:
    :meth:`train` is overridden to keep it deterministic)."""

    def __init__(self, backbone: ViT, probe: nnx.Module, which: str):
        self.backbone, self.probe, self.which = backbone, probe, which
        self.has_cls, self.prefix = backbone.cfg.has_class_token, backbone.cfg.num_prefix_tokens

    def train(self, **attributes):  # keep the frozen backbone in eval mode (dropout / drop path off)
        super().train(**attributes)
        self.backbone.eval()

    def __call__(self, images: jax.Array) -> jax.Array:
        tokens = jax.lax.stop_gradient(self.backbone.features(images))
        return self.probe(select_tokens(tokens, self.which, self.has_cls, self.prefix))


PROBE_PARAMS = nnx.All(nnx.Param, nnx.PathContains("probe"))


@dataclasses.dataclass
class TokenData:
    """Extracted tokens in the shape of :class:`ImageData` for the loop and ``image.evaluate``:
    batches ``{"tokens": fp32 [B, T, C], "label"}``, the same per-epoch permutations."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        idx = stream_indices(seed, step, batch_size, len(self.x_train))
        return {"tokens": self.x_train[idx], "label": self.y_train[idx]}

    def test_batches(self, batch_size: int):
        return padded_batches(self.x_test, self.y_test, batch_size, "tokens")


# -- training -------------------------------------------------------------------------------
def lr_schedule(cfg: ProbeConfig) -> optax.Schedule:
    return loop.warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def make_probe_trainer(cfg: ProbeConfig, model_factory: Callable[[nnx.Rngs], nnx.Module], *,
                       mean=None, std=None, wrt: Any = nnx.Param, devices=None) -> loop.Trainer:
    """The loop's Trainer: cross-entropy of ``model(batch["tokens"])`` (cached) or of
    ``model(normalize(batch["image"]))`` (online); ``wrt`` picks the trained parameters."""

    def inputs(batch):
        return batch["tokens"] if "tokens" in batch else normalize(batch["image"], mean, std)

    def loss_fn(model, batch, rng):
        logits = model(inputs(batch)).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"acc": (logits.argmax(-1) == batch["label"]).mean()}

    def eval_fn(model, batch):
        logits = model(inputs(batch)).astype(jnp.float32)
        return {"pred": logits.argmax(-1).astype(jnp.int32),
                "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])}

    tx = loop.adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, clip=cfg.clip, b2=0.999)
    return loop.Trainer(model_factory, tx, loss_fn, batch_size=cfg.batch_size, seed=cfg.seed, eval_fn=eval_fn,
                        devices=devices, wrt=wrt)


def time_steps(trainer: loop.Trainer, batch: Any, n: int) -> float:
    """Median wall time (ms) of ``n`` synchronous optimizer steps on ``batch`` after a warm-up step;
    the trainer's state is restored afterwards."""
    saved = jax.tree.map(jnp.copy, trainer.state)
    jax.block_until_ready(trainer.train_step(batch))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.train_step(batch))
        times.append(time.perf_counter() - t0)
    trainer.state = saved
    return 1e3 * statistics.median(times)


def _backbone_factory(backbone: ViT) -> Callable[[nnx.Rngs], ViT]:
    graphdef, state = nnx.split(backbone)
    return lambda rngs: nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def prepare(cfg: ProbeConfig, progress: bool = True) -> dict:
    """Loads or trains the backbone and loads the data: ``{"backbone", "data", "backbone_info"}``."""
    if cfg.data is not None or cfg.backbone_ckpt is None:
        check_data_args(cfg.data, cfg.dataset)
    if cfg.backbone_ckpt is not None:
        data = None
        if cfg.data is not None or _pretrained(str(cfg.backbone_ckpt)):
            data = load_images(cfg.data, dataset=cfg.dataset, image_size=cfg.image_size,
                               val_fraction=cfg.val_fraction)
        backbone, icfg, data = load_backbone(cfg.backbone_ckpt, data)
        info = {"source": str(cfg.backbone_ckpt), "model": icfg.model, "steps": icfg.steps}
    else:
        data = load_images(cfg.data, dataset=cfg.dataset, image_size=cfg.image_size, val_fraction=cfg.val_fraction)
        backbone, info = train_backbone(cfg, data, progress=progress)
        info = {"source": info["out"], "model": cfg.backbone_model, "steps": cfg.backbone_steps,
                "backbone_test_acc": info["test_acc"]}
    return {"backbone": backbone, "data": data, "backbone_info": info}


def train(cfg: ProbeConfig, *, resume: bool = False, prepared: dict | None = None,
          tokens: dict[str, np.ndarray] | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Trains the probe of ``cfg`` on a frozen backbone; returns ``{"test_acc", "test_f1",
    "trainable_params", "ms_per_step", "trainer", ...}``. ``prepared`` (from :func:`prepare`) and
    ``tokens`` (``{"train", "test"}`` from :func:`extract_tokens`) let several probes share one
    backbone and one extraction."""
    prepared = prepared or prepare(cfg, progress=progress)
    backbone, data = prepared["backbone"], prepared["data"]
    has_cls, prefix = backbone.cfg.has_class_token, backbone.cfg.num_prefix_tokens
    which, kw = probe_tokens(cfg, has_cls, backbone.cfg.pool)
    dim, nc = backbone.cfg.dim, data.num_classes

    if cfg.features == "cached":
        if tokens is None:
            tokens = {"train": extract_tokens(backbone, data.x_train, data.mean, data.std, cfg.eval_batch_size),
                      "test": extract_tokens(backbone, data.x_test, data.mean, data.std, cfg.eval_batch_size)}
        sel = lambda t: np.ascontiguousarray(np.asarray(select_tokens(t, which, has_cls, prefix)))  # noqa: E731
        feed = TokenData(sel(tokens["train"]), data.y_train, sel(tokens["test"]), data.y_test, nc)
        trainer = make_probe_trainer(cfg, lambda rngs: create_probe(cfg.probe, dim, nc, rngs=rngs, **kw))
        probe_of = lambda m: m  # noqa: E731
    else:
        feed = data
        make_backbone = _backbone_factory(backbone)

        def factory(rngs):
            return FrozenBackboneProbe(make_backbone(rngs), create_probe(cfg.probe, dim, nc, rngs=rngs, **kw), which)

        trainer = make_probe_trainer(cfg, factory, mean=data.mean, std=data.std, wrt=PROBE_PARAMS)
        probe_of = lambda m: m.probe  # noqa: E731

    def run_eval(step: int) -> dict[str, float]:
        return evaluate(trainer, feed, cfg.eval_batch_size)[0]

    out = cfg.out_dir()
    n_params = count_params(probe_of(trainer.model))
    config = {**dataclasses.asdict(cfg), "backbone": prepared["backbone_info"], "token_selection": which,
              "probe_kwargs": kw, "dim": dim, "num_classes": nc, "trainable_params": n_params,
              "train_examples": len(data.y_train), "test_examples": len(data.y_test)}
    result = loop.fit(
        trainer, lambda step: feed.train_batch(cfg.seed, step, cfg.batch_size), steps=cfg.steps, out_dir=out,
        resume=resume, evaluate=run_eval, eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every, lr_schedule=lr_schedule(cfg),
        throughput=("examples_per_s", lambda b: len(b["label"])), config=config, plot="curves.png",
        plot_title=f"{cfg.probe} probe on {prepared['backbone_info']['model']}",
        plot_metrics=("train_acc", "test_acc", "test_f1"), fields=FIELDS, desc=f"probe {cfg.probe}",
        stop_after=stop_after, progress=progress)
    if "stopped_at" in result:
        return result
    hist = result["history"]
    scores = hist[-1][1] if hist and hist[-1][0] == cfg.steps else run_eval(cfg.steps)
    ms = time_steps(trainer, feed.train_batch(cfg.seed, 0, cfg.batch_size), cfg.time_steps) if cfg.time_steps else None
    summary = {"probe": cfg.probe, "step": cfg.steps, **scores, "trainable_params": n_params,
               "ms_per_step": ms, "features": cfg.features, "backbone": prepared["backbone_info"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{cfg.probe} probe: test accuracy {scores['test_acc']:.2%}  trainable params {n_params:,}  "
          + (f"step {ms:.2f} ms ({cfg.features} features)" if ms is not None else "")
          + f"\nmetrics: {result['metrics_csv']}  summary: {out / 'summary.json'}")
    return {**result, **scores, "trainable_params": n_params, "ms_per_step": ms}


# -- command line ---------------------------------------------------------------------------
HELP = {
    "probe": "linear: cls/GAP -> BN -> linear; attentive: one query, multi-head W_k/W_v cross-attention; "
             "efficient: M queries, W_v only, each query reads its own V slice",
    "backbone_ckpt": "an image-task run directory (config.json + checkpoints/); default: train a backbone first",
    "backbone_model": "ViT to train when no --backbone-ckpt is given",
    "backbone_steps": "image-task steps of that backbone",
    "backbone_lr": "its learning rate",
    "data": "as the image task's --data; default: the checkpoint's data, else scikit-learn's digits",
    "features": "cached: extract tokens once; online: run the frozen backbone in every step",
    "tokens": "tokens of the attentive/efficient probes: patch (default, as the original) or all (with cls)",
    "linear_pool": "linear probe input: cls token, mean of patch tokens, or auto (the backbone's pooling)",
    "num_queries": "queries (default: 32 efficient, 1 attentive)",
    "d_out": "efficient probe: C' = C / d_out",
    "heads": "attentive probe heads",
    "time_steps": "synchronous steps timed after training for ms/step (0: skip)",
}


def add_parser(sub) -> None:
    """Adds the ``probe`` subcommand to ``python -m jaxattn.train``."""
    import argparse

    p = sub.add_parser("probe", help="probe a frozen ViT (linear / attentive / efficient probing)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop.add_config_args(p, ProbeConfig, help=HELP, choices={
        "probe": PROBES, "features": ["cached", "online"], "tokens": ["patch", "all"],
        "linear_pool": ["auto", "cls", "mean"]})
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def run_cli(parser, args: dict) -> ProbeConfig:
    """Builds and checks the :class:`ProbeConfig` of parsed ``args`` (``parser.error`` on bad values)."""
    try:
        cfg = loop.config_from_args(ProbeConfig, args)
    except ValueError as e:
        parser.error(str(e))
    loop.check_positive(parser, cfg, ("steps", "batch_size", "ckpt_every", "log_every", "eval_batch_size",
                                      "image_size", "d_out", "heads", "num_queries", "backbone_steps"))
    loop.check_positive(parser, cfg, ("warmup", "eval_every", "time_steps"), minimum=0)
    return cfg
