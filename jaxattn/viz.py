"""Attention maps: attention rollout and PNG plots of image and token attention.

* :func:`attention_rollout` — Abnar & Zuidema (2020): per layer, average the heads, add the
  residual (``0.5 A + 0.5 I``), renormalise the rows, and multiply the layers together.
* :func:`patch_importance` — per-patch importance of a ViT from its per-layer weights: the class
  token's row of the rollout (``pool="cls"``) or the mean over all query rows (``pool="mean"``).
* :func:`plot_image_attention` — images with the rollout and the last layer's attention overlaid.
* :func:`plot_token_attention` — sentences with each token shaded by its attention weight.

The plots need matplotlib (a dependency); they return False with a warning when it is missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["attention_rollout", "patch_importance", "plot_image_attention", "plot_token_attention"]


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None with a warning (the plots' callers then
    return False); shared with :mod:`jaxattn.train.metrics`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def _check_layers(weights: Sequence[Any]) -> list[np.ndarray]:
    if len(weights) == 0:
        raise ValueError("weights: expected a non-empty list of per-layer attention weights [B, heads, N, N]")
    out = []
    for i, w in enumerate(weights):
        w = np.asarray(w, np.float64)
        if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
            raise ValueError(f"weights[{i}]: expected shape [batch, heads, N, N], got {w.shape}")
        if out and w.shape[:1] + w.shape[2:] != out[0].shape[:1] + out[0].shape[2:]:
            raise ValueError(f"weights[{i}]: shape {w.shape} does not match weights[0] {out[0].shape}")
        out.append(w)
    return out


def attention_rollout(weights: Sequence[Any], residual: float = 0.5) -> np.ndarray:
    """Attention rollout ``[B, N, N]`` from per-layer softmax weights ``[B, heads, N, N]`` (first
    layer first): ``R = Â_L ... Â_1`` with ``Â = normalise_rows((1 - residual) mean_h(A) + residual I)``.
    Row ``i`` of ``R`` says how much each input token flows into output token ``i``; rows sum to 1."""
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    layers = _check_layers(weights)
    n = layers[0].shape[-1]
    eye = np.eye(n)
    rollout = None
    for w in layers:
        a = (1.0 - residual) * w.mean(axis=1) + residual * eye
        a = a / a.sum(-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def patch_importance(weights: Sequence[Any], *, pool: str = "cls", num_prefix_tokens: int | None = None,
                     rollout: bool = True) -> np.ndarray:
    """Per-patch importance ``[B, num_patches]`` (each row sums to 1) from a ViT's per-layer weights.

    ``rollout=False`` uses the last layer alone (heads averaged). ``pool="cls"`` takes the class
    token's row, ``"mean"`` the mean over every query row (mean-pooled models); the first
    ``num_prefix_tokens`` columns (default: 1 with ``"cls"``, 0 with ``"mean"``) are dropped."""
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    layers = _check_layers(weights)
    prefix = (1 if pool == "cls" else 0) if num_prefix_tokens is None else int(num_prefix_tokens)
    mat = attention_rollout(layers) if rollout else layers[-1].mean(axis=1)
    rows = mat[:, 0] if pool == "cls" else mat.mean(axis=1)
    imp = rows[:, prefix:]
    return imp / np.maximum(imp.sum(-1, keepdims=True), 1e-12)


def _grid(num_patches: int) -> int:
    g = int(round(num_patches ** 0.5))
    if g * g != num_patches:
        raise ValueError(f"expected a square grid of patches, got {num_patches} patches")
    return g


def plot_image_attention(images: Any, weights: Sequence[Any], path: str | Path, *, pool: str = "cls",
                         num_prefix_tokens: int | None = None, titles: Sequence[str] | None = None,
                         suptitle: str = "") -> bool:
    """A grid of ``images [B, H, W, C]`` (uint8 or [0, 1] floats) with, below each, the attention
    rollout and the last layer's attention (heads averaged) over the patches, as heat maps."""
    plt = _pyplot()
    if plt is None:
        return False
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected [batch, H, W, 1 or 3], got shape {images.shape}")
    layers = _check_layers(weights)
    if layers[0].shape[0] != images.shape[0]:
        raise ValueError(f"weights are for batch {layers[0].shape[0]}, images have {images.shape[0]}")
    maps = {"rollout": patch_importance(layers, pool=pool, num_prefix_tokens=num_prefix_tokens),
            "last layer": patch_importance(layers, pool=pool, num_prefix_tokens=num_prefix_tokens, rollout=False)}
    b, h, w, c = images.shape
    g = _grid(next(iter(maps.values())).shape[-1])
    shown = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    fig, axes = plt.subplots(1 + len(maps), b, figsize=(1.6 * b + 0.6, 1.7 * (1 + len(maps))), squeeze=False)
    for j in range(b):
        img = shown[j, ..., 0] if c == 1 else shown[j]
        axes[0, j].imshow(np.clip(img, 0, 1), cmap="gray" if c == 1 else None)
        if titles is not None:
            axes[0, j].set_title(titles[j], fontsize=8)
        for i, (name, m) in enumerate(maps.items(), start=1):
            ax = axes[i, j]
            ax.imshow(np.clip(img, 0, 1), cmap="gray" if c == 1 else None)
            ax.imshow(m[j].reshape(g, g), cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                      interpolation="bilinear")
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_token_attention(tokens: Sequence[Sequence[str]], attention: Sequence[Any], path: str | Path, *,
                         rationales: Sequence[Any] | None = None, titles: Sequence[str] | None = None,
                         max_tokens: int = 80) -> bool:
    """Each example's tokens (at most ``max_tokens``) shaded by its attention weight (darker = more;
    scaled per example to its maximum), wrapped to the page width; tokens of a gold rationale
    (``rationales``, 0/1 per token) are bold and boxed in blue."""
    plt = _pyplot()
    if plt is None:
        return False
    if len(tokens) != len(attention):
        raise ValueError(f"tokens has {len(tokens)} examples but attention has {len(attention)}")
    examples = []  # per example: [(token, weight in [0, 1], is_rationale)]
    for i, (toks, att) in enumerate(zip(tokens, attention)):
        att = np.asarray(att, np.float64)[: len(toks)]
        if len(att) < len(toks):
            raise ValueError(f"attention[{i}] has {len(att)} weights for {len(toks)} tokens")
        rat = np.zeros(len(toks)) if rationales is None else np.asarray(rationales[i], np.float64)[: len(toks)]
        scale = max(float(att.max(initial=0.0)), 1e-12)
        examples.append([(str(t), a / scale, bool(r > 0)) for t, a, r in zip(toks[:max_tokens], att, rat)])
    width_in, line_in = 11.0, 0.3
    fig = plt.figure(figsize=(width_in, 1.0))
    renderer = fig.canvas.get_renderer()
    cmap = plt.get_cmap("Reds")
    placed, y = [], 0.0  # y in inches from the top
    for i, items in enumerate(examples):
        head = titles[i] if titles is not None else f"example {i}"
        placed.append((0.1, y, head, None, False))
        y += line_in
        x = 0.2
        for tok, a, is_rat in items:
            probe = fig.text(0, 0, tok, fontsize=8, weight="bold" if is_rat else "normal")
            w = probe.get_window_extent(renderer).width / fig.dpi + 0.1
            probe.remove()
            if x + w > width_in - 0.1 and x > 0.2:
                x, y = 0.2, y + line_in
            placed.append((x, y, tok, a, is_rat))
            x += w
        y += line_in * 1.3
    height = y + 0.1
    fig.set_size_inches(width_in, height)
    for x, yy, text, a, is_rat in placed:
        pos = (x / width_in, 1 - (yy + line_in / 2) / height)
        if a is None:
            fig.text(*pos, text, fontsize=8, weight="bold", va="center")
            continue
        fig.text(*pos, text, fontsize=8, va="center", weight="bold" if is_rat else "normal",
                 color="white" if a > 0.6 else "black",
                 bbox=dict(boxstyle="square,pad=0.15", fc=cmap(0.85 * a), ec="tab:blue" if is_rat else "none", lw=1.2))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
