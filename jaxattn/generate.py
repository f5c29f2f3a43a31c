"""``python -m jaxattn.generate --checkpoint DIR --prompt "..."``: sample from a trained LM: text for
byte-level runs, or token ids (``--prompt-ids 1,2,3``) for runs on token files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def load_trained(run_dir: str | Path):
    """Rebuilds the model from ``DIR/config.json`` and restores the latest checkpoint: ``(model,
    LMConfig, step, byte_level)`` (``byte_level``: the run's tokens are bytes, not a token file's ids)."""
    from jaxattn.train.lm import LMConfig, Trainer, _manager, default_model_factory

    run_dir = Path(run_dir)
    conf_path = run_dir / "config.json"
    if not conf_path.exists():
        raise ValueError(f"--checkpoint {run_dir}: no config.json (is it a training --out folder?)")
    raw = json.loads(conf_path.read_text())
    vocab = raw.pop("vocab_size")
    raw.pop("source", None)
    byte_level = raw.pop("byte_level", vocab == 256)  # (runs before the field: byte-level iff 256 ids)
    cfg = LMConfig(**{k: v for k, v in raw.items() if k in LMConfig.__dataclass_fields__})
    cfg.vocab_size = vocab
    cfg.seq_parallel = 1  # sampling runs on one device
    trainer = Trainer(cfg, default_model_factory(cfg, vocab), devices=jax.local_devices()[:1])
    manager = _manager(run_dir)
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"--checkpoint {run_dir}: no checkpoint found in {run_dir / 'checkpoints'}")
    trainer.restore(manager, step)
    return trainer.model, cfg, int(step), bool(byte_level)


def _ids(text: str, vocab: int) -> np.ndarray:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by commas or spaces, got {text!r}") from None
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"--prompt-ids must be one or more ids in [0, {vocab}), got {text!r}")
    return np.asarray(ids, np.int32)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxattn.models import generate

    p = argparse.ArgumentParser(prog="python -m jaxattn.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a training --out folder")
    p.add_argument("--prompt", default=None, help='text, for byte-level runs (default "def ")')
    p.add_argument("--prompt-ids", default=None, help="token ids such as 464,2068 (runs on token files)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        model, cfg, step, byte_level = load_trained(a.checkpoint)
    except ValueError as e:
        p.error(str(e))
    if a.prompt is not None and a.prompt_ids is not None:
        p.error("give --prompt (text) or --prompt-ids (token ids), not both")
    if a.prompt_ids is not None:
        try:
            prompt = _ids(a.prompt_ids, cfg.vocab_size)
        except ValueError as e:
            p.error(str(e))
    elif not byte_level:
        p.error(f"{a.checkpoint} was trained on token ids ({cfg.vocab_size} of them), not bytes: give the "
                "prompt as --prompt-ids 1,2,3 (ids of its tokenizer)")
    else:
        text = "def " if a.prompt is None else a.prompt
        if not text:
            p.error("--prompt must not be empty")
        prompt = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    toks = generate(model, jnp.asarray(prompt)[None], a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k or None, key=jax.random.PRNGKey(a.seed))
    out = np.asarray(toks[0])
    if byte_level:
        print(bytes(out.clip(0, 255).astype(np.uint8)).decode("utf-8", errors="replace"))
    else:
        print(" ".join(map(str, out.tolist())))
    print(f"[{cfg.model}, step {step}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
