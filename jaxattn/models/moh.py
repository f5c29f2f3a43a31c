"""MoH: Multi-Head Attention as Mixture-of-Head attention (Jin et al. 2024), Flax NNX.

Follows SkyworkAI/MoH (``MoH-ViT/attention.py``, ``MoH-DiT/models.py``,
``MoH-LLaMA3/Inference_code/modeling_llama.py``). A layer has ``heads = h_s + E`` heads: ``h_s``
*shared* heads that every token uses and ``E`` *routed* heads of which each token uses its top-``K``.
Per token ``x`` (``[B, N, dim]``, the layer input):

* routed (``router="learned"``): ``r = softmax(x W_r)`` (``wg``, ``[dim, E]``, no bias),
  ``T = TopK(r, K)``, ``g_r,i = K r_i 1[i in T] / max(sum_T r, eps)`` (fp32 eps);
* shared: ``g_s = h_s softmax(x W_s)`` (``wg_1``, ``[dim, h_s]``) if ``h_s > 1``, else ``1``;
* two-stage (``h_s > 0`` and ``K > 0``): ``[a1, a2] = 2 softmax(x W_h)`` (``wg_0``, ``[dim, 2]``),
  ``g_s <- a1 g_s``, ``g_r <- a2 g_r``;
* output ``W_O concat(g ⊙ head_outputs)``, shared heads first; heads are ordinary scaled
  dot-product attention through :func:`jaxattn.attention`.

``K = 0`` means no routed heads (then ``h_s`` must equal ``heads``: every head is a softmax-gated
shared head, TransNeXt-MoH's first two stages). Load balance: in training mode (``deterministic``
False) each layer with routed heads sows ``E * sum_i P_i f_i`` as ``nnx.Intermediate`` ``aux_loss``
(``P_i`` mean router probability, ``f_i`` fraction of tokens selecting head i, over all B*N
tokens; the original writes it ``mean(P * f) * E * E``); the model's loss adds
``aux_loss_weight (0.01) * mean over those layers``. Values are sown only inside ``nnx.capture``
(``jaxattn.train.loop.forward_with_aux_loss`` does that), so plain calls leave the module unchanged.

``router="query_norm"`` is MoH-LLaMA3's parameter-free router: the score of routed head ``i`` is
``||q_i||_2`` of the token's (pre-position-encoding) query, divided by the unbiased std over the
routed heads, softmax, top-``K``; gates are a *binary* mask (shared heads 1, selected routed heads
1, others 0) and there is no load-balance loss. (The original builds the shared part with
``ones_like(mask)``, which only works when ``h_s == E`` as in its config, 16 + 16 heads, top-8;
here ``h_s`` is free.)

Inference: with ``sparse=True`` (or ``sparse_inference=True`` in eval mode) the routed heads are
computed only for the ``K`` heads each token selected (per-token gather of those heads' keys and
values), so the attention of zero-gated heads is skipped; it equals the dense path (tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.vit import ViT, ViTConfig, _apply, _dropout, _linear
from jaxattn.ops.attention import attention

Router = Literal["learned", "query_norm"]
_ROUTERS = ("learned", "query_norm")


def check_moh_heads(heads: int, shared_heads: int, top_k: int, router: str = "learned") -> None:
    """Raises ``ValueError`` unless ``(heads, shared_heads, top_k, router)`` is a valid MoH layer."""
    if router not in _ROUTERS:
        raise ValueError(f"router must be one of {_ROUTERS}, got {router!r}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if not 0 <= shared_heads <= heads:
        raise ValueError(f"shared_heads must be in [0, heads={heads}], got {shared_heads}")
    routed = heads - shared_heads
    if top_k < 0 or top_k > routed:
        raise ValueError(f"top_k must be in [0, routed heads = heads - shared_heads = {routed}], got {top_k}")
    if top_k == 0 and shared_heads != heads:
        raise ValueError(f"top_k=0 (no routing) needs shared_heads == heads ({heads}), got shared_heads="
                         f"{shared_heads}: routed heads would never be used")
    if router == "query_norm" and top_k == 0:
        raise ValueError("router='query_norm' needs top_k >= 1 (it only selects routed heads)")


def topk_mask(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(mask [..., E] fp32 0/1, indices [..., k] int32)`` of the ``k`` largest entries (last axis)."""
    _, idx = jax.lax.top_k(probs, k)
    return jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32).sum(-2), idx


