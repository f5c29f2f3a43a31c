"""Runs a sweep: every case with every peer, one record per (case, peer)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn.bench.timing import time_jax, time_torch


@dataclasses.dataclass(frozen=True)
class Shape:
    """The ``[batch, seq, heads, head_dim]`` fields every sweep case starts with (cases subclass it)."""

    batch: int
    seq: int
    heads: int
    head_dim: int


def seq_sweep(case_cls, seqs, head_dims, dtypes, modes, tokens: int, model_dim: int):
    """``case_cls(batch, seq, heads, head_dim, dtype, mode)`` over the grid, ``batch * seq = tokens`` and
    ``heads * head_dim = model_dim`` (the linear-attention sweeps' shapes)."""
    for s, d, dt, m in itertools.product(seqs, head_dims, dtypes, modes):
        yield case_cls(max(1, tokens // s), s, model_dim // d, d, dt, m)


def jax_mode_fn(op: Callable[..., Any], mode: str, n_diff: int = 3) -> Callable[..., Any]:
    """jit of ``op(*args)`` (mode "fwd") or of forward + VJP w.r.t. the first ``n_diff``
    args with a fixed cotangent passed last (mode "fwd+bwd")."""
    if mode == "fwd":
        return jax.jit(lambda *a: op(*a[:-1]))

    def fwd_bwd(*a):
        diff, rest, ct = a[:n_diff], a[n_diff:-1], a[-1]
        out, vjp = jax.vjp(lambda *d: op(*d, *rest), *diff)
        return out, vjp(ct)

    return jax.jit(fwd_bwd)


def adamw_train_step(model_name: str, loss: Callable[..., jax.Array], *, dtype: str, attn_impl: str = "auto",
                     abstract: bool = False, train_mode: bool = False, **overrides: Any):
    """``(model, step, state)`` of one AdamW update of ``loss(model, *batch)`` on
    ``create_model(model_name, **overrides)``: ``step(state, *batch) -> (state, loss)`` (not jitted;
    ``train_mode``: the model in training mode); ``abstract``: weights as shapes only (nothing
    allocated, for a compile-only device)."""
    import optax
    from flax import nnx

    from jaxattn.models import create_model

    def build():
        model = create_model(model_name, rngs=nnx.Rngs(0), dtype=dtype, attn_impl=attn_impl, **overrides)
        return model, nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(build) if abstract else build()
    graphdef, state = nnx.split((model, optimizer))

    def step(state, *batch):
        m, opt = nnx.merge(graphdef, state)
        if train_mode:
            m.train()
        value, grads = nnx.value_and_grad(lambda m: loss(m, *batch))(m)
        opt.update(m, grads)
        return nnx.state((m, opt)), value

    return model, step, state


def normal_inputs(case: Any, n: int = 4) -> tuple[jax.Array, ...]:
    """``n`` standard-normal ``[batch, seq, heads, head_dim]`` arrays in ``case.dtype`` (q, k, v, dO)."""
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    dt = jnp.dtype(case.dtype)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dt) for k in jax.random.split(jax.random.PRNGKey(0), n))


def cudnn_attention(causal: bool, head_dim: int) -> Callable[..., jax.Array]:
    """``jax.nn.dot_product_attention`` through cuDNN (GPU only)."""
    scale = head_dim ** -0.5
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                        implementation="cudnn")


