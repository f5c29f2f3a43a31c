"""ERASER metrics, attention/gradient agreement and X-MuTeST explanations (jaxattn.explain), on
hand-worked examples (the expected numbers are worked out in the comments) and independent oracles."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.explain import (aopc, comprehensiveness, faithfulness, gradient_importance, iou_f1, kendall_tau,
                             load_external_rationales, ngram_removal_scores, pearson, remove_tokens,
                             scores_to_rationales, sufficiency, token_f1, union_rationales)

CUE = 7


def cue_proba(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Toy classifier: p(class 1) = fraction of the text's tokens equal to CUE (0 for an empty text).
    Checks that the texts it receives are left-aligned and padded with 0."""
    t = tokens.shape[1]
    assert (tokens[np.arange(t)[None, :] >= lengths[:, None]] == 0).all(), "padding must be pad_id"
    f = np.array([(row[:n] == CUE).mean() if n else 0.0 for row, n in zip(tokens, lengths)])
    return np.stack([1 - f, f], 1)


def M(rows):
    return np.array(rows, dtype=bool)


# -- Token-F1 ---------------------------------------------------------------------------------
def test_token_f1_hand():
    lengths = np.array([5, 4, 3, 3])
    gold = M([[1, 1, 0, 0, 1],
              [1, 1, 1, 0, 1],   # last token beyond length 4: ignored
              [0, 0, 0, 0, 0],
              [0, 0, 0, 0, 0]])
    pred = M([[1, 0, 0, 1, 1],
              [0, 0, 1, 0, 1],
              [0, 0, 0, 1, 1],   # beyond length 3: ignored -> no rationale at all
              [0, 1, 0, 0, 0]])
    # inst0: tp 2, |pred| 3, |gold| 3 -> p = r = 2/3, F1 2/3
    # inst1: tp 1, |pred| 1, |gold| 3 -> p 1, r 1/3, F1 = 2(1/3)/(4/3) = 1/2
    # inst2: nothing predicted or gold -> left out (ERASER keys instances by their rationales)
    # inst3: a prediction but no gold -> F1 0
    assert token_f1(pred, gold, lengths) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # 7/18
    assert token_f1(pred[:3], gold[:3], lengths[:3]) == pytest.approx(7 / 12)
    # micro: tp 3, |pred| 5, |gold| 6 -> p 3/5, r 1/2, F1 = 2 (3/10) / (11/10) = 6/11
    assert token_f1(pred, gold, lengths, average="micro") == pytest.approx(6 / 11)


def test_token_f1_micro_matches_sklearn_flattened():
    """Micro Token-F1 = X-MuTeST's Token-F1.ipynb: sklearn f1 over the flattened 0/1 token lists."""
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    n, t = 9, 13
    lengths = rng.integers(1, t + 1, n)
    gold, pred = rng.random((n, t)) < 0.3, rng.random((n, t)) < 0.4
    flat = lambda m: np.concatenate([m[i, :lengths[i]] for i in range(n)])  # noqa: E731
    assert token_f1(pred, gold, lengths, average="micro") == pytest.approx(sk.f1_score(flat(gold), flat(pred)))


