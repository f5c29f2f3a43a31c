"""Tokenizers and text loaders (HateXplain JSON, ERASER JSONL, CSV/TSV, the synthetic planted-cue
set): round trips, rationale alignment, clear errors on malformed files. numpy only (fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxattn.models.tokenizer import (PAD, UNK, ByteTokenizer, WordTokenizer, load_tokenizer, pad_batch,
                                      split_words)
from jaxattn.train.text_data import (build_text_data, load_delimited, load_eraser, load_hatexplain, load_text,
                                     synthetic_planted)


# -- tokenizers ------------------------------------------------------------------------------
def test_word_tokenizer_round_trip_and_json(tmp_path):
    texts = ["The cat sat.", "the dog sat, happily!", "A cat"]
    tok = WordTokenizer.build(texts)
    assert tok.itos[:5] == ["<pad>", "<unk>", "cat", "sat", "the"]  # by frequency (2 each), ties alphabetical
    ids = tok.encode("the cat sat happily !")
    assert PAD not in ids and UNK not in ids
    assert tok.decode(ids) == ["the", "cat", "sat", "happily", "!"]
    assert tok.encode("zebra the") == [UNK, tok.stoi["the"]]
    tok.save(tmp_path / "v.json")
    back = load_tokenizer(tmp_path / "v.json")
    assert isinstance(back, WordTokenizer) and back.itos == tok.itos
    assert back.encode(texts[1]) == tok.encode(texts[1])
    assert WordTokenizer.build(texts, min_freq=2).itos == ["<pad>", "<unk>", "cat", "sat", "the"]
    assert WordTokenizer.build(texts, max_size=4).vocab_size == 4
    assert split_words("Don't stop") == ["don", "'", "t", "stop"]


def test_byte_tokenizer_round_trip_and_bad_json(tmp_path):
    tok = ByteTokenizer()
    s = "héllo, wörld"
    ids = tok.encode(s)
    assert min(ids) >= 2 and max(ids) < tok.vocab_size and tok.decode(ids) == s
    assert tok.encode(["ab", "c"]) == tok.encode("ab c")
    tok.save(tmp_path / "b.json")
    assert isinstance(load_tokenizer(tmp_path / "b.json"), ByteTokenizer)
    (tmp_path / "x.json").write_text(json.dumps({"kind": "bpe"}))
    with pytest.raises(ValueError, match="not a saved tokenizer"):
        load_tokenizer(tmp_path / "x.json")
    with pytest.raises(ValueError, match="itos must start"):
        WordTokenizer(["a", "b"])


def test_pad_batch():
    x, n = pad_batch([[5, 6, 7], [8], []], max_len=2)
    np.testing.assert_array_equal(x, [[5, 6], [8, 0], [0, 0]])
    np.testing.assert_array_equal(n, [2, 1, 0])


# -- synthetic ---------------------------------------------------------------------------------
def test_synthetic_rationales_are_the_cues():
    tr, te, un, classes = synthetic_planted(200, 50, 30, seed=3)
    assert len(tr) == 200 and len(te) == 50 and len(un) == 30 and classes == ["negative", "positive"]
    for ex in tr + te:
        # independent re-derivation of label and rationale from the words
        cues = [j for j, w in enumerate(ex.words) if w.startswith(("pos", "neg"))]
        assert cues
        pols = {(w.startswith("pos")) != (j > 0 and ex.words[j - 1] == "not")
                for j, w in ((j, ex.words[j]) for j in cues)}
        assert pols == {bool(ex.label)}
        gold = {j for j in cues} | {j - 1 for j in cues if j and ex.words[j - 1] == "not"}
        assert {j for j, r in enumerate(ex.rationale) if r} == gold
    assert all(e.label == -1 and e.rationale is None for e in un)
    labels = np.array([e.label for e in tr])
    assert 0.3 < labels.mean() < 0.7
    assert synthetic_planted(5, 5, 0, seed=3)[0][0].words == synthetic_planted(5, 5, 0, seed=3)[0][0].words


def test_load_text_default_and_batches():
    d = load_text(None, n_train=40, n_test=10, n_unlabeled=12)
    assert d.x_train.dtype == np.int32 and d.x_train.shape[1] == d.max_len <= 24
    assert d.hr_train.all() and (d.r_train.sum(1) >= 1).all()
    assert np.all(d.r_train[np.arange(d.max_len)[None] >= d.len_train[:, None]] == 0)
    b1, b2 = d.train_batch(0, 3, 8, unlabeled=True), d.train_batch(0, 3, 8, unlabeled=True)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k])  # a pure function of (seed, step)
    assert b1["u_tokens"].shape == (8, d.max_len)
    # one epoch of 5 batches covers every training example once
    seen = np.concatenate([d._order(0, s, 8, 40, 0) for s in range(5)])
    assert sorted(seen) == list(range(40))
    batches = list(d.test_batches(4))
    assert [k for _, k in batches] == [4, 4, 2] and all(b["tokens"].shape[0] == 4 for b, _ in batches)


# -- files -----------------------------------------------------------------------------------
def _hatexplain(tmp_path, bad=False):
    recs = {
        "1": {"post_id": "1", "post_tokens": ["you", "are", "vile", "people"],
              "annotators": [{"label": "offensive"}, {"label": "offensive"}, {"label": "normal"}],
              "rationales": [[0, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0 if not bad else 1, 1][:4 if not bad else 5]]},
        "2": {"post_id": "2", "post_tokens": ["nice", "day"], "annotators": [{"label": "normal"}] * 3,
              "rationales": []},
        "3": {"post_id": "3", "post_tokens": ["a", "b"],  # no majority: dropped
              "annotators": [{"label": "normal"}, {"label": "offensive"}, {"label": "hatespeech"}], "rationales": []},
        "4": {"post_id": "4", "post_tokens": ["hate", "them"], "annotators": [{"label": "hatespeech"}] * 2,
              "rationales": [[1, 1], [1, 0]]},
    }
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps(recs))
    return p


def test_hatexplain(tmp_path):
    rows, _ = load_hatexplain(_hatexplain(tmp_path))
    assert [r[1] for r in rows] == ["offensive", "normal", "hatespeech"]
    assert rows[0][2] == [0.0, 0.0, 1.0, 0.0]  # per-token majority: [0, 1/3, 2/3, 1/3]
    assert rows[1][2] is None and rows[2][2] == [1.0, 1.0]  # mean 0.5 counts
    d = load_text(str(tmp_path / "dataset.json"), test_fraction=0.34)
    assert d.classes == ["hatespeech", "normal", "offensive"] and len(d.y_train) + len(d.y_test) == 3
    with pytest.raises(ValueError, match="rationale has 5 entries but post_tokens has 4"):
        load_hatexplain(_hatexplain(tmp_path, bad=True))


def test_eraser(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d1").write_text("a great film\nwith bad acting")
    (tmp_path / "docs" / "d2").write_text("boring and slow")
    ann = lambda aid, doc, label, spans: {"annotation_id": aid, "classification": label, "docids": [doc],  # noqa: E731
                                          "evidences": [[{"docid": doc, "start_token": s, "end_token": e}
                                                         for s, e in spans]]}
    (tmp_path / "train.jsonl").write_text(json.dumps(ann("x1", "d1", "POS", [(1, 2), (4, 6)])) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(ann("x2", "d2", "NEG", [(0, 1)])) + "\n")
    splits = load_eraser(tmp_path)
    words, label, rat = splits["train"][0]
    assert words == ["a", "great", "film", "with", "bad", "acting"] and label == "POS"
    assert rat == [0, 1, 0, 0, 1, 1]
    d = load_text(str(tmp_path), format="eraser")
    assert d.classes == ["NEG", "POS"] and d.y_test.tolist() == [0]
    np.testing.assert_array_equal(d.r_test[0, :3], [1, 0, 0])
    (tmp_path / "test.jsonl").write_text(json.dumps(ann("x2", "d2", "NEG", [(2, 9)])) + "\n")
    with pytest.raises(ValueError, match=r"evidence span \[2, 9\) outside document 'd2' of 3 tokens"):
        load_eraser(tmp_path)
    with pytest.raises(ValueError, match="train.jsonl"):
        load_eraser(tmp_path / "docs")


@pytest.mark.parametrize("delim,suffix", [(",", "csv"), ("\t", "tsv")])
def test_delimited(tmp_path, delim, suffix):
    p = tmp_path / f"d.{suffix}"
    p.write_text(delim.join(["text", "label", "rationale"]) + "\n" + delim.join(["good movie", "pos", "1 0"]) + "\n"
                 + delim.join(["bad", "neg", ""]) + "\n" + delim.join(["meh film", "neg", "0 1"]) + "\n")
    rows = load_delimited(p, delim)
    assert rows[0] == (["good", "movie"], "pos", [1.0, 0.0]) and rows[1][2] is None
    d = load_text(str(p), test_fraction=0.34)
    assert d.classes == ["neg", "pos"] and d.hr_train.sum() + d.hr_test.sum() == 2
    p.write_text(delim.join(["text", "label", "rationale"]) + "\n" + delim.join(["good movie", "pos", "1"]) + "\n")
    with pytest.raises(ValueError, match="rationale has 1 entries but the text has 2 words"):
        load_delimited(p, delim)


def test_byte_rationales_and_errors(tmp_path):
    from jaxattn.train.text_data import Example

    tr = [Example(["ab", "c"], 1, [0.0, 1.0])]
    d = build_text_data(tr, tr, classes=["n", "p"], source="t", tokenizer="byte")
    np.testing.assert_array_equal(d.x_train[0, :4], np.array(list(b"ab c")) + 2)
    np.testing.assert_array_equal(d.r_train[0, :4], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="rationale has 1 entries but the text has 2 words"):
        build_text_data([Example(["a", "b"], 0, [1.0])], tr, classes=["n", "p"], source="t")
    with pytest.raises(ValueError, match="label 5 outside"):
        build_text_data([Example(["a"], 5)], tr, classes=["n", "p"], source="t")
    with pytest.raises(ValueError, match="no such file"):
        load_text(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="format must be one of"):
        load_text(None, format="xml")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_text(str(tmp_path / "f.txt"))
