"""Compiles Triton IR files for an NVIDIA target with the ``triton`` package; no GPU needed.

Run as a script (``python _triton_worker.py MANIFEST.json``), not as a module: it imports neither
jax nor jaxattn, so any Python with ``triton`` installed can run it. The manifest is a JSON list of
``{"path", "num_warps", "num_stages"}``; the answer, on stdout, is one JSON object per kernel with
``ok``, ``error``, ``shared`` (bytes), ``registers``, ``spill_stores`` / ``spill_loads`` (bytes),
``wgmma`` (Hopper warpgroup MMA in the PTX), ``mma`` (any tensor-core MMA), ``mma_types`` (the
distinct MMA instructions by operand type, e.g. ``wgmma.bf16``, ``wgmma.e4m3``, ``mma.f16``),
``approx_div`` (an fp32 division that is not IEEE-rounded: Triton's ``/``), ``fma_f32`` (fused
multiply-adds; contraction changes rounding) and ``seconds``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings


def mma_types(ptx: str) -> list[str]:
    """``wgmma.<A operand type>`` / ``mma.<A operand type>`` for every MMA instruction in the PTX."""
    found = set()
    for m in re.finditer(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?\.(?:f32|f16|s32)\.(\w+?)\.", ptx):
        found.add(("wgmma." if m.group(1).startswith("wgmma") else "mma.") + m.group(2))
    return sorted(found)


def _ptxas_report(ptxas: str, ptx_path: str, arch: str) -> dict:
    """Registers and spills as ``ptxas -v`` prints them (the cubin triton built holds the same)."""
    run = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx_path, "-o", os.devnull],
                         capture_output=True, text=True, check=False)
    log = run.stdout + run.stderr
    out: dict = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["registers"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    return out


def _run_ttir_passes(path: str, target, options: dict) -> str:
    """Writes ``path`` through Triton's own TTIR passes (``make_ttir``: canonicalize, combine,
    CSE, ...) to a new file and returns its path. ``triton.compile`` skips the passes of the
    stage its IR file is already in, but XLA runs them on Pallas's IR (its ``MakeTTIR``), and
    they matter: the combine pass folds ``acc + dot(a, b)`` into the dot's accumulator."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import IRSource, make_backend

    backend = make_backend(target)
    context = ir.context()
    src = IRSource(path, context, backend)
    opts = backend.parse_options(dict(options))
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, opts, src.language)
    module = stages["ttir"](module, {})
    out = path[: -len(".ttir")] + ".passes.ttir"
    with open(out, "w") as f:
        f.write(str(module))
    return out


def main(manifest_path: str, capability: int) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # a cache that is always writable (triton's default lives under $HOME)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxattn-triton-cache"))
    warnings.simplefilter("ignore")
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(capability).path
    except Exception:  # older triton: the bundled binary
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    target = GPUTarget("cuda", capability, 32)
    with open(manifest_path) as f:
        manifest = json.load(f)
    for item in manifest:
        rec = {"path": item["path"], "ok": False}
        t0 = time.perf_counter()
        options = {"num_warps": item["num_warps"], "num_stages": item["num_stages"]}
        try:
            path = item["path"]
            try:
                path = _run_ttir_passes(path, target, options)
                rec["ttir_passes"] = True
            except Exception:  # another triton's internals: compile the IR as Pallas wrote it
                rec["ttir_passes"] = False
            kernel = triton.compile(path, target=target, options=options)
            ptx = kernel.asm["ptx"]
            rec.update(ok=True, shared=int(kernel.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                       mma="wgmma.mma_async" in ptx or "mma.sync" in ptx, mma_types=mma_types(ptx),
                       approx_div=bool(re.search(r"\bdiv\.(?:full|approx)\.f32", ptx)),
                       fma_f32=len(re.findall(r"\bfma\.rn\.f32", ptx)))
            ptx_path = item["path"] + ".ptx"
            with open(ptx_path, "w") as f:
                f.write(ptx)
            rec.update(_ptxas_report(ptxas, ptx_path, arch))
        except Exception as e:  # a compile error is a result, not a crash of the worker
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90))
