"""Metrics to CSV (and TensorBoard when installed), and a loss-curve PNG."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

FIELDS = ["step", "loss", "lr", "tokens_per_s", "val_loss", "val_ppl"]


class MetricsLog:
    """Appends rows to ``DIR/metrics.csv``; on resume, rows after the restored step are dropped
    so that the file shows one unbroken curve."""

    def __init__(self, out_dir: Path, resume_step: int | None = None):
        self.path = out_dir / "metrics.csv"
        rows = self.read(self.path) if resume_step is not None and self.path.exists() else []
        rows = [r for r in rows if int(r["step"]) <= (resume_step or 0)]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from tensorboardX import SummaryWriter  # optional

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # noqa: BLE001
            pass

    def log(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v not in ("", None):
                    self.tb.add_scalar(k, v, row["step"])

    @staticmethod
    def read(path: Path) -> list[dict]:
        with Path(path).open() as f:
            return list(csv.DictReader(f))


def plot_losses(csv_path: Path, png_path: Path, title: str = "") -> bool:
    """Train and validation loss against step; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        warnings.warn("matplotlib is not installed: no loss plot (pip install matplotlib)", stacklevel=2)
        return False
    rows = MetricsLog.read(csv_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    va = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
