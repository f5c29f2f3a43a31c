"""Compile the kernels for an NVIDIA H100 with XLA's own GPU compiler, on a machine without a GPU.

``python -m jaxattn.bench compile --compiler xla [--families flash mosaic ...] [--json PATH]``

jaxlib's CUDA plugin (``pip install -e '.[aot]'``, i.e. ``jax[cuda13-local]``; no CUDA toolkit,
driver or GPU needed) builds a compile-only device from a target description (XLA's
``GpuTargetConfig``: an H100 SXM, sm_90a) and compiles jitted functions for it exactly as on the
GPU: Pallas's Triton kernels through XLA's own copy of Triton, and Mosaic GPU kernels
(``impl="mosaic"``) through Mosaic's LLVM pipeline and the ptxas linked into the plugin. That goes
further than :mod:`jaxattn.bench.compile` (the ``triton`` release on Triton IR taken out of the
lowering, which cannot compile Mosaic GPU kernels at all): a kernel that XLA or ptxas rejects
fails here, and each kernel reports its registers per thread and spill bytes (Mosaic's own ptxas
report; for Triton kernels, ``ptxas -v`` on the PTX that XLA emitted, with the ``triton``
package's bundled ptxas) and, for Mosaic kernels, its shared memory.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

# XLA's description of an H100 SXM (xla/backends/gpu/target_config/specs), trimmed to what
# compilation reads. An H200 is the same chip (sm_90a, 132 SMs) with more memory.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
SMEM_PER_BLOCK = 232448  # bytes one program may use on sm_90 (opt-in)
REGISTERS_PER_BLOCK = 65536

__all__ = ["available", "compile_only_sharding", "on_compile_only_gpu", "lower_and_compile", "compile_case", "run",
           "check", "parse_ptxas", "format_records"]


def _no_gpu_here() -> bool:
    return not (glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"))


def available() -> str | None:
    """None when this jax can compile for a GPU without one, else why not.

    On a machine without a GPU, call it before anything starts JAX's backends: it keeps JAX on
    its CPU client (``JAX_PLATFORMS=cpu``), as the CUDA plugin cannot start a GPU client there
    (and without cuDNN installed would refuse to load at all)."""
    try:
        from jax._src import xla_bridge as xb

        if _no_gpu_here() and not os.environ.get("JAX_PLATFORMS") and not xb.backends_are_initialized():
            jax.config.update("jax_platforms", "cpu")
        xb._discover_and_register_pjrt_plugins()
        if "cuda" not in xb._topology_factories:
            return ("jaxlib's CUDA plugin is not installed (or failed to load: run with JAX_PLATFORMS=cpu on a "
                    "machine without a GPU): pip install -e '.[aot]' (jax[cuda13-local])")
    except Exception as e:  # noqa: BLE001 - a jax without these internals
        return f"this jax cannot build compile-only GPU topologies ({type(e).__name__}: {e})"
    return None


@functools.cache
def compile_only_sharding() -> jax.sharding.NamedSharding:
    """A sharding on one compile-only H100 (nothing can run on it; ``.compile()`` works)."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology="1x1x1")
    mesh = topologies.make_mesh(topo, (1,), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def on_compile_only_gpu(tree: Any) -> Any:
    """Arrays or shapes as ShapeDtypeStructs placed on the compile-only H100."""
    sharding = compile_only_sharding()
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def lower_and_compile(fn: Callable, args: Sequence[Any], compiler_options: dict | None = None) -> Any:
    """``fn`` (jitted or not) traced on ``args`` (:func:`on_compile_only_gpu` shapes), lowered and
    compiled for the compile-only H100, with the GPU kernels (not their interpret-mode form) and
    the H100 as default device (for code that looks at it); returns the lowering and the compiled
    executable (its ``as_text()`` is XLA's optimized HLO)."""
    from jaxattn.pallas import _common

    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    with _common.compile_for_gpu(), jax.default_device(next(iter(compile_only_sharding().device_set))):
        lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
        return lowered, lowered.compile(compiler_options=compiler_options)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_FUNCTION = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")


def parse_ptxas(text: str) -> dict[str, dict]:
    """``ptxas -v`` output -> {entry: {registers, spill_stores, spill_loads, stack}}."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
    return out


def _ptxas_candidates() -> list[str]:
    """ptxas binaries for the Triton kernels' register report: the ``triton`` package's bundled ones
    (``ptxas-blackwell`` is the newer toolkit, which reads the PTX version XLA emits), then PATH's."""
    found = []
    try:
        import triton.backends.nvidia as nv

        for name in ("ptxas-blackwell", "ptxas"):
            path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
            if os.access(path, os.X_OK):
                found.append(path)
    except Exception:  # noqa: BLE001 - no triton package
        pass
    if shutil.which("ptxas"):
        found.append(shutil.which("ptxas"))
    return found


def _ptxas_report(path: str, target: str) -> dict[str, dict]:
    for ptxas in _ptxas_candidates():
        run = subprocess.run([ptxas, "-v", f"--gpu-name={target}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
        if run.returncode == 0:
            return parse_ptxas(run.stdout + run.stderr)
    return {}


def _mosaic_kernels(dump: str) -> list[dict]:
    recs = []
    for path in sorted(glob.glob(os.path.join(dump, "*.ptxas"))):
        base = path[: -len(".ptxas")]
        with open(path) as f:
            info = parse_ptxas(f.read())
        smem = None
        log = base + ".mlir-passes.log"
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                sizes = [int(s) for s in re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", f.read())]
            smem = max(sizes) if sizes else None
        wgmma = None
        if os.path.exists(base + ".ptx"):
            with open(base + ".ptx") as f:
                wgmma = "wgmma.mma_async" in f.read()
        for name, r in info.items():
            recs.append({"kernel": name, "backend": "mosaic", "shared": smem, "wgmma": wgmma, **r})
    return recs


def _triton_kernels(dump: str, names: set[str]) -> list[dict]:
    """The Pallas Triton kernels in the PTX that XLA emitted, with ``ptxas -v``'s report."""
    recs = []
    for path in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
        with open(path) as f:
            ptx = f.read()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+([\w$]+)\(", ptx)]
        bodies = {name: ptx[a:b] for (a, name), (b, _) in zip(starts, starts[1:] + [(len(ptx), "")])}
        entries = sorted(set(bodies) & names)
        if not entries:
            continue
        target = re.search(r"\.target\s+(sm_\w+)", ptx)
        info = _ptxas_report(path, target.group(1) if target else "sm_90a")
        for name in entries:
            recs.append({"kernel": name, "backend": "triton", "wgmma": "wgmma.mma_async" in bodies[name],
                         "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", bodies[name])),
                         "i2f": len(re.findall(r"\bcvt\.rn\.f32\.s32\b", bodies[name])),
                         "natural_exp": len(re.findall(r"\bfma\.rm\.f32\b", bodies[name])),
                         "loops": loop_stats(bodies[name]),
                         **info.get(name, {})})
    return recs


def loop_stats(ptx: str) -> list[dict]:
    """Per loop of one kernel's PTX (a block that a later branch jumps back to; an outer loop spans
    its inner ones): ``wait``, the ``N`` of its first ``cp.async.wait_group N`` (None without one),
    and its ``ex2`` (``ex2.approx``: exponents) and ``wgmma`` (``wgmma.mma_async``) counts."""
    lines = ptx.splitlines()
    heads = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$L__BB\w+):", line))}
    stats = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)
        if m and heads.get(m.group(1), i) < i:
            body = "\n".join(lines[heads[m.group(1)]:i])
            w = re.search(r"cp\.async\.wait_group\s+(\d+)", body)
            stats.append({"wait": int(w.group(1)) if w else None, "ex2": len(re.findall(r"\bex2\.approx", body)),
                          "wgmma": len(re.findall(r"\bwgmma\.mma_async", body))})
    return stats


def loop_waits(kernel: dict) -> list[int]:
    """The ``wait`` of each loop of a kernel record (its ``loops``, :func:`loop_stats`) that has one:
    how many groups of asynchronous copies Triton's software pipeline leaves in flight when an
    iteration starts (0: only copies issued in the previous iteration were overlapped with compute;
    the deeper the pipeline, the larger)."""
    return [lp["wait"] for lp in kernel.get("loops", []) if lp["wait"] is not None]


def _triton_names(lowered: Any) -> set[str]:
    """The kernel names of the Triton custom calls (their ``name`` attribute)."""
    return set(re.findall(r'\bname = "([\w$]+)"', lowered.as_text()))


_MOSAIC_SEEN: dict[str, dict] = {}  # kernel hash -> its record (Mosaic compiles each kernel once per process)


def _mosaic_hashes(lowered: Any) -> list[str]:
    """The Mosaic GPU custom calls' kernel hashes, in order, without repeats."""
    found = re.findall(r'kernel_hash = "((?:[^"\\]|\\.)*)"', lowered.as_text())
    return list(dict.fromkeys(found))


def compile_case(fn: Callable, args: Sequence[Any]) -> dict:
    """Compiles ``fn(*args)`` (``args``: ShapeDtypeStructs) for the compile-only H100.

    Returns ``{"ok", "seconds", "error"?, "kernels": [...]}``; each kernel: name, backend
    (``"mosaic"`` or ``"triton"``), registers, spill bytes, wgmma, shared bytes (Mosaic)."""
    args = on_compile_only_gpu(list(args))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxattn-aot-") as tmp:
        mosaic_dump, xla_dump = os.path.join(tmp, "mosaic"), os.path.join(tmp, "xla")
        os.makedirs(mosaic_dump)  # (Mosaic GPU dumps to stdout when the directory is missing)
        try:  # Mosaic GPU reads its dump options when it lowers a kernel and when it compiles one
            with _env(MOSAIC_GPU_DUMP_TO=mosaic_dump):
                # (the production LLVM level, whatever XLA_FLAGS says: the test suite lowers it for speed)
                lowered, _ = lower_and_compile(fn, args, {"xla_dump_to": xla_dump, "xla_backend_optimization_level": 3})
        except Exception as e:  # noqa: BLE001 - the failure is the result
            return {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                    "error": f"{type(e).__name__}: {e}"[:2000], "kernels": []}
        # Mosaic GPU caches compiled kernels by hash for the process: one compiled by an earlier
        # case dumps nothing now, so its record is the one kept from then
        hashes = _mosaic_hashes(lowered)
        fresh = [h for h in hashes if h not in _MOSAIC_SEEN]
        dumped = _mosaic_kernels(mosaic_dump)
        if len(dumped) == len(fresh):
            _MOSAIC_SEEN.update(zip(fresh, dumped))
            mosaic = [_MOSAIC_SEEN[h] for h in hashes]
        else:  # (cannot tell which dump is which kernel: report what was dumped)
            mosaic = dumped
        kernels = [dict(k) for k in mosaic] + _triton_kernels(xla_dump, _triton_names(lowered))
    variants = _triton_variants(lowered)
    for k in kernels:
        if k["backend"] == "triton" and k["kernel"] in variants:
            k["variant"] = variants[k["kernel"]]
    return {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "kernels": kernels}


def _triton_variants(lowered: Any) -> dict[str, str]:
    """Kernel name -> a digest of its Triton IR and launch parameters (all of that name's, in this computation),
    where this jax embeds the IR in the lowering (jax < 0.11); empty otherwise. Two cases' kernels of one name
    are the same program when their digests agree."""
    from jaxattn.bench import compile as cc

    try:
        found = cc.triton_kernels(lowered)
    except RuntimeError:  # (a jax that compiles Triton during lowering)
        return {}
    texts: dict[str, list[str]] = {}
    for tk in found:
        texts.setdefault(tk.name, []).append(f"{tk.num_warps} {tk.num_stages} {tk.grid}\n{tk.ttir}")
    return {name: hashlib.sha256("\n".join(sorted(t)).encode()).hexdigest()[:16] for name, t in texts.items()}


def check(kernel: dict) -> str:
    """``"OK"``, ``"SPILLS"`` (registers spill to local memory: slow) or ``"FAIL: why"``."""
    smem = kernel.get("shared")
    if smem is not None and smem > SMEM_PER_BLOCK:
        return f"FAIL: needs {smem} B of shared memory > {SMEM_PER_BLOCK} B per program"
    if kernel.get("spill_stores") or kernel.get("spill_loads"):
        return "SPILLS"
    return "OK"


def run(families: Sequence[str] | None = None, *, progress: bool = True) -> list[dict]:
    """Compiles every case of the named families (default: all of :data:`compile.FAMILIES`);
    one record per kernel, or per case that failed to compile."""
    import sys

    from jaxattn.bench import compile as cc

    why = available()
    if why:
        raise RuntimeError(why)
    records: list[dict] = []
    seen: set[tuple] = set()
    for fam, label, fn, args in cc.family_cases(families):
        if progress:
            print(f"compiling {fam}: {label}", file=sys.stderr, flush=True)
        with jax.default_matmul_precision("default"):  # as users run the kernels
            res = compile_case(fn, args)
        if not res["ok"]:
            records.append({"family": fam, "case": label, "kernel": "", "seconds": res["seconds"],
                            "status": "FAIL: " + res["error"].splitlines()[0][:200], "error": res["error"]})
            continue
        for k in res["kernels"]:
            # the same program an earlier case compiled (by its IR where known; else by name and register use)
            key = (k["kernel"], k.get("variant") or (k.get("registers"), k.get("spill_stores"), k.get("spill_loads")))
            if k["backend"] == "triton" and key in seen:  # a Triton kernel an earlier case compiled the same
                continue
            seen.add(key)
            records.append({"family": fam, "case": label, "seconds": res["seconds"], **k, "status": check(k)})
    return records


def format_records(records: Sequence[dict]) -> str:
    """A markdown table, one row per kernel ("copies in flight": per loop of a Triton kernel, the copy
    groups its software pipeline leaves in flight, :func:`loop_waits`)."""
    rows = ["| family | case | kernel | backend | regs | spill B | smem KiB | wgmma | copies in flight | compile s "
            "| status |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        smem = r.get("shared")
        cells = [r["family"], r["case"], r.get("kernel", ""), r.get("backend", ""), r.get("registers", ""),
                 (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) if "registers" in r else "",
                 f"{smem / 1024:.1f}" if smem else "", {True: "yes", False: "no"}.get(r.get("wgmma"), ""),
                 " ".join(map(str, loop_waits(r))), r.get("seconds", ""), r["status"]]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)
