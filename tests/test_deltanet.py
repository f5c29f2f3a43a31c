"""Gated DeltaNet layers in GPT (jaxattn.models.deltanet, layer_types "delta"): the layer against a composition written
here from the paper's math (an explicit causal convolution loop, SiLU, L2 norms, Mamba-2's decay, the gated delta rule's
recurrence, the gated RMSNorm); prefill then recurrent decoding (state and convolution history) gives the forward's
logits on the kernel and on XLA; packed documents give each document's logits; training reaches every parameter; bad
use raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, lm_grads
from jaxattn.models import create_model
from jaxattn.models.deltanet import GatedDeltaNetLayer
from jaxattn.models.gpt import GPTConfig
from jaxattn.reference import gated_delta_reference


# Qwen3-Next's shape: more value heads than query / key heads (each q / k head shared by two), other widths
GROUPED = dict(delta_heads=4, delta_key_heads=2, delta_head_dim=16, delta_value_dim=32)


def _model(impl="xla", **kw):
    return create_model("deltanet-tiny", rngs=nnx.Rngs(0), attn_impl=impl, dim=64, heads=2, init_std=0.1, **kw)


@pytest.mark.parametrize("kw", [pytest.param({}, marks=pytest.mark.slow), {**GROUPED, "delta_value_dim": 24}])
def test_layer_matches_the_composition(kw):
    m = _model(**kw)
    layer = m.blocks[0].attn
    assert isinstance(layer, GatedDeltaNetLayer)
    h, hk, dk, dv = m.cfg.delta_dims
    layer.dt_bias[...] = jnp.linspace(-0.3, 0.3, h)
    x = jax.random.normal(jax.random.key(1), (2, 9, 64))
    got = layer(x, jnp.arange(9))
    # the composition, from the parameters
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    xn = np.asarray(x, np.float64)
    mixed = np.concatenate([xn @ w(layer.q), xn @ w(layer.k), xn @ w(layer.v)], -1)  # [B, n, 3 H d]
    taps = np.asarray(layer.conv[...], np.float64)  # [K, C]
    conv = np.zeros_like(mixed)
    for t in range(9):
        for j in range(taps.shape[0]):
            src = t - taps.shape[0] + 1 + j
            if src >= 0:
                conv[:, t] += taps[j] * mixed[:, src]
    conv = conv / (1 + np.exp(-conv))
    q, k, v = np.split(conv, [hk * dk, 2 * hk * dk], -1)
    q, k, v = q.reshape(2, 9, hk, dk), k.reshape(2, 9, hk, dk), v.reshape(2, 9, h, dv)
    q, k = (np.repeat(a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6), h // hk, axis=2) for a in (q, k))
    beta = 1 / (1 + np.exp(-(xn @ w(layer.b))))
    a = xn @ w(layer.a) + np.asarray(layer.dt_bias[...])
    g = -np.exp(np.asarray(layer.A_log[...], np.float64)) * np.log1p(np.exp(a))
    o = np.asarray(gated_delta_reference(*(jnp.asarray(t, jnp.float32) for t in (q, k, v, g, beta)))[0], np.float64)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + m.cfg.norm_eps) * np.asarray(layer.norm[...])
    z = (xn @ w(layer.z)).reshape(2, 9, h, dv)
    want = (o * z / (1 + np.exp(-z))).reshape(2, 9, h * dv) @ w(layer.out)
    assert_close(got, want, jnp.float32, "layer", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


# (the default suite's kernel decoding with grouped heads: test_qwen3_next's)
@pytest.mark.slow
@pytest.mark.parametrize("impl,kw", [("pallas", GROUPED), ("xla", {})])
def test_recurrent_decoding_gives_the_forward(impl, kw):
    m = _model(impl, **kw)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 256)
    full = m(tokens)
    logits, cache = m.prefill(tokens[:, :6], max_len=11)
    step = nnx.jit(lambda mod, *a: mod.decode_step(*a))  # (one compiled step for every token)
    h, hk, dk, dv = m.cfg.delta_dims
    assert cache[0][0].shape == (2, h, dk, dv) and cache[0][1].shape == (2, 3, 2 * hk * dk + h * dv)
    tol = {jnp.dtype(jnp.float32): (1e-4, 1e-4)}
    assert_close(logits, full[:, 5], jnp.float32, "prefill", tol=tol)
    for t in range(6, 11):
        logits, cache = step(m, tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=tol)


def test_convolution_documents_are_runs_of_equal_ids():
    """Packed documents in the layers' causal convolution: an id that comes back starts a new document."""
    from jaxattn.models.deltanet import causal_conv

    x, w = jax.random.normal(jax.random.key(2), (1, 6, 3)), jax.random.normal(jax.random.key(3), (4, 3))
    got = causal_conv(x, w, segment_ids=jnp.asarray([[0, 0, 1, 0, 0, 0]]))
    np.testing.assert_array_equal(got, causal_conv(x, w, segment_ids=jnp.asarray([[0, 0, 1, 2, 2, 2]])))
    np.testing.assert_allclose(got[:, 3], x[:, 3] * w[3], rtol=1e-6)  # (a document's first token: itself alone)


