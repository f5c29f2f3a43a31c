"""Softmax attention benchmark: jaxattn's flash kernel against its peers.

Peers, all in this process: the XLA reference (``impl="xla"``), our kernel with attention dropout
(GPU only: what the in-kernel mask costs), our kernel with the table entry the first GPU run timed
(``jaxattn-prev-config``, d = 128 bf16 forward+backward), our FlashAttention-3 forward on Mosaic GPU
(``jaxattn-mosaic``: ``impl="mosaic"``, Hopper) and JAX's bundled one (``jax-pallas-mgpu``,
``attention_mgpu``, forward only),
``jax.nn.dot_product_attention(implementation="cudnn")``, JAX's bundled Pallas
``mha`` and PyTorch ``scaled_dot_product_attention`` (flash backend) when torch
with CUDA is importable. A peer that cannot run a configuration is reported with
the reason instead of a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import mosaic_check, runner
from jaxattn.pallas import flash, flash_mgpu

# The d=128 two-byte table entry the first H200 run timed (64-key dk/dv tiles).
PREV_D128_CONFIG = flash.FlashConfig(128, 64, 8, 3, 128, 64, 32, 64, 8, 2)


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    causal: bool
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"

    @property
    def flops(self) -> float:
        """4*B*H*S^2*D forward, halved when causal; the backward is 2.5x the forward."""
        f = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        if self.causal:
            f /= 2
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)


def gpu_cases(seqs, head_dims, causals, dtypes, modes, tokens: int = 16384, model_dim: int = 2048):
    """Sweep with B*S = ``tokens`` and H*D = ``model_dim`` (fills the GPU at every S)."""
    for s, d, c, dt, m in itertools.product(seqs, head_dims, causals, dtypes, modes):
        yield Case(max(1, tokens // s), s, model_dim // d, d, c, dt, m)


def smoke_cases():
    for c, m in itertools.product([False, True], ["fwd", "fwd+bwd"]):
        yield Case(1, 128, 2, 64, c, "float32", m)


def inputs(case: Case) -> tuple:
    return runner.normal_inputs(case)  # q, k, v, dO


def distance_penalty(x, batch, head, q_idx, kv_idx):
    """The score_mod the ``jaxattn-score_mod`` and ``torch-flex-score_mod`` peers time: a per-head linear
    distance penalty (ALiBi's shape, written as a logit transform; runs on jax and torch values)."""
    return x - (head + 1) * 0.01 * abs(q_idx - kv_idx)


def relative_bias(x, batch, head, q_idx, kv_idx, table):
    """The score_mod the ``jaxattn-score_mod-table`` and ``torch-flex-score_mod-table`` peers time: a learned
    relative-position bias ``table [heads, 2 S - 1]`` (T5's / Swin's, unbucketed) read per score."""
    return x + table[head, q_idx - kv_idx + (table.shape[1] - 1) // 2]


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    scale = 1.0 / math.sqrt(case.head_dim)
    c = case.causal
    ops: dict[str, Callable[..., jax.Array]] = {
        "jaxattn": lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="pallas"),
        "xla": lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="xla"),
    }
    if not interpret:
        ops["cudnn"] = runner.cudnn_attention(c, case.head_dim)
        rng = jax.random.PRNGKey(0)  # what attention dropout costs (its mask is hashed in-kernel)
        ops["jaxattn-dropout0.1"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="pallas",
                                                                      dropout_rate=0.1, dropout_rng=rng)
        # what a score_mod costs (traced into the kernels, its derivative in the backward)
        ops["jaxattn-score_mod"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="pallas",
                                                                     score_mod=distance_penalty)
        # what attention sinks cost (each row's online softmax starts from its head's sink)
        sinks = jnp.linspace(-1.0, 1.0, case.heads, dtype=jnp.float32)
        ops["jaxattn-sinks"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="pallas", sinks=sinks)
    if (case.head_dim, case.dtype) == (128, "bfloat16") and case.mode == "fwd+bwd":
        # the entry the first H200 run timed (2026-12-04): what the 128-key dk/dv tiles buy
        ops["jaxattn-prev-config"] = lambda q, k, v: flash.flash_attention(
            q, k, v, causal=c, config=PREV_D128_CONFIG, interpret=interpret)[0]
    if mosaic_check.peers_apply(case.head_dim, case.dtype, interpret, causal=c):
        # our FlashAttention-3 forward on Mosaic GPU (the backward: the Triton kernels)
        ops["jaxattn-mosaic"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=c, impl="mosaic")
        inplace = dataclasses.replace(flash_mgpu.mosaic_config(case.head_dim), inplace_pv=True)
        ops["jaxattn-mosaic-inplace"] = lambda q, k, v: flash.flash_attention(
            q, k, v, causal=c, backend="mosaic", mosaic_config=inplace)[0]
        if case.mode == "fwd" and case.seq % 128 == 0:
            mgpu = _jax_mosaic_attention(c)
            if mgpu is not None:
                ops["jax-pallas-mgpu"] = mgpu
    try:
        from jax.experimental.pallas.ops.gpu import attention as jax_pallas

        ops["jax-pallas"] = lambda q, k, v: jax_pallas.mha(
            q, k, v, None, sm_scale=scale, causal=c, interpret=interpret)
    except Exception:  # noqa: BLE001 - the bundled kernel moved or is missing
        pass
    if not interpret:  # last: a time box that runs out costs these first, not the targets' peers
        ops.update(_tokamax_peers(c))
    fns = {name: runner.jax_mode_fn(op, case.mode) for name, op in ops.items()}
    if not interpret:
        fns["jaxattn-score_mod-table"] = _table_peer(case)
    return fns


