"""Landmark attention benchmark (training path): the Triton-backend kernels
(``jaxattn.landmark_attention(impl="pallas")``, the "jaxattn" row) against the dense blocked XLA
formulation of the same grouped softmax (``impl="xla"``) and, as the cost reference at the same
shapes, causal softmax attention (our flash kernel, and cuDNN on a GPU).

FLOPs: the causal count for every peer, ``2 * B * H * S * S * (d + e) / 2`` forward (QK^T and PV
over the lower triangle) and 3.5x that forward+backward, as ``jaxattn.bench.attention``; the
kernel also scores each key tile's landmark, which is inside that count.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jaxattn
from jaxattn.bench import runner


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    block_len: int
    dtype: str
    mode: str

    @property
    def flops(self) -> float:
        f = 2.0 * self.batch * self.heads * self.seq * self.seq * 2 * self.head_dim / 2
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)


def gpu_cases(seqs, head_dims, dtypes, modes, tokens: int, model_dim: int, block_lens=(64,)):
    for n, d, bl, dt, m in itertools.product(seqs, head_dims, block_lens, dtypes, modes):
        yield Case(max(1, tokens // n), n, max(1, model_dim // d), d, bl, dt, m)


def smoke_cases():
    for m in ("fwd", "fwd+bwd"):
        yield Case(1, 64, 2, 32, 16, "float32", m)


def inputs(case: Case) -> tuple:
    return runner.normal_inputs(case)  # q, k, v, dO


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    bl = case.block_len
    ops = {
        "jaxattn": lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_len=bl, impl="pallas"),
        "xla": lambda q, k, v: jaxattn.landmark_attention(q, k, v, block_len=bl, impl="xla"),
        "flash-causal": lambda q, k, v: jaxattn.attention(q, k, v, causal=True,
                                                          impl="xla" if interpret else "pallas"),
    }
    if not interpret:
        ops["cudnn-causal"] = runner.cudnn_attention(True, case.head_dim)
    return {name: runner.jax_mode_fn(op, case.mode) for name, op in ops.items()}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), warmup=warmup, runs=runs,
                      progress=progress, desc="landmark", **kw)
