"""LoRA adapters: the low-rank update against numpy, merging, and LoRA fine-tuning through the LM trainer
(only the adapters move; a kill and --resume lose nothing; the export folds them into the weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import create_model
from jaxattn.models.lora import LoRALinear, add_lora, has_lora, lora_linears, merge_lora, merged


class Two(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.a(x)))


def test_low_rank_update_matches_numpy_and_merges():
    m = Two(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    before = m(x)
    add_lora(m, 2, alpha=3.0, rngs=nnx.Rngs(1))  # (targets None: every linear but the head)
    assert isinstance(m.a, LoRALinear) and type(m.head) is nnx.Linear and has_lora(m)
    np.testing.assert_array_equal(m(x), before)  # B = 0: unchanged at the start
    m.a.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 5))
    w, b = (np.asarray(t, np.float64) for t in (m.a.base.kernel[...], m.a.base.bias[...]))
    a_, b_ = np.asarray(m.a.lora_a[...], np.float64), np.asarray(m.a.lora_b[...], np.float64)
    h = np.asarray(x, np.float64) @ (w + a_ @ b_ * 1.5) + b  # scale alpha / rank
    np.testing.assert_allclose(m.a(x), h, rtol=1e-5, atol=1e-5)
    want = m(x)
    folded = merged(m)
    assert type(folded.a) is nnx.Linear and has_lora(m)  # (a copy: m keeps its adapters)
    np.testing.assert_allclose(folded(x), want, rtol=1e-5, atol=1e-5)
    merge_lora(m)
    assert not has_lora(m) and lora_linears(m) == []
    np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-5)


def test_targets_and_errors():
    gpt = create_model("gpt-tiny", rngs=nnx.Rngs(0), vocab_size=64, dim=32, layers=2, heads=2, attn_impl="xla")
    tokens = jnp.arange(12)[None] % 64
    before = gpt(tokens)
    add_lora(gpt, 4)
    names = sorted({p[-1] for p, _ in lora_linears(gpt)})
    assert names == ["down", "gate_up", "kv", "o", "q"] and len(lora_linears(gpt)) == 10
    np.testing.assert_array_equal(gpt(tokens), before)
    assert lora_linears(gpt)[0][1].scale == 2.0  # alpha defaults to 2 * rank
    only = add_lora(create_model("gpt-tiny", rngs=nnx.Rngs(0), vocab_size=64, dim=32, layers=2, heads=2),
                    2, targets=["q", "o"])
    assert sorted({p[-1] for p, _ in lora_linears(only)}) == ["o", "q"]
    add_lora(only, 2, targets=["q", "o", "kv"])  # (wrapped layers are not wrapped again)
    assert len(lora_linears(only)) == 6
    for kw, match in [(dict(rank=0), "rank must be >= 1"), (dict(rank=2, alpha=0.0), "alpha must be positive"),
                      (dict(rank=2, targets=["q", "nope"]), r"\['nope'\] name no linear layer .*'gate_up'"),
                      (dict(rank=2, targets=[]), "at least one layer name"), (dict(rank=33), "rank must be in 1..32")]:
        with pytest.raises(ValueError, match=match):
            add_lora(create_model("gpt-tiny", rngs=nnx.Rngs(0), vocab_size=64, dim=32, layers=1, heads=2), **kw)


def test_lm_lora_trains_only_adapters_resumes_and_exports(tmp_path):
    from jaxattn.export import export
    from jaxattn.generate import load_trained
    from jaxattn.models.hf import load_pretrained
    from jaxattn.train.lm import LMConfig, train

    def cfg(out, **kw):
        return LMConfig(model="gpt-tiny", model_args="dim=32 layers=2 heads=2", max_bytes=100_000, seq_len=32,
                        batch_size=4, steps=6, warmup=1, eval_every=3, eval_batches=1, ckpt_every=3, log_every=1,
                        out=str(out), lr=3e-2, attn_impl="xla", lora_rank=4, lora_targets="q,kv,o", **kw)

    full = train(cfg(tmp_path / "a"), progress=False, sample=False)
    model = full["trainer"].model
    base = create_model("gpt-tiny", rngs=nnx.Rngs(0), vocab_size=256, dim=32, layers=2, heads=2, attn_impl="xla")
    frozen = {(tuple(p), "kernel"): m.kernel[...] for p, m in nnx.iter_modules(base) if type(m) is nnx.Linear}
    adapted = {tuple(p) for p, _ in lora_linears(model)}
    assert len(adapted) == 6
    for (path, _), kernel in frozen.items():  # every base weight as the seed drew it; the adapters moved
        node = model
        for part in path:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        np.testing.assert_array_equal((node.base if path in adapted else node).kernel[...], kernel)
        if path in adapted:
            assert np.abs(np.asarray(node.lora_b[...])).max() > 1e-3
    np.testing.assert_array_equal(model.embed.embedding[...], base.embed.embedding[...])
    # a kill after step 5 (last checkpoint: 3), then --resume: the same adapters as the uninterrupted run
    killed = train(cfg(tmp_path / "b"), stop_after=5, progress=False, sample=False)
    assert killed["stopped_at"] == 5
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False, sample=False)["trainer"].model
    for (_, a), (_, b) in zip(lora_linears(model), lora_linears(resumed)):
        np.testing.assert_allclose(a.lora_b[...], b.lora_b[...], rtol=1e-5, atol=1e-6)
    # generate's loader rebuilds the adapters; the export folds them into plain weights
    again, _, step, _ = load_trained(tmp_path / "a")
    assert step == 6 and len(lora_linears(again)) == 6
    tokens = jnp.asarray(np.frombuffer(b"def main():\n    return 1", np.uint8).astype(np.int32))[None]
    want = model(tokens)
    np.testing.assert_allclose(again(tokens), want, rtol=1e-5, atol=1e-5)
    export(tmp_path / "a", tmp_path / "hf")
    plain = load_pretrained(tmp_path / "hf", attn_impl="xla")
    assert not has_lora(plain)
    np.testing.assert_allclose(plain(tokens), want, rtol=2e-4, atol=2e-4)


def test_lm_cli_lora_flags(tmp_path, capsys):
    from jaxattn.train.__main__ import main as train_main

    for argv, match in [(["--lora-alpha", "4"], "--lora-alpha and --lora-targets need --lora-rank"),
                        (["--lora-rank", "2", "--lora-targets", " , "], "--lora-targets must name layers"),
                        (["--lora-rank", "-1"], "--lora-rank must be >= 0")]:
        with pytest.raises(SystemExit):
            train_main(["lm", "--model", "gpt-tiny", "--out", str(tmp_path / "x"), *argv])
        assert match in capsys.readouterr().err
