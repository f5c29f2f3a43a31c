"""Shared test helpers: tolerances by dtype, random inputs, poisoned kernel runs."""

from __future__ import annotations

import os

# pytest-xdist runs two workers: on a GPU they must not each grab 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Mosaic GPU's interpreter runs a kernel's warpgroups as concurrent CPU executions: XLA's CPU
# client pool (NPROC threads, default the CPU count) must hold 4, or a 2-core machine can hang.
if int(os.environ.get("NPROC", "0") or 0) < 8:
    os.environ["NPROC"] = "8"


def _has_gpu() -> bool:
    """The machine has a GPU (a driver tool or device node): then leave JAX and XLA alone."""
    import glob
    import shutil

    return bool(shutil.which("nvidia-smi") or shutil.which("rocm-smi") or glob.glob("/dev/nvidia[0-9]*")
                or os.path.exists("/dev/kfd"))


if not _has_gpu():
    # jaxlib's CUDA plugin (the aot extra: compiling for a GPU without one) must not try to start a
    # GPU client, which fails noisily without a driver; the compile-only GPU target works regardless.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # On a CPU the suite is dominated by XLA compile time (small shapes, many programs): LLVM's -O0
    # halves it. Set before JAX starts; subprocesses (CLI tests) inherit it. Not on GPU machines.
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# slow where the kernels run in interpret mode (the default suite's time budget), run where they compile: on a GPU
# the default suite (.ci/gpu's tests part) keeps these real-compiler checks
SLOW_OFF_GPU = [] if _has_gpu() else [pytest.mark.slow]

jax.config.update("jax_default_matmul_precision", "highest")

# (atol, rtol) relative to the largest magnitude of the expected value.
TOL = {
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.float16): (4e-3, 4e-3),
    jnp.dtype(jnp.bfloat16): (2.5e-2, 2.5e-2),
}
GRAD_TOL = {
    jnp.dtype(jnp.float32): (5e-5, 5e-5),
    jnp.dtype(jnp.float16): (1e-2, 1e-2),
    jnp.dtype(jnp.bfloat16): (6e-2, 6e-2),
}