def _table_peer(case: Case) -> Callable[..., Any]:
    """What a learned table costs: :func:`relative_bias` reading ``[heads, 2 S - 1]`` (gathers in every
    kernel), its gradient in fwd+bwd (the dq kernel's atomic adds) beside dq, dk, dv."""
    table = jnp.zeros((case.heads, 2 * case.seq - 1), jnp.float32)
    fn = runner.jax_mode_fn(lambda q, k, v, t: jaxattn.attention(
        q, k, v, causal=case.causal, impl="pallas", score_mod=relative_bias, score_mod_tables=(t,)), case.mode, n_diff=4)
    return lambda q, k, v, do: fn(q, k, v, table, do)


def _tokamax_peers(causal: bool) -> dict[str, Callable[..., jax.Array]]:
    """tokamax's FlashAttention (the kernel library that jax's deprecated bundled Pallas ops point
    to): its Mosaic GPU kernels (sm90 forward and backward) and its Pallas Triton ones, when
    tokamax is importable (``.ci/peer-wheels`` carries it to the device)."""
    try:
        import tokamax
        from absl import flags
    except Exception:  # noqa: BLE001 - not installed, or not for this jax
        return {}
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would parse our CLI's argv and fail
        flags.FLAGS.mark_as_parsed()

    def peer(impl: str) -> Callable[..., jax.Array]:
        return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    return {f"tokamax-{impl}": peer(impl) for impl in ("mosaic", "triton")}


def _jax_mosaic_attention(causal: bool) -> Callable[..., jax.Array] | None:
    """JAX's bundled FlashAttention-3 forward on Mosaic GPU (``attention_mgpu``), with the tiles
    of its own benchmark; it takes q pre-scaled, so it is timed without the logit scale."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception:  # noqa: BLE001 - not in this jax
        return None
    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
    f16 = jnp.float16  # its shared-memory tiles are fp16 whatever the inputs (jax 0.10-0.11): cast (~1% here)
    return lambda q, k, v: attention_mgpu.attention(q.astype(f16), k.astype(f16), v.astype(f16), cfg)


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """PyTorch SDPA with the flash backend, when torch with CUDA is importable."""
    if (found := runner.cuda_torch(case.dtype)) is None:
        return {}
    torch, dt = found
    try:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception:  # noqa: BLE001
        return {}
    shape = (case.batch, case.heads, case.seq, case.head_dim)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(4))

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
            if case.mode == "fwd+bwd":
                torch.autograd.grad(out, (q, k, v), do)
        return out

    return {"torch-sdpa-flash": run, **_flex_peer(case, torch, q, k, v, do)}


def _flex_peer(case: Case, torch: Any, q, k, v, do) -> dict[str, Callable[[], Any]]:
    """FlexAttention (``torch.compile``d) with :func:`distance_penalty` as its ``score_mod`` (the
    ``jaxattn-score_mod`` peer's counterpart), and with a captured learned ``[heads, 2 S - 1]`` table
    (``jaxattn-score_mod-table``'s, its gradient in fwd+bwd)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def causal(b, h, qi, kj):
            return qi >= kj

        mask = create_block_mask(causal, None, None, case.seq, case.seq, device="cuda") if case.causal else None
        flex = torch.compile(flex_attention)
    except Exception:  # noqa: BLE001 - no FlexAttention in this torch
        return {}

    def run():  # (one score_mod object: a new one would recompile)
        out = flex(q, k, v, score_mod=distance_penalty, block_mask=mask)
        if case.mode == "fwd+bwd":
            torch.autograd.grad(out, (q, k, v), do)
        return out

    table = torch.zeros(case.heads, 2 * case.seq - 1, device="cuda", dtype=torch.float32, requires_grad=True)

    def captured(score, b, h, qi, kj):
        return score + table[h, qi - kj + case.seq - 1]

    def run_table():
        out = flex(q, k, v, score_mod=captured, block_mask=mask)
        if case.mode == "fwd+bwd":
            torch.autograd.grad(out, (q, k, v, table), do)
        return out

    return {"torch-flex-score_mod": run, "torch-flex-score_mod-table": run_table}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), torch_peers=torch_peers,
                      warmup=warmup, runs=runs, progress=progress, desc="attention", **kw)
