"""One training loop for every task: a jitted data-parallel Optax step with gradient accumulation,
per-example JAX augmentation, deterministic per-step randomness, Orbax checkpoints with exact resume,
and a ``fit`` driver (progress bar, periodic evaluation, CSV metrics, final plot).

A task supplies

* ``model_factory(rngs) -> nnx.Module``;
* ``optimizer``: an ``optax.GradientTransformation`` or ``optimizer_factory(model) -> tx`` (e.g. an
  ``optax.multi_transform`` whose labels are read from the model's parameters);
* ``loss_fn(model, batch, rng) -> loss`` or ``(loss, {name: scalar})``, called on the model in train mode;
* optionally ``augment(example, rng) -> example`` (one example, no batch axis; vmapped over the batch
  inside the step) and ``eval_fn(model, batch) -> pytree`` (called on the model in eval mode).

Batches are pytrees of arrays whose leading axis is the global batch. Everything random in a step
(augmentation, the ``rng`` handed to ``loss_fn``) is derived from ``(seed, step)``, with ``step`` read
from the optimizer's counter in the checkpointed state, and data order is the task's pure function of
``(seed, step)``, so a run resumed from a checkpoint reproduces the uninterrupted one exactly.

Model state that is not an ``nnx.Param`` (BatchNorm running statistics, RNG counters) is carried
through the step (sequentially over micro-batches), updated, and checkpointed with the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxattn.models.moe_parallel import EXPERT_VARIABLES
from jaxattn.ops._spmd import batch_parallel, expert_parallel
from jaxattn.train.metrics import MetricsLog, plot_curves

Batch = Any  # pytree of arrays, leading axis = examples
LossFn = Callable[[nnx.Module, Batch, jax.Array], "jax.Array | tuple[jax.Array, dict[str, jax.Array]]"]


# -- optimizers ---------------------------------------------------------------------------
def warmup_cosine(lr: float, warmup: int, steps: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup`` steps, cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr * min_lr_ratio)


def adamw(schedule: optax.Schedule | float, *, weight_decay: float = 0.1, clip: float | None = 1.0,
          b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    """Global-norm clipping (if ``clip``) then AdamW."""
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


class EmaState(typing.NamedTuple):
    """State of :func:`with_ema`: the wrapped optimizer's, the parameters' moving average (fp32), the count."""
    inner: Any
    ema: Any
    count: jax.Array


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformationExtraArgs:
    """``tx`` that also keeps an exponential moving average of the parameters it updates (model EMA, as
    timm's ``ModelEma``): after each update ``ema = d * ema + (1 - d) * params`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at update ``n`` (TensorFlow's warm-up, so early averages are
    not dominated by the initialisation). It lives in the optimizer state, so checkpoints, exact resume
    and ``--fsdp`` sharding carry it as they carry the Adam moments; :meth:`Trainer.ema_model` reads it."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

    def init(params):
        return EmaState(tx.init(params), jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params),
                        jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("with_ema needs the parameters in update()")
        updates, inner = tx.update(updates, state.inner, params, **extra)
        count = state.count + 1
        d = jnp.minimum(decay, (1.0 + count) / (10.0 + count)).astype(jnp.float32)
        ema = jax.tree.map(lambda e, p, u: d * e + (1.0 - d) * (p + u).astype(jnp.float32), state.ema, params, updates)
        return updates, EmaState(inner, ema, count)

    return optax.GradientTransformationExtraArgs(init, update)


def _use_ema(model: nnx.Module, opt: nnx.Optimizer) -> None:
    """Puts ``opt``'s moving averages (:func:`with_ema`) into ``model``'s parameters, in their dtypes."""
    def value(v):
        return v.get_value() if isinstance(v, nnx.Variable) else v

    current = {path: value(v) for path, v in nnx.to_flat_state(nnx.state(model))}
    nnx.update(model, nnx.from_flat_state({path: jnp.asarray(value(v), current[path].dtype)
                                                for path, v in nnx.to_flat_state(opt.opt_state.ema)}))


def step_keys(seed: int, step) -> tuple[jax.Array, jax.Array]:
    """``(augment_key, loss_key)`` of a step: a pure function of ``(seed, step)``."""
    k = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)


