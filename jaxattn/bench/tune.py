"""``python -m jaxattn.bench tune {flash,lightning,sage,halo,mosaic,sparse}``: time candidate tile configurations of a
kernel at one target shape on the GPU and print the fastest as a line for the kernel's table.

The search is greedy by stage (a stage varies the fields one kernel reads, the others stay at the
best so far), starting from the table entry: flash tunes the forward tiles on the forward, then the
dk/dv tiles and the backward launch on forward+backward, then the dq tiles; Lightning the forward,
then the backward, then the segment count; Sage its one kernel; HaloNet the launch shared by its
forward and backward kernels on forward+backward (``seq`` is the image side); ``mosaic`` (the
Mosaic GPU forward, ``impl="mosaic"``) its pipeline depth and key block, then ping-pong and in-place
``P V`` (in-place runs on a GPU only: the interpreter lacks ``pl.run_state``); ``sparse`` (the
block-sparse kernel on a PowerAttention layout) the flash stages with deeper pipelines. A candidate that fails to compile or
launch (shared memory, registers) is reported and skipped. ``--budget-s`` stops the search and
reports the best so far, so a session with little device time can still use it. Without a GPU the
search runs a tiny smoke case in interpret mode (two candidates per stage), to check the plumbing.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn.bench import runner, timing


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    mode: str  # "fwd" or "fwd+bwd"
    candidates: tuple[dict[str, Any], ...]  # field overrides of the config (or "segments")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to tune one kernel: its table entry, the stages, and a runner for one config."""

    base: Callable[[int, Any], Any]  # (head dim, dtype) -> config
    stages: Callable[[], list[Stage]]
    # (config, extra options, mode, causal, inputs) -> callable timed by the tuner
    make: Callable[..., Callable[[], Any]]
    inputs: Callable[[int, int, int, int, Any], tuple]  # (batch, seq, heads, head_dim, dtype) -> arrays
    table: str  # where the result goes
    # a candidate's outputs may differ from the current config's by this much (relative to their
    # largest magnitude; 16-bit outputs, different summation orders), else it is wrong, not fast
    tol: float = 3e-2


def _grid(**axes: Iterable[Any]) -> tuple[dict[str, Any], ...]:
    keys = list(axes)
    return tuple(dict(zip(keys, vals)) for vals in itertools.product(*axes.values()))


def _normal(b: int, n: int, h: int, d: int, dtype: Any, count: int = 4) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.PRNGKey(0), count)
    return tuple(jax.random.normal(k, (b, n, h, d), jnp.float32).astype(dtype) for k in keys)


def _vjp_runner(op: Callable[..., jax.Array], args: tuple, n_diff: int, ct: jax.Array, mode: str):
    """``op(*args)`` jitted as the benchmarks time it (forward, or forward + VJP w.r.t. the first
    ``n_diff`` args with cotangent ``ct``), as a no-argument callable."""
    f = runner.jax_mode_fn(op, mode, n_diff)
    return lambda: f(*args, ct)


# ---- flash ---------------------------------------------------------------------------------------
def _flash_family() -> Family:
    from jaxattn.pallas import flash

    def stages() -> list[Stage]:
        return [
            Stage("forward tiles", "fwd", _grid(block_q=(64, 128), block_k=(32, 64, 128), num_warps=(4, 8),
                                                num_stages=(2, 3, 4))),
            Stage("dk/dv tiles + backward launch", "fwd+bwd",
                  _grid(block_q_dkv=(32, 64, 128), block_k_dkv=(64, 128), num_warps_bwd=(4, 8),
                        num_stages_bwd=(2, 3))),
            Stage("dq tiles", "fwd+bwd", _grid(block_q_dq=(64, 128), block_k_dq=(32, 64, 128))),
        ]

    def make(cfg, extra, mode, causal, inputs):
        q, k, v, do = inputs
        op = lambda q, k, v: flash.flash_attention(q, k, v, causal=causal, config=cfg)[0]  # noqa: E731
        return _vjp_runner(op, (q, k, v), 3, do, mode)

    return Family(flash.flash_config, stages, make, lambda *a: _normal(*a), "pallas/flash.py CONFIGS")


