"""Sparsifiner two-stage training on the default image data (after ``lim142857/Sparsifiner``,
``src/main.py`` / ``src/losses.py``): ``python -m jaxattn.train sparsifiner``.

1. *Teacher*: a dense ViT trained with the image task (:func:`jaxattn.train.image.train`).
2. *Stage 1* (the original's ``attn_recon``): a :class:`~jaxattn.models.sparsifiner.Sparsifiner`
   initialised from the teacher; only the connectivity predictors train (``Trainer(wrt=PREDICTOR)``:
   gradients and optimizer state exist for them alone), the backbone attends densely, and the loss
   is ``0.01 * mean_layers sum((Â - A_teacher[:, :, 1:])^2)`` (sum-MSE over batch, heads, patch
   queries and keys; the class-token query row is not predicted).
3. *Stage 2* (``cls_distill``): the predictors are frozen (the original builds this optimizer while
   ``mask_predictor`` has ``requires_grad=False``) and the backbone trains through the top-k masked
   attention with ``CE + 0.5 KL + 0.5 MSE(final patch tokens)`` against the teacher. The KL is the
   original's ``F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True,
   reduction="batchmean")``, i.e. ``sum p_t (log p_t - log p_s)`` averaged over the batch.

Then it evaluates teacher, student after stage 1 and after stage 2 on the test split, counts the
attention FLOPs (dense vs kept entries, plus the predictor), and writes the ``sparsifiner`` section
of ``RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.models.sparsifiner import BACKBONE, PREDICTOR, Sparsifiner, SparsifinerConfig, attention_flops
from jaxattn.train import loop
from jaxattn.train.images import ImageData, load_images, normalize

__all__ = ["SparsifinerRunConfig", "attn_recon_loss", "distill_loss", "make_stage_trainer", "teacher_outputs", "run"]


@dataclasses.dataclass
class SparsifinerRunConfig:
    model: str = "vit-tiny"  # the registered ViT used as teacher and backbone
    teacher_steps: int = 300  # the image task's default budget: ~88% on digits (RESULTS.md)
    stage1_steps: int = 60
    stage2_steps: int = 100
    batch_size: int = 64
    teacher_lr: float = 3e-3
    stage1_lr: float = 3e-3
    stage2_lr: float = 3e-4
    warmup: int = 10  # stages 1 and 2 (the teacher uses the image task's default)
    weight_decay: float = 0.05
    attn_keep_rate: float = 0.25
    reduce_n_factor: int = 6
    basis_threshold: float = 0.02
    basis_topk: int = 8
    recon_weight: float = 0.01
    cls_weight: float = 1.0
    kl_weight: float = 0.5
    token_weight: float = 0.5
    eval_batch_size: int = 256
    seed: int = 0
    out: str = "runs/sparsifiner"
    results: str | None = "RESULTS.md"  # None: do not write RESULTS.md


# -- losses ---------------------------------------------------------------------------------
def attn_recon_loss(approx: Sequence[jax.Array], teacher_attn: Sequence[jax.Array], *, has_cls: bool = True) -> jax.Array:
    """Mean over layers of ``sum((Â - A_t[:, :, has_cls:])^2)`` (``F.mse_loss(reduction="sum")``)."""
    if len(approx) != len(teacher_attn) or not approx:
        raise ValueError(f"approx and teacher_attn must be non-empty per-layer lists of equal length, got "
                         f"{len(approx)} and {len(teacher_attn)}")
    total = 0.0
    for a, t in zip(approx, teacher_attn):
        t = jax.lax.stop_gradient(t[:, :, int(has_cls):].astype(jnp.float32))
        if a.shape != t.shape:
            raise ValueError(f"approx layer shape {tuple(a.shape)} != teacher attention rows {tuple(t.shape)}")
        total = total + jnp.sum((a.astype(jnp.float32) - t) ** 2)
    return total / len(approx)


def distill_loss(logits: jax.Array, labels: jax.Array, tokens: jax.Array, teacher_logits: jax.Array,
                 teacher_tokens: jax.Array, *, has_cls: bool = True, cls_weight: float = 1.0,
                 kl_weight: float = 0.5, token_weight: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-2 loss ``cls_weight CE + kl_weight KL(p_t || p_s) + token_weight MSE(patch tokens)``.

    ``logits [B, classes]``, ``labels [B]`` int, ``tokens [B, N, dim]`` (normalised final tokens;
    the class token, if any, is skipped as the original's ``features = x[:, 1:]``); teacher alike.
    """
    if logits.shape != teacher_logits.shape or tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student and teacher shapes differ: logits {tuple(logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}, tokens {tuple(tokens.shape)} vs {tuple(teacher_tokens.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [batch] = {logits.shape[:1]}, got {tuple(labels.shape)}")
    logits = logits.astype(jnp.float32)
    t_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    log_ps, log_pt = jax.nn.log_softmax(logits), jax.nn.log_softmax(t_logits)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps)) / logits.shape[0]
    s = tokens[:, int(has_cls):].astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_tokens[:, int(has_cls):].astype(jnp.float32))
    mse = jnp.mean((s - t) ** 2)
    total = cls_weight * ce + kl_weight * kl + token_weight * mse
    return total, {"ce": ce, "kl": kl, "token_mse": mse, "acc": (logits.argmax(-1) == labels).mean()}


