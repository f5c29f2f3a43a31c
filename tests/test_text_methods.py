"""Text classifiers and the attention-training methods: the BiLSTM against a numpy LSTM oracle, AT /
iAT perturbations against hand-derived gradients, VAT's power iteration against the Hessian's
dominant eigenvector, iVAT's span, no perturbation at evaluation, the rationale loss by hand,
errors, and a tiny ``text`` CLI run with resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.models.text import AdditivePool, BiLSTMClassifier, TextClassifier, TextTransformer, length_mask
from jaxattn.train.text import (TextConfig, at_perturbation, difference_basis, iat_perturbation, make_loss_fn,
                                make_text_trainer, rationale_loss, vat_perturbation)
from jaxattn.train.text_data import load_text


def _batch(rng, b=4, t=7, vocab=30, min_len=1):
    lengths = rng.integers(min_len, t + 1, b).astype(np.int32)
    lengths[0] = t
    tokens = rng.integers(2, vocab, (b, t)).astype(np.int32)
    tokens[np.arange(t)[None] >= lengths[:, None]] = 0
    return jnp.asarray(tokens), jnp.asarray(lengths)


# -- the models ------------------------------------------------------------------------------
def _sig(x):
    return 1 / (1 + np.exp(-x))


def _np_lstm(x, wi, bi, wh):
    """Plain numpy LSTM over ``x [L, I]`` (gates i, f, g, o)."""
    hd = wh.shape[0]
    h, c, out = np.zeros(hd), np.zeros(hd), []
    for xt in x:
        z = xt @ wi + bi + h @ wh
        i, f, g, o = z[:hd], z[hd:2 * hd], z[2 * hd:3 * hd], z[3 * hd:]
        c = _sig(f) * c + _sig(i) * np.tanh(g)
        h = _sig(o) * np.tanh(c)
        out.append(h)
    return np.array(out)


def test_bilstm_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    m = BiLSTMClassifier(30, 3, embed_dim=5, hidden=4, rngs=nnx.Rngs(1))
    tokens, lengths = _batch(rng, b=3, t=6)
    emb = m.embed(tokens)
    h = np.asarray(m.encode(emb, lengths), np.float64)
    p = lambda lin: np.asarray(lin, np.float64)  # noqa: E731
    for b in range(3):
        n = int(lengths[b])
        x = np.asarray(emb[b, :n], np.float64)
        hf = _np_lstm(x, p(m.fwd.inp.kernel[...]), p(m.fwd.inp.bias[...]), p(m.fwd.rec.kernel[...]))
        hb = _np_lstm(x[::-1], p(m.bwd.inp.kernel[...]), p(m.bwd.inp.bias[...]), p(m.bwd.rec.kernel[...]))[::-1]
        np.testing.assert_allclose(h[b, :n], np.concatenate([hf, hb], -1), atol=1e-5)
        np.testing.assert_array_equal(h[b, n:], 0.0)
    # the full forward: additive attention pooling computed from the oracle hidden states
    logits, att = m(tokens, lengths, return_attention=True)
    s = np.tanh(h @ p(m.pool.proj.kernel[...]) + p(m.pool.proj.bias[...])) @ p(m.pool.score.kernel[...])[:, 0]
    valid = np.arange(6)[None] < np.asarray(lengths)[:, None]
    e = np.where(valid, np.exp(s - s.max(1, keepdims=True)), 0)
    a = e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(att, a, atol=1e-5)
    ref = np.einsum("bt,btd->bd", a, h) @ p(m.classifier.kernel[...]) + p(m.classifier.bias[...])
    np.testing.assert_allclose(logits, ref, atol=1e-4)


@pytest.mark.parametrize("cls", [BiLSTMClassifier, TextTransformer])
def test_pads_and_score_perturbation(cls):
    rng = np.random.default_rng(1)
    m = cls(30, 2, rngs=nnx.Rngs(0), **({"embed_dim": 8, "hidden": 8} if cls is BiLSTMClassifier else
                                        {"dim": 16, "depth": 1, "heads": 2}))
    tokens, lengths = _batch(rng, b=4, t=9, min_len=2)
    lo, att = m(tokens, lengths, return_attention=True)
    noisy = jnp.where(length_mask(lengths, 9), tokens, 7)  # different pad ids: nothing changes
    np.testing.assert_allclose(m(noisy, lengths), lo, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(att)[~np.asarray(length_mask(lengths, 9))], 0.0)
    np.testing.assert_allclose(att.sum(1), 1.0, atol=1e-5)
    # score_perturbation is added to the pooling scores before the masked softmax
    r = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    _, s = m.features(m.embed(tokens), lengths)
    _, att_r = m(tokens, lengths, score_perturbation=r, return_attention=True)
    valid = np.asarray(length_mask(lengths, 9))
    z = np.where(valid, np.asarray(s + r, np.float64), -np.inf)
    ref = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(att_r, ref / ref.sum(1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="score_perturbation"):
        m(tokens, lengths, score_perturbation=r[:, :3])
    with pytest.raises(ValueError, match="tokens"):
        m(tokens.astype(jnp.float32), lengths)
    with pytest.raises(ValueError, match="lengths"):
        m(tokens, lengths[:2])


# -- AT / iAT --------------------------------------------------------------------------------
def _linear_pool_problem(seed, b=5, t=6, c=3):
    """``head(r)``: logits ``z_c = sum_t softmax(s + r)_t V[b, t, c]`` over each row's valid tokens."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, t)).astype(np.float32)
    v = rng.normal(size=(b, t, c)).astype(np.float32)
    lengths = rng.integers(2, t + 1, b)
    lengths[0] = t
    mask = np.arange(t)[None] < lengths[:, None]
    labels = rng.integers(0, c, b)

    def head(r):
        z = jnp.where(mask, s + r, -1e30)
        a = jax.nn.softmax(z, -1)
        return jnp.einsum("bt,btc->bc", a, v)

    def grad_oracle():  # dCE/ds_t = sum_c (p_c - y_c) a_t (V_tc - z_c)
        z = np.where(mask, s.astype(np.float64), -np.inf)
        a = np.exp(z - z.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        logits = np.einsum("bt,btc->bc", a, v)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = np.eye(c)[labels]
        return np.einsum("bc,bt,btc->bt", p - y, a, v - logits[:, None, :])

    return head, jnp.asarray(s), jnp.asarray(labels), jnp.asarray(mask), grad_oracle()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_at_perturbation_norm_and_direction(seed):
    head, s, labels, mask, g = _linear_pool_problem(seed)
    eps = float(np.random.default_rng(seed).uniform(0.1, 3.0))
    r = np.asarray(at_perturbation(head, s, labels, mask, eps), np.float64)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), eps, rtol=1e-5)
    assert np.all(r[~np.asarray(mask)] == 0)
    np.testing.assert_allclose(r, eps * g / np.linalg.norm(g, axis=1, keepdims=True), atol=1e-5)
    # it is adversarial: the loss rises more than for a random perturbation of the same norm
    ce = lambda rr: float(optax.softmax_cross_entropy_with_integer_labels(head(rr), labels).sum())  # noqa: E731
    rand = np.where(mask, np.random.default_rng(9).normal(size=r.shape), 0)
    rand = eps * rand / np.linalg.norm(rand, axis=1, keepdims=True)
    assert ce(jnp.asarray(r, jnp.float32)) > ce(jnp.asarray(rand, jnp.float32))


