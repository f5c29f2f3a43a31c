"""X-MuTeST stage-2 explanations (``ziarehman30/X-MuTeST``, ``codes/``): n-gram perturbation token
scores, scores -> rationales, union with external (LLM) rationales (numpy only).

:func:`ngram_removal_scores` follows ``proposed_explainability_method.ipynb``'s combination rule:
for n in (1, 2, 3) with weights (0.5, 0.3, 0.2) and every n-gram window (the ``L - n + 1`` full
windows), a probability difference d is computed and ``w_n * d`` is added to every token of the
window; each token's sum is divided by the number of windows that contain it, and the scores of an
instance are divided by their sum when that sum is positive.

What the perturbed text is, and d:

* ``mode="remove"`` (default; the paper and methods sheet: "texts with unigrams, bigrams and
  trigrams removed"): the window is deleted and the text re-compacted; with ``diff="target"``
  (default) d = p(target | x) - p(target | x without the window), so high = important.
* ``mode="keep"`` with ``diff="abs_mean"``: exactly the notebook's code, which scores the n-gram
  *alone* (``calculate_logits(model, tokenizer, ngram_text)``) with d = mean over classes of
  ``|p(x) - p(ngram)|``; there **low** = important (the n-gram alone reproduces the prediction),
  and ``scores_to_rationales.ipynb`` accordingly takes the lowest scores (``lowest=True`` here).

Deviation: the notebook accumulates per word *string* (repeated words share one score and the
score list is shorter than the text); we score per token *position*.

:func:`scores_to_rationales` with neither ``top_fraction`` nor ``threshold`` is the notebook's
rule: 1 token for a 1-token text, 5 tokens for texts longer than 10, else ``length // 2``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxattn.explain._checks import (batched_proba, check_lengths, check_mask, check_scores, check_tokens,
                                     compact, k_of, top_k_mask)

__all__ = ["ngram_removal_scores", "scores_to_rationales", "union_rationales", "load_external_rationales",
           "NGRAM_WEIGHTS"]

NGRAM_WEIGHTS = {1: 0.5, 2: 0.3, 3: 0.2}


def ngram_removal_scores(predict_proba: Callable[[np.ndarray, np.ndarray], np.ndarray], tokens, lengths,
                         target=None, *, ns: Sequence[int] = (1, 2, 3),
                         weights: Mapping[int, float] | Sequence[float] | None = None, mode: str = "remove",
                         diff: str = "target", normalize: bool = True, pad_id: int = 0,
                         batch_size: int | None = None) -> np.ndarray:
    """Per-token importance ``[N, T]`` (0 on padding) from n-gram perturbations (module docstring).

    ``predict_proba(tokens int [M, T], lengths [M]) -> [M, C]``; ``target [N]`` is the class whose
    probability drop is measured (None: the predicted class on the full text); ``weights`` maps n to
    its weight (default ``NGRAM_WEIGHTS``, needed for other n); ``batch_size`` chunks the calls.
    """
    tok = check_tokens(tokens)
    n_inst, t = tok.shape
    lengths = check_lengths(lengths, n_inst, t)
    if mode not in ("remove", "keep"):
        raise ValueError(f"mode must be 'remove' or 'keep', got {mode!r}")
    if diff not in ("target", "abs_mean"):
        raise ValueError(f"diff must be 'target' or 'abs_mean', got {diff!r}")
    ns = tuple(int(n) for n in ns)
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"ns must be positive n-gram sizes, got {ns}")
    if weights is None:
        missing = [n for n in ns if n not in NGRAM_WEIGHTS]
        if missing:
            raise ValueError(f"weights must be given for n-gram sizes {missing} (defaults exist for 1, 2, 3)")
        w = {n: NGRAM_WEIGHTS[n] for n in ns}
    elif isinstance(weights, Mapping):
        w = {n: float(weights[n]) for n in ns}
    else:
        if len(weights) != len(ns):
            raise ValueError(f"weights must have one entry per n in ns={ns}, got {len(weights)}")
        w = dict(zip(ns, map(float, weights)))

    # every window of every instance as one perturbed text
    rows, starts, sizes = [], [], []
    for i in range(n_inst):
        for n in ns:
            for s in range(int(lengths[i]) - n + 1):
                rows.append(i)
                starts.append(s)
                sizes.append(n)
    rows, starts, sizes = np.asarray(rows, int), np.asarray(starts, int), np.asarray(sizes, int)
    pos = np.arange(t)[None, :]
    window = (pos >= starts[:, None]) & (pos < (starts + sizes)[:, None])  # [W, T]
    keep = ~window if mode == "remove" else window
    pert, plen = compact(tok[rows], lengths[rows], keep, pad_id)
    probs = batched_proba(predict_proba, np.concatenate([tok, pert]), np.concatenate([lengths, plen]),
                          batch_size)
    full, p = probs[:n_inst], probs[n_inst:]
    if target is None:
        tgt = full.argmax(-1)
    else:
        tgt = np.asarray(target)
        if tgt.shape != (n_inst,) or not np.issubdtype(tgt.dtype, np.integer):
            raise ValueError(f"target must be an integer array [N]=[{n_inst}] (or None), got shape {tgt.shape}")
        if (tgt < 0).any() or (tgt >= full.shape[-1]).any():
            raise ValueError(f"target must lie in [0, C={full.shape[-1]})")
    if diff == "target":
        d = full[rows, tgt[rows]] - p[np.arange(len(rows)), tgt[rows]] if len(rows) else np.zeros(0)
    else:
        d = np.abs(full[rows] - p).mean(-1) if len(rows) else np.zeros(0)
    wd = np.array([w[s] for s in sizes]) * d if len(rows) else np.zeros(0)
    total = np.zeros((n_inst, t))
    count = np.zeros((n_inst, t))
    np.add.at(total, rows, window * wd[:, None])
    np.add.at(count, rows, window.astype(float))
    scores = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    if normalize:
        s = scores.sum(1, keepdims=True)
        scores = np.where(s > 0, scores / np.where(s > 0, s, 1), scores)
    return scores


def scores_to_rationales(scores, lengths, *, top_fraction: float | None = None, threshold: float | None = None,
                         lowest: bool = False) -> np.ndarray:
    """Hard rationales ``bool [N, T]`` from token scores ``[N, T]`` within ``lengths``.

    ``top_fraction``: the ``ceil(f * length)`` best tokens; ``threshold``: tokens scoring ``>=``
    it (``<=`` with ``lowest``); neither: X-MuTeST's rule (1 token if length 1, 5 if length > 10,
    else ``length // 2``). ``lowest=True`` takes the smallest scores as best (the notebook, for
    ``mode="keep"`` scores). Ties go to the earlier token."""
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a real array [N, T], got shape {s.shape}")
    s = check_scores(s, s.shape)
    n, t = s.shape
    lengths = check_lengths(lengths, n, t)
    if top_fraction is not None and threshold is not None:
        raise ValueError("give at most one of top_fraction and threshold")
    valid = np.arange(t)[None, :] < lengths[:, None]
    if threshold is not None:
        return valid & ((s <= threshold) if lowest else (s >= threshold))
    if top_fraction is not None:
        if not 0.0 <= float(top_fraction) <= 1.0:
            raise ValueError(f"top_fraction must be in [0, 1], got {top_fraction}")
        ks = [k_of(float(top_fraction), int(length)) for length in lengths]
    else:
        ks = [1 if length == 1 else (5 if length > 10 else int(length) // 2) for length in lengths]
    return top_k_mask(s, lengths, ks, lowest=lowest) & valid


def union_rationales(a, b) -> np.ndarray:
    """Element-wise union of two rationale masks of one shape (X-MuTeST: n-gram rationales | LLM ones)."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"a must be a bool array [N, T], got shape {a.shape}")
    return check_mask(a, a.shape, "a") | check_mask(b, a.shape, "b")


