"""Language-model training on the shared loop (:mod:`jaxattn.train.loop`): AdamW, warmup + cosine,
clipping, gradient accumulation, data parallelism over local devices, Orbax checkpoints with exact
resume, validation loss/perplexity, a text sample at the end."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.train import loop
from jaxattn.train.data import Corpus, get_batch, load_corpus, split_documents
from jaxattn.train.loop import adamw, warmup_cosine
from jaxattn.train.losses import cross_entropy_with_integer_labels
from jaxattn.train.metrics import FIELDS


@dataclasses.dataclass
class LMConfig:
    model: str = "tnl-tiny"
    data: str | None = None  # None: the Python standard library's sources (bytes)
    max_bytes: int = 8_000_000
    vocab_size: int | None = None
    seq_len: int = 128
    # packed documents: each token attends (TNL: mixes) only within its own document (the files of a text
    # corpus, or the tokens after each doc_sep in token files), positions restarting at each
    doc_mask: bool = False
    doc_sep: int | None = None  # document separator id (GPT-2's end-of-text: 50256); None: file boundaries
    # the loss skips each target that begins a new document (its context is the previous document; Megatron's
    # --eod-mask-loss), with or without doc_mask
    doc_loss_mask: bool = False
    batch_size: int = 16  # global batch per optimizer step (all devices, all micro-batches)
    grad_accum: int = 1
    seq_parallel: int = 1  # devices per sequence (TNL: sequence-parallel Lightning attention); the rest: data
    # GPT with seq_parallel > 1: ring attention's shards, "contiguous" or "zigzag" (balanced causal work)
    ring_layout: str = "contiguous"
    fsdp: bool = False  # shard parameters and optimizer state over the data devices (ZeRO-3); same steps
    expert_parallel: bool = False  # mixtures of experts: experts split over the data devices, tokens sent to them
    model_args: str | None = None  # model config fields, "key=value key=a,b" (e.g. "layer_types=power,full window=1024")
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    clip: float = 1.0
    dtype: str = "float32"  # compute dtype; parameters stay fp32
    attn_impl: str = "auto"
    dropout: float | None = None  # GPT models: nanoGPT-style dropout (attention weights in-kernel, residuals, embeddings)
    remat: bool = False  # activation checkpointing: each block recomputed in the backward (less memory)
    ema_decay: float = 0.0  # > 0: also keep (and evaluate: val_loss_ema) a moving average of the weights
    # LoRA: > 0 trains rank-r adapters on the linear layers (jaxattn.models.lora) and nothing else
    lora_rank: int = 0
    lora_alpha: float | None = None  # the adapters' scale is alpha / rank (default alpha: 2 * rank)
    lora_targets: str | None = None  # comma-separated layer names (GPT: q,kv,o,gate_up|up,down); None: every linear
    # LoRA on a Hugging Face folder: its frozen weights stored in this dtype ("bfloat16": half their memory);
    # the adapters stay fp32, the compute dtype is --dtype
    base_dtype: str | None = None
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    log_every: int = 10
    out: str | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 200

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/lm-{Path(self.model).name}")

    @property
    def with_docs(self) -> bool:
        """Batches carry each token's document (``doc_mask`` or ``doc_loss_mask``)."""
        return self.doc_mask or self.doc_loss_mask


def lr_schedule(cfg: LMConfig) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def make_optimizer(cfg: LMConfig) -> optax.GradientTransformation:
    tx = adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, clip=cfg.clip)
    return loop.with_ema(tx, cfg.ema_decay) if cfg.ema_decay else tx


def lm_loss(model: nnx.Module, batch: jax.Array, *, doc_mask: bool = True, doc_loss_mask: bool = False,
            aux_loss: bool = True) -> jax.Array | tuple[jax.Array, dict]:
    """Mean next-token cross-entropy (nats) over ``tokens [batch, seq + 1]``, or over a batch with
    documents ``[batch, 2, seq + 1]`` (tokens, document ids): ``doc_mask`` keeps the documents apart in
    the model, ``doc_loss_mask`` averages over the targets of the input's own document only (the first
    token of each next document is not predicted from the one before). A model with an auxiliary loss (a
    mixture of experts' load balance: :func:`jaxattn.train.loop.forward_with_aux_loss`) adds it when
    ``aux_loss``: returns ``(loss, {"aux_loss": aux})``."""
    tokens, docs = split_documents(batch)
    if docs is None and doc_loss_mask:
        raise ValueError("doc_loss_mask needs a batch with document ids [batch, 2, seq + 1]")
    kw = {} if docs is None or not doc_mask else {"segment_ids": docs[:, :-1]}
    logits, aux = loop.forward_with_aux_loss(model, tokens[:, :-1], **kw) if aux_loss else (model(tokens[:, :-1], **kw), None)
    losses = cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    if not doc_loss_mask:
        loss = losses.mean()
    else:
        keep = (docs[:, 1:] == docs[:, :-1]).astype(losses.dtype)
        loss = (losses * keep).sum() / jnp.maximum(keep.sum(), 1.0)
    return loss if aux is None else (loss + aux, {"aux_loss": aux})


