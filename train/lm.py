"""Language-model training with Optax: AdamW, warmup + cosine, clipping, gradient
accumulation, data parallelism over local devices, Orbax checkpoints with exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattn.train.data import Corpus, get_batch, load_corpus
from jaxattn.train.metrics import MetricsLog, plot_losses


@dataclasses.dataclass
class LMConfig:
    model: str = "tnl-tiny"
    data: str | None = None  # None: the Python standard library's sources (bytes)
    max_bytes: int = 8_000_000
    vocab_size: int | None = None
    seq_len: int = 128
    batch_size: int = 16  # global batch per optimizer step (all devices, all micro-batches)
    grad_accum: int = 1
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "float32"  # compute dtype; parameters stay fp32
    attn_impl: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    log_every: int = 10
    out: str | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 200

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/lm-{self.model}")


def lr_schedule(cfg: LMConfig) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(1, cfg.warmup), max(cfg.steps, cfg.warmup + 1), cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: LMConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))


def lm_loss(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) over ``tokens [batch, seq + 1]``."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


class Trainer:
    """Holds the (model, optimizer) state as one pytree and a jitted data-parallel step."""

    def __init__(self, cfg: LMConfig, model_factory: Callable[[nnx.Rngs], nnx.Module],
                 devices: list[Any] | None = None):
        self.cfg = cfg
        devices = devices or jax.local_devices()
        if cfg.batch_size % (cfg.grad_accum * len(devices)):
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum "
                             f"{cfg.grad_accum} x {len(devices)} devices")
        self.mesh = Mesh(np.array(devices), ("data",))
        model = model_factory(nnx.Rngs(cfg.seed))
        optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
        self.graphdef, state = nnx.split((model, optimizer))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(None, "data"))
        self.state = jax.device_put(state, self.replicated)
        self._step = jax.jit(self._train_step, donate_argnums=0,
                             out_shardings=(self.replicated, self.replicated))
        self._eval = jax.jit(self._eval_step)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)[0]

    def _train_step(self, state, tokens):
        """``tokens [accum, micro_batch, seq + 1]``: gradients averaged over micro-batches."""
        model, optimizer = nnx.merge(self.graphdef, state)
        gdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_of(p, micro):
            return lm_loss(nnx.merge(gdef, p, rest), micro)

        def accumulate(carry, micro):
            loss, grads = jax.value_and_grad(loss_of)(params, micro)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, tokens)
        n = tokens.shape[0]
        loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def _eval_step(self, state, tokens):
        return lm_loss(nnx.merge(self.graphdef, state)[0], tokens)

    def step(self, batch: np.ndarray) -> float:
        c = self.cfg
        tokens = batch.reshape(c.grad_accum, c.batch_size // c.grad_accum, -1)
        tokens = jax.device_put(tokens, self.batch_sharding)
        self.state, loss = self._step(self.state, tokens)
        return loss

    def evaluate(self, corpus: Corpus) -> float:
        c = self.cfg
        losses = [self._eval(self.state, get_batch(corpus.val, seed=10_000 + c.seed, step=i,
                                                   batch=c.batch_size, seq_len=c.seq_len))
                  for i in range(c.eval_batches)]
        return float(np.mean(jax.device_get(losses)))

    # -- checkpoints: the state's leaves in order, plus the step ------------------------
    def save(self, manager, step: int) -> None:
        import orbax.checkpoint as ocp

        leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(self.state))}
        manager.save(step, args=ocp.args.StandardSave(leaves))

    def restore(self, manager, step: int) -> None:
        import orbax.checkpoint as ocp

        leaves, treedef = jax.tree.flatten(self.state)
        target = {str(i): np.asarray(x) for i, x in enumerate(leaves)}
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        self.state = jax.device_put(
            jax.tree.unflatten(treedef, [jnp.asarray(restored[str(i)]) for i in range(len(leaves))]),
            self.replicated)


def _manager(out_dir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager((out_dir / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))


def default_model_factory(cfg: LMConfig, vocab_size: int) -> Callable[[nnx.Rngs], nnx.Module]:
    from jaxattn.models import create_model

    return lambda rngs: create_model(cfg.model, rngs=rngs, vocab_size=vocab_size, dtype=cfg.dtype,
                                     attn_impl=cfg.attn_impl)


def train(cfg: LMConfig, *, resume: bool = False,
          model_factory: Callable[[nnx.Rngs], nnx.Module] | None = None,
          stop_after: int | None = None, progress: bool = True, sample: bool = True) -> dict:
    """Runs (or resumes) training; returns a summary. ``stop_after`` ends the process-side
    loop after that step without a final checkpoint, as a kill would (for tests)."""
    from tqdm import tqdm

    corpus = load_corpus(cfg.data, max_bytes=cfg.max_bytes, vocab_size=cfg.vocab_size)
    if len(corpus.val) < cfg.seq_len + 1:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the validation split "
                         f"({len(corpus.val)} tokens); use more data or a shorter --seq-len")
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, model_factory or default_model_factory(cfg, corpus.vocab_size))
    manager = _manager(out)
    start = 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        trainer.restore(manager, start)
        print(f"resumed from step {start} in {out / 'checkpoints'}")
    elif resume:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    (out / "config.json").write_text(json.dumps(
        {**dataclasses.asdict(cfg), "vocab_size": corpus.vocab_size, "source": corpus.source}, indent=1))
    log = MetricsLog(out, resume_step=start if start else None)
    schedule = lr_schedule(cfg)

    val_losses: list[float] = []
    last_loss = math.nan
    t0, tokens_seen = time.perf_counter(), 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc=f"train {cfg.model}", unit="step")
    if start == 0 and cfg.eval_every:
        val = trainer.evaluate(corpus)
        val_losses.append(val)
        log.log(step=0, val_loss=val, val_ppl=math.exp(val))
    for step in bar:
        batch = get_batch(corpus.train, seed=cfg.seed, step=step, batch=cfg.batch_size, seq_len=cfg.seq_len)
        loss = trainer.step(batch)
        tokens_seen += batch.shape[0] * cfg.seq_len
        done = step + 1
        row: dict[str, Any] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            last_loss = float(loss)
            tps = tokens_seen / (time.perf_counter() - t0)
            row.update(step=done, loss=last_loss, lr=float(schedule(step)), tokens_per_s=tps)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            val = trainer.evaluate(corpus)
            val_losses.append(val)
            row.update(step=done, val_loss=val, val_ppl=math.exp(val))
            bar.write(f"step {done}: val loss {val:.4f}  ppl {math.exp(val):.2f}")
        if row:
            log.log(**row)
        if done % cfg.ckpt_every == 0 and done != cfg.steps:
            trainer.save(manager, done)
        if stop_after is not None and done >= stop_after:
            manager.wait_until_finished()
            return {"stopped_at": done, "trainer": trainer}
    bar.close()
    if manager.latest_step() != cfg.steps:
        trainer.save(manager, cfg.steps)
    manager.wait_until_finished()
    plot_losses(log.path, out / "loss.png", title=f"{cfg.model} on {corpus.source}")
    summary = {"out": str(out), "final_loss": last_loss, "val_losses": val_losses, "trainer": trainer}
    if sample and corpus.vocab_size == 256 and hasattr(trainer.model, "cfg"):
        from jaxattn.models import generate

        prompt = np.frombuffer(cfg.sample_prompt.encode(), np.uint8).astype(np.int32)[None]
        toks = generate(trainer.model, jnp.asarray(prompt), cfg.sample_tokens, temperature=0.8, top_k=40,
                        key=jax.random.PRNGKey(cfg.seed))
        text = bytes(np.asarray(toks[0]).clip(0, 255).astype(np.uint8)).decode("utf-8", errors="replace")
        summary["sample"] = text
        print("sample:\n" + text)
    print(f"metrics: {log.path}  plot: {out / 'loss.png'}  checkpoints: {out / 'checkpoints'}")
    return summary