def load_balance_loss(probs: jax.Array, mask: jax.Array) -> jax.Array:
    """``E * sum_i P_i f_i`` over all tokens of ``probs``/``mask`` ``[..., E]`` (``f`` is not
    differentiated: it comes from the top-k). Uniform routing gives ``K``."""
    e = probs.shape[-1]
    p = jnp.mean(probs.reshape(-1, e).astype(jnp.float32), axis=0)
    f = jnp.mean(jax.lax.stop_gradient(mask).reshape(-1, e).astype(jnp.float32), axis=0)
    return e * jnp.sum(p * f)


def query_norm_router(q_routed: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MoH-LLaMA3's router on the routed heads' queries ``[..., E, d]``: ``(probs, mask, indices)``."""
    norms = jnp.linalg.norm(q_routed.astype(jnp.float32), axis=-1)
    if norms.shape[-1] > 1:  # torch.std is unbiased; a single routed head has no spread to divide by
        std = jnp.std(norms, axis=-1, ddof=1, keepdims=True)
        norms = norms / jnp.maximum(std, jnp.finfo(jnp.float32).tiny)
    probs = jax.nn.softmax(norms, axis=-1)
    mask, idx = topk_mask(probs, k)
    return probs, mask, idx


def _capturing(module: nnx.Module) -> bool:
    """True inside ``nnx.capture`` (flax sets ``__captures__`` on the modules it records): values are
    only sown there, so plain calls never add state to the module."""
    return hasattr(module, "__captures__")


class Routing(NamedTuple):
    """Per-token routing of one layer: ``gates [B, N, heads]`` fp32 (shared heads first);
    ``probs``/``mask [B, N, E]`` and ``index [B, N, K]`` (into the routed heads) when ``K > 0``."""

    gates: jax.Array
    probs: jax.Array | None = None
    mask: jax.Array | None = None
    index: jax.Array | None = None


class MoHAttention(nnx.Module):
    """Mixture-of-Head self-attention, ``[B, N, dim] -> [B, N, dim]`` (see the module docstring).

    Parameters: ``qkv`` (``[dim, 3 dim]``, q/k/v then head-major as ViT's), ``proj`` (W_O) and the
    routers ``wg`` (W_r), ``wg_0`` (W_h), ``wg_1`` (W_s), named as the original's state_dict and
    present only when used. Router weights are truncated-normal std 0.02 (TransNeXt's init).
    """

    def __init__(self, dim: int, heads: int, *, shared_heads: int, top_k: int, router: Router = "learned",
                 qkv_bias: bool = True, proj_drop: float = 0.0, causal: bool = False,
                 impl: Literal["auto", "pallas", "xla"] = "auto", dtype: Any = jnp.float32,
                 sparse_inference: bool = False, rngs: nnx.Rngs, deterministic: bool = False):
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        check_moh_heads(heads, shared_heads, top_k, router)
        self.heads, self.head_dim = heads, dim // heads
        self.shared_heads, self.top_k, self.routed_heads = shared_heads, top_k, heads - shared_heads
        self.router, self.causal, self.impl = router, causal, impl
        self.sparse_inference, self.deterministic = sparse_inference, deterministic
        self.record_routing = False
        self.qkv = _linear(dim, 3 * dim, dtype, rngs, bias=qkv_bias)
        self.proj = _linear(dim, dim, dtype, rngs)
        self.proj_drop = _dropout(proj_drop, rngs)
        learned = router == "learned"
        self.wg = _linear(dim, self.routed_heads, dtype, rngs, bias=False) if learned and top_k > 0 else None
        self.wg_0 = _linear(dim, 2, dtype, rngs, bias=False) if learned and top_k > 0 and shared_heads > 0 else None
        self.wg_1 = _linear(dim, shared_heads, dtype, rngs, bias=False) if learned and shared_heads > 1 else None

    # -- routing ---------------------------------------------------------------------------------
    def route(self, x: jax.Array, q: jax.Array | None = None) -> Routing:
        """Gates of tokens ``x [B, N, dim]`` (``q [B, N, heads, d]``, the queries, for ``query_norm``)."""
        hs, k = self.shared_heads, self.top_k
        lead = x.shape[:-1]
        if self.router == "query_norm":
            if q is None:
                q = self._qkv(x)[0]
            probs, mask, idx = query_norm_router(q[..., hs:, :], k)
            return Routing(jnp.concatenate([jnp.ones(lead + (hs,), jnp.float32), mask], -1), probs, mask, idx)
        f32 = lambda lin: lin(x).astype(jnp.float32)  # noqa: E731
        g_s = hs * jax.nn.softmax(f32(self.wg_1), -1) if hs > 1 else jnp.ones(lead + (hs,), jnp.float32)
        if k == 0:
            return Routing(g_s)
        probs = jax.nn.softmax(f32(self.wg), -1)
        mask, idx = topk_mask(probs, k)
        kept = probs * mask
        g_r = k * kept / jnp.maximum(kept.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
        if hs > 0:
            a = 2.0 * jax.nn.softmax(f32(self.wg_0), -1)
            g_s, g_r = a[..., :1] * g_s, a[..., 1:] * g_r
        return Routing(jnp.concatenate([g_s, g_r], -1), probs, mask, idx)

    # -- forward ---------------------------------------------------------------------------------
    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _check_x(self, x: Any) -> None:
        dim = self.heads * self.head_dim
        want = f"[batch, tokens, {dim}]"
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"x must be an array of shape {want}, got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != dim:
            raise ValueError(f"x must have shape {want}, got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be floating point, got dtype {jnp.dtype(x.dtype).name}")

    def __call__(self, x: jax.Array, *, gates: jax.Array | None = None, sparse: bool | None = None,
                 return_attention: bool = False, return_routing: bool = False) -> Any:
        """``x [B, N, dim] -> [B, N, dim]``.

        ``gates [B, N, heads]`` overrides the router (all ones: plain multi-head attention).
        ``sparse`` computes only the selected routed heads per token (default: on in eval mode when
        ``sparse_inference``). ``return_attention`` also returns the (ungated) softmax weights
        ``[B, heads, N, N]`` fp32; ``return_routing`` also returns the :class:`Routing`.
        """
        self._check_x(x)
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        routing = self.route(x, q)
        if _capturing(self) and not self.deterministic and routing.probs is not None and self.router == "learned":
            self.sow(nnx.Intermediate, "aux_loss", load_balance_loss(routing.probs, routing.mask))
        if _capturing(self) and self.record_routing:  # for routing_stats (analysis)
            self.sow(nnx.Intermediate, "routing_gates", routing.gates)
            if routing.probs is not None:
                self.sow(nnx.Intermediate, "routing_balance", load_balance_loss(routing.probs, routing.mask) / self.top_k)
        if gates is not None:
            want = (b, n, self.heads)
            if not hasattr(gates, "shape") or tuple(gates.shape) != want:
                raise ValueError(f"gates must have shape [batch, tokens, heads] = {want}, got "
                                 f"{tuple(getattr(gates, 'shape', ()))}")
            routing = routing._replace(gates=gates.astype(jnp.float32))
        if sparse is None:
            sparse = self.sparse_inference and self.deterministic
        if sparse and gates is not None:
            raise ValueError("sparse=True skips heads chosen by the router; it cannot take explicit gates")
        if sparse and routing.index is not None:
            o = self._sparse_heads(q, k, v, routing)
        else:
            o = attention(q, k, v, causal=self.causal, impl=self.impl)
            o = o * routing.gates[..., None].astype(o.dtype)
        out = _apply(self.proj_drop, self.proj(o.reshape(b, n, -1)))
        extra = []
        if return_attention:
            s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * self.head_dim ** -0.5
            if self.causal:
                s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
            extra.append(jax.nn.softmax(s, axis=-1))
        if return_routing:
            extra.append(routing)
        return (out, *extra) if extra else out

    def _sparse_heads(self, q: jax.Array, k: jax.Array, v: jax.Array, routing: Routing) -> jax.Array:
        """Gated head outputs ``[B, N, heads, d]``: shared heads densely, routed heads only the ``K``
        each token selected (their attention against that head's keys/values, gathered per token)."""
        hs, e = self.shared_heads, self.routed_heads
        b, n, _, d = q.shape
        parts = []
        if hs:
            o_s = attention(q[:, :, :hs], k[:, :, :hs], v[:, :, :hs], causal=self.causal, impl=self.impl)
            parts.append(o_s * routing.gates[..., :hs, None].astype(o_s.dtype))
        idx = routing.index  # [B, N, K] into the routed heads
        q_sel = jnp.take_along_axis(q[:, :, hs:], idx[..., None], axis=2)  # [B, N, K, d]
        g_sel = jnp.take_along_axis(routing.gates[..., hs:], idx, axis=2)  # [B, N, K]
        scale = 1.0 / math.sqrt(d)

        def one_token(qs, ids, pos, kb, vb):  # qs [K, d], ids [K], kb/vb [N, E, d]
            ks, vs = kb[:, ids].astype(jnp.float32), vb[:, ids].astype(jnp.float32)  # [N, K, d]
            s = jnp.einsum("sd,msd->sm", qs.astype(jnp.float32), ks) * scale
            if self.causal:
                s = jnp.where(jnp.arange(n)[None, :] <= pos, s, -jnp.inf)
            return jnp.einsum("sm,msd->sd", jax.nn.softmax(s, axis=-1), vs)

        per_token = jax.vmap(one_token, in_axes=(0, 0, 0, None, None))  # over queries
        o_sel = jax.vmap(per_token, in_axes=(0, 0, None, 0, 0))(q_sel, idx, jnp.arange(n), k[:, :, hs:], v[:, :, hs:])
        onehot = jax.nn.one_hot(idx, e, dtype=jnp.float32)  # scatter the K slots back to their heads
        o_r = jnp.einsum("bnk,bnke,bnkd->bned", g_sel, onehot, o_sel).astype(q.dtype)
        return jnp.concatenate(parts + [o_r], axis=2)


# -------------------------------------------------------------------------------------------------
# MoH-ViT: the repo's ViT with every block's attention replaced by MoHAttention.

def _per_layer(value: int | tuple[int, ...], depth: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * depth
    value = tuple(value)
    if len(value) != depth:
        raise ValueError(f"{name} must be an int or one value per layer (depth={depth}), got {len(value)} values")
    return value


@dataclasses.dataclass(frozen=True)
class MoHViTConfig(ViTConfig):
    """:class:`ViTConfig` plus MoH: ``shared_heads`` / ``top_k`` (an int for every layer, or one
    value per layer), ``router``, the load-balance weight and the inference-time head skipping."""

    shared_heads: int | tuple[int, ...] = 1
    top_k: int | tuple[int, ...] = 2
    router: Router = "learned"
    balance_loss_weight: float = 0.01
    sparse_inference: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.remat:
            raise ValueError("remat (activation checkpointing) is not implemented for MoH-ViT; use remat=False")
        if self.quantized:
            raise ValueError("quantized=True is not supported by MoH-ViT")
        if self.balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {self.balance_loss_weight}")
        for i, (hs, k) in enumerate(self.layers):
            try:
                check_moh_heads(self.heads, hs, k, self.router)
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None

    @property
    def layers(self) -> list[tuple[int, int]]:
        """``[(shared_heads, top_k)]`` per block."""
        return list(zip(_per_layer(self.shared_heads, self.depth, "shared_heads"),
                        _per_layer(self.top_k, self.depth, "top_k")))

    @property
    def active_fraction(self) -> float:
        """Mean fraction of heads a token uses, ``(h_s + K) / heads`` averaged over layers."""
        return sum(hs + (k if k else 0) for hs, k in self.layers) / (self.depth * self.heads)


class MoHViT(ViT):
    """:class:`jaxattn.models.vit.ViT` whose blocks use :class:`MoHAttention` (same ``qkv``/``proj``
    parameters, plus the routers). ``aux_loss_weight`` scales the mean of the sown load-balance losses."""

    def __init__(self, cfg: MoHViTConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.aux_loss_weight = cfg.balance_loss_weight
        dtype = jnp.dtype(cfg.dtype)
        for block, (hs, k) in zip(self.blocks, cfg.layers):
            block.attn = MoHAttention(cfg.dim, cfg.heads, shared_heads=hs, top_k=k, router=cfg.router,
                                      qkv_bias=cfg.qkv_bias, proj_drop=cfg.dropout, impl=cfg.attn_impl,
                                      dtype=dtype, sparse_inference=cfg.sparse_inference, rngs=rngs)


def routing_stats(model: nnx.Module, images: jax.Array) -> dict[str, float]:
    """Runs ``model`` in eval mode on ``images`` and measures ``heads_active`` (fraction of all heads
    with a non-zero gate per token, mean over layers) and, over layers with routed heads,
    ``routed_active`` (the same over routed heads only) and ``balance`` (load-balance loss / K;
    1 = every routed head used equally, E/K = one fixed set of heads for every token)."""
    layers = [(tuple(path), m) for path, m in nnx.iter_graph(model) if isinstance(m, MoHAttention)]
    modes = [(m.deterministic, m.record_routing) for _, m in layers]
    model.eval()
    for _, m in layers:
        m.record_routing = True
    try:
        gdef, state = nnx.split(model)
        _, inter = jax.jit(lambda st, x: nnx.capture(nnx.merge(gdef, st), nnx.Intermediate)(x))(state, images)
    finally:
        for (_, m), (det, rec) in zip(layers, modes):
            m.deterministic, m.record_routing = det, rec
    flat = {tuple(path): var.get_value()[-1] for path, var in nnx.to_flat_state(inter)}
    gates = [(m, flat[path + ("routing_gates",)]) for path, m in layers]
    out = {"heads_active": sum(float((g != 0).mean()) for _, g in gates) / max(len(gates), 1)}
    routed = [(m, g, flat[path + ("routing_balance",)]) for (path, m), (_, g) in zip(layers, gates)
              if path + ("routing_balance",) in flat]
    if routed:
        out["routed_active"] = sum(float((g[..., m.shared_heads:] != 0).mean()) for m, g, _ in routed) / len(routed)
        out["balance"] = sum(float(b) for _, _, b in routed) / len(routed)
    return out


MOH_VIT_CONFIGS: dict[str, MoHViTConfig] = {
    # CPU-sized, the same backbone as vit-tiny (dim 128, 4 layers, 4 heads of 32): 1 shared head + top-2
    # of 3 routed heads in every layer (3 of 4 heads per token, 75 %).
    "moh-vit-tiny": MoHViTConfig(image_size=32, patch_size=4, in_channels=1, num_classes=10, dim=128, depth=4,
                                 heads=4, shared_heads=1, top_k=2),
    # MoH-TransNeXt-S-75 (heads [3,6,12,24], shared [3,6,3,4], K [0,0,6,12], depths [5,5,22,5]) mapped on
    # ViT-S/16 (dim 384, depth 12) with 12 heads of 32 (TransNeXt's heads are 24 wide) so the ratios fit;
    # stages -> layers [2, 2, 6, 2]: layers 0-3 all heads shared (K=0, softmax-gated), 4-9 3 shared +
    # top-6 of 9 (75 %, stage 3 exactly), 10-11 2 shared + top-6 of 10 (67 %, as stage 4's 16/24).
    "moh-vit-s": MoHViTConfig(dim=384, depth=12, heads=12, shared_heads=(12,) * 4 + (3,) * 6 + (2,) * 2,
                              top_k=(0,) * 4 + (6,) * 6 + (6,) * 2),
    # MoH-TransNeXt-B-50 (heads [4,8,16,32], shared [2,2,2,4], K [2,4,6,8], depths [5,5,23,5]) mapped on
    # ViT-B/16 (12 heads of 64), stages -> layers [2, 2, 6, 2]: (6 shared, top-6 of 6: 100 %),
    # (3, top-6 of 9: 75 %), (2, top-4 of 10: 50 %), (2, top-3 of 10: 42 %; stage 4 has 37.5 %).
    "moh-vit-b": MoHViTConfig(dim=768, depth=12, heads=12, shared_heads=(6,) * 2 + (3,) * 2 + (2,) * 6 + (2,) * 2,
                              top_k=(6,) * 2 + (6,) * 2 + (4,) * 6 + (3,) * 2),
}
