"""TransNormerLLM checkpoints in the Hugging Face layout of the reference code
(``OpenNLPLab/TransNormerLLM-385M`` / ``-1B`` / ``-7B``: ``TransnormerForCausalLM``) <-> :class:`TNL`.

``load_pretrained(folder)`` reads the folder's ``config.json`` and weights (``model.safetensors``,
``pytorch_model.bin`` or their shards; the ``.bin`` pickles need torch) and returns a :class:`TNL` with
those weights; ``save_pretrained(model, folder)`` writes a folder the reference code loads
(``config.json`` + ``model.safetensors``). The per-key conversion is ``load_hf_state_dict`` /
``to_hf_state_dict``:

============================================  ===========================================  =========
reference key                                 jaxattn variable                             layout
============================================  ===========================================  =========
``model.embed_tokens.weight``                 ``embed.embedding``                          same
``model.layers.i.token_mixer.qkvu_proj``      ``blocks.i.mixer.qkvu.kernel``               transposed
``model.layers.i.token_mixer.out_proj``       ``blocks.i.mixer.out_proj.kernel``           transposed
``model.layers.i.token_mixer.lrpe.theta``     ``blocks.i.mixer.lrpe.theta``                ``[H, 1, d]`` -> ``[H, d]``
``model.layers.i.channel_mixer.l1/l2/l3``     ``blocks.i.glu.l1/l2/l3.kernel``             transposed
``lm_head.weight``                            ``head.kernel`` (untied configs only)        transposed
============================================  ===========================================  =========

The norms (SRMSNorm) have no weights, and the decay rates are computed from the config, as in the
reference. ``config.json`` fields map as ``decoder_embed_dim`` -> ``dim``, ``decoder_layers`` -> ``layers``,
``decoder_attention_heads`` -> ``heads``, ``hidden_dim``, ``glu_dim`` (-1: ``dim``), ``linear_use_lrpe_list``
(one flag per layer) -> ``lrpe_layers``, ``no_scale_embedding``, ``tie_word_embeddings`` (Hugging Face's
default: tied). Configs this model cannot represent (biases, LayerNorm, an activation other than SiLU)
raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.models.safetensors_io import read_state_dict, write_safetensors
from jaxattn.models.tnl import TNL, TNLConfig, layer_slopes

__all__ = ["hf_config", "is_tnl_folder", "load_hf_state_dict", "load_pretrained", "read_config", "save_pretrained", "tnl_config_from_hf",
           "to_hf_state_dict"]


def tnl_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TNLConfig:
    """A :class:`TNLConfig` from the reference's ``config.json`` dict; ``overrides`` set jaxattn-only
    fields (``dtype``, ``attn_impl``, ``remat``)."""
    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {hf.get(field)!r}: jaxattn's TNL supports {want} only")

    if hf.get("norm_type", "simplermsnorm") != "simplermsnorm":
        raise bad("norm_type", '"simplermsnorm"')
    if hf.get("linear_act_fun", "silu") not in ("silu", "swish"):
        raise bad("linear_act_fun", '"silu" / "swish"')
    if hf.get("bias", False):
        raise bad("bias", "false (no biases)")
    dim, layers = int(hf.get("decoder_embed_dim", 1024)), int(hf.get("decoder_layers", 24))
    lrpe = list(hf.get("linear_use_lrpe_list") or [])
    if lrpe and len(lrpe) != layers:
        raise ValueError(f"config.json: linear_use_lrpe_list has {len(lrpe)} flags for {layers} decoder_layers")
    if not lrpe and hf.get("linear_use_lrpe"):
        lrpe = [1] * layers  # (the reference's single flag, used when the list is empty)
    hidden = int(hf.get("hidden_dim", 1024))
    glu = int(hf.get("glu_dim", 2816))
    fields = dict(
        vocab_size=int(hf.get("vocab_size", 64000)), dim=dim, layers=layers,
        heads=int(hf.get("decoder_attention_heads", 8)), hidden_dim=None if hidden == dim else hidden,
        glu_dim=dim if glu == -1 else glu, lrpe_layers=tuple(i for i, f in enumerate(lrpe) if f),
        no_scale_embedding=bool(hf.get("no_scale_embedding", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=float(hf.get("init_std", 0.02)))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TNLConfig)})
    if unknown:
        raise ValueError(f"unknown TNLConfig fields {unknown}")
    return TNLConfig(**{**fields, **overrides})


def hf_config(cfg: TNLConfig) -> dict[str, Any]:
    """The reference's ``config.json`` for ``cfg`` (with ``auto_map`` left to the user)."""
    return {
        "architectures": ["TransnormerForCausalLM"], "model_type": "transnormer",
        "vocab_size": cfg.vocab_size, "decoder_embed_dim": cfg.dim, "decoder_layers": cfg.layers,
        "decoder_attention_heads": cfg.heads, "hidden_dim": cfg.width, "glu_dim": cfg.glu_dim,
        "linear_use_lrpe_list": [int(i in cfg.lrpe_layers) for i in range(cfg.layers)],
        "no_scale_embedding": cfg.no_scale_embedding, "tie_word_embeddings": cfg.tie_embeddings,
        "norm_type": "simplermsnorm", "linear_act_fun": "silu", "bias": False, "init_std": cfg.init_std,
    }