# -- IOU-F1 -----------------------------------------------------------------------------------
def test_iou_f1_hand_at_half_boundary():
    lengths = np.array([8, 6])
    gold = M([[1, 1, 1, 1, 0, 0, 1, 1],    # spans [0,4) [6,8)
              [0, 1, 1, 0, 0, 0, 0, 0]])   # span [1,3)
    pred = M([[0, 0, 1, 1, 0, 1, 0, 0],    # [2,4): IOU 2/4 = 0.5 with [0,4) -> match; [5,6): IOU 0
              [0, 1, 0, 0, 1, 1, 0, 0]])   # [1,2): IOU 1/2 with [1,3) -> match; [4,6): 0
    # macro: p = mean(1/2, 1/2) = 1/2, r = mean(1/2, 1/1) = 3/4 -> F1 = 2 (3/8) / (5/4) = 3/5
    assert iou_f1(pred, gold, lengths) == pytest.approx(0.6)
    # micro: tp 2, 4 predicted spans, 3 gold spans -> p 1/2, r 2/3 -> F1 = (2/3) / (7/6) = 4/7
    assert iou_f1(pred, gold, lengths, average="micro") == pytest.approx(4 / 7)
    # just above the boundary nothing matches
    assert iou_f1(pred, gold, lengths, threshold=0.51) == 0.0
    # [1,5) vs gold [0,3): inter 2, union 5 -> 0.4 < 0.5: no match; [1,4): 2/4 -> match
    g = M([[1, 1, 1, 0, 0, 0]])
    assert iou_f1(M([[0, 1, 1, 1, 1, 0]]), g, np.array([6])) == 0.0
    assert iou_f1(M([[0, 1, 1, 1, 0, 0]]), g, np.array([6])) == 1.0
    # spans are cut at lengths: pred [1,4) within length 3 is [1,3): 2/3 with gold [0,3)
    assert iou_f1(M([[0, 1, 1, 1, 0, 0]]), g, np.array([3]), threshold=0.67) == 0.0
    assert iou_f1(M([[0, 1, 1, 1, 0, 0]]), g, np.array([3]), threshold=0.66) == 1.0


def _eraser_iou_oracle(pred, gold, lengths, thr):
    """ERASER partial_match_score written over (instance, start, end) span sets."""
    def span_set(m):
        out = []
        for i, row in enumerate(m):
            row = list(row[:lengths[i]]) + [False]
            s = None
            for j, v in enumerate(row):
                if v and s is None:
                    s = j
                if not v and s is not None:
                    out.append((i, s, j))
                    s = None
        return out
    truth, prd = span_set(gold), span_set(pred)
    tps = {}
    for (i, a, b) in prd:
        best = 0.0
        for (k, c, d) in truth:
            if k == i:
                inter = len(set(range(a, b)) & set(range(c, d)))
                best = max(best, inter / len(set(range(a, b)) | set(range(c, d))))
        tps[i] = tps.get(i, 0) + (best >= thr)
    nt = {i: sum(1 for s in truth if s[0] == i) for i in {s[0] for s in truth}}
    npr = {i: sum(1 for s in prd if s[0] == i) for i in {s[0] for s in prd}}
    f1 = lambda p, r: 0 if p == 0 or r == 0 else 2 * p * r / (p + r)  # noqa: E731
    macro_r = np.mean([tps.get(i, 0) / n for i, n in nt.items()]) if nt else 0
    macro_p = np.mean([tps.get(i, 0) / n for i, n in npr.items()]) if npr else 0
    tp = sum(tps.values())
    micro = f1(tp / sum(npr.values()) if npr else 0, tp / sum(nt.values()) if nt else 0)
    return f1(macro_p, macro_r), micro


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_f1_random_vs_oracle(seed):
    rng = np.random.default_rng(seed)
    n, t = int(rng.integers(2, 8)), int(rng.integers(3, 16))
    lengths = rng.integers(0, t + 1, n)
    gold, pred = rng.random((n, t)) < 0.4, rng.random((n, t)) < 0.4
    for thr in (0.3, 0.5, 0.8):
        macro, micro = _eraser_iou_oracle(pred, gold, lengths, thr)
        assert iou_f1(pred, gold, lengths, thr) == pytest.approx(macro)
        assert iou_f1(pred, gold, lengths, thr, average="micro") == pytest.approx(micro)


def test_metric_input_errors():
    g = M([[1, 0, 1]])
    with pytest.raises(ValueError, match="pred_mask must have shape"):
        token_f1(M([[1, 0]]), g, np.array([3]))
    with pytest.raises(ValueError, match="lengths must lie"):
        iou_f1(g, g, np.array([4]))
    with pytest.raises(ValueError, match="average"):
        token_f1(g, g, np.array([3]), average="weighted")
    with pytest.raises(ValueError, match="bool"):
        token_f1(np.array([[0.5, 0, 1]]), g, np.array([3]))