def teacher_outputs(teacher: nnx.Module, images: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """``(logits, normalised tokens, per-layer softmax attention)`` of a dense ViT, detached."""
    tokens, attn = teacher._tokens(images, True)
    logits = teacher.head(teacher.pool(tokens)).astype(jnp.float32)
    return jax.tree.map(jax.lax.stop_gradient, (logits, tokens, attn))


# -- trainers -------------------------------------------------------------------------------
def sparsifiner_config(base: Any, data: ImageData, cfg: SparsifinerRunConfig) -> SparsifinerConfig:
    """The Sparsifiner config of ViT config ``base`` sized for ``data``."""
    fields = {**dataclasses.asdict(base), "num_classes": data.num_classes, "image_size": data.image_size,
              "in_channels": data.channels, "attn_impl": "xla" if jax.default_backend() == "cpu" else "auto"}
    return SparsifinerConfig(**fields, attn_keep_rate=cfg.attn_keep_rate, reduce_n_factor=cfg.reduce_n_factor,
                             basis_threshold=cfg.basis_threshold, basis_topk=cfg.basis_topk)


def make_stage_trainer(stage: int, scfg: SparsifinerConfig, init_params: nnx.State, teacher: nnx.Module,
                       data: ImageData, cfg: SparsifinerRunConfig, *, devices=None) -> loop.Trainer:
    """The shared :class:`loop.Trainer` of stage 1 (``wrt=PREDICTOR``, reconstruction loss) or stage 2
    (``wrt=BACKBONE``, distillation loss); the model starts from ``init_params`` (an ``nnx.State`` of
    parameters: the teacher's, or a Sparsifiner's), the teacher is a closed-over constant."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    mean, std, has_cls = data.mean, data.std, scfg.pool == "cls"
    tg, tstate = nnx.split(teacher)
    # own copies: the trainer donates its state, which would delete buffers shared with the teacher
    tstate = jax.tree.map(jnp.array, tstate)
    init_params = jax.tree.map(jnp.array, init_params)

    def factory(rngs):
        m = Sparsifiner(scfg, rngs=rngs)
        nnx.update(m, init_params)
        return m

    def loss_fn(model, batch, rng):
        x = normalize(batch["image"], mean, std)
        t_logits, t_tokens, t_attn = teacher_outputs(nnx.merge(tg, tstate), x)
        if stage == 1:
            out = model.forward(x, stage="recon")
            rec = attn_recon_loss(out["approx"], t_attn, has_cls=has_cls)
            return cfg.recon_weight * rec, {"recon_sum_mse": rec}
        out = model.forward(x, stage="sparse")
        return distill_loss(out["logits"], batch["label"], out["tokens"], t_logits, t_tokens, has_cls=has_cls,
                            cls_weight=cfg.cls_weight, kl_weight=cfg.kl_weight, token_weight=cfg.token_weight)

    def eval_fn(model, batch):
        x = normalize(batch["image"], mean, std)
        out = model.forward(x, stage="sparse")
        _, _, t_attn = teacher_outputs(nnx.merge(tg, tstate), x)
        mass = jnp.stack([jnp.sum(jnp.where(m, a, 0.0), -1).mean((1, 2)) for m, a in zip(out["mask"], t_attn)]).mean(0)
        kept = jnp.stack([m.mean((1, 2, 3)) for m in out["mask"]]).mean(0)
        losses = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"])
        return {"pred": out["logits"].argmax(-1).astype(jnp.int32), "loss": losses, "kept": kept,
                "teacher_mass": mass}

    steps, lr = (cfg.stage1_steps, cfg.stage1_lr) if stage == 1 else (cfg.stage2_steps, cfg.stage2_lr)
    tx = loop.adamw(loop.warmup_cosine(lr, cfg.warmup, steps, 0.01), weight_decay=cfg.weight_decay, clip=1.0,
                    b2=0.999)
    return loop.Trainer(factory, tx, loss_fn, batch_size=cfg.batch_size, seed=cfg.seed, eval_fn=eval_fn,
                        devices=devices, wrt=PREDICTOR if stage == 1 else BACKBONE)


def evaluate_student(trainer: loop.Trainer, data: ImageData, batch_size: int) -> dict[str, float]:
    """Test accuracy, the kept fraction of attention entries and the teacher attention mass inside the mask."""
    preds, kept, mass = [], [], []
    for batch, k in data.test_batches(batch_size):
        out = jax.device_get(trainer.eval_step(batch))
        preds.append(out["pred"][:k])
        kept.append(out["kept"][:k])
        mass.append(out["teacher_mass"][:k])
    preds = np.concatenate(preds)
    return {"test_acc": float((preds == data.y_test).mean()), "kept_fraction": float(np.concatenate(kept).mean()),
            "teacher_mass_kept": float(np.concatenate(mass).mean())}


# -- the run --------------------------------------------------------------------------------
def run(cfg: SparsifinerRunConfig, *, data: ImageData | None = None, progress: bool = True) -> dict:
    """Teacher, stage 1, stage 2, evaluation, FLOPs; writes ``RESULTS.md`` unless ``cfg.results`` is None."""
    from jaxattn.models import MODEL_CONFIGS
    from jaxattn.models.vit import ViTConfig
    from jaxattn.train.image import ImageConfig, train as train_image

    base = MODEL_CONFIGS.get(cfg.model)
    if not isinstance(base, ViTConfig) or isinstance(base, SparsifinerConfig):
        vits = sorted(k for k, v in MODEL_CONFIGS.items() if type(v) is ViTConfig)
        raise ValueError(f"--model must be a registered dense ViT ({', '.join(vits)}), got {cfg.model!r}")
    data = data or load_images(None)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    icfg = ImageConfig(model=cfg.model, steps=cfg.teacher_steps, batch_size=cfg.batch_size, lr=cfg.teacher_lr,
                       seed=cfg.seed, eval_every=0, ckpt_every=cfg.teacher_steps, attn_impl="xla"
                       if jax.default_backend() == "cpu" else "auto", out=str(out / "teacher"))
    tres = train_image(icfg, data=data, progress=progress)
    teacher = tres["trainer"].eval_model
    times = {"teacher": time.perf_counter() - t0}
    scfg = sparsifiner_config(base, data, cfg)

    results: dict[str, Any] = {"teacher_acc": tres["test_acc"]}
    params = nnx.state(teacher, nnx.Param)
    for stage in (1, 2):
        t1 = time.perf_counter()
        trainer = make_stage_trainer(stage, scfg, params, teacher, data, cfg)
        steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
        loop.fit(trainer, lambda step: data.train_batch(cfg.seed + stage, step, cfg.batch_size), steps=steps,
                 out_dir=out / f"stage{stage}", ckpt_every=steps, log_every=10, plot=f"stage{stage}.png",
                 plot_title=f"Sparsifiner stage {stage}", desc=f"stage {stage}", progress=progress,
                 config=dataclasses.asdict(cfg))
        results[f"stage{stage}"] = evaluate_student(trainer, data, cfg.eval_batch_size)
        times[f"stage{stage}"] = time.perf_counter() - t1
        params = nnx.state(trainer.model, nnx.Param)
    n, d, h, depth = scfg.num_tokens, scfg.head_dim, scfg.heads, scfg.depth
    flops = {k: attention_flops(n, d, scfg.attn_budget, scfg.reduced_c, scfg.reduced_n,
                                basis_topk=None if k == "dense coef" else scfg.basis_topk)
             for k in ("dense coef", "top-8 coef")}
    results.update(times=times, flops=flops, sizes=dict(num_tokens=n, head_dim=d, heads=h, depth=depth,
                                                        keep=scfg.attn_budget, reduced_n=scfg.reduced_n,
                                                        reduced_c=scfg.reduced_c))
    (out / "summary.json").write_text(json.dumps(results, indent=1, default=float))
    body = report(cfg, results, data)
    print(body)
    if cfg.results:
        from jaxattn.train.results import write_section

        write_section(cfg.results, "sparsifiner", body)
    return results


def _flops_rows(n: int, d: int, keep: int, c: int, r: int, topk: int, label: str) -> list[str]:
    rows = []
    for name, bt in (("dense coef·basis", None), ("top-8 coef·basis", topk)):
        f = attention_flops(n, d, keep, c, r, basis_topk=bt)
        rows.append(f"| {label}, {name} | {n} | {keep} | {f['kept_fraction']:.3f} | {f['dense']:,.0f} | "
                    f"{f['sparse']:,.0f} | {f['predictor']:,.0f} | "
                    f"{1 - (f['sparse'] + f['predictor']) / f['dense']:+.1%} |")
    return rows


def report(cfg: SparsifinerRunConfig, r: dict, data: ImageData) -> str:
    """The RESULTS.md section (markdown)."""
    s, t = r["sizes"], r["times"]
    s1, s2 = r["stage1"], r["stage2"]
    lines = [
        "## Sparsifiner: learned instance-dependent top-k attention (spec §8)", "",
        f"{cfg.model} ({s['depth']} layers, {s['heads']} heads, head_dim {s['head_dim']}, N = {s['num_tokens']} tokens) "
        f"on scikit-learn digits at {data.image_size}x{data.image_size} ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images), batch {cfg.batch_size}, seed {cfg.seed}, CPU (2 shared cores), one run. "
        f"Teacher: dense ViT, {cfg.teacher_steps} steps of the image task (AdamW lr {cfg.teacher_lr}). Stage 1: "
        f"predictors only (backbone frozen, dense attention), {cfg.stage1_steps} steps, AdamW lr {cfg.stage1_lr}, "
        f"loss {cfg.recon_weight} x sum-MSE(Â, teacher attention). Stage 2: backbone only (predictors frozen) "
        f"through the top-k mask, {cfg.stage2_steps} steps, AdamW lr {cfg.stage2_lr}, loss {cfg.cls_weight} CE + "
        f"{cfg.kl_weight} KL + {cfg.token_weight} MSE(final patch tokens). k = ceil({cfg.attn_keep_rate} N) = "
        f"{s['keep']} keys per patch query (the class-token query keeps all {s['num_tokens']}), n_r = {s['reduced_n']} "
        f"basis columns, predictor width {s['reduced_c']}, basis threshold {cfg.basis_threshold}, top-{cfg.basis_topk} "
        f"coefficients. Wall time: teacher {t['teacher']:.0f} s, stage 1 {t['stage1']:.0f} s, stage 2 "
        f"{t['stage2']:.0f} s. Reproduce: `python -m jaxattn.train sparsifiner`.", "",
        "| model | test accuracy | Δ vs teacher | kept attention entries | teacher attention mass inside the mask |",
        "|---|---|---|---|---|",
        f"| teacher (dense ViT) | {r['teacher_acc']:.4f} | — | 1.000 | 1.000 |",
        f"| Sparsifiner after stage 1 (sparse inference, backbone = teacher) | {s1['test_acc']:.4f} | "
        f"{s1['test_acc'] - r['teacher_acc']:+.4f} | {s1['kept_fraction']:.3f} | {s1['teacher_mass_kept']:.3f} |",
        f"| Sparsifiner after stage 2 | {s2['test_acc']:.4f} | {s2['test_acc'] - r['teacher_acc']:+.4f} | "
        f"{s2['kept_fraction']:.3f} | {s2['teacher_mass_kept']:.3f} |", "",
        "Attention FLOPs per head per layer (analytic, 2 per multiply-add; QK^T + AV over the kept entries vs "
        "dense; predictor = the q'/k' projections, k'^T P_n, q'k'', coef·basis; softmax, top-k and the unchanged "
        "QKV/output projections not counted). Last column: saving of sparse + predictor vs dense. The model runs "
        "the dense masked path (`jaxattn.attention(mask=...)`), so these savings are not realised in wall-clock "
        "time here.", "",
        "| setting | N | k | kept fraction | dense | sparse | predictor | net saving |",
        "|---|---|---|---|---|---|---|---|",
        *_flops_rows(s["num_tokens"], s["head_dim"], s["keep"], s["reduced_c"], s["reduced_n"], cfg.basis_topk,
                     cfg.model),
        *_flops_rows(197, 64, 50, 32, 197 // 6, cfg.basis_topk, "DeiT-S size (not run)"), "",
        *([f"**Caveat:** the teacher reached only {r['teacher_acc']:.1%} test accuracy in {cfg.teacher_steps} steps "
           f"(undertrained at this CPU budget), so the accuracy comparison says little about Sparsifiner; "
           f"rerun with more teacher steps (e.g. `--teacher-steps 300 --batch-size 64`) for a meaningful one. "
           f"The mask itself is informative: it holds {s2['teacher_mass_kept']:.0%} of the teacher's attention "
           f"mass with {s2['kept_fraction']:.0%} of the entries (a random mask would hold about "
           f"{s2['kept_fraction']:.0%}).", ""] if r["teacher_acc"] < 0.8 else []),
        "With coef·basis counted densely the predictor costs about two thirds of what the mask saves, at any N "
        "(coef·basis is itself quadratic in N, with n_r = N/6); counting only the top-8 coefficients it costs "
        "8 multiply-adds per entry and the net saving grows with N. "
        "The original's KL term is `F.kl_div(log p_s, log p_t, log_target=True)` = KL(teacher ‖ student); "
        "this is what is implemented (the spec writes KL(student‖teacher)).",
    ]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------
def add_parser(sub) -> None:
    """Adds the ``sparsifiner`` subcommand to ``python -m jaxattn.train``."""
    import argparse

    p = sub.add_parser("sparsifiner", help="Sparsifiner two-stage training + report (digits, CPU-sized)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop.add_config_args(p, SparsifinerRunConfig, help={
        "model": "registered dense ViT used as teacher and Sparsifiner backbone",
        "results": "RESULTS.md to write the 'sparsifiner' section into"})
    p.add_argument("--no-progress", action="store_true")


def main_from_args(args: dict) -> int:
    """Runs the subcommand from parsed arguments."""
    progress = not args.pop("no_progress", False)
    cfg = loop.config_from_args(SparsifinerRunConfig, args)
    for name in ("teacher_steps", "stage1_steps", "stage2_steps", "batch_size", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    run(cfg, progress=progress)
    return 0
