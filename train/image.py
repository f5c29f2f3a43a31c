"""Image classification on the shared loop (:mod:`jaxattn.train.loop`):
``python -m jaxattn.train image --model vit-tiny [--data cifar-10-batches-py]``.

Cross-entropy (optional label smoothing), AdamW + warmup-cosine with clipping, random crop/flip
augmentation in the jitted step, test accuracy and macro F1 every ``eval_every`` steps, CSV metrics,
a loss/accuracy curve PNG, a confusion-matrix PNG, Orbax checkpoints and exact ``--resume``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.train import loop
from jaxattn.train.loop import forward_with_aux_loss  # noqa: F401  (its home before the LM trainer used it)
from jaxattn.train.images import (DATASETS, ImageData, check_data_args, load_images, make_augment, mix_batch,
                                  normalize, random_erase)
from jaxattn.train.metrics import classification_scores, confusion_matrix, plot_confusion
from jaxattn.train.routing import RoutedTrainer, joint_optimizer

__all__ = ["DATASETS", "ImageConfig", "ImageTrainer", "RoutedImageTrainer", "make_image_trainer", "classification_loss", "evaluate", "train"]

FIELDS = ["step", "loss", "train_acc", "lr", "images_per_s", "test_loss", "test_acc", "test_f1"]
EMA_FIELDS = ["test_loss_ema", "test_acc_ema", "test_f1_ema"]


@dataclasses.dataclass
class ImageConfig:
    model: str = "vit-tiny"
    data: str | None = None  # None: scikit-learn's digits
    dataset: str = "auto"
    image_size: int = 32
    val_fraction: float = 0.2
    batch_size: int = 64  # global batch per optimizer step
    grad_accum: int = 1
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.01
    warmup: int = 30
    weight_decay: float = 0.05
    clip: float = 1.0
    label_smoothing: float = 0.0
    # Mixup / CutMix (timm's Mixup, "batch" mode): Beta parameters (0: off), the probability of mixing a
    # batch, and of CutMix rather than Mixup when both are on (DeiT's recipe: 0.8, 1.0, 1.0, 0.5)
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    erase_prob: float = 0.0  # timm's RandomErasing (pixel mode, one box) per image; DeiT: 0.25
    # RandAugment (timm's rand-m9-mstd0.5-inc1 for DeiT: 2 ops, magnitude 9, std 0.5): ops per image (0: off)
    randaug_ops: int = 0
    randaug_magnitude: float = 9.0
    randaug_std: float = 0.5
    ema_decay: float = 0.0  # > 0: also keep (and evaluate) a moving average of the weights (timm: 0.9998)
    crop_padding: int | None = None  # None: image_size // 8 (0 for digits)
    flip: bool | None = None  # None: as the dataset says (off for digits)
    dtype: str = "float32"
    attn_impl: str = "auto"
    # ViT-family regularisation (None: the model's default): dropout (original-ViT placement), stochastic
    # depth, and attention dropout on the softmax weights (in the kernel)
    dropout: float | None = None
    drop_path: float | None = None
    attn_drop: float | None = None
    remat: bool = False  # ViT, HaloNet: activation checkpointing per block (less memory, ~1/3 more compute)
    model_args: str | None = None  # model config fields, "key=value key=a,b" (e.g. "depth=6 heads=8")
    # LoRA: > 0 trains rank-r adapters on the linear layers (jaxattn.models.lora) and the classifier head only
    lora_rank: int = 0
    lora_alpha: float | None = None  # the adapters' scale is alpha / rank (default alpha: 2 * rank)
    lora_targets: str | None = None  # comma-separated layer names (ViT: qkv,proj,fc1,fc2); None: every linear
    seed: int = 0
    eval_every: int = 100
    eval_batch_size: int = 256
    ckpt_every: int = 100
    log_every: int = 10
    out: str | None = None
    # hard-attention / feature-selection gates (jaxattn.models.gates): "none", or "features" /
    # "tokens" (ViT; any value but "none" turns on HaloNet's stage gates), trained with gradient
    # routing (two passes, separate Adam at gate_lr) or jointly (one pass, optax.multi_transform)
    gates: str = "none"
    gate_mode: str = "routed"
    gate_lr: float = 1e-2
    # Residual Relationship Attention + Relationship Position Encoding over the batch's feature
    # vectors (jaxattn.models.rra.RBIClassifier): a training-time plug-in, bypassed at eval
    rra: bool = False

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/image-{Path(self.model).name}")

    def __post_init__(self):
        if self.gates not in ("none", "features", "tokens"):
            raise ValueError(f"--gates must be 'none', 'features' or 'tokens', got {self.gates!r}")
        if self.gate_mode not in ("routed", "joint", "none"):
            raise ValueError(f"--gate-mode must be 'routed', 'joint' or 'none', got {self.gate_mode!r}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0 (a Beta parameter; 0: off), got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.randaug_ops < 0 or not 0.0 <= self.randaug_magnitude <= 10.0 or self.randaug_std < 0:
            raise ValueError("--randaug-ops must be >= 0, --randaug-magnitude in [0, 10], --randaug-std >= 0; got "
                             f"{self.randaug_ops}, {self.randaug_magnitude}, {self.randaug_std}")
        for name in ("mix_prob", "mix_switch_prob", "erase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        loop.check_lora(self.lora_rank, self.lora_alpha, self.lora_targets)
        if self.lora_rank and (self.gates != "none" or self.rra):
            raise ValueError("--lora-rank trains adapters and the head only: not with --gates or --rra")


def lr_schedule(cfg: ImageConfig) -> optax.Schedule:
    return loop.warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def make_optimizer(cfg: ImageConfig) -> optax.GradientTransformation:
    return loop.adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, clip=cfg.clip, b2=0.999)


def classification_loss(model: nnx.Module, batch: dict, mean, std, *, num_classes: int,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """Mean (label-smoothed) cross-entropy of ``model(normalised images)``, plus the model's
    auxiliary loss if it has one (:func:`forward_with_aux_loss`); metrics ``acc`` (and ``aux_loss``)."""
    logits, aux = forward_with_aux_loss(model, normalize(batch["image"], mean, std))
    logits = logits.astype(jnp.float32)
    labels = batch["label"]
    target = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    if "mix_label" in batch:  # Mixup / CutMix (mix_batch): lam * y + (1 - lam) * y_partner
        lam = batch["mix_lam"]
        target = lam * target + (1.0 - lam) * optax.smooth_labels(jax.nn.one_hot(batch["mix_label"], num_classes),
                                                                  label_smoothing)
    loss = optax.softmax_cross_entropy(logits, target).mean()
    metrics = {"acc": (logits.argmax(-1) == labels).mean()}
    if aux is not None:
        loss = loss + aux
        metrics["aux_loss"] = aux
    return loss, metrics


class ImageTrainer(loop.Trainer):
    """:class:`loop.Trainer` for ``data``'s classes: loss, augmentation and eval outputs."""

    def __init__(self, cfg: ImageConfig, data: ImageData, model_factory: Callable[[nnx.Rngs], nnx.Module],
                 *, optimizer=None, devices=None, **trainer_kw):
        self.cfg, self.data = cfg, data
        mean, std, nc, ls = data.mean, data.std, data.num_classes, cfg.label_smoothing
        padding = (cfg.image_size // 8 if data.crop else 0) if cfg.crop_padding is None else cfg.crop_padding
        flip = data.flip if cfg.flip is None else cfg.flip
        self.padding, self.flip = padding, flip
        randaug = (dict(num_ops=cfg.randaug_ops, magnitude=cfg.randaug_magnitude, magnitude_std=cfg.randaug_std,
                        fill=tuple(float(m) * 255.0 for m in np.resize(mean, 3)))  # timm: the data mean
                   if cfg.randaug_ops else None)

        mixing = dict(mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob)

        def loss_fn(model, batch, rng):
            if cfg.erase_prob:  # per image (as timm's data pipeline), before mixing
                keys = jax.random.split(jax.random.fold_in(rng, 1), batch["image"].shape[0])
                erase = lambda im, k: random_erase(im, k, mean, std, prob=cfg.erase_prob)  # noqa: E731
                batch = {**batch, "image": jax.vmap(erase)(batch["image"], keys)}
            if cfg.mixup or cfg.cutmix:  # per micro-batch, from the step's loss key
                image, partner, lam = mix_batch(batch["image"], batch["label"], rng, **mixing)
                batch = {**batch, "image": image, "mix_label": partner, "mix_lam": lam}
            return classification_loss(model, batch, mean, std, num_classes=nc, label_smoothing=ls)

        def eval_fn(model, batch):
            logits = model(normalize(batch["image"], mean, std)).astype(jnp.float32)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return {"pred": logits.argmax(-1).astype(jnp.int32), "loss": losses}

        super().__init__(model_factory, optimizer or make_optimizer(cfg), loss_fn,
                         augment=make_augment(padding, flip, randaug), eval_fn=eval_fn, batch_size=cfg.batch_size,
                         grad_accum=cfg.grad_accum, seed=cfg.seed, devices=devices, **trainer_kw)


class RoutedImageTrainer(ImageTrainer, RoutedTrainer):
    """:class:`ImageTrainer` whose step routes gradients between gates and backbone."""


def make_image_trainer(cfg: ImageConfig, data: ImageData, model_factory, *, optimizer=None,
                       devices=None) -> ImageTrainer:
    """The trainer for ``cfg``'s gate setting: plain, joint (``optax.multi_transform``: Adam at
    ``gate_lr`` on the gates, AdamW on the rest, one pass) or routed (two passes)."""
    tx = optimizer or make_optimizer(cfg)
    if cfg.ema_decay:  # (an optimizer factory is wrapped around what it builds)
        tx = (loop.with_ema(tx, cfg.ema_decay) if isinstance(tx, optax.GradientTransformation)
              else lambda m, f=tx: loop.with_ema(f(m), cfg.ema_decay))
    gated = cfg.gates != "none" and cfg.gate_mode != "none"
    if gated and cfg.gate_mode == "routed":
        return RoutedImageTrainer(cfg, data, model_factory, optimizer=tx, devices=devices,
                                  gate_optimizer=optax.adam(cfg.gate_lr))
    if gated:  # joint
        if not isinstance(tx, optax.GradientTransformation):
            raise ValueError("gate_mode='joint' needs a plain optax optimizer")
        if cfg.ema_decay:
            raise ValueError("--ema-decay with --gate-mode joint is not supported; use --gate-mode routed")
        return ImageTrainer(cfg, data, model_factory, devices=devices,
                            optimizer=lambda m: joint_optimizer(m, tx, optax.adam(cfg.gate_lr)))
    if cfg.lora_rank:  # the adapters and the (new) classifier head train; the rest stays as loaded
        return ImageTrainer(cfg, data, model_factory, optimizer=tx, devices=devices,
                            wrt=nnx.Any(nnx.LoRAParam, nnx.PathContains("head")), save_frozen=False)
    return ImageTrainer(cfg, data, model_factory, optimizer=tx, devices=devices)


def evaluate(trainer: loop.Trainer, data: ImageData, batch_size: int, *, ema: bool = False
             ) -> tuple[dict[str, float], np.ndarray]:
    """``({"test_loss", "test_acc", "test_f1"}, confusion matrix)`` over the whole test split (``ema``: of
    the weights' moving average)."""
    preds, losses = [], []
    for batch, k in data.test_batches(batch_size):
        out = jax.device_get(trainer.eval_step(batch, ema=ema))
        preds.append(out["pred"][:k])
        losses.append(out["loss"][:k])
    cm = confusion_matrix(data.y_test, np.concatenate(preds), data.num_classes)
    s = classification_scores(cm)
    return {"test_loss": float(np.concatenate(losses).mean()), "test_acc": s["acc"], "test_f1": s["f1"]}, cm


def attention_weights(model: nnx.Module, images: jax.Array) -> tuple[jax.Array, list[jax.Array]] | None:
    """``(logits, per-layer softmax weights [B, heads, N, N])`` of a model whose ``__call__`` takes
    ``return_attention`` (ViT and its variants), or None for one without global attention weights."""
    if "return_attention" not in inspect.signature(type(model).__call__).parameters:
        return None
    out = nnx.jit(lambda m, x: m(x, return_attention=True))(model, images)  # one compile, not op by op
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)) and out[1]
            and all(getattr(w, "ndim", 0) == 4 for w in out[1])):
        return None
    return out[0], list(out[1])


