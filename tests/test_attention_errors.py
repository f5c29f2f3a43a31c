"""Bad input to ``jaxattn.attention`` raises ValueError naming the argument."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import jaxattn


def _qkv(b=2, sq=8, sk=8, hq=4, hkv=2, d=32, dtype=jnp.float32):
    return (jnp.zeros((b, sq, hq, d), dtype), jnp.zeros((b, sk, hkv, d), dtype),
            jnp.zeros((b, sk, hkv, d), dtype))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q[0], k, v), r"q must have rank 4 \[batch, seq, heads, head_dim\]"),
        (lambda q, k, v: (q, k[..., None], v), r"k must have rank 4"),
        (lambda q, k, v: (q, k, v[0]), r"v must have rank 4"),
        (lambda q, k, v: (q, k[..., :16], v), r"k has head dim 16 at axis 3 .*expected 32 \(q.s\)"),
        (lambda q, k, v: (q, k[:1], v), r"k has batch size 1 at axis 0"),
        (lambda q, k, v: (q, k, v[:, :5]), r"v has kv length 5 at axis 1"),
        (lambda q, k, v: (q, k, v[:, :, :1]), r"v has kv heads 1 at axis 2"),
        (lambda q, k, v: (q[:, :, :3], k, v), r"k has 2 kv heads, which must divide q's 3 heads"),
        (lambda q, k, v: (q.astype(jnp.int32), k, v), r"q has dtype int32; expected one of"),
        (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), r"q, k, v must share one dtype"),
        (lambda q, k, v: (q[:, :0], k, v), r"at least one position"),
        (lambda q, k, v: ([[1.0]], k, v), r"q must be an array"),
    ],
)
def test_bad_qkv(impl, change, match):
    with pytest.raises(ValueError, match=match):
        jaxattn.attention(*change(*_qkv()), impl=impl)


def test_bad_impl():
    with pytest.raises(ValueError, match=r"impl must be one of"):
        jaxattn.attention(*_qkv(), impl="cuda")


@pytest.mark.parametrize("d,dv", [(16, 16), (512, 512), (64, 300)])
def test_pallas_head_dim_range(d, dv):
    q, k, v = (jnp.zeros((1, 4, 1, d)), jnp.zeros((1, 4, 1, d)), jnp.zeros((1, 4, 1, dv)))
    with pytest.raises(ValueError, match=r"impl='pallas' supports head dims 32..256"):
        jaxattn.attention(q, k, v, impl="pallas")
    assert jaxattn.attention(q, k, v, impl="xla").shape == (1, 4, 1, dv)  # XLA takes any head dim


def test_pallas_rejects_float64_dtype():
    q = jnp.zeros((1, 4, 1, 32), jnp.float16).astype(jnp.float32)
    with pytest.raises(ValueError, match=r"q, k, v must share one dtype"):
        jaxattn.attention(q, q.astype(jnp.float16), q, impl="pallas")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "mask,match",
    [
        (jnp.zeros((2, 3, 8, 8)), r"mask must broadcast to \[batch, heads, q_len, kv_len\] = \(2, 4, 8, 8\)"),
        (jnp.zeros((8, 7)), r"mask must broadcast to"),
        (jnp.zeros((1, 2, 1, 4, 8, 8)), r"mask must broadcast to"),
        (jnp.zeros((8, 8), jnp.int32), r"mask has dtype int32; expected one of"),
        ("nope", r"mask must be an array"),
    ],
)
def test_bad_mask(impl, mask, match):
    with pytest.raises(ValueError, match=match):
        jaxattn.attention(*_qkv(), mask=mask, impl=impl)


@pytest.mark.parametrize(
    "seg,sk,match",
    [
        (jnp.zeros((2, 8), jnp.int32), 6, r"segment_ids as one array needs q_len == kv_len"),
        (jnp.zeros((2, 7), jnp.int32), 8, r"q_segment_ids must have shape \[batch, len\] = \(2, 8\)"),
        ((jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32)), 6, r"kv_segment_ids must have shape"),
        (jnp.zeros((2, 8), jnp.float32), 8, r"q_segment_ids must have an integer dtype"),
        ((jnp.zeros((2, 8), jnp.int32),), 8, r"a pair"),
        (jnp.zeros((8,), jnp.int32), 8, r"q_segment_ids must have rank 2"),
    ],
)
def test_bad_segment_ids(seg, sk, match):
    with pytest.raises(ValueError, match=match):
        jaxattn.attention(*_qkv(sk=sk), segment_ids=seg)


def test_bad_scale():
    with pytest.raises(ValueError, match=r"scale must be a finite float"):
        jaxattn.attention(*_qkv(), scale=float("nan"))


def _empty_batch_calls():
    """(name, call(impl), differentiable): every public op on inputs with batch 0."""
    import jax

    q = jnp.zeros((0, 40, 4, 32), jnp.float32)
    qb, s = q.astype(jnp.bfloat16), jnp.full((4,), 0.1)
    m = jnp.zeros((0, 16, 16, 2, 32))
    rel = jnp.zeros((2 * 14 - 1, 32))
    pages, table = jnp.zeros((4, 16, 4, 32)), jnp.zeros((0, 4), jnp.int32)
    lengths = jnp.zeros((0,), jnp.int32)
    return [
        ("attention", lambda impl, x: jaxattn.attention(x, x, x, causal=True, impl=impl), True),
        ("attention lse", lambda impl, x: jaxattn.attention(x, x, x, impl=impl, return_lse=True)[1], True),
        ("power", lambda impl, x: jaxattn.power_attention(x, x, x, block=16, impl=impl), True),
        ("lightning", lambda impl, x: jaxattn.lightning_attention(x, x, x, s, impl=impl), True),
        ("landmark", lambda impl, x: jaxattn.landmark_attention(x, x, x, block_len=16, impl=impl), True),
        ("linear_global", lambda impl, x: jaxattn.linear_global_attention(x, x, x, temperature=1.0, impl=impl),
         True),
        ("decode", lambda impl, x: jaxattn.decode_attention(x[:, :1], x, x, lengths, impl=impl), False),
        ("paged_decode", lambda impl, x: jaxattn.paged_decode_attention(x[:, :1], pages, pages, table, lengths,
                                                                        impl=impl), False),
        ("sage", lambda impl, x: jaxattn.sage_attention(x.astype(jnp.bfloat16), qb, qb, impl=impl), False),
        ("halo", lambda impl, x: jaxattn.halo_attention(m + x.sum(), m, m, rel, rel, block_size=8, halo_size=3,
                                                        impl=impl), True),
    ], q, jax


@pytest.mark.parametrize("name", [c[0] for c in _empty_batch_calls()[0]])
def test_empty_batch_on_kernel_path(name):
    """An empty batch gives the empty result (and gradients) on the kernel path too, as on XLA's
    (before: an opaque slice error from inside the kernel wrapper, or a division by zero)."""
    calls, q, jax = _empty_batch_calls()
    _, call, differentiable = next(c for c in calls if c[0] == name)
    ref = call("xla", q)
    out = call("pallas", q)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.size == 0
    if differentiable:
        g = jax.grad(lambda x: call("pallas", x).astype(jnp.float32).sum())(q)
        assert g.shape == q.shape


@pytest.mark.parametrize("option,value", [("scale", 0.3), ("logits_soft_cap", 3.0), ("dropout_rate", 0.1),
                                          ("local_window_size", 4), ("causal", True)])
def test_traced_static_option_says_how_to_fix(option, value):
    """Options compiled into the kernels, given as arguments of a jitted function, raise a
    ValueError naming the option and the fix (before: JAX's generic concretization errors)."""
    import jax

    q = jnp.zeros((1, 8, 2, 32))
    extra = {"dropout_rng": jax.random.PRNGKey(0)} if option == "dropout_rate" else {}
    f = jax.jit(lambda x, o: jaxattn.attention(x, x, x, impl="xla", **{option: o}, **extra))
    with pytest.raises(ValueError, match=rf"{option} must be static .*static_argnames"):
        f(q, value)
    if option == "causal":
        g = jax.jit(lambda x, o: jaxattn.decode_attention(x, x, x, causal=o, impl="xla"))
        with pytest.raises(ValueError, match=r"causal must be static"):
            g(q, value)
