"""Hugging Face checkpoint folders <-> jaxattn models: the shared machinery and the dispatch.

A folder holds ``config.json`` and weights (``model.safetensors``, ``pytorch_model.bin``, or their shards).
``model_type`` picks the converter: ``"transnormer"`` -> :class:`~jaxattn.models.TNL`
(:mod:`jaxattn.models.tnl_hf`); ``"llama"``, ``"qwen2"``, ``"qwen3"``, ``"mistral"``, ``"phi3"``, ``"gemma"``, ``"gemma2"``, ``"gemma3_text"`` -> :class:`~jaxattn.models.GPT`
(:mod:`jaxattn.models.gpt_hf`); ``"deepseek_v2"`` / ``"deepseek_v3"``, ``"minimax"``, ``"qwen3_next"``, ``"qwen3_5_text"`` / ``"qwen3_5"``, ``"kimi_linear"`` -> :class:`~jaxattn.models.GPT`
(:mod:`~jaxattn.models.deepseek_hf`, :mod:`~jaxattn.models.minimax_hf`, :mod:`~jaxattn.models.qwen3_next_hf`,
:mod:`~jaxattn.models.kimi_linear_hf`); ``"gpt2"``, ``"gpt_bigcode"``, ``"opt"``, ``"gpt_neox"``, ``"phi"``, ``"starcoder2"``,
``"bloom"``, ``"falcon"``, ``"gptj"``, ``"codegen"`` -> :class:`~jaxattn.models.GPT` with the classic block
(:mod:`jaxattn.models.gpt_classic_hf`); timm's hub folders (``architecture`` instead of ``model_type``) ->
:class:`~jaxattn.models.ViT` / :class:`~jaxattn.models.HaloNet` (:mod:`jaxattn.models.timm_hub`).
``load_pretrained(folder, **overrides)`` builds the model (without a random initialisation to overwrite)
and copies the weights in; ``overrides`` set jaxattn-only config fields (``dtype``, ``attn_impl``,
``remat``; for GPT also ``layer_types``, ``window``, ``quantized``, ...).

A converter describes each model variable by an :class:`Entry`: the checkpoint keys it comes from and the
two layout maps. The generic code here checks shapes, reports missing and unexpected keys, and writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.safetensors_io import read_state_dict, write_safetensors

__all__ = ["Entry", "entry_shapes", "lm_entries", "hf_model_type", "load_pretrained", "load_state_dict", "load_tokenizer",
           "raw_config", "read_config", "save_pretrained", "to_state_dict", "with_overrides"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model variable: ``keys`` in the checkpoint, ``join(*arrays) -> ours`` and ``split(ours) -> arrays``."""
    keys: tuple[str, ...]
    var: nnx.Variable
    join: Callable[..., np.ndarray]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def linear(key: str, var: nnx.Variable) -> Entry:
    """A ``torch.nn.Linear`` weight ``[out, in]`` <-> an NNX kernel ``[in, out]``."""
    return Entry((key,), var, lambda w: w.T, lambda k: (k.T,))


def conv(key: str, var: nnx.Variable) -> Entry:
    """A PyTorch conv weight OIHW <-> an NNX conv kernel HWIO."""
    return Entry((key,), var, lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))


def same(key: str, var: nnx.Variable) -> Entry:
    return Entry((key,), var, lambda w: w, lambda a: (a,))


def lm_entries(model: Any) -> list[Entry]:
    """A LLaMA-layout causal LM's token embedding, final norm and (untied) output head."""
    out = [same("model.embed_tokens.weight", model.embed.embedding), same("model.norm.weight", model.norm.weight)]
    if model.head is not None:
        out.append(linear("lm_head.weight", model.head.kernel))
    return out


