"""Decode benchmark: one new token per batch row attending to a full KV cache.

Decoding is bound by memory bandwidth (the whole cache is read for one query row per head), so
besides ms and TFLOP/s the summary reports the cache bytes read per second (GB/s). Peers in this
process: ``jax.nn.dot_product_attention`` with ``key_value_seq_lengths`` (XLA, and cuDNN on GPU),
JAX's bundled Pallas ``decode_attention.gqa``, our flash kernel with ``q_len = 1``, and, when
importable with CUDA, ``flash_attn_with_kvcache`` (flash-attn) and PyTorch SDPA (``enable_gqa``);
``jaxattn-fp8`` decodes the same cache quantized to FP8 e4m3 (``jaxattn.quantize_kv``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import runner


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    """``seq`` is the cache length, ``heads`` the query heads; every row's cache is full."""

    kv_heads: int
    dtype: str
    mode: str = "fwd"

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.seq * self.head_dim

    @property
    def cache_bytes(self) -> int:
        return 2 * self.batch * self.seq * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize


def gpu_cases(seqs, head_dims, dtypes, tokens: int = 262144, heads: int = 32, kv_heads: int = 8):
    """Batch * cache length = ``tokens`` (a 1 GB bf16 cache at d=128), Llama-style 32 q / 8 kv heads."""
    for s, d, dt in itertools.product(seqs, head_dims, dtypes):
        yield Case(max(1, tokens // s), s, heads, d, kv_heads, dt)


def smoke_cases():
    yield Case(2, 256, 4, 64, 2, "float32")


def inputs(case: Case) -> tuple:
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    dt = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.batch, 1, case.heads, case.head_dim), jnp.float32).astype(dt)
    cache = (case.batch, case.seq, case.kv_heads, case.head_dim)
    k, v = (jax.random.normal(key, cache, jnp.float32).astype(dt) for key in ks[1:])
    (k8, k_scale), (v8, v_scale) = jaxattn.quantize_kv(k), jaxattn.quantize_kv(v)  # the FP8 peer's cache
    return q, k, v, jnp.full((case.batch,), case.seq, jnp.int32), k8, v8, k_scale, v_scale


def _paged(q, k, v, n, *, page: int):
    b, s = k.shape[:2]
    table = jnp.arange(b * s // page, dtype=jnp.int32).reshape(b, s // page)
    pool = lambda x: x.reshape(b * s // page, page, *x.shape[2:])  # noqa: E731
    return jaxattn.paged_decode_attention(q, pool(k), pool(v), table, n, impl="pallas")


def peers(case: Case, interpret: bool) -> dict[str, Callable[..., Any]]:
    scale = 1.0 / math.sqrt(case.head_dim)
    ops: dict[str, Callable[..., Any]] = {
        "jaxattn": lambda q, k, v, n: jaxattn.decode_attention(q, k, v, n, impl="pallas"),
        "xla": lambda q, k, v, n: jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n,
                                                              implementation="xla"),
        "jaxattn-flash": lambda q, k, v, n: jaxattn.attention(q, k, v, impl="pallas"),
    }
    for page in (16, 128):  # the same cache as a page pool (a free reshape; table in page order)
        if case.seq % page == 0:
            ops[f"jaxattn-paged{page}"] = functools.partial(_paged, page=page)
    if not interpret:
        ops["cudnn"] = lambda q, k, v, n: jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=n, implementation="cudnn")
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

        ops["jax-pallas-decode"] = lambda q, k, v, n: jax_decode.gqa(
            q[:, 0], k, v, kv_seq_len=n, sm_scale=scale, interpret=interpret)
    except Exception:  # noqa: BLE001 - the bundled kernel moved or is missing
        pass
    # every peer gets (q, k, v, lengths, k8, v8, k_scale, v_scale); only the FP8 one reads the last four
    jitted = {name: jax.jit(lambda q, k, v, n, *_, op=op: op(q, k, v, n)) for name, op in ops.items()}
    jitted["jaxattn-fp8"] = jax.jit(lambda q, k, v, n, k8, v8, ks, vs: jaxattn.decode_attention(
        q, k8, v8, n, k_scale=ks, v_scale=vs, impl="pallas"))
    return jitted


def torch_peers(case: Case) -> dict[str, Callable[[], Any]]:
    """flash-attn's ``flash_attn_with_kvcache`` and PyTorch SDPA, when importable with CUDA."""
    if (found := runner.cuda_torch(case.dtype)) is None:
        return {}
    torch, dt = found
    import torch.nn.functional as F
    b, s, h, hkv, d = case.batch, case.seq, case.heads, case.kv_heads, case.head_dim
    out: dict[str, Callable[[], Any]] = {}
    q = torch.randn((b, 1, h, d), device="cuda", dtype=dt)
    k, v = (torch.randn((b, s, hkv, d), device="cuda", dtype=dt) for _ in range(2))
    try:
        from flash_attn import flash_attn_with_kvcache

        seqlens = torch.full((b,), s, device="cuda", dtype=torch.int32)
        out["flash-attn-kvcache"] = lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    except Exception:  # noqa: BLE001
        pass
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    out["torch-sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    return out


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    return runner.run(cases, inputs=inputs, peers=lambda c: peers(c, interpret), torch_peers=torch_peers,
                      warmup=warmup, runs=runs, progress=progress, desc="decode", **kw)


def summary(records: list[dict]) -> str:
    """Cache bandwidth (GB/s) per case and impl: the number that matters for decoding. It counts
    the case's dtype bytes for every impl, so ``jaxattn-fp8`` (reading half of them) shows the
    effective bandwidth of its smaller cache."""
    rows = []
    for r in records:
        if not r.get("ms"):
            continue
        case = Case(**{f.name: r[f.name] for f in dataclasses.fields(Case)})
        rows.append([str(r["batch"]), str(r["seq"]), str(r["head_dim"]), r["dtype"], r["impl"],
                     f"{r['ms']:.3f}", f"{case.cache_bytes / (r['ms'] * 1e-3) / 1e9:.4g}"])
    return runner.markdown_table(["batch", "cache", "head_dim", "dtype", "impl", "ms", "cache GB/s"], rows)
