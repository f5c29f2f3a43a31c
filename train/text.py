"""Text classification with attention-training methods on the shared loop (:mod:`jaxattn.train.loop`):
``python -m jaxattn.train text --method {vanilla,at,iat,vat,ivat,rationale} --model {bilstm,transformer}``.

Methods (all perturb the *pooling* attention scores ``s [B, T]`` before the softmax, only in the
training loss; evaluation always runs the plain model):

* ``vanilla``: cross-entropy.
* ``at`` (Attention AT, Kitada & Iyatomi 2020): ``g = dL/ds`` at ``s``; ``r = eps * g / ||g||_2`` (L2 over
  each example's tokens, ``F.normalize``'s ``max(norm, 1e-12)``), held constant;
  ``loss = CE(s) + lam * CE(s + r)`` (repository defaults ``lam_adv = 1``; ``eps`` is its ``xi``).
* ``iat`` (Attention iAT): the perturbation lives in the span of the normalised differences between
  the instance's scores and those of the other instances of the batch,
  ``D[i, k] = normalize_t(m_i * (s_i - s_k))``; ``r_i = eps * normalize_t(sum_k w_ik D[i, k])`` with
  ``w = dL/dw`` at 0, i.e. ``w_ik = <g_i, D[i, k]>`` (``iat_form="paper"``, the iAdvT-style form of
  the paper). The repository's code takes the gradient w.r.t. the already-normalised (zero)
  combination instead, so its difference basis drops out and its perturbation is
  ``-eps * g / ||g||``; ``iat_form="repo"`` reproduces that literally.
* ``vat`` (Attention VAT, Kitada & Iyatomi 2021/2022): ``p = softmax(f(s))`` held fixed;
  ``d`` = random unit vector (masked), ``n_power`` times ``d <- normalize(grad_r KL(p || f(s + r)))`` at
  ``r = xi d``;
  ``r = eps * d``; ``loss = CE + lam * mean KL(p || f(s + r))`` over the labelled batch plus, with
  ``unlabeled``, an equal-size unlabelled batch.
* ``ivat`` (Attention iVAT): VAT whose perturbation is ``normalize_t(sum_k w_ik D[i, k])`` over the
  (labelled + unlabelled) batch's difference basis; the power iteration runs on ``w`` (rows
  normalised).
* ``rationale`` (X-MuTeST stage 1, ``codes/training_with_rationales.ipynb``): ``loss = CE + lam * R``
  on examples that have a rationale, with ``R`` the cross-entropy between the normalised rationale
  mask and the attention (``rationale_loss="ce"``; KL up to a constant), or the notebook's
  ``BCEWithLogits(attention, mask)`` averaged over tokens (``"bce"``; the notebook weights it
  0.7 vs 0.3 for CE, i.e. ``lam = 7/3``).

At the end: test accuracy / macro F1, and (with :mod:`jaxattn.explain`) attention <-> gradient
agreement (Pearson, Kendall tau; L2 norm of the gradient of the predicted class probability w.r.t.
each word embedding, attention held fixed as in Jain & Wallace 2019), Token-F1 / IOU-F1 of the top-k attention
tokens vs the gold rationales, comprehensiveness / sufficiency of the attention ranking.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.models.text import BiLSTMClassifier, TextTransformer, length_mask
from jaxattn.train import loop
from jaxattn.train.metrics import classification_scores, confusion_matrix
from jaxattn.train.text_data import FORMATS, TextData, load_text

__all__ = ["METHODS", "MODELS", "TextConfig", "make_loss_fn", "make_optimizer", "make_text_trainer", "at_perturbation",
           "iat_perturbation", "vat_perturbation", "difference_basis", "rationale_loss", "masked_normalize",
           "eval_batch", "evaluate", "explain_metrics", "make_predict_proba", "train"]

METHODS = ("vanilla", "at", "iat", "vat", "ivat", "rationale")
MODELS = ("bilstm", "transformer")
FIELDS = ["step", "loss", "train_acc", "train_adv", "lr", "examples_per_s", "test_loss", "test_acc", "test_f1"]


@dataclasses.dataclass
class TextConfig:
    method: str = "vanilla"
    model: str = "bilstm"
    data: str | None = None  # None: the synthetic planted-cue set
    format: str = "auto"
    tokenizer: str = "word"
    max_len: int = 64
    min_freq: int = 1
    vocab_size: int | None = None
    test_fraction: float = 0.2
    n_train: int = 1024  # synthetic only
    n_test: int = 256
    n_unlabeled: int = 1024
    embed_dim: int = 64
    hidden: int = 64  # LSTM hidden per direction / transformer width
    depth: int = 2  # transformer blocks
    heads: int = 4
    batch_size: int = 32
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 0
    weight_decay: float = 1e-5
    clip: float = 1.0
    eps: float = 1.0  # perturbation norm (AT/iAT/VAT/iVAT)
    lam: float = 1.0  # weight of the adversarial / VAT / rationale term
    xi: float = 1e-2  # VAT finite-difference scale
    n_power: int = 1  # VAT power iterations
    iat_form: str = "paper"
    unlabeled: bool = True  # VAT/iVAT: also regularise on an unlabelled batch
    rationale_loss: str = "ce"
    top_fraction: float | None = None  # attention -> rationale: top fraction (None: mean gold fraction)
    # X-MuTeST stage 2 after training: n-gram-removal explanations of the test split (written to
    # explanations.jsonl with plausibility vs the gold rationales), optionally united with external
    # (e.g. LLM) rationales from a .json/.jsonl file keyed by test-example id
    xmutest: bool = True
    external_rationales: str | None = None
    seed: int = 0
    eval_every: int = 100
    eval_batch_size: int = 256
    ckpt_every: int = 100
    log_every: int = 10
    out: str | None = None

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/text-{self.model}-{self.method}")

    def __post_init__(self):
        checks = {"method": METHODS, "model": MODELS, "format": FORMATS, "tokenizer": ("word", "byte"),
                  "iat_form": ("paper", "repo"), "rationale_loss": ("ce", "bce")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {list(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.eps < 0 or self.lam < 0 or self.xi <= 0:
            raise ValueError(f"need eps >= 0, lam >= 0, xi > 0; got eps={self.eps}, lam={self.lam}, xi={self.xi}")
        if self.external_rationales is not None and not Path(self.external_rationales).is_file():
            raise ValueError(f"--external-rationales {self.external_rationales}: no such file")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction must be in (0, 1], got {self.top_fraction}")


# -- perturbations (pure functions of the scores) ----------------------------------------------
def masked_normalize(x: jax.Array, mask: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` over the last axis, counting only (and keeping only) ``mask``."""
    x = jnp.where(mask, x, 0.0)
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)), eps)


