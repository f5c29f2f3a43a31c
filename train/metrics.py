"""Metrics to CSV (and TensorBoard when installed), loss/metric curves and confusion-matrix PNGs,
and classification scores (accuracy, macro F1, confusion matrix)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxattn.viz import _pyplot  # the one matplotlib loader

FIELDS = ["step", "loss", "lr", "tokens_per_s", "val_loss", "val_ppl"]


class MetricsLog:
    """Appends rows to ``DIR/metrics.csv``; on resume, rows after the restored step are dropped
    so that the file shows one unbroken curve. Columns start as ``fields`` (plus those of a resumed
    file) and grow when a row brings a new name (the file is rewritten with the wider header)."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, fields: Sequence[str] | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        self.fields = list(fields or FIELDS)
        if "step" not in self.fields:
            self.fields.insert(0, "step")
        rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                reader = csv.DictReader(f)
                self.fields += [k for k in reader.fieldnames or () if k not in self.fields]
                rows = [r for r in reader if int(r["step"]) <= resume_step]
        self._write(rows)
        self.tb = None
        try:
            from tensorboardX import SummaryWriter  # optional

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        except Exception:  # noqa: BLE001
            pass

    def _write(self, rows: list[dict]) -> None:
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in self.fields} for r in rows)

    def log(self, **row) -> None:
        new = [k for k in row if k not in self.fields]
        if new:
            old = self.read(self.path)
            self.fields += new
            self._write(old)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v not in ("", None):
                    self.tb.add_scalar(k, v, row["step"])

    @staticmethod
    def read(path: Path) -> list[dict]:
        with Path(path).open() as f:
            return list(csv.DictReader(f))


def _series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


def plot_curves(csv_path: Path, png_path: Path, title: str = "", metrics: Sequence[str] = ()) -> bool:
    """Training loss and every ``*_loss`` column against step; with ``metrics`` (e.g. ``test_acc``),
    a second panel of those. False (with a warning) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = MetricsLog.read(csv_path)
    cols = list(rows[0]) if rows else []
    metrics = [m for m in metrics if m in cols]
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(11 if metrics else 6, 4), squeeze=False)
    ax = axes[0, 0]
    tr = _series(rows, "loss")
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    for c in cols:
        if c.endswith("_loss") and (s := _series(rows, c)):
            ax.plot(*zip(*s), "o-", label={"val_loss": "validation"}.get(c, c.removesuffix("_loss")))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)" if "val_ppl" in cols else "loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if metrics:
        ax = axes[0, 1]
        for m in metrics:
            if s := _series(rows, m):
                ax.plot(*zip(*s), "o-" if not m.startswith("train_") else "-", label=m, lw=1 if m.startswith("train_") else 1.5)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def plot_losses(csv_path: Path, png_path: Path, title: str = "") -> bool:
    """Train and validation loss against step (see :func:`plot_curves`)."""
    return plot_curves(csv_path, png_path, title)


# -- classification ----------------------------------------------------------------------
def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def classification_scores(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (mean over classes that occur in labels or predictions; a class's F1 is
    0 when it has no true positives) from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return {"acc": float(tp.sum() / max(cm.sum(), 1)), "f1": float(f1[present].mean()) if present.any() else 0.0}


def plot_confusion(cm: np.ndarray, png_path: Path, class_names: Sequence[str] | None = None,
                   title: str = "") -> bool:
    """Row-normalised confusion matrix (counts in the cells when there are at most 20 classes)."""
    plt = _pyplot()
    if plt is None:
        return False
    n = cm.shape[0]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(12, 3 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 20:
        names = list(class_names or range(n))
        ax.set_xticks(range(n), [str(c) for c in names], rotation=45 if n > 10 else 0, ha="right" if n > 10 else "center")
        ax.set_yticks(range(n), [str(c) for c in names])
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