# ---- lightning -----------------------------------------------------------------------------------
def _lightning_family() -> Family:
    from jaxattn.models.tnl import tnl_slopes
    from jaxattn.pallas import lightning

    def stages() -> list[Stage]:
        return [
            Stage("forward scheme", "fwd", _grid(forward=("scan", "chunked"))),
            Stage("forward", "fwd", _grid(block=(16, 32, 64), block_e=(16, 32, 64), num_warps=(4, 8),
                                          num_stages=(1, 2))),
            Stage("backward scheme", "fwd+bwd", _grid(backward=("scan", "chunked"))),
            Stage("backward chunks", "fwd+bwd", _grid(block_e_bwd=(32, 64, 128), num_warps_bwd=(4, 8))),
            Stage("segments", "fwd+bwd", _grid(segments=(1, 2, 4, 8, 16, 32))),
        ]

    def make(cfg, extra, mode, causal, inputs):
        q, k, v, slope, do = inputs
        seg = extra.get("segments")
        op = lambda q, k, v, s: lightning.lightning_attention_kernel(q, k, v, s, config=cfg,  # noqa: E731
                                                                     segments=seg, final_state=False)[0]
        return _vjp_runner(op, (q, k, v, slope), 3, do, mode)

    def inputs(b, n, h, d, dtype):
        q, k, v, do = _normal(b, n, h, d, dtype)
        scale = d ** -0.5
        return ((q * scale).astype(dtype), (k * scale).astype(dtype), v,
                jnp.asarray(tnl_slopes(h), jnp.float32), do)

    return Family(lightning.lightning_config, stages, make, inputs, "pallas/lightning.py CONFIGS")


# ---- sage ----------------------------------------------------------------------------------------
def _sage_family() -> Family:
    from jaxattn.pallas import sage

    def stages() -> list[Stage]:
        return [Stage("attention kernel", "fwd", _grid(block_q=(64, 128), block_k=(64, 128), num_warps=(4, 8),
                                                       num_stages=(2, 3, 4)))]

    def make(cfg, extra, mode, causal, inputs):
        q, k, v, _ = inputs
        f = jax.jit(lambda q, k, v: sage.sage_attention_kernel(q, k, v, causal=causal, config=cfg))
        return lambda: f(q, k, v)

    def base(d, dtype):
        return sage.sage_config(d)

    # (other tiles quantise over other groups: the outputs differ by the quantisation error)
    return Family(base, stages, make, lambda *a: _normal(*a), "pallas/sage.py CONFIGS", tol=0.1)


# ---- mosaic (the FlashAttention-3 forward on Mosaic GPU) -----------------------------------------
def _mosaic_family() -> Family:
    from jaxattn.pallas import flash, flash_mgpu

    def stages() -> list[Stage]:
        return [
            Stage("pipeline", "fwd", _grid(stages=(2, 3, 4), block_kv=(64, 128))),
            Stage("scheduling", "fwd", _grid(pingpong=(True, False), inplace_pv=(False, True))),
        ]

    def make(cfg, extra, mode, causal, inputs):
        q, k, v, do = inputs
        op = lambda q, k, v: flash.flash_attention(q, k, v, causal=causal, backend="mosaic",  # noqa: E731
                                                   mosaic_config=cfg)[0]
        return _vjp_runner(op, (q, k, v), 3, do, mode)

    def base(d, dtype):
        return flash_mgpu.mosaic_config(d)

    return Family(base, stages, make, lambda *a: _normal(*a), "pallas/flash_mgpu.py CONFIGS")