def plot_attention_examples(model: nnx.Module, data: ImageData, path: Path, n: int = 8, title: str = "") -> bool:
    """``path``: the first ``n`` test images with the attention rollout and the last layer's
    attention over the patches (:func:`jaxattn.viz.plot_image_attention`); False (nothing written)
    for a model without attention weights."""
    from jaxattn.viz import plot_image_attention

    images = data.x_test[:n]
    got = attention_weights(model, data.normalize(jnp.asarray(images)))
    if got is None:
        return False
    logits, weights = got
    cfg = getattr(model, "cfg", None)
    patch = getattr(cfg, "patch_size", None)
    pool = "cls" if getattr(cfg, "pool", "cls") == "cls" else "mean"  # (attention pooling: every query row)
    # tokens before the patch grid (class token, registers): all but (H/p)*(W/p)
    prefix = weights[0].shape[-1] - (images.shape[1] // patch) * (images.shape[2] // patch) if patch else None
    preds = np.asarray(jnp.argmax(logits, -1))
    titles = [f"{data.classes[y]} -> {data.classes[p]}" for y, p in zip(data.y_test[:n], preds)]
    return plot_image_attention(images, [np.asarray(w) for w in weights], path, pool=pool, num_prefix_tokens=prefix,
                                titles=titles, suptitle=f"{title}: label -> prediction; attention over patches")


def _pretrained(name: str) -> bool:
    """Whether ``name`` is a timm hub folder (fine-tuning) rather than a registered model."""
    from jaxattn.models import hf

    return hf.hf_model_type(name) == "timm"


def use_pretrained_stats(data: ImageData, model: str) -> None:
    """When ``model`` is a timm folder, normalise ``data`` as its checkpoint was trained (its
    ``pretrained_cfg`` mean and std) if both have the same channels; otherwise ``data`` keeps its own."""
    from jaxattn.models import hf
    from jaxattn.models.timm_hub import preprocessing

    if not _pretrained(model):
        return
    pre = preprocessing(hf.raw_config(model))
    if len(pre["mean"]) == data.channels:
        data.mean, data.std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)


