"""TransNormerLLM checkpoints in the Hugging Face layout of the reference code
(``OpenNLPLab/TransNormerLLM-385M`` / ``-1B`` / ``-7B``: ``TransnormerForCausalLM``) <-> :class:`TNL`.

``jaxattn.models.hf.load_pretrained(folder)`` reads such a folder's ``config.json`` and weights
(``model.safetensors``, ``pytorch_model.bin`` or their shards; the ``.bin`` pickles need torch) into a
:class:`TNL`; ``jaxattn.models.hf.save_pretrained(model, folder)`` writes one the reference code loads.
The per-key conversion is ``load_hf_state_dict`` / ``to_hf_state_dict``:

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

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.tnl import TNL, TNLConfig

__all__ = ["config_from_hf", "entries", "hf_config", "load_hf_state_dict", "to_hf_state_dict"]


def config_from_hf(raw: Mapping[str, Any], **overrides: Any) -> TNLConfig:
    """A :class:`TNLConfig` from the reference's ``config.json`` dict; ``overrides`` set jaxattn-only
    fields (``dtype``, ``attn_impl``, ``remat``)."""
    def bad(field: str, want: str) -> ValueError:
        return ValueError(f"config.json: {field} = {raw.get(field)!r}: jaxattn's TNL supports {want} only")

    if raw.get("norm_type", "simplermsnorm") != "simplermsnorm":
        raise bad("norm_type", '"simplermsnorm"')
    if raw.get("linear_act_fun", "silu") not in ("silu", "swish"):
        raise bad("linear_act_fun", '"silu" / "swish"')
    if raw.get("bias", False):
        raise bad("bias", "false (no biases)")
    dim, layers = int(raw.get("decoder_embed_dim", 1024)), int(raw.get("decoder_layers", 24))
    lrpe = list(raw.get("linear_use_lrpe_list") or [])
    if lrpe and len(lrpe) != layers:
        raise ValueError(f"config.json: linear_use_lrpe_list has {len(lrpe)} flags for {layers} decoder_layers")
    if not lrpe and raw.get("linear_use_lrpe"):
        lrpe = [1] * layers  # (the reference's single flag, used when the list is empty)
    hidden = int(raw.get("hidden_dim", 1024))
    glu = int(raw.get("glu_dim", 2816))
    fields = dict(
        vocab_size=int(raw.get("vocab_size", 64000)), dim=dim, layers=layers,
        heads=int(raw.get("decoder_attention_heads", 8)), hidden_dim=None if hidden == dim else hidden,
        glu_dim=dim if glu == -1 else glu, lrpe_layers=tuple(i for i, f in enumerate(lrpe) if f),
        no_scale_embedding=bool(raw.get("no_scale_embedding", False)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)), init_std=float(raw.get("init_std", 0.02)))
    return hf.with_overrides(TNLConfig(**fields), overrides)


def hf_config(cfg: TNLConfig) -> dict[str, Any]:
    """The reference's ``config.json`` for ``cfg`` (``auto_map`` to its modeling code left to the user)."""
    return {
        "architectures": ["TransnormerForCausalLM"], "model_type": "transnormer",
        "vocab_size": cfg.vocab_size, "decoder_embed_dim": cfg.dim, "decoder_layers": cfg.layers,
        "decoder_attention_heads": cfg.heads, "hidden_dim": cfg.width, "glu_dim": cfg.glu_dim,
        "linear_use_lrpe_list": [int(i in cfg.lrpe_layers) for i in range(cfg.layers)],
        "no_scale_embedding": cfg.no_scale_embedding, "tie_word_embeddings": cfg.tie_embeddings,
        "norm_type": "simplermsnorm", "linear_act_fun": "silu", "bias": False, "init_std": cfg.init_std,
    }


def entries(model: TNL) -> list[hf.Entry]:
    """Every weight with its reference key (the decay rates are computed from the config, not stored)."""
    out = [hf.same("model.embed_tokens.weight", model.embed.embedding)]
    for i, block in enumerate(model.blocks):
        pre, mixer = f"model.layers.{i}.", block.mixer
        out += [hf.linear(pre + "token_mixer.qkvu_proj.weight", mixer.qkvu.kernel),
                hf.linear(pre + "token_mixer.out_proj.weight", mixer.out_proj.kernel)]
        if mixer.lrpe is not None:  # [H, 1, d] there, [H, d] here
            out.append(hf.Entry((pre + "token_mixer.lrpe.theta",), mixer.lrpe.theta,
                                lambda t: t.reshape(t.shape[0], -1), lambda t: (t[:, None, :],)))
        out += [hf.linear(pre + f"channel_mixer.{n}.weight", getattr(block.glu, n).kernel) for n in ("l1", "l2", "l3")]
    if model.head is not None:
        out.append(hf.linear("lm_head.weight", model.head.kernel))
    return out


def _ignore(cfg: TNLConfig):
    """A tied model ignores a stored ``lm_head.weight``, as the reference does."""
    return lambda key: key == "lm_head.weight" and cfg.tie_embeddings


def to_hf_state_dict(model: TNL) -> dict[str, np.ndarray]:
    """The model's weights under the reference's keys and layouts (fp32 numpy)."""
    return hf.to_state_dict(entries(model))


def load_hf_state_dict(model: TNL, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a reference ``state_dict`` into ``model`` in place (``strict``: every weight present and
    every key used; a tied model ignores ``lm_head.weight``)."""
    hf.load_state_dict(entries(model), state_dict, strict=strict, ignore=_ignore(model.cfg))


def load(cfg: TNLConfig, state_dict: Mapping[str, Any], *, strict: bool, where: str, param_dtype: Any = None) -> TNL:
    return hf.fill_abstract(lambda: TNL(cfg, rngs=nnx.Rngs(0)), entries, state_dict, strict=strict,
                            ignore=_ignore(cfg), where=where, param_dtype=param_dtype)