# -- comprehensiveness / sufficiency / AOPC --------------------------------------------------
def test_plain_metric_functions():
    assert comprehensiveness([0.9, 0.6], [0.5, 0.6]) == pytest.approx(0.2)   # (0.4 + 0) / 2
    assert sufficiency([0.9, 0.6], [1.0, 0.3]) == pytest.approx(0.1)         # (-0.1 + 0.3) / 2
    assert aopc([0.9, 0.5], [[0.8, 0.4], [0.5, 0.1]]) == pytest.approx(0.25)  # (.1 + .5 + 0 + .4) / 4
    with pytest.raises(ValueError, match="p_removed must have the shape"):
        comprehensiveness([0.1, 0.2], [0.1])


def test_remove_tokens_recompacts():
    toks, lens = remove_tokens(np.array([[3, 7, 2, 5], [4, 6, 0, 0]]), np.array([4, 2]),
                               M([[1, 0, 1, 0], [0, 1, 0, 0]]), pad_id=0)
    assert toks.tolist() == [[7, 5, 0, 0], [4, 0, 0, 0]] and lens.tolist() == [2, 1]


FAITH_TOKENS = np.array([[7, 7, 7, 2, 0], [1, 2, 7, 0, 0]])
FAITH_LENGTHS = np.array([4, 3])
FAITH_SCORES = np.array([[0.9, 0.1, 0.5, 0.2, 0.0], [0.3, 0.2, 0.1, 0.0, 0.0]])


def test_faithfulness_hand():
    # inst0: [7 7 7 2], p1 = 3/4 -> predicted class 1, p_full .75; ranking by score: 0, 2, 3, 1
    # inst1: [1 2 7],   p1 = 1/3 -> predicted class 0, p_full 2/3; ranking 0, 1, 2
    # k = 0.5 -> ceil(2) = 2 and ceil(1.5) = 2 tokens
    #   inst0 r = {0, 2}: without r [7 2] -> p1 .5, comp .25; r alone [7 7] -> p1 1, suff -.25
    #   inst1 r = {0, 1}: without r [7] -> p0 0, comp 2/3;   r alone [1 2] -> p0 1, suff -1/3
    out = faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES, k_fraction=0.5, bins=(0.01, 0.5))
    assert out["comprehensiveness"] == pytest.approx((0.25 + 2 / 3) / 2)    # 11/24
    assert out["sufficiency"] == pytest.approx((-0.25 - 1 / 3) / 2)         # -7/24
    # AOPC bins: 0.01 -> 1 token; 0.5 -> 2 tokens (as above)
    #   inst0 k=1 (token 0): without [7 7 2] p1 2/3 -> 1/12; alone [7] p1 1 -> -1/4
    #   inst1 k=1 (token 0): without [2 7] p0 1/2 -> 1/6;    alone [1] p0 1 -> -1/3
    # comp AOPC = mean(1/12, 1/4, 1/6, 2/3) = 7/24; suff AOPC = mean(-1/4, -1/4, -1/3, -1/3) = -7/24
    assert out["aopc_comprehensiveness"] == pytest.approx(7 / 24)
    assert out["aopc_sufficiency"] == pytest.approx(-7 / 24)
    assert set(out) == {"comprehensiveness", "sufficiency", "aopc_comprehensiveness", "aopc_sufficiency"}


