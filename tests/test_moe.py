"""Mixture-of-experts MLP (jaxattn.models.moe) against the dense fp32 oracle (jaxattn.reference.moe), forward and
gradients, both dispatches; routing, the load-balance loss, gpt-oss's clamped GLU, MXFP4 dequantization, and
the MoE GPT (decoding, training). The Hugging Face layouts (gpt-oss, Mixtral, Qwen3-MoE) are in test_gpt_hf."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, count_triton_calls, lower_for_cuda
from jaxattn.models import create_model
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.moe import MoE, gated_act, moe_dispatch, route
from jaxattn.models.moe_hf import FP4_VALUES, MXFP4StateDict, dequantize_mxfp4
from jaxattn.pallas._common import compile_for_gpu
from jaxattn.reference import moe_reference

# (rtol, atol) by compute dtype, of the output's scale
TOL = {jnp.dtype(jnp.float32): (2e-5, 2e-5), jnp.dtype(jnp.bfloat16): (3e-2, 3e-2)}
GRAD_TOL = {jnp.dtype(jnp.float32): (1e-4, 1e-4), jnp.dtype(jnp.bfloat16): (6e-2, 6e-2)}


def make(dim=16, hidden=24, experts=6, top_k=2, *, act="silu", bias=False, renormalize=True, impl="ragged",
         dtype=jnp.float32, seed=0):
    m = MoE(dim, hidden, experts, top_k, act=act, limit=0.6, bias=bias, renormalize=renormalize, impl=impl,
            dtype=dtype, init_std=0.4, rngs=nnx.Rngs(seed))
    if bias:  # (zeros at init: give them values, so that a dropped bias shows)
        for i, p in enumerate((m.router.bias, m.gate_up_bias, m.down_bias)):
            p[...] = 0.5 * jax.random.normal(jax.random.key(seed + 10 + i), p.shape)
    return m


def params(m):
    out = dict(router=m.router.kernel[...], gate_up=m.gate_up[...], down=m.down[...])
    if m.gate_up_bias is not None:
        out.update(router_bias=m.router.bias[...], gate_up_bias=m.gate_up_bias[...], down_bias=m.down_bias[...])
    return out


def oracle(m, x, p):
    return moe_reference(x.reshape(-1, x.shape[-1]), p["router"], p["gate_up"], p["down"], top_k=m.top_k,
                         router_bias=p.get("router_bias"), gate_up_bias=p.get("gate_up_bias"),
                         down_bias=p.get("down_bias"), renormalize=m.renormalize, act=m.act, limit=m.limit)


_slow = functools.partial(pytest.param, marks=pytest.mark.slow)
CASES = [  # (act, bias, renormalize, impl, dtype, tokens, experts, top_k)
    _slow("silu", False, True, "ragged", jnp.float32, 13, 6, 2),
    _slow("silu", False, True, "gather", jnp.float32, 13, 6, 2),
    _slow("gpt_oss", True, True, "ragged", jnp.float32, 21, 5, 3),
    _slow("gpt_oss", True, True, "gather", jnp.bfloat16, 9, 4, 2),
    _slow("silu", True, False, "ragged", jnp.bfloat16, 17, 7, 1),
    ("silu", False, False, "auto", jnp.float32, 2, 8, 4),  # (auto: gathers)
    ("gpt_oss", True, True, "pallas", jnp.float32, 19, 5, 2),  # the grouped matmul kernel (interpret mode)
    _slow("silu", False, True, "pallas", jnp.bfloat16, 33, 4, 3),
]


@pytest.mark.parametrize("act,bias,renorm,impl,dtype,t,e,k", CASES)
def test_matches_the_dense_oracle_forward_and_gradients(act, bias, renorm, impl, dtype, t, e, k):
    m = make(experts=e, top_k=k, act=act, bias=bias, renormalize=renorm, impl=impl, dtype=dtype, seed=t)
    x = jax.random.normal(jax.random.key(t), (1, t, 16))
    got = m(x.astype(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    want = oracle(m, x.astype(dtype), params(m))
    assert_close(got.reshape(-1, 16), want, dtype, f"{act} {impl} forward", tol=TOL)
    ct = jax.random.normal(jax.random.key(t + 1), x.shape)
    graph, state = nnx.split(m)

    def ours(x, state):
        return jnp.sum(nnx.merge(graph, state)(x.astype(dtype)).astype(jnp.float32) * ct)

    def ref(x, p):
        return jnp.sum(oracle(m, x.astype(dtype).astype(jnp.float32), p).reshape(ct.shape) * ct)

    p = params(m)
    gx, gs = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, state)  # (jitted: interpret-mode kernels run faster)
    g_ours = {"_".join(str(k) for k in path if k != "kernel"): v.get_value() for path, v in nnx.to_flat_state(gs)}
    g_ref = jax.grad(ref, argnums=(0, 1))(x, p)
    assert_close(gx, g_ref[0], dtype, "dx", tol=GRAD_TOL)
    for name in p:
        assert_close(g_ours[name], g_ref[1][name], dtype, f"d{name}", tol=GRAD_TOL)
        assert np.abs(np.asarray(g_ref[1][name])).max() > 0  # (every weight takes part)


def test_routing_weights_and_choices():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0], [5.0, 5.0, -1.0, 0.0]])
    w, idx, probs = route(logits, 2, renormalize=True)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 3], [0, 1]])
    np.testing.assert_allclose(np.asarray(w), [[1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(1.0))], [0.5, 0.5]], rtol=1e-6)
    w2, _, _ = route(logits, 2, renormalize=False)  # the full softmax's values there
    np.testing.assert_allclose(np.asarray(w2), np.take_along_axis(np.asarray(probs), np.asarray(idx), 1), rtol=1e-6)
    assert np.all(np.asarray(w2).sum(-1) < 1)


def test_gpt_oss_activation_clamps():
    g, u = jnp.asarray([-2.0, 0.5, 9.0]), jnp.asarray([8.0, -0.5, -9.0])
    got = gated_act(g, u, "gpt_oss", 7.0)
    gc, uc = np.minimum([-2.0, 0.5, 9.0], 7.0), np.clip([8.0, -0.5, -9.0], -7.0, 7.0)
    np.testing.assert_allclose(np.asarray(got), (uc + 1) * gc / (1 + np.exp(-1.702 * gc)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gated_act(g, u, "silu")), np.asarray(jax.nn.silu(g) * u), rtol=1e-6)


def test_load_balance_loss_is_sown_only_while_captured():
    m = make(experts=4, top_k=2)
    m.router.kernel[...] = jnp.zeros_like(m.router.kernel[...])  # uniform probabilities: the loss is top_k
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    m(x)
    assert not [p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Intermediate))]  # plain calls add no state
    _, inter = nnx.capture(m, nnx.Intermediate)(x)
    (val,) = [v for p, var in nnx.to_flat_state(inter) if p[-1] == "aux_loss" for v in var.get_value()]
    np.testing.assert_allclose(float(val), 2.0, rtol=1e-6)


def test_dispatches_agree_and_bad_arguments():
    m = make(experts=5, top_k=2, bias=True, act="gpt_oss")
    x = jax.random.normal(jax.random.key(3), (11, 16))
    w, idx, _ = m.route(x)
    p = params(m)
    outs = [moe_dispatch(x, w, idx, p["gate_up"], p["down"], p["gate_up_bias"], p["down_bias"], act="gpt_oss",
                         limit=0.6, impl=impl) for impl in ("ragged", "gather")]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl must be"):
        moe_dispatch(x, w, idx, p["gate_up"], p["down"], impl="dense")
    with pytest.raises(ValueError, match="top_k <= experts"):
        MoE(16, 8, 2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="act must be one of"):
        MoE(16, 8, 4, 2, act="tanh", rngs=nnx.Rngs(0))
    for kw, match in [(dict(moe_experts=4, moe_top_k=5), "moe_top_k"), (dict(moe_experts=-1), "moe_experts"),
                      (dict(mlp_act="gpt_oss", mlp_gated=False), "gates"), (dict(moe_impl="dense"), "moe_impl"),
                      (dict(moe_experts=4, mlp_gated=False), "gated MLPs"), (dict(mlp_limit=0.0), "mlp_limit"),
                      (dict(moe_aux_loss=-1.0), "moe_aux_loss"), (dict(moe_shared_dim=8), "shared expert")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**kw)


def test_mxfp4_dequantization():
    """Each byte holds two e2m1 values, the low nibble first; each block of 32 is scaled by 2^(scale - 127)."""
    blocks = np.zeros((1, 2, 16), np.uint8)
    blocks[0, 0, 0] = 0x21  # low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[0, 1, 15] = 0xF7  # low 7 (6.0), high 15 (-6.0)
    scales = np.asarray([[128, 125]], np.uint8)  # x2, x1/4
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (1, 64) and out.dtype == np.float32
    want = np.zeros(64, np.float32)
    want[:2] = [1.0, 2.0]
    want[62:] = [1.5, -1.5]
    np.testing.assert_array_equal(out[0], want)
    assert list(FP4_VALUES[[0, 7, 8, 15]]) == [0.0, 6.0, -0.0, -6.0]
    with pytest.raises(ValueError, match="MXFP4 blocks must be uint8"):
        dequantize_mxfp4(blocks.astype(np.int8), scales)
    # a state_dict view: name_blocks + name_scales read as name, [experts, in, out]
    rng = np.random.default_rng(0)
    sd = {"a.gate_up_proj_blocks": rng.integers(0, 256, (3, 6, 2, 16), dtype=np.uint8),
          "a.gate_up_proj_scales": rng.integers(120, 130, (3, 6, 2), dtype=np.uint8), "b": np.ones(2)}
    view = MXFP4StateDict(sd)
    assert sorted(view) == ["a.gate_up_proj", "b"] and len(view) == 2
    w = view["a.gate_up_proj"]
    assert w.shape == (3, 64, 6)
    np.testing.assert_array_equal(w[1, :, 4], dequantize_mxfp4(sd["a.gate_up_proj_blocks"], sd["a.gate_up_proj_scales"])[1, 4])
    with pytest.raises(KeyError):
        view["a.gate_up_proj_blocks"]


def test_gpt_oss_folder_with_mxfp4_experts(tmp_path):
    """A gpt-oss folder whose experts are MXFP4 (as released) loads to the same model as its dequantized
    twin, in bf16 parameters when asked."""
    import json

    from jaxattn.models.hf import load_pretrained
    from jaxattn.models.safetensors_io import write_safetensors
    from test_gpt_hf import GPT_OSS, TOKENS, random_hf_state_dict

    raw = {**GPT_OSS, "hidden_size": 64, "intermediate_size": 32}  # (MXFP4 blocks of 32 along each input)
    sd = random_hf_state_dict(raw, seed=2)
    rng = np.random.default_rng(1)
    packed, plain = dict(sd), dict(sd)
    for i in range(raw["num_hidden_layers"]):
        for name, (rows, cols) in (("gate_up_proj", (64, 64)), ("down_proj", (64, 32))):
            key = f"model.layers.{i}.mlp.experts.{name}"
            del packed[key]
            blocks = rng.integers(0, 256, (4, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(122, 127, (4, rows, cols // 32), dtype=np.uint8)
            packed.update({key + "_blocks": blocks, key + "_scales": scales})
            plain[key] = np.swapaxes(dequantize_mxfp4(blocks, scales), 1, 2)
    for name, state in (("packed", packed), ("plain", plain)):
        (tmp_path / name).mkdir()
        cfg = {**raw, **({"quantization_config": {"quant_method": "mxfp4"}} if name == "packed" else {})}
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        write_safetensors(tmp_path / name / "model.safetensors", state)
    a = load_pretrained(tmp_path / "packed", attn_impl="xla")
    b = load_pretrained(tmp_path / "plain", attn_impl="xla")
    np.testing.assert_array_equal(np.asarray(a(jnp.asarray(TOKENS))), np.asarray(b(jnp.asarray(TOKENS))))
    half = load_pretrained(tmp_path / "packed", attn_impl="xla", param_dtype="bfloat16")
    assert half.blocks[0].mlp.gate_up[...].dtype == jnp.bfloat16
    from test_gpt_hf import reference_logits

    assert_close(a(jnp.asarray(TOKENS)), reference_logits(plain, raw, TOKENS), jnp.float32, "mxfp4 gpt-oss logits",
                 tol={jnp.dtype(jnp.float32): (3e-4, 3e-4)})


@pytest.mark.slow  # (gather and grouped dispatches agree: test_dispatches_agree_and_bad_arguments)
@pytest.mark.parametrize("name", ["gpt-oss-tiny", "moe-gpt-tiny"])
def test_moe_gpt_decodes_as_its_forward(name):
    """Prefill (ragged dispatch over the prompt) and token-by-token decoding (gathered experts) give the
    parallel forward's logits, on the flash / decode kernels (interpret mode)."""
    cfg = dataclasses.replace(create_model(name, rngs=nnx.Rngs(0)).cfg, attn_impl="pallas", layers=2, window=6,
                              init_std=0.2, dim=64, heads=2, kv_heads=1, mlp_dim=32)
    model = GPT(cfg, rngs=nnx.Rngs(1))
    if cfg.attn_sinks:
        for blk in model.blocks:
            blk.attn.sinks[...] = jnp.linspace(-1.0, 2.0, cfg.heads)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    full = model(tokens)
    logits, cache = model.prefill(tokens[:, :7], max_len=11)
    assert_close(logits, full[:, 6], jnp.float32, "prefill", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})
    for t in range(7, 11):
        logits, cache = model.decode_step(tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


def test_moe_gpt_training_step_balances():
    """The LM loss adds the layers' mean load-balance loss (times moe_aux_loss) and reports it; the router,
    experts and sinks all get gradients."""
    from jaxattn.train.lm import lm_loss

    cfg = dataclasses.replace(create_model("gpt-oss-tiny", rngs=nnx.Rngs(0)).cfg, layers=2, attn_impl="xla",
                              moe_aux_loss=0.5)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    loss, metrics = lm_loss(model, batch)
    plain = lm_loss(model, batch, aux_loss=False)
    assert 0.5 * 2 * 0.9 < float(metrics["aux_loss"]) < 0.5 * 8  # (0.5 x a balance loss near top_k = 2)
    np.testing.assert_allclose(float(loss), float(plain + metrics["aux_loss"]), rtol=1e-6)
    grads = nnx.jit(nnx.grad(lambda m: lm_loss(m, batch)[0]))(model)
    mlp, attn = grads.blocks[0].mlp, grads.blocks[0].attn
    for g in (mlp.router.kernel, mlp.router.bias, mlp.gate_up, mlp.down, mlp.gate_up_bias, attn.sinks):
        assert np.abs(np.asarray(g[...])).max() > 0


@pytest.mark.slow  # (the grouped matmul kernels' own lowering: test_grouped_matmul)
def test_moe_gpt_training_step_lowers_for_cuda():
    """The MoE GPT's training step lowers for CUDA: XLA's ragged_dot off a GPU, the grouped matmul kernels
    (and the flash kernels) on one."""
    from jaxattn.train.lm import lm_loss

    cfg = dataclasses.replace(create_model("gpt-oss-tiny", rngs=nnx.Rngs(0)).cfg, layers=2, attn_impl="xla")
    batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    graph, state = nnx.split(GPT(dataclasses.replace(cfg, attn_impl="pallas", dtype="bfloat16"), rngs=nnx.Rngs(0)))

    def step(state, tokens):
        return jax.grad(lambda s: lm_loss(nnx.merge(graph, s), tokens)[0])(state)

    off = lower_for_cuda(step, state, batch)
    assert "ragged_dot" in off  # (auto off a GPU: XLA's ragged_dot)
    with compile_for_gpu():  # on a GPU: the grouped matmul kernels, 2 per layer forward, 4 backward
        text = lower_for_cuda(lambda s, t: step(s, t), state, batch)  # (a fresh trace)
    assert "ragged_dot" not in text
    # per layer: flash forward, dq, dk/dv, and the grouped matmuls' 2 forward + 4 backward
    assert count_triton_calls(off) == 0 and count_triton_calls(text) == cfg.layers * (3 + 6)


def test_gpt_oss_greedy_generation_matches_transformers(tmp_path):
    """A gpt-oss folder written by transformers: our greedy decoding (prefill, then gathered experts, sinks
    and the sliding window from the cache) gives transformers' own ``generate`` tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxattn.models import generate
    from jaxattn.models.hf import load_pretrained

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=3)
    ref = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ref.save_pretrained(tmp_path)
    prompt = np.asarray([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(prompt), max_new_tokens=8, do_sample=False).numpy()
    model = load_pretrained(tmp_path, attn_impl="xla")
    got = generate(model, jnp.asarray(prompt), max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(got), want)
