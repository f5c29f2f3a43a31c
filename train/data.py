"""Token data for language modelling, with no download: the Python standard library's
own sources as a byte-level corpus by default, or a text file/folder, or token files: ``.npy``
(any integer dtype) or nanoGPT's raw uint16 ``.bin``, one file (its tail is validation) or a
folder holding ``train`` and ``val`` files. Token files are memory-mapped, never loaded whole.

Batches are a pure function of ``(seed, step)``, so a resumed run sees the same data.
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


def stdlib_bytes(max_bytes: int) -> bytes:
    """The running interpreter's standard-library ``*.py`` files, sorted, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def _text_bytes(path: Path, max_bytes: int) -> bytes:
    if path.is_file():
        return path.read_bytes()[:max_bytes]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"--data {path}: folder holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    out, total = [], 0
    for f in files:
        out.append(f.read_bytes())
        total += len(out[-1])
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


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
                vocab_size: int | None = None) -> Corpus:
    """Loads and splits a corpus: the last ``val_fraction`` of the tokens is validation, unless
    ``data`` is a folder with ``train`` and ``val`` token files. ``max_bytes`` caps text corpora."""
    val, byte_level = None, True
    if data is None:
        tokens, vocab, source = np.frombuffer(stdlib_bytes(max_bytes), np.uint8), 256, "python-stdlib"
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
            tokens, vocab, source = np.frombuffer(_text_bytes(path, max_bytes), np.uint8), 256, str(path)
    if vocab_size is not None:
        if vocab_size < vocab:
            raise ValueError(f"--vocab-size {vocab_size} is smaller than the data's {vocab} token ids")
        vocab = vocab_size
    if val is None:
        n_val = max(1, int(len(tokens) * val_fraction))
        tokens, val = tokens[:-n_val], tokens[-n_val:]
    if len(tokens) < 2 or len(val) < 1:
        raise ValueError(f"corpus {source} has only {len(tokens)} training and {len(val)} validation tokens")
    return Corpus(tokens, val, vocab, source, byte_level)


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """``[batch, seq_len + 1]`` random windows; a pure function of ``(seed, step)``."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"--seq-len {seq_len} is longer than the corpus split ({len(tokens)} tokens)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
