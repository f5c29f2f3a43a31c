"""``python -m jaxattn.bench {attention,decode,mla,lightning,delta,halo,l2vit,landmark,sage,sparse,moe,vision,tnl,compile,traffic,tune} [options] [--json PATH]``.

Without a GPU the default is a tiny smoke sweep in interpret mode (seconds); on a GPU the
default is the full sweep. Prints a table (ms, TFLOP/s, ns per token, speedup of jaxattn
over each peer) headed by device, jax version and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import jax

from jaxattn.bench import runner
from jaxattn.bench.runner import format_table
from jaxattn.bench.timing import device_summary

__all__ = ["format_table", "main"]

COMPILE_ONLY_DEVICE = "compile-only NVIDIA H100 (sm_90a), on "  # (--compile-only: the device line's prefix)

def _sweep(p: argparse.ArgumentParser, warmup: int = 3, runs: int = 20) -> None:
    """Options of every sweep: dtypes, modes, timing, smoke, JSON, progress."""
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--smoke", action="store_true", help="tiny sweep (the default without a GPU)")
    p.add_argument("--json", metavar="PATH", help="also write the records and device info as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU needed: compile the GPU sweep's JAX peers for a compile-only H100 instead of "
                        "timing them (XLA's compiler; pip install -e '.[aot]'), to find what would fail there")


def _common(p: argparse.ArgumentParser, seqs: list[int], tokens: int) -> None:
    """A sequence-length sweep at fixed tokens per case and model width."""
    p.add_argument("--seqs", type=int, nargs="+", default=seqs)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=tokens, help="batch * seq per case")
    p.add_argument("--model-dim", type=int, default=2048, help="heads * head_dim per case")
    _sweep(p)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (one subcommand per bench)."""
    parser = argparse.ArgumentParser(prog="python -m jaxattn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="op", required=True)
    p = sub.add_parser("attention", help="softmax flash attention vs XLA, cuDNN, JAX Pallas, PyTorch")
    _common(p, [1024, 2048, 4096, 8192, 16384, 32768], 16384)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p = sub.add_parser("decode", help="one-token decode from a KV cache vs XLA, cuDNN, JAX Pallas, flash-attn")
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 32768, 131072], help="cache lengths")
    p.add_argument("--head-dims", type=int, nargs="+", default=[128])
    p.add_argument("--tokens", type=int, default=262144, help="batch * cache length per case")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    _sweep(p)
    p.set_defaults(modes=["fwd"])  # forward only; --modes is ignored
    p = sub.add_parser("mla", help="multi-head latent attention decoding (DeepSeek-V3's latent cache) vs XLA")
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 32768, 131072], help="cache lengths")
    p.add_argument("--tokens", type=int, default=262144, help="batch * cache length per case")
    p.add_argument("--heads", type=int, default=128)
    _sweep(p)
    p.set_defaults(modes=["fwd"])  # forward only; --modes is ignored
    p = sub.add_parser("lightning", help="Lightning Attention-2 vs dense, scan, softmax flash, fla")
    _common(p, [1024, 2048, 4096, 8192, 16384, 32768, 65536], 65536)
    p = sub.add_parser("delta", help="gated delta rule (Gated DeltaNet): chunked kernel vs XLA chunked, scan, fla")
    _common(p, [2048, 8192, 32768], 65536)
    p.add_argument("--decays", nargs="+", choices=["head", "channel"], default=["head", "channel"],
                   help="one decay per head (Gated DeltaNet) and / or per key channel (Kimi Delta Attention)")
    p = sub.add_parser("sage", help="SageAttention2 INT8/FP8 (inference) vs bf16 flash, cuDNN, sageattention")
    _common(p, [1024, 2048, 4096, 8192, 16384, 32768], 16384)
    p.set_defaults(modes=["fwd"])  # forward only; --modes is ignored
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    p = sub.add_parser("l2vit", help="L2ViT linear global attention (KV-first XLA) vs quadratic form, softmax")
    _common(p, [1024, 4096, 16384, 65536], 65536)
    p.add_argument("--cpu", action="store_true", help="a small timed CPU sweep (seq 196/784/3136, 4 heads x 32)")
    p = sub.add_parser("landmark", help="Landmark attention kernels vs the dense XLA form, causal flash, cuDNN")
    _common(p, [1024, 2048, 4096, 8192, 16384], 16384)
    p.add_argument("--block-lens", type=int, nargs="+", default=[64], help="tokens per block incl. the landmark")
    p = sub.add_parser("halo", help="HaloNet attention vs the XLA unfold formulation and timm")
    p.add_argument("--batch", type=int, default=8)
    _sweep(p)
    p = sub.add_parser("sparse", help="block-sparse PowerAttention / sliding window vs full flash, FlexAttention")
    p.add_argument("--seqs", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--patterns", nargs="+", default=["power", "window", "causal"], choices=["power", "window", "causal"])
    p.add_argument("--head-dim", type=int, default=128, help="(halo: 32 at the HaloNet stage shape)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=256, help="PowerAttention block size B")
    p.add_argument("--power-window", type=int, default=None, help="tokens (default 5 B)")
    p.add_argument("--sw-window", type=int, default=4096, help="sliding window, tokens")
    _sweep(p, warmup=2, runs=10)
    p = sub.add_parser("moe", help="mixture-of-experts MLP: ragged_dot / gathered dispatch vs every expert dense")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512, 4096, 16384], help="tokens per case")
    from jaxattn.bench.moe import LAYERS

    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=sorted(LAYERS))
    _sweep(p)
    p = sub.add_parser("vision", help="images/s: training step (HaloNet-H0, ViT-S), inference quantized vs not")
    p.add_argument("--train-models", nargs="*", default=None, help="default: halonet-h0 vit-s16 (GPU), tiny (CPU)")
    p.add_argument("--infer-models", nargs="*", default=None, help="default: vit-b16 (GPU), vit-tiny (CPU); a timm hub folder runs its pretrained weights")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--compile-only", action="store_true", help="compile the GPU models' steps for a "
                                                               "compile-only H100 instead of timing them")
    p = sub.add_parser("tnl", help="TNL training tokens/s (one jitted AdamW step)")
    p.add_argument("--model", default=None, help="default: tnl-385m on GPU, tnl-tiny on CPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--compile-only", action="store_true", help="compile the GPU step for a compile-only H100 "
                                                               "instead of timing it (no GPU needed)")
    p.add_argument("--remat", choices=["no", "yes", "both"], default="no",
                   help="activation checkpointing per block (yes), or the step both ways")
    p = sub.add_parser("compile", help="compile every kernel for an NVIDIA GPU without one (XLA's compiler "
                                       "with jaxlib's CUDA plugin, or the triton package): registers, spills")
    from jaxattn.bench.compile import FAMILIES  # imports only jax; the kernels load lazily

    p.add_argument("--families", nargs="+", default=None, choices=sorted(FAMILIES), help="default: all")
    p.add_argument("--compiler", choices=["auto", "xla", "triton"], default="auto",
                   help="xla: XLA's own GPU compiler for a compile-only H100 (Triton and Mosaic GPU kernels; "
                        "needs pip install -e '.[aot]'); triton: the triton package on the Triton IR (any "
                        "--arch; no Mosaic kernels); auto: xla when the CUDA plugin is installed")
    p.add_argument("--arch", type=int, default=90, help="compute capability for --compiler triton: 90, 89, 80")
    p.add_argument("--python", default=None, help="an interpreter that has triton (default: this one)")
    p.add_argument("--json", metavar="PATH")
    p = sub.add_parser("traffic", help="what XLA runs around each op's kernels, compiled for a compile-only "
                                       "H100: XLA ops and the bytes they write, beside the kernels'")
    from jaxattn.bench.traffic import OPS as TRAFFIC_OPS

    p.add_argument("--ops", nargs="+", default=None, choices=TRAFFIC_OPS, help="default: all")
    p.add_argument("--lm-step", metavar="MODEL", default=None,
                   help="instead: one training step of this language model (e.g. tnl-385m), grouped by JAX operation")
    p.add_argument("--image-step", metavar="MODEL", default=None,
                   help="instead: one training step of this image classifier (e.g. halonet-h0)")
    p.add_argument("--batch", type=int, default=None, help="--lm-step / --image-step batch (default 8 / 64)")
    p.add_argument("--seq", type=int, default=2048, help="--lm-step sequence length (default 2048)")
    p.add_argument("--image-size", type=int, default=None, help="--image-step image size (default: the model's)")
    p.add_argument("--json", metavar="PATH")
    p = sub.add_parser("tune", help="time candidate tile configs of one kernel at a target shape (GPU); "
                                    "prints the fastest as a table line")
    from jaxattn.bench.tune import FAMILIES as TUNE_FAMILIES  # imports only jax; kernels load lazily

    p.add_argument("family", choices=sorted(TUNE_FAMILIES))
    p.add_argument("--seq", type=int, default=None,
                   help="default: the family's target (8192; lightning 65536; halo: image side 64)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="default: 16384 tokens (lightning 65536) / seq")
    p.add_argument("--heads", type=int, default=None, help="default: 2048 / head dim")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop and report the best so far")
    p.add_argument("--smoke", action="store_true", help="tiny case, two candidates a stage (default without a GPU)")
    p.add_argument("--json", metavar="PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.op in ("compile", "traffic") or getattr(args, "compile_only", False):
        from jaxattn.bench import aot

        aot.available()  # before JAX starts its backends: on a machine without a GPU, stay on the CPU client
    gpu = jax.default_backend() == "gpu"
    if args.op == "compile":
        return _compile(args)
    if args.op == "traffic":
        return _traffic(args)
    if args.op == "tune":
        return _tune(args, gpu)
    compile_only = getattr(args, "compile_only", False)
    if compile_only:
        from jaxattn.bench import aot

        if why := aot.available():
            print(why, file=sys.stderr)
            return 2
    if args.op == "tnl":
        return _tnl(args, gpu or compile_only)
    if args.op == "vision":
        return _vision(args, gpu or compile_only)
    smoke = args.smoke or not (gpu or compile_only)
    if args.op == "attention":
        from jaxattn.bench import attention as mod

        causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, causals, args.dtypes, args.modes,  # noqa: E731
                                     args.tokens, args.model_dim)
    elif args.op == "sage":
        from jaxattn.bench import sage as mod

        causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, causals, args.dtypes,  # noqa: E731
                                     args.tokens, args.model_dim)
    elif args.op == "decode":
        from jaxattn.bench import decode as mod

        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, args.dtypes, args.tokens,  # noqa: E731
                                     args.heads, args.kv_heads)
    elif args.op == "delta":
        from jaxattn.bench import delta as mod

        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, args.dtypes, args.modes,  # noqa: E731
                                     args.tokens, args.model_dim, args.decays)
    elif args.op == "mla":
        from jaxattn.bench import mla as mod

        full = lambda: mod.gpu_cases(args.seqs, args.dtypes, args.tokens, args.heads)  # noqa: E731
    elif args.op == "sparse":
        from jaxattn.bench import sparse as mod

        full = lambda: mod.gpu_cases(args.seqs, args.patterns, args.head_dim, args.heads, args.batch,  # noqa: E731
                                     args.dtypes, args.modes, args.block, args.power_window, args.sw_window)
    elif args.op == "l2vit":
        from jaxattn.bench import l2vit as mod

        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, args.dtypes, args.modes,  # noqa: E731
                                     args.tokens, args.model_dim)
        if args.cpu and not gpu:
            full, smoke = (lambda: mod.cpu_cases(modes=args.modes)), args.smoke  # noqa: E731
    elif args.op == "landmark":
        from jaxattn.bench import landmark as mod

        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, args.dtypes, args.modes,  # noqa: E731
                                     args.tokens, args.model_dim, args.block_lens)
    elif args.op == "moe":
        from jaxattn.bench import moe as mod

        full = lambda: mod.gpu_cases(args.tokens, args.layers, args.dtypes, args.modes)  # noqa: E731
    elif args.op == "halo":
        from jaxattn.bench import halo as mod

        full = lambda: mod.gpu_cases(args.batch, args.dtypes, args.modes)  # noqa: E731
    else:
        from jaxattn.bench import lightning as mod

        full = lambda: mod.gpu_cases(args.seqs, args.head_dims, args.dtypes, args.modes,  # noqa: E731
                                     args.tokens, args.model_dim)
    if smoke and not compile_only:
        print("smoke sweep" + ("" if gpu else " (no GPU: kernels in interpret mode)"), file=sys.stderr)
        cases, warmup, runs = mod.smoke_cases(), 1, 3
    else:
        cases, warmup, runs = full(), args.warmup, args.runs
    cases = list(cases)
    info = device_summary()

    def save(records: list[dict], **extra) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"op": args.op, "info": info, "records": records, **extra}, f, indent=1)

    if compile_only:  # the GPU sweep (or the GPU smoke cases), compiled instead of timed
        info["device"] = COMPILE_ONLY_DEVICE + info["device"]
        records = mod.run(cases, warmup=warmup, runs=runs, interpret=False, progress=not args.no_progress,
                          on_case=save, compile_only=True)
    else:
        records = mod.run(cases, warmup=warmup, runs=runs, interpret=not gpu, progress=not args.no_progress,
                          on_case=save)
    print(f"# {args.op} | {info['device']} | jax {info['jax']} | {info['date']}")
    print(format_table(records))
    if args.op in ("sparse", "decode", "mla"):
        print("\n" + mod.summary(records))
    extra = {}
    if args.op == "sage" and not args.no_accuracy and not compile_only:
        extra["accuracy"] = mod.accuracy(cases)
        print(f"\n# sage accuracy vs fp32 attention\n{mod.format_accuracy(extra['accuracy'])}")
    if args.json:
        save(records, **extra)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _vision(args: argparse.Namespace, gpu: bool) -> int:
    from jaxattn.bench import vision

    batch = args.batch or (64 if gpu else 2)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    steps = args.steps if gpu else min(args.steps, 2)
    impl = "auto" if gpu else "xla"
    train_models = args.train_models if args.train_models is not None else (
        ["halonet-h0", "vit-s16"] if gpu else ["halonet-tiny", "vit-tiny"])
    infer_models = args.infer_models if args.infer_models is not None else (["vit-b16"] if gpu else ["vit-tiny"])
    info = device_summary()
    recs: list[dict] = []
    failed = False
    kw = dict(batch=batch, dtype=dtype, steps=steps, attn_impl=impl, compile_only=args.compile_only)
    if args.compile_only:
        info["device"] = COMPILE_ONLY_DEVICE + info["device"]
    jobs = [(m, "train") for m in train_models] + [(m, "inference") for m in infer_models]
    for model, mode in jobs:  # one model's failure is a row, not the end of the sweep
        try:
            recs += ([vision.train_step_throughput(model, **kw)] if mode == "train"
                     else vision.inference_throughput(model, **kw))
        except Exception as e:  # noqa: BLE001
            failed = True
            recs.append(dict(model=model, mode=mode, batch=batch, dtype=dtype, error=runner._error(e)))
        if args.json:  # after every model, so a time box keeps what was measured
            with open(args.json, "w") as f:
                json.dump({"op": "vision", "info": info, "records": recs}, f, indent=1)
    print(f"# vision models | {info['device']} | jax {info['jax']} | {info['date']}")
    print("| model | mode | batch | dtype | image | ms | images/s | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recs:
        if "error" in r:
            print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | | failed: {r['error']} | | |")
            continue
        if "compile_s" in r:
            print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | {r['image_size']} | compiled in "
                  f"{r['compile_s']} s | | |")
            continue
        agree = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else ""
        print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | {r['image_size']} | {r['ms']:.2f} | "
              f"{r['images_per_s']:,.1f} | {agree} |")
    return 1 if failed else 0


