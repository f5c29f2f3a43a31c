"""``python -m jaxattn.bench attention [--seqs ...] [--json PATH]``.

On a machine without a GPU the default is a tiny smoke sweep in interpret mode
(seconds); on a GPU the default is the full sweep of the attention issue.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from jaxattn.bench import attention as attention_bench
from jaxattn.bench.timing import device_summary


def _table(records: list[dict]) -> str:
    cols = ["seq", "batch", "heads", "head_dim", "causal", "dtype", "mode", "impl", "ms", "TFLOP/s", "jaxattn speedup"]
    base = {}
    for r in records:
        if r["impl"] == "jaxattn" and r.get("ms"):
            base[_key(r)] = r["ms"]
    rows = []
    for r in records:
        ms = r.get("ms")
        ref = base.get(_key(r))
        rows.append([
            str(r["seq"]), str(r["batch"]), str(r["heads"]), str(r["head_dim"]), str(r["causal"]),
            r["dtype"], r["mode"], r["impl"],
            f"{ms:.3f}" if ms else "n/a",
            f"{r['tflops']:.3g}" if ms else r.get("error", "")[:60],
            f"{ms / ref:.2f}x" if ms and ref else "",
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def _key(r: dict) -> tuple:
    return (r["seq"], r["batch"], r["heads"], r["head_dim"], r["causal"], r["dtype"], r["mode"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxattn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="op", required=True)
    p = sub.add_parser("attention", help="softmax flash attention vs XLA, cuDNN, JAX Pallas, PyTorch")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq per case")
    p.add_argument("--model-dim", type=int, default=2048, help="heads * head_dim per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sweep (the default without a GPU)")
    p.add_argument("--json", metavar="PATH", help="also write the records (and device info) as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    gpu = jax.default_backend() == "gpu"
    smoke = args.smoke or not gpu
    if smoke:
        cases = attention_bench.smoke_cases()
        warmup, runs = 1, 3
        print("no GPU: running the smoke sweep in interpret mode" if not gpu else "smoke sweep",
              file=sys.stderr)
    else:
        causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
        cases = attention_bench.gpu_cases(args.seqs, args.head_dims, causals, args.dtypes, args.modes,
                                          args.tokens, args.model_dim)
        warmup, runs = args.warmup, args.runs
    records = attention_bench.run(cases, warmup=warmup, runs=runs, interpret=not gpu,
                                  progress=not args.no_progress)
    info = device_summary()
    print(f"# attention | {info['device']} | jax {info['jax']} | {info['date']}")
    print(_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "records": records}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
