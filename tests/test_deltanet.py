"""Gated DeltaNet layers in GPT (jaxattn.models.deltanet, layer_types "delta"): the layer against a composition written
here from the paper's math (an explicit causal convolution loop, SiLU, L2 norms, Mamba-2's decay, the gated delta rule's
recurrence, the gated RMSNorm); prefill then recurrent decoding (state and convolution history) gives the forward's
logits on the kernel and on XLA; training reaches every parameter; bad use raises."""

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


def _model(impl="xla"):
    return create_model("deltanet-tiny", rngs=nnx.Rngs(0), attn_impl=impl, dim=64, heads=2, init_std=0.1)


def test_layer_matches_the_composition():
    m = _model()
    layer = m.blocks[0].attn
    assert isinstance(layer, GatedDeltaNetLayer)
    layer.dt_bias[...] = jnp.asarray([0.3, -0.2])
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
    q, k, v = (c.reshape(2, 9, 2, 32) for c in np.split(conv, 3, -1))
    q, k = (a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6) for a in (q, k))
    beta = 1 / (1 + np.exp(-(xn @ w(layer.b))))
    a = xn @ w(layer.a) + np.asarray(layer.dt_bias[...])
    g = -np.exp(np.asarray(layer.A_log[...], np.float64)) * np.log1p(np.exp(a))
    o = np.asarray(gated_delta_reference(*(jnp.asarray(t, jnp.float32) for t in (q, k, v, g, beta)))[0], np.float64)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + m.cfg.norm_eps) * np.asarray(layer.norm[...])
    z = (xn @ w(layer.z)).reshape(2, 9, 2, 32)
    want = (o * z / (1 + np.exp(-z))).reshape(2, 9, 64) @ w(layer.out)
    assert_close(got, want, jnp.float32, "layer", tol={jnp.dtype(jnp.float32): (1e-4, 1e-4)})


@pytest.mark.parametrize("impl", ["pallas", pytest.param("xla", marks=pytest.mark.slow)])
def test_recurrent_decoding_gives_the_forward(impl):
    m = _model(impl)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 256)
    full = m(tokens)
    logits, cache = m.prefill(tokens[:, :6], max_len=11)
    step = nnx.jit(lambda mod, *a: mod.decode_step(*a))  # (one compiled step for every token)
    assert cache[0][0].shape == (2, 2, 32, 32) and cache[0][1].shape == (2, 3, 3 * 64)
    tol = {jnp.dtype(jnp.float32): (1e-4, 1e-4)}
    assert_close(logits, full[:, 5], jnp.float32, "prefill", tol=tol)
    for t in range(6, 11):
        logits, cache = step(m, tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=tol)


def test_training_reaches_every_parameter_and_bad_use_raises(tmp_path):
    loss, grads = lm_grads("deltanet-tiny", dim=64, heads=2, init_std=0.1, layers=2)
    assert np.isfinite(float(loss))
    layer = grads.blocks[0].attn
    for gr in (layer.q.kernel, layer.conv, layer.A_log, layer.dt_bias, layer.b.kernel, layer.a.kernel, layer.z.kernel,
               layer.norm, layer.out.kernel):
        assert np.abs(np.asarray(gr[...])).max() > 0
    m, batch = _model(), jax.random.randint(jax.random.key(1), (2, 17), 0, 256)
    with pytest.raises(ValueError, match="segment_ids"):
        m(batch, segment_ids=jnp.zeros_like(batch))
    with pytest.raises(ValueError, match="ragged prompts"):
        m.prefill(batch[:, :4], max_len=8, lengths=jnp.asarray([4, 2]))
    with pytest.raises(ValueError, match="delta_conv"):
        GPTConfig(layer_types=("delta",), delta_conv=0)
    from jaxattn.models import hf

    with pytest.raises(ValueError, match="Gated DeltaNet"):  # (no Hugging Face layout holds them)
        hf.save_pretrained(m, tmp_path)
    with pytest.raises(ValueError, match="DeepSeek's routing"):
        hf.save_pretrained(create_model("moe-gpt-tiny", rngs=nnx.Rngs(0), moe_dense_layers=1), tmp_path)
