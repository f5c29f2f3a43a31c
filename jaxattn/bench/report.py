"""Turns benchmark JSON files into a ``BENCHMARKS.md`` section and checks the issues' targets.

``python -m jaxattn.bench.report a.json b.json ... [--out section.md]``

Each file is what ``python -m jaxattn.bench <op> --json PATH`` wrote. The section has one table
per file (headed by device, jax version and date) and a closing "Targets" table: every
performance target of the issues that the records can decide, with the measured ratio, the
threshold and PASS/FAIL; a target whose records are missing is listed as "not measured".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Sequence

from jaxattn.bench.runner import case_key, format_table, markdown_table


@dataclasses.dataclass(frozen=True)
class Target:
    """A measured ratio against its threshold (``higher``: pass when ratio >= threshold)."""

    issue: int
    name: str
    ratio: float | None
    threshold: float
    higher: bool = True
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "not measured"
        ok = self.ratio >= self.threshold if self.higher else self.ratio <= self.threshold
        return "PASS" if ok else "FAIL"


def _ms(records: Iterable[dict], impl: str | Sequence[str], **case) -> float | None:
    """Fastest time of ``impl`` (or of any of several impls) over records matching ``case``."""
    impls = {impl} if isinstance(impl, str) else set(impl)
    times = [r["ms"] for r in records if r["impl"] in impls and r.get("ms") and _same(r, case)]
    return min(times) if times else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _attention(recs: list[dict]) -> list[Target]:
    out = []
    case = dict(seq=8192, head_dim=128, dtype="bfloat16")
    for causal in (False, True):
        c = {**case, "causal": causal}
        tag = "causal" if causal else "non-causal"
        # the Triton path, then impl="mosaic" (the FlashAttention-3 forward on Mosaic GPU) when timed
        for impl, label in (("jaxattn", ""), ("jaxattn-mosaic", " impl=mosaic")):
            ours_f, ours_b = (_ms(recs, impl, mode=m, **c) for m in ("fwd", "fwd+bwd"))
            if impl != "jaxattn" and not (ours_f or ours_b):
                continue
            out += [
                Target(2, f"flash fwd{label} vs JAX Pallas mha, S=8192 d=128 bf16 {tag}",
                       _ratio(_ms(recs, "jax-pallas", mode="fwd", **c), ours_f), 1.2),
                Target(2, f"flash fwd{label} vs cuDNN, S=8192 d=128 bf16 {tag}",
                       _ratio(_ms(recs, "cudnn", mode="fwd", **c), ours_f), 0.8),
                Target(2, f"flash fwd+bwd{label} vs JAX Pallas mha, S=8192 d=128 bf16 {tag}",
                       _ratio(_ms(recs, "jax-pallas", mode="fwd+bwd", **c), ours_b), 1.0),
            ]
    return out


def _lightning(recs: list[dict]) -> list[Target]:
    out = []
    ours = [r for r in recs if r["impl"] == "jaxattn" and r.get("ms") and r["mode"] == "fwd+bwd"
            and 2048 <= r["seq"] <= 65536]
    for d in sorted({r["head_dim"] for r in ours}):
        per_tok = {r["seq"]: r["ms"] / (r["batch"] * r["seq"]) for r in ours if r["head_dim"] == d}
        ratio = max(per_tok.values()) / min(per_tok.values()) if len(per_tok) > 1 else None
        seqs = sorted(per_tok)
        out.append(Target(3, f"lightning fwd+bwd time/token max/min over S={seqs[0]}..{seqs[-1]}, d={d}",
                          ratio, 1.3, higher=False))
    for mode in ("fwd", "fwd+bwd"):
        c = dict(seq=32768, mode=mode)
        out.append(Target(3, f"lightning vs our softmax flash, S=32768 {mode} (worst head dim)",
                          _worst_ratio(recs, "jaxattn-softmax-flash", c), 3.0))
    fla = ("fla-simple-gla", "lightning-attn")
    for mode in ("fwd", "fwd+bwd"):
        pairs = [(_ms(recs, fla, **k), _ms(recs, "jaxattn", **k)) for k in _cases(recs, mode=mode)]
        worst = min((a / b for a, b in pairs if a and b), default=None)
        out.append(Target(3, f"lightning vs fastest flash-linear-attention/lightning-attn kernel, {mode} "
                             "(worst case)", worst, 1 / 1.2))
    return out


def _cases(recs: list[dict], **case) -> list[dict]:
    """Distinct case keys (without impl/timing fields) of the records matching ``case``."""
    keys, seen = [], set()
    for r in recs:
        t = case_key(r)
        if _same(r, case) and t not in seen:
            seen.add(t)
            keys.append(dict(t))
    return keys


def _worst_ratio(recs: list[dict], peer: str, case: dict) -> float | None:
    """Smallest peer/jaxattn time ratio over the cases matching ``case`` (None: nothing to compare)."""
    ratios = [_ratio(_ms(recs, peer, **k), _ms(recs, "jaxattn", **k)) for k in _cases(recs, **case)]
    return min((r for r in ratios if r), default=None)


def _sage(recs: list[dict]) -> list[Target]:
    keys = [k for k in _cases(recs, head_dim=128) if k["seq"] >= 4096]
    ratios = [_ratio(_ms(recs, "flash-bf16", **k), _ms(recs, "jaxattn", **k)) for k in keys]
    ratios = [r for r in ratios if r]
    out = [Target(5, "sage fwd vs our bf16 flash, d=128, S>=4k (worst case)", min(ratios, default=None), 1.5)]
    for flash in ("flash-bf16", "flash-mosaic"):  # impl="mosaic" Sage, when timed
        r = [_ratio(_ms(recs, flash, **k), _ms(recs, "jaxattn-mosaic", **k)) for k in keys]
        if r := [x for x in r if x]:
            out.append(Target(5, f"sage fwd impl=mosaic vs our bf16 flash ({flash}), d=128, S>=4k (worst case)",
                              min(r), 1.5))
    return out


def _sage_accuracy(acc: list[dict]) -> list[Target]:
    on = [a for a in acc if a["smooth_k"]]
    return [
        Target(5, "sage cosine similarity vs fp32, smoothing on (worst case)",
               min((a["cos_sim"] for a in on), default=None), 0.999),
        Target(5, "sage relative L1 vs fp32, smoothing on (worst case)",
               max((a["rel_l1"] for a in on), default=None), 0.05, higher=False),
    ]


def _halo(recs: list[dict]) -> list[Target]:
    return [
        Target(4, "halo fwd+bwd vs XLA unfold (worst stage shape)",
               _worst_ratio(recs, "xla-unfold", dict(mode="fwd+bwd")), 3.0),
        Target(4, "halo vs timm HaloAttn (worst stage shape and mode)", _worst_ratio(recs, "timm-halo", {}), 1.0),
    ]


def _sparse(recs: list[dict]) -> list[Target]:
    out = [Target(6, "PowerAttention prefill (fwd) vs full flash, S=131072",
                  _worst_ratio(recs, "flash-full", dict(pattern="power", seq=131072, mode="fwd")), 3.0)]
    # the Triton kernels, then impl="mosaic" (block-sparse and dense causal both on Mosaic) when timed
    for sparse, dense, label in (("jaxattn", "flash-full", ""), ("jaxattn-mosaic", "flash-full-mosaic", " impl=mosaic")):
        per_block = []
        for k in _cases(recs):
            ours = [r for r in recs if r["impl"] == sparse and r.get("ms") and _same(r, k)]
            full = [r for r in recs if r["impl"] == dense and r.get("ms") and _same(r, k)]
            if ours and full:
                # tflops counts visited pairs only for the sparse kernel; full flash the whole causal grid
                per_block.append(ours[0]["tflops"] / full[0]["tflops"])
        if label and not per_block:
            continue
        out.append(Target(6, f"block-sparse{label} throughput per visited block vs dense flash (worst case)",
                          min(per_block, default=None), 0.9))
    return out


def _same(r: dict, key: dict) -> bool:
    return all(r.get(a) == b for a, b in key.items())


CHECKS: dict[str, Callable[[list[dict]], list[Target]]] = {
    "attention": _attention, "lightning": _lightning, "sage": _sage, "halo": _halo, "sparse": _sparse,
}


def _other_table(records: list[dict]) -> str:
    """Plain table for the model-level records (vision, tnl)."""
    cols = list(dict.fromkeys(k for r in records for k in r))
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    return markdown_table(cols, [[fmt(r.get(c, "")) for c in cols] for r in records])


def section(datas: list[dict]) -> tuple[str, list[Target]]:
    """Markdown for the loaded JSON files and the targets they decide."""
    parts, targets = [], []
    for data in datas:
        op, info, recs = data["op"], data["info"], data["records"]
        parts.append(f"### {op} | {info['device']} | jax {info['jax']} | {info['date']}\n")
        parts.append(_other_table(recs) if op in ("vision", "tnl") else format_table(recs))
        if op == "decode":
            from jaxattn.bench.decode import summary

            parts.append("\nKV-cache bandwidth:\n\n" + summary(recs))
        if op in CHECKS:
            targets += CHECKS[op](recs)
        if data.get("accuracy"):
            from jaxattn.bench.sage import format_accuracy

            parts.append("\nAccuracy against fp32 attention:\n\n" + format_accuracy(data["accuracy"]))
            targets += _sage_accuracy(data["accuracy"])
        parts.append("")
    if targets:
        rows = [[str(t.issue), t.name, f"{t.ratio:.3f}" if t.ratio is not None else "-",
                 (">= " if t.higher else "<= ") + f"{t.threshold:.3g}", t.verdict] for t in targets]
        parts.append("### Targets\n\n" + markdown_table(["issue", "target", "measured", "needed", "verdict"], rows))
    return "\n".join(parts) + "\n", targets


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxattn.bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON files written by python -m jaxattn.bench ... --json")
    ap.add_argument("--out", help="also write the section to this file")
    args = ap.parse_args(argv)
    datas = []
    for f in args.files:
        try:
            with open(f) as fh:
                datas.append(json.load(fh))
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
    text, _ = section(datas)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