def test_iat_perturbation_paper_and_repo_forms():
    head, s, labels, mask, g = _linear_pool_problem(3)
    eps = 0.7
    sn, mn = np.asarray(s, np.float64), np.asarray(mask)
    b = sn.shape[0]
    d = np.zeros((b, b, sn.shape[1]))
    for i in range(b):
        for k in range(b):
            diff = np.where(mn[i], sn[i] - sn[k], 0)
            nrm = np.linalg.norm(diff)
            d[i, k] = diff / nrm if nrm > 0 else 0
    np.testing.assert_allclose(difference_basis(s, mask), d, atol=1e-5)
    w = np.einsum("bt,bkt->bk", g, d)
    ref = np.einsum("bk,bkt->bt", w, d)
    ref = eps * ref / np.linalg.norm(ref, axis=1, keepdims=True)
    r = np.asarray(iat_perturbation(head, s, labels, mask, eps, "paper"))
    np.testing.assert_allclose(r, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), eps, rtol=1e-5)
    r_repo = np.asarray(iat_perturbation(head, s, labels, mask, eps, "repo"))
    np.testing.assert_allclose(r_repo, -eps * g / np.linalg.norm(g, axis=1, keepdims=True), atol=1e-5)


# -- VAT / iVAT ------------------------------------------------------------------------------
def _linear_kl_problem(seed, b=3, t=6, c=3):
    """logits = (s + r) @ A_b: the KL's Hessian at r = 0 is ``A (diag p - p p^T) A^T``."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(b, t))
    a = rng.normal(size=(b, t, c)) * 2
    lengths = np.array([t, t - 2, 3])[:b]
    mask = np.arange(t)[None] < lengths[:, None]
    p_logits = np.einsum("bt,btc->bc", s, a)
    lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)

    def kl(r):
        lq = jax.nn.log_softmax(jnp.einsum("bt,btc->bc", jnp.asarray(s, jnp.float32) + r,
                                           jnp.asarray(a, jnp.float32)), -1)
        return jnp.sum(jnp.exp(lp) * (lp - lq))

    p = np.exp(p_logits - p_logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    eig = []
    for i in range(b):
        n = lengths[i]
        h = a[i, :n] @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ a[i, :n].T
        vals, vecs = np.linalg.eigh(h)
        assert vals[-1] > 1.5 * vals[-2]  # a clear dominant direction
        eig.append(vecs[:, -1])
    return kl, jnp.asarray(mask), lengths, eig


def test_vat_direction_is_dominant_hessian_eigenvector():
    kl, mask, lengths, eig = _linear_kl_problem(0)
    eps = 2.5
    r = np.asarray(vat_perturbation(kl, jax.random.key(0), mask, eps=eps, xi=1e-3, n_power=30))
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), eps, rtol=1e-5)
    for i, v in enumerate(eig):
        n = lengths[i]
        assert np.all(r[i, n:] == 0)
        cos = abs(r[i, :n] @ v) / eps
        assert cos > 0.999, (i, cos)
    # one power iteration from a random start is not yet the eigenvector (the test can fail)
    r1 = np.asarray(vat_perturbation(kl, jax.random.key(0), mask, eps=eps, xi=1e-3, n_power=0))
    assert min(abs(r1[i, :lengths[i]] @ v) / eps for i, v in enumerate(eig)) < 0.99


def test_ivat_perturbation_lies_in_the_difference_span():
    kl, mask, lengths, _ = _linear_kl_problem(1)
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=mask.shape), jnp.float32)
    basis = difference_basis(s, mask)
    r = np.asarray(vat_perturbation(kl, jax.random.key(1), mask, eps=0.5, xi=1e-3, n_power=2, basis=basis))
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 0.5, rtol=1e-5)
    for i in range(r.shape[0]):
        bi = np.asarray(basis[i])  # [K, T]
        coef, *_ = np.linalg.lstsq(bi.T, r[i], rcond=None)
        np.testing.assert_allclose(bi.T @ coef, r[i], atol=1e-4)
    # and it increases the KL more than the unconstrained random start of the same span
    assert float(kl(jnp.asarray(r))) > 0


# -- training vs evaluation -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data():
    return load_text(None, n_train=48, n_test=20, n_unlabeled=16)


def _tiny_cfg(**kw):
    base = dict(batch_size=8, steps=2, hidden=8, embed_dim=8, eval_every=0, log_every=1)
    base.update(kw)
    return TextConfig(**base)


class _Bag(TextClassifier):
    """Embedding -> tanh(Linear) per token -> attention pooling: a cheap stand-in encoder."""

    def __init__(self, vocab: int, classes: int, rngs: nnx.Rngs):
        self.embedding = nnx.Embed(vocab, 8, rngs=rngs)
        self.mix = nnx.Linear(8, 8, rngs=rngs)
        self.pool = AdditivePool(8, 4, rngs=rngs)
        self.classifier = nnx.Linear(8, classes, rngs=rngs)

    def encode(self, emb, lengths):
        return jnp.tanh(self.mix(emb))


@pytest.mark.parametrize("method", ["at", "iat", "vat", "ivat"])
def test_perturbation_only_in_training(tiny_data, method):
    cfg = _tiny_cfg(method=method, eps=5.0, lam=1.0)
    trainer = make_text_trainer(cfg, tiny_data, lambda rngs: _Bag(tiny_data.tokenizer.vocab_size, 2, rngs))
    batch = tiny_data.train_batch(0, 0, 8, unlabeled=True)
    model = trainer.model
    plain = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["lengths"]))
    ce = float(optax.softmax_cross_entropy_with_integer_labels(plain, jnp.asarray(batch["label"])).mean())
    loss, metrics = jax.jit(make_loss_fn(cfg))(model, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    assert float(metrics["adv"]) > 0 and float(loss) > ce + 1e-4  # the training loss is perturbed
    # evaluation: exactly the plain model, whatever the method
    out = jax.device_get(trainer.eval_step({k: batch[k] for k in ("tokens", "lengths", "label")}))
    em = trainer.eval_model
    lo, att = em(jnp.asarray(batch["tokens"]), jnp.asarray(batch["lengths"]), return_attention=True)
    np.testing.assert_allclose(out["probs"], jax.nn.softmax(lo, -1), atol=1e-6)
    np.testing.assert_allclose(out["attention"], att, atol=1e-6)
    np.testing.assert_allclose(out["loss"], optax.softmax_cross_entropy_with_integer_labels(
        lo, jnp.asarray(batch["label"])), atol=1e-5)


def test_rationale_loss_by_hand():
    att = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.2, 0.3, 0.5, 0.0]])
    rat = jnp.array([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])  # rat[0, 3] is a pad: ignored
    has = jnp.array([True, False])
    mask = jnp.array([[True, True, True, False], [True, True, True, False]])
    got = float(rationale_loss(att, rat, has, mask, "ce"))
    np.testing.assert_allclose(got, -(0.5 * np.log(0.5) + 0.5 * np.log(0.25)), rtol=1e-6)
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731  BCE-with-logits(x, y) = softplus(x) - x y
    bce = ((sp(0.5) - 0.5) + sp(0.25) + (sp(0.25) - 0.25)) / 3
    np.testing.assert_allclose(float(rationale_loss(att, rat, has, mask, "bce")), bce, rtol=1e-6)
    assert float(rationale_loss(att, rat, jnp.array([False, False]), mask)) == 0.0
    # the rationale method's training loss is CE + lam * R
    with pytest.raises(ValueError, match="rationale_loss"):
        rationale_loss(att, rat, has, mask, "l2")


def test_errors():
    with pytest.raises(ValueError, match="--method"):
        TextConfig(method="fgsm")
    with pytest.raises(ValueError, match="--model"):
        TextConfig(model="gru")
    with pytest.raises(ValueError, match="--iat-form"):
        TextConfig(iat_form="x")
    with pytest.raises(ValueError, match="--external-rationales"):
        TextConfig(external_rationales="/nonexistent/llm.json")
    from jaxattn.train.__main__ import main

    with pytest.raises(SystemExit):
        main(["text", "--method", "fgsm"])
    with pytest.raises(SystemExit):
        main(["text", "--data", "/nonexistent/file.csv", "--steps", "1"])


def test_text_cli_end_to_end_and_resume(tmp_path, capsys):
    from jaxattn.train.__main__ import main

    out = tmp_path / "run"
    argv = ["text", "--method", "iat", "--n-train", "48", "--n-test", "16", "--n-unlabeled", "8",
            "--batch-size", "8", "--hidden", "8", "--embed-dim", "8", "--eval-every", "0", "--ckpt-every", "2",
            "--log-every", "1", "--eval-batch-size", "16", "--out", str(out), "--no-progress"]
    assert main([*argv, "--steps", "2"]) == 0
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and 0 <= summary["test_acc"] <= 1
    for k in ("pearson", "kendall_tau", "token_f1", "iou_f1", "comprehensiveness", "sufficiency",
              "xm_token_f1", "xm_iou_f1", "xm_comprehensiveness", "xm_sufficiency"):
        assert k in summary and np.isfinite(summary[k]), k
    assert len((out / "explanations.jsonl").read_text().splitlines()) == 16
    assert (out / "vocab.json").exists() and (out / "metrics.csv").exists()
    assert (out / "attention.png").stat().st_size > 2000  # tokens shaded by attention
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[-1].startswith("3,")


def test_xmutest_stage2_recovers_cues_of_an_oracle_classifier(tiny_data, tmp_path, monkeypatch):
    """X-MuTeST stage 2 as the text task runs it: with a classifier that only counts cue words, the
    n-gram-removal rationales find the planted cues; the union with external rationales (here the
    gold ones, keyed by the ids written to explanations.jsonl) contains every gold token."""
    import jaxattn.train.text as text_mod

    itos = tiny_data.tokenizer.itos
    sign = np.array([1.0 if w.startswith("pos") else -1.0 if w.startswith("neg") else 0.0 for w in itos])

    def oracle(tokens, lengths):
        tokens = np.asarray(tokens)
        valid = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
        p1 = 1 / (1 + np.exp(-3.0 * (sign[tokens] * valid).sum(1)))
        return np.stack([1 - p1, p1], -1)

    monkeypatch.setattr(text_mod, "make_predict_proba", lambda trainer, batch_size=256: oracle)
    x, lengths = tiny_data.x_test, tiny_data.len_test
    arr = {"pred": oracle(x, lengths).argmax(-1), "attention": np.zeros(x.shape, np.float32)}
    out_path = tmp_path / "explanations.jsonl"
    m = text_mod.xmutest_explanations(None, tiny_data, arr, 0.15, out_path)
    recs = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(recs) == len(lengths) and [r["id"] for r in recs] == [str(i) for i in range(len(lengths))]
    cue_hits = []
    for r, n in zip(recs, lengths):
        assert len(r["tokens"]) == len(r["xmutest_scores"]) == n
        assert len(r["xmutest_rationale"]) == int(np.ceil(0.15 * n))
        cues = {j for j, w in enumerate(r["tokens"]) if w.startswith(("pos", "neg"))}
        best = int(np.argmax(r["xmutest_scores"]))  # the highest-scoring token is a cue
        assert best in cues and best in r["xmutest_rationale"], (r["tokens"], r["xmutest_scores"])
        cue_hits.append(cues <= set(r["xmutest_rationale"]) or len(cues) > len(r["xmutest_rationale"]))
    assert np.mean(cue_hits) >= 0.85  # two same-sign cues saturate the oracle: the second may fall out
    assert m["xm_token_f1"] > 0.5 and np.isfinite(m["xm_comprehensiveness"]) and np.isfinite(m["xm_sufficiency"])
    assert "xm_union_token_f1" not in m

    ext = tmp_path / "llm.json"
    ext.write_text(json.dumps({r["id"]: r["gold_rationale"] for r in recs}))
    m2 = text_mod.xmutest_explanations(None, tiny_data, arr, 0.15, out_path, external=ext)
    for r in (json.loads(line) for line in out_path.read_text().splitlines()):
        assert set(r["gold_rationale"]) <= set(r["union_rationale"])
        assert set(r["xmutest_rationale"]) <= set(r["union_rationale"])
    assert m2["xm_union_token_f1"] >= m2["xm_token_f1"]
    ext.write_text(json.dumps({"0": [0]}))  # ids missing
    with pytest.raises(ValueError, match="1"):
        text_mod.xmutest_explanations(None, tiny_data, arr, 0.15, None, external=ext)
