"""Mixture-of-experts MLP benchmark (:mod:`jaxattn.models.moe`): one layer's routed experts for ``seq``
tokens, as ``moe_impl="auto"`` runs them (the "jaxattn" row: on a GPU the grouped matmul kernels of
:mod:`jaxattn.pallas.grouped_matmul`, or the gathered experts of a few tokens), through XLA's
:func:`jax.lax.ragged_dot` on the same sorted rows (``ragged``: XLA's GPU compiler makes it one dense
matmul over every expert), the gathered dispatch (``gather``: each token's experts' weights, only for a
few tokens), and the dense form that runs every expert on every token and zeroes the unchosen (what a
framework without grouped matmuls does). Forward only, ``mxfp4``: the "jaxattn" dispatch on the experts
packed in MXFP4 (:mod:`jaxattn.ops.mxfp4`, gpt-oss's format: the kernels dequantize tiles as they read them).

FLOPs count the chosen experts only, ``tokens * top_k * 6 * dim * hidden`` forward (gate / up and down
matmuls), 3x that forward+backward, so the dense row's TFLOP/s is its useful work. Shapes: gpt-oss-20b's
layer (2880 wide, 32 experts of 2880, top 4) and Mixtral-8x7B's (4096, 8 experts of 14336, top 2), from
one decoded token to a 16k-token prefill.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn.bench import runner
from jaxattn.models.moe import gated_act, moe_dispatch, route
from jaxattn.ops.mxfp4 import MXFP4, quantize_mxfp4

# the gathered dispatch materialises tokens * top_k experts' weights: only for decoding-sized batches
GATHER_MAX_ROWS = 256
# (dim, hidden, experts, top_k) of the layers timed on a GPU
LAYERS = {"gpt-oss-20b": (2880, 2880, 32, 4), "mixtral-8x7b": (4096, 14336, 8, 2)}


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int  # 1: ``seq`` tokens (the table's ns/token divides by batch * seq)
    seq: int
    dim: int
    hidden: int
    experts: int
    top_k: int
    dtype: str
    mode: str

    @property
    def flops(self) -> float:
        f = self.seq * self.top_k * 6.0 * self.dim * self.hidden
        return f * (3.0 if self.mode == "fwd+bwd" else 1.0)


def gpu_cases(tokens, layers, dtypes, modes):
    for t, name, dt, m in itertools.product(tokens, layers, dtypes, modes):
        yield Case(1, t, *LAYERS[name], dt, m)


def smoke_cases():
    for t, m in ((2, "fwd"), (48, "fwd"), (48, "fwd+bwd")):
        yield Case(1, t, 32, 64, 8, 2, "float32", m)


def inputs(case: Case) -> tuple:
    """``x [T, D]``, ``gate_up [E, D, 2H]``, ``down [E, H, D]`` (the differentiated three), the router
    ``[D, E]``, (forward) the two expert weights packed in MXFP4, and the output cotangent."""
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    dt = jnp.dtype(case.dtype)
    e, d, h = case.experts, case.dim, case.hidden

    def normal(k, shape, std):
        return (jax.random.normal(k, shape, jnp.float32) * std).astype(dt)

    gate_up, down = normal(ks[1], (e, d, 2 * h), d ** -0.5), normal(ks[2], (e, h, d), h ** -0.5)
    packed = (quantize_mxfp4(gate_up).packed, quantize_mxfp4(down).packed) if _packs(case) else ()
    return (normal(ks[0], (case.seq, d), 1.0), gate_up, down, normal(ks[3], (d, e), d ** -0.5), *packed,
            normal(ks[4], (case.seq, d), 1.0))


def _packs(case: Case) -> bool:
    """Whether the case times the MXFP4 experts (forward, widths in groups of 32)."""
    return case.mode == "fwd" and case.dim % 32 == 0 and case.hidden % 32 == 0


def _dense(x, gate_up, down, weights, experts):
    """Every expert on every token, combined with the routing weights (zero off the chosen experts)."""
    combine = jnp.zeros((x.shape[0], gate_up.shape[0]), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
    h = jnp.einsum("td,edh->teh", x, gate_up, preferred_element_type=jnp.float32)
    g, u = jnp.split(h, 2, axis=-1)
    y = jnp.einsum("teh,ehd->ted", gated_act(g, u, "silu").astype(x.dtype), down, preferred_element_type=jnp.float32)
    return jnp.einsum("te,ted->td", combine, y)


def peers(case: Case) -> dict[str, Callable[..., Any]]:
    def op(dispatch, packed=False):
        def f(x, gate_up, down, router, *quantized):
            weights, experts, _ = route(jnp.dot(x, router, preferred_element_type=jnp.float32), case.top_k)
            if packed:
                gate_up, down = (MXFP4(q) for q in quantized)
            return dispatch(x, gate_up, down, weights, experts).astype(x.dtype)

        return f

    def via(impl):
        return lambda x, gate_up, down, w, e: moe_dispatch(x, w, e, gate_up, down, impl=impl)

    ops = {"jaxattn": op(via("auto")), "ragged": op(via("ragged")), "dense": op(_dense)}
    if case.seq * case.top_k <= GATHER_MAX_ROWS:
        ops["gather"] = op(via("gather"))
    if _packs(case):
        ops["mxfp4"] = op(via("auto"), packed=True)
    return {name: runner.jax_mode_fn(f, case.mode) for name, f in ops.items()}


def run(cases, *, warmup: int, runs: int, interpret: bool, progress: bool = True, **kw) -> list[dict]:
    del interpret  # (no Pallas kernels here: XLA on every backend)
    return runner.run(cases, inputs=inputs, peers=peers, warmup=warmup, runs=runs, progress=progress, desc="moe", **kw)
