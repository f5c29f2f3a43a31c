"""Token data for language modelling, with no download: the Python standard library's
own sources as a byte-level corpus by default, or a text file/folder, or token files: ``.npy``
(any integer dtype) or nanoGPT's raw uint16 ``.bin``, one file (its tail is validation) or a
folder holding ``train`` and ``val`` files. Token files are memory-mapped, never loaded whole.

Batches are a pure function of ``(seed, step)``, so a resumed run sees the same data.

Documents: a corpus knows where its documents start (the files of a text corpus; in token files,
after each ``doc_sep`` token, e.g. GPT-2's end-of-text 50256), and :func:`get_batch` given those
starts also returns each token's document, for models that keep packed documents apart.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".tex", ".c", ".h"}


@dataclasses.dataclass
class Corpus:
    train: np.ndarray  # 1-D integer tokens (a memory-mapped view for token files)
    val: np.ndarray
    vocab_size: int
    source: str
    byte_level: bool = True  # tokens are the text's bytes (False: ids from a token file)
    # where documents start in each split (sorted offsets; None: not known, one stream)
    train_docs: np.ndarray | None = None
    val_docs: np.ndarray | None = None


def _concat(files, max_bytes: int, skip_unreadable: bool = False) -> tuple[bytes, np.ndarray]:
    """The files' bytes concatenated (up to ``max_bytes``) and the offsets where each one starts."""
    chunks, starts, total = [], [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            if skip_unreadable:
                continue
            raise
        starts.append(total)
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes], np.asarray([s for s in starts if s < max_bytes], np.int64)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and "test" not in p.parts]


def stdlib_bytes(max_bytes: int, *, with_starts: bool = False) -> bytes | tuple[bytes, np.ndarray]:
    """The running interpreter's standard-library ``*.py`` files, sorted, concatenated (``with_starts``:
    and each file's offset)."""
    data, starts = _concat(_stdlib_files(), max_bytes, skip_unreadable=True)
    return (data, starts) if with_starts else data


def _text_bytes(path: Path, max_bytes: int, *, with_starts: bool = False) -> bytes | tuple[bytes, np.ndarray]:
    """A text file's bytes, or a folder's text files concatenated (``with_starts``: and their offsets)."""
    if path.is_file():
        data, starts = path.read_bytes()[:max_bytes], np.zeros(1, np.int64)
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data {path}: folder holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        data, starts = _concat(files, max_bytes)
    return (data, starts) if with_starts else data


def separator_starts(tokens: np.ndarray, sep: int, chunk: int = 1 << 24) -> np.ndarray:
    """Offsets of the documents that follow each ``sep`` token (one streaming pass over ``tokens``)."""
    found = [np.flatnonzero(np.asarray(tokens[i:i + chunk]) == sep) + i + 1 for i in range(0, len(tokens), chunk)]
    out = np.concatenate([np.zeros(1, np.int64), *found]).astype(np.int64)
    return out[out < len(tokens)]


TOKEN_SUFFIXES = (".npy", ".bin")


def token_file(path: Path) -> np.ndarray:
    """The 1-D integer tokens of a ``.npy`` file (any integer dtype) or a ``.bin`` file (raw
    uint16, nanoGPT's ``train.bin`` / ``val.bin``), memory-mapped."""
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"--data {path}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}")
        return tokens
    size = path.stat().st_size
    if size % 2:
        raise ValueError(f"--data {path}: a .bin token file holds uint16 tokens (nanoGPT's format), but it has "
                         f"an odd size ({size} bytes)")
    return np.memmap(path, np.uint16, mode="r") if size else np.zeros(0, np.uint16)


def _vocab(path: Path, *parts: np.ndarray) -> int:
    """``max id + 1`` over token arrays (one streaming pass over a memory-mapped file)."""
    lo = min((int(p.min()) for p in parts if p.size), default=0)
    if lo < 0:
        raise ValueError(f"--data {path}: token ids must be >= 0")
    return max((int(p.max()) + 1 for p in parts if p.size), default=0)