def apply_augment(augment: Callable[[Any, jax.Array], Any], batch: Batch, key: jax.Array,
                  lead_dims: int = 1) -> Batch:
    """Applies the per-example ``augment(example, key)`` to every example of ``batch``, whose
    examples lie over ``lead_dims`` leading axes (``[B]``, or ``[accum, micro]`` in the step).
    Example ``i`` in row-major order gets ``split(key, B)[i]``, so the result depends only on
    ``key`` and the example's global position, not on the accumulation layout."""
    shape = jax.tree.leaves(batch)[0].shape[:lead_dims]
    keys = jax.random.split(key, math.prod(shape)).reshape(shape)
    fn = augment
    for _ in range(lead_dims):
        fn = jax.vmap(fn)
    return fn(batch, keys)


# -- the trainer --------------------------------------------------------------------------
def forward_with_aux_loss(model: nnx.Module, *args, **kwargs) -> tuple[jax.Array, jax.Array | None]:
    """Generic auxiliary-loss hook: ``(model(*args, **kwargs), aux)``. A model whose ``aux_loss_weight``
    is not None is run under ``nnx.capture(model, nnx.Intermediate)`` and ``aux`` is that weight times the
    mean of every value it sowed under the name ``aux_loss`` (MoH's per-layer load-balance losses, a
    mixture-of-experts GPT's); other models are called as is and ``aux`` is None."""
    weight = getattr(model, "aux_loss_weight", None)
    if weight is None:
        return model(*args, **kwargs), None
    out, inter = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
    vals = [v for path, var in nnx.to_flat_state(inter) if path[-1] == "aux_loss" for v in var.get_value()]
    if not vals:
        return out, None
    return out, weight * sum(jnp.asarray(v, jnp.float32) for v in vals) / len(vals)


