"""Language-model training: data, schedule, accumulation, exact resume, data parallel, CLIs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import run_on_cpu_devices
from jaxattn.models import create_model
from jaxattn.train.data import get_batch, load_corpus
from jaxattn.train.lm import LMConfig, Trainer, lr_schedule, train


def small_model(rngs):
    return create_model("tnl-tiny", rngs=rngs, dim=32, layers=2, heads=2, glu_dim=64)


def cfg(tmp_path, **kw):
    base = dict(max_bytes=200_000, seq_len=32, batch_size=4, steps=6, warmup=2, eval_every=3,
                eval_batches=2, ckpt_every=3, log_every=1, out=str(tmp_path / "run"), lr=3e-3)
    base.update(kw)
    return LMConfig(**base)


def params_of(trainer):
    return jax.tree.leaves(nnx.state(trainer.model, nnx.Param))


def test_stdlib_corpus_is_deterministic_bytes():
    a = load_corpus(max_bytes=100_000)
    b = load_corpus(max_bytes=100_000)
    assert a.vocab_size == 256 and a.source == "python-stdlib"
    np.testing.assert_array_equal(a.train, b.train)
    assert len(a.train) + len(a.val) == 100_000 and 0 < len(a.val) < len(a.train)
    assert b"def " in bytes(a.train[:20_000].astype(np.uint8))


def test_batches_are_a_function_of_seed_and_step():
    toks = np.arange(1000, dtype=np.int32)
    x = get_batch(toks, seed=1, step=5, batch=3, seq_len=10)
    np.testing.assert_array_equal(x, get_batch(toks, seed=1, step=5, batch=3, seq_len=10))
    assert x.shape == (3, 11) and (np.diff(x, axis=1) == 1).all()
    assert not np.array_equal(x, get_batch(toks, seed=1, step=6, batch=3, seq_len=10))
    with pytest.raises(ValueError, match="--seq-len 2000 is longer"):
        get_batch(toks, seed=0, step=0, batch=1, seq_len=2000)


def test_other_data_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    assert load_corpus(str(tmp_path)).vocab_size == 256
    np.save(tmp_path / "t.npy", np.arange(500) % 37)
    c = load_corpus(str(tmp_path / "t.npy"))
    assert c.vocab_size == 37 and isinstance(c.train.base, np.memmap)  # memory-mapped, not loaded
    assert get_batch(c.train, seed=0, step=0, batch=2, seq_len=8).dtype == np.int32
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--vocab-size 10 is smaller"):
        load_corpus(str(tmp_path / "t.npy"), vocab_size=10)
    np.save(tmp_path / "bad.npy", np.ones((3, 3)))
    with pytest.raises(ValueError, match="1-D integer"):
        load_corpus(str(tmp_path / "bad.npy"))


def test_nanogpt_bin_token_files(tmp_path):
    """nanoGPT's raw uint16 train.bin / val.bin (a folder) or one .bin file, memory-mapped."""
    (tmp_path / "d").mkdir()
    train_ids, val_ids = np.arange(3000) + 50257 - 3000, np.arange(400)  # ids up to 50256 (GPT-2)
    train_ids.astype(np.uint16).tofile(tmp_path / "d" / "train.bin")
    val_ids.astype(np.uint16).tofile(tmp_path / "d" / "val.bin")
    c = load_corpus(str(tmp_path / "d"))
    assert c.vocab_size == 50257 and len(c.train) == 3000 and len(c.val) == 400
    np.testing.assert_array_equal(c.val, val_ids)
    assert isinstance(c.train, np.memmap)
    one = load_corpus(str(tmp_path / "d" / "train.bin"), val_fraction=0.1)
    assert len(one.val) == 300 and one.vocab_size == 50257
    x = get_batch(c.train, seed=0, step=0, batch=2, seq_len=16)
    assert x.dtype == np.int32 and (np.diff(x, axis=1) == 1).all() and x.max() <= 50256
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="uint16 tokens .* odd size"):
        load_corpus(str(tmp_path / "odd.bin"))


def test_lr_schedule_warmup_then_cosine(tmp_path):
    s = lr_schedule(cfg(tmp_path, steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1))
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert float(s(50)) < 1.0 and abs(float(s(100)) - 0.1) < 1e-6