def _traffic(args: argparse.Namespace) -> int:
    from jaxattn.bench import aot, traffic

    if why := aot.available():
        print(why, file=sys.stderr)
        return 2
    info = device_summary()
    head = f"compiled for a compile-only H100 | on {info['device']} | jax {info['jax']} | {info['date']}"
    if args.lm_step and args.image_step:
        print("traffic: give --lm-step or --image-step, not both", file=sys.stderr)
        return 2
    from jaxattn.models import MODEL_CONFIGS

    if (name := args.lm_step or args.image_step) and name not in MODEL_CONFIGS:
        print(f"traffic: unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}", file=sys.stderr)
        return 2
    if args.lm_step or args.image_step:
        if args.lm_step:
            batch = args.batch or 8
            ops = traffic.lm_step_ops(args.lm_step, batch=batch, seq=args.seq)
            what = f"{args.lm_step} training step, batch {batch} x {args.seq}"
        else:
            batch = args.batch or 64
            ops = traffic.image_step_ops(args.image_step, batch=batch, image_size=args.image_size)
            what = f"{args.image_step} training step, batch {batch}" + (
                f" at {args.image_size}px" if args.image_size else "")
        total = traffic.summarize(ops)
        records = traffic.by_source(ops)
        print(f"# {what}, {head}")
        print(f"kernels write {total['kernel_bytes'] / 2**30:.1f} GiB, XLA ops {total['xla_bytes'] / 2**30:.1f} GiB "
              f"({total['xla_ops']} ops); largest groups:")
        print(traffic.format_groups(records))
    else:
        records = traffic.run(args.ops)
        print(f"# XLA ops around the kernels, {head}")
        print(traffic.format_records(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": "traffic", "info": info, "records": records}, f, indent=1)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from jaxattn.bench import aot
    from jaxattn.bench import compile as cc

    why_not_xla = aot.available()
    if args.compiler == "xla" and why_not_xla:
        print(why_not_xla, file=sys.stderr)
        return 2
    info = device_summary()
    if args.compiler == "xla" or (args.compiler == "auto" and not why_not_xla):
        records = aot.run(args.families)
        title, table, meta = "XLA compile for a compile-only H100 (sm_90a)", aot.format_records(records), {
            "compiler": "xla"}
    else:
        if not cc.triton_available(args.python):
            print("the triton package is not importable by " + (args.python or sys.executable)
                  + ": pip install triton (or pass --python PATH)", file=sys.stderr)
            return 2
        records = cc.run(args.families, capability=args.arch, python=args.python)
        title, table, meta = f"Triton compile for sm_{args.arch}", cc.format_records(records), {"arch": args.arch}
    print(f"# {title} | compiled on {info['device']} | jax {info['jax']} | {info['date']}")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": "compile", **meta, "info": info, "records": records}, f, indent=1)
    failed = [r for r in records if r["status"].startswith("FAIL")]
    print(f"\n{len(records)} kernels: {len(failed)} failed, "
          f"{sum(r['status'] == 'SPILLS' for r in records)} spill registers", file=sys.stderr)
    return 1 if failed else 0


def _tune(args: argparse.Namespace, gpu: bool) -> int:
    from jaxattn.bench import tune

    smoke = args.smoke or not gpu
    seq, tokens, width = tune.DEFAULT_SHAPES[args.family]
    if smoke:
        print("smoke tune" + ("" if gpu else " (no GPU: kernels in interpret mode)"), file=sys.stderr)
        shape = tune.SMOKE_SHAPES.get(args.family, {"batch": 1, "seq": 128, "heads": 1, "head_dim": 64})
    else:
        seq = args.seq or seq
        shape = {"batch": args.batch or max(1, tokens // seq), "seq": seq,
                 "heads": args.heads or max(1, width // args.head_dim), "head_dim": args.head_dim}
    res = tune.tune(args.family, **shape, dtype=args.dtype, causal=args.causal, budget_s=args.budget_s,
                    smoke=smoke, warmup=1 if smoke else 2, runs=2 if smoke else 10, progress=True)
    info = device_summary()
    print(f"# tune {args.family} {shape} {args.dtype} causal={args.causal} | {info['device']} | "
          f"jax {info['jax']} | {info['date']}")
    print(tune.format_result(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": "tune", "info": info, "shape": shape, "family": args.family,
                       "best": dataclasses.asdict(res["best"]), "extra": res["extra"],
                       "records": res["records"]}, f, indent=1)
    return 0 if any("ms" in r for r in res["records"]) else 1


def _tnl(args: argparse.Namespace, gpu: bool) -> int:
    from jaxattn.bench.tnl import train_step_throughput

    info = device_summary()
    if args.compile_only:
        info["device"] = COMPILE_ONLY_DEVICE + info["device"]
    print(f"# tnl training | {info['device']} | jax {info['jax']} | {info['date']}")
    records = []
    for remat in {"no": [False], "yes": [True], "both": [False, True]}[args.remat]:
        rec = train_step_throughput(
            args.model or ("tnl-385m" if gpu else "tnl-tiny"), batch=args.batch or (8 if gpu else 2),
            seq=args.seq or (2048 if gpu else 64), dtype=args.dtype or ("bfloat16" if gpu else "float32"),
            steps=args.steps if gpu else min(args.steps, 3), compile_only=args.compile_only, remat=remat)
        what = (f"compiled in {rec['compile_s']} s" if args.compile_only else
                f"{rec['ms']:.1f} ms/step, {rec['tokens_per_s']:,.0f} tokens/s")
        mem = "" if rec["temp_gib"] is None else f", {rec['temp_gib']:.2f} GiB scratch"
        print(f"{rec['model']} ({rec['params'] / 1e6:.1f}M params) batch {rec['batch']} x seq {rec['seq']} "
              f"{rec['dtype']}{' remat' if remat else ''}: {what}{mem}")
        records.append(rec)
        if args.json:  # after every record, as the other benches
            with open(args.json, "w") as f:
                json.dump({"op": "tnl", "info": info, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