def _set(var: nnx.Variable, value: jax.Array) -> None:
    """Replaces a variable's value, also an abstract one (``nnx.eval_shape``); older Flax has no set_value."""
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def _variables(model: TNL) -> Iterator[tuple[str, nnx.Variable, str]]:
    """(reference key, variable, kind) for every weight; kind: ``linear`` (transposed), ``theta``, ``plain``."""
    yield "model.embed_tokens.weight", model.embed.embedding, "plain"
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}."
        mixer = block.mixer
        yield pre + "token_mixer.qkvu_proj.weight", mixer.qkvu.kernel, "linear"
        yield pre + "token_mixer.out_proj.weight", mixer.out_proj.kernel, "linear"
        if mixer.lrpe is not None:
            yield pre + "token_mixer.lrpe.theta", mixer.lrpe.theta, "theta"
        for name in ("l1", "l2", "l3"):
            yield pre + f"channel_mixer.{name}.weight", getattr(block.glu, name).kernel, "linear"
    if model.head is not None:
        yield "lm_head.weight", model.head.kernel, "linear"


def to_hf_state_dict(model: TNL) -> dict[str, np.ndarray]:
    """The model's weights under the reference's keys and layouts (fp32 numpy)."""
    sd = {}
    for key, var, kind in _variables(model):
        a = np.asarray(var[...], np.float32)
        sd[key] = a.T if kind == "linear" else a[:, None, :] if kind == "theta" else a
    return sd


def load_hf_state_dict(model: TNL, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a reference ``state_dict`` (numpy arrays, bf16 included, or anything ``np.asarray``
    takes) into ``model`` in place. ``strict``: every weight present and every key used (a tied
    model ignores ``lm_head.weight``, as the reference does)."""
    used, missing = set(), []
    for key, var, kind in _variables(model):
        if key not in state_dict:
            missing.append(key)
            continue
        a = np.asarray(state_dict[key])
        if kind == "theta" and a.ndim == 3 and a.shape[1] == 1:
            a = a[:, 0, :]
        a = a.T if kind == "linear" else a
        if a.shape != tuple(var.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(np.shape(state_dict[key]))} does not fit the "
                             f"model's {tuple(var.shape)} (config.json and weights disagree?)")
        _set(var, jnp.asarray(a.astype(np.float32), var.dtype))
        used.add(key)
    if model.head is None:
        used.add("lm_head.weight")
    unexpected = sorted(set(state_dict) - used)
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def read_config(folder: str | Path, **overrides: Any) -> TNLConfig:
    """The :class:`TNLConfig` of a reference checkpoint folder's ``config.json``."""
    conf = Path(folder) / "config.json"
    if not conf.is_file():
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face TransNormerLLM folder)")
    return tnl_config_from_hf(json.loads(conf.read_text()), **overrides)


def load_pretrained(folder: str | Path, *, strict: bool = True, **overrides: Any) -> TNL:
    """A :class:`TNL` with the weights of a reference checkpoint folder (``config.json`` and
    ``model.safetensors`` / ``pytorch_model.bin``, sharded or not). ``overrides``: jaxattn-only config
    fields, e.g. ``dtype="bfloat16"``, ``attn_impl="xla"``. Parameters are fp32, as in training."""
    folder = Path(folder)
    cfg = read_config(folder, **overrides)
    model = nnx.eval_shape(lambda: TNL(cfg, rngs=nnx.Rngs(0)))  # no random init of weights to overwrite
    for i, block in enumerate(model.blocks):
        _set(block.mixer.slope, layer_slopes(cfg.heads, i, cfg.layers))
    load_hf_state_dict(model, read_state_dict(folder), strict=strict)
    unset = [key for key, var, _ in _variables(model)
             if isinstance(var.get_value() if hasattr(var, "get_value") else var.value, jax.ShapeDtypeStruct)]
    if unset:
        raise ValueError(f"{folder}: the checkpoint has no {unset[:8]}{'...' if len(unset) > 8 else ''}")
    return model


def is_tnl_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a reference TransNormerLLM ``config.json``."""
    conf = Path(folder) / "config.json"
    if not conf.is_file():
        return False
    try:
        raw = json.loads(conf.read_text())
    except ValueError:
        return False
    return isinstance(raw, dict) and (raw.get("model_type") == "transnormer" or "decoder_embed_dim" in raw)


def save_pretrained(model: TNL, folder: str | Path) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (fp32) in the reference's layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", to_hf_state_dict(model), metadata={"format": "pt"})
