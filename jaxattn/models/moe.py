"""A mixture-of-experts MLP: each token's router picks ``top_k`` of ``experts`` gated MLPs and sums their
outputs weighted by its routing weights (Mixtral, Qwen3-MoE, gpt-oss). Dropless: every token reaches the
experts it picks, whatever the load.

The dispatches compute the same sum (``impl``): ``"pallas"`` sorts the ``tokens * top_k`` assignments by
expert and runs each expert's rows as one group of :func:`jaxattn.grouped_matmul`'s kernel (prefill,
training), ``"ragged"`` the same through :func:`jax.lax.ragged_dot` (which XLA's GPU compiler runs as a
dense matmul over every expert); ``"gather"`` gathers each token's ``top_k`` experts' weights and runs them
as a batch (decoding a few tokens reads only the experts they pick); ``"auto"`` gathers when
``tokens * top_k <= experts`` (except MXFP4 experts on a GPU, which the kernel reads packed), else groups
(the kernel on a GPU, ``ragged_dot`` elsewhere).

Routing (``renormalize``): the softmax of the ``top_k`` largest router logits (Mixtral, gpt-oss, Qwen3-MoE's
``norm_topk_prob``), or the full softmax's probabilities at the ``top_k`` largest (Qwen2-MoE, OLMoE). In
training (inside ``nnx.capture``: ``jaxattn.train.loop.forward_with_aux_loss``) each layer sows the Switch
Transformer load-balance loss ``E * sum_i P_i f_i`` as ``nnx.Intermediate`` ``aux_loss``.

``expert_format="mxfp4"`` keeps the experts' weights in MXFP4 (:mod:`jaxattn.ops.mxfp4`, gpt-oss's release
format, 4.25 bits a weight: gpt-oss-120b's experts take 61 GB instead of 230 GB in bf16) as
:class:`MXFP4Weight` variables, constants the optimizers skip (the router, biases and the rest of a model
still train); the grouped-matmul kernel dequantizes them a tile at a time.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models import moe_parallel
from jaxattn.models.moh import _capturing, load_balance_loss
from jaxattn.ops import _spmd
from jaxattn.ops.grouped_matmul import grouped_matmul
from jaxattn.ops.mxfp4 import MXFP4, dequantize, quantize_mxfp4
from jaxattn.pallas._common import targets_gpu
from jaxattn.models.vit import _apply, _dropout

__all__ = ["MoE", "MXFP4Weight", "gated_act", "route", "moe_dispatch", "ACTIVATIONS", "IMPLS", "EXPERT_FORMATS"]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu", "gpt_oss")
IMPLS = ("auto", "pallas", "ragged", "gather")
EXPERT_FORMATS = ("float", "mxfp4")


class RouterBias(nnx.Variable):
    """DeepSeek-V3's ``e_score_correction_bias`` ``[experts]``: added to the router's scores to choose the
    experts (not to weight them); set by the load-balancing rule outside the gradient, so not an
    ``nnx.Param``."""


class MXFP4Weight(nnx.Variable):
    """Expert weights packed in MXFP4 (uint8 ``[experts, 17 K / 32, N]``, :class:`jaxattn.ops.mxfp4.MXFP4`):
    not an ``nnx.Param``, so optimizers and gradients leave them as they are."""
GPT_OSS_ALPHA = 1.702  # gpt-oss's sigmoid-gated linear unit: g * sigmoid(1.702 g)


def gated_act(g: jax.Array, u: jax.Array, act: str, limit: float | None = None) -> jax.Array:
    """A GLU's hidden activation from its gate ``g`` and up ``u`` projections: ``act(g) * u`` (SwiGLU,
    GeGLU, ...), or gpt-oss's clamped form ``(clip(u, -L, L) + 1) * g' * sigmoid(1.702 g')`` with
    ``g' = min(g, L)``, ``L = limit``."""
    if act == "gpt_oss":
        g = jnp.minimum(g, limit)
        u = jnp.clip(u, -limit, limit)
        return (u + 1) * (g * jax.nn.sigmoid(g * GPT_OSS_ALPHA))
    fn = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
          "gelu": functools.partial(jax.nn.gelu, approximate=False), "relu": jax.nn.relu}[act]
    return fn(g) * u


