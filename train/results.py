"""Shared ``RESULTS.md`` writer: each experiment owns one section between its own markers."""

from __future__ import annotations

import fcntl
from pathlib import Path

HEADER = "# Results\n\nMeasured by the experiment scripts in `train/`.\n"


def markers(key: str) -> tuple[str, str]:
    """The begin/end HTML comments that delimit experiment ``key``'s section."""
    return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def write_section(path: str | Path, key: str, body: str) -> None:
    """Replaces (or appends) the section of experiment ``key`` in ``path`` with ``body`` (markdown,
    without markers), leaving every other section alone. Safe against concurrent writers (flock)."""
    path = Path(path)
    begin, end = markers(key)
    block = f"{begin}\n{body.strip()}\n{end}"
    path.touch(exist_ok=True)
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read() or HEADER
        if begin in text and end in text:
            text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        f.seek(0)
        f.write(text)
        f.truncate()
