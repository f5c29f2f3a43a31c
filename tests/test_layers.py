"""jaxattn.layers: the drop-in nnx.MultiHeadAttention and attention_fn match flax's own, with the
same parameters, for self/cross attention, GQA, masks, biases, causal, decode and dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import layers
from conftest import assert_close, randn


def _pair(impl, **kw):
    kw.setdefault("decode", False)
    ours = layers.MultiHeadAttention(4, 128, impl=impl, rngs=nnx.Rngs(0), **kw)  # head dim 32
    theirs = nnx.MultiHeadAttention(4, 128, rngs=nnx.Rngs(0), **kw)
    return ours, theirs


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_module_matches_flax(impl):
    x = randn(jax.random.PRNGKey(1), (2, 19, 128), jnp.float32)
    y = randn(jax.random.PRNGKey(2), (2, 7, 128), jnp.float32)
    ours, theirs = _pair(impl, num_kv_heads=2)
    assert jax.tree.map(jnp.shape, nnx.state(ours, nnx.Param)) == jax.tree.map(jnp.shape, nnx.state(theirs, nnx.Param))
    pad = jnp.arange(19)[None, None, None, :] < jnp.asarray([19, 11])[:, None, None, None]  # key padding
    for what, a, b in [
        ("self", ours(x), theirs(x)),
        ("causal", ours(x, is_causal=True), theirs(x, is_causal=True)),
        ("padding mask", ours(x, mask=pad), theirs(x, mask=pad)),
        ("cross", ours(y, x, x), theirs(y, x, x)),
        ("cross causal (top-left)", ours(x, y, y, is_causal=True), theirs(x, y, y, is_causal=True)),
    ]:
        assert_close(a, b, jnp.float32, what)


def test_attention_fn_bias_mask_and_batch_dims():
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q = randn(ks[0], (2, 3, 10, 4, 32), jnp.float32)  # two batch dims
    k = randn(ks[1], (2, 3, 12, 2, 32), jnp.float32)
    v = randn(ks[2], (2, 3, 12, 2, 32), jnp.float32)
    bias = randn(ks[3], (1, 3, 4, 10, 12), jnp.float32)  # broadcast over the first batch dim
    mask = jax.random.bernoulli(ks[4], 0.7, (2, 3, 1, 10, 12)).at[..., 0].set(True)
    want = nnx.dot_product_attention(q, k, v, jnp.broadcast_to(bias, (2, 3, 4, 10, 12)), mask)
    got = layers.attention_fn(q, k, v, bias, mask, impl="pallas")
    assert got.shape == want.shape
    assert_close(got, want, jnp.float32, "bias+mask")


def test_decode_cache_matches_parallel_causal():
    x = randn(jax.random.PRNGKey(4), (2, 9, 128), jnp.float32)
    ours, _ = _pair("xla", num_kv_heads=2)
    full = ours(x, is_causal=True)
    ours.init_cache(x.shape)
    steps = [ours(x[:, i:i + 1], decode=True) for i in range(x.shape[1])]
    assert_close(jnp.concatenate(steps, axis=1), full, jnp.float32, "decode")


def test_dropout_and_sow_go_to_flax():
    x = randn(jax.random.PRNGKey(5), (2, 8, 128), jnp.float32)
    ours, theirs = _pair("xla", dropout_rate=0.5)
    a = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    b = theirs(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert_close(ours(x, deterministic=True), theirs(x, deterministic=True), jnp.float32, "eval mode")


def test_bad_rank():
    with pytest.raises(ValueError, match="rank >= 4"):
        layers.attention_fn(jnp.zeros((8, 4, 16)), jnp.zeros((8, 4, 16)), jnp.zeros((8, 4, 16)))
