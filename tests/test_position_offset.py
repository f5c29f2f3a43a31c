"""``position_offset``: q and k as blocks of a larger problem (ring attention's hops). The flash
kernels (interpret mode) and the XLA path against an independent oracle: the fp32 reference on the
whole problem, with the call's q and k placed at their offsets in zero arrays and every key outside
the call's block masked, restricted to the call's query rows. Causal, windows, ALiBi, soft caps,
score_mod with a learned table (its gradient too) and segment ids, forward and gradients; traced
offsets under ``jit``; the CUDA lowering; bad offsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, assert_close, count_triton_calls, lower_for_cuda, randn
from jaxattn.pallas import flash
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import attention_reference

SMALL = flash.FlashConfig(32, 16, 4, 2, 32, 16, 16, 32, 4, 2)  # many blocks on short sequences
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
RADIUS = 24  # the relative-bias table's reach


def relative_bias(x, b, h, q_idx, kv_idx, table):
    """A learned relative-position bias (clipped distance) plus terms of each index alone (a wrong
    query or key offset shows in either)."""
    rel = jnp.clip(q_idx - kv_idx, -RADIUS, RADIUS) + RADIUS
    return x + table[h, rel] + 0.05 * (q_idx % 7) - 0.03 * (kv_idx % 5)


def _case(seed: int) -> dict:
    r = np.random.default_rng(2000 + seed)
    hkv = int(r.choice([1, 2]))
    nq, nk = int(r.integers(1, 90)), int(r.integers(1, 90))
    side = lambda: None if r.random() < 0.3 else int(r.integers(0, 60))  # noqa: E731
    window = (side(), side()) if r.random() < 0.6 else None
    return dict(b=int(r.integers(1, 3)), nq=nq, nk=nk, q0=int(r.integers(0, 80)), k0=int(r.integers(0, 80)),
                hkv=hkv, hq=hkv * int(r.choice([1, 3])), d=int(r.choice([32, 64])), causal=bool(r.random() < 0.6),
                window=None if window == (None, None) else window, alibi=bool(r.random() < 0.4),
                cap=None if r.random() < 0.6 else 5.0, mod=bool(r.random() < 0.5), seg=bool(r.random() < 0.25),
                dtype=DTYPES[seed % 3], cfg=SMALL if r.random() < 0.7 else None)


def _inputs(c: dict):
    ks = jax.random.split(jax.random.PRNGKey(c["nq"] * 131 + c["nk"]), 7)
    q = randn(ks[0], (c["b"], c["nq"], c["hq"], c["d"]), c["dtype"])
    k = randn(ks[1], (c["b"], c["nk"], c["hkv"], c["d"]), c["dtype"])
    v = randn(ks[2], (c["b"], c["nk"], c["hkv"], c["d"]), c["dtype"])
    w = randn(ks[3], (c["b"], c["nq"], c["hq"], c["d"]), jnp.float32)
    table = randn(ks[4], (c["hq"], 2 * RADIUS + 1), jnp.float32) * 0.5
    slopes = jnp.exp2(-jnp.arange(1, c["hq"] + 1, dtype=jnp.float32))
    n = max(c["q0"] + c["nq"], c["k0"] + c["nk"])
    seg = jnp.asarray(np.cumsum(np.random.default_rng(c["nq"]).random((c["b"], n)) < 0.05, axis=1), jnp.int32)
    return q, k, v, w, table, slopes, seg


def _kwargs(c: dict, slopes, table_arg=()):
    kw = dict(causal=c["causal"], local_window_size=c["window"], logits_soft_cap=c["cap"])
    if c["alibi"]:
        kw["alibi_slopes"] = slopes
    if c["mod"]:
        kw.update(score_mod=relative_bias, score_mod_tables=table_arg)
    return kw


def _oracle(c: dict, slopes, seg):
    """``(q, k, v, table) -> (out, lse)`` of the call's block, from the whole problem: q rows and k/v
    rows placed at their offsets in zero arrays of one length n (positions = indices, top-left), the keys
    outside ``[k0, k0 + nk)`` masked."""
    q0, k0, nq, nk = c["q0"], c["k0"], c["nq"], c["nk"]
    n = max(q0 + nq, k0 + nk)

    def place(x, at):
        return jax.lax.dynamic_update_slice_in_dim(jnp.zeros((x.shape[0], n, *x.shape[2:]), jnp.float32),
                                                   x.astype(jnp.float32), at, axis=1)

    def run(q, k, v, table):
        keep = (jnp.arange(n) >= k0) & (jnp.arange(n) < k0 + nk)
        kw = _kwargs(c, slopes, (table,))
        if c["seg"]:
            kw.update(q_segment_ids=seg, kv_segment_ids=seg)
        out, lse = attention_reference(place(q, q0), place(k, k0), place(v, k0), mask=keep[None, None, None, :], **kw)
        return out[:, q0:q0 + nq], lse[:, q0:q0 + nq]

    return run


def _differentiated(fn, w):
    def f(q, k, v, table):
        o, lse = fn(q, k, v, table)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (o, lse)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("seed", [*range(6), *(pytest.param(s, marks=pytest.mark.slow) for s in range(6, 16))])
def test_kernel_with_offsets_matches_the_whole_problem(seed):
    c = _case(seed)
    q, k, v, w, table, slopes, seg = _inputs(c)
    offs = (c["q0"], c["k0"])
    segs = {}
    if c["seg"]:
        segs = dict(q_segment_ids=seg[:, c["q0"]:c["q0"] + c["nq"]], kv_segment_ids=seg[:, c["k0"]:c["k0"] + c["nk"]])

    def kernel(q, k, v, table):
        return flash.flash_attention(q, k, v, position_offset=offs, config=c["cfg"],
                                     **_kwargs(c, slopes, (table,)), **segs)

    with poison_outputs():
        (_, (out, lse)), grads = _differentiated(kernel, w)(q, k, v, table)
    (_, (ref, ref_lse)), ref_grads = _differentiated(_oracle(c, slopes, seg), w)(q, k, v, table)
    assert_close(out, ref, c["dtype"], f"out {c}")
    assert_close(lse, ref_lse, jnp.float32 if c["dtype"] == jnp.float32 else c["dtype"], f"lse {c}")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, c["dtype"], f"{name} {c}", tol=GRAD_TOL)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_public_op_with_traced_offsets(impl):
    """``jaxattn.attention(position_offset=...)`` with the offsets traced under ``jit`` (one compiled
    program for every offset), causal + window + ALiBi + score_mod, against the oracle; and the
    offsets matter (another offset gives another result)."""
    c = dict(b=1, nq=40, nk=56, q0=0, k0=0, hkv=1, hq=2, d=32, causal=True, window=(30, None), alibi=True,
             cap=None, mod=True, seg=False, dtype=jnp.float32, cfg=None)
    q, k, v, w, table, slopes, seg = _inputs(c)
    run = jax.jit(lambda q, k, v, t, q0, k0: jaxattn.attention(
        q, k, v, position_offset=(q0, k0), impl=impl, return_lse=True, **_kwargs(c, slopes, (t,))))
    outs = []
    for q0, k0 in ((50, 20), (13, 40), (70, 0)):
        out, lse = run(q, k, v, table, jnp.int32(q0), jnp.int32(k0))
        ref, ref_lse = jax.jit(_oracle(dict(c, q0=q0, k0=k0), slopes, seg))(q, k, v, table)
        assert_close(out, ref, jnp.float32, f"out {impl} {(q0, k0)}")
        assert_close(lse, ref_lse, jnp.float32, f"lse {impl} {(q0, k0)}")
        outs.append(out)
    assert float(jnp.max(jnp.abs(outs[0] - outs[2]))) > 0.05


def test_offsets_without_features_change_nothing_but_alignment():
    """Without causal/window/ALiBi/score_mod the positions do not matter: any offsets give plain
    attention; with causal, ``(kv_len - q_len, 0)`` is the default bottom-right alignment."""
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q = randn(ks[0], (1, 24, 2, 32), jnp.float32)
    k, v = (randn(kk, (1, 40, 2, 32), jnp.float32) for kk in ks[1:])
    plain = jaxattn.attention(q, k, v, impl="pallas")
    assert_close(jaxattn.attention(q, k, v, impl="pallas", position_offset=(90, 3)), plain, jnp.float32, "free")
    causal = jaxattn.attention(q, k, v, causal=True, impl="pallas")
    assert_close(jaxattn.attention(q, k, v, causal=True, impl="pallas", position_offset=(16, 0)), causal,
                 jnp.float32, "bottom-right")
    top_left = jaxattn.attention(q, k, v, causal=True, impl="pallas", position_offset=(0, 0))
    assert float(jnp.max(jnp.abs(top_left - causal))) > 0.05


def test_bad_offsets_raise():
    x = jnp.zeros((1, 8, 2, 32))
    for bad in ((1,), (1, 2, 3), (1.5, 0), (jnp.zeros((2,), jnp.int32), 0), (jnp.float32(1), 0), "ab"):
        with pytest.raises(ValueError, match="position_offset"):
            jaxattn.attention(x, x, x, causal=True, position_offset=bad)
    y = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="position_offset"):
        jaxattn.attention(y, y, y, causal=True, position_offset=(0, 0), impl="mosaic")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_offsets_lower_for_cuda(dtype):
    args = [jax.ShapeDtypeStruct((2, 2048, 8, 128), dtype), jax.ShapeDtypeStruct((2, 2048, 2, 128), dtype),
            jax.ShapeDtypeStruct((2, 2048, 2, 128), dtype), jax.ShapeDtypeStruct((8, 2 * RADIUS + 1), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)]

    def loss(q, k, v, table, q0, k0):
        o, _ = flash.flash_attention(q, k, v, causal=True, local_window_size=(1024, None), logits_soft_cap=50.0,
                                     alibi_slopes=jnp.ones((8,)), score_mod=relative_bias, score_mod_tables=(table,),
                                     position_offset=(q0, k0), interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    assert count_triton_calls(lower_for_cuda(jax.value_and_grad(loss, (0, 1, 2, 3)), *args)) >= 3
