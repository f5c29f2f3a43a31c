"""Mamba-2 layers in GPT (jaxattn.models.mamba2, layer_types "mamba2"): the layer against the selective state space
recurrence written here in float64 numpy from the paper (an explicit causal convolution with its bias, SiLU, dt =
softplus, h_t = exp(dt A) h_{t-1} + dt B_t x_tᵀ, y_t = C_tᵀ h_t + D x_t, the gated RMSNorm per group), on the
kernels and on XLA; prefill then recurrent decoding gives the forward's logits; a prompt in pieces; packed
documents give each document's logits; training reaches every parameter; bad use raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_close, lm_grads
from jaxattn.models import create_model
from jaxattn.models.mamba2 import Mamba2Layer

TOL = {jnp.dtype(jnp.float32): (1e-4, 1e-4)}
TWO_GROUPS = dict(delta_heads=4, delta_key_heads=2, delta_head_dim=16, delta_value_dim=16)


def _model(impl="xla", **kw):
    return create_model("mamba2-tiny", rngs=nnx.Rngs(0), attn_impl=impl, dim=64, heads=2, init_std=0.1,
                        **{**TWO_GROUPS, **kw})


def _ssm(layer: Mamba2Layer, u: np.ndarray, eps: float) -> np.ndarray:
    """The layer's output from its parameters, token by token (float64)."""
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    h, hk, ds, hd = layer.heads, layer.groups, layer.state_dim, layer.head_dim
    b, n, _ = u.shape
    mixed = np.concatenate([u @ w(layer.C), u @ w(layer.B), u @ w(layer.x)], -1)
    taps = np.asarray(layer.conv[...], np.float64)
    conv = np.zeros_like(mixed) + np.asarray(layer.conv_bias[...], np.float64)
    for t in range(n):
        for j in range(taps.shape[0]):
            if (src := t - taps.shape[0] + 1 + j) >= 0:
                conv[:, t] += taps[j] * mixed[:, src]
    conv = conv / (1 + np.exp(-conv))
    c, bm, x = np.split(conv, [hk * ds, 2 * hk * ds], -1)
    c, bm, x = c.reshape(b, n, hk, ds), bm.reshape(b, n, hk, ds), x.reshape(b, n, h, hd)
    dt = np.log1p(np.exp(u @ w(layer.dt) + np.asarray(layer.dt_bias[...], np.float64)))  # [b, n, h]
    a = -np.exp(np.asarray(layer.A_log[...], np.float64))
    d = np.asarray(layer.D[...], np.float64)
    y = np.zeros((b, n, h, hd))
    state = np.zeros((b, h, ds, hd))
    for t in range(n):
        for head in range(h):
            grp = head // (h // hk)
            state[:, head] = np.exp(dt[:, t, head] * a[head])[:, None, None] * state[:, head] \
                + bm[:, t, grp][:, :, None] * (dt[:, t, head][:, None] * x[:, t, head])[:, None, :]
            y[:, t, head] = np.einsum("bs,bsp->bp", c[:, t, grp], state[:, head]) + d[head] * x[:, t, head]
    z = (u @ w(layer.z)).reshape(b, n, h, hd)
    gated = (y * z / (1 + np.exp(-z))).reshape(b, n, hk, -1)
    normed = gated / np.sqrt((gated * gated).mean(-1, keepdims=True) + eps) * np.asarray(layer.norm[...]).reshape(hk, -1)
    return normed.reshape(b, n, h * hd) @ w(layer.out)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_layer_matches_the_recurrence(impl):
    m = _model(impl)
    layer = m.blocks[0].attn
    assert isinstance(layer, Mamba2Layer)
    layer.dt_bias[...] = jnp.linspace(-1.0, 1.0, layer.heads)  # (decays of every speed)
    layer.D[...] = jnp.linspace(0.5, 1.5, layer.heads)
    u = jax.random.normal(jax.random.key(1), (2, 21, 64))
    assert_close(layer(u, jnp.arange(21)), _ssm(layer, np.asarray(u, np.float64), m.cfg.norm_eps), jnp.float32,
                 "layer", tol=TOL)


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_decoding_and_pieces_give_the_forward(impl):
    m = _model(impl)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 256)
    full = nnx.jit(lambda mod, t: mod(t))(m, tokens)
    logits, cache = m.prefill(tokens[:, :7], max_len=32)
    h, hk, ds, hd = m.cfg.delta_dims
    assert cache[0][0].shape == (2, h, ds, hd) and cache[0][1].shape == (2, 3, 2 * hk * ds + h * hd)
    assert_close(logits, full[:, 6], jnp.float32, "prefill", tol=TOL)
    more = nnx.jit(lambda mod, t, c, o: mod(t, cache=c, offset=o))
    logits, cache = more(m, tokens[:, 7:20], cache, jnp.asarray(7, jnp.int32))  # (a piece: the chunked op)
    assert_close(logits, full[:, 7:20], jnp.float32, "piece", tol=TOL)
    step = nnx.jit(lambda mod, *a: mod.decode_step(*a))
    for t in range(20, 24):
        logits, cache = step(m, tokens[:, t], cache, jnp.asarray(t, jnp.int32))
        assert_close(logits, full[:, t], jnp.float32, f"step {t}", tol=TOL)


def test_packed_documents_and_bad_use():
    m, batch = _model(), jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    fwd = nnx.jit(lambda mod, t, seg=None: mod(t, segment_ids=seg))
    packed = fwd(m, batch, jnp.asarray([[0] * 8 + [1] * 8, [3] * 8 + [0] * 8]))
    for a, e in ((0, 8), (8, 16)):  # (each document alone; the convolution and the state stop at a start)
        assert_close(packed[:, a:e], fwd(m, batch[:, a:e]), jnp.float32, f"documents {a}:{e}", tol=TOL)
    with pytest.raises(ValueError, match="'mamba2'"):
        create_model("mamba2-tiny", rngs=nnx.Rngs(0), layer_types=("mamba3",))


@pytest.mark.slow  # (20 s)
def test_training_reaches_every_parameter():
    loss, grads = lm_grads("mamba2-tiny", dim=32, heads=2, init_std=0.1, layers=2, **TWO_GROUPS)
    assert np.isfinite(float(loss))
    layer = grads.blocks[0].attn
    for gr in (layer.C.kernel, layer.B.kernel, layer.x.kernel, layer.z.kernel, layer.dt.kernel, layer.conv,
               layer.conv_bias, layer.A_log, layer.dt_bias, layer.D, layer.norm, layer.out.kernel):
        assert np.abs(np.asarray(gr[...])).max() > 0