_RESERVED = {"num_classes": "the data", "image_size": "--image-size", "in_channels": "the data", "dtype": "--dtype",
             "attn_impl": "--attn-impl", "dropout": "--dropout", "drop_path": "--drop-path",
             "attn_drop": "--attn-drop", "remat": "--remat", "gates": "--gates"}


def default_model_factory(cfg: ImageConfig, data: ImageData) -> Callable[[nnx.Rngs], nnx.Module]:
    """The registered model ``cfg.model`` for ``data``, or the pretrained one in the timm folder ``cfg.model``
    fitted to it (fresh classifier, first conv and position grid adapted as timm does)."""
    from jaxattn.models import create_model
    from jaxattn.models.registry import model_config

    base = model_config(cfg.model)
    extra = loop.parse_model_args(cfg.model_args, base, reserved=_RESERVED) if base is not None else {}
    if cfg.remat:
        if not hasattr(base, "remat"):
            raise ValueError(f"--remat: {cfg.model} has no activation checkpointing (ViT and HaloNet models have)")
        extra["remat"] = True
    if cfg.gates != "none":
        if not hasattr(base, "gates"):
            raise ValueError(f"--model {cfg.model} has no gates; use a ViT or HaloNet model or --gates none")
        extra["gates"] = True if isinstance(base.gates, bool) else cfg.gates
    kw = dict(num_classes=data.num_classes, image_size=data.image_size, in_channels=data.channels, dtype=cfg.dtype,
              attn_impl=cfg.attn_impl, dropout=cfg.dropout, drop_path=cfg.drop_path, attn_drop=cfg.attn_drop, **extra)

    def factory(rngs):
        model = create_model(cfg.model, rngs=rngs, **kw)
        if cfg.lora_rank:  # (every linear layer outside the classifier head, or --lora-targets)
            from jaxattn.models.lora import add_lora

            add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets=loop.lora_target_names(cfg.lora_targets), rngs=rngs)
        if cfg.rra:
            from jaxattn.models.rra import RBIClassifier

            model = RBIClassifier(model, rngs=rngs)
        return model

    return factory


