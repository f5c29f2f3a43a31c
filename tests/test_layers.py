"""jaxattn.layers: the drop-in nnx.MultiHeadAttention and attention_fn match flax's own, with the
same parameters, for self/cross attention, GQA, masks, biases, causal and decode; dropout in the kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import layers
from conftest import GRAD_TOL, assert_close, randn


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


@pytest.mark.parametrize("broadcast", [False, True])
def test_attention_fn_dropout_in_the_kernel(broadcast):
    """Dropout runs in jaxattn (kernel and XLA path agree): softmax weights zeroed where jaxattn's
    keep mask says, the rest scaled by 1 / (1 - rate); flax's broadcast_dropout = one mask for all
    batch rows and heads. Eval mode (deterministic) is flax's output."""
    from jaxattn.pallas import _dropout

    ks = jax.random.split(jax.random.PRNGKey(6), 4)
    q, k, v = (randn(kk, (2, 12, 4, 32), jnp.float32) for kk in ks[:3])
    kw = dict(dropout_rng=ks[3], dropout_rate=0.4, broadcast_dropout=broadcast)
    got = {impl: layers.attention_fn(q, k, v, impl=impl, **kw) for impl in ("xla", "pallas")}
    keep = _dropout.keep_mask(_dropout.seed_from_key(ks[3]), 1 if broadcast else 2, 1 if broadcast else 4, 12, 12, 0.4)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32), axis=-1)
    want = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, w / 0.6, 0.0), v)
    for impl, out in got.items():
        assert_close(out, want, jnp.float32, f"dropout {impl}")
    same_bh = np.asarray(keep[0, 0] == keep[-1, -1]).mean()
    assert same_bh == 1.0 if broadcast else same_bh < 0.8
    assert_close(layers.attention_fn(q, k, v, deterministic=True, **kw), nnx.dot_product_attention(q, k, v),
                 jnp.float32, "eval mode")


def test_module_dropout_and_sow():
    x = randn(jax.random.PRNGKey(5), (2, 8, 128), jnp.float32)
    ours, theirs = _pair("xla", dropout_rate=0.5)
    a = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    b = ours(x, deterministic=False, rngs=nnx.Rngs(dropout=8))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2  # a fresh mask per key
    assert_close(ours(x, deterministic=True), theirs(x, deterministic=True), jnp.float32, "eval mode")
    ours_s, theirs_s = _pair("xla")  # sow_weights needs the weights: flax's implementation
    assert_close(ours_s(x, sow_weights=True), theirs_s(x, sow_weights=True), jnp.float32, "sow")
    assert jax.tree.leaves(nnx.state(ours_s, nnx.Intermediate))


def test_bad_rank():
    with pytest.raises(ValueError, match="rank >= 4"):
        layers.attention_fn(jnp.zeros((8, 4, 16)), jnp.zeros((8, 4, 16)), jnp.zeros((8, 4, 16)))


def test_score_mod_equals_flax_with_the_bias_tensor():
    """MultiHeadAttention(score_mod=...) on the kernel equals flax's module given the same per-head
    distance penalty as an explicit bias tensor; it refuses a custom attention_fn beside it."""
    def penalty(x, b, h, qi, ki):
        return x - 0.2 * (h + 1) * jnp.abs(qi - ki).astype(x.dtype)

    x = randn(jax.random.PRNGKey(5), (2, 19, 128), jnp.float32)
    ours = layers.MultiHeadAttention(4, 128, impl="pallas", score_mod=penalty, decode=False, rngs=nnx.Rngs(0))
    dist = jnp.abs(jnp.arange(19)[:, None] - jnp.arange(19)[None, :]).astype(jnp.float32)
    bias = -0.2 * (jnp.arange(4)[:, None, None] + 1) * dist  # [heads, q, kv]
    # flax's module takes the bias through its attention_fn: the same logits with an explicit tensor
    theirs = nnx.MultiHeadAttention(4, 128, decode=False, rngs=nnx.Rngs(0),
                                    attention_fn=lambda q, k, v, bias_=None, mask=None, **kw: nnx.dot_product_attention(
                                        q, k, v, bias[None], mask, **kw))
    assert_close(ours(x, is_causal=True), theirs(x, is_causal=True), jnp.float32, "score_mod vs bias tensor")
    with pytest.raises(ValueError, match="give attention_fn, or score_mod"):
        layers.MultiHeadAttention(4, 128, score_mod=penalty, attention_fn=layers.attention_fn, rngs=nnx.Rngs(0))


