"""``python -m jaxattn.generate --checkpoint DIR --prompt "..."``: sample bytes from a trained LM."""

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
    """Rebuilds the model from ``DIR/config.json`` and restores the latest checkpoint."""
    from jaxattn.train.lm import LMConfig, Trainer, _manager, default_model_factory

    run_dir = Path(run_dir)
    conf_path = run_dir / "config.json"
    if not conf_path.exists():
        raise ValueError(f"--checkpoint {run_dir}: no config.json (is it a training --out folder?)")
    raw = json.loads(conf_path.read_text())
    vocab = raw.pop("vocab_size")
    raw.pop("source", None)
    cfg = LMConfig(**{k: v for k, v in raw.items() if k in LMConfig.__dataclass_fields__})
    cfg.vocab_size = vocab
    cfg.seq_parallel = 1  # sampling runs on one device
    trainer = Trainer(cfg, default_model_factory(cfg, vocab), devices=jax.local_devices()[:1])
    manager = _manager(run_dir)
    step = manager.latest_step()
    if step is None:
        raise ValueError(f"--checkpoint {run_dir}: no checkpoint found in {run_dir / 'checkpoints'}")
    trainer.restore(manager, step)
    return trainer.model, cfg, int(step)


def main(argv: Sequence[str] | None = None) -> int:
    from jaxattn.models import generate

    p = argparse.ArgumentParser(prog="python -m jaxattn.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a training --out folder")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        model, cfg, step = load_trained(a.checkpoint)
    except ValueError as e:
        p.error(str(e))
    if not a.prompt:
        p.error("--prompt must not be empty")
    prompt = np.frombuffer(a.prompt.encode(), np.uint8).astype(np.int32)[None]
    toks = generate(model, jnp.asarray(prompt), a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k or None, key=jax.random.PRNGKey(a.seed))
    print(bytes(np.asarray(toks[0]).clip(0, 255).astype(np.uint8)).decode("utf-8", errors="replace"))
    print(f"[{cfg.model}, step {step}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