def test_grad_accumulation_equals_big_batch(tmp_path):
    batch = get_batch(load_corpus(max_bytes=50_000).train, seed=0, step=0, batch=4, seq_len=32)
    runs = []
    for accum in (1, 2, 4):
        t = Trainer(cfg(tmp_path, grad_accum=accum), small_model)
        loss = t.step(batch)
        runs.append((float(loss), params_of(t)))
    for loss, params in runs[1:]:
        np.testing.assert_allclose(loss, runs[0][0], rtol=1e-5)
        for a, b in zip(params, runs[0][1]):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["tnl-tiny", pytest.param("gpt-tiny", marks=pytest.mark.slow)])
def test_remat_gives_the_same_step(tmp_path, name):
    """--remat (activation checkpointing per block) changes memory, not the math: one AdamW step
    with and without it gives the same loss and parameters (GPT with dropout: the recomputed
    forward draws the same masks)."""
    batch = get_batch(load_corpus(max_bytes=50_000).train, seed=0, step=0, batch=4, seq_len=32)
    extra = {"dropout": 0.2, "attn_impl": "xla"} if name == "gpt-tiny" else {}
    runs = []
    for remat in (False, True):
        def factory(rngs, remat=remat):
            return create_model(name, rngs=rngs, dim=32, layers=2, heads=2, remat=remat, **extra)

        t = Trainer(cfg(tmp_path, model=name), factory)
        assert t.model.cfg.remat is remat
        runs.append((float(t.step(batch)), params_of(t)))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-6)
    for a, b in zip(runs[1][1], runs[0][1]):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)