def with_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """``cfg`` (a model config dataclass) with ``overrides`` (jaxattn-only fields such as ``dtype``);
    a ``ValueError`` names fields it does not have."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} fields {unknown}")
    return dataclasses.replace(cfg, **overrides)


def entry_shapes(entries: Iterable[Entry]) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes the entries read and write (works on an abstract model)."""
    out = {}
    for e in entries:
        arrays = e.split(np.broadcast_to(np.float32(0), tuple(e.var.shape)))  # (a view: nothing allocated)
        out.update((k, tuple(a.shape)) for k, a in zip(e.keys, arrays))
    return out


def to_state_dict(entries: Iterable[Entry]) -> dict[str, np.ndarray]:
    """The variables under their checkpoint keys and layouts (fp32 numpy; integer variables such as
    packed MXFP4 weights keep their dtype)."""
    sd = {}
    for e in entries:
        value = np.asarray(e.var[...])
        sd.update(zip(e.keys, e.split(value if np.issubdtype(value.dtype, np.integer) else value.astype(np.float32))))
    return sd


def load_state_dict(entries: Iterable[Entry], state_dict: Mapping[str, Any], *, strict: bool = True,
                    ignore: Callable[[str], bool] = lambda key: False, param_dtype: Any = None) -> None:
    """Copies a checkpoint's arrays (numpy, bf16 included, or anything ``np.asarray`` takes) into the
    variables, in place. ``strict``: every variable present and every key not ``ignore``d used.
    ``param_dtype``: the floating parameters (``nnx.Param``) are stored in it (default: the variable's)."""
    from tqdm import tqdm

    entries = list(entries)
    used, missing = set(), []
    # a bar for large checkpoints (tqdm shows it on a terminal only)
    for e in tqdm(entries, desc="loading weights", unit="tensor", disable=None if len(entries) > 100 else True,
                  leave=False):
        absent = [k for k in e.keys if k not in state_dict]
        if absent:
            missing += absent
            continue
        a = e.join(*(np.asarray(state_dict[k]) for k in e.keys))
        if a.shape != tuple(e.var.shape):
            shapes = ", ".join(f"{k} {tuple(np.shape(state_dict[k]))}" for k in e.keys)
            raise ValueError(f"checkpoint shape {shapes} does not fit the model's {tuple(e.var.shape)} "
                             "(config.json and weights disagree?)")
        dtype = e.var.dtype
        if param_dtype is not None and isinstance(e.var, nnx.Param) and jnp.issubdtype(dtype, jnp.floating):
            dtype = param_dtype
        e.var.set_value(jnp.asarray(a if a.dtype == dtype else a.astype(np.float32), dtype))  # (fills an abstract model too)
        used.update(e.keys)
    unexpected = sorted(k for k in set(state_dict) - used if not ignore(k))
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def _variables(model: nnx.Module) -> list[nnx.Variable]:
    return [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]


def fill_abstract(build: Callable[[], nnx.Module], entries: Callable[[nnx.Module], list[Entry]],
                  state_dict: Mapping[str, Any], *, strict: bool, ignore: Callable[[str], bool],
                  where: str, param_dtype: Any = None) -> nnx.Module:
    """``build()`` traced abstractly (no random weights to overwrite), its entries filled from
    ``state_dict``; the variables without an entry (buffers computed from the config, RNG streams) get
    the values ``build`` gives them, from one jitted ``build`` whose unused weights XLA never computes."""
    model = nnx.eval_shape(build)
    es = entries(model)
    load_state_dict(es, state_dict, strict=strict, ignore=ignore, param_dtype=param_dtype)
    unset = [e.keys[0] for e in es if isinstance(e.var.get_value(), jax.ShapeDtypeStruct)]
    if unset:
        raise ValueError(f"{where}: the checkpoint has no {unset[:8]}{'...' if len(unset) > 8 else ''}")
    covered = {id(e.var) for e in es}
    rest = [i for i, v in enumerate(_variables(model)) if id(v) not in covered]
    if rest:
        wanted = set(rest)
        values = jax.jit(lambda: [v.get_value() for i, v in enumerate(_variables(build())) if i in wanted])()
        variables = _variables(model)
        for i, x in zip(rest, values):
            variables[i].set_value(x)
    return model