def load_trained(run_dir: str | Path, data: ImageData | None = None, *, flag: str = "--checkpoint",
                 ema: bool = False):
    """``(model in eval mode, ImageConfig, data, step)`` of an image-task run directory (its ``config.json``
    and latest checkpoint); ``data`` defaults to the run's own (its model's shapes and normalisation).
    ``ema``: the weights' moving average of a run trained with ``--ema-decay``."""
    from jaxattn.models.registry import model_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ValueError(f"{flag} {run_dir}: no config.json (expected an image-task run directory, "
                         "e.g. runs/image-vit-tiny)")
    raw = json.loads((run_dir / "config.json").read_text())
    base = model_config(str(raw.get("model")))
    if base is None or hasattr(base, "vocab_size"):  # (not a registered or pretrained image model)
        raise ValueError(f"{flag} {run_dir}: a run of {raw.get('model')!r}, not of an image model "
                         "(expected an image-task run directory, e.g. runs/image-vit-tiny)")
    icfg = ImageConfig(**{k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(ImageConfig)}})
    if data is None:
        data = load_images(icfg.data, dataset=icfg.dataset, image_size=icfg.image_size,
                           val_fraction=icfg.val_fraction)
    use_pretrained_stats(data, icfg.model)
    trainer = make_image_trainer(icfg, data, default_model_factory(icfg, data))
    manager = loop.checkpoint_manager(run_dir)
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"{flag} {run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    trainer.restore(manager, step)
    if ema and not trainer.has_ema:
        raise ValueError(f"{run_dir}: the run kept no EMA weights (train it with --ema-decay)")
    return (trainer.ema_model if ema else trainer.eval_model), icfg, data, int(step)


