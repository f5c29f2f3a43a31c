"""Gradient routing for hard-attention / feature-selection gates (Roffo et al., MICCAI 2024).

Each training step runs two forward passes on the same batch, as the reference trainer:

1. the **gate pass**: the loss is differentiated w.r.t. the gate logits only
   (:class:`jaxattn.models.gates.GateParam`) and the gate optimizer (Adam, its own learning rate)
   updates them; the backbone is not touched;
2. the **backbone pass**: a second forward with the updated gates; the loss is differentiated
   w.r.t. every other parameter only, and the backbone optimizer updates them.

So gate parameters get gradients only from their routed pass and backbone parameters only from
theirs. (The reference PyTorch loop does not zero the backbone's gradients between its two
``backward`` calls, so its backbone also accumulates the gate pass's gradients; we route strictly.)
BatchNorm statistics are updated by both forwards, as in the reference.

``mode="joint"`` is the non-routed ablation: one pass, one ``optax.multi_transform`` with the gate
optimizer on the gate logits and the backbone optimizer on the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxattn.models.gates import GateParam, param_labels
from jaxattn.train.loop import Trainer, apply_augment, step_keys

BACKBONE = nnx.All(nnx.Param, nnx.Not(GateParam))


def joint_optimizer(model: nnx.Module, backbone_tx: optax.GradientTransformation,
                    gate_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optax.multi_transform``: ``gate_tx`` on :class:`GateParam` leaves, ``backbone_tx`` on the rest."""
    return optax.multi_transform({"gate": gate_tx, "backbone": backbone_tx}, param_labels(model))


class RoutedTrainer(Trainer):
    """A :class:`~jaxattn.train.loop.Trainer` whose step routes gradients (see the module doc).
    ``optimizer`` is the backbone's; ``gate_optimizer`` (default ``optax.adam(1e-2)``, the
    reference's ``gr_ofs_lr``) updates the gates. State = ``(model, backbone_opt, gate_opt)``."""

    def __init__(self, model_factory: Callable[[nnx.Rngs], nnx.Module],
                 optimizer: optax.GradientTransformation | Callable[[nnx.Module], optax.GradientTransformation],
                 loss_fn, *, gate_optimizer: optax.GradientTransformation | None = None,
                 gate_loss_fn=None, **kw: Any):
        super().__init__(model_factory, optimizer, loss_fn, wrt=BACKBONE, **kw)
        self.gate_loss_fn = gate_loss_fn or loss_fn
        model, opt = nnx.merge(self.graphdef, self.state)
        if not nnx.state(model, GateParam):
            raise ValueError("RoutedTrainer needs a model with gates (GateParam variables); build it with "
                             "gates enabled")
        gate_opt = nnx.Optimizer(model, gate_optimizer or optax.adam(1e-2), wrt=GateParam)
        self.graphdef, state = nnx.split((model, opt, gate_opt))
        self._set_state(state)

    def _pass(self, model, wrt, loss_fn, batch, key):
        """Gradients of ``loss_fn`` w.r.t. the ``wrt`` variables, averaged over micro-batches;
        updates the model's non-differentiated state (BatchNorm statistics) in place."""
        gdef, params, rest = nnx.split(model, wrt, ...)
        n = self.grad_accum

        def micro_step(carry, xs):
            grads_sum, rest = carry
            micro, i = xs

            def loss_of(p, r):
                m = nnx.merge(gdef, p, r, copy=True)
                out = loss_fn(m, micro, jax.random.fold_in(key, i))
                loss, metrics = out if isinstance(out, tuple) else (out, {})
                return loss.astype(jnp.float32), (metrics, nnx.split(m, wrt, ...)[2])

            (loss, (metrics, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params, rest)
            return (jax.tree.map(jnp.add, grads_sum, grads), rest), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, rest), (losses, metrics) = jax.lax.scan(micro_step, (zeros, rest), (batch, jnp.arange(n)))
        nnx.update(model, rest)
        return jax.tree.map(lambda g: g / n, grads), losses.sum() / n, metrics

    def _train_step_body(self, state, batch):
        model, opt, gate_opt = nnx.merge(self.graphdef, state)
        model.train()
        aug_key, loss_key = step_keys(self.seed, opt.step[...])
        if self.augment is not None:
            batch = apply_augment(self.augment, batch, aug_key, lead_dims=2)
        # 1. gate pass: gradients reach the gate logits only
        g_grads, g_loss, _ = self._pass(model, GateParam, self.gate_loss_fn, batch, jax.random.fold_in(loss_key, 0))
        gate_opt.update(model, g_grads)
        # 2. backbone pass with the updated gates: gradients reach everything else only
        b_grads, loss, metrics = self._pass(model, BACKBONE, self.loss_fn, batch, jax.random.fold_in(loss_key, 1))
        opt.update(model, b_grads)
        out = {"loss": loss, "gate_loss": g_loss,
               **{k: jnp.mean(v.astype(jnp.float32), 0) for k, v in metrics.items()}}
        return nnx.state((model, opt, gate_opt)), out


def make_trainer(mode: Literal["none", "joint", "routed"], model_factory, backbone_tx, loss_fn, *,
                 gate_tx: optax.GradientTransformation | None = None, **kw: Any) -> Trainer:
    """``"none"``: plain trainer; ``"joint"``: one pass, multi_transform (gates in the same step);
    ``"routed"``: :class:`RoutedTrainer`."""
    gate_tx = gate_tx or optax.adam(1e-2)
    if mode == "routed":
        return RoutedTrainer(model_factory, backbone_tx, loss_fn, gate_optimizer=gate_tx, **kw)
    if mode == "joint":
        return Trainer(model_factory, lambda m: joint_optimizer(m, backbone_tx, gate_tx), loss_fn, **kw)
    if mode == "none":
        return Trainer(model_factory, backbone_tx, loss_fn, **kw)
    raise ValueError(f"gate mode must be 'none', 'joint' or 'routed', got {mode!r}")