def assert_close(actual, expected, dtype, what: str = "", tol=None) -> None:
    """Max-abs check scaled by the expected tensor's magnitude; NaN never passes."""
    atol, rtol = (tol or TOL)[jnp.dtype(dtype)]
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert not np.isnan(a).any(), f"{what}: NaN in result (unwritten or invalid elements)"
    finite = np.isfinite(e)
    assert (a[~finite] == e[~finite]).all(), f"{what}: infinities differ"
    scale = max(1.0, float(np.abs(e[finite]).max(initial=0.0)))
    worst = float(np.abs(a[finite] - e[finite]).max(initial=0.0))
    assert worst <= (atol + rtol) * scale, f"{what}: max error {worst:.3g} > {(atol + rtol) * scale:.3g}"


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    """A converter's ``state_dict`` written back: the same keys, each array equal."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_attention_case(seed: int, draw: int | None = None, max_q: int = 90, max_k: int = 110) -> dict:
    """A random attention problem: batch 2, ragged ``sq`` (and ``sk``, half the time different), GQA or
    not, head dim 32 or 64 (drawn from ``draw``, default ``seed``); causal and dtype cycle with ``seed``."""
    r = np.random.default_rng(seed if draw is None else draw)
    hkv = int(r.choice([1, 2]))
    sq = int(r.integers(1, max_q))
    return dict(b=2, sq=sq, sk=sq if r.random() < 0.5 else int(r.integers(1, max_k)), hkv=hkv,
                hq=hkv * int(r.choice([1, 3])), d=int(r.choice([32, 64])), causal=bool(seed % 2),
                dtype=[jnp.float32, jnp.bfloat16, jnp.float16][seed % 3])


def attention_inputs(key, c: dict) -> tuple:
    """``q, k, v`` of a :func:`random_attention_case` in its dtype and an fp32 output cotangent ``do``, from
    the first four of five splits of ``key`` (the fifth is the caller's)."""
    ks = jax.random.split(key, 5)
    q = randn(ks[0], (c["b"], c["sq"], c["hq"], c["d"]), c["dtype"])
    k = randn(ks[1], (c["b"], c["sk"], c["hkv"], c["d"]), c["dtype"])
    v = randn(ks[2], (c["b"], c["sk"], c["hkv"], c["d"]), c["dtype"])
    return q, k, v, randn(ks[3], q.shape, jnp.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


from jaxattn.bench.compile import TRITON_CALL  # noqa: E402


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `jax.jit(fn)` traced on `args` and lowered for CUDA (works without a GPU)."""
    from jaxattn.bench.compile import lower_for_cuda as lower

    return lower(fn, *args).as_text()


def count_triton_calls(text: str) -> int:
    return text.count(TRITON_CALL)


_DEVICES_PRELUDE = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count={n}"
import jax
import numpy as np
assert len(jax.devices()) == {n}, jax.devices()


def check(a, b, tol, what):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))
    assert err < tol, f"{{what}}: relative error {{err:.3g}} >= {{tol}}"
"""


def run_on_cpu_devices(script: str, n: int = 4, timeout: int = 600) -> str:
    """Runs ``script`` in a fresh Python with ``n`` forced CPU devices (the device count is fixed
    when JAX starts, so it cannot be changed in this process) and returns its stdout. The script
    starts with ``jax``, ``np`` and ``check(actual, expected, tol, what)`` (max error relative to
    the expected magnitude) defined; a non-zero exit fails the calling test with the output."""
    import subprocess
    import sys
    import textwrap

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    code = _DEVICES_PRELUDE.format(n=n) + textwrap.dedent(script)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def check_timm_folder_matches_timm(folder, arch: str, size: int, noisy: tuple[str, ...], **kwargs) -> None:
    """timm's ``arch`` (built with ``kwargs``; parameters ending in ``noisy`` redrawn N(0, 1) so that each one
    counts) saved as a hub folder by timm's ``save_for_hf``: our loader gives timm's logits (skipped without
    torch and timm)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    from jaxattn.models import hf

    torch.manual_seed(0)
    ref = timm.create_model(arch, num_classes=7, **kwargs).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith(noisy):
                param.normal_()
    save_for_hf(ref, folder, safe_serialization=True)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.as_tensor(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(hf.load_pretrained(folder, attn_impl="xla")(jnp.asarray(x)))
    assert_close(got, want, jnp.float32, f"{arch} logits vs timm", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


def check_timm_export(model, folder, size: int) -> None:
    """``hf.save_pretrained(model)``: our loader gives the model's logits exactly; with torch and timm installed,
    ``timm.create_model(architecture, **model_args)`` with the folder's weights gives them too."""
    import json

    from jaxattn.models import hf

    model.eval()
    hf.save_pretrained(model, folder)
    x = np.random.default_rng(1).normal(size=(2, size, size, model.cfg.in_channels)).astype(np.float32)
    want = np.asarray(model(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(hf.load_pretrained(folder, attn_impl="xla")(jnp.asarray(x))), want)
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from jaxattn.models.safetensors_io import read_state_dict

    raw = json.loads((folder / "config.json").read_text())
    ref = timm.create_model(raw["architecture"], **raw["model_args"]).eval()
    ref.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in read_state_dict(folder).items()})
    with torch.no_grad():
        got = ref(torch.as_tensor(x).permute(0, 3, 1, 2)).numpy()
    assert_close(got, want, jnp.float32, "logits vs timm", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


def layer_norm_np(x, w, b, eps=1e-6):
    """LayerNorm over the last axis in numpy (the timm oracles' float64 forwards)."""
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def write_timm_folder(folder, raw: dict, sd: dict):
    """A timm hub folder: ``config.json`` ``raw`` and ``model.safetensors`` of the state dict ``sd`` (with a
    BatchNorm ``num_batches_tracked`` for a HaloNet's, as timm saves it, which the loader must ignore)."""
    import json

    from jaxattn.models.safetensors_io import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    write_safetensors(folder / "model.safetensors", {**sd, "norm.num_batches_tracked": np.zeros((), np.int64)}
                      if "stem.conv1.bn.weight" in sd else sd)
    return folder


def lm_grads(name: str, **overrides):
    """``(loss, grads)`` of the LM loss of registry model ``name`` (``overrides``: config fields; XLA attention) on a
    random byte batch: for checking that training reaches a layer's parameters."""
    from flax import nnx

    from jaxattn.models import create_model
    from jaxattn.train.lm import lm_loss

    model = create_model(name, rngs=nnx.Rngs(0), attn_impl="xla", **overrides)
    batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)

    def loss(m):
        out = lm_loss(m, batch)
        return out[0] if isinstance(out, tuple) else out  # (mixtures of experts: with the balance loss)

    return nnx.jit(nnx.value_and_grad(loss))(model)


def check_causal_lm_matches_transformers(folder, ref, tokens, tol: float = 3e-4, greedy_by_forward: bool = False) -> None:
    """transformers' causal LM ``ref`` with its parameters redrawn (matrices N(0, 0.3), vectors N(0, 0.1), norm
    weights around 1) and saved to ``folder``: our loader gives its logits on ``tokens`` and its greedy tokens
    (``greedy_by_forward``: the argmax of its full forward token after token, where its cached ``generate``
    disagrees with its own forward)."""
    import torch

    from jaxattn.models import generate
    from jaxattn.models.hf import load_pretrained

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, buf in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):  # (DeepSeek-V3's selection bias)
                buf.copy_(torch.randn_like(buf) * 0.5)
    ref.eval().save_pretrained(folder)
    tokens = np.asarray(tokens)
    with torch.no_grad():
        want = ref(torch.as_tensor(tokens)).logits.numpy()
        if greedy_by_forward:
            greedy = torch.as_tensor(tokens[:1, :5])
            for _ in range(6):
                nxt = ref(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                greedy = torch.cat([greedy, nxt], dim=1)
            greedy = greedy.numpy()
        else:
            greedy = ref.generate(torch.as_tensor(tokens[:1, :5]), max_new_tokens=6, do_sample=False).numpy()
    ours = load_pretrained(folder, attn_impl="xla")
    assert_close(ours(jnp.asarray(tokens)), want, jnp.float32, "logits vs transformers",
                 tol={jnp.dtype(jnp.float32): (tol, tol)})
    np.testing.assert_array_equal(np.asarray(generate(ours, jnp.asarray(tokens[:1, :5]), max_new_tokens=6,
                                                      temperature=0.0)), greedy)


def hf_folder(path, raw, state_dict):
    """A Hugging Face folder at ``path``: ``config.json`` from ``raw``, ``model.safetensors`` from ``state_dict``."""
    import json

    from jaxattn.models.safetensors_io import write_safetensors

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    write_safetensors(path / "model.safetensors", state_dict)
    return path