def _ce_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def difference_basis(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """``D [B, B, T]``: ``D[i, k] = normalize_t(mask_i * (s_i - s_k))`` (0 for ``k = i``)."""
    return masked_normalize(scores[:, None, :] - scores[None, :, :], mask[:, None, :])


def at_perturbation(head: Callable[[jax.Array], jax.Array], scores: jax.Array, labels: jax.Array,
                    mask: jax.Array, eps: float) -> jax.Array:
    """``eps * g / ||g||`` with ``g = d CE(head(r), labels) / dr`` at ``r = 0`` (``head(r)``: logits
    of the scores perturbed by ``r``), per example over its valid tokens; no gradient flows back."""
    g = jax.grad(lambda r: _ce_sum(head(r), labels))(jnp.zeros_like(scores))
    return jax.lax.stop_gradient(eps * masked_normalize(g, mask))


def iat_perturbation(head: Callable[[jax.Array], jax.Array], scores: jax.Array, labels: jax.Array,
                     mask: jax.Array, eps: float, form: str = "paper") -> jax.Array:
    """The iAT perturbation (see the module docstring for ``form``)."""
    g = jax.grad(lambda r: _ce_sum(head(r), labels))(jnp.zeros_like(scores))
    if form == "repo":
        return jax.lax.stop_gradient(-eps * masked_normalize(g, mask))
    basis = difference_basis(jax.lax.stop_gradient(scores), mask)
    w = jnp.einsum("bt,bkt->bk", g, basis)
    return jax.lax.stop_gradient(eps * masked_normalize(jnp.einsum("bk,bkt->bt", w, basis), mask))


def _kl_sum(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """``sum_b KL(softmax(p) || softmax(q))``."""
    lp, lq = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return jnp.sum(jnp.exp(lp) * (lp - lq))


def vat_perturbation(kl: Callable[[jax.Array], jax.Array], key: jax.Array, mask: jax.Array, *, eps: float,
                     xi: float, n_power: int = 1, basis: jax.Array | None = None) -> jax.Array:
    """Virtual adversarial perturbation ``[B, T]`` of norm ``eps`` per example.

    ``kl(r)`` is ``sum_b KL(p_b || q_b(s + r))``. Without ``basis`` (VAT) ``d`` starts as a random masked
    unit vector and is updated ``n_power`` times as ``d <- normalize(grad_r kl(r))`` at ``r = xi d``
    (the gradient w.r.t. the perturbation itself, as Miyato et al.), ``r = eps d``. With ``basis``
    ``[B, K, T]`` (iVAT) the perturbation is ``sum_k w_k basis[:, k]`` and the power iteration runs on
    the unit coefficient rows ``w [B, K]`` (``w <- normalize(grad_w kl(xi sum_k w_k basis_k))``);
    ``r = eps * normalize_t(sum_k w_k basis_k)``."""
    b, t = mask.shape
    if basis is None:
        lin = lambda p: p  # noqa: E731
        p, pmask = jax.random.normal(key, (b, t)), mask
    else:
        lin = lambda w: jnp.einsum("bk,bkt->bt", w, basis)  # noqa: E731
        p, pmask = jax.random.normal(key, basis.shape[:2]), jnp.ones(basis.shape[:2], bool)
    p = masked_normalize(p, pmask)
    for _ in range(n_power):
        g = jax.grad(lambda q: kl(xi * lin(q)))(p)
        p = masked_normalize(g, pmask)
    return jax.lax.stop_gradient(eps * masked_normalize(lin(p), mask))


def rationale_loss(attention: jax.Array, rationale: jax.Array, has_rationale: jax.Array, mask: jax.Array,
                   form: str = "ce") -> jax.Array:
    """Mean over examples with a rationale of ``-sum_t m_t/sum(m) * log a_t`` (``"ce"``) or of the
    token-mean ``BCEWithLogits(a_t, m_t)`` over valid tokens (``"bce"``, X-MuTeST's notebook)."""
    m = jnp.where(mask, rationale, 0.0)
    if form == "ce":
        target = m / jnp.maximum(m.sum(-1, keepdims=True), 1e-12)
        per = -jnp.sum(target * jnp.log(jnp.maximum(attention, 1e-12)), -1)
    elif form == "bce":
        per_tok = optax.sigmoid_binary_cross_entropy(attention, m)
        per = jnp.sum(jnp.where(mask, per_tok, 0.0), -1) / jnp.maximum(mask.sum(-1), 1)
    else:
        raise ValueError(f"rationale_loss form must be 'ce' or 'bce', got {form!r}")
    w = has_rationale.astype(jnp.float32)
    return jnp.sum(per * w) / jnp.maximum(w.sum(), 1.0)


# -- the loss ---------------------------------------------------------------------------------
def make_loss_fn(cfg: TextConfig) -> Callable:
    """``loss_fn(model, batch, rng) -> (loss, {"acc", "adv"})`` of ``cfg.method``."""
    method = cfg.method
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")

    def loss_fn(model, batch, rng):
        tokens, lengths, labels = batch["tokens"], batch["lengths"], batch["label"]
        n = tokens.shape[0]
        if method in ("vat", "ivat") and "u_tokens" in batch:
            tokens = jnp.concatenate([tokens, batch["u_tokens"]], 0)
            lengths = jnp.concatenate([lengths, batch["u_lengths"]], 0)
        h, s = model.features(model.embed(tokens), lengths)
        mask = length_mask(lengths, tokens.shape[1])
        logits_all, att = model.head(h, s, lengths)
        logits = logits_all[:n]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {"acc": (logits.argmax(-1) == labels).mean()}
        hs, ss = jax.lax.stop_gradient(h), jax.lax.stop_gradient(s)
        if method in ("at", "iat"):
            head_const = lambda r: model.head(hs, ss, lengths, score_perturbation=r)[0]  # noqa: E731
            if method == "at":
                r = at_perturbation(head_const, ss, labels, mask, cfg.eps)
            else:
                r = iat_perturbation(head_const, ss, labels, mask, cfg.eps, cfg.iat_form)
            adv_logits = model.head(h, s, lengths, score_perturbation=r)[0]
            adv = optax.softmax_cross_entropy_with_integer_labels(adv_logits, labels).mean()
        elif method in ("vat", "ivat"):
            p_logits = jax.lax.stop_gradient(logits_all)
            kl = lambda r: _kl_sum(p_logits, model.head(hs, ss, lengths, score_perturbation=r)[0])  # noqa: E731
            basis = difference_basis(ss, mask) if method == "ivat" else None
            r = vat_perturbation(kl, rng, mask, eps=cfg.eps, xi=cfg.xi, n_power=cfg.n_power, basis=basis)
            adv = _kl_sum(p_logits, model.head(h, s, lengths, score_perturbation=r)[0]) / tokens.shape[0]
        elif method == "rationale":
            adv = rationale_loss(att[:n], batch["rationale"], batch["has_rationale"], mask[:n], cfg.rationale_loss)
        else:
            return loss, metrics
        return loss + cfg.lam * adv, {**metrics, "adv": adv}

    return loss_fn


def eval_batch(model: nnx.Module, batch: dict) -> dict[str, jax.Array]:
    """The plain model (no perturbation) on ``batch``: ``pred, loss, probs, attention`` and
    ``grad_importance`` per token (:func:`jaxattn.explain.agreement.gradient_importance`: the L2 norm
    of the gradient of the predicted class's probability w.r.t. each word embedding, with the
    attention weights held fixed as in Jain & Wallace 2019), 0 at pads."""
    from jaxattn.explain.agreement import gradient_importance

    tokens, lengths = batch["tokens"], batch["lengths"]
    emb = model.embed(tokens)
    logits, att = model.from_embeddings(emb, lengths, return_attention=True)
    pred = logits.argmax(-1)
    imp = gradient_importance(lambda e: model.from_embeddings(e, lengths, stop_attention_grad=True), emb, pred)
    imp = jnp.where(length_mask(lengths, tokens.shape[1]), imp, 0.0)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"pred": pred.astype(jnp.int32), "loss": loss, "probs": jax.nn.softmax(logits, -1),
            "attention": att, "grad_importance": imp}


@functools.partial(jax.jit, static_argnums=0)
def _eval_shared(graphdef, state, batch):
    """:func:`eval_batch` on the trainer state, jitted once per model structure (not per trainer)."""
    model = nnx.merge(graphdef, state)[0]
    model.eval()
    return eval_batch(model, batch)


@functools.partial(jax.jit, static_argnums=0)
def _proba_shared(graphdef, state, tokens, lengths):
    model = nnx.merge(graphdef, state)[0]
    model.eval()
    return jax.nn.softmax(model(tokens, lengths), -1)


def lr_schedule(cfg: TextConfig) -> optax.Schedule:
    return loop.warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, 0.1) if cfg.warmup else optax.constant_schedule(cfg.lr)


