"""The benchmark harness runs its CPU smoke sweep and writes a table and JSON."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.bench import attention as attention_bench
from jaxattn.bench.__main__ import format_table, main


def test_flops_formula():
    c = attention_bench.Case(2, 1024, 8, 128, False, "bfloat16", "fwd")
    assert c.flops == 4 * 2 * 8 * 1024 * 1024 * 128
    causal_bwd = attention_bench.Case(2, 1024, 8, 128, True, "bfloat16", "fwd+bwd")
    assert causal_bwd.flops == c.flops / 2 * 3.5


def test_gpu_sweep_fills_tokens_and_model_dim():
    cases = list(attention_bench.gpu_cases([1024, 32768], [64, 128], [True], ["bfloat16"], ["fwd"]))
    assert {(c.batch * c.seq, c.heads * c.head_dim) for c in cases} == {(16384, 2048), (32768, 2048)}


@pytest.mark.parametrize("op,peer,n_cases", [("attention", "| xla", 4), pytest.param("lightning", "| scan", 2,
                                                                                     marks=pytest.mark.slow),
                                             ("sparse", "| flash-full", 2), ("moe", "| dense", 3),
                                             ("mla", "| xla", 1), ("delta", "| xla-chunked", 5),
                                             *(pytest.param(*c, marks=pytest.mark.slow) for c in [
                                                 ("halo", "| xla-unfold", 2), ("l2vit", "| quadratic", 2),
                                                 ("landmark", "| flash-causal", 2)])])
def test_smoke_sweep_cli(tmp_path, capsys, op, peer, n_cases):
    path = tmp_path / "bench.json"
    assert main([op, "--smoke", "--json", str(path), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| jaxattn" in table and peer in table and "TFLOP/s" in table
    data = json.loads(path.read_text())
    assert data["info"]["jax"] == jax.__version__ and data["op"] == op
    ours = [r for r in data["records"] if r["impl"] == "jaxattn"]
    assert len(ours) == n_cases and all(r["ms"] > 0 and r["tflops"] > 0 for r in ours)
    assert {r["mode"] for r in ours} == ({"fwd"} if op == "mla" else {"fwd", "fwd+bwd"})  # (mla: decoding)
    assert all(r.get("ms") for r in data["records"]), [r for r in data["records"] if not r.get("ms")]


def test_table_reports_failures_with_reason():
    recs = [dict(seq=8, batch=1, impl="jaxattn", ms=2.0, tflops=1.0),
            dict(seq=8, batch=1, impl="peer", ms=None, tflops=None, error="ValueError: nope")]
    table = format_table(recs)
    assert "ValueError: nope" in table and "1.00x" in table


@pytest.mark.slow  # whole-model compile; the models' own tests cover correctness
def test_tnl_training_throughput_cli(tmp_path, capsys):
    path = tmp_path / "tnl.json"
    assert main(["tnl", "--model", "tnl-tiny", "--batch", "2", "--seq", "32", "--dtype", "float32",
                 "--steps", "2", "--json", str(path)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    rec = json.loads(path.read_text())["records"][0]
    assert rec["tokens_per_s"] > 0 and rec["params"] > 0 and rec["loss"] == rec["loss"]


@pytest.mark.slow  # whole-model compile; the models' own tests cover correctness
def test_vision_inference_quantized_cli(tmp_path, capsys):
    path = tmp_path / "vision.json"
    assert main(["vision", "--train-models", "--infer-models", "vit-tiny", "--json", str(path)]) == 0
    assert "images/s" in capsys.readouterr().out
    recs = json.loads(path.read_text())["records"]
    assert [r["mode"] for r in recs] == ["infer", "infer-quantized"]
    assert all(r["images_per_s"] > 0 for r in recs) and 0.0 <= recs[1]["top1_agreement"] <= 1.0


def test_vision_sweep_survives_a_failing_model(tmp_path, capsys, monkeypatch):
    # the first H200 run lost every vision number to one model that failed to differentiate
    from jaxattn.bench import vision

    def train(model, **kw):
        if model == "bad":
            raise ValueError("Linearization failed")
        return dict(model=model, mode="train", batch=2, dtype="float32", image_size=8, ms=1.0, images_per_s=2e3)

    monkeypatch.setattr(vision, "train_step_throughput", train)
    monkeypatch.setattr(vision, "inference_throughput", lambda model, **kw: [
        dict(model=model, mode="infer", batch=2, dtype="float32", image_size=8, ms=1.0, images_per_s=2e3)])
    path = tmp_path / "vision.json"
    assert main(["vision", "--train-models", "bad", "good", "--infer-models", "vit", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "failed: ValueError: Linearization failed" in out and "| good | train |" in out
    recs = json.loads(path.read_text())["records"]
    assert [(r["model"], "error" in r) for r in recs] == [("bad", True), ("good", False), ("vit", False)]


def test_runner_reports_each_case_and_per_impl_flops():
    """``on_case`` sees the records after every case (partial JSON survives a time box) and
    ``flops`` overrides the case's FLOPs per impl (dense flash credited with its own work)."""
    import dataclasses

    from jaxattn.bench import runner

    @dataclasses.dataclass(frozen=True)
    class C(runner.Shape):
        flops: float = 1e9

    seen = []
    recs = runner.run([C(1, 8, 1, 4), C(1, 16, 1, 4)], inputs=lambda c: (jax.numpy.ones(c.seq),),
                      peers=lambda c: {"jaxattn": jax.jit(lambda x: x * 2), "dense": jax.jit(lambda x: x + 1)},
                      warmup=1, runs=2, progress=False,
                      flops=lambda c, impl: 2 * c.flops if impl == "dense" else c.flops,
                      on_case=lambda r: seen.append(len(r)))
    assert seen == [2, 4]
    ours = [r for r in recs if r["impl"] == "jaxattn"]
    dense = [r for r in recs if r["impl"] == "dense"]
    for a, b in zip(ours, dense):
        assert a["tflops"] == pytest.approx(1e9 / (a["ms"] * 1e-3) / 1e12)
        assert b["tflops"] == pytest.approx(2e9 / (b["ms"] * 1e-3) / 1e12)


