"""Tokenizers for the text classifiers: a word tokenizer with a frequency-built vocabulary and a
byte tokenizer. Both reserve ``pad = 0`` and ``unk = 1``; vocabularies save to / load from JSON.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)

__all__ = ["PAD", "UNK", "WordTokenizer", "ByteTokenizer", "load_tokenizer", "pad_batch", "split_words"]


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """Words and single punctuation marks of ``text`` (``\\w+|[^\\w\\s]``), lower-cased if asked."""
    return _WORD_RE.findall(text.lower() if lowercase else text)


class WordTokenizer:
    """Word-level ids: ``itos[0] = "<pad>"``, ``itos[1] = "<unk>"``, then words by descending
    frequency (ties alphabetical). Unknown words map to ``UNK``."""

    kind = "word"

    def __init__(self, itos: Sequence[str], lowercase: bool = True):
        itos = list(itos)
        if itos[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(f"itos must start with {[PAD_TOKEN, UNK_TOKEN]}, got {itos[:2]}")
        if len(set(itos)) != len(itos):
            raise ValueError("itos has duplicate entries")
        self.itos, self.lowercase = itos, lowercase
        self.stoi = {w: i for i, w in enumerate(itos)}

    @classmethod
    def build(cls, corpus: Iterable[str | Sequence[str]], *, min_freq: int = 1, max_size: int | None = None,
              lowercase: bool = True) -> "WordTokenizer":
        """Vocabulary from texts (split with :func:`split_words`) or pre-tokenized word lists."""
        counts: Counter[str] = Counter()
        for doc in corpus:
            words = split_words(doc, lowercase) if isinstance(doc, str) else [w.lower() if lowercase else w for w in doc]
            counts.update(words)
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in (PAD_TOKEN, UNK_TOKEN)),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max(0, max_size - 2)]
        return cls([PAD_TOKEN, UNK_TOKEN, *words], lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def words(self, text: str | Sequence[str]) -> list[str]:
        return split_words(text, self.lowercase) if isinstance(text, str) else list(text)

    def encode(self, text: str | Sequence[str]) -> list[int]:
        """Ids of a text (split into words) or of a list of words."""
        return [self.stoi.get(w.lower() if self.lowercase else w, UNK) for w in self.words(text)]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` (pads dropped)."""
        return [self.itos[i] if 0 <= i < len(self.itos) else UNK_TOKEN for i in map(int, ids) if i != PAD]

    def to_json(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "itos": self.itos}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


class ByteTokenizer:
    """UTF-8 bytes shifted by 2: byte ``b`` is id ``b + 2`` (``0`` = pad, ``1`` = unk, unused)."""

    kind = "byte"
    vocab_size = 258

    def words(self, text: str | Sequence[str]) -> list[str]:
        return list(text) if isinstance(text, str) else list(" ".join(text))

    def encode(self, text: str | Sequence[str]) -> list[int]:
        """Byte ids of a text (a list of words is joined with spaces)."""
        s = text if isinstance(text, str) else " ".join(text)
        return [b + 2 for b in s.encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i - 2 for i in map(int, ids) if i >= 2).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


def load_tokenizer(path: str | Path) -> WordTokenizer | ByteTokenizer:
    """The tokenizer saved by ``.save(path)``."""
    d = json.loads(Path(path).read_text())
    if d.get("kind") == "byte":
        return ByteTokenizer()
    if d.get("kind") != "word" or "itos" not in d:
        raise ValueError(f"{path}: not a saved tokenizer (expected kind 'word' with 'itos', or 'byte')")
    return WordTokenizer(d["itos"], d.get("lowercase", True))


def pad_batch(seqs: Sequence[Sequence[int]], max_len: int | None = None, pad_id: int = PAD
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [N, T], lengths int32 [N])``: left-aligned, truncated to ``max_len``."""
    lens = [min(len(s), max_len) if max_len else len(s) for s in seqs]
    t = max_len or max(lens, default=1)
    out = np.full((len(seqs), max(t, 1)), pad_id, np.int32)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        out[i, :n] = s[:n]
    return out, np.asarray(lens, np.int32)