class Trainer:
    """Holds ``(model, optimizer)`` state as one pytree, replicated (or, ``shard_state``, split) over a
    ``[data, seq]`` mesh of ``devices``, and jitted train/eval steps with the batch sharded over ``data``.

    ``seq_parallel`` devices share each sequence (``seq`` axis; the model must have
    ``enable_sequence_parallel``, e.g. TNL, which gets ``seq_parallel_args`` too, e.g. GPT's ring
    ``layout``); the other factor of the device count is ``data``.
    ``batch_size`` is the global batch of one optimizer step (all devices, all micro-batches); it
    must be divisible by ``grad_accum * len(devices) / seq_parallel``. Gradients (and the loss and
    metrics) are averaged over the ``grad_accum`` micro-batches.

    ``save_frozen=False``: checkpoints leave out the model parameters that ``wrt`` does not train (a
    LoRA run's frozen base weights, which its model factory rebuilds), so they hold only what changes.

    ``shard_state`` (FSDP / ZeRO-3): each parameter and optimizer-state array of at least
    ``fsdp_min_size`` elements is split over the ``data`` devices along its largest divisible axis, so
    a device holds about ``1/data`` of the state; XLA gathers each weight where it is used and
    reduce-scatters its gradient. The steps are the same as replicated ones.

    ``expert_parallel``: mixtures of experts (:mod:`jaxattn.models.moe_parallel`) keep ``experts / data``
    experts per device, with their optimizer state, and send the tokens to them (dropless: the same
    steps).

    To change how gradients are computed (e.g. routed gradients for gate parameters), subclass and
    override :meth:`grads`.
    """

    fsdp_min_size = 1024  # smaller arrays (norm weights, biases, slopes) stay replicated

    def __init__(self, model_factory: Callable[[nnx.Rngs], nnx.Module],
                 optimizer: optax.GradientTransformation | Callable[[nnx.Module], optax.GradientTransformation],
                 loss_fn: LossFn, *, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 augment: Callable[[Any, jax.Array], Any] | None = None,
                 eval_fn: Callable[[nnx.Module, Batch], Any] | None = None,
                 devices: Sequence[Any] | None = None, wrt: Any = nnx.Param, seq_parallel: int = 1,
                 shard_state: bool = False, seq_parallel_args: dict[str, Any] | None = None,
                 save_frozen: bool = True, expert_parallel: bool = False):
        devices = list(devices or jax.local_devices())
        if seq_parallel < 1 or len(devices) % seq_parallel:
            raise ValueError(f"--seq-parallel {seq_parallel} must divide the {len(devices)} devices")
        n_data = len(devices) // seq_parallel
        if grad_accum < 1 or batch_size < 1 or batch_size % (grad_accum * n_data):
            raise ValueError(f"--batch-size {batch_size} must be divisible by --grad-accum "
                             f"{grad_accum} x {n_data} data-parallel devices")
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.loss_fn, self.augment, self.wrt = loss_fn, augment, wrt
        self.eval_fn = eval_fn or self._default_eval
        # [data, seq] mesh: the batch is split over "data"; with seq_parallel > 1 the model's
        # sequence-parallel layers split the sequence over "seq" (the rest is partitioned by XLA).
        self.mesh = Mesh(np.array(devices).reshape(n_data, seq_parallel), ("data", "seq"))
        self.n_devices = n_data
        model = model_factory(nnx.Rngs(seed))
        if seq_parallel > 1:
            if not hasattr(model, "enable_sequence_parallel"):
                raise ValueError(f"--seq-parallel needs a model with sequence-parallel attention (TNL); "
                                 f"{type(model).__name__} has none")
            model.enable_sequence_parallel(self.mesh, "seq", batch_axis="data", **(seq_parallel_args or {}))
        tx = optimizer if isinstance(optimizer, optax.GradientTransformation) else optimizer(model)
        opt = nnx.Optimizer(model, tx, wrt=wrt)
        self.graphdef, state = nnx.split((model, opt))
        # the model's parameters this optimizer does not train; save_frozen=False leaves them out of the
        # checkpoints (the factory rebuilds them: LoRA's base weights from their folder or the seed)
        self.save_frozen = save_frozen
        frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(wrt)))
        self._frozen_paths = frozenset((jax.tree_util.DictKey(0), *p)
                                       for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0])
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(None, "data"))  # [accum, micro, ...]
        self.eval_sharding = NamedSharding(self.mesh, P("data"))
        self.shard_state = shard_state
        self.expert_parallel = expert_parallel
        self.has_ema = isinstance(opt.opt_state, EmaState)  # (with_ema): the EMA weights can be evaluated
        self._set_state(state)
        self._eval = jax.jit(self._eval_step)
        self._eval_ema = jax.jit(lambda state, batch: self._eval_step(state, batch, ema=True))

    def _set_state(self, state: Any) -> None:
        """Places ``state`` (replicated, or split with ``shard_state``) and jits the step for its layout
        (subclasses that add to the state call this again)."""
        self.state_sharding = jax.tree_util.tree_map_with_path(self._sharding, state)
        self.state = jax.device_put(state, self.state_sharding)
        self._train = jax.jit(self._train_step, donate_argnums=0, out_shardings=(self.state_sharding, self.replicated))

    def _sharding(self, path: tuple, x: Any) -> NamedSharding:
        """A state array's placement: a mixture of experts' expert weights split by expert over ``data``
        with ``expert_parallel``; else FSDP's split with ``shard_state``, or replicated."""
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
        if (self.expert_parallel and names and names[-1] in EXPERT_VARIABLES and not _is_key(x) and x.ndim >= 1
                and x.shape[0] % self.n_devices == 0):
            return NamedSharding(self.mesh, P("data"))
        return self._fsdp_sharding(x) if self.shard_state else self.replicated

    def _fsdp_sharding(self, x: Any) -> NamedSharding:
        """``x`` split over ``data`` along its largest axis that the data devices divide, else replicated."""
        n = self.n_devices
        if n == 1 or _is_key(x) or x.ndim == 0 or x.size < self.fsdp_min_size:
            return self.replicated
        for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
            if x.shape[axis] % n == 0:
                return NamedSharding(self.mesh, P(*[("data" if a == axis else None) for a in range(x.ndim)]))
        return self.replicated

    # -- views of the state ----------------------------------------------------------------
    @property
    def model(self) -> nnx.Module:
        """The model: a fresh object over the current state's arrays (its own Variables, so calling
        it in train mode does not touch the trainer's BatchNorm statistics)."""
        return nnx.merge(self.graphdef, self.state, copy=True)[0]

    @property
    def eval_model(self) -> nnx.Module:
        """The model in eval mode (``deterministic=True``, ``use_running_average=True``)."""
        m = self.model
        m.eval()
        return m

    @property
    def ema_model(self) -> nnx.Module:
        """The model in eval mode with the parameters' moving averages (an optimizer built with
        :func:`with_ema`); other variables (BatchNorm statistics) are the current ones."""
        if not self.has_ema:
            raise ValueError("this trainer keeps no parameter EMA (build its optimizer with loop.with_ema)")
        merged = nnx.merge(self.graphdef, self.state, copy=True)
        _use_ema(merged[0], merged[1])
        merged[0].eval()
        return merged[0]

    @property
    def step_count(self) -> int:
        return int(nnx.merge(self.graphdef, self.state, copy=True)[1].step[...])

    # -- the step ---------------------------------------------------------------------------
    def grads(self, graphdef, params, rest, micro: Batch, key: jax.Array):
        """``((loss, (metrics, new_rest)), grads)`` for one micro-batch; ``graphdef/params/rest``
        is the split ``(model in train mode, wrt, ...)``. Override to route gradients."""

        def loss_of(p, r):
            model = nnx.merge(graphdef, p, r, copy=True)  # fresh Variables at this trace level
            out = self.loss_fn(model, micro, key)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            return loss.astype(jnp.float32), (metrics, nnx.split(model, self.wrt, ...)[2])

        return jax.value_and_grad(loss_of, has_aux=True)(params, rest)

    def _parallel(self) -> contextlib.AbstractContextManager:
        """The context the steps are traced in: the kernels per device on its batch shard, and with
        ``expert_parallel`` the experts split over the devices (tokens sent to them)."""
        stack = contextlib.ExitStack()
        stack.enter_context(batch_parallel(self.mesh, "data"))
        if self.expert_parallel:
            stack.enter_context(expert_parallel(self.mesh, "data"))
        return stack

    def _train_step(self, state, batch):
        with self._parallel():
            return self._train_step_body(state, batch)

    def _train_step_body(self, state, batch):
        model, optimizer = nnx.merge(self.graphdef, state)
        model.train()
        gdef, params, rest = nnx.split(model, self.wrt, ...)
        aug_key, loss_key = step_keys(self.seed, optimizer.step[...])
        if self.augment is not None:
            batch = apply_augment(self.augment, batch, aug_key, lead_dims=2)
        n = self.grad_accum

        def micro_step(carry, xs):
            grads_sum, rest = carry
            micro, i = xs
            (loss, (metrics, rest)), grads = self.grads(gdef, params, rest, micro,
                                                         jax.random.fold_in(loss_key, i))
            return (jax.tree.map(jnp.add, grads_sum, grads), rest), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, rest), (losses, metrics) = jax.lax.scan(micro_step, (zeros, rest), (batch, jnp.arange(n)))
        grads = jax.tree.map(lambda g: g / n, grads)
        nnx.update(model, rest)
        optimizer.update(model, grads)
        out = {"loss": losses.sum() / n, **{k: jnp.mean(v.astype(jnp.float32), 0) for k, v in metrics.items()}}
        return nnx.state((model, optimizer)), out

    def _default_eval(self, model, batch):
        out = self.loss_fn(model, batch, jax.random.key(0))
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return {"loss": loss, **metrics}

    def _eval_step(self, state, batch, ema: bool = False):
        merged = nnx.merge(self.graphdef, state)
        model = merged[0]
        if ema:
            _use_ema(model, merged[1])
        model.eval()
        with self._parallel():
            return self.eval_fn(model, batch)

    def train_step(self, batch: Batch) -> dict[str, jax.Array]:
        """One optimizer step on a global batch; returns ``{"loss": ..., **metrics}`` (device arrays,
        averaged over micro-batches) without waiting for them."""
        a = self.grad_accum
        batch = jax.tree.map(lambda x: np.asarray(x).reshape(a, x.shape[0] // a, *x.shape[1:]), batch)
        batch = jax.device_put(batch, self.batch_sharding)
        self.state, out = self._train(self.state, batch)
        return out

    def step(self, batch: Batch) -> jax.Array:
        """:meth:`train_step`'s loss."""
        return self.train_step(batch)["loss"]

    def eval_step(self, batch: Batch, *, ema: bool = False) -> Any:
        """``eval_fn(model in eval mode, batch)`` (jitted; with ``ema`` on the parameters' moving averages);
        the batch is sharded over devices when its size divides evenly, else replicated."""
        if ema and not self.has_ema:
            raise ValueError("eval_step(ema=True): this trainer keeps no parameter EMA")
        n = jax.tree.leaves(batch)[0].shape[0]
        batch = jax.device_put(batch, self.eval_sharding if n % self.n_devices == 0 else self.replicated)
        return (self._eval_ema if ema else self._eval)(self.state, batch)

    # -- checkpoints: the state's leaves in order -----------------------------------------
    def save(self, manager, step: int) -> None:
        """Writes the state's leaves (keyed by their index) at ``step``; without ``save_frozen``, not
        the frozen parameters (a LoRA run's checkpoint holds its adapters and their optimizer state)."""
        import orbax.checkpoint as ocp

        flat = jax.tree_util.tree_flatten_with_path(self.state)[0]
        leaves = {str(i): _to_host(x) for i, (path, x) in enumerate(flat)
                  if self.save_frozen or path not in self._frozen_paths}
        manager.save(step, args=ocp.args.StandardSave(leaves))

    def restore(self, manager, step: int) -> None:
        """Reads the checkpoint at ``step`` into the state. A checkpoint may leave out frozen parameters
        (``save_frozen=False``): those keep the values the model factory built. Anything else missing, or
        extra, is a checkpoint of another model or configuration: ``ValueError``."""
        import orbax.checkpoint as ocp

        flat, treedef = jax.tree_util.tree_flatten_with_path(self.state)
        keys = [str(i) for i in range(len(flat))]
        meta = manager.item_metadata(step)  # (None from a manager without a handler: take every leaf as saved)
        saved = set(meta.keys()) if meta is not None else set(keys)
        lost = [path for key, (path, _) in zip(keys, flat) if key not in saved and path not in self._frozen_paths]
        if lost or saved - set(keys):
            what = (f"lacks {len(lost)} trained arrays (e.g. {jax.tree_util.keystr(lost[0])})" if lost
                    else f"holds {len(saved - set(keys))} arrays more than this model's state")
            raise ValueError(f"checkpoint step {step} in {manager.directory} {what}: it was written by another model "
                             f"or configuration")
        target = {key: _to_host(x) for key, (_, x) in zip(keys, flat) if key in saved}
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        leaves = [_from_host(x, restored[key]) if key in saved else x for key, (_, x) in zip(keys, flat)]
        self.state = jax.device_put(jax.tree.unflatten(treedef, leaves), self.state_sharding)


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_host(x: jax.Array) -> np.ndarray:
    """A state leaf as a NumPy array for Orbax (typed PRNG keys, e.g. dropout streams, as their data)."""
    return np.asarray(jax.random.key_data(x) if _is_key(x) else x)


def _from_host(like: jax.Array, x: Any) -> jax.Array:
    """Inverse of :func:`_to_host` for a leaf shaped like ``like``."""
    if _is_key(like):
        return jax.random.wrap_key_data(jnp.asarray(x), impl=jax.random.key_impl(like))
    return jnp.asarray(x)


def _config_changes(out: Path, config: dict | None) -> list[str]:
    """``key old -> new`` for the settings that differ from the run's saved ``config.json``."""
    path = out / "config.json"
    if config is None or not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    new = json.loads(json.dumps(config, default=str))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _set_aside_earlier_run(out: Path) -> Path:
    """Moves an earlier run's checkpoints, metrics and config in ``out`` to ``out/previous-<time>``
    (a fresh run would otherwise leave its checkpoints beside the old run's, whose later steps Orbax
    keeps as the latest, and drop its own)."""
    dest = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest, n = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}", n + 1
    dest.mkdir()
    for name in ("checkpoints", "metrics.csv", "config.json"):
        if (out / name).exists():
            (out / name).rename(dest / name)
    return dest


def checkpoint_manager(out_dir: Path, max_to_keep: int = 3):
    """Orbax manager for ``out_dir/checkpoints``."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager((Path(out_dir) / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
                                 item_handlers=ocp.StandardCheckpointHandler())  # (item_metadata: the saved keys)


# -- the driver ----------------------------------------------------------------------------
def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def fit(trainer: Trainer, batch_fn: Callable[[int], Batch], *, steps: int, out_dir: str | Path,
        resume: bool = False, evaluate: Callable[[int], dict[str, float]] | None = None,
        eval_every: int = 0, ckpt_every: int = 100, log_every: int = 10,
        lr_schedule: optax.Schedule | None = None,
        throughput: tuple[str, Callable[[Batch], int]] | None = None,
        config: dict | None = None, plot: str | None = "loss.png", plot_title: str = "",
        plot_metrics: Sequence[str] = (), fields: Sequence[str] = (), desc: str = "train",
        stop_after: int | None = None, progress: bool = True) -> dict:
    """Trains ``trainer`` to ``steps`` on ``batch_fn(step)`` (a pure function of the step), or
    resumes from the latest checkpoint in ``out_dir/checkpoints`` with ``resume``.

    Every ``log_every`` steps logs the step's outputs (``loss``, other metrics as ``train_<name>``,
    ``lr`` from ``lr_schedule``, the ``throughput`` rate); ``evaluate(step) -> {name: value}`` runs at
    step 0 (fresh runs), every ``eval_every`` steps and at the end, its values logged as they are
    named. Rows go to ``out_dir/metrics.csv`` (truncated to the restored step on resume). Checkpoints
    every ``ckpt_every`` steps and at the end; ``config`` is written to ``out_dir/config.json``; the
    curves to ``out_dir/<plot>`` (loss panel + a panel of ``plot_metrics``).

    ``stop_after`` returns right after that step without a final checkpoint, as a kill would (tests).
    Returns ``{"out", "trainer", "final_loss", "history": [(step, eval_metrics)], "start"}`` or,
    when stopped, ``{"stopped_at", "trainer"}``.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manager = checkpoint_manager(out)
    earlier = manager.latest_step()
    if earlier is not None and not resume:  # else Orbax would keep the old run's later steps as the "latest"
        manager.close()
        moved = _set_aside_earlier_run(out)
        print(f"a fresh run in {out}: moved the earlier run there (checkpoints up to step {earlier}, metrics, "
              f"config) to {moved}; pass --resume to continue a run instead")
        manager = checkpoint_manager(out)
    start = 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        changed = _config_changes(out, config)
        try:
            trainer.restore(manager, start)
        except Exception as e:  # another model's checkpoint: Orbax's own error names no cause
            why = f"changed: {', '.join(changed)}" if changed else f"Orbax: {str(e).splitlines()[0][:300]}"
            raise ValueError(f"--resume: the checkpoint at step {start} in {out / 'checkpoints'} does not fit this "
                             f"model ({why})") from e
        print(f"resumed from step {start} in {out / 'checkpoints'}")
        if changed:
            print(f"--resume with a changed config ({', '.join(changed)}): the run does not reproduce an "
                  "uninterrupted one")
    elif resume:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    log = MetricsLog(out, resume_step=start if start else None, fields=fields or None)
    rate_name, count = throughput or (None, None)

    history: list[tuple[int, dict[str, float]]] = []
    last_loss = math.nan
    t0, seen = time.perf_counter(), 0
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc=desc, unit="step")
    if start == 0 and eval_every and evaluate is not None:
        ev = evaluate(0)
        history.append((0, ev))
        log.log(step=0, **ev)
    for step in bar:
        batch = batch_fn(step)
        outs = trainer.train_step(batch)
        if count is not None:
            seen += count(batch)
        done = step + 1
        row: dict[str, Any] = {}
        if done % log_every == 0 or done == steps:
            vals = {k: float(v) for k, v in jax.device_get(outs).items()}
            last_loss = vals.pop("loss")
            row.update(step=done, loss=last_loss, **{f"train_{k}": v for k, v in vals.items()})
            post = {"loss": f"{last_loss:.3f}"}
            if lr_schedule is not None:
                row["lr"] = float(lr_schedule(step))
            if rate_name:
                row[rate_name] = seen / (time.perf_counter() - t0)
                post[rate_name.split("_")[0]] = f"{row[rate_name]:,.0f}/s"
            bar.set_postfix(post)
        if evaluate is not None and eval_every and (done % eval_every == 0 or done == steps):
            ev = evaluate(done)
            history.append((done, ev))
            row.update(step=done, **ev)
            bar.write(f"step {done}: {_fmt(ev)}")
        if row:
            log.log(**row)
        if done % ckpt_every == 0 and done != steps:
            trainer.save(manager, done)
        if stop_after is not None and done >= stop_after:
            manager.wait_until_finished()
            return {"stopped_at": done, "trainer": trainer}
    bar.close()
    if manager.latest_step() != steps:
        trainer.save(manager, steps)
    manager.wait_until_finished()
    if plot:
        plot_curves(log.path, out / plot, title=plot_title, metrics=plot_metrics)
    return {"out": str(out), "trainer": trainer, "final_loss": last_loss, "history": history,
            "start": start, "metrics_csv": str(log.path)}


