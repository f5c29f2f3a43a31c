"""L²ViT linear global attention benchmark: the Pallas kernels
(``jaxattn.linear_global_attention(impl="pallas")``, the "jaxattn" row) against the same op's
fused KV-first XLA graph (``impl="xla"``, the "xla" row), the quadratic form of the same
attention (``jaxattn.reference.linear_global``, materialises ``N x N``) and softmax attention
(``jaxattn.attention``, flash kernel on GPU) at the same shapes, across sequence lengths.

FLOPs are the KV-first count for every peer (so TFLOP/s compares like with like as time):
forward ``B * H * N * (4 d e + 2 d)`` (state ``Σ φ(k) vᵀ``, ``φ(q)`` times it, the normaliser);
forward+backward 3x that. L²ViT stage shapes: 56x56 / 28x28 / 14x14 / 7x7 tokens with head_dim 32.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

import jaxattn
from jaxattn.bench import runner
from jaxattn.reference.linear_global import linear_global_reference

# Quadratic form: skip lengths whose B*H*N*N fp32 scores exceed this many bytes.
QUADRATIC_MAX_BYTES = 8 << 30


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    dtype: str
    mode: str

    @property
    def flops(self) -> float:
        d = self.head_dim
        f = self.batch * self.heads * self.seq * (4 * d * d + 2 * d)
        return f * (3.0 if self.mode == "fwd+bwd" else 1.0)


def gpu_cases(seqs, head_dims, dtypes, modes, tokens: int, model_dim: int):
    for n, d, dt, m in itertools.product(seqs, head_dims, dtypes, modes):
        yield Case(max(1, tokens // n), n, max(1, model_dim // d), d, dt, m)


def cpu_cases(seqs=(196, 784, 3136), heads: int = 4, head_dim: int = 32, batch: int = 1, modes=("fwd",)):
    """A small CPU sweep (the L²ViT stage lengths 14², 28², 56²)."""
    for n, m in itertools.product(seqs, modes):
        yield Case(batch, n, heads, head_dim, "float32", m)


def smoke_cases():
    for m in ("fwd", "fwd+bwd"):
        yield Case(1, 64, 2, 16, "float32", m)


def inputs(case: Case) -> tuple:
    return runner.normal_inputs(case)  # q, k, v, dO


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    tau = case.head_dim ** -0.5
    softmax_impl = "xla" if interpret else "auto"
    ops = {
        "jaxattn": lambda q, k, v: jaxattn.linear_global_attention(q, k, v, temperature=tau, impl="pallas"),
        "xla": lambda q, k, v: jaxattn.linear_global_attention(q, k, v, temperature=tau, impl="xla"),
        "softmax": lambda q, k, v: jaxattn.attention(q, k, v, impl=softmax_impl),
    }
    if case.batch * case.heads * case.seq ** 2 * 4 <= QUADRATIC_MAX_BYTES:
        ops["quadratic"] = lambda q, k, v: linear_global_reference(q, k, v, jnp.float32(tau))
    return {name: runner.jax_mode_fn(op, case.mode) for name, op in ops.items()}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), warmup=warmup, runs=runs,
                      progress=progress, desc="l2vit", **kw)
