"""Token data for language modelling, with no download: the Python standard library's
own sources as a byte-level corpus by default, or a text file/folder, or ``.npy`` tokens.

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
    train: np.ndarray  # 1-D int32 tokens
    val: np.ndarray
    vocab_size: int
    source: str


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


def load_corpus(data: str | None = None, *, max_bytes: int = 8_000_000, val_fraction: float = 0.05,
                vocab_size: int | None = None) -> Corpus:
    """Loads and splits a corpus; the last ``val_fraction`` of the tokens is validation."""
    if data is None:
        tokens, vocab, source = np.frombuffer(stdlib_bytes(max_bytes), np.uint8), 256, "python-stdlib"
    else:
        path = Path(data)
        if not path.exists():
            raise ValueError(f"--data {data}: no such file or folder")
        if path.suffix == ".npy":
            tokens = np.load(path)
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"--data {data}: expected a 1-D integer token array, got "
                                 f"{tokens.dtype} {tokens.shape}")
            if tokens.size and tokens.min() < 0:
                raise ValueError(f"--data {data}: token ids must be >= 0")
            vocab = int(tokens.max()) + 1 if tokens.size else 0
            source = str(path)
        else:
            tokens, vocab, source = np.frombuffer(_text_bytes(path, max_bytes), np.uint8), 256, str(path)
    if vocab_size is not None:
        if vocab_size < vocab:
            raise ValueError(f"--vocab-size {vocab_size} is smaller than the data's {vocab} token ids")
        vocab = vocab_size
    tokens = np.asarray(tokens, np.int32)
    n_val = max(1, int(len(tokens) * val_fraction))
    if len(tokens) - n_val < 2:
        raise ValueError(f"corpus {source} has only {len(tokens)} tokens")
    return Corpus(tokens[:-n_val], tokens[-n_val:], vocab, source)


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """``[batch, seq_len + 1]`` random windows; a pure function of ``(seed, step)``."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"--seq-len {seq_len} is longer than the corpus split ({len(tokens)} tokens)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts])
