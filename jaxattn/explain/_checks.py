"""Argument checks and token-removal helpers shared by :mod:`jaxattn.explain` (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["check_lengths", "check_tokens", "check_mask", "check_scores", "compact", "top_k_mask",
           "k_of", "batched_proba"]


def check_tokens(tokens, name: str = "tokens") -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [N, T], got shape {t.shape} dtype {t.dtype}")
    return t


def check_lengths(lengths, n: int, t: int, name: str = "lengths") -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array [N]=[{n}], got shape {arr.shape} dtype {arr.dtype}")
    if (arr < 0).any() or (arr > t).any():
        raise ValueError(f"{name} must lie in [0, T={t}], got min {arr.min()} max {arr.max()}")
    return arr.astype(np.int64)


def check_mask(mask, shape: tuple[int, ...], name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (like tokens), got {m.shape}")
    if m.dtype != np.bool_:
        if not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
            raise ValueError(f"{name} must be a bool (or 0/1) array, got dtype {m.dtype}")
        m = m.astype(bool)
    return m


def check_scores(scores, shape: tuple[int, ...], name: str = "scores") -> np.ndarray:
    s = np.asarray(scores)
    if s.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (like tokens), got {s.shape}")
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_):
        raise ValueError(f"{name} must be a real array, got dtype {s.dtype}")
    return s.astype(np.float64)


def compact(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray, pad_id: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Deletes the tokens where ``keep`` is False (within each ``lengths[i]``) and re-compacts the
    rest to the left, padding with ``pad_id``: ``(tokens [N, T], lengths [N])``."""
    n, t = tokens.shape
    valid = np.arange(t)[None, :] < lengths[:, None]
    keep = keep & valid
    new_len = keep.sum(1)
    # stable sort puts the kept tokens first, in their original order
    order = np.argsort(~keep, axis=1, kind="stable")
    out = np.take_along_axis(tokens, order, axis=1).copy()
    out[np.arange(t)[None, :] >= new_len[:, None]] = pad_id
    return out, new_len.astype(lengths.dtype)


def k_of(fraction: float, length: int) -> int:
    """Tokens in the top ``fraction`` of a text of ``length`` tokens: ``ceil(fraction * length)``
    (at least 1 for a non-empty text and fraction > 0; a hair below integers is not rounded up)."""
    return int(min(length, max(0, math.ceil(fraction * length - 1e-9))))


def top_k_mask(scores: np.ndarray, lengths: np.ndarray, ks, *, lowest: bool = False) -> np.ndarray:
    """Bool ``[N, T]``: the ``ks[i]`` highest (``lowest``: smallest) scores of each row within
    ``lengths[i]``; ties go to the earlier position."""
    n, t = scores.shape
    key = scores if lowest else -scores
    key = np.where(np.arange(t)[None, :] < lengths[:, None], key, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(t)[None, :].repeat(n, 0), axis=1)
    return rank < np.asarray(ks)[:, None]


def batched_proba(predict_proba: Callable, tokens: np.ndarray, lengths: np.ndarray,
                  batch_size: int | None) -> np.ndarray:
    """``predict_proba`` over rows in chunks of ``batch_size`` (None: all at once); checks ``[N, C]``."""
    n = len(tokens)
    step = n if not batch_size else int(batch_size)
    outs = []
    for s in range(0, n, max(step, 1)):
        p = np.asarray(predict_proba(tokens[s:s + step], lengths[s:s + step]), dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != len(tokens[s:s + step]):
            raise ValueError(f"predict_proba must return an array [N, C] of class probabilities, got shape "
                             f"{p.shape} for {len(tokens[s:s + step])} inputs")
        outs.append(p)
    return np.concatenate(outs) if outs else np.zeros((0, 0))
