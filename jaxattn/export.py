"""``python -m jaxattn.export RUN_DIR OUT_DIR``: a training run's latest checkpoint as a Hugging Face /
timm folder (``config.json`` + ``model.safetensors``) that the original code loads: language-model runs of
TNL (TransNormerLLM's reference layout) and GPT (LLaMA / Qwen2 layout), image runs of ViT and HaloNet (timm
hub layout, with the run's normalisation as the folder's mean and std). See docs/pretrained.md."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def export(run_dir: str | Path, out_dir: str | Path, *, ema: bool = False) -> str:
    """Writes ``run_dir``'s model into ``out_dir`` (``ema``: the weights' moving average of a run trained
    with ``--ema-decay``); returns a one-line description."""
    from jaxattn.models import hf

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    conf = run_dir / "config.json"
    if not conf.exists():
        raise ValueError(f"{run_dir}: no config.json (expected a training --out folder)")
    if "byte_level" in json.loads(conf.read_text()):  # a language-model run
        from jaxattn.generate import load_trained

        model, cfg, step, _ = load_trained(run_dir, ema=ema)
        hf.save_pretrained(model, out_dir)
        return f"{cfg.model} step {step}{' (EMA weights)' if ema else ''} -> {out_dir}"
    from jaxattn.train.image import load_trained as load_image_run

    model, icfg, data, step = load_image_run(run_dir, ema=ema)
    hf.save_pretrained(model, out_dir)
    raw = json.loads((out_dir / "config.json").read_text())  # the run's own normalisation
    raw["pretrained_cfg"].update(mean=[float(x) for x in data.mean], std=[float(x) for x in data.std])
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return f"{icfg.model} step {step}{' (EMA weights)' if ema else ''} -> {out_dir}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxattn.export", description=__doc__)
    p.add_argument("run", help="a training --out folder (lm or image task)")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--ema", action="store_true", help="the weights' moving average (runs trained with --ema-decay)")
    a = p.parse_args(argv)
    try:
        print(export(a.run, a.out, ema=a.ema))
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
