"""Latent-cache decode benchmark (multi-head latent attention, DeepSeek-V3's absorbed decoding): one new token per
batch row, every one of ``heads`` query heads attending to a ``[seq, latent + rope]`` cache whose first ``latent``
columns are also the values (:func:`jaxattn.latent_decode_attention`). Peers in this process: the kernel's
latent mode ("jaxattn": each cache block read once, as two tiles), the same cache as a page pool read through
block tables ("jaxattn-paged64": FlashMLA's page size), the cache quantized to FP8 e4m3 ("jaxattn-fp8",
reading half the bytes; the summary's GB/s count the case dtype's bytes) and the XLA path ("xla": the scores of every head, their
softmax, then the values; ``jax.nn.dot_product_attention`` takes no value narrower than the key).
The summary reports the cache bytes read per second: decoding is bound by them.
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

PAGE = 64  # FlashMLA's page size


@dataclasses.dataclass(frozen=True)
class Case(runner.Shape):
    """``head_dim`` is the latent width (the value), ``rope`` the RoPE key part's; every row's cache is full."""

    rope: int
    dtype: str
    mode: str = "fwd"

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.heads * self.seq * (2 * self.head_dim + self.rope)

    @property
    def cache_bytes(self) -> int:
        return self.batch * self.seq * (self.head_dim + self.rope) * jnp.dtype(self.dtype).itemsize


def gpu_cases(seqs, dtypes, tokens: int = 262144, heads: int = 128, latent: int = 512, rope: int = 64):
    """Batch * cache length = ``tokens``; DeepSeek-V3's 128 heads and 512 + 64 latent by default."""
    for s, dt in itertools.product(seqs, dtypes):
        yield Case(max(1, tokens // s), s, heads, latent, rope, dt)


def smoke_cases():
    yield Case(2, 128, 8, 32, 16, "float32")


def inputs(case: Case) -> tuple:
    kq, kc = jax.random.split(jax.random.PRNGKey(0))
    dt, width = jnp.dtype(case.dtype), case.head_dim + case.rope
    q = jax.random.normal(kq, (case.batch, 1, case.heads, width), jnp.float32).astype(dt)
    cache = jax.random.normal(kc, (case.batch, case.seq, 1, width), jnp.float32).astype(dt)
    return (q, cache, jnp.full((case.batch,), case.seq, jnp.int32), *jaxattn.quantize_kv(cache))  # (FP8 peer's)


def peers(case: Case) -> dict[str, Callable[..., Any]]:
    lat = case.head_dim
    ops = {
        "jaxattn": lambda q, c, n: jaxattn.latent_decode_attention(q, c, n, value_dim=lat, impl="pallas"),
        "xla": lambda q, c, n: jaxattn.latent_decode_attention(q, c, n, value_dim=lat, impl="xla"),
    }
    if case.seq % PAGE == 0:  # the same cache as a page pool (a free reshape; tables in page order)
        ops[f"jaxattn-paged{PAGE}"] = lambda q, c, n: jaxattn.latent_decode_attention(
            q, c.reshape(-1, PAGE, *c.shape[2:]), n, value_dim=lat, impl="pallas",
            block_tables=jnp.arange(c.shape[0] * c.shape[1] // PAGE, dtype=jnp.int32).reshape(c.shape[0], -1))
    # every peer gets (q, cache, lengths, fp8 cache, its scale); only the FP8 one reads the last two
    jitted = {name: jax.jit(lambda q, c, n, *_, op=op: op(q, c, n)) for name, op in ops.items()}
    jitted["jaxattn-fp8"] = jax.jit(lambda q, c, n, c8, s: jaxattn.latent_decode_attention(
        q, c8, n, value_dim=lat, cache_scale=s, impl="pallas"))
    return jitted


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    del interpret  # (impl="pallas" runs in interpret mode without a GPU)
    return runner.run(cases, inputs=inputs, peers=peers, warmup=warmup, runs=runs, progress=progress, desc="mla", **kw)


def summary(records: list[dict]) -> str:
    """Cache bandwidth (GB/s) per case and impl."""
    rows = []
    for r in records:
        if not r.get("ms"):
            continue
        case = Case(**{f.name: r[f.name] for f in dataclasses.fields(Case)})
        rows.append([str(r["batch"]), str(r["seq"]), r["dtype"], r["impl"], f"{r['ms']:.3f}",
                     f"{case.cache_bytes / (r['ms'] * 1e-3) / 1e9:.4g}"])
    return runner.markdown_table(["batch", "cache", "dtype", "impl", "ms", "cache GB/s"], rows)