# ---- sparse (the block-sparse kernel on a PowerAttention layout) ---------------------------------
def _sparse_family() -> Family:
    """PowerAttention (block 256, the paper's window of 5 blocks and one sink block) at the target
    length: the visited key blocks are scattered, so the stages try deeper pipelines and other
    tiles than the dense flash table's."""
    from jaxattn.ops.block_sparse import BlockMask
    from jaxattn.pallas import block_sparse

    def stages() -> list[Stage]:
        return [
            # (64-row query tiles too: a program visits few key blocks, so its fixed costs (q load,
            # pipeline fill, output store) weigh more, and smaller tiles fit two programs per SM)
            Stage("forward tiles", "fwd", _grid(block_q=(64, 128), block_k=(64, 128), num_warps=(4, 8),
                                                 num_stages=(2, 3, 4))),
            Stage("dk/dv tiles + backward launch", "fwd+bwd",
                  _grid(block_q_dkv=(32, 64, 128), block_k_dkv=(64, 128), num_stages_bwd=(2, 3, 4))),
            Stage("dq tiles", "fwd+bwd", _grid(block_k_dq=(32, 64, 128))),
        ]

    masks: dict[int, BlockMask] = {}

    def make(cfg, extra, mode, causal, inputs):
        q, k, v, do = inputs
        n = q.shape[1]
        if n not in masks:
            masks[n] = BlockMask.power(n, 256 if n >= 1024 else 16)
        bm = masks[n]

        def op(q, k, v):
            return block_sparse.block_sparse_attention_kernel(
                q, k, v, mask_fn=bm.mask_fn, block_q=bm.block_q, block_k=bm.block_k, kv_index=bm.kv_index,
                kv_blocks=bm.kv_blocks, q_index=bm.q_index, q_blocks=bm.q_blocks, q_offset=bm.q_offset,
                config=cfg)[0]
        return _vjp_runner(op, (q, k, v), 3, do, mode)

    return Family(block_sparse.sparse_config, stages, make, lambda *a: _normal(*a),
                  "pallas/block_sparse.py CONFIGS")


# ---- halo ----------------------------------------------------------------------------------------
def _halo_family() -> Family:
    """HaloNet attention at a stage shape: ``seq`` is the image side, ``batch`` the images, b=8, h=3."""
    from jaxattn.ops import halo as halo_op
    from jaxattn.pallas import halo

    block, size = 8, 3
    win = block + 2 * size

    def stages() -> list[Stage]:
        return [Stage("backward scheme", "fwd+bwd", _grid(backward=("keys", "windows"))),
                Stage("all kernels", "fwd+bwd", _grid(key_chunk=(32, 64, 128), num_warps=(4, 8),
                                                      num_stages=(1, 2, 3)))]

    def make(cfg, extra, mode, causal, inputs):
        q, k, v, rh, rw, do = inputs
        d = q.shape[-1]

        def op(q, k, v, rh, rw):
            return halo_op._halo(q, k, v, rh, rw, block_size=block, halo_size=size, stride=1, scale=d ** -0.5,
                                 scale_pos_embed=False, mask_padding=False, use_kernel=True, config=cfg)
        return _vjp_runner(op, (q, k, v, rh, rw), 3, do, mode)

    def inputs(b, side, h, d, dtype):
        keys = jax.random.split(jax.random.PRNGKey(0), 6)
        img = lambda key: jax.random.normal(key, (b, side, side, h, d), jnp.float32).astype(dtype)  # noqa: E731
        rel = lambda key: (jax.random.normal(key, (2 * win - 1, d), jnp.float32) * 0.02).astype(dtype)  # noqa: E731
        return img(keys[0]), img(keys[1]), img(keys[2]), rel(keys[3]), rel(keys[4]), img(keys[5])

    return Family(lambda d, dtype: halo.HaloConfig(), stages, make, inputs, "pallas/halo.py HaloConfig defaults")


FAMILIES: dict[str, Callable[[], Family]] = {"flash": _flash_family, "lightning": _lightning_family,
                                             "sage": _sage_family, "halo": _halo_family,
                                             "mosaic": _mosaic_family, "sparse": _sparse_family}