class Trainer(loop.Trainer):
    """The shared :class:`jaxattn.train.loop.Trainer` with the LM loss and optimizer of ``cfg``."""

    def __init__(self, cfg: LMConfig, model_factory: Callable[[nnx.Rngs], nnx.Module],
                 devices: list[Any] | None = None):
        self.cfg = cfg
        loss = functools.partial(lm_loss, doc_mask=cfg.doc_mask, doc_loss_mask=cfg.doc_loss_mask)
        super().__init__(model_factory, make_optimizer(cfg), lambda model, tokens, rng: loss(model, tokens),
                         eval_fn=functools.partial(loss, aux_loss=False), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         seed=cfg.seed, devices=devices, seq_parallel=cfg.seq_parallel, shard_state=cfg.fsdp,
                         expert_parallel=cfg.expert_parallel,
                         seq_parallel_args={"layout": cfg.ring_layout} if cfg.ring_layout != "contiguous" else None,
                         wrt=nnx.LoRAParam if cfg.lora_rank else nnx.Param,  # (LoRA: only the adapters train,
                         save_frozen=not cfg.lora_rank)  # and only they and their AdamW state are checkpointed)

    def evaluate(self, corpus: Corpus, *, ema: bool = False) -> float:
        """Mean validation loss over ``eval_batches`` fixed batches of the validation split (``ema``: of
        the weights' moving average)."""
        c = self.cfg
        losses = [self.eval_step(get_batch(corpus.val, seed=10_000 + c.seed, step=i, batch=c.batch_size,
                                           seq_len=c.seq_len, docs=corpus.val_docs if c.with_docs else None), ema=ema)
                  for i in range(c.eval_batches)]
        return float(np.mean(jax.device_get(losses)))


def _manager(out_dir: Path):
    return loop.checkpoint_manager(out_dir)


_RESERVED = {"vocab_size": "the data (--vocab-size)", "dtype": "--dtype", "attn_impl": "--attn-impl",
             "dropout": "--dropout", "remat": "--remat"}


def model_overrides(cfg: LMConfig) -> dict[str, Any]:
    """``--model-args`` parsed against the model's config (a clear error for unknown fields or values)."""
    from jaxattn.models.registry import model_config

    if not cfg.model_args:
        return {}
    base = model_config(cfg.model)
    if base is None:
        raise ValueError(f"--model {cfg.model!r} is not a registered model or a Hugging Face folder")
    return loop.parse_model_args(cfg.model_args, base, reserved=_RESERVED)


def default_model_factory(cfg: LMConfig, vocab_size: int) -> Callable[[nnx.Rngs], nnx.Module]:
    """The registered model ``cfg.model``, or the pretrained model in the Hugging Face folder ``cfg.model``,
    with ``--model-args``."""
    from jaxattn.models import create_model, hf

    extra = model_overrides(cfg)
    if hf.hf_model_type(cfg.model) is not None:  # a pretrained model keeps its tokenizer's vocabulary
        vocab_size = None

    def build(rngs: nnx.Rngs) -> nnx.Module:
        model = create_model(cfg.model, rngs=rngs, vocab_size=vocab_size, dtype=cfg.dtype, attn_impl=cfg.attn_impl,
                             dropout=cfg.dropout, remat=cfg.remat or None,
                             **({"param_dtype": cfg.base_dtype} if cfg.base_dtype else {}), **extra)
        if cfg.lora_rank:
            from jaxattn.models.lora import add_lora

            add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets=loop.lora_target_names(cfg.lora_targets),
                     rngs=rngs)
        return model

    return build


def check_doc_mask(model: nnx.Module, cfg: LMConfig) -> None:
    """A clear error before training when ``--doc-mask`` meets a model that cannot keep documents apart."""
    import inspect

    if "segment_ids" not in inspect.signature(type(model).__call__).parameters:
        raise ValueError(f"--doc-mask: {type(model).__name__} ({cfg.model}) takes no segment_ids; TNL and GPT "
                         "models keep packed documents apart")
    if kinds := getattr(model, "block_sparse_kinds", None):  # (GPT's power / sink layers)
        raise ValueError(f"--doc-mask: {cfg.model} has {kinds} attention layers, whose "
                         "block patterns lie on the packed row's positions (full and sliding-window layers keep each "
                         "document as it is alone)")


