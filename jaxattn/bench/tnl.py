"""TNL training throughput: tokens/s of one jitted AdamW step (forward, backward, update)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.bench.runner import adamw_train_step
from jaxattn.train.lm import lm_loss


def lm_train_step(model_name: str, *, dtype: str, attn_impl: str = "auto", abstract: bool = False,
                  remat: bool = False):
    """``(model, step, state)``: one jitted AdamW step of the LM trainer's loss
    (:func:`jaxattn.train.lm.lm_loss`), ``step(state, tokens [B, seq + 1]) -> (state, loss)``;
    ``abstract``: weights as shapes only (nothing allocated, for a compile-only device); ``remat``:
    activation checkpointing per block."""
    model, step, state = adamw_train_step(model_name, lm_loss, dtype=dtype, attn_impl=attn_impl, abstract=abstract,
                                          remat=remat)
    return model, jax.jit(step), state


def _temp_gib(compiled) -> float | None:
    """The compiled step's scratch memory (activations kept for the backward, ...), GiB."""
    try:
        return round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)
    except Exception:  # not every backend reports it
        return None


def train_step_throughput(model_name: str, *, batch: int, seq: int, dtype: str, steps: int,
                          warmup: int = 2, attn_impl: str = "auto", compile_only: bool = False,
                          remat: bool = False) -> dict:
    """Median step time and tokens/s for ``model_name`` on random tokens, and the step's scratch
    memory (``temp_gib``). ``compile_only``: compile the step for a compile-only H100 instead
    (abstract weights, nothing allocated; ``compile_s``). ``remat``: activation checkpointing."""
    model, step, state = lm_train_step(model_name, dtype=dtype, attn_impl=attn_impl, abstract=compile_only,
                                       remat=remat)
    vocab = model.cfg.vocab_size

    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rec = dict(model=model_name, batch=batch, seq=seq, dtype=dtype, params=int(n_params), impl="jaxattn",
               remat=remat)
    if compile_only:
        from jaxattn.bench import aot

        t0 = time.perf_counter()
        _, compiled = aot.lower_and_compile(step, aot.on_compile_only_gpu(
            (state, jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32))))
        return {**rec, "compile_s": round(time.perf_counter() - t0, 2), "temp_gib": _temp_gib(compiled)}
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq + 1), 0, vocab)
    step = step.lower(state, tokens).compile()  # (compiled once; its memory analysis below)
    rec["temp_gib"] = _temp_gib(step)
    for _ in range(max(1, warmup)):
        state, loss = step(state, tokens)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = step(state, tokens)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    times.sort()
    ms = times[len(times) // 2] * 1e3
    return {**rec, "ms": ms, "tokens_per_s": batch * seq / (ms * 1e-3), "loss": float(loss)}
