"""LoRA (Hu et al., 2021): low-rank adapters on a model's linear layers, for fine-tuning large pretrained
models with a small trainable state.

``add_lora(model, rank, alpha)`` wraps each chosen ``nnx.Linear`` as ``y = base(x) + (x A) B * alpha / rank``
with ``A [in, rank]`` (normal, std ``1 / sqrt(in)``) and ``B [rank, out]`` (zeros: the model starts unchanged)
held as ``nnx.LoRAParam``; a trainer built with ``wrt=nnx.LoRAParam`` then updates only them (``python -m
jaxattn.train lm --lora-rank 8``). ``merge_lora`` folds them back into plain ``nnx.Linear`` kernels
(``W + A B alpha / rank``), as exports do."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LoRALinear", "add_lora", "merge_lora", "merged", "has_lora", "lora_linears"]


class LoRALinear(nnx.Module):
    """``base(x) + (x @ lora_a) @ lora_b * scale``; ``base`` is the original ``nnx.Linear``."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        din, dout = base.kernel.shape
        if not 0 < rank <= min(din, dout):
            raise ValueError(f"lora rank must be in 1..{min(din, dout)} for a {din} -> {dout} layer, got {rank}")
        self.base = base
        self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (din, rank), jnp.float32) / din ** 0.5)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout), jnp.float32))
        self.rank, self.scale = rank, alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        delta = (x.astype(y.dtype) @ self.lora_a[...].astype(y.dtype)) @ self.lora_b[...].astype(y.dtype)
        return y + delta * jnp.asarray(self.scale, y.dtype)

    def merged_kernel(self) -> jax.Array:
        """``W + A B scale`` in the base kernel's dtype (computed in fp32)."""
        w = self.base.kernel[...]
        return (w.astype(jnp.float32) + self.lora_a[...] @ self.lora_b[...] * self.scale).astype(w.dtype)


def _modules(model: nnx.Module):
    it = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    return list(it)


def _parent(model: nnx.Module, path: tuple) -> object:
    node = model
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _set(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
    parent, last = _parent(model, path), path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def lora_linears(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
    """``(path, module)`` of each :class:`LoRALinear` in ``model``."""
    return [(tuple(p), m) for p, m in _modules(model) if isinstance(m, LoRALinear)]


def has_lora(model: nnx.Module) -> bool:
    return bool(lora_linears(model))


def add_lora(model: nnx.Module, rank: int, alpha: float | None = None, *, targets: Iterable[str] | None = None,
             rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Wraps ``model``'s linear layers in place (and returns it): those whose attribute name is in
    ``targets`` (GPT: ``q``, ``kv``, ``o``, ``gate_up``, ``down``; ViT: ``qkv``, ``proj``, ``fc1``, ``fc2``), or
    with ``targets=None`` every ``nnx.Linear`` except an output ``head``. ``alpha`` defaults to ``2 * rank``.
    A target name that matches no linear layer raises ``ValueError``."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    alpha = float(2 * rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"lora alpha must be positive, got {alpha}")
    wanted = None if targets is None else set(targets)
    if wanted is not None and not wanted:
        raise ValueError("lora targets: give at least one layer name (or None: every linear layer)")
    rngs = rngs or nnx.Rngs(0)
    found, chosen = set(), []
    for path, module in _modules(model):
        path = tuple(path)
        if path and isinstance(module, LoRALinear) and wanted is not None and path[-1] in wanted:
            found.add(path[-1])  # (already adapted: left as it is)
        if not path or type(module) is not nnx.Linear or isinstance(_parent(model, path), LoRALinear):
            continue
        name = path[-1]
        if (name in wanted) if wanted is not None else name not in ("head", "lm_head", "classifier"):
            chosen.append(path)
            found.add(name)
    missing = (wanted or set()) - found
    if missing or not (chosen or found):
        names = sorted({str(tuple(p)[-1]) for p, m in _modules(model)
                        if isinstance(m, (nnx.Linear, LoRALinear)) and tuple(p) and tuple(p)[-1] != "base"})
        raise ValueError(f"lora targets {sorted(missing) or sorted(wanted or [])} name no linear layer of "
                         f"{type(model).__name__} (its linear layers: {names})")
    for path in chosen:
        base = _parent(model, path)[path[-1]] if isinstance(path[-1], int) else getattr(_parent(model, path), path[-1])
        _set(model, path, LoRALinear(base, rank, alpha, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every :class:`LoRALinear` into its base ``nnx.Linear`` (kernel ``W + A B scale``), in place;
    returns ``model``."""
    for path, module in lora_linears(model):
        base = module.base
        base.kernel[...] = module.merged_kernel()
        _set(model, path, base)
    return model


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with its LoRA adapters folded in (``model`` itself when it has none)."""
    return merge_lora(nnx.clone(model)) if has_lora(model) else model