def route(logits: jax.Array, top_k: int, renormalize: bool = True, *, scoring: str = "softmax", groups: int = 1,
          topk_groups: int = 1, score_bias: jax.Array | None = None, scale: float = 1.0
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(weights [T, k] fp32, experts [T, k] int32, probs [T, E] fp32)`` of router ``logits [T, E]``.

    ``scoring="softmax"``: the ``k`` largest probabilities of the full softmax, renormalized to sum to one
    (``renormalize``: the softmax of the ``k`` largest logits) or kept. ``"sigmoid"`` (DeepSeek-V3): each
    expert's ``sigmoid(logit)``, chosen by ``sigmoid + score_bias`` (a selection-only bias, ``[E]``), the
    chosen scores divided by their sum with ``renormalize``. ``groups > 1`` (DeepSeek's group-limited
    routing): the experts in ``groups`` consecutive groups, the choice limited to the ``topk_groups`` groups
    with the best group score (softmax: its largest probability; sigmoid: the sum of its two largest
    selection scores). The weights are then times ``scale`` (``routed_scaling_factor``). ``probs`` is the
    full softmax (for the load-balance loss)."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    scores = jax.nn.sigmoid(logits) if scoring == "sigmoid" else probs
    choice = scores if score_bias is None else scores + score_bias.astype(jnp.float32)
    if groups > 1:
        t, e = choice.shape
        grouped = choice.reshape(t, groups, e // groups)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1) if scoring == "sigmoid" else grouped.max(-1)
        keep = jnp.zeros((t, groups), bool).at[jnp.arange(t)[:, None], jax.lax.top_k(group_score, topk_groups)[1]].set(True)
        choice = jnp.where(jnp.repeat(keep, e // groups, axis=1), choice, -jnp.inf)
    if scoring == "softmax" and score_bias is None and groups == 1:
        top, idx = jax.lax.top_k(logits, top_k)  # (the same order as the probabilities')
        weights = jax.nn.softmax(top, axis=-1) if renormalize else jnp.take_along_axis(probs, idx, axis=-1)
    else:
        idx = jax.lax.top_k(choice, top_k)[1]
        weights = jnp.take_along_axis(scores, idx, axis=-1)
        if renormalize:
            weights = weights / (weights.sum(-1, keepdims=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    if scale != 1.0:
        weights = weights * scale
    return weights, idx.astype(jnp.int32), probs


def _gathered(w: jax.Array | MXFP4, experts: jax.Array, dtype) -> jax.Array:
    """Each token's chosen experts' matrices ``[T, k, K, N]`` in ``dtype`` (MXFP4: only those dequantized)."""
    return dequantize(MXFP4(w.packed[experts]), dtype) if isinstance(w, MXFP4) else w[experts].astype(dtype)


def _expert_rows(h: jax.Array, bias: jax.Array | None, experts: jax.Array) -> jax.Array:
    return h if bias is None else h + bias[experts].astype(h.dtype)


def moe_dispatch(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array | MXFP4,
                 down: jax.Array | MXFP4,
                 gate_up_bias: jax.Array | None = None, down_bias: jax.Array | None = None, *,
                 act: str = "silu", limit: float | None = None,
                 impl: Literal["auto", "pallas", "ragged", "gather"] = "auto") -> jax.Array:
    """``out [T, D] = sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` (fp32) for ``x [T, D]``, with
    expert ``e``'s ``gate_up [E, D, 2H]`` (gate | up halves), ``down [E, H, D]`` and optional biases
    ``[E, 2H]``, ``[E, D]``; the matmuls run in ``x``'s dtype with fp32 accumulation. ``gate_up`` and
    ``down`` may be :class:`~jaxattn.ops.mxfp4.MXFP4` (constants: no gradient)."""
    t = x.shape[0]
    e, k = gate_up.shape[0], experts.shape[-1]
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    packed = isinstance(gate_up, MXFP4)
    # (a few tokens gather their experts' weights; packed ones stay packed in the kernel on a GPU instead)
    if impl == "auto" and t * k <= e and not (packed and targets_gpu()):
        impl = "gather"
    dt = x.dtype
    w1, w2 = (w if isinstance(w, MXFP4) else w.astype(dt) for w in (gate_up, down))

    def glu(h):
        g, u = jnp.split(h, 2, axis=-1)
        return gated_act(g, u, act, limit).astype(dt)

    gmm_impl = {"ragged": "xla", "pallas": "pallas"}.get(impl, "auto")

    def expert_mlp(rows, w1, w2, b1, b2, sizes, expert):
        """The experts on ``rows`` sorted by expert (``sizes`` rows each; ``expert``: each row's)."""
        gmm = functools.partial(grouped_matmul, group_sizes=sizes, preferred_element_type=jnp.float32, impl=gmm_impl)
        h = gmm(rows, w1)
        return _expert_rows(gmm(glu(_expert_rows(h, b1, expert)), w2), b2, expert)

    split = moe_parallel.expert_split(e, t)
    if split is not None:  # under expert_parallel: the experts split over the devices, tokens sent to them
        mesh, axis, capacity_factor = split
        return moe_parallel.ep_dispatch(x, weights, experts, w1, w2, gate_up_bias, down_bias, mesh=mesh, axis=axis,
                                        capacity_factor=capacity_factor, expert_mlp=expert_mlp)
    if impl == "gather":  # each token's k experts' weights, gathered: [T, k, D, 2H]
        h = jnp.einsum("td,tkdh->tkh", x, _gathered(w1, experts, dt), preferred_element_type=jnp.float32)
        y = jnp.einsum("tkh,tkhd->tkd", glu(_expert_rows(h, gate_up_bias, experts)), _gathered(w2, experts, dt),
                       preferred_element_type=jnp.float32)
        return jnp.einsum("tkd,tk->td", _expert_rows(y, down_bias, experts), weights.astype(jnp.float32))

    def grouped(x, weights, experts, w1, w2, b1=None, b2=None, batch_offset=None):
        flat = experts.reshape(-1)  # the T*k assignments, sorted by expert: one group per expert
        order = jnp.argsort(flat, stable=True)
        expert, token = flat[order], order // k
        sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
        y = expert_mlp(x[token], w1, w2, b1, b2, sizes, expert)
        return jnp.zeros(x.shape, jnp.float32).at[token].add(y * weights.reshape(-1)[order].astype(jnp.float32)[:, None])

    # under jaxattn.batch_parallel: each device routes its own tokens through the (replicated) experts
    return _spmd.per_batch_shard(grouped, dict(x=x, weights=weights, experts=experts),
                                 dict(w1=w1, w2=w2, b1=gate_up_bias, b2=down_bias), allowed=gmm_impl != "xla")


class MoE(nnx.Module):
    """``x [..., dim] -> [..., dim]``: top-``top_k`` routing over ``experts`` gated MLPs of width
    ``hidden`` (module docstring). Parameters: ``router`` (a Linear to the expert logits, computed in
    fp32), ``gate_up [E, dim, 2 hidden]`` (gate | up), ``down [E, hidden, dim]``, and with ``bias``
    the router's and experts' biases (gpt-oss); ``expert_format="mxfp4"``: ``gate_up`` and ``down`` are
    :class:`MXFP4Weight` (``dim`` and ``hidden`` multiples of 32). ``dropout``: on the output in train mode. ``shared_hidden``:
    a shared expert of that width (``shared_gate_up``, ``shared_down``) added to every token's output, times
    ``sigmoid(x . shared_gate)`` with ``shared_gate`` (Qwen2-MoE) or as it is (DeepSeek). ``scoring``,
    ``groups``, ``topk_groups``, ``routed_scale``: :func:`route`'s; ``score_bias``: a :class:`RouterBias`
    (DeepSeek-V3), which ``bias_update_rate > 0`` balances without an auxiliary loss: in train mode
    (``model.train()``) each forward adds ``rate * sign(mean load - load_i)`` to expert ``i``'s bias."""

    def __init__(self, dim: int, hidden: int, experts: int, top_k: int, *, act: str = "silu",
                 limit: float | None = None, bias: bool = False, renormalize: bool = True,
                 impl: Literal["auto", "pallas", "ragged", "gather"] = "auto", dtype=jnp.float32,
                 init_std: float = 0.02, out_std: float | None = None, dropout: float = 0.0, shared_hidden: int = 0,
                 expert_format: Literal["float", "mxfp4"] = "float", shared_gate: bool = True,
                 scoring: Literal["softmax", "sigmoid"] = "softmax", groups: int = 1, topk_groups: int = 1,
                 score_bias: bool = False, routed_scale: float = 1.0, bias_update_rate: float = 0.0,
                 rngs: nnx.Rngs):
        if experts < 1 or not 1 <= top_k <= experts:
            raise ValueError(f"a mixture of experts needs experts >= 1 and 1 <= top_k <= experts, got experts="
                             f"{experts}, top_k={top_k}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got {expert_format!r}")
        if expert_format == "mxfp4" and (dim % 32 or hidden % 32):
            raise ValueError(f"expert_format='mxfp4' quantizes groups of 32 along each matmul's input: dim ({dim}) "
                             f"and hidden ({hidden}) must be multiples of 32")
        init = nnx.initializers.normal
        self.router = nnx.Linear(dim, experts, use_bias=bias, kernel_init=init(init_std), rngs=rngs)
        weight = nnx.Param if expert_format == "float" else lambda w: MXFP4Weight(quantize_mxfp4(w).packed)
        self.gate_up = weight(init(init_std)(rngs.params(), (experts, dim, 2 * hidden), jnp.float32))
        self.down = weight(init(out_std or init_std)(rngs.params(), (experts, hidden, dim), jnp.float32))
        self.expert_format = expert_format
        self.gate_up_bias = nnx.Param(jnp.zeros((experts, 2 * hidden), jnp.float32)) if bias else None
        self.down_bias = nnx.Param(jnp.zeros((experts, dim), jnp.float32)) if bias else None
        self.experts, self.top_k, self.act, self.limit = experts, top_k, act, limit
        self.renormalize, self.impl, self.dtype = renormalize, impl, jnp.dtype(dtype)
        self.drop = _dropout(dropout, rngs)  # (on the output, in train mode)
        # Qwen2-MoE's shared expert: a gated MLP every token goes through, scaled by sigmoid(x . shared_gate)
        lin = functools.partial(nnx.Linear, use_bias=False, dtype=self.dtype, rngs=rngs)
        self.shared_gate_up = lin(dim, 2 * shared_hidden, kernel_init=init(init_std)) if shared_hidden else None
        self.shared_down = lin(shared_hidden, dim, kernel_init=init(out_std or init_std)) if shared_hidden else None
        self.shared_gate = lin(dim, 1, kernel_init=init(init_std)) if shared_hidden and shared_gate else None
        self.score_bias = RouterBias(jnp.zeros((experts,), jnp.float32)) if score_bias else None
        self.scoring, self.groups, self.topk_groups, self.routed_scale = scoring, groups, topk_groups, routed_scale
        if bias_update_rate < 0 or bias_update_rate and not score_bias:
            raise ValueError(f"bias_update_rate ({bias_update_rate}) moves the selection bias: it needs score_bias "
                             "and must be >= 0")
        # auxiliary-loss-free balancing (DeepSeek-V3): in train mode (deterministic False) each forward moves
        # every expert's selection bias by bias_update_rate towards the mean load
        self.bias_update_rate, self.deterministic = bias_update_rate, True

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """:func:`route` of the router's fp32 logits for ``x [T, dim]``."""
        bias = None if self.score_bias is None else self.score_bias[...]
        return route(self.router(x.astype(jnp.float32)).astype(jnp.float32), self.top_k, self.renormalize,
                     scoring=self.scoring, groups=self.groups, topk_groups=self.topk_groups, score_bias=bias,
                     scale=self.routed_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).astype(self.dtype)
        weights, experts, probs = self.route(x2)
        if self.bias_update_rate and not self.deterministic:  # (not a gradient: carried like BatchNorm's statistics)
            load = jnp.zeros((self.experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
            bias = self.score_bias[...] + self.bias_update_rate * jnp.sign(jnp.mean(load) - load)
            self.score_bias[...] = jax.lax.stop_gradient(bias)
        if _capturing(self):  # (training: forward_with_aux_loss)
            mask = jax.nn.one_hot(experts, self.experts, dtype=jnp.float32).sum(-2)
            self.sow(nnx.Intermediate, "aux_loss", load_balance_loss(probs, mask))
        bias = (self.gate_up_bias, self.down_bias)
        w1, w2 = self.gate_up[...], self.down[...]
        if self.expert_format == "mxfp4":
            w1, w2 = MXFP4(w1), MXFP4(w2)
        out = moe_dispatch(x2, weights, experts, w1, w2,
                           *(None if b is None else b[...] for b in bias), act=self.act, limit=self.limit,
                           impl=self.impl)
        if self.shared_gate_up is not None:
            g, u = jnp.split(self.shared_gate_up(x2), 2, axis=-1)
            shared = self.shared_down(gated_act(g, u, self.act, self.limit))
            shared = shared.astype(jnp.float32)
            if self.shared_gate is not None:  # (Qwen2-MoE; DeepSeek's is ungated)
                shared = jax.nn.sigmoid(self.shared_gate(x2).astype(jnp.float32)) * shared
            out = out + shared
        return _apply(self.drop, out.astype(self.dtype).reshape(shape))
