"""TransNormerLLM checkpoints in the reference (Hugging Face) layout: a numpy forward written from the
reference modeling code's math on its own state_dict layout is the oracle for the conversion."""

import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxattn.models.safetensors_io import read_safetensors, read_state_dict, write_safetensors
from jaxattn.models.tnl import TNL, TNLConfig
from jaxattn.models.hf import hf_model_type, load_pretrained, save_pretrained
from jaxattn.models import generate, tnl_hf
from jaxattn.models.tnl_hf import config_from_hf, hf_config, load_hf_state_dict, to_hf_state_dict
from conftest import assert_close, assert_same_state_dict

F32 = jnp.float32
LOGITS_TOL = {jnp.dtype(F32): (2e-4, 2e-4)}  # float32 model against the float64 oracle, of the logits' scale

HF = {"model_type": "transnormer", "vocab_size": 61, "decoder_embed_dim": 24, "decoder_layers": 3,
      "decoder_attention_heads": 3, "hidden_dim": 24, "glu_dim": 40, "linear_use_lrpe_list": [1, 0, 1],
      "no_scale_embedding": False, "norm_type": "simplermsnorm", "linear_act_fun": "silu", "bias": False}


def random_hf_state_dict(hf, seed=0, tied=True):
    """Random weights under the reference's keys and shapes (nn.Linear weights are [out, in])."""
    rng = np.random.default_rng(seed)
    d, w, g, h = hf["decoder_embed_dim"], hf["hidden_dim"], hf["glu_dim"], hf["decoder_attention_heads"]
    sd = {"model.embed_tokens.weight": rng.normal(0, 0.3, (hf["vocab_size"], d))}
    for i in range(hf["decoder_layers"]):
        p = f"model.layers.{i}."
        sd[p + "token_mixer.qkvu_proj.weight"] = rng.normal(0, 0.25, (4 * w, d))
        sd[p + "token_mixer.out_proj.weight"] = rng.normal(0, 0.25, (d, w))
        if hf["linear_use_lrpe_list"][i]:
            sd[p + "token_mixer.lrpe.theta"] = rng.uniform(0.05, 1.0, (h, 1, w // h))
        sd[p + "channel_mixer.l1.weight"] = rng.normal(0, 0.25, (g, d))
        sd[p + "channel_mixer.l2.weight"] = rng.normal(0, 0.25, (g, d))
        sd[p + "channel_mixer.l3.weight"] = rng.normal(0, 0.25, (d, g))
    if not tied:
        sd["lm_head.weight"] = rng.normal(0, 0.3, (hf["vocab_size"], d))
    return {k: v.astype(np.float32) for k, v in sd.items()}


def reference_logits(sd, hf, tokens):
    """float64 numpy forward of TransnormerForCausalLM (training-path math) on its state_dict."""
    def srms(x):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)

    def slopes(n):  # the reference's ALiBi rates: start * ratio^i, start = ratio = 2^(-2^-(log2 n - 3))
        if math.log2(n).is_integer():
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start ** i for i in range(n)]
        p = 2 ** math.floor(math.log2(n))
        return slopes(p) + slopes(2 * p)[0::2][:n - p]

    W = {k: v.astype(np.float64) for k, v in sd.items()}
    nl, nh = hf["decoder_layers"], hf["decoder_attention_heads"]
    b, n = tokens.shape
    x = W["model.embed_tokens.weight"][tokens] * math.sqrt(hf["decoder_embed_dim"])
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    for layer in range(nl):
        p = f"model.layers.{layer}."
        rate = np.asarray(slopes(nh)) * (1 - layer / (nl - 1) + 1e-5)
        q, k, v, u = np.split(srms(x) @ W[p + "token_mixer.qkvu_proj.weight"].T, 4, axis=-1)
        q, k, v = (t.reshape(b, n, nh, -1).transpose(0, 2, 1, 3) for t in (q, k, v))  # b h n d
        q, k = q / (1 + np.exp(-q)), k / (1 + np.exp(-k))
        if hf["linear_use_lrpe_list"][layer]:
            ang = W[p + "token_mixer.lrpe.theta"] * np.arange(n)[None, :, None]  # h n d
            q = np.concatenate([q * np.cos(ang), q * np.sin(ang)], -1)
            k = np.concatenate([k * np.cos(ang), k * np.sin(ang)], -1)
        decay = np.where(i >= j, np.exp(-rate[:, None, None] * (i - j)), 0.0)  # h n n
        o = np.einsum("bhnm,bhme->bhne", np.einsum("bhnd,bhmd->bhnm", q, k) * decay, v)
        o = srms(o.transpose(0, 2, 1, 3).reshape(b, n, -1)) * u
        x = x + o @ W[p + "token_mixer.out_proj.weight"].T
        h = srms(x)
        x = x + ((h @ W[p + "channel_mixer.l1.weight"].T) * (h @ W[p + "channel_mixer.l2.weight"].T)) \
            @ W[p + "channel_mixer.l3.weight"].T
    head = W["model.embed_tokens.weight"] if hf.get("tie_word_embeddings", True) else W["lm_head.weight"]
    return srms(x) @ head.T


