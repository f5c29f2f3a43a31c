"""A Mamba-2 layer (Dao and Gu 2024, "Transformers are SSMs"; the mixer of hybrid models such as Jamba-style and
Granite 4 / Nemotron-H stacks), a :class:`jaxattn.models.gpt.GPT` layer kind (``layer_types`` entry ``"mamba2"``), on
:func:`jaxattn.gated_linear_attention`.

``x, B, C = W_x u, W_B u, W_C u`` through a causal depthwise convolution (``delta_conv`` taps, with a bias) and
SiLU; ``dt = softplus(W_dt u + dt_bias)`` and ``A = -exp(A_log)`` per head; the state space model's chunked dual
form (SSD), ``h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)ᵀ``, ``y_t = C_tᵀ h_t + D x_t``, is gated linear attention
with ``q = C``, ``k = B``, ``v = dt x``, ``g = dt A`` and no scale; then the gated RMSNorm ``RMSNorm(y * silu(W_z
u))`` over each group's channels, and ``W_out``. ``B`` and ``C`` have ``H_k`` groups (Mamba-2's ``ngroups``), each
shared by ``H / H_k`` heads.

Dimensions are the config's ``delta_dims``: ``H`` heads (``delta_heads``) of width ``headdim`` (``delta_value_dim``),
``H_k`` groups (``delta_key_heads``) and the state size ``d_state`` (``delta_head_dim``). Packed documents
(``segment_ids``) stop the convolution and the state at each document start. Generation keeps, per layer, the
``[B, H, d_state, headdim]`` state (fp32) and the convolution's last ``delta_conv - 1`` inputs (the cache of a Gated
DeltaNet layer): each new token costs O(1) (:func:`jaxattn.gated_linear_attention_step`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.deltanet import RecurrentLayer, causal_conv, prompt_mask
from jaxattn.models.gpt import _linear, rms_norm
from jaxattn.models.vit import _apply
from jaxattn.ops import _spmd
from jaxattn.ops.gated_linear import gated_linear_attention, gated_linear_attention_sp, gated_linear_attention_step

__all__ = ["Mamba2Layer"]


class Mamba2Layer(RecurrentLayer):
    """Mamba-2 (module docstring), the interface of :class:`jaxattn.models.gpt.Attention`: ``(u [B, n, dim],
    positions) -> [B, n, dim]``; with a cache ``(state [B, H, d_state, headdim], conv history [B, K - 1, 2 H_k
    d_state + H headdim])``, ``-> (out, cache)``. Parameters: ``C``, ``B`` (``H_k d_state`` wide), ``x``, ``z``
    (``H headdim``), ``dt`` (``H``), ``conv`` (``[K, 2 H_k d_state + H headdim]``, channels C | B | x) and
    ``conv_bias``, ``A_log``, ``dt_bias``, ``D`` (``[H]``), ``norm`` (``[H headdim]``), ``out``."""

    def __init__(self, cfg, layer: int, *, rngs: nnx.Rngs):
        del layer
        self.cfg, self.kind = cfg, "mamba2"
        self.heads, self.groups, self.state_dim, self.head_dim = cfg.delta_dims
        gw, vw = self.groups * self.state_dim, self.heads * self.head_dim
        self.C, self.B = _linear(cfg.dim, gw, cfg, rngs), _linear(cfg.dim, gw, cfg, rngs)
        self.x, self.z = _linear(cfg.dim, vw, cfg, rngs), _linear(cfg.dim, vw, cfg, rngs)
        self.dt = _linear(cfg.dim, self.heads, cfg, rngs)
        self.conv = nnx.Param(self._taps(cfg, (cfg.delta_conv, 2 * gw + vw), rngs))
        self.conv_bias = nnx.Param(self._taps(cfg, (2 * gw + vw,), rngs))
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, self.heads, dtype=jnp.float32)))
        # dt from softplus(dt_bias) log-uniform in [1e-3, 1e-1] at init (Mamba-2's), the bias its inverse softplus
        dt0 = jnp.exp(jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nnx.Param(dt0 + jnp.log(-jnp.expm1(-dt0)))
        self.D = nnx.Param(jnp.ones((self.heads,), jnp.float32))
        self.norm = nnx.Param(jnp.ones((vw,), jnp.float32))
        self._output(cfg, vw, rngs)

    def __call__(self, u: jax.Array, positions: jax.Array, cache: tuple | None = None,
                 offset: jax.Array | int = 0, segment_ids: jax.Array | None = None, lengths: jax.Array | None = None):
        """``lengths [B]``: a ragged prefill, the state and convolution history stopping at each row's length
        (``dt = 0`` on the pads: no decay, no write)."""
        del positions  # (no positional encoding: the convolution and the decay order the tokens)
        b, n, _ = u.shape
        h, hk, ds, hd = self.heads, self.groups, self.state_dim, self.head_dim
        mixed = jnp.concatenate([self.C(u), self.B(u), self.x(u)], axis=-1)
        decoding, history = self._history(cache, offset)
        conv = causal_conv(mixed, self.conv[...], history, segment_ids) + self.conv_bias[...].astype(mixed.dtype)
        c, bm, x = jnp.split(jax.nn.silu(conv), [hk * ds, 2 * hk * ds], axis=-1)
        c, bm, x = c.reshape(b, n, hk, ds), bm.reshape(b, n, hk, ds), x.reshape(b, n, h, hd)
        dt = jax.nn.softplus(self.dt(u).astype(jnp.float32) + self.dt_bias[...])  # [B, n, H]
        if (valid := prompt_mask(lengths, n)) is not None:
            dt = jnp.where(valid, dt, 0.0)
        g = -jnp.exp(self.A_log[...]) * dt
        v = (x.astype(jnp.float32) * dt[..., None]).astype(x.dtype)
        impl = self.cfg.attn_impl
        if decoding and n == 1:  # a step from the layer's state
            y, state = gated_linear_attention_step(c[:, 0], bm[:, 0], v[:, 0], g[:, 0], cache[0], scale=1.0)
            y = y[:, None]
        elif decoding:  # several tokens past the cache: chunked, from the state
            y, state = gated_linear_attention(c, bm, v, g, scale=1.0, initial_state=cache[0], return_state=True,
                                              impl=impl)
        elif _spmd.use_shards(self.sequence_parallel, u.shape, cache is None):  # (GPT.enable_sequence_parallel)
            mesh, axis, batch_axis = self.sequence_parallel[:3]
            y, state = gated_linear_attention_sp(c, bm, v, g, mesh=mesh, axis=axis, batch_axis=batch_axis, scale=1.0,
                                                 return_state=True, segment_ids=segment_ids, impl=impl)
        else:
            y, state = gated_linear_attention(c, bm, v, g, scale=1.0, return_state=True, segment_ids=segment_ids,
                                              impl=impl)
        y = y.astype(jnp.float32) + self.D[...][:, None] * x.astype(jnp.float32)
        gated = (y * jax.nn.silu(self.z(u).astype(jnp.float32).reshape(b, n, h, hd))).reshape(b, n, hk, -1)
        norm = self.norm[...].reshape(hk, -1)
        y = rms_norm(gated, norm, self.cfg.norm_eps).reshape(b, n, h * hd).astype(u.dtype)  # (per group)
        out = _apply(self.resid_drop, self.out(y))
        return out if cache is None else (out, self._next_cache(state, history, mixed, cache, lengths))
