"""HaloNet blocked local attention: kernel (interpret mode) and XLA unfold path against the
per-query gather oracle, forward and gradients, border/interior blocks, errors, CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.ops import halo as halo_ops
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import halo_reference

from conftest import GRAD_TOL, assert_close, count_triton_calls, lower_for_cuda, randn


def _inputs(seed, batch, height, width, heads, d, e, block, halo, stride, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    win = block + 2 * halo
    q = randn(ks[0], (batch, height // stride, width // stride, heads, d), dtype)
    k = randn(ks[1], (batch, height, width, heads, d), dtype)
    v = randn(ks[2], (batch, height, width, heads, e), dtype)
    rh = randn(ks[3], (2 * win - 1, d), dtype) * 0.5
    rw = randn(ks[4], (2 * win - 1, d), dtype) * 0.5
    return q, k, v, rh, rw


# (batch, H, W, heads, d, e, block, halo, stride, mask_padding, scale_pos_embed)
CASES = [
    (2, 24, 16, 2, 16, 16, 8, 3, 1, False, False),   # 3x2 blocks, timm border behaviour
    (1, 24, 24, 1, 32, 16, 8, 2, 2, True, False),    # strided queries, masked border, e != d
    (1, 12, 8, 3, 8, 24, 4, 1, 1, True, True),       # small blocks, odd heads, scaled rel
    (1, 8, 8, 2, 16, 16, 8, 3, 2, False, True),      # one block, halo all border
    (1, 12, 16, 1, 16, 16, 4, 3, 1, True, False),     # halo > block / 2: a key in 3x3 windows
    (1, 12, 18, 2, 16, 8, 6, 2, 1, False, False),     # 36 query rows per block (28 idle kernel rows)
    (1, 12, 12, 1, 16, 16, 6, 1, 2, True, False),     # strided, 9 query rows per block
    (1, 8, 10, 2, 16, 16, 2, 3, 1, False, False),     # halo > block: a key block in 5x5 blocks' windows
]


@pytest.mark.parametrize("case,impl", [
    pytest.param(c, impl, id="b{6}h{7}s{8}m{9}p{10}-".format(*c) + impl,
                 marks=pytest.mark.slow if impl == "xla" and i in (2, 3, 4, 5, 6) else [])
    for i, c in enumerate(CASES) for impl in ("xla", "pallas")])
def test_matches_oracle_fwd_and_grads(case, impl):
    batch, hh, ww, heads, d, e, block, halo, stride, mask, spe = case
    args = _inputs(0, batch, hh, ww, heads, d, e, block, halo, stride)
    kw = dict(block_size=block, halo_size=halo, stride=stride, mask_padding=mask, scale_pos_embed=spe)
    expected = jax.jit(lambda *a: halo_reference(*a, **kw))(*args)
    cot = randn(jax.random.PRNGKey(7), expected.shape, jnp.float32)

    def loss(fn, *a):
        return jnp.sum(fn(*a).astype(jnp.float32) * cot)

    with poison_outputs():  # jitted (eager op-by-op grads are ~6x slower); traced inside the context
        out = jax.jit(lambda *a: jaxattn.halo_attention(*a, impl=impl, **kw))(*args)
        grads = jax.jit(jax.grad(lambda *a: loss(lambda *b: jaxattn.halo_attention(*b, impl=impl, **kw), *a),
                                 argnums=range(5)))(*args)
    assert_close(out, expected, jnp.float32, "out")
    ref_grads = jax.jit(jax.grad(lambda *a: loss(lambda *b: halo_reference(*b, **kw), *a), argnums=range(5)))(*args)
    for name, g, r in zip(("dq", "dk", "dv", "drel_h", "drel_w"), grads, ref_grads):
        assert_close(g, r, jnp.float32, name, tol=GRAD_TOL)


@pytest.mark.parametrize("dtype,spe", [pytest.param(jnp.bfloat16, False, marks=pytest.mark.slow), (jnp.float16, True)],
                         ids=["bf16-rel", "fp16-scaled-rel"])
def test_half_precision_kernel(dtype, spe):
    """Two-byte inputs, forward and gradients (the relative tables' too) on both paths, against
    the fp32 oracle on the same (rounded) inputs; with ``scale_pos_embed`` the relative logits are
    projected in fp32, without it in the input dtype."""
    args = _inputs(1, 1, 16, 16, 2, 32, 32, 8, 2, 1, dtype)
    kw = dict(block_size=8, halo_size=2, scale_pos_embed=spe)
    up = [a.astype(jnp.float32) for a in args]
    cot = randn(jax.random.PRNGKey(3), args[0].shape, jnp.float32)

    def loss(fn, *a):
        return jnp.sum(fn(*a).astype(jnp.float32) * cot)

    ref_grads = jax.grad(lambda *a: loss(lambda *b: halo_reference(*b, **kw), *a), argnums=range(5))(*up)
    for impl in ("pallas", "xla"):
        with poison_outputs():
            out = jax.jit(lambda *a: jaxattn.halo_attention(*a, impl=impl, **kw))(*args)
            grads = jax.jit(jax.grad(lambda *a: loss(lambda *b: jaxattn.halo_attention(*b, impl=impl, **kw), *a),
                                     argnums=range(5)))(*args)
        assert out.dtype == dtype
        assert_close(out, halo_reference(*up, **kw), dtype, f"{impl} out")
        for name, g, r in zip(("dq", "dk", "dv", "drel_h", "drel_w"), grads, ref_grads):
            assert g.dtype == dtype, f"{impl} {name} dtype {g.dtype}"
            assert_close(g, r, dtype, f"{impl} {name}", tol=GRAD_TOL)


def test_border_vs_interior_blocks():
    """Masking the padding changes border blocks only; the interior block of a 3x3 grid is
    identical, and a border query's output differs (its window holds zero keys)."""
    args = _inputs(2, 1, 24, 24, 1, 16, 16, 8, 3, 1)
    kw = dict(block_size=8, halo_size=3, impl="xla")
    unmasked = np.asarray(jaxattn.halo_attention(*args, **kw))
    masked = np.asarray(jaxattn.halo_attention(*args, mask_padding=True, **kw))
    # (to rounding: on a GPU XLA may fuse the masked and unmasked softmax differently)
    np.testing.assert_allclose(unmasked[:, 8:16, 8:16], masked[:, 8:16, 8:16], rtol=1e-6, atol=1e-6)
    assert np.abs(unmasked[:, :8] - masked[:, :8]).max() > 1e-3
    # the interior block equals full attention over its 14x14 neighbourhood with 2-D rel logits
    q, k, v, rh, rw = (np.asarray(x, np.float64) for x in args)
    y, x = 10, 13
    keys = k[0, 5:19, 5:19, 0].reshape(-1, 16)
    vals = v[0, 5:19, 5:19, 0].reshape(-1, 16)
    ky, kx = np.divmod(np.arange(196), 14)
    iy, ix = y - 8, x - 8  # offsets inside the block; window key (ky, kx) -> rel index k - i + win - 1
    rel = rh[ky - iy + 13] @ q[0, y, x, 0] + rw[kx - ix + 13] @ q[0, y, x, 0]
    logits = keys @ q[0, y, x, 0] / 4.0 + rel
    p = np.exp(logits - logits.max())
    np.testing.assert_allclose(unmasked[0, y, x, 0], (p / p.sum()) @ vals, rtol=1e-4, atol=1e-5)


def test_errors():
    q, k, v, rh, rw = _inputs(0, 1, 16, 16, 2, 16, 16, 8, 2, 1)
    kw = dict(block_size=8, halo_size=2)
    with pytest.raises(ValueError, match="multiples of block_size"):
        jaxattn.halo_attention(q[:, :12], k[:, :12], v[:, :12], rh, rw, **kw)
    with pytest.raises(ValueError, match="q must have shape"):
        jaxattn.halo_attention(q[:, :8], k, v, rh, rw, **kw)
    with pytest.raises(ValueError, match="rel_h must have shape"):
        jaxattn.halo_attention(q, k, v, rh[:-1], rw, **kw)
    with pytest.raises(ValueError, match="rank 5"):
        jaxattn.halo_attention(q[0], k, v, rh, rw, **kw)
    with pytest.raises(ValueError, match="stride"):
        jaxattn.halo_attention(q, k, v, rh, rw, stride=3, **kw)
    with pytest.raises(ValueError, match="impl"):
        jaxattn.halo_attention(q, k, v, rh, rw, impl="cuda", **kw)
    with pytest.raises(ValueError, match="dtype"):
        jaxattn.halo_attention(q, k.astype(jnp.bfloat16), v, rh, rw, **kw)


@pytest.mark.parametrize("key_chunk", [16, pytest.param(128, marks=pytest.mark.slow)])
def test_kernel_key_chunks(key_chunk):
    """The window walked one tile row (16 keys) or eight rows (past the window) per step. (One
    row per step meets chunks of padding keys only, the window's tile rows past ``win``, in both
    modes; the masked one also masks keys outside the image.)"""
    from jaxattn.pallas.halo import HaloConfig

    args = _inputs(3, 1, 16, 24, 2, 16, 8, 8, 3, 1)
    kw = dict(block_size=8, halo_size=3, stride=1, scale=16 ** -0.5, scale_pos_embed=False)
    for mask in (True,) if key_chunk == 16 else (False, True):
        def run(*a, mask=mask):
            return halo_ops._halo(*a, **kw, mask_padding=mask, use_kernel=True, config=HaloConfig(key_chunk=key_chunk))
        cot = randn(jax.random.PRNGKey(1), args[0].shape[:-1] + (8,), jnp.float32)
        with poison_outputs():
            out, vjp = jax.vjp(jax.jit(run), *args)
            grads = vjp(cot)
        ref = lambda *a, mask=mask: halo_reference(*a, block_size=8, halo_size=3, mask_padding=mask)  # noqa: E731
        expected, ref_vjp = jax.vjp(ref, *args)
        assert_close(out, expected, jnp.float32, f"out mask={mask}")
        for name, g, r in zip(("dq", "dk", "dv", "drel_h", "drel_w"), grads, ref_vjp(cot)):
            assert_close(g, r, jnp.float32, f"{name} mask={mask}", tol=GRAD_TOL)


@pytest.mark.parametrize("block,halo,height,width", [(8, 3, 16, 24), (4, 3, 12, 8), (4, 0, 8, 8), (2, 1, 6, 4)])
def test_fold_windows_is_the_gather_adjoint(block, halo, height, width):
    """The kernels' dk/dv fold is the transpose of gathering each block's window from the
    zero-padded map (checked against JAX's own vjp of that gather, in the kernel's tile layout)."""
    from jaxattn.pallas.halo import fold_windows, window_tile

    win, tile = block + 2 * halo, window_tile(block + 2 * halo)
    keys = tile * -(-win // 4) * 4  # whole chunks of 4 tile rows, rows past the window unused
    kmap = randn(jax.random.PRNGKey(0), (2, height, width, 3, 5), jnp.float32)

    def gather(x):  # [B, nB, keys, heads, d] in the kernel layout (key j at row j // tile, col j % tile)
        w = halo_ops.key_windows(x, block, halo).reshape(2, -1, win, win, 3, 5)
        w = jnp.pad(w, ((0, 0), (0, 0), (0, keys // tile - win), (0, tile - win), (0, 0), (0, 0)))
        return w.reshape(2, -1, keys, 3, 5)

    windows, vjp = jax.vjp(gather, kmap)
    cot = randn(jax.random.PRNGKey(1), windows.shape, jnp.float32)
    folded = fold_windows(cot, block=block, halo=halo, win=win, tile=tile, height=height, width=width)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(vjp(cot)[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:6], ids=lambda c: "b{6}h{7}s{8}m{9}p{10}".format(*c))
def test_windows_backward_scheme_matches_oracle(case):
    """``HaloConfig(backward="windows")`` (per-window dk, dv folded onto the maps): the same
    gradients as the oracle's (the default "keys" scheme: test_matches_oracle_fwd_and_grads)."""
    from jaxattn.pallas.halo import HaloConfig

    batch, hh, ww, heads, d, e, block, halo, stride, mask, spe = case
    args = _inputs(0, batch, hh, ww, heads, d, e, block, halo, stride)
    kw = dict(block_size=block, halo_size=halo, stride=stride, mask_padding=mask, scale_pos_embed=spe)
    cot = randn(jax.random.PRNGKey(7), (batch, hh // stride, ww // stride, heads, e), jnp.float32)

    def loss(fn, *a):
        return jnp.sum(fn(*a).astype(jnp.float32) * cot)

    def windows(*a):
        return halo_ops._halo(*a, block_size=block, halo_size=halo, stride=stride, scale=d ** -0.5,
                              scale_pos_embed=spe, mask_padding=mask, use_kernel=True,
                              config=HaloConfig(backward="windows"))

    with poison_outputs():
        grads = jax.jit(jax.grad(lambda *a: loss(windows, *a), argnums=range(5)))(*args)
    ref = jax.jit(jax.grad(lambda *a: loss(lambda *b: halo_reference(*b, **kw), *a), argnums=range(5)))(*args)
    for name, g, r in zip(("dq", "dk", "dv", "drel_h", "drel_w"), grads, ref):
        assert_close(g, r, jnp.float32, name, tol=GRAD_TOL)


@pytest.mark.parametrize("block,halo,heads,d,dtype,stride", [
    (8, 3, 8, 32, jnp.bfloat16, 1), (8, 3, 8, 64, jnp.bfloat16, 2), (8, 2, 4, 128, jnp.float16, 1),
    (4, 1, 2, 16, jnp.float32, 1), (16, 4, 4, 64, jnp.bfloat16, 1)])
def test_lowers_for_cuda(block, halo, heads, d, dtype, stride):
    """Forward and backward kernels lower to Triton for the GPU on this CPU-only machine."""
    hw = 4 * block
    win = block + 2 * halo
    shapes = [(2, hw // stride, hw // stride, heads, d), (2, hw, hw, heads, d), (2, hw, hw, heads, d),
              (2 * win - 1, d), (2 * win - 1, d)]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]

    def loss(*a):
        o = halo_ops._halo(*a, block_size=block, halo_size=halo, stride=stride, scale=d ** -0.5,
                           scale_pos_embed=False, mask_padding=True, use_kernel=True, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    text = lower_for_cuda(jax.grad(loss, argnums=range(5)), *args)
    assert count_triton_calls(text) >= 2, "expected forward and backward Triton kernels"


# (H, W, heads, d, e, block, halo, stride, mask_padding, scale_pos_embed, backward scheme)
KV_CASES = [
    (16, 24, 2, 16, 16, 8, 3, 1, False, False, "keys"),   # packed: the kernel reads kv in place
    (16, 16, 1, 32, 32, 8, 2, 2, True, True, "keys"),     # packed, strided queries
    (12, 8, 2, 16, 16, 4, 3, 1, True, False, "windows"),  # packed, the windows backward
    (12, 12, 1, 16, 8, 4, 1, 1, False, False, "keys"),    # e != d: k and v sliced out first
]


@pytest.mark.parametrize("case,impl", [
    pytest.param(c, impl, id="d{3}e{4}b{5}h{6}s{7}{10}-".format(*c) + impl,
                 marks=pytest.mark.slow if impl == "pallas" and i in (1, 3) else [])  # (strided, e != d: xla)
    for i, c in enumerate(KV_CASES) for impl in ("pallas", "xla")])
def test_packed_kv_matches_oracle(case, impl):
    """``halo_attention_kv`` on a packed ``[.., heads, d + e]`` map (timm's kv projection layout)
    against the oracle on its k and v halves: output and the gradients of q, the whole kv map (its
    key channels k's, its value channels v's) and the tables."""
    from jaxattn.pallas.halo import HaloConfig

    hh, ww, heads, d, e, block, halo, stride, mask, spe, scheme = case
    q, k, v, rh, rw = _inputs(4, 2, hh, ww, heads, d, e, block, halo, stride)
    kv = jnp.concatenate([k, v], axis=-1)
    kw = dict(block_size=block, halo_size=halo, stride=stride, mask_padding=mask, scale_pos_embed=spe)
    cot = randn(jax.random.PRNGKey(3), (*q.shape[:4], e), jnp.float32)

    def run(q, kv, rh, rw):
        if impl == "xla":
            return jaxattn.halo_attention_kv(q, kv, rh, rw, value_dim=e, impl="xla", **kw)
        return halo_ops._halo(q, kv[..., :d], kv[..., d:], rh, rw, scale=d ** -0.5, use_kernel=True,
                              config=HaloConfig(backward=scheme), packed_kv=kv if d == e else None,
                              **{x: y for x, y in kw.items()})

    def oracle(q, kv, rh, rw):
        return halo_reference(q, kv[..., :d], kv[..., d:], rh, rw, **kw)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)

    with poison_outputs():
        out = jax.jit(run)(q, kv, rh, rw)
        grads = jax.jit(jax.grad(loss(run), argnums=range(4)))(q, kv, rh, rw)
    expected = jax.jit(oracle)(q, kv, rh, rw)
    assert_close(out, expected, jnp.float32, "out")
    for name, g, r in zip(("dq", "dkv", "drel_h", "drel_w"), grads,
                          jax.jit(jax.grad(loss(oracle), argnums=range(4)))(q, kv, rh, rw)):
        assert_close(g, r, jnp.float32, name, tol=GRAD_TOL)
    if impl == "pallas":  # the public op's kernel path (on the packed map when d == e), against the oracle too
        pub = jax.jit(lambda *a: jaxattn.halo_attention_kv(*a, value_dim=e, impl="pallas", **kw))(q, kv, rh, rw)
        assert_close(pub, expected, jnp.float32, "public op")


def test_packed_kv_errors():
    q, k, v, rh, rw = _inputs(0, 1, 8, 8, 1, 16, 16, 4, 1, 1)
    kv = jnp.concatenate([k, v], axis=-1)
    with pytest.raises(ValueError, match="d \\+ value_dim"):
        jaxattn.halo_attention_kv(q, kv, rh, rw, block_size=4, halo_size=1, value_dim=8)
    with pytest.raises(ValueError, match="kv must have rank 5"):
        jaxattn.halo_attention_kv(q, kv[0], rh, rw, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="multiples of block_size"):
        jaxattn.halo_attention_kv(q, kv, rh, rw, block_size=3, halo_size=1)
    from jaxattn.pallas.halo import halo_map_kernel

    with pytest.raises(ValueError, match="packed"):
        halo_map_kernel(q, k, None, jnp.zeros((2, 64, 16)), block=4, halo=1, scale=1.0)
