"""timm ``state_dict`` <-> NNX variables, numpy only (no torch import).

A variable's timm key is its NNX path with the leaf renamed (``kernel``/``scale`` -> ``weight``,
BatchNorm ``mean``/``var`` -> ``running_mean``/``running_var``); conv kernels go HWIO <-> OIHW,
linear kernels ``[in, out]`` <-> ``[out, in]``. Gate logits (:class:`GateParam`) have no timm
counterpart and are skipped; ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from jaxattn.models import hf
from jaxattn.models.gates import GateParam

_LEAF_TO_TIMM = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                 "var": "running_var", "height_rel": "height_rel", "width_rel": "width_rel",
                 "cls_token": "cls_token", "reg_token": "reg_token", "pos_embed": "pos_embed", "gamma": "gamma",
                 "latent": "latent", "q_bias": "q_bias", "v_bias": "v_bias",
                 "gamma_1": "gamma_1", "gamma_2": "gamma_2", "freqs": "freqs"}


def timm_variables(model: nnx.Module) -> list[tuple[str, nnx.Variable, str]]:
    """(timm key, variable, kind) for every parameter and BatchNorm statistic; kind is ``conv``,
    ``linear`` or ``plain``."""
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.Param, nnx.BatchStat)) or isinstance(node, GateParam):
            continue
        leaf = path[-1]
        if leaf not in _LEAF_TO_TIMM:
            raise ValueError(f"no timm name for variable {'.'.join(map(str, path))}")
        key = ".".join(map(str, path[:-1] + (_LEAF_TO_TIMM[leaf],)))
        kind = ("conv" if len(node.shape) == 4 else "linear") if leaf == "kernel" else "plain"
        out.append((key, node, kind))
    return out


def timm_entries(model: nnx.Module) -> list[hf.Entry]:
    """Every parameter and BatchNorm statistic under its timm key: conv OIHW <-> HWIO, linear transposed."""
    make = {"conv": hf.conv, "linear": hf.linear, "plain": hf.same}
    return [make[kind](key, var) for key, var, kind in timm_variables(model)]


def ignore(key: str) -> bool:
    """Checkpoint keys with no counterpart: BatchNorm's ``num_batches_tracked``."""
    return key.endswith("num_batches_tracked")


def to_timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's variables under timm's ``state_dict`` keys and layouts (numpy, as stored)."""
    return hf.to_state_dict(timm_entries(model))


def load_timm_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Copies a timm ``state_dict`` (values: numpy arrays or anything ``np.asarray`` takes, e.g.
    ``t.detach().numpy()``) into ``model`` in place. ``strict``: every model variable must be
    present and every checkpoint key used."""
    hf.load_state_dict(timm_entries(model), state_dict, strict=strict, ignore=ignore)
