"""LoRA (Hu et al., 2021): low-rank adapters on a model's linear layers, for fine-tuning large pretrained
models with a small trainable state.

``add_lora(model, rank, alpha)`` wraps each chosen ``nnx.Linear`` as ``y = base(x) + (x A) B * alpha / rank``
with ``A [in, rank]`` (normal, std ``1 / sqrt(in)``) and ``B [rank, out]`` (zeros: the model starts unchanged)
held as ``nnx.LoRAParam``; a trainer built with ``wrt=nnx.LoRAParam`` then updates only them (``python -m
jaxattn.train lm --lora-rank 8``). ``merge_lora`` folds them back into plain ``nnx.Linear`` kernels
(``W + A B alpha / rank``), as exports do. ``merge_peft_adapter`` folds a PEFT LoRA adapter folder into a
Hugging Face state_dict (``hf.load_pretrained(folder, adapter=...)``, ``generate --adapter``)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["LoRALinear", "add_lora", "merge_lora", "merged", "has_lora", "lora_linears", "module_at", "read_peft_adapter",
           "merge_peft_adapter", "save_peft_adapter", "peft_adapter"]


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
        """``W + A B scale`` in fp32 (or the base kernel's dtype when wider): a bf16-stored base is not
        rounded again."""
        w = self.base.kernel[...]
        dt = jnp.promote_types(w.dtype, jnp.float32)
        return w.astype(dt) + (self.lora_a[...] @ self.lora_b[...] * self.scale).astype(dt)


def _modules(model: nnx.Module):
    it = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    return list(it)


def module_at(model: nnx.Module, path: tuple) -> object:
    """The node at ``path`` (attribute names and list indices, as ``nnx.iter_modules`` gives them)."""
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _set(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
    parent, last = module_at(model, path[:-1]), path[-1]
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
    ``targets`` (GPT: ``q``, ``kv``, ``o``, ``gate_up`` (``up`` in a GPT-2-style plain MLP), ``down``; ViT: ``qkv``, ``proj``, ``fc1``, ``fc2``), or
    with ``targets=None`` every ``nnx.Linear`` outside an output ``head``. ``alpha`` defaults to ``2 * rank``.
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
        if not path or type(module) is not nnx.Linear or isinstance(module_at(model, path[:-1]), LoRALinear):
            continue
        name = path[-1]
        if (name in wanted) if wanted is not None else not {"head", "lm_head", "classifier"} & set(path):
            chosen.append(path)
            found.add(name)
    missing = (wanted or set()) - found
    if missing or not (chosen or found):
        names = sorted({str(tuple(p)[-1]) for p, m in _modules(model)
                        if isinstance(m, (nnx.Linear, LoRALinear)) and tuple(p) and tuple(p)[-1] != "base"})
        raise ValueError(f"lora targets {sorted(missing) or sorted(wanted or [])} name no linear layer of "
                         f"{type(model).__name__} (its linear layers: {names})")
    for path in chosen:
        _set(model, path, LoRALinear(module_at(model, path), rank, alpha, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every :class:`LoRALinear` into its base ``nnx.Linear`` (kernel ``W + A B scale``), in place;
    returns ``model``."""
    for path, module in lora_linears(model):
        base, kernel = module.base, module.merged_kernel()
        # (replaced, not written into: a bf16 kernel would round the sum back to bf16)
        if hasattr(base.kernel, "set_value"):
            base.kernel.set_value(kernel)
        else:
            base.kernel.value = kernel
        _set(model, path, base)
    return model


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with its LoRA adapters folded in (``model`` itself when it has none)."""
    return merge_lora(nnx.clone(model)) if has_lora(model) else model


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A PEFT LoRA adapter folder: ``(adapter_config.json, tensors)`` (``adapter_model.safetensors``, or
    ``adapter_model.bin`` with torch)."""
    from jaxattn.models.safetensors_io import read_state_dict

    folder = Path(folder)
    conf = folder / "adapter_config.json"
    if not conf.is_file():
        raise ValueError(f"adapter {folder}: no adapter_config.json (expected a PEFT LoRA adapter folder)")
    files = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not files:
        raise ValueError(f"adapter {folder}: no adapter_model.safetensors (or .bin)")
    return json.loads(conf.read_text()), read_state_dict(files[0])


def peft_adapter(model: nnx.Module, raw: Mapping[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """A LoRA-adapted GPT's adapters as PEFT LoRA tensors on the Hugging Face module names of ``raw`` (the
    base folder's ``config.json``; default: the model's own export config), and each module's rank.

    The converter's export map (splits, concatenations, head permutations and transposes of the output
    rows) is applied to the ``B`` factors, each in its own slots of a per-layer rank space, so a module
    that fuses several of ours (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``)
    gets ``A`` stacked from theirs and ``B`` block-structured (rank the sum of theirs), and ours that a
    folder splits (``kv`` -> ``k_proj``, ``v_proj``) give each part the shared ``A``: ``W + scale B A``
    is the merged weight exactly."""
    from jaxattn.models.gpt import GPT

    conv = _converter(model)
    raw = dict(raw) if raw is not None else _export_config(model)
    if raw.get("model_type") == "codegen":
        raise ValueError("a PEFT adapter for a CodeGen folder would adapt its qkv_proj, fused per model-parallel "
                         "group: export the whole model (its adapters folded in) instead")
    shape = nnx.eval_shape(lambda: GPT(model.cfg, rngs=nnx.Rngs(0)))
    entries = conv.entries(shape)
    by_var = {id(e.var): e for e in entries}
    layer_of = lambda e: (m.group(1) if (m := re.search(r"layers\.(\d+)\.", e.keys[0])) else None)  # noqa: E731
    groups: dict[Any, list] = {}
    for path, m in lora_linears(model):
        e = by_var.get(id(module_at(shape, path).kernel))
        if e is None or not all(k.endswith(".weight") for k in e.keys):
            raise ValueError(f"a PEFT adapter holds linear layers' weights; this model adapts {'.'.join(map(str, path))}")
        groups.setdefault(layer_of(e), []).append((e, m))
    conv1d = raw.get("model_type") == "gpt2"  # (GPT-2's Conv1D weights are [in, out]: PEFT's fan_in_fan_out)
    tensors, ranks = {}, {}
    for layer, adapted in groups.items():
        rank = sum(m.rank for _, m in adapted)
        # every linear weight of the layer (a fused module needs its partners), zeros where not adapted
        partners = [e for e in entries if layer_of(e) == layer and len(e.var.shape) == 2
                    and all(k.endswith(".weight") for k in e.keys)]
        fake = {"values": {}, "slots": {}}
        for e in partners:
            for kind in fake:
                fake[kind].update(zip(e.keys, e.split(np.zeros((rank, e.var.shape[1]), np.float32))))
        a_rows, at = [], 0  # each rank slot's row of its adapter's A [r, in]
        for e, m in adapted:
            for kind, fill in (("values", np.asarray(m.lora_b[...], np.float32)), ("slots", 1.0)):
                b = np.zeros((rank, e.var.shape[1]), np.float32)  # (split returns views: one array each)
                b[at:at + m.rank] = fill
                fake[kind].update(zip(e.keys, e.split(b)))
            a_rows += list(np.asarray(m.lora_a[...], np.float32).T)
            at += m.rank
        values, slots = (conv.export_state_dict(raw, fake[kind]) for kind in ("values", "slots"))
        for key, value in values.items():
            used = np.asarray(slots[key]).T if conv1d else np.asarray(slots[key])  # [out, rank]
            cols = np.flatnonzero(used.any(axis=0))
            if not len(cols):
                continue
            module = key[: -len(".weight")]
            bm = (np.asarray(value).T if conv1d else np.asarray(value))[:, cols]
            if len({len(a_rows[c]) for c in cols}) != 1:  # (fused layers share their input)
                raise ValueError(f"{module}: adapters of different input widths meet in one module")
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.stack([a_rows[c] for c in cols])
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(bm)
            ranks[module] = len(cols)
    return tensors, ranks


def save_peft_adapter(model: nnx.Module, folder: str | Path, *, base: str | None = None) -> list[str]:
    """Writes a LoRA-adapted GPT's adapters as a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) for the Hugging Face folder ``base`` it was fine-tuned from (PEFT's
    ``PeftModel.from_pretrained`` and ``hf.load_pretrained(base, adapter=folder)`` load it); returns the
    target module names. Any family the converters export: LLaMA-style folders (Phi-3's fused projections
    too) and the classic ones (GPT-2, GPT-NeoX, BLOOM, Falcon, ...); a folder module that fuses several
    adapted layers of ours gets their summed rank (``rank_pattern`` / ``alpha_pattern``, same scale). Needs
    adapters that all share one rank and scale (``add_lora``'s)."""
    from jaxattn.models import hf
    from jaxattn.models.gpt import GPT
    from jaxattn.models.safetensors_io import write_safetensors

    if type(model) is not GPT or not has_lora(model):
        raise ValueError(f"a PEFT adapter is written from a GPT with LoRA adapters, got {type(model).__name__}"
                         + ("" if type(model) is not GPT else " without adapters (train with --lora-rank)"))
    mods = [m for _, m in lora_linears(model)]
    if len({(m.rank, m.scale) for m in mods}) != 1:
        raise ValueError("the adapters have several ranks or scales: one adapter_config cannot hold them")
    raw = hf.raw_config(base) if base is not None and hf.hf_model_type(base) is not None else _export_config(model)
    tensors, ranks = peft_adapter(model, raw)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank, scale = mods[0].rank, mods[0].scale
    other = {module: r for module, r in sorted(ranks.items()) if r != rank}  # (fused modules: their full paths)
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
            "lora_alpha": scale * rank, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": raw.get("model_type") == "gpt2", "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
            "rank_pattern": other, "alpha_pattern": {module: scale * r for module, r in other.items()}}
    (folder / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    return conf["target_modules"]


def _converter(model: nnx.Module):
    from jaxattn.models import gpt_classic_hf, gpt_hf

    return gpt_classic_hf if gpt_classic_hf.is_classic(model.cfg) else gpt_hf


def _export_config(model: nnx.Module) -> dict[str, Any]:
    """The ``config.json`` that ``hf.save_pretrained`` writes for ``model``."""
    return _converter(model).hf_config(model.cfg)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module ``rank_pattern`` / ``alpha_pattern``: the first key that ends the module's path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def merge_peft_adapter(state_dict: Mapping[str, Any], folder: str | Path) -> dict[str, Any]:
    """``state_dict`` (Hugging Face keys) with a PEFT LoRA adapter folded in, as PEFT's ``merge_and_unload``:
    each adapted ``W [out, in]`` becomes ``W + scale B A`` (``scale = lora_alpha / r``, or ``/ sqrt(r)`` with
    ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` per module; ``fan_in_fan_out``: ``W [in, out]``, GPT-2's
    ``Conv1D``, gets ``(B A)^T``), and ``modules_to_save`` replace their weights. DoRA, LoRA biases, embedding
    adapters and other PEFT methods raise ``ValueError``."""
    conf, tensors = read_peft_adapter(folder)
    where = f"adapter {folder}"
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {conf.get('peft_type')!r}: only LORA adapters merge")
    for field, ok in (("use_dora", False), ("bias", "none")):
        if conf.get(field, ok) != ok:
            raise ValueError(f"{where}: {field} = {conf.get(field)!r}: jaxattn merges plain LoRA ({field} {ok!r})")
    out = dict(state_dict)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value, np.float32)
        elif "lora_" in name:
            raise ValueError(f"{where}: {key}: only linear-layer LoRA weights (lora_A / lora_B) merge")
        else:  # modules_to_save: whole weights (a new head, ...)
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            if name not in out:
                raise ValueError(f"{where}: {key} replaces {name}, which the model does not have")
            out[name] = np.asarray(value).astype(np.asarray(out[name]).dtype)
    r0, a0 = int(conf.get("r", 8)), float(conf.get("lora_alpha", 8))
    fan_in_fan_out = bool(conf.get("fan_in_fan_out", False))
    for module, ab in sorted(pairs.items()):
        target = module + ".weight"
        if target not in out and target.partition(".")[2] in out:  # (a folder saved from the base model: gpt2's)
            target = target.partition(".")[2]
        if set(ab) != {"A", "B"} or target not in out:
            raise ValueError(f"{where}: {module}: " + ("needs both lora_A and lora_B" if set(ab) != {"A", "B"} else
                                                         f"the model has no {target}"))
        r = int(_pattern_value(conf.get("rank_pattern") or {}, module, r0))
        alpha = float(_pattern_value(conf.get("alpha_pattern") or {}, module, a0))
        scale = alpha / (math.sqrt(r) if conf.get("use_rslora") else r)
        w = np.asarray(out[target])
        a, b = ab["A"], ab["B"]
        d_out, d_in = w.shape[::-1] if fan_in_fan_out else w.shape
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(f"{where}: {module}: lora_A {a.shape} / lora_B {b.shape} do not fit its weight {w.shape} "
                             f"at rank {r}" + (" (fan_in_fan_out: [in, out])" if fan_in_fan_out else ""))
        delta = b @ a
        out[target] = (w.astype(np.float32) + scale * (delta.T if fan_in_fan_out else delta)).astype(w.dtype)
    return out
