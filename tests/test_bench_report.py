"""The BENCHMARKS.md report renders each JSON file and decides the issues' targets correctly."""

from __future__ import annotations

import json

from jaxattn.bench import report

INFO = dict(device="NVIDIA H100", backend="gpu", jax="0.11.2", python="3.12", date="2026-12-01")


def _rec(impl, ms, **case):
    return dict(batch=2, seq=8192, heads=16, head_dim=128, **case, impl=impl, ms=ms, tflops=100.0 / ms if ms else None)


def _attention(pallas_fwd: float) -> dict:
    recs = []
    for causal in (False, True):
        for mode, ours, cudnn, pallas in (("fwd", 1.0, 0.9, pallas_fwd), ("fwd+bwd", 3.0, 2.5, 3.3)):
            c = dict(causal=causal, dtype="bfloat16", mode=mode)
            recs += [_rec("jaxattn", ours, **c), _rec("cudnn", cudnn, **c), _rec("jax-pallas", pallas, **c),
                     dict(_rec("xla", None, **c), tflops=None, error="XlaRuntimeError: OOM")]
    return dict(op="attention", info=INFO, records=recs)


def _verdicts(datas):
    _, targets = report.section(datas)
    return {t.name: t.verdict for t in targets}, targets


def test_attention_targets_pass_and_fail_on_the_ratio():
    v, targets = _verdicts([_attention(pallas_fwd=1.3)])
    assert len(targets) == 6 and all(x == "PASS" for x in v.values()), v
    v, _ = _verdicts([_attention(pallas_fwd=1.1)])  # only 1.1x faster than JAX's Pallas mha: below 1.2
    fails = [k for k, x in v.items() if x == "FAIL"]
    assert len(fails) == 2 and all("fwd vs JAX Pallas" in k for k in fails), v


def test_attention_mosaic_rows_only_with_mosaic_records():
    data = _attention(pallas_fwd=1.3)
    for r in list(data["records"]):
        if r["impl"] == "jaxattn":
            data["records"].append(dict(r, impl="jaxattn-mosaic", ms=r["ms"] * (0.8 if r["mode"] == "fwd" else 1.2)))
    v, targets = _verdicts([data])
    mosaic = {k: x for k, x in v.items() if "impl=mosaic" in k}
    assert len(targets) == 12 and len(mosaic) == 6, v
    assert mosaic["flash fwd impl=mosaic vs JAX Pallas mha, S=8192 d=128 bf16 causal"] == "PASS"  # 1.3 / 0.8
    assert mosaic["flash fwd+bwd impl=mosaic vs JAX Pallas mha, S=8192 d=128 bf16 causal"] == "FAIL"  # 3.3 / 3.6


def test_sage_mosaic_rows():
    c = dict(causal=False, dtype="bfloat16", mode="fwd")  # _rec: S = 8192, d = 128
    recs = [_rec("jaxattn", 1.0, **c), _rec("flash-bf16", 1.0, **c)]
    v, _ = _verdicts([dict(op="sage", info=INFO, records=recs)])
    assert [k for k in v if "sage fwd" in k] == ["sage fwd vs our bf16 flash, d=128, S>=4k (worst case)"]
    recs += [_rec("jaxattn-mosaic", 0.5, **c), _rec("flash-mosaic", 0.7, **c)]
    v, _ = _verdicts([dict(op="sage", info=INFO, records=recs)])
    assert v["sage fwd impl=mosaic vs our bf16 flash (flash-bf16), d=128, S>=4k (worst case)"] == "PASS"  # 2x
    assert v["sage fwd impl=mosaic vs our bf16 flash (flash-mosaic), d=128, S>=4k (worst case)"] == "FAIL"  # 1.4x