def max_rel_err(got: Any, want: Any) -> float:
    """Largest ``|got - want|`` over every output, relative to each output's largest ``|want|``
    (NaN or inf anywhere: inf)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        err = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))
        worst = max(worst, err if err == err and err != float("inf") else float("inf"))
    return worst


def _split(cfg: Any, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Config fields go into the config, anything else (``segments``) into the extra options."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    return (dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in fields}),
            {k: v for k, v in overrides.items() if k not in fields})


def tune(family: str, *, batch: int, seq: int, heads: int, head_dim: int, dtype: str = "bfloat16",
         causal: bool = False, budget_s: float = 300.0, warmup: int = 2, runs: int = 10,
         smoke: bool = False, progress: bool = True) -> dict[str, Any]:
    """Greedy staged search; returns ``{"best": config, "extra": {...}, "records": [...]}``.
    Each candidate's outputs are checked against the current config's (``Family.tol``): a
    config that computes a wrong result (a race at some pipeline depth, say) is an error, not
    a winner."""
    fam = FAMILIES[family]()
    dt = jnp.dtype(dtype)
    cfg, extra = fam.base(head_dim, dt), {}
    inputs = fam.inputs(batch, seq, heads, head_dim, dt)
    deadline = time.perf_counter() + budget_s
    records: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}  # mode -> the outputs of the first (current) config run in it
    for stage in fam.stages():
        cands = stage.candidates[:2] if smoke else stage.candidates
        best = None
        # the current config first, so a stage never ends worse than it started
        for ov in ({}, *cands):
            if time.perf_counter() > deadline:
                records.append({"stage": stage.name, "note": "budget spent"})
                break
            c, e = _split(cfg, ov)
            e = {**extra, **e}
            rec: dict[str, Any] = {"stage": stage.name, "mode": stage.mode, "config": dataclasses.asdict(c), **e}
            try:
                run = fam.make(c, e, stage.mode, causal, inputs)
                out = jax.block_until_ready(run())
                if stage.mode not in reference:
                    reference[stage.mode] = out
                elif (err := max_rel_err(out, reference[stage.mode])) > fam.tol:
                    raise ValueError(f"wrong result: max error {err:.3g} of the outputs' range > {fam.tol}")
                del out
                t = timing.time_jax(lambda: run(), warmup=warmup, runs=runs)
                rec["ms"] = t.median_ms
            except Exception as err:  # noqa: BLE001 - a config that does not compile/launch is a result
                rec["error"] = f"{type(err).__name__}: {err}"[:200]
            records.append(rec)
            if progress:
                msg = f"{rec['ms']:.3f} ms" if "ms" in rec else rec["error"][:80]
                print(f"[{stage.name}] {ov or 'current'}: {msg}", flush=True)
            if "ms" in rec and (best is None or rec["ms"] < best[0]):
                best = (rec["ms"], c, e)
        if best is not None:
            _, cfg, extra = best
    return {"family": family, "best": cfg, "extra": extra, "records": records, "table": fam.table}


def format_result(res: dict[str, Any]) -> str:
    """The search as a markdown table, then the best configuration as a table line."""
    rows = ["| stage | mode | config | ms |", "|---|---|---|---|"]
    for r in res["records"]:
        if "config" not in r:
            rows.append(f"| {r['stage']} | | {r['note']} | |")
            continue
        desc = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if "segments" in r:
            desc += f" segments={r['segments']}"
        result = f"{r['ms']:.3f}" if "ms" in r else r["error"][:60]
        rows.append(f"| {r['stage']} | {r['mode']} | {desc} | {result} |")
    best = res["best"]
    args = ", ".join(f"{f.name}={getattr(best, f.name)!r}" for f in dataclasses.fields(best))
    line = f"{type(best).__name__}({args})" + "".join(f"  # {k}={v}" for k, v in res["extra"].items())
    return "\n".join(rows) + f"\n\nbest for {res['table']}:\n{line}"


SMOKE_SHAPES = {"halo": {"batch": 1, "seq": 16, "heads": 1, "head_dim": 32}}  # CPU smoke (default: seq 128)

# target shapes: (seq, batch * seq, heads * head_dim), as the benchmarks' sweeps
DEFAULT_SHAPES = {"flash": (8192, 16384, 2048), "lightning": (65536, 65536, 2048), "sage": (8192, 16384, 2048),
                  "halo": (64, 512, 256), "mosaic": (8192, 16384, 2048),
                  "sparse": (131072, 131072, 2048)}  # halo: 64x64 images, 8 of them, 8 heads x 32
