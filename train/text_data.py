"""Text-classification data with token rationales: the synthetic planted-cue default and loaders
for HateXplain-style JSON, ERASER JSONL and CSV/TSV files.

Every loader returns :class:`TextData`: padded int32 token ids (``0`` = pad, left-aligned),
lengths, labels, float token-rationale masks (``rationale [N, T]`` in {0, 1}) with a
``has_rationale [N]`` flag, an optional unlabelled pool (for VAT), the tokenizer and class names.
Batches are pure functions of ``(seed, step)`` so a resumed run sees the same data.

Rationales are given per *word*; with the byte tokenizer every byte of a word inherits the word's
rationale (the separating spaces get 0).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxattn.models.tokenizer import ByteTokenizer, WordTokenizer, pad_batch

__all__ = ["FORMATS", "TextData", "Example", "load_text", "synthetic_planted", "load_hatexplain",
           "load_eraser", "load_delimited", "build_text_data", "detect_format"]

FORMATS = ("auto", "synthetic", "hatexplain", "eraser", "csv", "tsv")


@dataclasses.dataclass
class Example:
    """One example as words: ``words``, ``label`` (class index, -1 = unlabelled), word-level
    ``rationale`` (0/1 per word) or None."""
    words: list[str]
    label: int
    rationale: list[float] | None = None


@dataclasses.dataclass
class TextData:
    x_train: np.ndarray  # int32 [N, T]
    len_train: np.ndarray  # int32 [N]
    y_train: np.ndarray  # int32 [N]
    r_train: np.ndarray  # float32 [N, T]
    hr_train: np.ndarray  # bool [N]
    x_test: np.ndarray
    len_test: np.ndarray
    y_test: np.ndarray
    r_test: np.ndarray
    hr_test: np.ndarray
    x_unlab: np.ndarray  # int32 [U, T] (U may be 0)
    len_unlab: np.ndarray
    tokenizer: WordTokenizer | ByteTokenizer
    classes: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def max_len(self) -> int:
        return self.x_train.shape[1]

    def _order(self, seed: int, step: int, batch_size: int, n: int, salt: int) -> np.ndarray:
        """Indices of batch ``step``: a fresh permutation of ``range(n)`` every epoch."""
        per_epoch = max(1, n // batch_size)
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, salt, epoch]).permutation(n)
        if n < batch_size:
            perm = np.resize(perm, batch_size)
        return perm[i * batch_size:(i + 1) * batch_size]

    def train_batch(self, seed: int, step: int, batch_size: int, *, unlabeled: bool = False) -> dict:
        """The labelled batch of ``step`` (``tokens, lengths, label, rationale, has_rationale``) and,
        with ``unlabeled`` and a non-empty pool, ``u_tokens, u_lengths`` of the same size."""
        idx = self._order(seed, step, batch_size, len(self.y_train), 0)
        out = {"tokens": self.x_train[idx], "lengths": self.len_train[idx], "label": self.y_train[idx],
               "rationale": self.r_train[idx], "has_rationale": self.hr_train[idx]}
        if unlabeled and len(self.len_unlab):
            j = self._order(seed, step, batch_size, len(self.len_unlab), 1)
            out.update(u_tokens=self.x_unlab[j], u_lengths=self.len_unlab[j])
        return out

    def test_batches(self, batch_size: int):
        """``(batch, k)`` over the test split; the last batch is padded (repeating row 0) to
        ``batch_size`` and ``k`` says how many rows are real."""
        n = len(self.y_test)
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            k = len(idx)
            idx = np.concatenate([idx, np.zeros(batch_size - k, int)])
            yield {"tokens": self.x_test[idx], "lengths": self.len_test[idx], "label": self.y_test[idx],
                   "rationale": self.r_test[idx], "has_rationale": self.hr_test[idx]}, k


# -- encoding ------------------------------------------------------------------------------
def _encode(ex: Example, tok, max_len: int) -> tuple[list[int], list[float]]:
    """Token ids and the per-token rationale of one example (byte tokenizer: bytes inherit)."""
    if ex.rationale is not None and len(ex.rationale) != len(ex.words):
        raise ValueError(f"rationale has {len(ex.rationale)} entries but the text has {len(ex.words)} words "
                         f"(text: {' '.join(ex.words[:12])!r}...)")
    rat = ex.rationale if ex.rationale is not None else [0.0] * len(ex.words)
    if isinstance(tok, ByteTokenizer):
        ids: list[int] = []
        r: list[float] = []
        for j, (w, v) in enumerate(zip(ex.words, rat)):
            b = tok.encode(w)
            if j:
                ids.append(tok.encode(" ")[0])
                r.append(0.0)
            ids += b
            r += [float(v)] * len(b)
        return ids[:max_len], r[:max_len]
    return tok.encode(ex.words)[:max_len], [float(v) for v in rat][:max_len]


def _arrays(examples: Sequence[Example], tok, max_len: int):
    enc = [_encode(e, tok, max_len) for e in examples]
    x, lens = pad_batch([e[0] for e in enc], max_len)
    r = np.zeros(x.shape, np.float32)
    for i, (_, rr) in enumerate(enc):
        r[i, :len(rr)] = rr
    y = np.asarray([e.label for e in examples], np.int32)
    hr = np.asarray([e.rationale is not None and sum(e.rationale) > 0 for e in examples], bool)
    return x, lens, y, r, hr


def build_text_data(train: Sequence[Example], test: Sequence[Example], unlabeled: Sequence[Example] = (), *,
                    classes: Sequence[str], source: str, tokenizer: str = "word", max_len: int = 64,
                    min_freq: int = 1, vocab_size: int | None = None) -> TextData:
    """Tokenizes (vocabulary from the training + unlabelled words), truncates to ``max_len`` tokens
    and pads to the longest example."""
    if not train or not test:
        raise ValueError(f"{source}: need at least one training and one test example "
                         f"(got {len(train)} and {len(test)})")
    if tokenizer == "word":
        tok = WordTokenizer.build([e.words for e in (*train, *unlabeled)], min_freq=min_freq, max_size=vocab_size)
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        raise ValueError(f"tokenizer must be 'word' or 'byte', got {tokenizer!r}")
    nc = len(classes)
    for e in (*train, *test):
        if not 0 <= e.label < nc:
            raise ValueError(f"{source}: label {e.label} outside [0, {nc})")
    tr, te = _arrays(train, tok, max_len), _arrays(test, tok, max_len)
    if unlabeled:
        xu, lu, *_ = _arrays(unlabeled, tok, max_len)
    else:
        xu, lu = np.zeros((0, max_len), np.int32), np.zeros((0,), np.int32)
    t = max(1, int(max(tr[1].max(), te[1].max(), lu.max(initial=0))))  # crop to the longest example
    tr = (tr[0][:, :t], tr[1], tr[2], tr[3][:, :t], tr[4])
    te = (te[0][:, :t], te[1], te[2], te[3][:, :t], te[4])
    return TextData(*tr, *te, xu[:, :t], lu, tok, list(classes), source)


def _split(examples: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(examples))
    k = max(1, int(round(test_fraction * len(examples))))
    return [examples[i] for i in perm[k:]], [examples[i] for i in perm[:k]]


# -- the synthetic default -------------------------------------------------------------------
def synthetic_planted(n_train: int = 1024, n_test: int = 256, n_unlabeled: int = 1024, *, seed: int = 0,
                      min_len: int = 8, max_len: int = 24, n_filler: int = 50, n_cues: int = 8,
                      negation_prob: float = 0.25, max_cues: int = 2) -> tuple[list, list, list, list[str]]:
    """Binary sentiment-like sequences with *planted* cues. Each sentence is ``min_len..max_len``
    filler words (``f0..``) with 1..``max_cues`` cue words of one polarity (``pos0..`` or ``neg0..``)
    at random positions; with probability ``negation_prob`` a cue is preceded by ``not``, which flips
    it. The label is the (common) effective polarity of the cues, so the ground-truth rationale is
    exactly the cue words and their ``not``. Returns ``(train, test, unlabeled, classes)``."""
    rng = np.random.default_rng([seed, 7])
    filler = [f"f{i}" for i in range(n_filler)]
    cues = {0: [f"neg{i}" for i in range(n_cues)], 1: [f"pos{i}" for i in range(n_cues)]}

    def make(label: int) -> Example:
        n = int(rng.integers(min_len, max_len + 1))
        words = list(rng.choice(filler, n))
        rat = [0.0] * n
        k = int(rng.integers(1, max_cues + 1))
        slots = sorted(rng.choice(np.arange(1, n), size=min(k, n - 1), replace=False), reverse=True)
        for s in slots:
            neg = rng.random() < negation_prob
            polarity = 1 - label if neg else label
            words[s] = str(rng.choice(cues[polarity]))
            rat[s] = 1.0
            if neg:
                words[s - 1] = "not"
                rat[s - 1] = 1.0
        return Example(words, label, rat)  # rejected by _consistent if a negator overwrote a cue

    def many(m: int, labelled: bool) -> list[Example]:
        out: list[Example] = []
        while len(out) < m:
            ex = make(int(rng.integers(0, 2)))
            if _consistent(ex):
                out.append(ex if labelled else Example(ex.words, -1, None))
        return out

    return many(n_train, True), many(n_test, True), many(n_unlabeled, False), ["negative", "positive"]


def _consistent(ex: Example) -> bool:
    """True if every cue's effective polarity (flipped by a preceding ``not``) equals the label and
    the rationale marks exactly the cues and their negators (planting can overwrite a cue)."""
    rat = []
    for j, w in enumerate(ex.words):
        is_cue = w.startswith(("pos", "neg"))
        rat.append(1.0 if is_cue or (w == "not" and j + 1 < len(ex.words) and
                                     ex.words[j + 1].startswith(("pos", "neg"))) else 0.0)
        if is_cue:
            pol = 1 if w.startswith("pos") else 0
            if j and ex.words[j - 1] == "not":
                pol = 1 - pol
            if pol != ex.label:
                return False
    return rat == ex.rationale and "not" not in [w for w, r in zip(ex.words, rat) if not r]


# -- file formats ----------------------------------------------------------------------------
def _class_index(labels: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    classes = sorted(set(labels), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    return classes, {c: i for i, c in enumerate(classes)}


def load_hatexplain(path: str | Path) -> tuple[list[tuple[list[str], str, list[float] | None]], str]:
    """HateXplain ``dataset.json``: ``{id: {"post_tokens", "annotators": [{"label"}...],
    "rationales": [[0/1 per token]...]}}`` (or a list of such records). The label is the annotators'
    majority (posts without one are dropped, as in HateXplain); the rationale is the per-token
    majority (mean >= 0.5) of the annotators' rationales (None if there are none)."""
    path = Path(path)
    raw = json.loads(path.read_text())
    records = list(raw.values()) if isinstance(raw, dict) else list(raw)
    out = []
    for i, rec in enumerate(records):
        if "post_tokens" not in rec or "annotators" not in rec:
            raise ValueError(f"{path}: record {i} lacks 'post_tokens' or 'annotators' (not HateXplain JSON)")
        words = [str(w) for w in rec["post_tokens"]]
        votes = Counter(a["label"] for a in rec["annotators"]).most_common()
        if not votes or (len(votes) > 1 and votes[0][1] == votes[1][1]):
            continue  # no majority label
        rats = rec.get("rationales") or []
        for r in rats:
            if len(r) != len(words):
                raise ValueError(f"{path}: record {rec.get('post_id', i)}: rationale has {len(r)} entries but "
                                 f"post_tokens has {len(words)}")
        rat = [float(v >= 0.5) for v in np.mean(np.asarray(rats, float), 0)] if rats else None
        out.append((words, str(votes[0][0]), rat))
    return out, str(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_eraser(path: str | Path) -> dict[str, list[tuple[list[str], str, list[float] | None]]]:
    """ERASER: a folder with ``{train,val,test}.jsonl`` and ``docs/`` (one whitespace-tokenized file
    per docid) or ``docs.jsonl`` (``{"docid", "document"}``); or a single ``.jsonl`` file with its
    ``docs`` beside it. Each annotation's ``classification`` is the label; evidence spans
    ``[start_token, end_token)`` of its document become the token rationale. Returns ``{split: rows}``."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    files = {s: root / f"{s}.jsonl" for s in ("train", "val", "test")} if path.is_dir() else {"train": path}
    files = {s: f for s, f in files.items() if f.exists()}
    if not files:
        raise ValueError(f"{path}: no train.jsonl / val.jsonl / test.jsonl (ERASER format)")
    docs: dict[str, list[str]] = {}
    if (root / "docs.jsonl").exists():
        docs = {d["docid"]: d["document"].split() for d in _read_jsonl(root / "docs.jsonl")}

    def doc(docid: str) -> list[str]:
        if docid not in docs:
            f = root / "docs" / docid
            if not f.exists():
                raise ValueError(f"{path}: document {docid!r} not found in {root / 'docs'} or docs.jsonl")
            docs[docid] = f.read_text().split()
        return docs[docid]

    out = {}
    for split, f in files.items():
        rows = []
        for ann in _read_jsonl(f):
            evid = [e for group in ann.get("evidences") or [] for e in group]
            docid = ann.get("docids", [None])[0] if ann.get("docids") else None
            docid = docid or (evid[0]["docid"] if evid else ann["annotation_id"])
            words = doc(docid)
            rat = [0.0] * len(words)
            for e in evid:
                if e.get("docid", docid) != docid:
                    continue
                s, t = int(e["start_token"]), int(e["end_token"])
                if not 0 <= s <= t <= len(words):
                    raise ValueError(f"{f}: annotation {ann.get('annotation_id')}: evidence span [{s}, {t}) "
                                     f"outside document {docid!r} of {len(words)} tokens")
                rat[s:t] = [1.0] * (t - s)
            rows.append((words, str(ann["classification"]), rat if evid else None))
        out[split] = rows
    return out


def load_delimited(path: str | Path, delimiter: str = ",") -> list[tuple[list[str], str, list[float] | None]]:
    """CSV/TSV with a header: a ``text`` (or ``sentence``) and a ``label`` column (else the first two
    columns), and an optional ``rationale`` column of space-separated 0/1 per word (words split by
    :func:`jaxattn.models.tokenizer.split_words`)."""
    from jaxattn.models.tokenizer import split_words

    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    head = [h.strip().lower() for h in rows[0]]
    ti = head.index("text") if "text" in head else head.index("sentence") if "sentence" in head else 0
    li = head.index("label") if "label" in head else 1
    ri = head.index("rationale") if "rationale" in head else None
    out = []
    for n, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) <= max(ti, li):
            raise ValueError(f"{path}:{n}: expected at least {max(ti, li) + 1} columns, got {len(r)}")
        words = split_words(r[ti])
        rat = None
        if ri is not None and ri < len(r) and r[ri].strip():
            rat = [float(v) for v in r[ri].split()]
            if len(rat) != len(words):
                raise ValueError(f"{path}:{n}: rationale has {len(rat)} entries but the text has {len(words)} words")
        out.append((words, r[li].strip(), rat))
    return out


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir() or p.suffix == ".jsonl":
        return "eraser"
    if p.suffix == ".json":
        return "hatexplain"
    if p.suffix in (".tsv", ".tab"):
        return "tsv"
    if p.suffix == ".csv":
        return "csv"
    raise ValueError(f"cannot tell the format of {path}; pass --format hatexplain|eraser|csv|tsv")


def load_text(data: str | None = None, *, format: str = "auto", tokenizer: str = "word", max_len: int = 64,
              test_fraction: float = 0.2, seed: int = 0, min_freq: int = 1, vocab_size: int | None = None,
              n_train: int = 1024, n_test: int = 256, n_unlabeled: int = 1024) -> TextData:
    """Loads ``data`` (None: the synthetic planted-cue set) as :class:`TextData`. Files without a
    test split are split with ``test_fraction`` (deterministically from ``seed``)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    kw = dict(tokenizer=tokenizer, max_len=max_len, min_freq=min_freq, vocab_size=vocab_size)
    if data is None or format == "synthetic":
        if data is not None:
            raise ValueError("--format synthetic takes no --data")
        tr, te, un, classes = synthetic_planted(n_train, n_test, n_unlabeled, seed=seed)
        return build_text_data(tr, te, un, classes=classes, source="synthetic-planted-cues", **kw)
    if not Path(data).exists():
        raise ValueError(f"--data {data}: no such file or folder")
    fmt = detect_format(data) if format == "auto" else format
    if fmt == "eraser":
        splits = load_eraser(data)
        rows_tr = splits.get("train", []) + (splits.get("val", []) if "test" in splits else [])
        rows_te = splits.get("test") or splits.get("val")
        if rows_te is None:
            rows_tr, rows_te = _split_rows(rows_tr, test_fraction, seed)
    else:
        rows = load_hatexplain(data)[0] if fmt == "hatexplain" else load_delimited(data, "\t" if fmt == "tsv" else ",")
        rows_tr, rows_te = _split_rows(rows, test_fraction, seed)
    classes, index = _class_index([r[1] for r in (*rows_tr, *rows_te)])
    tr = [Example(w, index[lab], rat) for w, lab, rat in rows_tr]
    te = [Example(w, index[lab], rat) for w, lab, rat in rows_te]
    return build_text_data(tr, te, classes=classes, source=str(data), **kw)


def _split_rows(rows: list, test_fraction: float, seed: int) -> tuple[list, list]:
    ex = [Example(*r) for r in rows]
    tr, te = _split(ex, test_fraction, seed)
    return [(e.words, e.label, e.rationale) for e in tr], [(e.words, e.label, e.rationale) for e in te]
