"""Hard-attention gates with gradient routing vs no gates, on the default image data:
``python -m jaxattn.train.gates_experiment [--models vit-tiny halonet-tiny] [--seeds 0 1 2]``.

Trains each model without gates, with gates trained jointly (one pass, ``optax.multi_transform``)
and with gates trained by gradient routing (two passes, separate Adam), for every seed, and
writes the test accuracy / macro-F1 table (mean +- std over seeds, and every run) to
``RESULTS.md`` between markers, leaving the rest of the file alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jaxattn.train.image import ImageConfig, train
from jaxattn.train.results import write_section

LR, WARMUP = 1e-3, 40  # fixed here so the table does not move with the task's defaults
VARIANTS = {  # name -> (model gates, gate mode)
    "no gates": ("none", "none"),
    "gates, joint (multi_transform)": ("features", "joint"),
    "gates, gradient routing": ("features", "routed"),
}


def run(models: Sequence[str], seeds: Sequence[int], steps: int, out_root: Path, progress: bool) -> list[dict]:
    rows = []
    for model in models:
        for variant, (gates, mode) in VARIANTS.items():
            for seed in seeds:
                cfg = ImageConfig(model=model, steps=steps, seed=seed, gates=gates, gate_mode=mode, lr=LR, warmup=WARMUP,
                                  eval_every=0, ckpt_every=steps, attn_impl="xla",
                                  out=str(out_root / f"{model}-{mode}-s{seed}"))
                t0 = time.perf_counter()
                res = train(cfg, progress=progress)
                rows.append(dict(model=model, variant=variant, seed=seed, steps=steps, acc=res["test_acc"],
                                 f1=res["test_f1"], seconds=time.perf_counter() - t0))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], info: str) -> str:
    lines = ["## Hard-attention gates with gradient routing (issue 4)", "", info, "",
             "| model | variant | test accuracy (mean ± std) | macro F1 (mean ± std) | runs (acc / F1) |",
             "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["model"], r["variant"]) for r in rows)
    for model, variant in keys:
        rs = [r for r in rows if r["model"] == model and r["variant"] == variant]
        acc, f1 = [r["acc"] for r in rs], [r["f1"] for r in rs]
        sd = (lambda x: statistics.stdev(x) if len(x) > 1 else 0.0)
        runs = ", ".join(f"s{r['seed']}: {r['acc']:.4f} / {r['f1']:.4f}" for r in rs)
        lines.append(f"| {model} | {variant} | {statistics.mean(acc):.4f} ± {sd(acc):.4f} | "
                     f"{statistics.mean(f1):.4f} ± {sd(f1):.4f} | {runs} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxattn.train.gates_experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit-tiny"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/gates-experiment")
    p.add_argument("--results", default="RESULTS.md")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    rows = run(a.models, a.seeds, a.steps, Path(a.out), not a.no_progress)
    import jax

    d = ImageConfig()
    info = (f"scikit-learn digits upsampled to {d.image_size}x{d.image_size} (fixed seeded split, "
            f"{int((1 - d.val_fraction) * 100)}/{int(d.val_fraction * 100)}), {a.steps} steps of batch {d.batch_size}, AdamW lr {LR} (warmup {WARMUP}) "
            f"warmup-cosine; gates: sigmoid feature gates on every block's attention and MLP branch "
            f"(ViT) / stage outputs (HaloNet), gate optimizer Adam lr {d.gate_lr}; no augmentation (the digits "
            f"set turns crop and flip off). Seeds {list(a.seeds)} (seed = init + data order). jax {jax.__version__} on {jax.default_backend()}; "
            f"`python -m jaxattn.train.gates_experiment --models {' '.join(a.models)} --seeds "
            f"{' '.join(map(str, a.seeds))} --steps {a.steps}`.")
    write_section(a.results, "gates-experiment", table(rows, info))
    (Path(a.out) / "runs.json").write_text(json.dumps([dataclasses.asdict(d)] + rows, indent=1, default=str))
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