def test_faithfulness_labels_hard_masks_and_default():
    # labels [1, 1]: inst1 uses p1 (1/3): without {0,1} -> [7] p1 1 -> -2/3; comp = (.25 - 2/3) / 2
    out = faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES, np.array([1, 1]),
                       k_fraction=0.5, bins=(0.5,))
    assert out["comprehensiveness"] == pytest.approx((0.25 - 2 / 3) / 2)
    # a bool score array is the hard rationale; equal to giving rationales= explicitly
    r = M([[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]])
    a = faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, r, bins=(0.5,))
    b = faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES, rationales=r, bins=(0.5,), batch_size=3)
    assert a["comprehensiveness"] == pytest.approx(11 / 24) and b["comprehensiveness"] == pytest.approx(11 / 24)
    assert a["sufficiency"] == pytest.approx(-7 / 24)
    # no k and soft scores: comprehensiveness/sufficiency are the AOPCs (ERASER reports soft models so)
    c = faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES, bins=(0.01, 0.5))
    assert c["comprehensiveness"] == pytest.approx(7 / 24) and c["sufficiency"] == pytest.approx(-7 / 24)
    with pytest.raises(ValueError, match="labels must"):
        faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES, np.array([0, 2]))
    with pytest.raises(ValueError, match="scores must have shape"):
        faithfulness(cue_proba, FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES[:, :3])
    with pytest.raises(ValueError, match="predict_proba must return"):
        faithfulness(lambda t, n: np.ones(len(t)), FAITH_TOKENS, FAITH_LENGTHS, FAITH_SCORES)


def test_faithfulness_deletes_rather_than_masks():
    """A classifier that looks only at the first token: removing token 0 must shift the text left."""
    def first_is_cue(tokens, lengths):
        f = ((tokens[:, 0] == CUE) & (lengths > 0)).astype(float)
        return np.stack([1 - f, f], 1)
    # [3 7 2] predicted class 0 (p0 = 1); removing the top token (0) gives [7 2] -> p0 = 0: comp 1
    out = faithfulness(first_is_cue, np.array([[3, 7, 2]]), np.array([3]), np.array([[1.0, 0.0, 0.0]]),
                       k_fraction=0.3, bins=(0.3,))
    assert out["comprehensiveness"] == pytest.approx(1.0)


# -- agreement -----------------------------------------------------------------------------------
def test_pearson_kendall_hand():
    a = np.array([[1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 2.0, 0.0]])
    b = np.array([[1.0, 3.0, 2.0, -5.0], [1.0, 2.0, 3.0, 0.0]])
    lengths = np.array([3, 3])
    # inst0 centred: [-1 0 1], [-1 1 0] -> r = 1 / 2; inst1: [-1/3 -1/3 2/3], [-1 0 1] -> 1/sqrt(2/3 * 2)
    assert pearson(a, b, lengths) == pytest.approx((0.5 + 1 / np.sqrt(4 / 3)) / 2)
    # inst0: pairs (0,1) C, (0,2) C, (1,2) D -> (2 - 1) / 3 = 1/3
    # inst1: a ties on (0,1); (0,2), (1,2) concordant -> tau_b = 2 / sqrt((3 - 1) * 3) = 2 / sqrt(6)
    assert kendall_tau(a, b, lengths) == pytest.approx((1 / 3 + 2 / np.sqrt(6)) / 2)
    # an undefined instance (constant map or a single token) is left out of the mean
    assert pearson(a, b, np.array([3, 1])) == pytest.approx(0.5)
    assert np.isnan(kendall_tau(a, b, np.array([1, 0])))


@pytest.mark.parametrize("seed", [0, 1])
def test_pearson_kendall_vs_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n, t = 6, int(rng.integers(4, 20))
    a = rng.integers(0, 4, (n, t)).astype(float)  # many ties
    b = a + rng.normal(size=(n, t)) * 2
    b[0] = rng.integers(0, 3, t)
    lengths = rng.integers(3, t + 1, n)
    rs = [stats.pearsonr(a[i, :lengths[i]], b[i, :lengths[i]])[0] for i in range(n)]
    ts = [stats.kendalltau(a[i, :lengths[i]], b[i, :lengths[i]])[0] for i in range(n)]
    assert pearson(a, b, lengths) == pytest.approx(np.nanmean(rs), abs=1e-10)
    assert kendall_tau(a, b, lengths) == pytest.approx(np.nanmean(ts), abs=1e-10)


