"""Block-sparse attention benchmark: PowerAttention and sliding-window masks through the
block-sparse kernel, against full causal flash attention and FlexAttention.

Per case (sequence length, pattern, mode) the impls are:

* ``jaxattn``: ``jaxattn.block_sparse_attention`` with the pattern's ``BlockMask``;
* ``flash-full``: ``jaxattn.attention(causal=True)``, the dense kernel on the same inputs
  (its "jaxattn speedup" is the sparse speedup over full attention);
* ``flash-window`` (window pattern): the dense kernel's own ``local_window_size`` (no block
  lists: block ranges computed in the kernel);
* ``flex``: PyTorch FlexAttention (``torch.compile``d) with the same mask as a ``mask_mod``
  and a 128 block mask, when torch with CUDA is importable.

The ``causal`` pattern runs plain causal attention through the block-sparse kernel: at
equal work, its time against ``flash-full`` is the overhead of walking block lists.

FLOPs: for sparse impls the visited blocks computed in full, ``4 d`` per (query, key)
pair of every visited ``block_q x block_k`` block, per head; for ``flash-full`` the
causal count ``4 B H S^2 d / 2``; forward+backward is 3.5x the forward. So TFLOP/s is a
throughput per visited block, comparable between the sparse kernel and dense flash.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jaxattn
from jaxattn.bench import mosaic_check, runner

PATTERNS = ("power", "window", "causal")


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    pattern: str  # "power", "window" or "causal"
    block: int  # PowerAttention block size B (tiles for the other patterns: min(block, 128))
    window: int  # tokens: PowerAttention's local window W * B, or the sliding window
    density: float  # fraction of the block grid visited
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"

    @property
    def visited_pairs(self) -> float:
        bm = block_mask(self)
        return float(bm.visited_blocks) * bm.block_q * bm.block_k

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.head_dim * self.visited_pairs
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    @property
    def full_flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.head_dim * self.seq * self.seq / 2
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)


def block_mask(c: Case) -> jaxattn.BlockMask:
    return _mask(c.pattern, c.seq, c.block, c.window)


def _mask(pattern: str, seq: int, block: int, window: int) -> jaxattn.BlockMask:
    tile = min(block, 128)
    if pattern == "power":
        return jaxattn.BlockMask.power(seq, block, window=window, sink=block)
    if pattern == "window":
        return jaxattn.BlockMask.sliding_window(seq, tile, window=window)
    if pattern == "causal":
        return jaxattn.BlockMask.causal(seq, tile)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def make_case(batch, seq, heads, head_dim, pattern, block, window, dtype, mode) -> Case:
    if pattern == "power":
        window = window or 5 * block  # the paper's W = 5 blocks
    elif pattern == "window":
        window = window or 4096
    else:
        window = 0
    dens = float(_mask(pattern, seq, block, window).density)
    return Case(batch, seq, heads, head_dim, pattern, block, window, round(dens, 4), dtype, mode)


def gpu_cases(seqs, patterns, head_dim: int, heads: int, batch: int, dtypes, modes, block: int = 256,
              power_window: int | None = None, sw_window: int = 4096):
    for s, p, dt, m in itertools.product(seqs, patterns, dtypes, modes):
        w = power_window if p == "power" else sw_window
        yield make_case(batch, s, heads, head_dim, p, block, w, dt, m)


def smoke_cases():
    for m in ("fwd", "fwd+bwd"):
        yield make_case(1, 256, 1, 32, "power", 32, 64, "float32", m)


def inputs(case: Case) -> tuple:
    return runner.normal_inputs(case)  # q, k, v, dO


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    bm = block_mask(case)
    ops = {
        "jaxattn": lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, bm, impl="pallas"),
        "flash-full": lambda q, k, v: jaxattn.attention(q, k, v, causal=True, impl="pallas"),
    }
    if mosaic_check.peers_apply(case.head_dim, case.dtype, interpret) and min(bm.block_q, bm.block_k) >= 128:
        # the Mosaic GPU kernel: its producer warpgroup walks the lists; and its dense causal twin
        ops["jaxattn-mosaic"] = lambda q, k, v: jaxattn.block_sparse_attention(q, k, v, bm, impl="mosaic")
        if mosaic_check.peers_apply(case.head_dim, case.dtype, interpret, causal=True):
            ops["flash-full-mosaic"] = lambda q, k, v: jaxattn.attention(q, k, v, causal=True, impl="mosaic")
    if case.pattern == "window":  # BlockMask.sliding_window: the last `window` keys, itself included
        ops["flash-window"] = lambda q, k, v: jaxattn.attention(
            q, k, v, causal=True, local_window_size=(case.window - 1, 0), impl="pallas")
    return {name: runner.jax_mode_fn(op, case.mode) for name, op in ops.items()}


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """FlexAttention with the pattern's element mask as ``mask_mod`` (the pattern objects
    are written with operators only, so they run on torch tensors too)."""
    if (found := runner.cuda_torch(case.dtype)) is None:
        return {}
    torch, dt = found
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:  # noqa: BLE001
        return {}
    try:
        pattern = block_mask(case).mask_fn
        mask_mod = lambda b, h, qi, kj: pattern(qi, kj)  # noqa: E731
        try:  # compiled construction: the eager one materialises the whole grid
            flex_mask = create_block_mask(mask_mod, None, None, case.seq, case.seq, device="cuda",
                                          BLOCK_SIZE=128, _compile=True)
        except TypeError:
            flex_mask = create_block_mask(mask_mod, None, None, case.seq, case.seq, device="cuda",
                                          BLOCK_SIZE=128)
        flex = torch.compile(flex_attention)
        shape = (case.batch, case.heads, case.seq, case.head_dim)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(4))
    except Exception as e:  # noqa: BLE001 - reported in the table instead of a time
        err = e

        def failed():
            raise err

        return {"flex": failed}

    def run():
        out = flex(q, k, v, block_mask=flex_mask)
        if case.mode == "fwd+bwd":
            torch.autograd.grad(out, (q, k, v), do)
        return out

    return {"flex": run}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    # dense flash is credited with its own (causal) FLOPs, not the visited blocks'
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), torch_peers=torch_peers,
                      warmup=warmup, runs=runs, progress=progress, desc="sparse",
                      flops=lambda c, impl: c.full_flops if impl.startswith("flash-full") else c.flops, **kw)


def summary(records: list[dict]) -> str:
    """One line per case: sparse speedup over full flash, and the block-sparse kernel's
    throughput per visited block relative to dense flash."""
    lines = []
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = tuple(r[f.name] for f in dataclasses.fields(Case))
        by_case.setdefault(key, {})[r["impl"]] = r
    for key, impls in by_case.items():
        ours, full = impls.get("jaxattn", {}), impls.get("flash-full", {})
        if not (ours.get("ms") and full.get("ms")):
            continue
        c = dict(zip((f.name for f in dataclasses.fields(Case)), key))
        lines.append(f"{c['pattern']:>6} seq {c['seq']:>6} {c['mode']:>7}: {full['ms'] / ours['ms']:6.2f}x faster "
                     f"than full flash; per-block throughput {ours['tflops'] / full['tflops']:.2f} of dense "
                     f"flash (density {c['density']:.3f})")
    return "\n".join(lines)