def test_decode_smoke_sweep_and_report(tmp_path, capsys):
    from jaxattn.bench import decode as decode_bench
    from jaxattn.bench.report import section

    c = decode_bench.Case(2, 1024, 32, 128, 8, "bfloat16")
    assert c.flops == 4 * 2 * 32 * 1024 * 128 and c.cache_bytes == 2 * 2 * 1024 * 8 * 128 * 2
    path = tmp_path / "decode.json"
    assert main(["decode", "--smoke", "--json", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| jaxattn " in out and "| xla " in out and "cache GB/s" in out
    data = json.loads(path.read_text())
    assert all(r.get("ms") for r in data["records"]), [r for r in data["records"] if not r.get("ms")]
    text, _ = section([data])
    assert "KV-cache bandwidth" in text and "### decode" in text


def test_sparse_window_peer_is_the_same_mask():
    """bench sparse's flash-window peer (the dense kernel's local_window_size) computes exactly
    what the block-sparse kernel computes for BlockMask.sliding_window."""
    from jaxattn.bench import sparse as sparse_bench

    case = sparse_bench.make_case(1, 200, 2, 32, "window", 32, 48, "float32", "fwd")
    q, k, v, do = sparse_bench.inputs(case)
    ops = sparse_bench.peers(case, interpret=True)
    np.testing.assert_allclose(ops["flash-window"](q, k, v, do), ops["jaxattn"](q, k, v, do), atol=2e-5)


def test_attention_prev_config_peer_matches_the_table_entry():
    """bench attention's jaxattn-prev-config peer (d=128 bf16 fwd+bwd) runs the old tiles; it and
    the current table entry both give the XLA reference peer's gradients (up to bf16 rounding)."""
    case = attention_bench.Case(1, 96, 1, 128, True, "bfloat16", "fwd+bwd")
    ops = attention_bench.peers(case, interpret=True)
    assert "jaxattn-prev-config" in ops
    assert attention_bench.PREV_D128_CONFIG != attention_bench.flash.flash_config(128, jnp.bfloat16)
    q, k, v, do = attention_bench.inputs(case)
    expected = jax.tree.leaves(ops["xla"](q, k, v, do))
    for name in ("jaxattn", "jaxattn-prev-config"):
        for a, b in zip(jax.tree.leaves(ops[name](q, k, v, do)), expected):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2, rtol=3e-2)


def test_attention_mosaic_peer():
    """On a GPU bench attention times impl="mosaic" (interpreted here) beside the Triton path; its
    forward and gradients match the XLA reference peer's."""
    case = attention_bench.Case(1, 128, 2, 64, True, "bfloat16", "fwd+bwd")
    ops = attention_bench.peers(case, interpret=False)  # the GPU's peer list (built, not all run)
    assert "jaxattn-mosaic" in ops
    q, k, v, do = attention_bench.inputs(case)
    for a, b in zip(jax.tree.leaves(ops["jaxattn-mosaic"](q, k, v, do)), jax.tree.leaves(ops["xla"](q, k, v, do))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2, rtol=3e-2)
    assert "jaxattn-mosaic" not in attention_bench.peers(dataclasses.replace(case, head_dim=96), interpret=False)


def test_failed_mosaic_check_leaves_the_mosaic_peers_out(monkeypatch):
    from jaxattn.bench import sage as sage_bench

    monkeypatch.setenv("JAXATTN_NO_MOSAIC", "hang")
    case = attention_bench.Case(1, 128, 2, 64, True, "bfloat16", "fwd")
    assert not [n for n in attention_bench.peers(case, interpret=False) if "mosaic" in n or "mgpu" in n]
    assert not [n for n in sage_bench.peers(sage_bench.Case(1, 128, 2, 64, True, "bfloat16"), interpret=False)
                if "mosaic" in n]
    from jaxattn.bench import sparse as sparse_bench

    case = sparse_bench.make_case(1, 1024, 2, 64, "power", 256, 512, "bfloat16", "fwd")
    assert not [n for n in sparse_bench.peers(case, interpret=False) if "mosaic" in n]
    monkeypatch.delenv("JAXATTN_NO_MOSAIC")
    assert {"jaxattn-mosaic", "flash-full-mosaic"} <= set(sparse_bench.peers(case, interpret=False))
    small = sparse_bench.make_case(1, 1024, 2, 64, "power", 64, 256, "bfloat16", "fwd")  # 64-row mask blocks
    assert "jaxattn-mosaic" not in sparse_bench.peers(small, interpret=False)


@pytest.mark.slow
def test_mosaic_check_passes_interpreted(capsys):
    """The quick pre-sweep check of .ci/gpu (here in Mosaic GPU's interpret mode)."""
    from jaxattn.bench import mosaic_check

    assert mosaic_check.main(["--seq", "130", "--heads", "1"]) == 0
    assert capsys.readouterr().out.count(" ok") == 4


def test_torch_peers_need_torch_with_cuda(monkeypatch):
    """runner.cuda_torch gates every bench's PyTorch peers: no torch, or torch without CUDA, means
    none (checked with a stand-in torch module; this machine has no GPU)."""
    import sys
    import types

    from jaxattn.bench import attention, decode, halo, lightning, runner, sage, sparse

    fake = types.ModuleType("torch")
    fake.bfloat16, fake.float16, fake.float32 = "bf16", "f16", "f32"
    fake.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert runner.cuda_torch("bfloat16") is None
    for mod in (attention, decode, halo, lightning, sage, sparse):
        assert mod.torch_peers(next(iter(mod.smoke_cases()))) == {}, mod.__name__
    fake.cuda = types.SimpleNamespace(is_available=lambda: True)
    assert runner.cuda_torch("bfloat16") == (fake, "bf16")
    assert runner.cuda_torch("float16") == (fake, "f16")
    assert runner.cuda_torch("float32") is None  # the peers' kernels are 16-bit only
    assert runner.cuda_torch() == (fake, None)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert runner.cuda_torch("bfloat16") is None


@pytest.mark.parametrize("family", ["flash", pytest.param("lightning", marks=pytest.mark.slow), "sage",
                                    pytest.param("halo", marks=pytest.mark.slow), pytest.param("mosaic", marks=pytest.mark.slow),
                                    pytest.param("sparse", marks=pytest.mark.slow)])
def test_tune_smoke_cli(tmp_path, capsys, family):
    """The tuner's plumbing on CPU: every stage times its current config and candidates, and the
    best config is one of the timed ones, printed as a table line."""
    out = tmp_path / "tune.json"
    assert main(["tune", family, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    timed = [r for r in data["records"] if "ms" in r]
    assert len({r["stage"] for r in timed}) == {"flash": 3, "lightning": 5, "sage": 1, "halo": 2, "mosaic": 2, "sparse": 3}[family]
    assert data["best"] in [r["config"] for r in timed]
    best_ms = min(r["ms"] for r in timed if r["config"] == data["best"])
    assert all(np.isfinite(r["ms"]) for r in timed) and best_ms > 0
    assert "best for pallas/" in text and "Config(" in text


def test_tune_keeps_a_stage_best_and_reports_failures(monkeypatch):
    """A candidate that raises is recorded with its error; the next stage starts from the best."""
    from jaxattn.bench import tune

    calls = []

    def fake_make(cfg, extra, mode, causal, inputs):
        calls.append(cfg)
        if cfg.num_stages == 4:
            raise RuntimeError("out of shared memory")
        return lambda: None

    fam = tune.FAMILIES["flash"]()
    monkeypatch.setitem(tune.FAMILIES, "flash", lambda: tune.Family(
        fam.base, lambda: [tune.Stage("a", "fwd", ({"num_stages": 4}, {"num_stages": 2})),
                           tune.Stage("b", "fwd", ({"num_warps": 8},))], fake_make,
        lambda *a: (), fam.table))
    ticks = iter([5.0, 1.0, 3.0, 4.0, 9.0])  # ms of: a/current, a/stages=2, b/current, b/warps=8 (errors skip)
    monkeypatch.setattr(tune.timing, "time_jax", lambda f, **kw: (f(), type("T", (), {"median_ms": next(ticks)}))[1])
    res = tune.tune("flash", batch=1, seq=16, heads=1, head_dim=64, progress=False)
    errors = [r for r in res["records"] if "error" in r]
    assert len(errors) == 1 and "shared memory" in errors[0]["error"]
    assert res["best"].num_stages == 2 and res["best"].num_warps == fam.base(64, jnp.bfloat16).num_warps


def test_tune_rejects_a_fast_wrong_config(monkeypatch):
    """A candidate whose outputs differ from the current config's beyond the family's tolerance
    (or hold NaN) is recorded as wrong and cannot win, however fast."""
    from jaxattn.bench import tune

    def fake_make(cfg, extra, mode, causal, inputs):
        out = {2: 1.0, 3: 1.001, 4: 1.5}.get(cfg.num_stages, 1.0)
        return lambda: (jnp.full((4,), out), jnp.array([jnp.nan if cfg.num_warps == 2 else 2.0]))

    fam = tune.FAMILIES["flash"]()
    monkeypatch.setitem(tune.FAMILIES, "flash", lambda: tune.Family(
        fam.base, lambda: [tune.Stage("a", "fwd", ({"num_stages": 4}, {"num_stages": 3}, {"num_warps": 2}))],
        fake_make, lambda *a: (), fam.table))
    ticks = iter([5.0, 3.0])  # ms of a/current and a/stages=3 (the wrong ones are not timed)
    monkeypatch.setattr(tune.timing, "time_jax", lambda f, **kw: type("T", (), {"median_ms": next(ticks)}))
    res = tune.tune("flash", batch=1, seq=16, heads=1, head_dim=64, progress=False)
    wrong = [r for r in res["records"] if "wrong result" in r.get("error", "")]
    assert len(wrong) == 2, res["records"]
    assert res["best"].num_stages == 3
    assert tune.max_rel_err((jnp.ones(3),), (jnp.ones(3) * 2,)) == pytest.approx(0.5)
    assert tune.max_rel_err(jnp.array([jnp.inf]), jnp.ones(1)) == float("inf")
