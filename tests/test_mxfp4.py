"""MXFP4 weights (jaxattn.ops.mxfp4): the packed layout and rounding checked by hand, gpt-oss's layout
converted both ways without loss, the grouped matmul kernel on packed weights (interpret mode) against the
dense oracle on the dequantized matrices, forward and the lhs gradient; CUDA lowering; MoE layers and GPT
models that keep their experts packed (routing, training the rest, Hugging Face folders in and out)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SLOW_OFF_GPU, assert_close, count_triton_calls, lower_for_cuda
from jaxattn import grouped_matmul
from jaxattn.models import create_model
from jaxattn.models.gpt import GPT, GPTConfig
from jaxattn.models.moe import MoE, MXFP4Weight
from jaxattn.models.moe_hf import dequantize_mxfp4, hf_to_packed, packed_to_hf
from jaxattn.ops.mxfp4 import FP4_VALUES, MXFP4, dequantize, packed_rows, quantize_mxfp4
from jaxattn.pallas._common import compile_for_gpu, poison_outputs
from jaxattn.reference import grouped_matmul_reference, moe_reference

TOL = {jnp.dtype(jnp.float32): (1e-5, 1e-5), jnp.dtype(jnp.bfloat16): (1.5e-2, 1.5e-2),
       jnp.dtype(jnp.float16): (4e-3, 4e-3)}
GRID = np.array(sorted(set(np.abs(FP4_VALUES))), np.float32)  # 0, 0.5, ..., 6


def test_packed_layout_by_hand():
    """Row 16 g + i holds rows 32 g + i (low nibble) and 32 g + 16 + i (high nibble); row K/2 + g the scale."""
    w = np.zeros((64, 2), np.float32)
    w[0, 0], w[16, 0], w[5, 0] = 3.0, -0.25, 1.0  # amax 3 = 6 * 2^-1: scale code 126, codes 7, 9 (-0.5), 4 (2)
    w[40, 1] = 0.75  # group 1, column 1: 6 * 2^-3, code 7 at row 16 + 8 (low nibble), scale code 124
    packed = np.asarray(quantize_mxfp4(jnp.asarray(w)).packed)
    assert packed.shape == (34, 2) and packed.dtype == np.uint8 and packed_rows(64) == 34
    want = np.zeros((34, 2), np.uint8)
    want[0, 0], want[5, 0], want[32, 0] = 7 | (9 << 4), 4, 126
    want[24, 1], want[33, 1] = 7, 124
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(np.asarray(dequantize(MXFP4(jnp.asarray(packed)))), w)
    assert MXFP4(jnp.asarray(packed)).shape == (64, 2)


def test_rounding_is_nearest_ties_to_even_without_saturation():
    # a 6 fixes the scale at 1; the midpoints between FP4 values go to the even code
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]
    col = np.zeros(32, np.float32)
    col[0], col[1:1 + len(mids)] = 6.0, mids
    got = np.asarray(dequantize(quantize_mxfp4(jnp.asarray(col)[:, None])))[:, 0]
    np.testing.assert_array_equal(got[1:1 + len(mids)], want)
    # random groups: the least power-of-two scale with amax <= 6 s, then the nearest grid value
    w = np.asarray(jax.random.normal(jax.random.key(0), (2, 96, 7)) * jnp.exp(jax.random.normal(jax.random.key(1), (2, 96, 7))))
    q = quantize_mxfp4(jnp.asarray(w))
    deq = np.asarray(dequantize(q))
    scale = np.ldexp(1.0, np.asarray(q.packed[:, 48:], np.int32) - 127)  # [2, 3, 7]
    amax = np.abs(w.reshape(2, 3, 32, 7)).max(2)
    assert (amax <= 6 * scale).all() and (amax > 3 * scale).all()
    s = np.repeat(scale, 32, axis=1)
    err = np.abs(deq - w)
    best = np.abs(np.abs(w)[..., None] - GRID * s[..., None]).min(-1)
    np.testing.assert_allclose(err, best, rtol=0, atol=1e-6 * np.abs(w).max())


def test_representable_weights_round_trip_bit_exactly():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (3, 64, 5))
    codes[:, ::32] = rng.choice([7, 15], (3, 2, 5))  # a +-6 in every group: its scale is the group's
    scale = rng.integers(110, 140, (3, 2, 5))
    w = FP4_VALUES[codes] * np.ldexp(1.0, np.repeat(scale, 32, axis=1) - 127)
    q = quantize_mxfp4(jnp.asarray(w, jnp.float32))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), w.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(q.packed[:, 32:]), scale)


def test_gpt_oss_layout_converts_both_ways_losslessly():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (3, 10, 4, 16), dtype=np.uint8)  # [E, out, in / 32, 16]
    scales = rng.integers(100, 150, (3, 10, 4), dtype=np.uint8)
    packed = hf_to_packed(blocks, scales)
    assert packed.shape == (3, packed_rows(128), 10) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(dequantize(MXFP4(jnp.asarray(packed)))),
                                  np.swapaxes(dequantize_mxfp4(blocks, scales), 1, 2))
    b2, s2 = packed_to_hf(packed)
    np.testing.assert_array_equal(b2, blocks)
    np.testing.assert_array_equal(s2, scales)


def _weights(e, k, n, seed):
    return quantize_mxfp4(jax.random.normal(jax.random.key(seed), (e, k, n)))


_slow = functools.partial(pytest.param, marks=pytest.mark.slow)
CASES = [  # (rows, K, N, group sizes, dtype)
    (37, 64, 48, [5, 0, 20, 10], jnp.float32),  # 2 rows of no group at the end, an empty group
    (70, 96, 40, [0, 1, 60, 6], jnp.bfloat16),  # 3 scale groups (odd), N padded to 48, a leading empty group
    _slow(40, 256, 128, [40], jnp.float16),
    _slow(9, 32, 16, [3, 0, 0], jnp.bfloat16),  # one scale group, 6 trailing rows
]


@pytest.mark.parametrize("m,k,n,sizes,dtype", CASES)
def test_grouped_matmul_on_packed_weights_matches_the_oracle(m, k, n, sizes, dtype):
    w = _weights(len(sizes), k, n, m)
    lhs = jax.random.normal(jax.random.key(m + 1), (m, k)).astype(dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jax.random.normal(jax.random.key(m + 2), (m, n))
    dense = dequantize(w)  # (exact: the oracle multiplies the same matrices in fp32)
    with poison_outputs():
        out = grouped_matmul(lhs, w, gs, preferred_element_type=jnp.float32, impl="pallas")
        low = grouped_matmul(lhs, w, gs, impl="pallas")
    want = grouped_matmul_reference(lhs, dense, gs)
    assert out.dtype == jnp.float32 and low.dtype == dtype
    assert_close(out, want, dtype, "forward", tol=TOL)
    assert_close(low, want, dtype, "forward in the input dtype", tol=TOL)
    assert not np.asarray(out[sum(sizes):]).any()
    assert_close(grouped_matmul(lhs, w, gs, preferred_element_type=jnp.float32, impl="xla"), want, dtype, "xla", tol=TOL)

    def loss(impl, a):
        return jnp.sum(grouped_matmul(a, w, gs, preferred_element_type=jnp.float32, impl=impl) * ct)

    with poison_outputs():
        got = jax.grad(functools.partial(loss, "pallas"))(lhs)
    exp = jax.grad(lambda a: jnp.sum(grouped_matmul_reference(a, dense, gs) * ct))(lhs.astype(jnp.float32))
    assert got.dtype == dtype
    assert_close(got, exp, dtype, "dlhs", tol=TOL)
    assert_close(jax.grad(functools.partial(loss, "xla"))(lhs), exp, dtype, "dlhs xla", tol=TOL)


def test_packed_grouped_matmul_lowers_for_cuda():
    w = _weights(4, 64, 128, 0)
    lhs = jnp.ones((100, 64), jnp.bfloat16)
    gs = jnp.asarray([0, 64, 30, 6], jnp.int32)

    def step(lhs):
        return jax.value_and_grad(lambda a: jnp.sum(grouped_matmul(a, w, gs, preferred_element_type=jnp.float32)))(lhs)

    with compile_for_gpu():
        text = lower_for_cuda(step, lhs)
    assert count_triton_calls(text) == 2 and "ragged_dot" not in text  # forward and dlhs
    # decoding one token: packed experts stay packed in the kernel on a GPU (dequantized gathers elsewhere)
    m = MoE(64, 64, 8, 2, expert_format="mxfp4", rngs=nnx.Rngs(0))
    graph, state = nnx.split(m)
    one = jnp.ones((1, 64), jnp.bfloat16)
    assert count_triton_calls(lower_for_cuda(lambda s, x: nnx.merge(graph, s)(x), state, one)) == 0
    with compile_for_gpu():
        assert count_triton_calls(lower_for_cuda(lambda s, x: nnx.merge(graph, s)(x), state, one)) == 2


def test_bad_input():
    lhs, gs = jnp.ones((9, 64)), jnp.asarray([4, 5], jnp.int32)
    w = _weights(2, 64, 16, 0)
    for args, match in [((lhs[:, :32], w, gs), "contraction size K = 64"),
                        ((lhs, MXFP4(w.packed.astype(jnp.int8)), gs), "packed uint8"),
                        ((lhs, MXFP4(w.packed[:, :30]), gs), "17 \\* K / 32 rows")]:
        with pytest.raises(ValueError, match=match):
            grouped_matmul(*args)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(jnp.ones((48, 4)))
    with pytest.raises(ValueError, match="dim \\(16\\) and hidden \\(24\\) must be multiples of 32"):
        MoE(16, 24, 4, 2, expert_format="mxfp4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expert_format"):
        MoE(32, 32, 4, 2, expert_format="int4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="moe_format='mxfp4'"):
        GPTConfig(vocab_size=16, dim=48, heads=2, layers=1, moe_experts=4, mlp_dim=64, moe_format="mxfp4")


@pytest.mark.parametrize("impl,tokens", [pytest.param("pallas", 23, marks=SLOW_OFF_GPU), _slow("gather", 3),
                                         _slow("ragged", 23)])
def test_moe_layer_with_packed_experts(impl, tokens):
    """An MXFP4 MoE layer gives the dense oracle's output on its dequantized experts, forward and the gradients
    of its input and router; its experts are constants the optimizer leaves alone."""
    m = MoE(32, 64, 5, 2, act="gpt_oss", limit=0.8, bias=True, impl=impl, init_std=0.3, expert_format="mxfp4",
            rngs=nnx.Rngs(0))
    m.gate_up_bias[...] = 0.3 * jax.random.normal(jax.random.key(5), m.gate_up_bias.shape)
    assert isinstance(m.gate_up, MXFP4Weight) and m.gate_up[...].dtype == jnp.uint8
    assert m.gate_up[...].shape == (5, packed_rows(32), 128) and m.down[...].shape == (5, packed_rows(64), 32)
    x = jax.random.normal(jax.random.key(1), (tokens, 32))
    ct = jax.random.normal(jax.random.key(2), (tokens, 32))

    graph, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(x, p):
        return jnp.sum(nnx.merge(graph, p, rest)(x) * ct)

    def ref(x, router):
        out = moe_reference(x, router, dequantize(MXFP4(m.gate_up[...])), dequantize(MXFP4(m.down[...])), top_k=2,
                            router_bias=m.router.bias[...], gate_up_bias=m.gate_up_bias[...],
                            down_bias=m.down_bias[...], act="gpt_oss", limit=0.8)
        return jnp.sum(out * ct)

    with poison_outputs():
        value, (dx, dp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, params)
    got = (value, (dx, dp["router"]["kernel"][...]))
    want = jax.value_and_grad(ref, argnums=(0, 1))(x, m.router.kernel[...])
    tol = {jnp.dtype(jnp.float32): (1e-4, 1e-4)}
    assert_close(got[0], want[0], jnp.float32, "loss", tol=tol)
    assert_close(got[1][0], want[1][0], jnp.float32, "dx", tol=tol)
    assert_close(got[1][1], want[1][1], jnp.float32, "drouter", tol=tol)


@pytest.mark.slow  # (18 s: the suite's budget)
def test_packed_gpt_trains_the_rest_and_matches_its_dequantized_twin():
    import optax

    cfg = dataclasses.replace(create_model("gpt-oss-tiny", rngs=nnx.Rngs(0)).cfg, layers=1, attn_impl="xla",
                              moe_format="mxfp4")
    packed = GPT(cfg, rngs=nnx.Rngs(0))
    twin = GPT(dataclasses.replace(cfg, moe_format="float"), rngs=nnx.Rngs(0))
    for a, b in zip(packed.blocks, twin.blocks):
        b.mlp.gate_up[...] = dequantize(MXFP4(a.mlp.gate_up[...]))
        b.mlp.down[...] = dequantize(MXFP4(a.mlp.down[...]))
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    forward = nnx.jit(lambda m, t: m(t))
    assert_close(forward(packed, tokens), forward(twin, tokens), jnp.float32, "logits",
                 tol={jnp.dtype(jnp.float32): (1e-5, 1e-5)})
    before = np.asarray(packed.blocks[0].mlp.gate_up[...])
    opt = nnx.Optimizer(packed, optax.adam(1e-2), wrt=nnx.Param)
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2)))(packed)
    assert not any(isinstance(v, MXFP4Weight) for _, v in nnx.iter_graph(grads))
    opt.update(packed, grads)
    np.testing.assert_array_equal(np.asarray(packed.blocks[0].mlp.gate_up[...]), before)
    assert not np.allclose(np.asarray(packed.blocks[0].mlp.router.kernel[...]),
                           np.asarray(twin.blocks[0].mlp.router.kernel[...]))


@pytest.mark.slow  # (a 120B model's abstract shapes)
def test_gpt_oss_120b_fits_one_80gb_gpu_with_packed_experts():
    """Abstract shapes only: gpt-oss-120b's parameters, packed experts and bf16 for the rest, stay under 66 GB."""
    model = nnx.eval_shape(lambda: create_model("gpt-oss-120b", rngs=nnx.Rngs(0), moe_format="mxfp4"))
    total = 0
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Variable) and hasattr(v.get_value(), "shape"):
            value = v.get_value()
            total += int(np.prod(value.shape)) * (1 if value.dtype == jnp.uint8 else 2)
    assert 60e9 < total < 66e9, total