def default_model_factory(cfg: TextConfig, data: TextData) -> Callable[[nnx.Rngs], nnx.Module]:
    vs, nc = data.tokenizer.vocab_size, data.num_classes

    def factory(rngs):
        if cfg.model == "bilstm":
            return BiLSTMClassifier(vs, nc, embed_dim=cfg.embed_dim, hidden=cfg.hidden, rngs=rngs)
        return TextTransformer(vs, nc, dim=cfg.hidden, depth=cfg.depth, heads=cfg.heads,
                               max_len=max(data.max_len, 1), rngs=rngs)

    return factory


def make_optimizer(cfg: TextConfig) -> optax.GradientTransformation:
    """AdamW (b2 0.999) at ``cfg.lr`` (warmup-cosine if ``cfg.warmup``) with global-norm clipping."""
    return loop.adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, clip=cfg.clip or None, b2=0.999)


def make_text_trainer(cfg: TextConfig, data: TextData, model_factory=None, *, devices=None) -> loop.Trainer:
    tx = make_optimizer(cfg)
    return loop.Trainer(model_factory or default_model_factory(cfg, data), tx, make_loss_fn(cfg),
                        eval_fn=eval_batch, batch_size=cfg.batch_size, seed=cfg.seed, devices=devices)


# -- evaluation ------------------------------------------------------------------------------
def evaluate(trainer: loop.Trainer, data: TextData, batch_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``({"test_loss", "test_acc", "test_f1"}, per-example arrays)`` over the test split."""
    outs: dict[str, list] = {}
    for batch, k in data.test_batches(batch_size):
        o = jax.device_get(_eval_shared(trainer.graphdef, trainer.state, batch))
        for name, v in o.items():
            outs.setdefault(name, []).append(np.asarray(v)[:k])
    arr = {k: np.concatenate(v) for k, v in outs.items()}
    cm = confusion_matrix(data.y_test, arr["pred"], data.num_classes)
    s = classification_scores(cm)
    return {"test_loss": float(arr["loss"].mean()), "test_acc": s["acc"], "test_f1": s["f1"]}, arr


def make_predict_proba(trainer: loop.Trainer, batch_size: int = 256) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``predict_proba(tokens [N, T], lengths [N]) -> probs [N, C]`` of the current (eval) model."""
    graphdef, state = trainer.graphdef, trainer.state
    def predict_proba(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
        out = []
        for s in range(0, len(tokens), batch_size):
            t, ln = tokens[s:s + batch_size], lengths[s:s + batch_size]
            k = len(t)
            if k < batch_size:
                t = np.concatenate([t, np.zeros((batch_size - k, t.shape[1]), np.int32)])
                ln = np.concatenate([ln, np.zeros(batch_size - k, np.int32)])
            out.append(np.asarray(_proba_shared(graphdef, state, t, ln))[:k])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return predict_proba


def _plausibility(data: TextData, mask: np.ndarray, prefix: str = "") -> dict[str, float]:
    """``{prefix}token_f1`` / ``{prefix}iou_f1`` of test rationales ``mask [N, T]`` against the gold
    ones, over the test examples that have gold rationales (``{}`` if none has)."""
    from jaxattn.explain import eraser

    hr = data.hr_test
    if not hr.any():
        return {}
    pred, gold, lengths = np.asarray(mask)[hr], data.r_test[hr] > 0.5, data.len_test[hr]
    return {f"{prefix}token_f1": float(eraser.token_f1(pred, gold, lengths)),
            f"{prefix}iou_f1": float(eraser.iou_f1(pred, gold, lengths))}


def explain_metrics(trainer: loop.Trainer, data: TextData, arr: dict[str, np.ndarray],
                    top_fraction: float | None = None, batch_size: int = 256) -> dict[str, float]:
    """Agreement of attention with gradient importance, plausibility of top-k attention vs gold
    rationales, faithfulness of the attention ranking (needs :mod:`jaxattn.explain`; ``{}`` and a
    note if it is missing)."""
    try:
        from jaxattn.explain import agreement, eraser, xmutest
    except ImportError as e:  # part B not there
        print(f"note: jaxattn.explain unavailable ({e}); explanation metrics skipped")
        return {}
    lengths, att = data.len_test, arr["attention"]
    if top_fraction is None:
        frac = data.r_train.sum(1)[data.hr_train] / np.maximum(data.len_train[data.hr_train], 1)
        top_fraction = float(np.clip(frac.mean(), 1e-3, 1.0)) if len(frac) else 0.2
    out = {"pearson": float(agreement.pearson(att, arr["grad_importance"], lengths)),
           "kendall_tau": float(agreement.kendall_tau(att, arr["grad_importance"], lengths)),
           "top_fraction": top_fraction}
    out.update(_plausibility(data, xmutest.scores_to_rationales(att, lengths, top_fraction=top_fraction)))
    faith = eraser.faithfulness(make_predict_proba(trainer, batch_size), data.x_test, lengths, att, arr["pred"],
                                k_fraction=top_fraction)
    out.update({k: float(faith[k]) for k in ("comprehensiveness", "sufficiency", "aopc_comprehensiveness",
                                              "aopc_sufficiency") if k in faith})
    return out


def xmutest_explanations(trainer: loop.Trainer, data: TextData, arr: dict[str, np.ndarray], top_fraction: float,
                         out_path: Path | None = None, external: str | Path | None = None,
                         batch_size: int = 256) -> dict[str, float]:
    """X-MuTeST stage 2 on the test split: per-token scores from the drop in the predicted class's
    probability when each unigram, bigram and trigram is removed (:func:`jaxattn.explain.xmutest.
    ngram_removal_scores`), the top ``top_fraction`` tokens as rationales, and, with ``external``,
    their union with the rationales in that file (ids: the test examples' positions ``"0"``,
    ``"1"``, ..., as written to ``out_path``). Returns Token-F1 / IOU-F1 against the gold
    rationales (``xm_*``; ``xm_union_*`` with ``external``) and the comprehensiveness /
    sufficiency of the n-gram rationales; writes one JSON record per test example to ``out_path``."""
    from jaxattn.explain import eraser, xmutest

    lengths, x = data.len_test, data.x_test
    proba = make_predict_proba(trainer, batch_size)
    scores = xmutest.ngram_removal_scores(proba, x, lengths, arr["pred"], batch_size=batch_size * 8)
    mask = xmutest.scores_to_rationales(scores, lengths, top_fraction=top_fraction)
    union = None
    if external is not None:
        ext = xmutest.load_external_rationales(external, [str(i) for i in range(len(lengths))], lengths,
                                               width=x.shape[1])
        union = xmutest.union_rationales(mask, ext)
    out = _plausibility(data, mask, "xm_")
    if union is not None:
        out.update(_plausibility(data, union, "xm_union_"))
    faith = eraser.faithfulness(proba, x, lengths, scores, arr["pred"], rationales=mask, batch_size=batch_size)
    out["xm_comprehensiveness"] = float(faith["comprehensiveness"])
    out["xm_sufficiency"] = float(faith["sufficiency"])
    if out_path is not None:
        tok = data.tokenizer
        with open(out_path, "w") as fh:
            for i, n in enumerate(lengths):
                n = int(n)
                words = tok.decode(x[i, :n]) if tok.kind == "word" else [tok.decode([t]) for t in x[i, :n]]
                rec = {"id": str(i), "tokens": words,
                       "label": int(data.y_test[i]), "pred": int(arr["pred"][i]),
                       "attention": np.round(arr["attention"][i, :n].astype(float), 5).tolist(),
                       "xmutest_scores": np.round(scores[i, :n].astype(float), 5).tolist(),
                       "xmutest_rationale": np.flatnonzero(mask[i, :n]).tolist()}
                if union is not None:
                    rec["union_rationale"] = np.flatnonzero(union[i, :n]).tolist()
                if data.hr_test[i]:
                    rec["gold_rationale"] = np.flatnonzero(data.r_test[i, :n] > 0.5).tolist()
                fh.write(json.dumps(rec) + "\n")
    return out


def plot_attention_examples(data: TextData, arr: dict[str, np.ndarray], path: Path, n: int = 8,
                            title: str = "") -> bool:
    """``path``: the first ``n`` test examples' tokens shaded by the model's pooling attention, gold
    rationale tokens boxed (:func:`jaxattn.viz.plot_token_attention`)."""
    from jaxattn.viz import plot_token_attention

    tok, n = data.tokenizer, min(n, len(data.len_test))
    tokens, att, rat, titles = [], [], [], []
    for i in range(n):
        m = int(data.len_test[i])
        ids = data.x_test[i, :m]
        tokens.append(tok.decode(ids) if tok.kind == "word" else [tok.decode([t]) for t in ids])
        att.append(arr["attention"][i, :m])
        rat.append(data.r_test[i, :m] if data.hr_test[i] else np.zeros(m))
        y, p = int(data.y_test[i]), int(arr["pred"][i])
        titles.append(f"{title}  test example {i}: label {data.classes[y]}, predicted {data.classes[p]}")
    return plot_token_attention(tokens, att, path, rationales=rat, titles=titles)


# -- the driver ------------------------------------------------------------------------------
def load_data(cfg: TextConfig) -> TextData:
    return load_text(cfg.data, format=cfg.format, tokenizer=cfg.tokenizer, max_len=cfg.max_len,
                     test_fraction=cfg.test_fraction, seed=cfg.seed, min_freq=cfg.min_freq,
                     vocab_size=cfg.vocab_size, n_train=cfg.n_train, n_test=cfg.n_test,
                     n_unlabeled=cfg.n_unlabeled)


def train(cfg: TextConfig, *, resume: bool = False, data: TextData | None = None, model_factory=None,
          trainer: loop.Trainer | None = None, stop_after: int | None = None, progress: bool = True,
          explain: bool = True) -> dict:
    """Runs (or resumes) training; writes ``metrics.csv``, checkpoints, ``vocab.json`` and
    ``summary.json`` (test accuracy and explanation metrics) to ``cfg.out_dir()``. ``trainer``
    (from :func:`make_text_trainer`) replaces the one built from ``cfg``."""
    data = data if data is not None else load_data(cfg)
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    data.tokenizer.save(out / "vocab.json")
    trainer = trainer or make_text_trainer(cfg, data, model_factory)
    use_unlab = cfg.method in ("vat", "ivat") and cfg.unlabeled and len(data.len_unlab) > 0
    config = {**dataclasses.asdict(cfg), "source": data.source, "classes": data.classes,
              "vocab_size": data.tokenizer.vocab_size, "train_examples": len(data.y_train),
              "test_examples": len(data.y_test), "unlabeled_examples": int(len(data.len_unlab)),
              "max_len_padded": data.max_len}
    result = loop.fit(
        trainer, lambda step: data.train_batch(cfg.seed, step, cfg.batch_size, unlabeled=use_unlab),
        steps=cfg.steps, out_dir=out, resume=resume,
        evaluate=lambda step: evaluate(trainer, data, cfg.eval_batch_size)[0], eval_every=cfg.eval_every,
        ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, lr_schedule=lr_schedule(cfg),
        throughput=("examples_per_s", lambda b: len(b["label"])), config=config, plot="curves.png",
        plot_title=f"{cfg.model} {cfg.method} on {Path(data.source).name}",
        plot_metrics=("train_acc", "test_acc"), fields=FIELDS, desc=f"train {cfg.model}-{cfg.method}",
        stop_after=stop_after, progress=progress)
    if "stopped_at" in result:
        return result
    scores, arr = evaluate(trainer, data, cfg.eval_batch_size)
    expl = explain_metrics(trainer, data, arr, cfg.top_fraction, cfg.eval_batch_size) if explain else {}
    if explain and cfg.xmutest and expl:
        expl.update(xmutest_explanations(trainer, data, arr, expl["top_fraction"], out / "explanations.jsonl",
                                         cfg.external_rationales, cfg.eval_batch_size))
    summary = {"step": cfg.steps, "method": cfg.method, "model": cfg.model, **scores, **expl}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_attention_examples(data, arr, out / "attention.png", title=f"{cfg.model} {cfg.method}")
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return {**result, **summary, "arrays": arr, "data": data}


# -- command line ----------------------------------------------------------------------------
def add_parser(sub) -> None:
    """The ``text`` subcommand of ``python -m jaxattn.train``."""
    import argparse

    p = sub.add_parser("text", help="text classification with attention AT/iAT/VAT/iVAT/rationale training "
                                    "(default: synthetic planted-cue data)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop.add_config_args(p, TextConfig, choices={
        "method": METHODS, "model": MODELS, "format": FORMATS, "tokenizer": ["word", "byte"],
        "iat_form": ["paper", "repo"], "rationale_loss": ["ce", "bce"]}, help={
        "data": "HateXplain JSON, ERASER folder/.jsonl, or CSV/TSV (text,label[,rationale]); "
                "default: the synthetic planted-cue set",
        "eps": "perturbation L2 norm per example (AT/iAT/VAT/iVAT)",
        "lam": "weight of the adversarial / VAT / rationale loss",
        "iat_form": "paper: perturbation in the span of instance differences; repo: the repository's "
                    "effective -eps*g/||g||",
        "top_fraction": "top fraction of tokens by attention taken as the predicted rationale "
                        "(default: the mean gold rationale fraction)",
        "xmutest": "after training, X-MuTeST n-gram-removal explanations of the test split -> "
                   "explanations.jsonl and xm_* plausibility/faithfulness metrics",
        "external_rationales": ".json/.jsonl rationales (e.g. from an LLM) keyed by the test-example ids of "
                               "explanations.jsonl, united with the X-MuTeST rationales"})
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def run_cli(parser, args: dict) -> TextConfig:
    """``TextConfig`` from the parsed ``text`` arguments (``parser.error`` on bad values)."""
    try:
        cfg = loop.config_from_args(TextConfig, args)
    except ValueError as e:
        parser.error(str(e))
    loop.check_positive(parser, cfg, ("steps", "batch_size", "ckpt_every", "log_every", "eval_batch_size",
                                      "max_len", "embed_dim", "hidden", "depth", "heads", "n_power"))
    loop.check_positive(parser, cfg, ("warmup", "eval_every"), minimum=0)
    return cfg