def test_lightning_time_per_token_and_missing_peers():
    recs = []
    for seq, ms in ((2048, 1.0), (8192, 1.1), (65536, 1.4)):  # fixed B*S: 1.4x from 2k to 64k -> FAIL
        recs.append(dict(_rec("jaxattn", ms, dtype="bfloat16", mode="fwd+bwd"), seq=seq, batch=65536 // seq))
    recs.append(dict(_rec("jaxattn-softmax-flash", 9.0, dtype="bfloat16", mode="fwd"), seq=32768, batch=2))
    recs.append(dict(_rec("jaxattn", 2.0, dtype="bfloat16", mode="fwd"), seq=32768, batch=2))
    v, _ = _verdicts([dict(op="lightning", info=INFO, records=recs)])
    per_tok = [x for k, x in v.items() if "time/token" in k]
    assert per_tok == ["FAIL"]
    assert v["lightning vs our softmax flash, S=32768 fwd (worst head dim)"] == "PASS"  # 4.5x
    assert v["lightning vs our softmax flash, S=32768 fwd+bwd (worst head dim)"] == "not measured"
    assert all(x == "not measured" for k, x in v.items() if "flash-linear" in k)


def test_sparse_per_block_uses_visited_flops_and_sage_accuracy():
    c = dict(pattern="power", block=256, window=1280, density=0.05, dtype="bfloat16", mode="fwd")
    recs = [dict(_rec("jaxattn", 1.0, **c), seq=131072, tflops=400.0),
            dict(_rec("flash-full", 5.0, **c), seq=131072, tflops=420.0)]
    v, _ = _verdicts([dict(op="sparse", info=INFO, records=recs)])
    assert v["PowerAttention prefill (fwd) vs full flash, S=131072"] == "PASS"  # 5x
    assert v["block-sparse throughput per visited block vs dense flash (worst case)"] == "PASS"  # 0.95
    assert not [k for k in v if "impl=mosaic" in k]
    recs += [dict(_rec("jaxattn-mosaic", 1.0, **c), seq=131072, tflops=500.0),
             dict(_rec("flash-full-mosaic", 4.0, **c), seq=131072, tflops=600.0)]
    v, _ = _verdicts([dict(op="sparse", info=INFO, records=recs)])
    assert v["block-sparse impl=mosaic throughput per visited block vs dense flash (worst case)"] == "FAIL"  # 0.83
    acc = [dict(seq=4096, head_dim=128, causal=False, dtype="bfloat16", inputs="outlier", smooth_k=s,
                cos_sim=cs, rel_l1=l1, rmse=0.01) for s, cs, l1 in ((True, 0.9995, 0.03), (False, 0.9, 0.4))]
    sage = [_rec(i, ms, causal=False, dtype="bfloat16", mode="fwd") for i, ms in (("jaxattn", 1.0), ("flash-bf16", 1.4))]
    v, _ = _verdicts([dict(op="sage", info=INFO, records=sage, accuracy=acc)])
    assert v["sage fwd vs our bf16 flash, d=128, S>=4k (worst case)"] == "FAIL"  # 1.4 < 1.5
    assert v["sage cosine similarity vs fp32, smoothing on (worst case)"] == "PASS"  # smoothing-off row ignored
    assert v["sage relative L1 vs fp32, smoothing on (worst case)"] == "PASS"


def test_cli_writes_a_section_with_headers_errors_and_targets(tmp_path, capsys):
    a = tmp_path / "attention.json"
    a.write_text(json.dumps(_attention(1.3)))
    vis = tmp_path / "vision.json"
    vis.write_text(json.dumps(dict(op="vision", info=INFO, records=[
        dict(model="vit-s16", mode="train", batch=64, dtype="bfloat16", image_size=224, ms=50.0,
             images_per_s=1280.0)])))
    bad = tmp_path / "broken.json"
    bad.write_text("{")  # e.g. a bench killed while writing: skipped, named on stderr
    out = tmp_path / "section.md"
    assert report.main([str(a), str(vis), str(bad), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### attention | NVIDIA H100 | jax 0.11.2 | 2026-12-01" in text
    assert "XlaRuntimeError: OOM" in text and "vit-s16" in text and "1,280.00" in text
    assert "### Targets" in text and text.count("PASS") == 6
    assert "broken.json" in capsys.readouterr().err
