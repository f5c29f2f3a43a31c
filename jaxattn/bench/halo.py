"""HaloNet attention benchmark at HaloNet stage shapes: the fused Pallas kernel against the
XLA unfold-and-softmax formulation, and timm's ``HaloAttn`` core in PyTorch when importable.

The op alone is timed (q, k, v and the relative tables in, attention out): timm's module
also runs its 1x1 q/kv projections, so its peer is timed from projected tensors through
the same steps as its ``forward`` (unfold, rel logits, softmax, matmul) for a like-for-like
comparison. FLOPs count the window actually computed (border keys included):
forward ``B * Hq * Wq * heads * 2 (d + e) win^2``; forward+backward 3.5x that.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import runner
from jaxattn.ops import halo as halo_ops
from jaxattn.pallas.halo import HaloConfig


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    size: int  # feature map height = width
    dim: int  # channels = heads * head_dim
    heads: int
    block: int
    halo: int
    stride: int
    dtype: str
    mode: str

    @property
    def win(self) -> int:
        return self.block + 2 * self.halo

    @property
    def flops(self) -> float:
        queries = self.batch * (self.size // self.stride) ** 2
        f = queries * self.dim * 4 * self.win ** 2  # heads * 2 (d + e) = 4 dim
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    @property
    def seq(self) -> int:  # for the table's ns/token column: one token per query pixel
        return (self.size // self.stride) ** 2


# HaloNet stage shapes (H x W x C): 64x64x256 and 32x32x512 with b=8, h=3, 8 heads.
STAGES = ((64, 256), (32, 512), (16, 1024))


def gpu_cases(batch: int, dtypes, modes, stages=STAGES, block: int = 8, halo: int = 3, heads: int = 8):
    for (size, dim), dt, m in itertools.product(stages, dtypes, modes):
        yield Case(batch, size, dim, heads, block, halo, 1, dt, m)


def smoke_cases():
    for m in ("fwd", "fwd+bwd"):
        yield Case(1, 16, 32, 2, 8, 2, 1, "float32", m)


def inputs(case: Case) -> tuple:
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    dt = jnp.dtype(case.dtype)
    d = case.dim // case.heads
    hq = case.size // case.stride
    q = jax.random.normal(ks[0], (case.batch, hq, hq, case.heads, d), jnp.float32).astype(dt)
    k, v = (jax.random.normal(kk, (case.batch, case.size, case.size, case.heads, d), jnp.float32).astype(dt)
            for kk in ks[1:3])
    rh, rw = (0.02 * jax.random.normal(kk, (2 * case.win - 1, d), jnp.float32).astype(dt) for kk in ks[3:5])
    do = jax.random.normal(ks[5], q.shape, jnp.float32).astype(dt)
    return q, k, v, rh, rw, do


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    kw = dict(block_size=case.block, halo_size=case.halo, stride=case.stride)
    ops = {
        "jaxattn": lambda q, k, v, rh, rw: jaxattn.halo_attention(q, k, v, rh, rw, impl="pallas", **kw),
        "xla-unfold": lambda q, k, v, rh, rw: jaxattn.halo_attention(q, k, v, rh, rw, impl="xla", **kw),
    }
    if case.mode == "fwd+bwd":  # the other backward scheme (per-window dk, dv folded by XLA)
        d = case.dim // case.heads
        ops["jaxattn-windows"] = lambda q, k, v, rh, rw: halo_ops._halo(
            q, k, v, rh, rw, block_size=case.block, halo_size=case.halo, stride=case.stride, scale=d ** -0.5,
            scale_pos_embed=False, mask_padding=False, use_kernel=True, config=HaloConfig(backward="windows"))
    return {name: runner.jax_mode_fn(op, case.mode, n_diff=5) for name, op in ops.items()}


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """timm ``HaloAttn.forward``'s attention core on CUDA (unfold, ``rel_logits_1d`` via
    timm's ``PosEmbedRel``, softmax, matmul), from already-projected q, k, v."""
    if (found := runner.cuda_torch()) is None or case.stride != 1:
        return {}
    torch = found[0]
    try:
        import torch.nn.functional as F
        from timm.layers.halo_attn import PosEmbedRel
    except Exception:  # noqa: BLE001
        return {}
    dt = runner.torch_dtype(torch, case.dtype)
    b, hh, heads, bs, halo, win = case.batch, case.size, case.heads, case.block, case.halo, case.win
    d = case.dim // heads
    nb = (hh // bs) ** 2
    bwd = case.mode == "fwd+bwd"
    pos = PosEmbedRel(bs, win, d, d ** -0.5).to("cuda", dt)
    q = torch.randn(b * heads, d, hh, hh, device="cuda", dtype=dt, requires_grad=bwd)
    kv = torch.randn(b, 2 * case.dim, hh, hh, device="cuda", dtype=dt, requires_grad=bwd)
    do = torch.randn(b * heads, nb, bs * bs, d, device="cuda", dtype=dt)
    params = [q, kv, *pos.parameters()] if bwd else []

    def run():
        qb = q.reshape(-1, d, hh // bs, bs, hh // bs, bs).permute(0, 2, 4, 3, 5, 1)
        qb = qb.reshape(b * heads, nb, bs * bs, d)
        kvp = F.pad(kv, [halo] * 4).unfold(2, win, bs).unfold(3, win, bs)
        kvp = kvp.reshape(b * heads, 2 * d, nb, -1).permute(0, 2, 3, 1)
        k, v = torch.split(kvp, [d, d], dim=-1)
        attn = (qb @ k.transpose(-1, -2)) * d ** -0.5 + pos(qb)
        out = attn.softmax(dim=-1) @ v
        if bwd:
            torch.autograd.grad(out, params, do)
        return out

    return {"timm-halo": run}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), torch_peers=torch_peers,
                      warmup=warmup, runs=runs, progress=progress, desc="halo", **kw)