def train(cfg: LMConfig, *, resume: bool = False,
          model_factory: Callable[[nnx.Rngs], nnx.Module] | None = None,
          stop_after: int | None = None, progress: bool = True, sample: bool = True) -> dict:
    """Runs (or resumes) training; returns a summary. ``stop_after`` ends the process-side
    loop after that step without a final checkpoint, as a kill would (for tests)."""
    from jaxattn.models import hf

    pretrained = None
    if model_factory is None:  # a clear error before any data is read
        from jaxattn.models.registry import check_model_kind

        check_model_kind(cfg.model, "lm")
        if hf.hf_model_type(cfg.model) is not None:  # fine-tuning a released model (TNL, LLaMA, Qwen2)
            pretrained = hf.read_config(cfg.model)
            cfg = dataclasses.replace(cfg, model=str(Path(cfg.model).resolve()))  # generate finds it from anywhere
            if cfg.data is None:
                raise ValueError(f"--model {cfg.model} is a pretrained model: give --data token files (.npy, "
                                 "nanoGPT .bin) made with its tokenizer, not the default byte corpus")
        model_overrides(cfg)  # (its errors before any data is read)
        loop.check_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.base_dtype is not None and not (cfg.lora_rank and pretrained is not None):
            raise ValueError("--base-dtype stores a Hugging Face folder's frozen weights for LoRA: it needs "
                             "--model FOLDER and --lora-rank (full fine-tuning keeps fp32 master weights)")
        if cfg.base_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"--base-dtype must be bfloat16, float16 or float32, got {cfg.base_dtype!r}")
    flag = "--doc-mask" if cfg.doc_mask else "--doc-loss-mask"
    if cfg.doc_sep is not None and not cfg.with_docs:
        raise ValueError("--doc-sep marks documents for --doc-mask or --doc-loss-mask; give one of them")
    corpus = load_corpus(cfg.data, max_bytes=cfg.max_bytes, vocab_size=cfg.vocab_size, doc_sep=cfg.doc_sep)
    if cfg.with_docs and corpus.train_docs is None:
        raise ValueError(f"{flag}: {corpus.source} has no document boundaries (token files: give --doc-sep, the "
                         "id that ends each document)")
    if pretrained is not None and (corpus.byte_level or corpus.vocab_size > pretrained.vocab_size):
        raise ValueError(f"--model {cfg.model} reads its tokenizer's {pretrained.vocab_size} ids; --data "
                         f"{cfg.data} holds " + ("bytes" if corpus.byte_level else f"ids up to {corpus.vocab_size - 1}"))
    if len(corpus.val) < cfg.seq_len + 1:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the validation split "
                         f"({len(corpus.val)} tokens); use more data or a shorter --seq-len")
    if cfg.seq_len % cfg.seq_parallel:
        raise ValueError(f"--seq-len {cfg.seq_len} must be divisible by --seq-parallel {cfg.seq_parallel}")
    if cfg.ring_layout == "zigzag" and cfg.seq_parallel > 1 and cfg.seq_len % (2 * cfg.seq_parallel):
        raise ValueError(f"--ring-layout zigzag: --seq-len {cfg.seq_len} must be divisible by 2 x --seq-parallel "
                         f"{cfg.seq_parallel} (two chunks per device)")
    out = cfg.out_dir()
    trainer = Trainer(cfg, model_factory or default_model_factory(cfg, corpus.vocab_size))
    if cfg.doc_mask:
        check_doc_mask(trainer.model, cfg)

    def evaluate(step: int) -> dict[str, float]:
        val = trainer.evaluate(corpus)
        out = {"val_loss": val, "val_ppl": math.exp(val)}
        if trainer.has_ema:
            out["val_loss_ema"] = trainer.evaluate(corpus, ema=True)
        return out

    result = loop.fit(
        trainer, lambda step: get_batch(corpus.train, seed=cfg.seed, step=step, batch=cfg.batch_size,
                                        seq_len=cfg.seq_len, docs=corpus.train_docs if cfg.with_docs else None),
        steps=cfg.steps, out_dir=out, resume=resume, evaluate=evaluate, eval_every=cfg.eval_every,
        ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, lr_schedule=lr_schedule(cfg),
        throughput=("tokens_per_s", lambda b: b.shape[0] * cfg.seq_len),
        config={**dataclasses.asdict(cfg), "vocab_size": corpus.vocab_size, "source": corpus.source,
                "byte_level": corpus.byte_level},
        plot="loss.png", plot_title=f"{cfg.model} on {corpus.source}",
        fields=FIELDS + (["val_loss_ema"] if trainer.has_ema else []),
        desc=f"train {cfg.model}", stop_after=stop_after, progress=progress)
    if "stopped_at" in result:
        return result
    summary = {"out": str(out), "final_loss": result["final_loss"],
               "val_losses": [ev["val_loss"] for _, ev in result["history"]], "trainer": trainer}
    from jaxattn.models import generate, supports_generation

    if sample and corpus.byte_level and supports_generation(trainer.model):

        prompt = np.frombuffer(cfg.sample_prompt.encode(), np.uint8).astype(np.int32)[None]
        toks = generate(trainer.eval_model, jnp.asarray(prompt), cfg.sample_tokens, temperature=0.8, top_k=40,
                        key=jax.random.PRNGKey(cfg.seed))
        text = bytes(np.asarray(toks[0]).clip(0, 255).astype(np.uint8)).decode("utf-8", errors="replace")
        summary["sample"] = text
        print("sample:\n" + text)
    print(f"metrics: {result['metrics_csv']}  plot: {out / 'loss.png'}  checkpoints: {out / 'checkpoints'}")
    return summary