TOKENS = np.asarray([[3, 17, 59, 0, 8, 8, 41, 22, 5, 33, 60], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


@pytest.mark.parametrize("tied", [pytest.param(True, marks=pytest.mark.slow), False])
def test_reference_state_dict_gives_the_reference_logits(tied):
    hf = {**HF, "tie_word_embeddings": tied}
    sd = random_hf_state_dict(hf, tied=tied)
    cfg = config_from_hf(hf, attn_impl="xla")
    assert (cfg.lrpe_layers, cfg.tie_embeddings, cfg.hidden_dim, cfg.glu_dim) == ((0, 2), tied, None, 40)
    model = TNL(cfg, rngs=nnx.Rngs(0))
    load_hf_state_dict(model, sd)
    want = reference_logits(sd, hf, TOKENS)
    assert_close(model(jnp.asarray(TOKENS)), want, F32, "logits", tol=LOGITS_TOL)
    assert_same_state_dict(to_hf_state_dict(model), sd)


def test_save_and_load_pretrained_folder(tmp_path):
    cfg = TNLConfig(vocab_size=61, dim=24, layers=3, heads=3, glu_dim=40, lrpe_layers=(1,), tie_embeddings=False,
                    attn_impl="xla")
    model = TNL(cfg, rngs=nnx.Rngs(3))
    save_pretrained(model, tmp_path)
    assert hf_model_type(tmp_path) == "transnormer" and hf_model_type(tmp_path / "nothing") is None
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["linear_use_lrpe_list"] == [0, 1, 0] and raw["tie_word_embeddings"] is False
    assert config_from_hf(raw, attn_impl="xla") == cfg
    loaded = load_pretrained(tmp_path, attn_impl="xla")
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(TOKENS))), np.asarray(model(jnp.asarray(TOKENS))))
    # The reference's own numbers from the saved file.
    want = reference_logits(read_state_dict(tmp_path), raw, TOKENS)
    assert_close(loaded(jnp.asarray(TOKENS)), want, F32, "logits", tol=LOGITS_TOL)