def test_batch_must_divide(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 4 must be divisible by --grad-accum 3"):
        Trainer(cfg(tmp_path, grad_accum=3), small_model)
    with pytest.raises(ValueError, match="--ring-layout zigzag: --seq-len 34 must be divisible by 2 x --seq-parallel 2"):
        train(cfg(tmp_path, seq_len=34, seq_parallel=2, ring_layout="zigzag", model="gpt-tiny"))


def _loss_rows(path):
    with open(path) as f:
        return [(r["step"], r["loss"], r["val_loss"], r.get("val_loss_ema")) for r in csv.DictReader(f)]


def test_resume_after_kill_is_exact(tmp_path):
    """(with a weight EMA, which lives in the optimizer state: its validation loss resumes exactly too)"""
    full = train(cfg(tmp_path / "a", ema_decay=0.8), model_factory=small_model, progress=False, sample=False)
    assert full["trainer"].has_ema
    c = cfg(tmp_path / "b", ema_decay=0.8)
    killed = train(c, model_factory=small_model, stop_after=5, progress=False, sample=False)
    assert killed["stopped_at"] == 5  # the step-5 update is lost; step 3 is the last checkpoint
    resumed = train(c, resume=True, model_factory=small_model, progress=False, sample=False)
    for a, b in zip(params_of(full["trainer"]), params_of(resumed["trainer"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    rows = _loss_rows(tmp_path / "a/run/metrics.csv")
    assert rows == _loss_rows(tmp_path / "b/run/metrics.csv") and rows[-1][3] not in ("", None, rows[-1][2])
    assert (tmp_path / "b/run/loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_names_config_changes(tmp_path, capsys):
    """--resume with changed settings says which (the run no longer reproduces an uninterrupted
    one); a checkpoint of another model raises a ValueError naming the change (before: Orbax's
    'truth value of an array' error)."""
    c = cfg(tmp_path, steps=3, eval_every=0)
    train(c, model_factory=small_model, progress=False, sample=False)
    train(cfg(tmp_path, steps=3, eval_every=0), resume=True, model_factory=small_model, progress=False, sample=False)
    assert "changed config" not in capsys.readouterr().out
    train(cfg(tmp_path, steps=4, eval_every=0, lr=1e-3), resume=True, model_factory=small_model, progress=False,
          sample=False)
    assert "--resume with a changed config (lr 0.003 -> 0.001, steps 3 -> 4)" in capsys.readouterr().out

    def gpt(rngs):
        return create_model("gpt-tiny", rngs=rngs, dim=32, layers=2, heads=2, attn_impl="xla")

    with pytest.raises(ValueError, match=r"does not fit this model \(changed: .*model 'tnl-tiny' -> 'gpt-tiny'"):
        train(cfg(tmp_path, steps=5, eval_every=0, lr=1e-3, model="gpt-tiny"), resume=True, model_factory=gpt,
              progress=False, sample=False)


@pytest.mark.slow
def test_fresh_run_sets_aside_an_earlier_one(tmp_path, capsys):
    """A run without --resume in an --out that holds a longer earlier run: before, Orbax kept the old
    run's later steps as the latest and dropped the new run's own checkpoints (a later --resume or
    generate loaded the old weights); now the earlier run moves to out/previous-*."""
    from jaxattn.train.loop import checkpoint_manager

    train(cfg(tmp_path, steps=4, ckpt_every=2, eval_every=0), model_factory=small_model, progress=False, sample=False)
    new = train(cfg(tmp_path, steps=2, ckpt_every=2, eval_every=0, lr=1e-2), model_factory=small_model,
                progress=False, sample=False)
    assert "moved the earlier run there (checkpoints up to step 4" in capsys.readouterr().out
    run = tmp_path / "run"
    (prev,) = run.glob("previous-*")
    assert checkpoint_manager(prev).latest_step() == 4 and (prev / "metrics.csv").exists()
    assert checkpoint_manager(run).latest_step() == 2 and new["final_loss"] > 0


@pytest.mark.slow  # (exact resume is in the default suite: test_resume_after_kill_is_exact)
def test_resume_with_dropout_is_exact(tmp_path):
    """Dropout's RNG streams (typed PRNG keys in the model state) are checkpointed and restored:
    the resumed run draws the same masks as the uninterrupted one."""
    def gpt(rngs):
        return create_model("gpt-tiny", rngs=rngs, dim=32, layers=2, heads=2, dropout=0.2, attn_impl="xla")

    full = train(cfg(tmp_path / "a", model="gpt-tiny"), model_factory=gpt, progress=False, sample=False)
    c = cfg(tmp_path / "b", model="gpt-tiny")
    train(c, model_factory=gpt, stop_after=5, progress=False, sample=False)
    resumed = train(c, resume=True, model_factory=gpt, progress=False, sample=False)
    for a, b in zip(params_of(full["trainer"]), params_of(resumed["trainer"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert _loss_rows(tmp_path / "a/run/metrics.csv") == _loss_rows(tmp_path / "b/run/metrics.csv")
    assert jax.tree.leaves(nnx.state(resumed["trainer"].model, nnx.RngState))  # the streams exist


DP_SCRIPT = """
    from flax import nnx
    from jaxattn.models import create_model
    from jaxattn.train.data import get_batch, load_corpus
    from jaxattn.train.lm import LMConfig, Trainer
    model = lambda rngs: create_model("tnl-tiny", rngs=rngs, dim=32, layers=2, heads=2, glu_dim=64)
    cfg = LMConfig(seq_len=32, batch_size=8, warmup=1, steps=4)
    toks = load_corpus(max_bytes=50_000).train
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        t = Trainer(cfg, model, devices=devices)
        losses = [float(t.step(get_batch(toks, seed=0, step=s, batch=8, seq_len=32))) for s in range(2)]
        out.append((losses, jax.tree.leaves(nnx.state(t.model, nnx.Param))))
    # FSDP: parameters and AdamW moments split over the 4 data devices (the big ones), the same steps
    t = Trainer(LMConfig(seq_len=32, batch_size=8, warmup=1, steps=4, fsdp=True), model, devices=jax.devices())
    split = [x for x in jax.tree.leaves(t.state) if "data" in tuple(x.sharding.spec)]
    assert len(split) >= 3 * 6, len(split)  # (embedding, per layer qkvu, out, l1-l3, head) x (param, mu, nu)
    assert all(x.addressable_shards[0].data.size * 4 == x.size for x in split)
    losses = [float(t.step(get_batch(toks, seed=0, step=s, batch=8, seq_len=32))) for s in range(2)]
    out.append((losses, jax.tree.leaves(nnx.state(t.model, nnx.Param))))
    if not __SEQ__:  # (data parallel and FSDP only)
        for other in out[1:]:
            np.testing.assert_allclose(out[0][0], other[0], rtol=1e-5)
            for a, b in zip(out[0][1], other[1]):
                np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
        print("DP-OK", len(t.mesh.devices.ravel()))
        raise SystemExit(0)
    # sequence parallel: 2 data x 2 seq devices (TNL's Lightning attention split over the sequence)
    sp_cfg = LMConfig(seq_len=32, batch_size=8, warmup=1, steps=4, seq_parallel=2)
    t = Trainer(sp_cfg, model, devices=jax.devices())
    assert dict(t.mesh.shape) == {"data": 2, "seq": 2}
    losses = [float(t.step(get_batch(toks, seed=0, step=s, batch=8, seq_len=32))) for s in range(2)]
    out.append((losses, jax.tree.leaves(nnx.state(t.model, nnx.Param))))
    for other in out[1:]:
        np.testing.assert_allclose(out[0][0], other[0], rtol=1e-5)
        for a, b in zip(out[0][1], other[1]):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)

    def refused(config, factory, needle, what):
        try:
            Trainer(config, factory, devices=jax.devices())
        except ValueError as e:
            assert needle in str(e), e
        else:
            raise AssertionError(what + " accepted")

    refused(LMConfig(seq_len=32, batch_size=8, seq_parallel=3), model, "--seq-parallel 3 must divide the 4 devices",
            "seq_parallel 3 on 4 devices")
    # a GPT: ring attention over the "seq" axis, the same losses as on one device
    gpt = lambda rngs: create_model("gpt-tiny", rngs=rngs, vocab_size=256, dim=32, layers=2, heads=2, attn_impl="xla")
    runs = []
    zz_cfg = LMConfig(seq_len=32, batch_size=8, warmup=1, steps=4, seq_parallel=2, ring_layout="zigzag")
    for c, devices in ((cfg, jax.devices()[:1]), (sp_cfg, jax.devices()), (zz_cfg, jax.devices())):
        t = Trainer(c, gpt, devices=devices)
        runs.append([float(t.step(get_batch(toks, seed=0, step=s, batch=8, seq_len=32))) for s in range(2)])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
    np.testing.assert_allclose(runs[0], runs[2], rtol=1e-5)  # zig-zag ring shards: the same steps
    refused(zz_cfg, model, "--ring-layout is for ring attention", "--ring-layout for TNL")
    power = lambda rngs: create_model("power-gpt-tiny", rngs=rngs, vocab_size=256)
    refused(sp_cfg, power, "covers full and sliding-window attention", "seq_parallel for PowerAttention layers")
    print("DP-OK", len(t.mesh.devices.ravel()))
"""


@pytest.mark.parametrize("seq", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["data-fsdp", "and-seq"])
def test_data_parallel_four_devices_equals_one(seq):
    """Data parallel and FSDP; with ``seq``, also sequence parallel (TNL's sharded Lightning attention, GPT's
    ring attention: their ops are checked on 4 devices in test_lightning_sp / test_ring_attention)."""
    assert "DP-OK 4" in run_on_cpu_devices(DP_SCRIPT.replace("__SEQ__", repr(seq)))


# gpt-tiny: the KV-cache sampling path of train lm / jaxattn.generate (GPT decoding itself is in test_gpt)
@pytest.mark.parametrize("model", ["tnl-tiny", pytest.param("gpt-tiny", marks=pytest.mark.slow)])
def test_cli_end_to_end_and_generate(tmp_path, capsys, model):
    from jaxattn.generate import main as generate_main
    from jaxattn.train.__main__ import main as train_main

    out = tmp_path / "cli"
    assert train_main(["lm", "--model", model, "--steps", "4", "--seq-len", "32", "--batch-size", "4", "--max-bytes", "100000",
                       "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--out", str(out),
                       "--sample-tokens", "8", "--no-progress", "--ema-decay", "0.5"]) == 0
    for name in ("metrics.csv", "loss.png", "config.json"):
        assert (out / name).exists(), name
    assert "sample:" in capsys.readouterr().out
    assert generate_main(["--checkpoint", str(out), "--prompt", "import ", "--max-new-tokens", "5"]) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("import ") and len(plain) > len("import \n")
    # --stream: the same text, written as it comes (the pieces: test_streamer_writes_each_addition)
    assert generate_main(["--checkpoint", str(out), "--prompt", "import ", "--max-new-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert generate_main(["--checkpoint", str(out), "--prompt", "import ", "--max-new-tokens", "5", "--ema"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    # --prompts-file: a ragged batch, each prompt's text as it is alone (greedy)
    prompts = ["import ", "def f(x):", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    greedy = ["--checkpoint", str(out), "--max-new-tokens", "6", "--temperature", "0"]
    alone = []
    for prompt in prompts:
        assert generate_main([*greedy, "--prompt", prompt]) == 0
        alone.append(capsys.readouterr().out.rstrip("\n"))
    assert generate_main([*greedy, "--prompts-file", str(tmp_path / "prompts.txt")]) == 0
    assert capsys.readouterr().out == "\n\n".join(alone) + "\n"
    with pytest.raises(SystemExit):
        generate_main([*greedy, "--prompts-file", str(tmp_path / "prompts.txt"), "--prompt", "x"])
    from jaxattn.perplexity import main as ppl_main  # the run scored on its own validation split

    assert ppl_main([str(out), "--context", "32", "--max-tokens", "300", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens_scored"] == 299 and 0 < res["bits_per_byte"] < 9 and res["data"] == "the run's validation split"
    with pytest.raises(SystemExit):
        generate_main(["--checkpoint", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit):
        train_main(["lm", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])


def test_streamer_writes_each_addition():
    """generate --stream's printer: the prompt, then what each token adds to the decoded text, holding back
    an unfinished UTF-8 character; the whole is the final text and a newline."""
    from jaxattn.generate import Streamer

    class Out:
        def __init__(self):
            self.pieces = []

        def write(self, t):
            self.pieces.append(t)

        def flush(self):
            pass

    out = Out()
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    s = Streamer(decode, list(b"ab"), out=out)
    for b in "c\u00e9d".encode():  # the two bytes of e-acute arrive one by one
        s.add(b)
    s.finish()
    assert out.pieces == ["ab", "c", "\u00e9", "d", "\n"] and "".join(out.pieces) == "abc\u00e9d\n"


def test_token_file_run_generates_token_ids(tmp_path, capsys):
    """A run on token ids (not bytes) samples no text at the end; generate takes --prompt-ids and
    prints ids (before: the prompt was read as bytes and ids >= 256 printed as clipped bytes)."""
    from jaxattn.generate import main as generate_main
    from jaxattn.train.__main__ import main as train_main

    (np.arange(4000) % 300).astype(np.uint16).tofile(tmp_path / "t.bin")
    out = tmp_path / "run"
    assert train_main(["lm", "--model", "tnl-tiny", "--data", str(tmp_path / "t.bin"), "--steps", "2",
                       "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--out", str(out),
                       "--no-progress"]) == 0
    assert "sample:" not in capsys.readouterr().out
    assert generate_main(["--checkpoint", str(out), "--prompt-ids", "5, 290", "--max-new-tokens", "3"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[:2] == ["5", "290"] and len(ids) == 5 and all(0 <= int(i) < 300 for i in ids)
    for bad, match in ((["--prompt", "hi"], "trained on token ids"), (["--prompt-ids", "1,300"], r"in \[0, 300\)"),
                       (["--prompt-ids", "a"], "integers")):
        with pytest.raises(SystemExit):
            generate_main(["--checkpoint", str(out), *bad])
        assert re.search(match, capsys.readouterr().err), bad


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """A real kill: SIGKILL a training subprocess after its first checkpoint, resume it."""
    import signal
    import time

    args = ["--steps", "8", "--seq-len", "32", "--batch-size", "4", "--max-bytes", "100000", "--eval-every", "4",
            "--eval-batches", "1", "--ckpt-every", "2", "--log-every", "1", "--sample-tokens", "1", "--no-progress"]
    cmd = [sys.executable, "-m", "jaxattn.train", "lm", *args]
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) < 8, "killed after finishing"
    subprocess.run([*cmd, "--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True,
                   timeout=600)
    assert _loss_rows(tmp_path / "full/metrics.csv") == _loss_rows(tmp_path / "killed/metrics.csv")


def test_model_args_parse_by_field_type():
    from jaxattn.models import MODEL_CONFIGS
    from jaxattn.train.loop import parse_model_args

    gpt = MODEL_CONFIGS["gpt-tiny"]
    got = parse_model_args("layers=2 layer_types=power,full window=32 rope_theta=500000 kv_heads=none "
                           "tie_embeddings=false attn_impl=xla", gpt)
    assert got == {"layers": 2, "layer_types": ("power", "full"), "window": 32, "rope_theta": 500000.0,
                   "kv_heads": None, "tie_embeddings": False, "attn_impl": "xla"}
    assert parse_model_args("lrpe_layers=0,2", MODEL_CONFIGS["tnl-tiny"]) == {"lrpe_layers": (0, 2)}
    assert parse_model_args(None, gpt) == {} and parse_model_args("", gpt) == {}
    for text, match in (("layers", "key=value"), ("depth=2", "no field 'depth'"), ("layers=two", "layers=two"),
                        ("tie_embeddings=maybe", "true or false"), ("attn_impl=cuda", "one of"),
                        ("dtype=bfloat16", "set by --dtype")):
        with pytest.raises(ValueError, match=match):
            parse_model_args(text, gpt, reserved={"dtype": "--dtype"})


def test_model_args_cli_builds_and_reloads_the_model(tmp_path, capsys):
    from jaxattn.generate import load_trained
    from jaxattn.train.__main__ import main as train_main

    out = tmp_path / "run"
    args = "layers=2 layer_types=power,full sparse_block=16 window=32 sink=16"
    assert train_main(["lm", "--model", "gpt-tiny", "--model-args", args, "--steps", "2", "--seq-len", "32",
                       "--batch-size", "2", "--max-bytes", "50000", "--eval-every", "0", "--out", str(out),
                       "--sample-tokens", "4", "--no-progress", "--attn-impl", "xla"]) == 0
    model, cfg, step, _ = load_trained(out)
    assert (model.cfg.layers, model.cfg.layer_types, model.cfg.window) == (2, ("power", "full"), 32)
    with pytest.raises(SystemExit):
        train_main(["lm", "--model", "gpt-tiny", "--model-args", "vocab_size=300", "--out", str(tmp_path / "x")])
    assert "vocab_size is set by the data" in capsys.readouterr().err


def test_document_starts_and_batches_with_documents(tmp_path):
    """Corpora know where documents start (text files; tokens after --doc-sep), split between train
    and validation; get_batch then gives each token's document, counted from 0 per window."""
    (tmp_path / "a.txt").write_bytes(b"a" * 300)
    (tmp_path / "b.txt").write_bytes(b"b" * 500)
    (tmp_path / "c.txt").write_bytes(b"c" * 200)
    c = load_corpus(str(tmp_path), val_fraction=0.25)  # 1000 bytes: train 750, val 250
    np.testing.assert_array_equal(c.train_docs, [0, 300])
    np.testing.assert_array_equal(c.val_docs, [0, 50])  # (b's tail, then c at 800 - 750)
    x = get_batch(c.train, seed=0, step=0, batch=64, seq_len=40, docs=c.train_docs)
    assert x.shape == (64, 2, 41) and x.dtype == np.int32
    toks, seg = x[:, 0], x[:, 1]
    assert (seg[:, 0] == 0).all() and (np.diff(seg, axis=1) >= 0).all()
    # a document changes exactly where the byte changes (a -> b)
    np.testing.assert_array_equal(np.diff(seg, axis=1) > 0, np.diff(toks, axis=1) != 0)
    assert (np.diff(seg, axis=1) > 0).any()
    np.testing.assert_array_equal(toks, get_batch(c.train, seed=0, step=0, batch=64, seq_len=40))
    stdlib = load_corpus(max_bytes=200_000)
    assert len(stdlib.train_docs) > 5 and stdlib.train_docs[0] == 0 and stdlib.val_docs[0] == 0
    # token files: documents after each separator
    np.save(tmp_path / "t.npy", np.array([5, 1, 2, 0, 3, 0, 4, 4, 4, 0, 6, 7] * 10))
    t = load_corpus(str(tmp_path / "t.npy"), doc_sep=0, val_fraction=0.25)
    np.testing.assert_array_equal(t.train_docs[:4], [0, 4, 6, 10])
    assert load_corpus(str(tmp_path / "t.npy")).train_docs is None
    with pytest.raises(ValueError, match="--doc-sep 99: not a token id"):
        load_corpus(str(tmp_path / "t.npy"), doc_sep=99)


def test_doc_mask_training_and_refusals(tmp_path):
    """--doc-mask trains GPT and TNL on packed stdlib files (the loss falls); it names what it needs."""
    for model in ("gpt-tiny", "tnl-tiny"):
        out = train(cfg(tmp_path / model, model=model, doc_mask=True, steps=8, eval_every=4, ckpt_every=8,
                        model_args="dim=32 layers=2"), progress=False, sample=False)
        assert out["val_losses"][-1] < out["val_losses"][0]
    with pytest.raises(ValueError, match="--doc-sep marks documents for --doc-mask"):
        train(cfg(tmp_path, doc_sep=0), progress=False)
    np.save(tmp_path / "t.npy", np.arange(3000) % 50)
    with pytest.raises(ValueError, match="has no document boundaries .* give --doc-sep"):
        train(cfg(tmp_path, data=str(tmp_path / "t.npy"), doc_mask=True), progress=False)
    with pytest.raises(ValueError, match="LandmarkGPT .* takes no segment_ids"):
        train(cfg(tmp_path, model="landmark-gpt-tiny", doc_mask=True, vocab_size=300), progress=False)
    with pytest.raises(ValueError, match=r"\['power'\] attention layers"):
        train(cfg(tmp_path, model="power-gpt-tiny", doc_mask=True), progress=False)


def test_doc_loss_mask_skips_targets_that_begin_a_document(tmp_path):
    """--doc-loss-mask averages the cross-entropy over targets in the input token's own document
    (checked against log-softmax by hand); without --doc-mask the model sees the row whole; the
    trainer runs it on token files split at --doc-sep."""
    import jax.numpy as jnp

    from jaxattn.train.lm import lm_loss

    model = create_model("gpt-tiny", rngs=nnx.Rngs(0), vocab_size=50, dim=32, layers=1, heads=2)
    tokens = np.random.default_rng(0).integers(0, 50, (2, 13)).astype(np.int32)
    docs = np.array([[0] * 5 + [1] * 6 + [2] * 2, [0] * 13], np.int32)
    batch = jnp.asarray(np.stack([tokens, docs], 1))
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens[:, :-1])), -1))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    keep = docs[:, 1:] == docs[:, :-1]
    assert keep.sum() == 22  # the two boundaries of row 0 are skipped
    np.testing.assert_allclose(lm_loss(model, batch, doc_mask=False, doc_loss_mask=True), nll[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(lm_loss(model, batch, doc_mask=False), nll.mean(), rtol=1e-5)
    masked = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens[:, :-1]), segment_ids=jnp.asarray(docs[:, :-1])), -1))
    nll_doc = -np.take_along_axis(masked, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lm_loss(model, batch, doc_loss_mask=True), nll_doc[keep].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="doc_loss_mask needs a batch with document ids"):
        lm_loss(model, jnp.asarray(tokens), doc_loss_mask=True)

    np.save(tmp_path / "t.npy", (np.arange(3000) * 7) % 50)
    out = train(cfg(tmp_path, model="gpt-tiny", data=str(tmp_path / "t.npy"), doc_sep=0, doc_loss_mask=True,
                    model_args="dim=32 layers=1", steps=4, eval_every=4, ckpt_every=4), progress=False, sample=False)
    assert np.isfinite(out["val_losses"]).all()
    with pytest.raises(ValueError, match="--doc-loss-mask: .* has no document boundaries"):
        train(cfg(tmp_path, data=str(tmp_path / "t.npy"), doc_loss_mask=True), progress=False)
