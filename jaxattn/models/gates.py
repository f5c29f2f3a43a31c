"""Hard-attention / feature-selection gates (Roffo et al., MICCAI 2024, "Feature Selection Gates
with Gradient Routing"; reference code ``cosmoimd/feature-selection-gates``).

A gate is a learnable logit per feature (CNN channel, ViT embedding dim) or per token; the
forward pass multiplies by ``sigmoid(logit)`` independently per unit (no softmax competition).
Logits are initialised like the reference, Xavier-normal with the sigmoid gain on a ``[1, n]``
tensor (``std = sqrt(2 / (n + 1))``) so scores start around 0.5. ``hard=True`` thresholds the
scores at ``threshold`` in the forward pass with a straight-through gradient.

Gate logits are :class:`GateParam` variables (a subclass of ``nnx.Param``): the backbone
optimizer and the routed gate optimizer tell them apart with :func:`param_labels`; see
``jaxattn.train.routing`` for the dual-forward-pass gradient routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class GateParam(nnx.Param):
    """Gate logits: updated only by the gate optimizer in the routed pass."""


def _gate_init(key: jax.Array, n: int) -> jax.Array:
    return jax.random.normal(key, (n,), jnp.float32) * (2.0 / (n + 1)) ** 0.5


def gate_scores(logits: jax.Array, *, hard: bool = False, threshold: float = 0.5) -> jax.Array:
    """``sigmoid(logits)``; with ``hard``, ``1[s > threshold]`` forward, sigmoid's gradient back."""
    s = jax.nn.sigmoid(logits)
    if hard:
        s = s + jax.lax.stop_gradient((s > threshold).astype(s.dtype) - s)
    return s


class _Gate(nnx.Module):
    """``n`` gate logits and their (optionally hard) sigmoid scores."""

    def __init__(self, n: int, *, hard: bool = False, threshold: float = 0.5, rngs: nnx.Rngs):
        self.logits = GateParam(_gate_init(rngs.params(), n))
        self.hard, self.threshold = hard, threshold

    def scores(self) -> jax.Array:
        return gate_scores(self.logits[...], hard=self.hard, threshold=self.threshold)


class FeatureGate(_Gate):
    """Scales the last axis of ``x`` (channels of an NHWC map, features of tokens) by
    ``sigmoid(w)``, as the reference's per-layer ``fsag_*`` parameters."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.logits[...].shape[0]:
            raise ValueError(f"FeatureGate over {self.logits[...].shape[0]} features got x with last "
                             f"axis {x.shape[-1]} (shape {tuple(x.shape)})")
        return x * self.scores().astype(x.dtype)


class TokenGate(_Gate):
    """Scales each token position of ``x [batch, tokens, dim]`` by ``sigmoid(w[token])``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3 or x.shape[1] != self.logits[...].shape[0]:
            raise ValueError(f"TokenGate over {self.logits[...].shape[0]} tokens needs x of shape "
                             f"[batch, {self.logits[...].shape[0]}, dim], got {tuple(x.shape)}")
        return x * self.scores().astype(x.dtype)[None, :, None]


def param_labels(model: nnx.Module) -> nnx.State:
    """``"gate"`` for :class:`GateParam` leaves, ``"backbone"`` for every other ``nnx.Param``:
    the (static) labels for ``optax.multi_transform`` in ``nnx.Optimizer(model, tx, wrt=nnx.Param)``."""
    params = nnx.state(model, nnx.Param)
    labels = jax.tree.map(lambda v: "gate" if isinstance(v, GateParam) else "backbone", params,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    return labels


def gate_summary(model: nnx.Module) -> dict[str, jax.Array]:
    """Path -> sigmoid scores of every gate in ``model`` (for logging and plots)."""
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(model, GateParam)):
        out["/".join(map(str, path))] = jax.nn.sigmoid(v[...])
    return out
