"""Activation checkpointing of a model's blocks (the models' ``remat`` config field)."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx


def remat_blocks(remat: bool, call: Callable) -> Callable:
    """``call(block, *args)``, under ``nnx.remat`` when ``remat``: the backward recomputes the
    block's forward instead of keeping its activations (memory for one block, not every layer's)."""
    return nnx.remat(call) if remat else call
