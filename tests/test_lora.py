"""LoRA adapters: the low-rank update against numpy, merging, and LoRA fine-tuning through the LM trainer
(only the adapters move; a kill and --resume lose nothing; the export folds them into the weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import create_model
from jaxattn.train import loop
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
    tnl = create_model("tnl-tiny", rngs=nnx.Rngs(0), vocab_size=64, dim=32, layers=2, heads=2, glu_dim=48)
    want = tnl(tokens)
    add_lora(tnl, 2)  # (every linear layer of TNL's token mixers and GLUs)
    assert len(lora_linears(tnl)) >= 8 and all("head" not in p for p, _ in lora_linears(tnl))
    for _, m in lora_linears(tnl):
        m.lora_b[...] = jnp.full(m.lora_b[...].shape, 0.01)
    adapted = tnl(tokens)
    assert np.abs(np.asarray(adapted - want)).max() > 1e-4
    np.testing.assert_allclose(merged(tnl)(tokens), adapted, rtol=1e-4, atol=1e-4)
    for kw, match in [(dict(rank=0), "rank must be >= 1"), (dict(rank=2, alpha=0.0), "alpha must be positive"),
                      (dict(rank=2, targets=["q", "nope"]), r"\['nope'\] name no linear layer .*'gate_up'"),
                      (dict(rank=2, targets=[]), "at least one layer name"), (dict(rank=33), "rank must be in 1..32")]:
        with pytest.raises(ValueError, match=match):
            add_lora(create_model("gpt-tiny", rngs=nnx.Rngs(0), vocab_size=64, dim=32, layers=1, heads=2), **kw)


@pytest.mark.slow  # (25 s: the suite's budget; LoRA training by default: the folder run)
def test_lm_lora_trains_only_adapters_resumes_and_exports(tmp_path):
    from jaxattn.export import export
    from jaxattn.generate import load_trained
    from jaxattn.models.hf import load_pretrained
    from jaxattn.train.lm import LMConfig, train

    def cfg(out, **kw):
        return LMConfig(model="gpt-tiny", model_args="dim=32 layers=2 heads=2", max_bytes=100_000, seq_len=32,
                        batch_size=4, steps=6, warmup=1, eval_every=3, eval_batches=1, ckpt_every=3, log_every=1,
                        out=str(out), lr=3e-2, attn_impl="xla", lora_rank=4, **{"lora_targets": "q,kv,o", **kw})

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
    # the checkpoints hold the adapters and their optimizer state, not the frozen weights (rebuilt on restore)
    from jaxattn.train.lm import Trainer, _manager, default_model_factory

    trainer = full["trainer"]
    manager = _manager(tmp_path / "a")
    n_state, n_frozen = len(jax.tree.leaves(trainer.state)), len(trainer._frozen_paths)
    # (per block: 2 norms, 3 adapted bases, gate_up, down; the embedding and the final norm)
    assert n_frozen == 2 * 7 + 2 and len(manager.item_metadata(6).keys()) == n_state - n_frozen
    # an older full checkpoint (frozen weights too) restores; one of another configuration is refused
    trainer.save_frozen = True
    full_ckpt = loop.checkpoint_manager(tmp_path / "full")
    trainer.save(full_ckpt, 6)
    full_ckpt.wait_until_finished()
    assert len(full_ckpt.item_metadata(6).keys()) == n_state
    other = Trainer(cfg(tmp_path / "c"), default_model_factory(cfg(tmp_path / "c"), 256))
    other.restore(full_ckpt, 6)
    np.testing.assert_array_equal(other.model.blocks[1].attn.o.lora_b[...], model.blocks[1].attn.o.lora_b[...])
    fewer = cfg(tmp_path / "d", lora_targets="q")
    with pytest.raises(ValueError, match=r"checkpoint step 6 in .* lacks \d+ trained arrays .*another model or configuration"):
        Trainer(fewer, default_model_factory(fewer, 256)).restore(manager, 6)
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


def _write_adapter(path, conf, tensors):
    import json

    from jaxattn.models.safetensors_io import write_safetensors

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "bias": "none", **conf}))
    write_safetensors(path / "adapter_model.safetensors", tensors)


def test_peft_adapter_folds_into_a_folder(tmp_path):
    """A PEFT LoRA adapter (q_proj / v_proj, a rank and alpha pattern, rsLoRA) merged as merge_and_unload:
    the loaded model gives the float64 oracle's logits of W + scale B A; Phi-3's fused qkv_proj is adapted
    before it is split; what cannot merge is refused by name."""
    import json

    from test_gpt_hf import LLAMA, LOGITS_TOL, PHI3, TOKENS, fused_phi3, random_hf_state_dict, reference_logits

    from conftest import assert_close
    from jaxattn.generate import load_language_model
    from jaxattn.models.hf import load_pretrained
    from jaxattn.models.safetensors_io import write_safetensors

    rng = np.random.default_rng(0)
    sd = random_hf_state_dict(LLAMA, seed=2)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(LLAMA))
    write_safetensors(tmp_path / "base" / "model.safetensors", sd)
    for rslora in (False, True):
        tensors, want = {}, dict(sd)
        for i in range(2):
            for proj, r, alpha in (("q_proj", 2, 4.0), ("v_proj", 3, 9.0)):  # v_proj: rank and alpha patterns
                key = f"model.layers.{i}.self_attn.{proj}"
                w = sd[key + ".weight"]
                a = rng.normal(0, 0.5, (r, w.shape[1])).astype(np.float32)
                b = rng.normal(0, 0.5, (w.shape[0], r)).astype(np.float32)
                tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"] = a, b
                scale = alpha / (np.sqrt(r) if rslora else r)
                want[key + ".weight"] = (w.astype(np.float64) + scale * b.astype(np.float64) @ a).astype(np.float32)
        ad = tmp_path / f"adapter-{rslora}"
        _write_adapter(ad, {"r": 2, "lora_alpha": 4, "rank_pattern": {"v_proj": 3}, "alpha_pattern": {"v_proj": 9},
                            "use_rslora": rslora, "target_modules": ["q_proj", "v_proj"]}, tensors)
        model = load_pretrained(tmp_path / "base", adapter=ad, attn_impl="xla")
        expected = reference_logits(want, LLAMA, TOKENS)
        assert_close(model(jnp.asarray(TOKENS)), expected, jnp.float32, f"adapted logits (rslora {rslora})",
                     tol=LOGITS_TOL)
        assert np.abs(expected - reference_logits(sd, LLAMA, TOKENS)).max() > 1e-2  # (the adapter matters)
    _, _, _, _, what = load_language_model(tmp_path / "base", adapter=ad)
    assert what.endswith(f"+ adapter {ad.name}")
    # modules_to_save: whole weights replaced (here a zero head: zero logits)
    _write_adapter(tmp_path / "head", {"r": 2, "modules_to_save": ["lm_head"]},
                   {"base_model.model.lm_head.weight": np.zeros((67, 32), np.float32)})
    np.testing.assert_array_equal(load_pretrained(tmp_path / "base", adapter=tmp_path / "head")(jnp.asarray(TOKENS)), 0)
    # Phi-3: an adapter on the fused qkv_proj
    psd = random_hf_state_dict(PHI3, seed=5)
    fused = fused_phi3(psd)
    (tmp_path / "phi").mkdir()
    (tmp_path / "phi" / "config.json").write_text(json.dumps(PHI3))
    write_safetensors(tmp_path / "phi" / "model.safetensors", fused)
    key = "model.layers.1.self_attn.qkv_proj"
    a = rng.normal(0, 0.5, (2, fused[key + ".weight"].shape[1])).astype(np.float32)
    b = rng.normal(0, 0.5, (fused[key + ".weight"].shape[0], 2)).astype(np.float32)
    _write_adapter(tmp_path / "phi-ad", {"r": 2, "lora_alpha": 2}, {f"base_model.model.{key}.lora_A.weight": a,
                                                                   f"base_model.model.{key}.lora_B.weight": b})
    delta, h = b @ a, 4 * 8  # (q rows first: hidden 32 = 4 heads x 8)
    kv = 2 * 8
    want = dict(psd)
    for name, rows in (("q_proj", slice(0, h)), ("k_proj", slice(h, h + kv)), ("v_proj", slice(h + kv, h + 2 * kv))):
        want[f"model.layers.1.self_attn.{name}.weight"] = psd[f"model.layers.1.self_attn.{name}.weight"] + delta[rows]
    got = load_pretrained(tmp_path / "phi", adapter=tmp_path / "phi-ad", attn_impl="xla")(jnp.asarray(TOKENS))
    assert_close(got, reference_logits(want, PHI3, TOKENS), jnp.float32, "phi3 adapted", tol=LOGITS_TOL)
    # refused by name
    good = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 2), np.float32)}
    for i, (conf, tensors, match) in enumerate([
            ({"r": 2, "use_dora": True}, good, "use_dora"),
            ({"r": 2, "peft_type": "IA3"}, good, "only LORA"),
            ({"r": 3}, good, r"do not fit its weight \(32, 32\) at rank 3"),
            ({"r": 2}, {k.replace("q_proj", "x_proj"): v for k, v in good.items()}, "has no model.layers.0.self_attn.x_proj"),
            ({"r": 2}, {k: v for k, v in good.items() if "lora_A" in k}, "needs both lora_A and lora_B"),
            ({"r": 2}, {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 67), np.float32)},
             "only linear-layer LoRA")]):
        _write_adapter(tmp_path / f"bad{i}", conf, tensors)
        with pytest.raises(ValueError, match=match):
            load_pretrained(tmp_path / "base", adapter=tmp_path / f"bad{i}")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_pretrained(tmp_path / "base", adapter=tmp_path / "base")


def test_peft_adapter_matches_peft(tmp_path):
    """With peft installed: its own LoRA model (random B, rank / alpha patterns, rsLoRA) against the folder
    loaded with the adapter folded in."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_gpt_hf import LLAMA, TOKENS

    from conftest import assert_close
    from jaxattn.models.hf import load_pretrained

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in LLAMA.items()
                                                                      if k != "model_type"})).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    conf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                           rank_pattern={"down_proj": 3}, alpha_pattern={"v_proj": 7}, use_rslora=True)
    model = peft.get_peft_model(base, conf).eval()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = model(torch.as_tensor(TOKENS)).logits.numpy()
    got = load_pretrained(tmp_path / "base", adapter=tmp_path / "adapter", attn_impl="xla")(jnp.asarray(TOKENS))
    assert_close(got, want, jnp.float32, "logits vs peft", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


def test_lora_run_on_a_folder_exports_a_peft_adapter(tmp_path):
    """LoRA fine-tuning of a Hugging Face LLaMA folder, then ``export --adapter-only``: a PEFT adapter (the fused
    kv / gate_up adapters split into k/v and gate/up with the shared A) that, folded into the base folder
    (here, and by PEFT itself when installed), gives the fine-tuned model's logits."""
    import json

    from test_gpt_hf import LLAMA, TOKENS, random_hf_state_dict

    from jaxattn.export import main as export_main
    from jaxattn.models.hf import load_pretrained
    from jaxattn.models.lora import save_peft_adapter
    from jaxattn.models.safetensors_io import write_safetensors
    from jaxattn.train.lm import LMConfig, train

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA))
    (base / "tokenizer_config.json").write_text("{}")
    write_safetensors(base / "model.safetensors", random_hf_state_dict(LLAMA, seed=1))
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 67, 4000).astype(np.int32))
    run = train(LMConfig(model=str(base), data=str(tmp_path / "tokens.npy"), seq_len=16, batch_size=4, steps=3,
                         warmup=1, eval_every=0, ckpt_every=3, log_every=1, lr=5e-2, attn_impl="xla", lora_rank=2,
                         out=str(tmp_path / "run")), progress=False, sample=False)
    tuned = run["trainer"].model
    assert export_main([str(tmp_path / "run"), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"], conf["base_model_name_or_path"]) == (2, 4.0, str(base.resolve()))
    assert conf["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
    want = np.asarray(tuned(jnp.asarray(TOKENS)))
    plain = np.asarray(load_pretrained(base, attn_impl="xla")(jnp.asarray(TOKENS)))
    assert np.abs(want - plain).max() > 1e-3  # (the adapters moved)
    got = load_pretrained(base, adapter=tmp_path / "adapter", attn_impl="xla")(jnp.asarray(TOKENS))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="without adapters"):
        save_peft_adapter(load_pretrained(base), tmp_path / "x")
    # --base-dtype bfloat16: the frozen weights stored in bf16 (as the folder's, rounded), the adapters fp32;
    # the export folds them in fp32 (the bf16 base not rounded again): the run's logits
    bf = train(LMConfig(model=str(base), data=str(tmp_path / "tokens.npy"), seq_len=16, batch_size=4, steps=2,
                        warmup=1, eval_every=0, ckpt_every=2, log_every=1, lr=5e-2, attn_impl="xla", lora_rank=2,
                        base_dtype="bfloat16", out=str(tmp_path / "run-bf16")), progress=False, sample=False)
    bmodel = bf["trainer"].model
    q = bmodel.blocks[0].attn.q
    assert q.base.kernel[...].dtype == jnp.bfloat16 and q.lora_a[...].dtype == jnp.float32
    np.testing.assert_array_equal(q.base.kernel[...], load_pretrained(base).blocks[0].attn.q.kernel[...].astype(jnp.bfloat16))
    assert export_main([str(tmp_path / "run-bf16"), str(tmp_path / "bf16-out")]) == 0
    np.testing.assert_allclose(load_pretrained(tmp_path / "bf16-out", attn_impl="xla")(jnp.asarray(TOKENS)),
                               bmodel(jnp.asarray(TOKENS)), rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="--base-dtype .* needs --model FOLDER and --lora-rank"):
        train(LMConfig(model=str(base), data=str(tmp_path / "tokens.npy"), base_dtype="bfloat16",
                       out=str(tmp_path / "x")), progress=False, sample=False)
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                         tmp_path / "adapter").eval()
    with torch.no_grad():
        np.testing.assert_allclose(ref(torch.as_tensor(TOKENS)).logits.numpy(), want, rtol=2e-4, atol=2e-4)


@pytest.mark.slow  # (the LM LoRA run covers the mechanism)
def test_image_lora_fine_tunes_adapters_and_the_head(tmp_path):
    """train image --model TIMM_FOLDER --lora-rank: the pretrained weights stay as loaded, the adapters and
    the new classifier head train; the export folds the adapters in (a plain timm folder, the run's logits)."""
    from test_timm_hub import VIT_TINY

    from conftest import write_timm_folder
    from jaxattn.export import main as export_main
    from jaxattn.models.hf import load_pretrained
    from jaxattn.models.timm_hub import config_from_hf
    from jaxattn.models.timm_weights import to_timm_state_dict
    from jaxattn.models.vit import ViT
    from jaxattn.train.__main__ import main as train_main
    from jaxattn.train.image import load_trained

    src = ViT(config_from_hf(VIT_TINY), rngs=nnx.Rngs(2))
    folder = write_timm_folder(tmp_path / "vit", VIT_TINY, to_timm_state_dict(src))
    out = tmp_path / "run"
    assert train_main(["image", "--model", str(folder), "--steps", "3", "--batch-size", "8", "--lr", "5e-2",
                       "--eval-every", "0", "--out", str(out), "--no-progress", "--attn-impl", "xla",
                       "--lora-rank", "2", "--lora-targets", "qkv,fc2"]) == 0
    model, _, _, step = load_trained(out)
    assert step == 3 and sorted({p[-1] for p, _ in lora_linears(model)}) == ["fc2", "qkv"]
    for blk, ref in zip(model.blocks, src.blocks):
        for got, want in ((blk.attn.qkv.base, ref.attn.qkv), (blk.mlp.fc2.base, ref.mlp.fc2), (blk.mlp.fc1, ref.mlp.fc1)):
            np.testing.assert_array_equal(got.kernel[...], want.kernel[...])
        assert np.abs(np.asarray(blk.attn.qkv.lora_b[...])).max() > 1e-4
    head0 = create_model(str(folder), rngs=nnx.Rngs(0), num_classes=10, image_size=32, in_channels=1).head
    assert np.abs(np.asarray(model.head.kernel[...]) - np.asarray(head0.kernel[...])).max() > 1e-4  # (it trains)
    assert export_main([str(out), str(tmp_path / "exported")]) == 0
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    plain = load_pretrained(tmp_path / "exported", attn_impl="xla")
    assert not has_lora(plain)
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        train_main(["image", "--lora-rank", "2", "--gates", "features", "--out", str(tmp_path / "x")])


def _random_adapters(model, seed):
    """Random A and B in every adapter (B starts at zero: the export must carry both)."""
    from jaxattn.models.lora import lora_linears

    rng = np.random.default_rng(seed)
    for _, m in lora_linears(model):
        m.lora_a[...] = jnp.asarray(rng.normal(0, 0.3, m.lora_a.shape), jnp.float32)
        m.lora_b[...] = jnp.asarray(rng.normal(0, 0.3, m.lora_b.shape), jnp.float32)


@pytest.mark.parametrize("family", ["gpt2", "falcon-new", "phi3"] + [pytest.param(f, marks=pytest.mark.slow) for f in (
    "neox", "bloom", "bigcode", "gptj", "phi", "opt350")])
def test_peft_adapter_export_for_fused_and_classic_families(tmp_path, family):
    """save_peft_adapter on families whose folders fuse our projections (GPT-2's Conv1D c_attn, NeoX / BLOOM /
    Falcon's per-head query_key_value, Phi-3's qkv_proj and gate_up_proj) or split them (Phi's k/v, GPT-J's
    interleaved rotary rows; OPT-350m's embedding projections): folded into the base folder by merge_peft_adapter (which reads PEFT's math, not the
    export's), the adapter gives the adapted model's logits, with all layers adapted and with q alone (fused
    partners zero); with PEFT installed, PEFT's own model on the folder does too."""
    import json

    import test_gpt_classic_hf as classic
    from test_gpt_hf import PHI3, fused_phi3, random_hf_state_dict

    from jaxattn.models.hf import load_pretrained
    from jaxattn.models.lora import add_lora, save_peft_adapter
    from jaxattn.models.safetensors_io import write_safetensors

    raws = {"gpt2": classic.GPT2, "neox": classic.NEOX, "bloom": classic.BLOOM, "falcon-new": classic.FALCON_NEW,
            "bigcode": classic.BIGCODE, "gptj": classic.GPTJ, "phi": classic.PHI, "opt350": classic.OPT350, "phi3": PHI3}
    raw = raws[family]
    if family == "phi3":
        base = tmp_path / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(raw))
        write_safetensors(base / "model.safetensors", fused_phi3(random_hf_state_dict(raw, seed=3)))
    else:
        base = classic.write_folder(tmp_path / "base", raw, classic.random_state_dict(raw, seed=3))
    tokens = jnp.asarray(classic.TOKENS)
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        peft = None
    for targets in (None, ["q"]):
        model = add_lora(load_pretrained(base, attn_impl="xla"), 2, 6.0, targets=targets, rngs=nnx.Rngs(1))
        _random_adapters(model, seed=7)
        want = np.asarray(model(tokens))
        out = tmp_path / f"adapter-{targets}"
        names = save_peft_adapter(model, out, base=str(base))
        conf = json.loads((out / "adapter_config.json").read_text())
        assert conf["fan_in_fan_out"] == (family == "gpt2") and conf["target_modules"] == names
        if family in ("gpt2", "neox", "bloom", "falcon-new", "phi3") and targets is None:
            assert set(conf["rank_pattern"].values()) == {4}  # (q and kv fused: rank 2 + 2)
        got = load_pretrained(base, adapter=out, attn_impl="xla")(tokens)
        assert np.abs(want - np.asarray(load_pretrained(base, attn_impl="xla")(tokens))).max() > 1e-2
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"{family} {targets}")
        if peft is not None:
            ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out).eval()
            with torch.no_grad():
                np.testing.assert_allclose(ref(torch.as_tensor(classic.TOKENS)).logits.numpy(), want, rtol=2e-4,
                                           atol=2e-4, err_msg=f"PEFT {family} {targets}")