# -- command lines from config dataclasses --------------------------------------------------
def _field_type(hint) -> tuple[type, bool]:
    """``(base type, optional)`` of a type hint such as ``int``, ``str | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return hint, False


def parse_model_args(text: str | None, config: Any, *, reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """``--model-args "layer_types=power,full window=1024"``: whitespace-separated ``key=value`` items
    naming fields of the model ``config`` (a dataclass), typed by its field types (tuples comma-separated,
    ``none`` for an optional field). ``reserved``: fields set by another flag (field -> flag)."""
    if not text:
        return {}
    hints, reserved = typing.get_type_hints(type(config)), reserved or {}
    names = [f.name for f in dataclasses.fields(config)]
    out: dict[str, Any] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-args: expected key=value items, got {item!r}")
        if key not in names:
            raise ValueError(f"--model-args: {type(config).__name__} has no field {key!r}; its fields: {names}")
        if key in reserved:
            raise ValueError(f"--model-args: {key} is set by {reserved[key]}")
        out[key] = _parse_field(key, value, hints[key], getattr(config, key))
    return out


def _parse_field(key: str, text: str, hint: Any, current: Any) -> Any:
    typ, optional = _field_type(hint)
    if optional and text.lower() == "none":
        return None
    try:
        if typ is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes")
        if typing.get_origin(typ) is tuple or isinstance(current, tuple):
            args = [a for a in typing.get_args(typ) if a is not Ellipsis]
            elem = args[0] if args and args[0] in (int, float, str) else str
            return tuple(elem(x) for x in text.split(",") if x)
        if typing.get_origin(typ) is typing.Literal:
            if text not in typing.get_args(typ):
                raise ValueError(f"expected one of {list(typing.get_args(typ))}")
            return text
        return typ(text) if typ in (int, float, str) else text
    except ValueError as e:
        raise ValueError(f"--model-args {key}={text}: {e}") from None


def lora_target_names(targets: str | None) -> tuple[str, ...] | None:
    """``--lora-targets`` (comma-separated layer names) as a tuple; None stays None (every linear layer)."""
    if targets is None:
        return None
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names:
        raise ValueError(f"--lora-targets must name layers such as q,kv,o, got {targets!r}")
    return names


def check_lora(rank: int, alpha: float | None, targets: str | None) -> None:
    """``--lora-rank / --lora-alpha / --lora-targets`` checked together (a ValueError naming the flag)."""
    if rank < 0 or alpha is not None and not alpha > 0:
        raise ValueError(f"--lora-rank must be >= 0 and --lora-alpha positive, got {rank}, {alpha}")
    if not rank and (alpha is not None or targets is not None):
        raise ValueError("--lora-alpha and --lora-targets need --lora-rank")
    lora_target_names(targets)


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = (),
                    help: dict[str, str] | None = None, choices: dict[str, Sequence[str]] | None = None) -> None:
    """One ``--flag-name`` per field of the dataclass ``cls`` with its default and type (``int``,
    ``float``, ``str``, their ``| None`` forms, ``bool`` as ``--x/--no-x``)."""
    hints = typing.get_type_hints(cls)
    default = cls()
    help, choices = help or {}, choices or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ, _ = _field_type(hints[f.name])
        kw: dict[str, Any] = dict(default=getattr(default, f.name), help=help.get(f.name, "default: %(default)s"))
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ if typ in (int, float, str) else str
            if f.name in choices:
                kw["choices"] = list(choices[f.name])
        parser.add_argument(flag, **kw)


def config_from_args(cls: type, args: dict[str, Any]):
    """Builds ``cls`` from the parsed arguments that name its fields (others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in args.items() if k in names})


def check_positive(parser: argparse.ArgumentParser, cfg, names: Iterable[str], minimum: int = 1) -> None:
    """``parser.error`` unless each named field of ``cfg`` is ``>= minimum``."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")
