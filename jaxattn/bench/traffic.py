"""What XLA runs around the kernels: each public op compiled for a compile-only H100, its optimized
HLO split into the Pallas kernels and everything else (XLA's fusions, copies, transposes), with
the bytes each writes.

``python -m jaxattn.bench traffic [--ops halo linear_global ...] [--json PATH]``
``python -m jaxattn.bench traffic --lm-step tnl-385m [--batch 8 --seq 2048]``: one training step of
a language model instead, its XLA ops grouped by the JAX operation they come from;
``--image-step halonet-h0 [--batch 64 --image-size 256]`` the same for an image classifier.

A kernel that reads its inputs in place needs no XLA work around it; layout copies, padding,
casts and gathers in an op's wrapper show up here as XLA ops writing tensors the size of the
inputs, each one more trip through HBM and one more launch, without a GPU to time them. Output
bytes stand in for traffic (every op also reads at least that much). Forward+backward runs the
benchmarks' forward + VJP (:func:`jaxattn.bench.runner.jax_mode_fn`) with the cotangent an input
(no broadcast of ones).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxattn.bench import runner

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) (fusion|custom-call|copy|transpose|gather|scatter|"
                    r"dot|reduce|convert|slice|concatenate|pad|dynamic-update-slice|dynamic-slice|"
                    r"broadcast|select|add|multiply|reshape)\(")
_KERNEL_TARGETS = ("__gpu$xla.gpu.triton", "mosaic_gpu")


def shape_bytes(text: str) -> int:
    """Bytes of the (tuple of) array shape(s) in an HLO result type, e.g. ``(bf16[2,8]{1,0}, f32[2])``."""
    total = 0
    for dtype, dims in re.findall(r"\b(\w+)\[([\d,]*)\]", text):
        if dtype in _BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _BYTES[dtype]
    return total


def hlo_ops(hlo: str) -> list[dict]:
    """The entry computation's ops that write memory: name, op, bytes written, the JAX operation
    they come from (``source``, from the metadata) and for kernels their name (``kernel``);
    bitcasts, tuples and parameters are free and left out."""
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[: entry.find("\n}") + 1 or None]
    ops = []
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, result, op = m.groups()
        source = re.search(r'op_name="([^"]*)"', line)
        rec = {"name": name, "op": op, "bytes": shape_bytes(result), "source": source.group(1) if source else ""}
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if target and target.group(1).startswith(_KERNEL_TARGETS):
                kernel = re.search(r'name = \\?"([\w$]+)', line) or re.search(r'"name":"([\w$]+)"', line)
                rec["kernel"] = kernel.group(1) if kernel else target.group(1)
        ops.append(rec)
    return ops


def compiled_ops(fn: Callable, args: list) -> list[dict]:
    """:func:`hlo_ops` of ``fn(*args)`` compiled for the compile-only H100 (``args``: shapes)."""
    from jaxattn.bench import aot

    _, compiled = aot.lower_and_compile(fn, aot.on_compile_only_gpu(list(args)))
    return hlo_ops(compiled.as_text())


def summarize(ops: list[dict]) -> dict:
    kernels = [o for o in ops if "kernel" in o]
    other = [o for o in ops if "kernel" not in o]
    big = max(other, key=lambda o: o["bytes"], default=None)
    return {"kernels": len(kernels), "kernel_bytes": sum(o["bytes"] for o in kernels),
            "xla_ops": len(other), "xla_bytes": sum(o["bytes"] for o in other),
            "largest_xla_op": f"{big['name']} ({big['bytes'] / 2**20:.1f} MiB)" if big else ""}


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _cases() -> Iterator[tuple[str, str, Callable, list, int]]:
    """(op, shape label, op function, abstract inputs, how many leading inputs are differentiated)
    at the benchmarks' target shapes."""
    import jaxattn

    qkv = [_sds((2, 8192, 16, 128))] * 3
    yield "attention", "B2 S8192 H16 d128 causal", lambda q, k, v: jaxattn.attention(
        q, k, v, causal=True, impl="pallas"), qkv, 3
    yield "sage", "B4 S4096 H16 d128", lambda q, k, v: jaxattn.sage_attention(
        q, k, v, impl="pallas"), [_sds((4, 4096, 16, 128))] * 3, 0
    yield "landmark", "B2 S8192 H16 d128 block 64", lambda q, k, v: jaxattn.landmark_attention(
        q, k, v, block_len=64, impl="pallas"), qkv, 3
    mask = jaxattn.BlockMask.power(32768, 256, window=1280, sink=256)
    yield "block_sparse", "power B1 S32768 H16 d128", lambda q, k, v: jaxattn.block_sparse_attention(
        q, k, v, mask, impl="pallas"), [_sds((1, 32768, 16, 128))] * 3, 3
    yield "lightning", "B32 S2048 H16 d128", lambda q, k, v, s: jaxattn.lightning_attention(
        q, k, v, s, impl="pallas"), [_sds((32, 2048, 16, 128))] * 3 + [_sds((16,), jnp.float32)], 3
    yield "halo", "B8 64x64 H8 d32 b8 h3", lambda q, k, v, rh, rw: jaxattn.halo_attention(
        q, k, v, rh, rw, block_size=8, halo_size=3, impl="pallas"), \
        [_sds((8, 64, 64, 8, 32))] * 3 + [_sds((27, 32))] * 2, 5
    yield "halo_kv", "B8 64x64 H8 d32 b8 h3, packed kv", lambda q, kv, rh, rw: jaxattn.halo_attention_kv(
        q, kv, rh, rw, block_size=8, halo_size=3, impl="pallas"), \
        [_sds((8, 64, 64, 8, 32)), _sds((8, 64, 64, 8, 64))] + [_sds((27, 32))] * 2, 4
    yield "linear_global", "B16 S4096 H32 d64", lambda q, k, v, t: jaxattn.linear_global_attention(
        q, k, v, temperature=t, impl="pallas"), [_sds((16, 4096, 32, 64))] * 3 + [_sds((32,), jnp.float32)], 4


