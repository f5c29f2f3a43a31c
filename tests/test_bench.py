"""The benchmark harness runs its CPU smoke sweep and writes a table and JSON."""

from __future__ import annotations

import json

import jax
import pytest

from jaxattn.bench import attention as attention_bench
from jaxattn.bench.__main__ import main


def test_flops_formula():
    c = attention_bench.Case(2, 1024, 8, 128, False, "bfloat16", "fwd")
    assert c.flops == 4 * 2 * 8 * 1024 * 1024 * 128
    causal_bwd = attention_bench.Case(2, 1024, 8, 128, True, "bfloat16", "fwd+bwd")
    assert causal_bwd.flops == c.flops / 2 * 3.5


def test_gpu_sweep_fills_tokens_and_model_dim():
    cases = list(attention_bench.gpu_cases([1024, 32768], [64, 128], [True], ["bfloat16"], ["fwd"]))
    assert {(c.batch * c.seq, c.heads * c.head_dim) for c in cases} == {(16384, 2048), (32768, 2048)}


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="smoke sweep is the CPU default")
def test_smoke_sweep_cli(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["attention", "--json", str(path), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| jaxattn" in table and "| xla" in table and "TFLOP/s" in table
    data = json.loads(path.read_text())
    assert data["info"]["jax"] == jax.__version__
    ours = [r for r in data["records"] if r["impl"] == "jaxattn"]
    assert len(ours) == 4 and all(r["ms"] > 0 and r["tflops"] > 0 for r in ours)
    assert {r["mode"] for r in ours} == {"fwd", "fwd+bwd"}
