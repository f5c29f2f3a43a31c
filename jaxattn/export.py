"""``python -m jaxattn.export RUN_DIR OUT_DIR``: a training run's latest checkpoint as a Hugging Face /
timm folder (``config.json`` + ``model.safetensors``) that the original code loads: language-model runs of
TNL (TransNormerLLM's reference layout) and GPT (LLaMA / Mistral / Qwen / Gemma layouts; a run fine-tuned
from a Hugging Face folder also gets that folder's tokenizer files and token ids), image runs of ViT, Eva
and HaloNet (timm hub layout, with the run's normalisation as the folder's mean and std). LoRA adapters are
folded into the weights, or (``--adapter-only``) written alone as a PEFT adapter for the base folder. See
docs/pretrained.md."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


# what a Hugging Face folder keeps beside its weights for its tokenizer and generation defaults
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_tokenizer(source: Path, out_dir: Path) -> list[str]:
    """Copies ``source``'s tokenizer files into ``out_dir`` and its token ids into ``out_dir/config.json``;
    returns the names copied."""
    copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    for name in copied:
        shutil.copy2(source / name, out_dir / name)
    src = json.loads((source / "config.json").read_text())
    ids = {k: src[k] for k in TOKEN_IDS if src.get(k) is not None}
    if ids:
        raw = json.loads((out_dir / "config.json").read_text())
        (out_dir / "config.json").write_text(json.dumps({**raw, **ids}, indent=2) + "\n")
    return copied


def export(run_dir: str | Path, out_dir: str | Path, *, ema: bool = False, adapter_only: bool = False) -> str:
    """Writes ``run_dir``'s model into ``out_dir`` (``ema``: the weights' moving average of a run trained
    with ``--ema-decay``; ``adapter_only``: a LoRA run's adapters alone, as a PEFT adapter folder for the
    Hugging Face folder it fine-tuned); returns a one-line description."""
    from jaxattn.models import hf

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    conf = run_dir / "config.json"
    if not conf.exists():
        raise ValueError(f"{run_dir}: no config.json (expected a training --out folder)")
    if "byte_level" in json.loads(conf.read_text()):  # a language-model run
        from jaxattn.generate import load_trained

        model, cfg, step, _ = load_trained(run_dir, ema=ema)
        if adapter_only:
            from jaxattn.models.lora import save_peft_adapter

            source = hf.raw_config(cfg.model).get("model_type") if hf.hf_model_type(cfg.model) else None
            if source is None or not cfg.lora_rank:
                raise ValueError(f"--adapter-only writes the LoRA adapters of a run fine-tuned from a Hugging Face "
                                 f"folder (--model FOLDER --lora-rank R); {run_dir} " +
                                 ("has no adapters" if source else f"trained {cfg.model}"))
            targets = save_peft_adapter(model, out_dir, base=str(cfg.model))
            copy = [n for n in TOKENIZER_FILES if (Path(cfg.model) / n).is_file()]
            for name in copy:
                shutil.copy2(Path(cfg.model) / name, out_dir / name)
            return (f"{cfg.model} step {step}{' (EMA weights)' if ema else ''}: LoRA adapters on {', '.join(targets)} "
                    f"-> {out_dir} (a PEFT adapter for {cfg.model})")
        hf.save_pretrained(model, out_dir)
        note = ""
        if hf.hf_model_type(cfg.model) is not None:  # fine-tuned from a folder: its tokenizer comes along
            copied = copy_tokenizer(Path(cfg.model), out_dir)
            note = f" (with {', '.join(copied)} from {cfg.model})" if copied else ""
        elif any(c in str(cfg.model) for c in "/\\"):
            note = f" (the source folder {cfg.model} is gone: no tokenizer files copied)"
        return f"{cfg.model} step {step}{' (EMA weights)' if ema else ''} -> {out_dir}{note}"
    if adapter_only:
        raise ValueError(f"--adapter-only: {run_dir} is an image run; adapters are exported from LoRA language-model "
                         "runs")
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
    p.add_argument("--adapter-only", action="store_true", help="a LoRA run (--lora-rank) fine-tuned from a Hugging "
                   "Face folder: its adapters alone, as a PEFT adapter folder for that base")
    a = p.parse_args(argv)
    try:
        print(export(a.run, a.out, ema=a.ema, adapter_only=a.adapter_only))
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