def cuda_torch(dtype: str | None = None) -> tuple[Any, Any] | None:
    """``(torch, torch dtype of dtype)`` when torch is importable with CUDA and ``dtype`` is a
    16-bit one (the PyTorch peers' kernels have no fp32 path; ``None``: any dtype, ``(torch,
    None)``); else None, and the bench runs without its PyTorch peers."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - not installed, or a broken install
        return None
    if not torch.cuda.is_available() or dtype == "float32":
        return None
    return torch, None if dtype is None else torch_dtype(torch, dtype)


def torch_dtype(torch: Any, name: str) -> Any:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def run(
    cases: Iterable[Any],
    *,
    inputs: Callable[[Any], tuple],
    peers: Callable[[Any], dict[str, Callable[..., Any]]],
    torch_peers: Callable[[Any], dict[str, Callable[[], Any]]] | None = None,
    warmup: int,
    runs: int,
    progress: bool = True,
    desc: str = "bench",
    flops: Callable[[Any, str], float] | None = None,
    on_case: Callable[[list[dict]], None] | None = None,
    compile_only: bool = False,
) -> list[dict]:
    """``peers(case)`` gives jitted JAX callables on ``inputs(case)``; ``torch_peers(case)``
    gives argument-less CUDA callables. Failures are recorded with their reason.
    ``flops(case, impl)`` overrides ``case.flops`` for TFLOP/s; ``on_case(records)`` runs after
    every case (the CLI saves partial JSON there, so a time-boxed sweep keeps what it measured).
    ``compile_only``: compile every JAX peer for a compile-only H100 instead of timing it
    (:mod:`jaxattn.bench.aot`; records get ``compile_s``, or the error; PyTorch peers are left out):
    a GPU session's sweep, checked on a CPU before it spends device time."""
    from tqdm import tqdm

    records = []
    for case in tqdm(list(cases), desc=desc, disable=not progress, unit="case"):
        if compile_only:
            args = _abstract_inputs(inputs, case)
            timers: list[tuple[str, Callable[[], Any]]] = [
                (name, lambda fn=fn, args=args: compile_for_gpu(fn, args)) for name, fn in peers(case).items()]
        else:
            args = inputs(case)
            timers = [(name, lambda fn=fn, args=args: time_jax(fn, *args, warmup=warmup, runs=runs))
                      for name, fn in peers(case).items()]
            if torch_peers is not None:
                timers += [(name, lambda fn=fn: time_torch(fn, warmup=warmup, runs=runs))
                           for name, fn in torch_peers(case).items()]
        for name, timer in timers:
            rec = {**dataclasses.asdict(case), "impl": name}
            try:
                t = timer()
                if compile_only:
                    rec.update(ms=None, tflops=None, compile_s=t)
                else:
                    f = flops(case, name) if flops is not None else case.flops
                    rec.update(ms=t.median_ms, tflops=f / (t.median_ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run this case
                rec.update(ms=None, tflops=None, error=_error(e))
            records.append(rec)
        del args
        if on_case is not None:
            on_case(records)
    return records


def _abstract_inputs(inputs: Callable[[Any], tuple], case: Any) -> tuple:
    """``inputs(case)`` as shapes on the compile-only GPU (nothing is computed or allocated)."""
    from jaxattn.bench import aot

    return aot.on_compile_only_gpu(jax.eval_shape(lambda: inputs(case)))


def compile_for_gpu(fn: Callable[..., Any], args: tuple) -> float:
    """Seconds to lower and compile ``fn(*args)`` for the compile-only H100
    (:func:`jaxattn.bench.aot.lower_and_compile`)."""
    import time

    from jaxattn.bench import aot

    t0 = time.perf_counter()
    aot.lower_and_compile(fn, args)
    return round(time.perf_counter() - t0, 2)


_FIXED = ("impl", "ms", "tflops", "error", "compile_s")


def case_key(r: dict) -> tuple:
    """A record's case fields (everything but impl and timing), hashable."""
    return tuple((k, v) for k, v in r.items() if k not in _FIXED)


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    """A padded markdown table."""
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(cols)]

    def line(vals):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"

    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_table(records: list[dict]) -> str:
    """Markdown table of sweep records; 'jaxattn speedup' = peer time / jaxattn time for the same case."""
    if not records:
        return "(no records)"
    case_cols = [k for k in records[0] if k not in _FIXED]
    cols = [*case_cols, "impl", "ms", "TFLOP/s", "ns/token", "jaxattn speedup"]
    base = {case_key(r): r["ms"] for r in records if r["impl"] == "jaxattn" and r.get("ms")}
    rows = []
    for r in records:
        ms, ref = r.get("ms"), base.get(case_key(r))
        tokens = r.get("batch", 1) * r.get("seq", 1)
        rows.append([*(str(r[c]) for c in case_cols), r["impl"],
                     f"{ms:.3f}" if ms else ("compiled" if "compile_s" in r else "n/a"),
                     f"{r['tflops']:.3g}" if ms else r.get("error", "")[:60],
                     f"{ms * 1e6 / tokens:.3g}" if ms else "",
                     f"{ms / ref:.2f}x" if ms and ref else ""])
    return markdown_table(cols, rows)