def _records(path: Path, id_key: str, value_keys: Sequence[str]) -> dict:
    text = path.read_text()
    if path.suffix == ".jsonl":
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
    if isinstance(data, dict):
        data = [{id_key: k, **(v if isinstance(v, dict) else {value_keys[0]: v})} for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON object {{id: rationale}} or a list of records")
    out = {}
    for j, rec in enumerate(data):
        if not isinstance(rec, dict) or id_key not in rec:
            raise ValueError(f"{path}: record {j} must be an object with an {id_key!r} field")
        key = next((k for k in value_keys if k in rec), None)
        if key is None:
            raise ValueError(f"{path}: record {j} (id {rec[id_key]!r}) has none of the fields {list(value_keys)}")
        out[str(rec[id_key])] = (key if key in ("mask", "indices") else None, rec[key])
    return out


def load_external_rationales(path: str | Path, ids: Sequence, lengths, *, width: int | None = None,
                             kind: str = "auto", id_key: str = "id",
                             value_keys: Sequence[str] = ("rationale", "indices", "mask"),
                             missing: str = "error") -> np.ndarray:
    """Reads rationales returned by an LLM (or annotators) into ``bool [len(ids), width]``.

    ``path``: ``.json`` -- ``{id: rationale}`` or a list of records -- or ``.jsonl`` -- one record a
    line; a record is ``{"id": ..., "rationale" | "indices" | "mask": [...]}`` (an object's values
    may be such records without the id). A rationale is a
    list of token indices, or a 0/1 (bool) mask of exactly ``lengths[i]`` entries. ``kind``:
    ``"indices"``, ``"mask"`` or ``"auto"`` (a ``"mask"`` field, booleans, or a list of ``lengths[i]``
    zeros/ones is a mask; anything else indices). Rows follow ``ids`` (matched as strings);
    ``width`` defaults to ``max(lengths)``; ``missing``: ``"error"`` or ``"empty"`` (no rationale).
    Raises ``ValueError`` on a mask of the wrong length, an index outside ``[0, lengths[i])``, or a
    missing id."""
    if kind not in ("auto", "indices", "mask"):
        raise ValueError(f"kind must be 'auto', 'indices' or 'mask', got {kind!r}")
    if missing not in ("error", "empty"):
        raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"rationale file {path} does not exist")
    ids = list(ids)
    lengths = np.asarray(lengths)
    if lengths.shape != (len(ids),) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be an integer array [len(ids)]=[{len(ids)}], got shape {lengths.shape}")
    width = int(lengths.max(initial=0)) if width is None else int(width)
    if (lengths > width).any():
        raise ValueError(f"width {width} is smaller than the longest text ({lengths.max()} tokens)")
    recs = _records(path, id_key, value_keys)
    out = np.zeros((len(ids), width), bool)
    for i, ex in enumerate(ids):
        length = int(lengths[i])
        val = recs.get(str(ex))
        if val is None:
            if missing == "error":
                raise ValueError(f"{path}: no rationale for id {ex!r}")
            continue
        hint, val = val
        if not isinstance(val, list):
            raise ValueError(f"{path}: rationale of id {ex!r} must be a list, got {type(val).__name__}")
        hint = hint if kind == "auto" else kind
        as_mask = hint == "mask" or (hint is None and (
            (val and all(isinstance(v, bool) for v in val))
            or (len(val) == length and all(v in (0, 1) for v in val))))
        if as_mask:
            if len(val) != length:
                raise ValueError(f"{path}: mask of id {ex!r} has {len(val)} entries but the text has "
                                 f"{length} tokens")
            if not all(v in (0, 1) for v in val):
                raise ValueError(f"{path}: mask of id {ex!r} must hold only 0/1 or booleans")
            out[i, :length] = np.asarray(val, bool)
        else:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in val):
                raise ValueError(f"{path}: rationale of id {ex!r} must be a list of integer token indices")
            bad = [v for v in val if not 0 <= v < length]
            if bad:
                raise ValueError(f"{path}: id {ex!r} has token indices {bad} outside [0, {length}) "
                                 f"(the text has {length} tokens)")
            out[i, val] = True
    return out
