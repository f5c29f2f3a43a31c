"""``python -m jaxattn.train lm --model tnl-tiny [options]`` (console script ``jaxattn-train``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from jaxattn.train.lm import LMConfig, train


def _add_lm(sub) -> None:
    p = sub.add_parser("lm", help="language modelling (default: TNL on the Python stdlib's bytes)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = LMConfig()
    p.add_argument("--model", default=d.model, help="a name from jaxattn.models.MODEL_CONFIGS")
    p.add_argument("--data", default=None,
                   help="text file or folder (bytes), or .npy tokens; default: the Python stdlib sources")
    for f in dataclasses.fields(LMConfig):
        if f.name in ("model", "data"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(d, f.name)
        typ = {int: int, float: float, str: str}.get(type(default), str)
        if f.name in ("vocab_size", "out"):
            typ = int if f.name == "vocab_size" else str
        kw = dict(choices=["float32", "bfloat16"]) if f.name == "dtype" else {}
        kw = dict(choices=["auto", "pallas", "xla"]) if f.name == "attn_impl" else kw
        p.add_argument(flag, type=typ, default=default, **kw)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxattn.train")
    sub = parser.add_subparsers(dest="task", required=True)
    _add_lm(sub)
    args = vars(parser.parse_args(argv))
    task = args.pop("task")
    resume, no_progress = args.pop("resume"), args.pop("no_progress")
    if task == "lm":
        cfg = LMConfig(**args)
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "ckpt_every", "log_every"):
            if getattr(cfg, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        try:
            train(cfg, resume=resume, progress=not no_progress)
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
