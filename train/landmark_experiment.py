"""Landmark attention vs plain full attention on synthetic passkey retrieval:
``python -m jaxattn.train.landmark_experiment [--pretrain-steps 2500] [--steps 600] [--eval-samples 32]``.

Byte-level decoders (``jaxattn.models.landmark.LandmarkGPT`` and ``jaxattn.models.GPT``, same
width/depth, same parameter tree) on a passkey mixture: a repeated filler text with a planted
"The pass key is NNNNN. Remember it." at a random place and the question "What is the pass key?
The pass key is NNNNN" at the end. Stage 1 trains one plain GPT at 128 bytes (the copy emerges
within minutes on a CPU); stage 2 continues it twice (a short phase at 128, then the training length 512): once as
the plain GPT, once as a LandmarkGPT (landmark tokens, grouped softmax) — the paper's recipe of
fine-tuning a full-attention model with landmarks. Loss: next-byte cross-entropy on every
regular byte plus ``--digit-weight`` times the mean over the five answer digits. Evaluation:
exact-match accuracy of the five answer digits (teacher-forced argmax, equal to greedy
decoding's exact match) at 512 and at 4x the training length (2048): the landmark model with
full landmark attention and with top-k block retrieval, the plain model with full attention
(RoPE extrapolation). The table goes to ``RESULTS.md`` (section ``landmark-experiment``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.landmark import LandmarkGPT, LandmarkGPTConfig, insert_landmarks, regular_index
from jaxattn.train.loop import adamw, warmup_cosine
from jaxattn.train.results import write_section

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DIGITS = 5


def _plant(key: str) -> bytes:
    return f"The pass key is {key}. Remember it. ".encode()


def _question(key: str) -> bytes:
    return f"What is the pass key? The pass key is {key}".encode()


def passkey_batch(rng: np.random.Generator, batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``tokens [batch, n]`` (bytes) and the positions ``[DIGITS]`` of the answer digits (the last
    ``DIGITS`` bytes). The planted passkey sits at a uniformly random place before the question."""
    need = len(_plant("0" * DIGITS)) + len(_question("0" * DIGITS))
    if n < need:
        raise ValueError(f"sequence length n must be >= {need} (plant + question), got {n}")
    out = np.empty((batch, n), np.int32)
    filler = np.frombuffer(FILLER * (n // len(FILLER) + 2), np.uint8)
    for b in range(batch):
        key = "".join(str(d) for d in rng.integers(0, 10, DIGITS))
        plant, tail = np.frombuffer(_plant(key), np.uint8), np.frombuffer(_question(key), np.uint8)
        off = rng.integers(0, len(FILLER))
        seq = filler[off: off + n].astype(np.int32).copy()
        seq[n - len(tail):] = tail
        p = rng.integers(0, n - len(tail) - len(plant) + 1)
        seq[p: p + len(plant)] = plant
        out[b] = seq
    return out, np.arange(n - DIGITS, n)


@dataclasses.dataclass
class Run:
    name: str
    model: nnx.Module
    landmark: bool


def _model_inputs(run: Run, tokens: jax.Array, mem_freq: int, landmark_id: int):
    """Model input stream and, per regular byte, its index in that stream."""
    n = tokens.shape[1]
    if run.landmark:
        return insert_landmarks(tokens, mem_freq, landmark_id), regular_index(n, mem_freq)
    return tokens, np.arange(n)


def _losses(run: Run, model, tokens, mem_freq: int, landmark_id: int, top_k=None):
    stream, idx = _model_inputs(run, tokens, mem_freq, landmark_id)
    logits = model(stream, top_k=top_k) if run.landmark else model(stream)
    logits = logits[:, idx[:-1]]  # the prediction of regular byte r + 1 sits at byte r
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce, logits


def train(run: Run, *, phases: Sequence[tuple[int, int, int]], lr: float, seed: int, mem_freq: int,
          landmark_id: int, digit_weight: float, log_every: int = 100) -> tuple[float, float]:
    """Trains through ``phases`` of ``(seq, batch, steps)`` under one warmup-cosine schedule;
    returns (seconds, mean answer-digit cross-entropy over the last ``log_every`` steps)."""
    steps = sum(p[2] for p in phases)
    rng = np.random.default_rng(seed)
    tx = adamw(warmup_cosine(lr, max(1, steps // 20), steps), weight_decay=0.01)
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            ce, _ = _losses(run, model, tokens, mem_freq, landmark_id)
            digit_ce = ce[:, -DIGITS:].mean()
            return ce.mean() + digit_weight * digit_ce, digit_ce

        (loss, digit_ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, digit_ce

    t0, i, recent = time.time(), 0, []
    for seq, batch, n in phases:
        for _ in range(n):
            tokens, _ = passkey_batch(rng, batch, seq)
            params, opt_state, loss, digit_ce = step(params, opt_state, jnp.asarray(tokens))
            recent = [*recent[-(log_every - 1):], float(digit_ce)]
            i += 1
            if i % log_every == 0 or i == 1:
                print(f"[{run.name}] step {i}/{steps} seq {seq} loss {float(loss):.3f} "
                      f"digit CE {np.mean(recent):.3f} ({time.time() - t0:.0f}s)", flush=True)
    nnx.update(run.model, params)
    return time.time() - t0, float(np.mean(recent))


def evaluate(run: Run, *, n: int, samples: int, batch: int, seed: int, mem_freq: int, landmark_id: int,
             top_k: int | None) -> tuple[float, float]:
    """(exact-match accuracy of the 5 answer digits, per-digit accuracy) over ``samples``."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(run.model)

    @jax.jit
    def fn(state, tokens):
        logits = _losses(run, nnx.merge(graphdef, state), tokens, mem_freq, landmark_id, top_k)[1]
        return logits[:, -DIGITS:].argmax(-1)

    exact, digit, seen = 0, 0, 0
    while seen < samples:
        tokens, _ = passkey_batch(rng, min(batch, samples - seen), n)
        pred = np.asarray(fn(state, jnp.asarray(tokens)))
        ok = pred == tokens[:, -DIGITS:]
        exact += int(ok.all(-1).sum())
        digit += int(ok.sum())
        seen += tokens.shape[0]
    return exact / samples, digit / (samples * DIGITS)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-seq", type=int, default=128, help="stage 1 length (regular bytes)")
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--pretrain-steps", type=int, default=2500, help="stage 1 (plain attention); 0 skips it")
    ap.add_argument("--adapt-steps", type=int, default=400,
                    help="stage 2 starts with this many steps at --pretrain-seq (landmark gates learn there first)")
    ap.add_argument("--steps", type=int, default=600, help="stage 2 steps at --seq (the training length)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--digit-weight", type=float, default=4.0, help="weight of the answer-digit CE term")
    ap.add_argument("--eval-len", type=int, default=2048)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mem-freq", type=int, default=31)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    base = dict(dim=args.dim, layers=args.layers, heads=args.heads, attn_impl="auto")
    lcfg = LandmarkGPTConfig(vocab_size=257, landmark_id=256, mem_freq=args.mem_freq, top_k=args.top_k, **base)
    common = dict(mem_freq=args.mem_freq, landmark_id=256, lr=args.lr, digit_weight=args.digit_weight)
    # Stage 1: one plain GPT at a short length, where the copy emerges quickly (landmark attention
    # trained from scratch stays at chance on this budget); both stage-2 models start from it, as
    # the paper fine-tunes a pretrained full-attention LLaMA with landmarks.
    plain = GPT(GPTConfig(vocab_size=257, **base), rngs=nnx.Rngs(args.seed))
    secs, final_ce = {}, {}
    if args.pretrain_steps:
        secs["pretrain"], final_ce["pretrain"] = train(
            Run("pretrain", plain, False), phases=[(args.pretrain_seq, args.pretrain_batch, args.pretrain_steps)],
            seed=args.seed + 1, **common)
    landmark = LandmarkGPT(lcfg, rngs=nnx.Rngs(args.seed))
    nnx.update(landmark, nnx.state(plain, nnx.Param))  # same parameter tree; the landmark embedding row is untrained
    runs = [Run("landmark", landmark, True), Run("plain", plain, False)]
    rows = []
    for run in runs:  # stage 2: the same data stream for both
        phases = [(args.pretrain_seq, args.pretrain_batch, args.adapt_steps)] if args.adapt_steps else []
        secs[run.name], final_ce[run.name] = train(run, phases=[*phases, (args.seq, args.batch, args.steps)],
                                                   seed=args.seed + 2, **common)
        n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(run.model, nnx.Param)))
        for n in (args.seq, args.eval_len):
            for k in ([None, args.top_k] if run.landmark else [None]):
                t0 = time.time()
                ex, dg = evaluate(run, n=n, samples=args.eval_samples, batch=4, seed=1000 + n, top_k=k,
                                  mem_freq=args.mem_freq, landmark_id=256)
                how = f"top-{k} retrieval" if k else (
                    "full landmark attention" if run.landmark else "full attention")
                rows.append((run.name, n_params, n, how, ex, dg, time.time() - t0))
                print(f"[{run.name}] len {n} {how}: exact {ex:.3f} digit {dg:.3f}", flush=True)

    cmd = " ".join(["python -m jaxattn.train.landmark_experiment", *(sys.argv[1:] if argv is None else argv)])
    stage1 = (f"Stage 1: one plain GPT trained {args.pretrain_steps} steps x batch {args.pretrain_batch} at "
              f"{args.pretrain_seq} bytes (full causal attention). Stage 2, from those weights: " if args.pretrain_steps
              else "From scratch: ")
    body = [
        "## Landmark attention: passkey retrieval beyond the training length",
        "",
        f"`{cmd}` (CPU, seed {args.seed}). Byte-level decoders, dim {args.dim}, {args.layers} layers, "
        f"{args.heads} heads, RoPE. Data: a synthetic passkey mixture (repeated filler sentence, 5-digit key "
        f"planted at a random place, question at the end); loss = mean byte CE + {args.digit_weight:g} x mean "
        f"answer-digit CE; AdamW, lr {args.lr}, warmup-cosine per stage. {stage1}"
        f"the landmark model (a landmark token after every {args.mem_freq} bytes, block {args.mem_freq + 1}, "
        f"grouped softmax) and the plain model are each trained "
        + (f"{args.adapt_steps} steps x batch {args.pretrain_batch} at {args.pretrain_seq} bytes, then "
           if args.adapt_steps else "")
        + f"{args.steps} steps x batch {args.batch} at {args.seq} bytes (the training length), on the same "
        f"data (one warmup-cosine schedule for stage 2). This mirrors the paper's LLaMA "
        f"experiment (a full-attention model fine-tuned with landmarks at 512); a tiny landmark model trained "
        f"from scratch did not learn the copy within a CPU budget (answer-digit CE stuck at ln 10 for 3,500 "
        f"steps at several widths, depths and block sizes, while the plain model learned it in ~1,000). "
        f"At evaluation, retrieval picks the top-{args.top_k} blocks per query and head, re-placed before the "
        f"current block for RoPE; the plain model uses full causal attention (RoPE extrapolates past "
        f"{args.seq}). Accuracy = all 5 answer digits right (teacher-forced argmax = greedy exact match); "
        f"{args.eval_samples} samples per row; chance is 1e-5 exact / 0.1 per digit.",
        "",
        "| model | params | eval length | attention at eval | exact-match acc | per-digit acc | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, n_params, n, how, ex, dg, s_ in rows:
        body.append(f"| {name} | {n_params:,} | {n} | {how} | {ex:.3f} | {dg:.3f} | {s_:.0f} |")
    body += ["", "Training (CPU, shared machine): " + ", ".join(
        f"{k} {v:.0f} s (final answer-digit CE {final_ce[k]:.3f})" for k, v in secs.items()) + "."]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section(args.results, "landmark-experiment", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