def check_model(cfg: ImageConfig) -> None:
    """A clear error for a model name that is not a registered image model (before any data is read)."""
    from jaxattn.models.registry import check_model_kind, model_config

    check_model_kind(cfg.model, "image")
    loop.parse_model_args(cfg.model_args, model_config(cfg.model), reserved=_RESERVED)


def train(cfg: ImageConfig, *, resume: bool = False,
          model_factory: Callable[[nnx.Rngs], nnx.Module] | None = None,
          optimizer: optax.GradientTransformation | Callable | None = None, data: ImageData | None = None,
          stop_after: int | None = None, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns ``{"out", "trainer", "test_acc", "test_f1", "history", ...}``.
    ``model_factory``/``optimizer``/``data`` override the model registry, the AdamW of ``cfg``
    and ``load_images(cfg.data, ...)``."""
    if data is None:
        check_data_args(cfg.data, cfg.dataset)
    if model_factory is None:
        check_model(cfg)
        if _pretrained(cfg.model):  # the run's config.json finds the folder from anywhere
            cfg = dataclasses.replace(cfg, model=str(Path(cfg.model).resolve()))
    if data is None:
        data = load_images(cfg.data, dataset=cfg.dataset, image_size=cfg.image_size,
                           val_fraction=cfg.val_fraction)
    if data.image_size != cfg.image_size:
        raise ValueError(f"data images are {data.image_size}px but --image-size is {cfg.image_size}")
    if model_factory is None:
        use_pretrained_stats(data, cfg.model)
    out = cfg.out_dir()
    try:
        trainer = make_image_trainer(cfg, data, model_factory or default_model_factory(cfg, data),
                                     optimizer=optimizer)
    except TypeError as e:  # e.g. a registered model that is not an image classifier
        raise ValueError(f"--model {cfg.model}: cannot build it as an image classifier ({e})") from None
    last_cm: list[np.ndarray] = []

    def run_eval(step: int) -> dict[str, float]:
        scores, cm = evaluate(trainer, data, cfg.eval_batch_size)
        last_cm[:] = [cm]
        if trainer.has_ema:
            scores.update({f"{k}_ema": v for k, v in evaluate(trainer, data, cfg.eval_batch_size, ema=True)[0].items()})
        return scores

    config = {**dataclasses.asdict(cfg), "source": data.source, "num_classes": data.num_classes,
              "classes": data.classes, "crop_padding": trainer.padding, "flip": trainer.flip,
              "train_images": len(data.x_train), "test_images": len(data.x_test)}
    result = loop.fit(
        trainer, lambda step: data.train_batch(cfg.seed, step, cfg.batch_size), steps=cfg.steps, out_dir=out,
        resume=resume, evaluate=run_eval, eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every,
        log_every=cfg.log_every, lr_schedule=lr_schedule(cfg), throughput=("images_per_s", lambda b: len(b["label"])),
        config=config, plot="curves.png", plot_title=f"{cfg.model} on {Path(data.source).name}",
        plot_metrics=("train_acc", "test_acc", "test_f1") + (("test_acc_ema",) if trainer.has_ema else ()),
        fields=FIELDS + (EMA_FIELDS if trainer.has_ema else []), desc=f"train {cfg.model}",
        stop_after=stop_after, progress=progress)
    if "stopped_at" in result:
        return result
    if not last_cm or not result["history"] or result["history"][-1][0] != cfg.steps:
        scores = run_eval(cfg.steps)
    else:
        scores = result["history"][-1][1]
    plot_confusion(last_cm[0], out / "confusion.png", data.classes,
                   title=f"{cfg.model}: test accuracy {scores['test_acc']:.1%}")
    summary = {"step": cfg.steps, **scores}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = [out / "curves.png", out / "confusion.png"]
    if plot_attention_examples(trainer.eval_model, data, out / "attention.png", title=cfg.model):
        plots.append(out / "attention.png")
    ema_note = f" (EMA weights: {scores['test_acc_ema']:.2%}, {scores['test_f1_ema']:.4f})" if trainer.has_ema else ""
    print(f"test accuracy {scores['test_acc']:.2%}  macro F1 {scores['test_f1']:.4f}{ema_note}\n"
          f"metrics: {result['metrics_csv']}  plots: {', '.join(map(str, plots))}  "
          f"checkpoints: {out / 'checkpoints'}")
    return {**result, **scores, "confusion": last_cm[0], "data": data}