def test_agreement_errors():
    with pytest.raises(ValueError, match="b must have the shape"):
        pearson(np.zeros((2, 3)), np.zeros((2, 4)), np.array([3, 3]))
    with pytest.raises(ValueError, match="lengths must be"):
        kendall_tau(np.zeros((2, 3)), np.zeros((2, 3)), np.array([3]))


def test_gradient_importance_linear():
    # logits = [0, sum_t c_t sum_d e_td]: d logit_1 / d e_t = c_t * ones(D) -> norm |c_t| sqrt(D)
    c = jnp.array([1.0, -2.0, 0.5])
    fn = lambda e: jnp.stack([jnp.zeros(e.shape[0]), jnp.einsum("ntd,t->n", e, c)], 1)  # noqa: E731
    e = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)), jnp.float32)
    g = gradient_importance(fn, e, jnp.array([1, 1]), output="logit")
    np.testing.assert_allclose(np.asarray(g), np.abs(np.asarray(c))[None].repeat(2, 0) * 2.0, rtol=1e-6)
    # prob: d softmax_1 / d e_t = p1 p0 * c_t -> norm p1 p0 |c_t| sqrt(D)
    z = np.einsum("ntd,t->n", np.asarray(e), np.asarray(c))
    p1 = 1 / (1 + np.exp(-z))
    gp = gradient_importance(fn, e, jnp.array([1, 1]))
    np.testing.assert_allclose(np.asarray(gp), (p1 * (1 - p1))[:, None] * np.abs(np.asarray(c)) * 2, rtol=1e-5)


# -- X-MuTeST ---------------------------------------------------------------------------------
def test_ngram_removal_scores_hand():
    # text [7 1 2], target 1, p_full = 1/3; removal differences d = p_full - p(without window):
    #   unigrams: -7 -> [1 2] 0: +1/3;  -1 -> [7 2] 1/2: -1/6;  -2 -> [7 1]: -1/6
    #   bigrams:  -(7 1) -> [2]: +1/3;  -(1 2) -> [7] 1: -2/3;  trigram -> []: +1/3
    # token 0: (.5/3 + .3/3 + .2/3) / 3 windows = 1/9
    # token 1: (-.5/6 + .3/3 - .3*2/3 + .2/3) / 4 = (-7/60) / 4 = -7/240
    # token 2: (-.5/6 - .3*2/3 + .2/3) / 3 = (-13/60) / 3 = -13/180
    tok, lengths = np.array([[7, 1, 2, 0]]), np.array([3])
    raw = ngram_removal_scores(cue_proba, tok, lengths, np.array([1]), normalize=False)
    np.testing.assert_allclose(raw, [[1 / 9, -7 / 240, -13 / 180, 0.0]], atol=1e-12)
    norm = ngram_removal_scores(cue_proba, tok, lengths, np.array([1]))
    np.testing.assert_allclose(norm, raw / raw.sum(), atol=1e-12)   # the sum (7/720) is positive
    # target None = predicted class 0 (p0 = 2/3): every d flips sign -> sum < 0: left unnormalised
    np.testing.assert_allclose(ngram_removal_scores(cue_proba, tok, lengths), -raw, atol=1e-12)
    # unigrams only: the scores are the unigram drops times 0.5
    uni = ngram_removal_scores(cue_proba, tok, lengths, np.array([1]), ns=(1,), normalize=False)
    np.testing.assert_allclose(uni, [[0.5 / 3, -0.5 / 6, -0.5 / 6, 0.0]], atol=1e-12)