def _gpt_oss_folder(tmp_path, seed=2):
    from jaxattn.models.safetensors_io import write_safetensors
    from test_gpt_hf import GPT_OSS, random_hf_state_dict

    raw = {**GPT_OSS, "hidden_size": 64, "intermediate_size": 32,
           "quantization_config": {"quant_method": "mxfp4"}}
    sd = random_hf_state_dict(raw, seed=seed)
    rng = np.random.default_rng(seed)
    for i in range(raw["num_hidden_layers"]):
        for name, (rows, cols) in (("gate_up_proj", (64, 64)), ("down_proj", (64, 32))):
            key = f"model.layers.{i}.mlp.experts.{name}"
            del sd[key]
            sd[key + "_blocks"] = rng.integers(0, 256, (4, rows, cols // 32, 16), dtype=np.uint8)
            sd[key + "_scales"] = rng.integers(122, 127, (4, rows, cols // 32), dtype=np.uint8)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    write_safetensors(tmp_path / "model.safetensors", sd)
    return raw, sd


def test_gpt_oss_folder_keeps_its_packed_experts_in_and_out(tmp_path):
    """A released-style gpt-oss folder loads with moe_format='mxfp4' byte for byte (the same logits as the
    dequantized model) and saves back the same *_blocks / *_scales with gpt-oss's quantization_config."""
    from jaxattn.models.hf import load_pretrained, save_pretrained
    from jaxattn.models.safetensors_io import read_safetensors

    raw, sd = _gpt_oss_folder(tmp_path / "in")
    packed = load_pretrained(tmp_path / "in", attn_impl="xla", moe_format="mxfp4")
    plain = load_pretrained(tmp_path / "in", attn_impl="xla")
    mlp = packed.blocks[1].mlp
    assert isinstance(mlp.down, MXFP4Weight)
    np.testing.assert_array_equal(np.asarray(mlp.down[...]), hf_to_packed(sd["model.layers.1.mlp.experts.down_proj_blocks"],
                                                                        sd["model.layers.1.mlp.experts.down_proj_scales"]))
    from test_gpt_hf import TOKENS

    tokens = jnp.asarray(TOKENS)
    assert_close(packed(tokens), plain(tokens), jnp.float32, "logits", tol={jnp.dtype(jnp.float32): (1e-5, 1e-5)})
    save_pretrained(packed, tmp_path / "out")
    out = read_safetensors(tmp_path / "out" / "model.safetensors")
    for key in sd:
        if key.endswith(("_blocks", "_scales")):
            assert out[key].dtype == np.uint8
            np.testing.assert_array_equal(out[key], sd[key])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    again = load_pretrained(tmp_path / "out", attn_impl="xla", moe_format="mxfp4")
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(packed(tokens)))


def test_float_moe_folder_quantizes_as_it_loads(tmp_path):
    """A Mixtral folder (bf16/fp32 experts) with moe_format='mxfp4': each expert tensor quantized on load."""
    from jaxattn.models.hf import load_pretrained, save_pretrained
    from test_gpt_hf import MIXTRAL, random_hf_state_dict
    from jaxattn.models.safetensors_io import write_safetensors

    raw = {**MIXTRAL, "hidden_size": 64, "intermediate_size": 32}
    sd = random_hf_state_dict(raw, seed=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(raw))
    write_safetensors(tmp_path / "in" / "model.safetensors", sd)
    packed = load_pretrained(tmp_path / "in", attn_impl="xla", moe_format="mxfp4")
    plain = load_pretrained(tmp_path / "in", attn_impl="xla")
    for a, b in zip(packed.blocks, plain.blocks):
        np.testing.assert_array_equal(np.asarray(a.mlp.gate_up[...]),
                                      np.asarray(quantize_mxfp4(b.mlp.gate_up[...]).packed))
    save_pretrained(packed, tmp_path / "out")  # (a float Mixtral folder: the dequantized experts)
    again = load_pretrained(tmp_path / "out", attn_impl="xla", moe_format="mxfp4")
    for a, b in zip(again.blocks, packed.blocks):  # (the same values; a group whose amax rounded down may
        # come back at half the scale, twice the codes)
        np.testing.assert_array_equal(np.asarray(dequantize(MXFP4(a.mlp.down[...]))),
                                      np.asarray(dequantize(MXFP4(b.mlp.down[...]))))


def test_packed_gpt_oss_folder_matches_transformers(tmp_path):
    """Our saved MXFP4 gpt-oss folder, read by transformers (which dequantizes it): the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxattn.models.hf import load_pretrained, save_pretrained
    from test_gpt_hf import TOKENS

    _gpt_oss_folder(tmp_path / "in")
    ours = load_pretrained(tmp_path / "in", attn_impl="xla", moe_format="mxfp4")
    save_pretrained(ours, tmp_path / "out")
    ref = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path / "out", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.as_tensor(np.asarray(TOKENS))).logits.numpy()
    assert_close(ours(jnp.asarray(TOKENS)), want, jnp.float32, "logits vs transformers",
                 tol={jnp.dtype(jnp.float32): (3e-4, 3e-4)})
