"""ERASER rationale metrics (DeYoung et al. 2020; ``jayded/eraserbenchmark``,
``rationale_benchmark/metrics.py``) on token masks and a ``predict_proba`` callable (numpy only).

Agreement with human rationales (hard predictions):

* :func:`token_f1` -- ERASER ``token_prf``: every rationale token is one item;
  ``average="macro"`` (default) is ERASER's ``instance_macro`` F1 = the **mean of per-instance F1s**
  over the instances that have a gold or a predicted token (an instance with predictions but no gold,
  or gold but no predictions, scores 0; one with neither is left out, as ERASER keys instances by
  their rationales); ``average="micro"`` is ``instance_micro`` = F1 of the pooled precision and
  recall (what X-MuTeST's ``Token-F1.ipynb`` computes with sklearn over the flattened 0/1 lists).
* :func:`iou_f1` -- ERASER ``partial_match_score``: spans are the maximal runs of True; each
  predicted span takes its best IOU over the gold spans of its instance and is a true positive when
  that IOU is ``>= threshold`` (several predicted spans may match one gold span, as in ERASER).
  ``average="macro"`` (default): precision = mean over instances with predicted spans of TP/#pred,
  recall = mean over instances with gold spans of TP/#gold, F1 of those two means (ERASER's
  ``macro``); ``"micro"``: pooled TP/#pred and TP/#gold.
  Deviation of X-MuTeST's ``IOU_F1.ipynb`` (not followed): it counts (pred, gold) pairs with
  IOU strictly ``>`` 0.5 and pools TP/FP/FN over instances.

Faithfulness (soft or hard explanations), always on the probability of one class per instance --
ERASER uses the model's **predicted** class on the full text (``classification``):

* comprehensiveness = p(y|x) - p(y|x \\ r), sufficiency = p(y|x) - p(y|r) averaged over instances;
* AOPC: the same differences with r = the top-k% tokens by score, averaged over the bins
  ``(0.01, 0.05, 0.1, 0.2, 0.5)`` and the instances (ERASER's default ``--aopc_thresholds``; no
  k = 0 term, as ERASER). The bin's token count is ``ceil(k * length)`` (ERASER leaves this to the
  model's code; ours never rounds a non-empty bin down to 0 tokens), ties to the earlier token.

Removing tokens deletes them and re-compacts the text to the left (ERASER removes the rationale
tokens from the document); X-MuTeST's ``masking.ipynb`` instead replaces them by ``<mask>``
(pass a ``predict_proba`` that re-inserts a mask id if you want that variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxattn.explain._checks import (batched_proba, check_lengths, check_mask, check_scores, check_tokens,
                                     compact, k_of, top_k_mask)

__all__ = ["token_f1", "iou_f1", "spans", "comprehensiveness", "sufficiency", "aopc", "faithfulness",
           "remove_tokens", "AOPC_BINS"]

AOPC_BINS = (0.01, 0.05, 0.1, 0.2, 0.5)


def _f1(p: float, r: float) -> float:
    return 0.0 if p == 0 or r == 0 else 2 * p * r / (p + r)


def _masks(pred_mask, gold_mask, lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gold = np.asarray(gold_mask)
    if gold.ndim != 2:
        raise ValueError(f"gold_mask must be a bool array [N, T], got shape {gold.shape}")
    gold = check_mask(gold, gold.shape, "gold_mask")
    pred = check_mask(pred_mask, gold.shape, "pred_mask")
    n, t = gold.shape
    lengths = check_lengths(lengths, n, t)
    valid = np.arange(t)[None, :] < lengths[:, None]
    return pred & valid, gold & valid, lengths


def _check_average(average: str) -> None:
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")


def token_f1(pred_mask, gold_mask, lengths, *, average: str = "macro") -> float:
    """ERASER token-level F1 of hard rationale masks ``[N, T]`` (only the first ``lengths[i]``
    tokens count); see the module docstring for ``average``. 0.0 when no instance has a rationale."""
    _check_average(average)
    pred, gold, _ = _masks(pred_mask, gold_mask, lengths)
    tp = (pred & gold).sum(1)
    npred, ngold = pred.sum(1), gold.sum(1)
    if average == "micro":
        p = tp.sum() / npred.sum() if npred.sum() else 0.0
        r = tp.sum() / ngold.sum() if ngold.sum() else 0.0
        return float(_f1(p, r))
    keep = (npred > 0) | (ngold > 0)
    if not keep.any():
        return 0.0
    f1s = [_f1(tp[i] / npred[i] if npred[i] else 0.0, tp[i] / ngold[i] if ngold[i] else 0.0)
           for i in np.flatnonzero(keep)]
    return float(np.mean(f1s))


def spans(mask_row: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool array as ``[(start, end_exclusive), ...]``."""
    m = np.concatenate([[False], np.asarray(mask_row, bool), [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def _iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union else 0.0


def iou_f1(pred_mask, gold_mask, lengths, threshold: float = 0.5, *, average: str = "macro") -> float:
    """ERASER IOU F1 (partial span match at ``IOU >= threshold``) of hard rationale masks ``[N, T]``;
    spans are maximal runs of True within ``lengths[i]``; see the module docstring."""
    _check_average(average)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    pred, gold, _ = _masks(pred_mask, gold_mask, lengths)
    tps, npreds, ngolds = [], [], []
    for i in range(len(gold)):
        ps, gs = spans(pred[i]), spans(gold[i])
        best = [max((_iou(p, g) for g in gs), default=0.0) for p in ps]
        tps.append(sum(b >= threshold for b in best))
        npreds.append(len(ps))
        ngolds.append(len(gs))
    tps, npreds, ngolds = map(np.asarray, (tps, npreds, ngolds))
    if average == "micro":
        r = tps.sum() / ngolds.sum() if ngolds.sum() else 0.0
        p = tps.sum() / npreds.sum() if npreds.sum() else 0.0
        return float(_f1(p, r))
    rs = [tps[i] / ngolds[i] for i in range(len(tps)) if ngolds[i]]
    ps = [tps[i] / npreds[i] for i in range(len(tps)) if npreds[i]]
    return float(_f1(np.mean(ps) if ps else 0.0, np.mean(rs) if rs else 0.0))


def _probs(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array [N] of class probabilities, got shape {a.shape}")
    return a


def comprehensiveness(p_full, p_removed) -> float:
    """Mean of ``p_full - p_removed`` (``[N]`` probabilities of each instance's class on the full
    text and with the rationale removed); higher = the rationale mattered more."""
    a, b = _probs(p_full, "p_full"), _probs(p_removed, "p_removed")
    if a.shape != b.shape:
        raise ValueError(f"p_removed must have the shape of p_full {a.shape}, got {b.shape}")
    return float(np.mean(a - b))


def sufficiency(p_full, p_only) -> float:
    """Mean of ``p_full - p_only`` (``p_only``: the rationale alone); lower = more sufficient."""
    a, b = _probs(p_full, "p_full"), _probs(p_only, "p_only")
    if a.shape != b.shape:
        raise ValueError(f"p_only must have the shape of p_full {a.shape}, got {b.shape}")
    return float(np.mean(a - b))


def aopc(p_full, p_bins) -> float:
    """ERASER AOPC: mean over instances and bins of ``p_full[:, None] - p_bins`` (``p_full [N]``,
    ``p_bins [N, K]``: the class probability with the top-k_j% tokens removed (comprehensiveness) or
    kept alone (sufficiency))."""
    a = _probs(p_full, "p_full")
    b = np.asarray(p_bins, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != a.shape[0]:
        raise ValueError(f"p_bins must be an array [N, K] with N={a.shape[0]}, got shape {b.shape}")
    return float(np.mean(a[:, None] - b))


def remove_tokens(tokens, lengths, remove_mask, *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deletes the tokens where ``remove_mask`` is True and re-compacts to the left:
    ``(tokens [N, T], lengths [N])``."""
    tok = check_tokens(tokens)
    n, t = tok.shape
    lengths = check_lengths(lengths, n, t)
    rm = check_mask(remove_mask, tok.shape, "remove_mask")
    return compact(tok, lengths, ~rm, pad_id)


def faithfulness(predict_proba: Callable[[np.ndarray, np.ndarray], np.ndarray], tokens, lengths, scores,
                 labels=None, *, k_fraction: float | None = None, bins: Sequence[float] = AOPC_BINS,
                 pad_id: int = 0, rationales=None, batch_size: int | None = None) -> dict[str, float]:
    """ERASER comprehensiveness, sufficiency and their AOPCs for token ``scores [N, T]``.

    ``predict_proba(tokens int [M, T], lengths [M]) -> [M, C]`` (left-aligned, ``pad_id``-padded).
    The class of instance i is ``labels[i]`` when ``labels`` is given, else (ERASER) the argmax of
    ``predict_proba`` on the full text. The rationale r of comprehensiveness/sufficiency is, in order:
    ``rationales`` (a bool mask [N, T]) if given; ``scores`` itself if it is a bool array; the top
    ``ceil(k_fraction * length)`` tokens by score if ``k_fraction`` is given; otherwise (ERASER reports
    soft-score models by their AOPCs) comprehensiveness/sufficiency equal the AOPC values. AOPC ranks
    by ``scores`` over ``bins``. ``batch_size`` chunks the ``predict_proba`` calls.
    Returns ``{"comprehensiveness", "sufficiency", "aopc_comprehensiveness", "aopc_sufficiency"}``.
    """
    tok = check_tokens(tokens)
    n, t = tok.shape
    lengths = check_lengths(lengths, n, t)
    hard = None
    if rationales is not None:
        hard = check_mask(rationales, tok.shape, "rationales")
    elif np.asarray(scores).dtype == np.bool_:
        hard = check_mask(scores, tok.shape, "scores")
    sc = check_scores(scores, tok.shape)
    bins = tuple(float(b) for b in bins)
    if any(not 0.0 <= b <= 1.0 for b in bins):
        raise ValueError(f"bins must be fractions in [0, 1], got {bins}")
    if k_fraction is not None and not 0.0 <= float(k_fraction) <= 1.0:
        raise ValueError(f"k_fraction must be in [0, 1], got {k_fraction}")
    valid = np.arange(t)[None, :] < lengths[:, None]

    # every perturbation in one list: full, then (comp, suff) per bin, then (comp, suff) at r
    masks = [np.zeros_like(valid)]
    for b in bins:
        masks.append(top_k_mask(sc, lengths, [k_of(b, int(length)) for length in lengths]))
    if hard is None and k_fraction is not None:
        hard = top_k_mask(sc, lengths, [k_of(float(k_fraction), int(length)) for length in lengths])
    if hard is not None:
        masks.append(hard & valid)
    toks, lens = [], []
    for j, m in enumerate(masks):
        for keep in ([~m] if j == 0 else [~m, m]):  # comprehensiveness removes r, sufficiency keeps it
            a, l_ = compact(tok, lengths, keep, pad_id)
            toks.append(a)
            lens.append(l_)
    probs = batched_proba(predict_proba, np.concatenate(toks), np.concatenate(lens), batch_size)
    probs = probs.reshape(len(toks), n, -1)
    full = probs[0]
    if labels is None:
        cls = full.argmax(-1)
    else:
        cls = np.asarray(labels)
        if cls.shape != (n,) or not np.issubdtype(cls.dtype, np.integer):
            raise ValueError(f"labels must be an integer array [N]=[{n}] (or None: predicted class), "
                             f"got shape {cls.shape} dtype {cls.dtype}")
        if (cls < 0).any() or (cls >= full.shape[-1]).any():
            raise ValueError(f"labels must lie in [0, C={full.shape[-1]}), got {cls.min()}..{cls.max()}")
    pick = probs[:, np.arange(n), cls]  # [P, N]
    p_full = pick[0]
    nb = len(bins)
    comp_bins = pick[1:1 + 2 * nb:2].T  # [N, K]
    suff_bins = pick[2:2 + 2 * nb:2].T
    out = {"aopc_comprehensiveness": aopc(p_full, comp_bins) if nb else float("nan"),
           "aopc_sufficiency": aopc(p_full, suff_bins) if nb else float("nan")}
    if hard is not None:
        out["comprehensiveness"] = comprehensiveness(p_full, pick[-2])
        out["sufficiency"] = sufficiency(p_full, pick[-1])
    else:
        out["comprehensiveness"] = out["aopc_comprehensiveness"]
        out["sufficiency"] = out["aopc_sufficiency"]
    return {k: out[k] for k in ("comprehensiveness", "sufficiency", "aopc_comprehensiveness", "aopc_sufficiency")}