def test_ngram_keep_mode_is_the_notebook():
    # the notebook's code: the n-gram alone, d = mean_c |p(x) - p(ngram)|, p(x) = [2/3, 1/3]
    #   [7]: [0 1] -> 2/3; [1], [2]: [1 0] -> 1/3; [7 1]: [.5 .5] -> 1/6; [1 2] -> 1/3; [7 1 2] -> 0
    # token 0: (.5*2/3 + .3/6 + 0) / 3;  token 1: (.5/3 + .3/6 + .3/3 + 0) / 4;  token 2: (.5/3 + .3/3) / 3
    tok, lengths = np.array([[7, 1, 2]]), np.array([3])
    got = ngram_removal_scores(cue_proba, tok, lengths, mode="keep", diff="abs_mean", normalize=False)
    want = np.array([[(1 / 3 + 0.05) / 3, (1 / 6 + 0.05 + 0.1) / 4, (1 / 6 + 0.1) / 3]])
    np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(ValueError, match="weights must be given"):
        ngram_removal_scores(cue_proba, tok, lengths, ns=(4,))
    with pytest.raises(ValueError, match="mode"):
        ngram_removal_scores(cue_proba, tok, lengths, mode="mask")


def test_scores_to_rationales():
    rng = np.random.default_rng(0)
    s = rng.random((3, 12))
    lengths = np.array([12, 4, 1])
    r = scores_to_rationales(s, lengths)
    # X-MuTeST rule: 5 tokens when length > 10, length // 2 otherwise, 1 for a one-token text
    assert r.sum(1).tolist() == [5, 2, 1]
    assert set(np.flatnonzero(r[0])) == set(np.argsort(-s[0])[:5])
    assert set(np.flatnonzero(scores_to_rationales(s, lengths, lowest=True)[0])) == set(np.argsort(s[0])[:5])
    assert not r[1, 4:].any() and not r[2, 1:].any()
    # top 25%: ceil(3) = 3, ceil(1) = 1, ceil(.25) = 1
    assert scores_to_rationales(s, lengths, top_fraction=0.25).sum(1).tolist() == [3, 1, 1]
    t = scores_to_rationales(np.array([[0.1, 0.5, 0.7, 0.9]]), np.array([3]), threshold=0.5)
    assert t.tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="at most one"):
        scores_to_rationales(s, lengths, top_fraction=0.1, threshold=0.2)


def test_union_rationales():
    assert union_rationales(M([[1, 0, 0]]), np.array([[0, 0, 1]])).tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="b must have shape"):
        union_rationales(M([[1, 0, 0]]), M([[1, 0]]))


def test_load_external_rationales(tmp_path):
    lengths = np.array([4, 3, 2])
    jsonl = tmp_path / "llm.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "rationale": [0, 2]},          # indices (length 4 != 2 entries)
        {"id": 7, "rationale": [1, 0, 1]},         # 3 zeros/ones for a 3-token text: a mask
        {"id": "c", "indices": [1, 0]},            # explicitly indices
    ]))
    r = load_external_rationales(jsonl, ["a", 7, "c"], lengths, width=5)
    assert r.tolist() == [[True, False, True, False, False], [True, False, True, False, False],
                          [True, True, False, False, False]]
    obj = tmp_path / "llm.json"
    obj.write_text(json.dumps({"a": [True, False, False, True], "b": {"mask": [0, 1]}}))
    r = load_external_rationales(obj, ["a", "b", "zz"], np.array([4, 2, 3]), missing="empty")
    assert r.tolist() == [[True, False, False, True], [False, True, False, False], [False] * 4]
    with pytest.raises(ValueError, match="no rationale for id 'zz'"):
        load_external_rationales(obj, ["zz"], np.array([3]))
    with pytest.raises(ValueError, match="has 4 entries but the text has 3 tokens"):
        load_external_rationales(obj, ["a"], np.array([3]))
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        load_external_rationales(jsonl, ["a"], np.array([2]))
    with pytest.raises(ValueError, match="does not exist"):
        load_external_rationales(tmp_path / "nope.json", ["a"], np.array([3]))
    with pytest.raises(ValueError, match="width"):
        load_external_rationales(jsonl, ["a"], np.array([4]), width=3)