# -- folders ------------------------------------------------------------------------------------------------

def _converter(model_type: str):
    """The converter module of a ``model_type`` (each GPT converter's family table names its own)."""
    from jaxattn.models import (deepseek_hf, gpt_classic_hf, gpt_hf, granite_hybrid_hf, kimi_linear_hf, minimax_hf,
                                qwen3_next_hf, timm_hub, tnl_hf)

    converters = {"transnormer": tnl_hf, **dict.fromkeys((*gpt_hf._ARCH, "gemma3"), gpt_hf),
                  "granitemoehybrid": granite_hybrid_hf,
                  **dict.fromkeys(deepseek_hf._ARCH, deepseek_hf), "minimax": minimax_hf,
                  **dict.fromkeys(qwen3_next_hf._ARCH, qwen3_next_hf), "kimi_linear": kimi_linear_hf,
                  **dict.fromkeys(gpt_classic_hf._ARCH, gpt_classic_hf), "timm": timm_hub}
    if model_type not in converters:
        raise ValueError(f"config.json: model_type {model_type!r} is not one jaxattn converts "
                         f"({', '.join(k for k in converters if k != 'timm')}, or a timm folder)")
    return converters[model_type]


def raw_config(folder: str | Path) -> dict:
    """A folder's ``config.json`` as a dict (``model_type`` filled in for TransNormerLLM and timm folders)."""
    conf = Path(folder) / "config.json"
    if not conf.is_file():
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    raw = json.loads(conf.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{conf}: expected a JSON object")
    if "model_type" not in raw and "decoder_embed_dim" in raw:  # TransNormerLLM configs saved without it
        raw["model_type"] = "transnormer"
    if "model_type" not in raw and "architecture" in raw:  # timm's hub layout
        raw["model_type"] = "timm"
    return raw


def hf_model_type(folder: str | Path) -> str | None:
    """The ``model_type`` of a Hugging Face folder that jaxattn converts, else None."""
    try:
        kind = raw_config(folder).get("model_type")
        _converter(kind)
    except (ValueError, OSError):
        return None
    return kind


def read_config(folder: str | Path, **overrides: Any):
    """The jaxattn config (:class:`TNLConfig` / :class:`GPTConfig`) of a folder's ``config.json``."""
    raw = raw_config(folder)
    return _converter(raw.get("model_type")).config_from_hf(raw, **overrides)


def load_pretrained(folder: str | Path, *, strict: bool = True, param_dtype: Any = None,
                    adapter: str | Path | None = None, **overrides: Any) -> nnx.Module:
    """The model of a Hugging Face folder with its weights. Parameters are fp32 (as in training) unless
    ``param_dtype`` (e.g. ``"bfloat16"``: half the memory, for inference with ``dtype="bfloat16"``, whose
    matmuls cast the weights to bf16 anyway); variables the checkpoint does not hold (TNL's decay rates,
    BatchNorm statistics, ...) keep their own dtype. ``adapter``: a PEFT LoRA adapter folder folded into
    the weights first (``jaxattn.models.lora.merge_peft_adapter``)."""
    if param_dtype is not None:
        try:
            param_dtype = jnp.dtype(param_dtype)
        except TypeError:
            param_dtype = None
        if param_dtype is None or not jnp.issubdtype(param_dtype, jnp.floating):
            raise ValueError("param_dtype must be a floating dtype name such as 'bfloat16', 'float16' or 'float32'")
    raw = raw_config(folder)
    conv = _converter(raw.get("model_type"))
    cfg = conv.config_from_hf(raw, **overrides)
    state = read_state_dict(folder)
    if adapter is not None:  # (on the folder's own keys: Phi-3's fused qkv_proj is adapted before it is split)
        from jaxattn.models.lora import merge_peft_adapter

        state = merge_peft_adapter(state, adapter)
    if hasattr(conv, "prepare_state_dict"):  # (a family's own key layout onto the converter's: Phi-3's fused ones)
        state = conv.prepare_state_dict(raw, state)
    return conv.load(cfg, state, strict=strict, where=str(folder), param_dtype=param_dtype)


def save_pretrained(model: nnx.Module, folder: str | Path) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (fp32) that the original code loads (ViT and
    HaloNet: a timm hub folder, ``timm.create_model(architecture, **model_args)`` plus its weights); LoRA
    adapters (``jaxattn.models.lora``) are folded into the weights they adapt."""
    from jaxattn.models import gpt_classic_hf, gpt_hf, timm_hub, tnl_hf
    from jaxattn.models.lora import merged
    from jaxattn.models.gpt import GPT
    from jaxattn.models.halonet import HaloNet
    from jaxattn.models.tnl import TNL
    from jaxattn.models.vit import ViT
    from jaxattn.models.eva import Eva

    if isinstance(model, TNL):
        conv = tnl_hf
    elif type(model) is GPT and "mamba2" in model.cfg.layer_types:  # Mamba-2 layers: Granite 4.0 hybrid's layout
        from jaxattn.models import granite_hybrid_hf as conv
    elif type(model) is GPT and "kda" in model.cfg.layer_types:  # Kimi Delta Attention: Kimi Linear's layout
        from jaxattn.models import kimi_linear_hf as conv
    elif type(model) is GPT and model.cfg.kv_lora_rank:  # multi-head latent attention: DeepSeek's layout
        from jaxattn.models import deepseek_hf as conv
    elif type(model) is GPT and "lightning" in model.cfg.layer_types:  # MiniMax-01's lightning layers
        from jaxattn.models import minimax_hf as conv
    elif type(model) is GPT and ("delta" in model.cfg.layer_types or model.cfg.attn_output_gate):  # Qwen3-Next's
        from jaxattn.models import qwen3_next_hf as conv
    elif type(model) is GPT:
        conv = gpt_classic_hf if gpt_classic_hf.is_classic(model.cfg) else gpt_hf
    elif type(model) in (ViT, Eva, HaloNet):
        conv = timm_hub
    else:
        raise ValueError(f"save_pretrained takes a TNL, GPT, ViT, Eva or HaloNet model, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = merged(model)
    config = conv.hf_config(model.cfg)
    state = to_state_dict(conv.entries(model))
    if hasattr(conv, "export_state_dict"):  # (the converter's key layout onto a family's own: Phi-3's fused ones)
        state = conv.export_state_dict(config, state)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", state, metadata={"format": "pt"})


class Tokenizer:
    """A folder's tokenizer: ``tokenizer.model`` through ``sentencepiece``, or ``tokenizer.json`` through
    ``tokenizers``; ``bos`` (an id or None) is prepended when encoding and dropped when decoding."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], bos: int | None):
        self._encode, self._decode, self.bos = encode, decode, bos

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(([self.bos] if self.bos is not None else []) + list(self._encode(text)), np.int32)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids if int(i) != self.bos])


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has none or its library is not installed."""
    folder = Path(folder)
    raw = raw_config(folder)
    tok_cfg = folder / "tokenizer_config.json"
    extra = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}
    add_bos = extra.get("add_bos_token", raw.get("add_bos_token", False))
    bos = raw.get("bos_token_id") if add_bos else None
    if (folder / "tokenizer.model").is_file():
        try:
            import sentencepiece
        except ImportError:
            return None
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return Tokenizer(sp.encode, sp.decode, bos)
    if (folder / "tokenizer.json").is_file():
        try:
            import tokenizers
        except ImportError:
            return None
        tk = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))

        def encode(text: str) -> list[int]:
            # the file's post-processor adds what the model expects (Llama 3's and Gemma's BOS), as transformers
            # does; add_bos_token still prepends one where the file has no such step
            ids = tk.encode(text).ids
            return ids if bos is None or ids[:1] == [bos] else [bos, *ids]

        return Tokenizer(encode, tk.decode, None)  # (decode skips special tokens)
    return None