def test_a_prompt_continued_in_pieces_gives_the_forward():
    """Several tokens past the cache at once (a long prompt prefilled in pieces): the recurrent layers (Gated
    DeltaNet, Kimi Delta, MiniMax's lightning) run their chunked ops from the cached state and convolution history,
    the softmax layer attends to the cache; the logits are the full forward's, and a decoding step follows."""
    m = create_model("deltanet-tiny", rngs=nnx.Rngs(0), dim=32, heads=2, init_std=0.1, attn_impl="xla",
                     layer_types=("delta", "kda", "lightning", "full"))
    tokens = jax.random.randint(jax.random.key(5), (2, 24), 0, 256)
    full = nnx.jit(lambda mod, t: mod(t))(m, tokens)
    first = nnx.jit(lambda mod, t, c: mod(t, cache=c, offset=0))
    more = nnx.jit(lambda mod, t, c, o: mod(t, cache=c, offset=o))
    logits, cache = first(m, tokens[:, :7], m.init_cache(2, 32))
    pieces = [logits]
    for a, e in ((7, 20), (20, 23)):  # (13 tokens: a ragged chunk of the chunked ops)
        logits, cache = more(m, tokens[:, a:e], cache, jnp.asarray(a, jnp.int32))
        pieces.append(logits)
    tol = {jnp.dtype(jnp.float32): (1e-4, 1e-4)}
    assert_close(jnp.concatenate(pieces, axis=1), full[:, :23], jnp.float32, "pieces", tol=tol)
    logits, _ = m.decode_step(tokens[:, 23], cache, jnp.asarray(23, jnp.int32))
    assert_close(logits, full[:, 23], jnp.float32, "the step after", tol=tol)