def _split_files(path: Path) -> tuple[Path, Path] | None:
    """A folder's ``train`` and ``val`` (or ``validation`` / ``test``) token files, if it has them."""
    for suffix in TOKEN_SUFFIXES:
        train = path / f"train{suffix}"
        val = next((path / f"{v}{suffix}" for v in ("val", "validation", "test") if (path / f"{v}{suffix}").is_file()),
                   None)
        if train.is_file() and val is not None:
            return train, val
    return None


def load_corpus(data: str | None = None, *, max_bytes: int = 8_000_000, val_fraction: float = 0.05,
                vocab_size: int | None = None, doc_sep: int | None = None) -> Corpus:
    """Loads and splits a corpus: the last ``val_fraction`` of the tokens is validation, unless
    ``data`` is a folder with ``train`` and ``val`` token files. ``max_bytes`` caps text corpora.
    Document starts: a text corpus's files, or (any corpus) the tokens after each ``doc_sep``."""
    val, byte_level, starts = None, True, None
    if data is None:
        raw, starts = stdlib_bytes(max_bytes, with_starts=True)
        tokens, vocab, source = np.frombuffer(raw, np.uint8), 256, "python-stdlib"
    else:
        path = Path(data)
        if not path.exists():
            raise ValueError(f"--data {data}: no such file or folder")
        split = _split_files(path) if path.is_dir() else None
        if split is not None:
            tokens, val = (token_file(p) for p in split)
            vocab, source, byte_level = _vocab(path, tokens, val), str(path), False
        elif path.suffix in TOKEN_SUFFIXES:
            tokens = token_file(path)
            vocab, source, byte_level = _vocab(path, tokens), str(path), False
        else:
            raw, starts = _text_bytes(path, max_bytes, with_starts=True)
            tokens, vocab, source = np.frombuffer(raw, np.uint8), 256, str(path)
    if vocab_size is not None:
        if vocab_size < vocab:
            raise ValueError(f"--vocab-size {vocab_size} is smaller than the data's {vocab} token ids")
        vocab = vocab_size
    val_starts = None
    if doc_sep is not None:
        if not 0 <= doc_sep < vocab:
            raise ValueError(f"--doc-sep {doc_sep}: not a token id of this corpus (0..{vocab - 1})")
        starts = separator_starts(tokens, doc_sep)
        if val is not None:
            val_starts = separator_starts(val, doc_sep)
    if val is None:
        n_val = max(1, int(len(tokens) * val_fraction))
        tokens, val = tokens[:-n_val], tokens[-n_val:]
        if starts is not None:  # (the validation split's first document starts at its offset 0)
            val_starts = np.union1d([0], starts[starts >= len(tokens)] - len(tokens)).astype(np.int64)
            starts = starts[starts < len(tokens)]
    if len(tokens) < 2 or len(val) < 1:
        raise ValueError(f"corpus {source} has only {len(tokens)} training and {len(val)} validation tokens")
    return Corpus(tokens, val, vocab, source, byte_level, starts, val_starts)


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch: int, seq_len: int,
              docs: np.ndarray | None = None) -> np.ndarray:
    """``[batch, seq_len + 1]`` random windows; a pure function of ``(seed, step)``. With document
    starts ``docs``: ``[batch, 2, seq_len + 1]``, the windows' tokens and each token's document (counted
    from 0 in each window; see :func:`split_documents`)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"--seq-len {seq_len} is longer than the corpus split ({len(tokens)} tokens)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    out = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
    if docs is None:
        return out
    doc = np.searchsorted(docs, starts[:, None] + np.arange(seq_len + 1), side="right")
    return np.stack([out, (doc - doc[:, :1]).astype(np.int32)], axis=1)


def split_documents(batch):
    """``(tokens, segment_ids or None)`` of a :func:`get_batch` batch (with documents: ``[B, 2, n]``)."""
    return (batch[:, 0], batch[:, 1]) if batch.ndim == 3 else (batch, None)