def test_bf16_sharded_checkpoint(tmp_path):
    """Released checkpoints are bf16 and may be sharded with an index; bf16 weights load exactly."""
    hf = {**HF, "tie_word_embeddings": True}
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_state_dict(hf, seed=1).items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for name, ks in shards.items():
        write_safetensors(tmp_path / name, {k: sd[k] for k in ks})
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model = load_pretrained(tmp_path, attn_impl="xla")
    assert_same_state_dict(to_hf_state_dict(model), {k: v.astype(np.float32) for k, v in sd.items()})
    # bf16 parameter storage for inference: the checkpoint's parameters as stored, the decay rates (not in
    # the checkpoint) fp32; the same logits and greedy generation as fp32 parameters under bf16 compute
    half = load_pretrained(tmp_path, attn_impl="xla", dtype="bfloat16", param_dtype="bfloat16")
    full = load_pretrained(tmp_path, attn_impl="xla", dtype="bfloat16")
    stored = {e.keys[0]: e.var.get_value() for e in tnl_hf.entries(half)}
    assert {v.dtype for v in stored.values()} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(stored["model.embed_tokens.weight"]), sd["model.embed_tokens.weight"])
    assert half.blocks[0].mixer.slope[...].dtype == jnp.float32
    prompt = jnp.asarray(TOKENS[:, :5])
    got = generate(half, prompt, 4, temperature=0.0, return_logits=True)
    want = generate(full, prompt, 4, temperature=0.0, return_logits=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    with pytest.raises(ValueError, match="param_dtype must be a floating dtype"):
        load_pretrained(tmp_path, param_dtype="int8")


def test_safetensors_round_trip_and_corrupt_files(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones((0, 4), np.float16),
              "c": np.asarray([1.5, -2.0], ml_dtypes.bfloat16), "d": np.asarray([True, False])}
    write_safetensors(tmp_path / "x.safetensors", arrays, metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    back = read_safetensors(tmp_path / "x.safetensors")
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        np.testing.assert_array_equal(back[k], a)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="inconsistent offsets"):
        read_safetensors(tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        read_state_dict(tmp_path / "missing")
    with pytest.raises(ValueError, match="no model.safetensors"):
        read_state_dict(tmp_path)


def test_torch_bin_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    hf = {**HF, "tie_word_embeddings": False}
    sd = random_hf_state_dict(hf, seed=2, tied=False)
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    model = load_pretrained(tmp_path, attn_impl="xla")
    assert_same_state_dict(to_hf_state_dict(model),
                           {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in sd.items()})


def test_bad_configs_and_state_dicts(tmp_path):
    for field, value in [("norm_type", "layernorm"), ("linear_act_fun", "relu"), ("bias", True)]:
        with pytest.raises(ValueError, match=field):
            config_from_hf({**HF, field: value})
    with pytest.raises(ValueError, match="3 flags for 4 decoder_layers"):
        config_from_hf({**HF, "decoder_layers": 4})
    with pytest.raises(ValueError, match="unknown TNLConfig fields"):
        config_from_hf(HF, attn="xla")
    hf = {**HF, "tie_word_embeddings": True}
    sd = random_hf_state_dict(hf)
    model = TNL(config_from_hf(hf), rngs=nnx.Rngs(0))
    wrong = {**sd, "model.layers.1.channel_mixer.l3.weight": np.zeros((24, 41), np.float32)}
    with pytest.raises(ValueError, match=r"checkpoint shape model.layers.1.channel_mixer.l3.weight \(24, 41\)"):
        load_hf_state_dict(model, wrong)
    partial = {k: v for k, v in sd.items() if "layers.2." not in k}
    with pytest.raises(ValueError, match="missing.*model.layers.2"):
        load_hf_state_dict(model, partial)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        load_hf_state_dict(model, {**sd, "extra": np.zeros(1)})
    load_hf_state_dict(model, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]})  # tied: ignored
    (tmp_path / "config.json").write_text(json.dumps(hf))
    write_safetensors(tmp_path / "model.safetensors", partial)
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no"):
        load_pretrained(tmp_path, strict=False)


def test_hf_config_round_trip():
    cfg = TNLConfig(vocab_size=100, dim=32, layers=2, heads=4, hidden_dim=48, glu_dim=64, lrpe_layers=(),
                    no_scale_embedding=True, tie_embeddings=True)
    assert config_from_hf(hf_config(cfg)) == cfg
    assert config_from_hf({**HF, "glu_dim": -1}).glu_dim == HF["decoder_embed_dim"]
    assert config_from_hf(HF).tie_embeddings  # Hugging Face's default when config.json is silent


