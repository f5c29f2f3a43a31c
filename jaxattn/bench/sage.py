"""SageAttention2 benchmark: the INT8-QK / FP8-PV kernel (forward, inference) against
jaxattn's bf16 flash kernel, cuDNN (``jax.nn.dot_product_attention``), the dense XLA
reference, and, when importable with CUDA, the ``sageattention`` PyPI package run in
PyTorch on the same GPU. On a GPU also both on the Mosaic GPU (Hopper) kernels:
``jaxattn-mosaic`` (``impl="mosaic"``) and ``flash-mosaic`` (the bf16 one). A second table reports accuracy against fp32 attention
(cosine similarity, relative L1, RMSE) on random and outlier-heavy inputs, with and
without K smoothing.

FLOPs: ``4*B*H*S^2*D`` forward, halved when causal (the same count as the bf16 kernel,
so TFLOP/s compare directly).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import mosaic_check, runner
from jaxattn.pallas import sage as sage_kernels
from jaxattn.reference.sage import accuracy_metrics

# The d=128 table entry the first H200 run timed (64-key blocks): timed beside the current one.
PREV_D128_CONFIG = sage_kernels.SageConfig(128, 64, 16, 8, 3)

OUTLIER_CHANNELS = (3, 17, 40, 51)  # channels given a large token-shared offset in K
OUTLIER_OFFSETS = (30.0, -25.0, 20.0, 35.0)


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    causal: bool
    dtype: str
    mode: str = "fwd"  # inference only

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        return f / 2 if self.causal else f


def gpu_cases(seqs, head_dims, causals, dtypes, tokens: int = 16384, model_dim: int = 2048):
    """B*S = ``tokens`` and H*D = ``model_dim``, as the softmax attention sweep."""
    for s, d, c, dt in itertools.product(seqs, head_dims, causals, dtypes):
        yield Case(max(1, tokens // s), s, model_dim // d, d, c, dt)


def smoke_cases():
    yield Case(1, 128, 2, 64, False, "bfloat16")


def make_inputs(batch, seq, heads, head_dim, dtype, kind: str = "random", seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (batch, seq, heads, head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in ks)
    if kind == "outlier":
        idx = [c % head_dim for c in OUTLIER_CHANNELS]
        k = k + jnp.zeros(head_dim).at[jnp.array(idx)].set(jnp.array(OUTLIER_OFFSETS))
        q = q * 1.5
    dt = jnp.dtype(dtype)
    return q.astype(dt), k.astype(dt), v.astype(dt)


def inputs(case: Case) -> tuple:
    q, k, v = make_inputs(case.batch, case.seq, case.heads, case.head_dim, case.dtype)
    return q, k, v, None  # the runner's "fwd" mode drops the last argument


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    c = case.causal
    ops: dict[str, Callable[..., jax.Array]] = {
        "jaxattn": lambda q, k, v: jaxattn.sage_attention(q, k, v, causal=c, impl="pallas"),
        "flash-bf16": lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="pallas"),
    }
    if interpret:
        ops["sage-xla"] = lambda q, k, v: jaxattn.sage_attention(q, k, v, causal=c, impl="xla")
        ops["xla"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="xla")
    else:
        ops["jaxattn-warp"] = lambda q, k, v: jaxattn.sage_attention(
            q, k, v, causal=c, qk_granularity="warp", impl="pallas")
        ops["cudnn"] = runner.cudnn_attention(c, case.head_dim)
        if mosaic_check.peers_apply(case.head_dim, case.dtype, interpret, causal=c):
            # the same quantisation on the warp-specialized Mosaic GPU kernel, and the bf16 one
            ops["jaxattn-mosaic"] = lambda q, k, v: jaxattn.sage_attention(q, k, v, causal=c, impl="mosaic")
            ops["flash-mosaic"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="mosaic")
    if case.head_dim > 64:  # the 64-key table entry the first H200 run timed (2026-12-04)
        ops["jaxattn-prev-config"] = lambda q, k, v: sage_kernels.sage_attention_kernel(
            q, k, v, causal=c, config=PREV_D128_CONFIG, interpret=interpret)
    return {name: runner.jax_mode_fn(op, "fwd") for name, op in ops.items()}


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """``sageattention.sageattn`` (dispatches by GPU arch; the PyPI 1.x wheels are its Triton
    kernels) and its Triton INT8-QK kernel by name, when importable with CUDA."""
    if (found := runner.cuda_torch(case.dtype)) is None:
        return {}
    torch, dt = found
    try:
        import sageattention
    except Exception:  # noqa: BLE001
        return {}
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dt) for _ in range(3))
    out: dict[str, Callable[[], Any]] = {}
    if hasattr(sageattention, "sageattn"):
        out["sageattention"] = lambda: sageattention.sageattn(
            q, k, v, tensor_layout="NHD", is_causal=case.causal)
    triton_fn = getattr(sageattention, "sageattn_qk_int8_pv_fp16_triton", None)
    if triton_fn is not None:
        out["sageattention-triton"] = lambda: triton_fn(q, k, v, tensor_layout="NHD", is_causal=case.causal)
    return out


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), torch_peers=torch_peers,
                      warmup=warmup, runs=runs, progress=progress, desc="sage", **kw)


def accuracy(cases, *, max_heads: int = 4) -> list[dict]:
    """Accuracy of the kernel against fp32 attention, one batch element and at most
    ``max_heads`` heads per distinct (seq, head_dim, causal, dtype), on random and on
    outlier inputs, with and without K smoothing."""
    seen, records = set(), []
    for case in cases:
        key = (case.seq, case.head_dim, case.causal, case.dtype)
        if key in seen:
            continue
        seen.add(key)
        heads = min(case.heads, max_heads)
        for kind in ("random", "outlier"):
            q, k, v = make_inputs(1, case.seq, heads, case.head_dim, case.dtype, kind=kind, seed=1)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            exact = jaxattn.attention(*f32, causal=case.causal)  # flash fp32 on GPU, dense on CPU
            for smooth_k in (True, False):
                out = jaxattn.sage_attention(q, k, v, causal=case.causal, smooth_k=smooth_k, impl="pallas")
                m = accuracy_metrics(out, exact)
                records.append(dict(seq=case.seq, head_dim=case.head_dim, causal=case.causal,
                                    dtype=case.dtype, inputs=kind, smooth_k=smooth_k, **m))
    return records


def format_accuracy(records: list[dict]) -> str:
    """Markdown table of :func:`accuracy` records."""
    if not records:
        return "(no accuracy records)"
    cols = list(records[0])
    rows = [[f"{r[c]:.6f}" if c in ("cos_sim", "rel_l1") else f"{r[c]:.3g}" if c == "rmse" else str(r[c])
             for c in cols] for r in records]
    return runner.markdown_table(cols, rows)