@pytest.mark.slow  # (37 s: the suite's budget; Gated DeltaNet training by default: test_qwen3_next's and test_kimi_linear's)
def test_training_reaches_every_parameter_and_bad_use_raises(tmp_path):
    loss, grads = lm_grads("deltanet-tiny", dim=64, heads=2, init_std=0.1, layers=2)
    assert np.isfinite(float(loss))
    layer = grads.blocks[0].attn
    for gr in (layer.q.kernel, layer.conv, layer.A_log, layer.dt_bias, layer.b.kernel, layer.a.kernel, layer.z.kernel,
               layer.norm, layer.out.kernel):
        assert np.abs(np.asarray(gr[...])).max() > 0
    m, batch = _model(), jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    # packed documents: each document's logits as it alone gives them (the convolution and the state stop at a start)
    seg = jnp.asarray([[0] * 5 + [1] * 12, [0] * 11 + [1] * 6])
    packed = m(batch, segment_ids=seg)
    for r, cut in enumerate((5, 11)):
        for a, e in ((0, cut), (cut, 17)):
            assert_close(packed[r:r + 1, a:e], m(batch[r:r + 1, a:e]), jnp.float32, f"document {r} {a}:{e}",
                         tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})
    with pytest.raises(ValueError, match="delta_conv"):
        GPTConfig(layer_types=("delta",), delta_conv=0)
    with pytest.raises(ValueError, match="multiple of delta_key_heads"):
        GPTConfig(layer_types=("delta",), delta_heads=3, delta_key_heads=2)
    from jaxattn.models import hf

    with pytest.raises(ValueError, match="Qwen3-Next layout"):  # (deltanet-tiny's softmax layers: no output gate)
        hf.save_pretrained(m, tmp_path)
    with pytest.raises(ValueError, match="DeepSeek's routing"):
        hf.save_pretrained(create_model("moe-gpt-tiny", rngs=nnx.Rngs(0), moe_dense_layers=1), tmp_path)


def test_kimi_delta_layer_matches_the_composition_and_trains():
    """Kimi Delta Attention (layer_types "kda"): the low-rank per-channel decay and the sigmoid output gate, composed
    here from the parameters on the recurrence; training reaches the gates' parameters."""
    from jaxattn.models.deltanet import KimiDeltaLayer

    m = create_model("kda-tiny", rngs=nnx.Rngs(0), attn_impl="xla", dim=64, heads=2, init_std=0.1)
    layer = m.blocks[0].attn
    assert isinstance(layer, KimiDeltaLayer) and layer.kind == "kda"
    layer.dt_bias[...] = jnp.linspace(-1.0, 1.0, 64)
    x = jax.random.normal(jax.random.key(1), (2, 9, 64))
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    xn = np.asarray(x, np.float64)
    mixed = np.concatenate([xn @ w(layer.q), xn @ w(layer.k), xn @ w(layer.v)], -1)
    taps = np.asarray(layer.conv[...], np.float64)
    conv = np.zeros_like(mixed)
    for t in range(9):
        for j in range(taps.shape[0]):
            if t - taps.shape[0] + 1 + j >= 0:
                conv[:, t] += taps[j] * mixed[:, t - taps.shape[0] + 1 + j]
    conv = conv / (1 + np.exp(-conv))
    q, k, v = (c.reshape(2, 9, 2, 32) for c in np.split(conv, 3, -1))
    q, k = (a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6) for a in (q, k))
    beta = 1 / (1 + np.exp(-(xn @ w(layer.b))))
    f = (xn @ w(layer.f_a) @ w(layer.f_b) + np.asarray(layer.dt_bias[...])).reshape(2, 9, 2, 32)
    g = -np.exp(np.asarray(layer.A_log[...], np.float64))[:, None] * np.log1p(np.exp(f))
    o = np.asarray(gated_delta_reference(*(jnp.asarray(t, jnp.float32) for t in (q, k, v, g, beta)))[0], np.float64)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + m.cfg.norm_eps) * np.asarray(layer.norm[...])
    gate = 1 / (1 + np.exp(-(xn @ w(layer.g_a) @ w(layer.g_b))))
    want = (o * gate.reshape(2, 9, 2, 32)).reshape(2, 9, 64) @ w(layer.out)
    assert_close(layer(x, jnp.arange(9)), want, jnp.float32, "layer", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})
    # (prefill and recurrent decoding of KDA layers: test_kimi_linear)
    loss, grads = lm_grads("kda-tiny", dim=64, heads=2, init_std=0.1, layers=1)
    for gr in (grads.blocks[0].attn.f_a.kernel, grads.blocks[0].attn.f_b.kernel, grads.blocks[0].attn.g_b.kernel,
               grads.blocks[0].attn.dt_bias):
        assert np.abs(np.asarray(gr[...])).max() > 0