def test_generate_cli_on_a_reference_folder(tmp_path, capsys):
    from jaxattn.generate import main as generate_main

    cfg = TNLConfig(vocab_size=61, dim=24, layers=2, heads=3, glu_dim=40, tie_embeddings=True, attn_impl="xla")
    save_pretrained(TNL(cfg, rngs=nnx.Rngs(0)), tmp_path)
    assert generate_main(["--checkpoint", str(tmp_path), "--prompt-ids", "5 9", "--max-new-tokens", "4",
                          "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr()
    ids = [int(t) for t in out.out.split()]
    assert len(ids) == 6 and ids[:2] == [5, 9] and all(0 <= t < 61 for t in ids), out.out
    assert "transnormer" in out.err
    with pytest.raises(SystemExit):  # no tokenizer.model in the folder: text prompts are refused clearly
        generate_main(["--checkpoint", str(tmp_path), "--prompt", "hello"])
    assert "--prompt-ids" in capsys.readouterr().err


@pytest.mark.slow  # (17 s; fine-tuning a folder by default: test_lora's)
def test_fine_tune_a_reference_folder(tmp_path, capsys):
    """``train lm --model FOLDER`` starts from the folder's weights (lr 0: they stay exactly), and the run's
    checkpoint samples through generate; byte data or ids past the vocabulary are refused."""
    from jaxattn.generate import load_trained
    from jaxattn.train.__main__ import main as train_main

    cfg = TNLConfig(vocab_size=61, dim=24, layers=2, heads=3, glu_dim=40, tie_embeddings=True, attn_impl="xla")
    folder = tmp_path / "TransNormerLLM-mini"
    save_pretrained(TNL(cfg, rngs=nnx.Rngs(7)), folder)
    raw = json.loads((folder / "config.json").read_text())  # a tokenizer's files and ids beside the weights
    (folder / "config.json").write_text(json.dumps({**raw, "bos_token_id": 1, "eos_token_id": [2, 5]}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (np.arange(3000) % 61).astype(np.uint16).tofile(tmp_path / "t.bin")
    out = tmp_path / "run"
    common = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    assert train_main(["lm", "--model", str(folder), "--data", str(tmp_path / "t.bin"), "--lr", "0",
                       "--out", str(out), *common]) == 0
    model, lm_cfg, step, byte_level = load_trained(out)
    assert step == 2 and not byte_level and lm_cfg.model == str(folder.resolve())
    want = read_state_dict(folder)
    assert_same_state_dict(to_hf_state_dict(model), want)
    from jaxattn.export import main as export_main  # the run back as a reference folder

    capsys.readouterr()
    assert export_main([str(out), str(tmp_path / "exported")]) == 0
    assert "with tokenizer_config.json, generation_config.json from" in capsys.readouterr().out
    exported = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, [2, 5])
    assert (tmp_path / "exported" / "generation_config.json").read_text() == '{"eos_token_id": [2, 5]}'
    toks = jnp.asarray([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(load_pretrained(tmp_path / "exported", attn_impl="xla")(toks)),
                                  np.asarray(model(toks)))
    capsys.readouterr()
    (np.arange(3000) % 70).astype(np.uint16).tofile(tmp_path / "big.bin")
    (tmp_path / "text.txt").write_text("bytes, not token ids " * 100)
    for data, match in ((None, "give --data token files"), ("big.bin", "ids up to 69"), ("text.txt", "holds bytes")):
        extra = [] if data is None else ["--data", str(tmp_path / data)]
        with pytest.raises(SystemExit):
            train_main(["lm", "--model", str(folder), *extra, "--out", str(tmp_path / "x"), *common])
        assert match in capsys.readouterr().err, data


def test_generate_text_with_the_folders_tokenizer(tmp_path, capsys):
    spm = pytest.importorskip("sentencepiece")
    from jaxattn.generate import main as generate_main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=40,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    cfg = TNLConfig(vocab_size=40, dim=24, layers=2, heads=3, glu_dim=40, tie_embeddings=True, attn_impl="xla")
    folder = tmp_path / "tnl"
    save_pretrained(TNL(cfg, rngs=nnx.Rngs(0)), folder)
    (tmp_path / "tokenizer.model").rename(folder / "tokenizer.model")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "add_bos_token": True, "bos_token_id": 1}))
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(folder), "--prompt", "the quick", "--max-new-tokens", "5",
                          "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the quick"), text


def test_matches_the_reference_modeling_code(tmp_path):
    """The reference TransnormerForCausalLM itself (weigao266/TNL-MoE ``smoe/models/tnl``, not shipped here):
    set ``JAXATTN_TNL_REFERENCE`` to a folder holding that package as ``tnl/`` (needs torch, transformers,
    einops). Its training and inference paths both give our logits."""
    import os
    import sys

    where = os.environ.get("JAXATTN_TNL_REFERENCE")
    if not where:
        pytest.skip("JAXATTN_TNL_REFERENCE not set")
    torch = pytest.importorskip("torch")
    os.environ.setdefault("use_triton", "False")
    sys.path.insert(0, where)
    try:
        from tnl import TransnormerConfig, TransnormerForCausalLM
    finally:
        sys.path.remove(where)
    kw = {k: v for k, v in HF.items() if k != "model_type"}
    torch.manual_seed(0)
    ref = TransnormerForCausalLM(TransnormerConfig(**kw))
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    tied = ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    write_safetensors(tmp_path / "model.safetensors", {k: v.detach().numpy() for k, v in ref.state_dict().items()})
    (tmp_path / "config.json").write_text(json.dumps({**HF, "tie_word_embeddings": tied}))
    got = np.asarray(load_pretrained(tmp_path, attn_impl="xla")(jnp.asarray(TOKENS)))
    for mode in (ref.train, ref.eval):
        mode()
        with torch.no_grad():
            want = ref(torch.as_tensor(TOKENS)).logits.float().numpy()
        assert_close(got, want, F32, f"logits ({mode.__name__} mode)", tol={jnp.dtype(F32): (1e-5, 1e-4)})