def test_learned_score_mod_table_trains_like_a_bias_tensor():
    """MultiHeadAttention(score_mod_tables=...) owns a learned relative-position table: its loss and the
    gradients of every parameter (the table's through the kernel's scatter; under nnx.jit) equal those of
    the same parameters run through flax's projections and dot_product_attention with the table expanded
    into an explicit bias tensor."""
    n = 19

    def rel(x, b, h, qi, ki, table):
        return x + table[h, qi - ki + n - 1]

    init = nnx.initializers.normal(0.5)
    ours = layers.MultiHeadAttention(4, 128, impl="pallas", score_mod=rel, score_mod_tables=[(4, 2 * n - 1)],
                                     score_mod_table_init=init, decode=False, rngs=nnx.Rngs(0))
    assert ours.score_mod_table0[...].shape == (4, 2 * n - 1) and float(jnp.abs(ours.score_mod_table0[...]).max()) > 0
    idx = np.arange(n)[:, None] - np.arange(n)[None, :] + n - 1

    x = randn(jax.random.PRNGKey(6), (2, n, 128), jnp.float32)

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    def explicit(m, x):  # the same parameters through flax's pieces, the table as an explicit bias tensor
        q, k, v = m.query(x), m.key(x), m.value(x)
        o = nnx.dot_product_attention(q, k, v, m.score_mod_table0[...][:, idx][None])
        return jnp.sum(m.out(o) ** 2)

    lo, go = nnx.jit(nnx.value_and_grad(loss))(ours, x)
    lt, gt = nnx.value_and_grad(explicit)(ours, x)
    assert_close(lo, lt, jnp.float32, "loss")
    assert float(jnp.abs(gt.score_mod_table0[...]).max()) > 0
    for name in ("score_mod_table0", "query", "key", "value", "out"):
        a, b = getattr(go, name), getattr(gt, name)
        a, b = (a[...], b[...]) if name == "score_mod_table0" else (a.kernel[...], b.kernel[...])
        assert_close(a, b, jnp.float32, f"d{name}", GRAD_TOL)
    with pytest.raises(ValueError, match="give score_mod too"):
        layers.MultiHeadAttention(4, 128, score_mod_tables=[(4, 3)], rngs=nnx.Rngs(0))


def test_learned_sinks_train_like_a_value_less_key():
    """MultiHeadAttention(sinks=True): loss and gradients (the sinks' too) equal flax's projections and
    attention with one more key per head whose logit is the sink and whose value is zero."""
    ours = layers.MultiHeadAttention(4, 128, impl="pallas", sinks=True, decode=False, rngs=nnx.Rngs(0))
    assert ours.sinks[...].shape == (4,)
    ours.sinks[...] = jnp.asarray([1.0, -0.5, 2.0, 0.0])
    x = randn(jax.random.PRNGKey(7), (2, 13, 128), jnp.float32)

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    def explicit(m, x):  # a zero-value key whose logit is the sink: bias column, zero q.k and v
        q, k, v = m.query(x), m.key(x), m.value(x)
        k, v = (jnp.concatenate([t, jnp.zeros_like(t[:, :1])], 1) for t in (k, v))
        bias = jnp.zeros((1, 4, 13, 14)).at[..., 13].set(m.sinks[...][:, None])
        return jnp.sum(m.out(nnx.dot_product_attention(q, k, v, bias)) ** 2)

    lo, go = nnx.jit(nnx.value_and_grad(loss))(ours, x)
    lt, gt = nnx.value_and_grad(explicit)(ours, x)
    assert_close(lo, lt, jnp.float32, "loss")
    assert float(jnp.abs(gt.sinks[...]).max()) > 0
    assert_close(go.sinks[...], gt.sinks[...], jnp.float32, "dsinks", GRAD_TOL)
    for name in ("query", "key", "value", "out"):
        assert_close(getattr(go, name).kernel[...], getattr(gt, name).kernel[...], jnp.float32, f"d{name}", GRAD_TOL)
