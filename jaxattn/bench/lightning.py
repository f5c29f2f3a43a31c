"""Lightning attention benchmark: the Lightning Attention-2 kernel against the dense
XLA formula, a ``lax.scan`` recurrence, jaxattn's causal softmax flash kernel on the
same shapes, and flash-linear-attention / lightning-attn (PyTorch, Triton) when importable; where the
kernel splits the sequence into segments, also the kernel run unsplit (``jaxattn-unsegmented``); the
kernel with its other scheme (``jaxattn-chunked`` or ``jaxattn-scan``, forward and backward; see
``jaxattn.pallas.lightning``), the kernel on packed documents (``jaxattn-packed``: ``segment_ids``), and at
d = 128 bf16 the table entry before 2026-12-04.

FLOPs (block C = 64): forward ``B*H*N*(C*(d+e) + 4*d*e)`` (causal intra-block products
plus the inter-block state read and update); forward+backward 3x that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import runner
from jaxattn.models.tnl import tnl_slopes
from jaxattn.pallas import lightning as lk
from jaxattn.reference.lightning import lightning_recurrent


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    dtype: str
    mode: str

    @property
    def flops(self) -> float:
        d = e = self.head_dim
        f = self.batch * self.heads * self.seq * (64 * (d + e) + 4 * d * e)
        return f * (3.0 if self.mode == "fwd+bwd" else 1.0)


def gpu_cases(seqs, head_dims, dtypes, modes, tokens: int = 65536, model_dim: int = 2048):
    return runner.seq_sweep(Case, seqs, head_dims, dtypes, modes, tokens, model_dim)


def smoke_cases():
    for m in ("fwd", "fwd+bwd"):
        yield Case(1, 256, 2, 32, "float32", m)


def inputs(case: Case) -> tuple:
    q, k, v, do = runner.normal_inputs(case)
    q, k = q * case.head_dim ** -0.5, k * case.head_dim ** -0.5
    return q, k, v, jnp.asarray(tnl_slopes(case.heads), jnp.float32), do


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    ops: dict[str, Callable[..., jax.Array]] = {
        "jaxattn": lambda q, k, v, s: jaxattn.lightning_attention(q, k, v, s, impl="pallas"),
        "xla-dense": lambda q, k, v, s: jaxattn.lightning_attention(q, k, v, s, impl="xla"),
        "scan": lambda q, k, v, s: lightning_recurrent(q, k, v, s)[0].astype(q.dtype),
        "jaxattn-softmax-flash": lambda q, k, v, s: jaxattn.attention(q, k, v, causal=True, impl="pallas"),
    }
    # At the sweep's fixed B*S the dense form holds B*H*S^2 fp32 scores (34 GB at S = 8k), and the
    # scan's backward keeps every step's [d, e] state (68 GB at any S): XLA spent a 2-minute time box
    # autotuning around those allocations on the H200.
    if case.seq > 8192:
        ops.pop("xla-dense")
    if case.mode == "fwd+bwd" or case.seq > 8192:
        ops.pop("scan")
    cfg = lk.lightning_config(case.head_dim, case.dtype)
    if (case.head_dim, case.dtype) == (128, "bfloat16"):  # the entry the first H200 run timed (2026-12-04)
        ops["jaxattn-prev-config"] = lambda q, k, v, s: lk.lightning_attention_kernel(
            q, k, v, s, config=PREV_D128_CONFIG, final_state=False)[0]
    other = "chunked" if cfg.forward == "scan" else "scan"  # the other scheme, forward and backward
    ops[f"jaxattn-{other}"] = lambda q, k, v, s: lk.lightning_attention_kernel(
        q, k, v, s, config=dataclasses.replace(cfg, forward=other, backward=other), final_state=False)[0]
    # packed documents (segment_ids: four documents per row, ragged against the blocks): what the masks cost
    n = case.seq
    cuts = jnp.asarray([n // 4 + 7, n // 2 + 13, 3 * n // 4 + 5])
    docs = jnp.broadcast_to(jnp.searchsorted(cuts, jnp.arange(n), side="right"), (case.batch, n)).astype(jnp.int32)
    ops["jaxattn-packed"] = lambda q, k, v, s: jaxattn.lightning_attention(q, k, v, s, impl="pallas", segment_ids=docs)
    if lk.segment_count(case.batch, case.heads, case.seq, cfg, case.head_dim) > 1:  # what segments buy
        ops["jaxattn-unsegmented"] = lambda q, k, v, s: lk.lightning_attention_kernel(q, k, v, s, segments=1,
                                                                                     final_state=False)[0]
    return {name: runner.jax_mode_fn(op, case.mode) for name, op in ops.items()}


# The d=128 two-byte table entry before 2026-12-04 (32-row blocks, 8 warps, 16-wide value chunks):
# timed beside the current one, it shows what the table change bought.
PREV_D128_CONFIG = lk.LightningConfig(32, 8, 2, 16, 64)


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """flash-linear-attention's simple GLA (scalar per-head decay) and OpenNLPLab's
    lightning_attn, when installed with CUDA."""
    if (found := runner.cuda_torch(case.dtype)) is None:
        return {}
    torch, dt = found
    b, n, h, d = case.batch, case.seq, case.heads, case.head_dim
    slopes = torch.tensor(tnl_slopes(h), device="cuda", dtype=torch.float32)
    out: dict[str, Callable[[], Any]] = {}
    bwd = case.mode == "fwd+bwd"

    def tensors(shape):
        return [torch.randn(shape, device="cuda", dtype=dt, requires_grad=bwd) for _ in range(4)]

    try:
        from fla.ops.simple_gla import chunk_simple_gla

        q, k, v, do = tensors((b, n, h, d))
        g = (-slopes).view(1, 1, h).expand(b, n, h).contiguous()

        def fla_run():
            o, _ = chunk_simple_gla(q, k, v, g, scale=1.0)
            if bwd:
                torch.autograd.grad(o, (q, k, v), do)
            return o

        out["fla-simple-gla"] = fla_run
    except Exception:  # noqa: BLE001
        pass
    try:
        from lightning_attn.ops import lightning_attn_func

        q2, k2, v2, do2 = tensors((b, h, n, d))

        def la_run():
            o = lightning_attn_func(q2, k2, v2, slopes.view(h, 1, 1))
            if bwd:
                torch.autograd.grad(o, (q2, k2, v2), do2)
            return o

        out["lightning-attn"] = la_run
    except Exception:  # noqa: BLE001
        pass
    return out


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), torch_peers=torch_peers,
                      warmup=warmup, runs=runs, progress=progress, desc="lightning", **kw)