OPS = ("attention", "sage", "landmark", "block_sparse", "lightning", "halo", "halo_kv", "linear_global")


def by_source(ops: list[dict], top: int = 20) -> list[dict]:
    """Ops grouped by kernel name (kernels) or JAX source operation (XLA ops), largest total first."""
    groups: dict[tuple[str, str], dict] = {}
    for o in ops:
        key = (o.get("kernel", "xla"), o["source"] if "kernel" not in o else "")
        g = groups.setdefault(key, {"what": key[0], "source": key[1], "count": 0, "bytes": 0})
        g["count"] += 1
        g["bytes"] += o["bytes"]
    return sorted(groups.values(), key=lambda g: -g["bytes"])[:top]


def lm_step_ops(model: str, *, batch: int, seq: int, dtype: str = "bfloat16") -> list[dict]:
    """:func:`hlo_ops` of one training step of a language model (the LM trainer's loss, AdamW: the
    step ``bench tnl`` times), compiled for the compile-only H100 with abstract weights."""
    from jaxattn.bench.tnl import lm_train_step

    _, step, state = lm_train_step(model, dtype=dtype, abstract=True)
    return compiled_ops(step, [state, jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)])


def image_step_ops(model: str, *, batch: int, image_size: int | None = None, dtype: str = "bfloat16") -> list[dict]:
    """:func:`hlo_ops` of one training step of an image classifier (the step ``bench vision``
    times: softmax cross-entropy, AdamW), compiled for the compile-only H100 with abstract weights."""
    from jaxattn.bench.vision import image_train_step

    m, step, state = image_train_step(model, dtype=dtype, abstract=True)
    size = image_size or m.cfg.image_size
    return compiled_ops(step, [state, jax.ShapeDtypeStruct((batch, size, size, m.cfg.in_channels), jnp.float32),
                               jax.ShapeDtypeStruct((batch,), jnp.int32)])


def run(ops: list[str] | None = None, *, progress: bool = True) -> list[dict]:
    records = []
    for op, label, fn, args, n_diff in _cases():
        if ops and op not in ops:
            continue
        modes = ("fwd", "fwd+bwd") if n_diff else ("fwd",)  # (sage: an inference op)
        for mode in modes:
            if progress:
                print(f"compiling {op} {mode}: {label}", flush=True)
            out = jax.eval_shape(fn, *args)  # the cotangent is an input (no broadcast of ones)
            f = runner.jax_mode_fn(fn, mode, n_diff)
            records.append({"op": op, "case": label, "mode": mode,
                            **summarize(compiled_ops(f, [*args, _sds(out.shape, out.dtype)]))})
    return records


def format_groups(groups: list[dict]) -> str:
    lines = ["| writes | MiB | ops | JAX operation |", "|---|---|---|---|"]
    for g in groups:
        lines.append(f"| {g['what']} | {g['bytes'] / 2**20:,.0f} | {g['count']} | {g['source'][-100:]} |")
    return "\n".join(lines)


def format_records(records: list[dict]) -> str:
    lines = ["| op | case | mode | kernels | kernel output MiB | XLA ops | XLA output MiB | largest XLA op |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['kernels']} | {r['kernel_bytes'] / 2**20:.1f} | "
                     f"{r['xla_ops']} | {r['xla_bytes'] / 2**20:.1f} | {r['largest_xla_op']} |")
    return "\n".join(lines)

