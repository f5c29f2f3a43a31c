"""Lightning Attention-2 kernel (interpret mode) against the dense fp32 oracle and
the lax.scan recurrence: forward, final state and gradients (q, k, v, initial state)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from conftest import GRAD_TOL, SLOW_OFF_GPU, TRITON_CALL, assert_close, count_triton_calls, lower_for_cuda, randn
from jaxattn.pallas import lightning as lk
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import lightning_recurrent, lightning_reference


def tnl_slopes(h: int) -> jax.Array:
    """ALiBi-style rates: 2^(-8(i+1)/H) for powers of two, interleaved otherwise."""
    def pow2(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    p = 1 << (h.bit_length() - 1)
    return jnp.array(pow2(h) if p == h else pow2(p) + pow2(2 * p)[0::2][: h - p], jnp.float32)


def _inputs(seed, b, n, h, d, e, dtype, state=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    # scaled so outputs stay O(1..10) for long sequences without decay
    q = randn(ks[0], (b, n, h, d), jnp.float32) * d ** -0.5
    k = randn(ks[1], (b, n, h, d), jnp.float32) * d ** -0.5
    v = randn(ks[2], (b, n, h, e), jnp.float32)
    s0 = randn(ks[3], (b, h, d, e), jnp.float32) * 0.1 if state else None
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), s0


CASES = [  # block, n, h, d, e, dtype, block_e, block_e_bwd (value chunks per program, forward
    # and backward; e pads to a power of two), schemes: "forward/backward" (fused scan or chunked)
    (16, 513, 3, 16, 16, jnp.float32, 64, None, "scan"),
    (32, 913, 12, 32, 48, jnp.float32, 16, 32, "scan"),  # 4 value chunks forward, 2 backward
    (64, 1213, 5, 64, 64, jnp.bfloat16, 64, None, "scan"),
    (128, 513, 20, 128, 32, jnp.float16, 16, None, "scan"),  # 2 chunks
    (16, 40, 1, 24, 100, jnp.float32, 32, 64, "scan"),  # 4 / 2 chunks, the last one mostly padding
    (64, 1, 2, 16, 16, jnp.bfloat16, 64, 16, "scan"),
    (16, 513, 3, 16, 16, jnp.float32, 64, None, "chunked/chunked"),
    (32, 913, 5, 32, 48, jnp.bfloat16, 16, 32, "chunked/chunked"),  # states stored in bf16, 4 value chunks
    (64, 1, 2, 16, 16, jnp.float16, 64, 16, "chunked/chunked"),
    (32, 300, 3, 64, 32, jnp.bfloat16, 32, 64, "scan/chunked"),  # ragged last block
]


@pytest.mark.parametrize("block,n,h,d,e,dtype,block_e,block_e_bwd,schemes", [
    pytest.param(*c, marks=pytest.mark.slow) if i in (1, 2, 3) else c for i, c in enumerate(CASES)])
def test_kernel_matches_oracles(block, n, h, d, e, dtype, block_e, block_e_bwd, schemes):
    q, k, v, s0 = _inputs(block + n, 1, n, h, d, e, dtype)
    slope = tnl_slopes(h).at[0].set(0.0)  # one head without decay
    fwd, bwd = schemes.split("/") if "/" in schemes else (schemes, schemes)
    cfg = lk.LightningConfig(block, 4, 2, block_e, block_e_bwd, forward=fwd, backward=bwd)
    run = jax.jit(lambda *a: lk.lightning_attention_kernel(*a, config=cfg))
    with poison_outputs():
        out, state = run(q, k, v, slope, s0)
    ref_out, ref_state = jax.jit(lightning_reference)(q, k, v, slope, s0)
    rec_out, rec_state = jax.jit(lightning_recurrent)(q, k, v, slope, s0)
    assert out.dtype == dtype and state.dtype == jnp.float32
    assert_close(rec_out, ref_out, jnp.float32, "scan vs dense oracle", tol={jnp.dtype(jnp.float32): (1e-5, 1e-5)})
    for name, ro, rs in (("dense", ref_out, ref_state), ("scan", rec_out, rec_state)):
        assert_close(out, ro, dtype, f"out vs {name}")
        assert_close(state, rs, dtype, f"state vs {name}")

    kw, ks = jax.random.split(jax.random.PRNGKey(n))
    w_o, w_s = jax.random.normal(kw, ref_out.shape), jax.random.normal(ks, ref_state.shape)

    def loss(f):
        def inner(q, k, v, s0):
            o, s = f(q, k, v, slope, s0)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)
        return inner

    with poison_outputs():
        grads = jax.jit(jax.grad(loss(lambda *a: lk.lightning_attention_kernel(*a, config=cfg)), (0, 1, 2, 3)))(q, k, v, s0)
    ref_grads = jax.jit(jax.grad(loss(lightning_reference), (0, 1, 2, 3)))(q, k, v, s0)
    for name, g, rg in zip(["dq", "dk", "dv", "d_initial_state"], grads, ref_grads):
        assert_close(g, rg, dtype, name, tol=GRAD_TOL)


SEGMENT_CASES = [  # n, segments, dtype, block, initial state: the sequence split into segments
    # that run in parallel (the last one ragged except in the second case)
    (300, 3, jnp.float32, 16, True, "scan"),
    (256, 4, jnp.float32, 32, False, "scan"),
    (200, 7, jnp.bfloat16, 16, True, "scan"),
    (97, 2, jnp.float16, 64, True, "scan"),
    (300, 3, jnp.bfloat16, 32, True, "chunked"),  # both passes chunked
]


@pytest.mark.parametrize("n,segments,dtype,block,state,forward", SEGMENT_CASES)
def test_segmented_kernel_matches_oracle(n, segments, dtype, block, state, forward):
    h, d, e = 3, 16, 24
    q, k, v, s0 = _inputs(n + segments, 2, n, h, d, e, dtype, state=state)
    slope = tnl_slopes(h).at[0].set(0.0)
    cfg = lk.LightningConfig(block, 4, 2, 16, 32, forward=forward, backward=forward)
    seg = lambda *a: lk.lightning_attention_kernel(*a, config=cfg, segments=segments)  # noqa: E731
    with poison_outputs():
        out, final = jax.jit(seg)(q, k, v, slope, s0)
    ref_out, ref_state = jax.jit(lightning_reference)(q, k, v, slope, s0)
    assert_close(out, ref_out, dtype, "out")
    assert_close(final, ref_state, dtype, "final state")
    w_o = jax.random.normal(jax.random.PRNGKey(1), ref_out.shape)
    w_s = jax.random.normal(jax.random.PRNGKey(2), ref_state.shape)

    def loss(f):
        def inner(q, k, v, *s0):
            o, s = f(q, k, v, slope, *s0)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)
        return inner

    argnums = (0, 1, 2, 3) if state else (0, 1, 2)
    args = (q, k, v, s0) if state else (q, k, v)
    with poison_outputs():
        grads = jax.jit(jax.grad(loss(seg), argnums))(*args)
    ref_grads = jax.jit(jax.grad(loss(lightning_reference), argnums))(*args)
    for name, g, rg in zip(["dq", "dk", "dv", "d_initial_state"], grads, ref_grads):
        assert_close(g, rg, dtype, name, tol=GRAD_TOL)


@pytest.mark.parametrize("segments,initial,final,scheme", [
    (1, True, False, "scan"), (3, True, False, "scan"), (1, False, False, "chunked"),
    (1, False, True, "scan"), (3, False, False, "chunked"), (1, True, False, "chunked"),
])
def test_without_initial_or_final_state(segments, initial, final, scheme):
    """Without an initial state the kernels start from zeros (no zero tensor is made or read, no
    dS0 written); ``final_state=False`` (the op without ``return_state``; TNL training) writes no
    final state and skips its backward terms. Output, final state and gradients equal the
    oracle's, and the kernel calls take and return only the state tensors asked for."""
    h, d, e, n = 3, 16, 24, 300
    q, k, v, s0 = _inputs(5, 2, n, h, d, e, jnp.float32, state=initial)
    slope = tnl_slopes(h)
    cfg = lk.LightningConfig(32, 4, 2, 16, 32, forward=scheme, backward=scheme)
    w_o = jax.random.normal(jax.random.PRNGKey(1), (2, n, h, e))
    w_s = jax.random.normal(jax.random.PRNGKey(2), (2, h, d, e))
    states = (s0,) if initial else ()

    def loss(f):
        def inner(q, k, v, *s0):
            out, st = f(q, k, v, slope, *s0)
            return jnp.sum(out * w_o) + (jnp.sum(st * w_s) if final else 0.0)
        return inner

    def kernel(*a):
        out, st = lk.lightning_attention_kernel(*a, config=cfg, segments=segments, final_state=final)
        assert (st is None) == (not final)
        return out, st

    args, argnums = (q, k, v, *states), tuple(range(3 + initial))
    with poison_outputs():
        grads = jax.jit(jax.grad(loss(kernel), argnums))(*args)
    ref = jax.jit(jax.grad(loss(lightning_reference), argnums))(*args)
    for name, g, r in zip(["dq", "dk", "dv", "d_initial_state"], grads, ref):
        assert_close(g, r, jnp.float32, name, tol=GRAD_TOL)
    if segments == 1:  # the kernels take and return state tensors ([2, h, d, e pad 32] fp32) only if asked
        def gpu(*a):
            out, st = lk.lightning_attention_kernel(*a, config=cfg, segments=1, final_state=final, interpret=False)
            return out, st

        text = lower_for_cuda(jax.grad(loss(gpu), argnums), *args)
        calls = [line for line in text.splitlines() if TRITON_CALL in line]
        assert len(calls) == (3 if scheme == "scan" else 5), calls  # (fwd, dq, dkv / 2 states, out, dstates, grads)
        # s0 read twice and dS0 written; the final state written and its cotangent read
        assert sum(line.count(f"tensor<2x{h}x{d}x32xf32>") for line in calls) == 3 * initial + 2 * final, calls


def test_config_rejects_unknown_forward_scheme():
    with pytest.raises(ValueError, match="forward must be 'scan' or 'chunked'"):
        lk.LightningConfig(forward="parallel")
    with pytest.raises(ValueError, match="backward must be 'scan' or 'chunked'"):
        lk.LightningConfig(backward="fast")


def test_segment_count_fills_the_gpu_only_when_needed():
    cfg = lk.lightning_config(128, jnp.bfloat16)
    assert lk.segment_count(1, 16, 65536, cfg, 128) == 16  # 16 heads x 2 backward chunks x 16
    assert lk.segment_count(8, 16, 8192, cfg, 128) == 2
    assert lk.segment_count(32, 16, 2048, cfg, 128) == 1  # already 1024 programs
    assert lk.segment_count(1, 1, 1500, cfg, 128) == 1  # segments stay >= MIN_SEGMENT rows
    with pytest.raises(ValueError, match="segments"):
        lk.lightning_attention_kernel(*_inputs(0, 1, 8, 1, 16, 16, jnp.float32)[:3], jnp.zeros(1), segments=9)


@pytest.mark.parametrize("scheme", ["scan", "chunked"])
def test_segmented_kernel_lowers_for_cuda(scheme):
    args = [jax.ShapeDtypeStruct((1, 4000, 2, 128), jnp.bfloat16)] * 3 + [jax.ShapeDtypeStruct((2,), jnp.float32)]
    cfg = dataclasses.replace(lk.lightning_config(128, jnp.bfloat16), forward=scheme, backward=scheme)

    def loss(q, k, v, s):
        o, st = lk.lightning_attention_kernel(q, k, v, s, config=cfg, interpret=False, segments=4)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

    # forward: segment states + the forward kernel (chunked: block states + block outputs);
    # backward: incoming-state cotangents + dq + dk/dv (chunked: block states + block gradient
    # states + block gradients)
    calls = count_triton_calls(lower_for_cuda(jax.grad(loss, (0, 1, 2)), *args))
    assert calls == (5 if scheme == "scan" else 7)


def test_decay_zero_is_plain_causal_linear_attention():
    q, k, v, _ = _inputs(1, 2, 77, 4, 32, 32, jnp.float32, state=False)
    out = jaxattn.lightning_attention(q, k, v, jnp.zeros(4), impl="pallas")
    tri = jnp.tril(jnp.ones((77, 77)))
    plain = jnp.einsum("bihd,bjhd,ij,bjhe->bihe", q, k, tri, v, precision="highest")
    assert_close(out, plain, jnp.float32)


def test_prefill_then_decode_reproduces_full_forward():
    b, n, p, h, d, e = 2, 60, 37, 4, 32, 16
    q, k, v, _ = _inputs(2, b, n, h, d, e, jnp.float32, state=False)
    slope = tnl_slopes(h)
    full = jaxattn.lightning_attention(q, k, v, slope, impl="pallas")
    pre, state = jaxattn.lightning_attention(q[:, :p], k[:, :p], v[:, :p], slope, impl="pallas",
                                             return_state=True)
    step = jax.jit(jaxattn.lightning_attention_step)
    outs = [pre]
    for t in range(p, n):
        o, state = step(q[:, t], k[:, t], v[:, t], slope, state)
        outs.append(o[:, None])
    assert_close(jnp.concatenate(outs, axis=1), full, jnp.float32, "prefill + decode")
    # chunked prefill through initial_state gives the same
    second = jaxattn.lightning_attention(q[:, p:], k[:, p:], v[:, p:], slope, impl="pallas",
                                         initial_state=jaxattn.lightning_attention(
                                             q[:, :p], k[:, :p], v[:, :p], slope, impl="pallas",
                                             return_state=True)[1])
    assert_close(second, full[:, p:], jnp.float32, "chunked prefill")


def test_xla_impl_and_auto():
    q, k, v, s0 = _inputs(3, 1, 50, 2, 16, 16, jnp.bfloat16)
    slope = tnl_slopes(2)
    ref = lightning_recurrent(q, k, v, slope, s0)[0]
    assert_close(jaxattn.lightning_attention(q, k, v, slope, initial_state=s0, impl="xla"), ref, jnp.bfloat16)
    if jax.default_backend() != "gpu":
        assert (jaxattn.lightning_attention(q, k, v, slope, initial_state=s0) ==
                jaxattn.lightning_attention(q, k, v, slope, initial_state=s0, impl="xla")).all()


@pytest.mark.parametrize("forward", ["scan", "chunked"])
@pytest.mark.parametrize("key", sorted(lk.CONFIGS))
def test_every_config_lowers_for_cuda(key, forward):
    dim, size = key
    cfg = dataclasses.replace(lk.CONFIGS[key], forward=forward, backward=forward)
    dtypes = [jnp.float32] if size == 4 else [jnp.bfloat16, jnp.float16]
    for dtype in dtypes:
        args = [jax.ShapeDtypeStruct((2, 1000, 3, dim), dtype)] * 3 + [
            jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((2, 3, dim, dim), jnp.float32)]

        def loss(q, k, v, s, s0):
            o, st = lk.lightning_attention_kernel(q, k, v, s, s0, config=cfg, interpret=False)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

        text = lower_for_cuda(jax.grad(loss, (0, 1, 2, 4)), *args)
        assert count_triton_calls(text) == (3 if forward == "scan" else 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(slope=jnp.zeros(3)), r"slope must have shape \[heads\] = \(4,\)"),
        (dict(slope=jnp.array([0.1, -0.1, 0.0, 0.2])), r"slope must be finite and >= 0"),
        (dict(slope=jnp.zeros(4, jnp.int32)), r"slope must be floating"),
        (dict(initial_state=jnp.zeros((2, 4, 16, 8))), r"initial_state must have shape .* = \(2, 4, 16, 16\)"),
        (dict(k=jnp.zeros((2, 9, 4, 16))), r"k has sequence length 9"),
        (dict(k=jnp.zeros((2, 10, 4, 8))), r"k has head dim 8"),
        (dict(v=jnp.zeros((2, 10, 3, 16))), r"v has heads 3"),
        (dict(q=jnp.zeros((2, 10, 4))), r"q must have rank 4"),
        (dict(q=jnp.zeros((2, 10, 4, 16), jnp.int32)), r"q has dtype int32"),
        (dict(impl="triton"), r"impl must be one of"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(q=jnp.zeros((2, 10, 4, 16)), k=jnp.zeros((2, 10, 4, 16)), v=jnp.zeros((2, 10, 4, 16)),
                slope=jnp.zeros(4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        jaxattn.lightning_attention(**args)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_traced_bad_slope_gives_nan(impl):
    """Under jit the slope's values cannot be checked: a negative or non-finite entry makes that
    head's output NaN (the other heads stay finite), for the op and the decode step."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 20, 3, 16))
    slope = jnp.array([0.1, -0.1, 0.0])
    out = jax.jit(lambda s: jaxattn.lightning_attention(x, x, x, s, impl=impl))(slope)
    assert bool(jnp.isnan(out[:, :, 1]).all()) and bool(jnp.isfinite(out[:, :, ::2]).all())
    assert bool(jnp.isfinite(jax.jit(lambda s: jaxattn.lightning_attention(x, x, x, s, impl=impl))(
        jnp.abs(slope))).all())
    st = jnp.zeros((1, 3, 16, 16))
    o, _ = jax.jit(lambda s: jaxattn.lightning_attention_step(x[:, 0], x[:, 0], x[:, 0], s, st))(
        jnp.abs(slope).at[0].set(jnp.inf))
    assert bool(jnp.isnan(o[:, 0]).all()) and bool(jnp.isfinite(o[:, 1:]).all())


def test_bad_decode_state():
    q = jnp.zeros((2, 4, 16))
    with pytest.raises(ValueError, match=r"state must have shape"):
        jaxattn.lightning_attention_step(q, q, q, jnp.zeros(4), jnp.zeros((2, 4, 16, 15)))


def _packed_ids(b: int, n: int, cuts: tuple[int, ...]) -> jax.Array:
    """Row 0: documents starting at ``cuts`` (ids alternate 0/1, so an id repeats in a later
    document); row 1: one document; further rows: every token its own document."""
    ids = [[sum(c <= t for c in cuts) % 2 for t in range(n)], [7] * n]
    ids += [list(range(n))] * (b - 2)
    return jnp.asarray(ids, jnp.int32)


def _per_document_oracle(q, k, v, slope, s0, seg):
    """Each document run alone through the unpacked dense oracle (the first from ``s0``),
    outputs concatenated; the final state is the last document's (an oracle independent of the
    packed masks)."""
    outs, states = [], []
    for b in range(q.shape[0]):
        row = [int(x) for x in seg[b]]
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        parts = []
        for i, (a, z) in enumerate(zip(starts[:-1], starts[1:])):
            init = None if s0 is None or i else s0[b:b + 1]
            o, st = lightning_reference(q[b:b + 1, a:z], k[b:b + 1, a:z], v[b:b + 1, a:z], slope, init)
            parts.append(o)
        outs.append(jnp.concatenate(parts, axis=1))
        states.append(st)
    return jnp.concatenate(outs), jnp.concatenate(states)


PACKED_CASES = [  # n, block, scheme, segments (sequence split inside the call), dtype, initial state;
    # documents start at block starts (16, 32, 112: the 3-segment split's second segment), mid-block,
    # a one-token document and the last token alone
    (100, 16, "scan", 1, jnp.float32, True),
    (100, 16, "chunked", 1, jnp.float32, False),
    (300, 16, "scan", 3, jnp.float32, True),
    (300, 32, "chunked", 3, jnp.bfloat16, True),
    (300, 16, "scan/chunked", 1, jnp.float16, True),
]
PACKED_CUTS = (1, 16, 17, 32, 50, 51, 99, 112, 200, 299)


@pytest.mark.parametrize("n,block,schemes,segments,dtype,state", [
    pytest.param(*c, marks=SLOW_OFF_GPU if i < 2 else pytest.mark.slow) for i, c in enumerate(PACKED_CASES)])
def test_packed_sequences_match_per_document_oracle(n, block, schemes, segments, dtype, state):
    """segment_ids: the kernel equals each document run alone (forward, final state, gradients of
    q, k, v and the initial state), the dense and scan oracles agree on the packed form, and the
    result differs from the unpacked op (the masks matter)."""
    h, d, e = 3, 16, 24
    q, k, v, s0 = _inputs(n + block, 3, n, h, d, e, dtype, state=state)
    slope = tnl_slopes(h).at[0].set(0.0)
    seg = _packed_ids(3, n, tuple(c for c in PACKED_CUTS if c < n))
    fwd, bwd = schemes.split("/") if "/" in schemes else (schemes, schemes)
    cfg = lk.LightningConfig(block, 4, 2, 16, 32, forward=fwd, backward=bwd)
    states = (s0,) if state else ()

    def kernel(q, k, v, *s0):
        return lk.lightning_attention_kernel(q, k, v, slope, *s0, config=cfg, segments=segments, segment_ids=seg)

    with poison_outputs():
        out, final = jax.jit(kernel)(q, k, v, *states)
    doc_out, doc_state = _per_document_oracle(q, k, v, slope, s0, seg)
    ref_out, ref_state = lightning_reference(q, k, v, slope, s0, seg)
    rec_out, rec_state = lightning_recurrent(q, k, v, slope, s0, seg)
    tol = {jnp.dtype(jnp.float32): (1e-5, 1e-5)}
    for name, a, b in (("dense", ref_out, doc_out), ("scan", rec_out, doc_out), ("dense state", ref_state, doc_state),
                       ("scan state", rec_state, doc_state)):
        assert_close(a, b, jnp.float32, f"packed {name} oracle vs per document", tol=tol)
    assert_close(out, doc_out, dtype, "out")
    assert_close(final, doc_state, dtype, "final state")
    unpacked = lightning_reference(q, k, v, slope, s0)[0]
    assert float(jnp.abs(unpacked - doc_out).max()) > 0.1

    w_o = jax.random.normal(jax.random.PRNGKey(1), doc_out.shape)
    w_s = jax.random.normal(jax.random.PRNGKey(2), doc_state.shape)

    def loss(f):
        def inner(q, k, v, *s0):
            o, st = f(q, k, v, *s0)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(st * w_s)
        return inner

    argnums = tuple(range(3 + state))
    with poison_outputs():
        grads = jax.jit(jax.grad(loss(kernel), argnums))(q, k, v, *states)
    ref_grads = jax.grad(loss(lambda q, k, v, *s0: lightning_reference(q, k, v, slope, *(s0 or (None,)), seg)),
                         argnums)(q, k, v, *states)
    for name, g, rg in zip(["dq", "dk", "dv", "d_initial_state"], grads, ref_grads):
        assert_close(g, rg, dtype, name, tol=GRAD_TOL)


def test_packed_op_xla_and_pallas_agree_and_check_segment_ids():
    q, k, v, s0 = _inputs(4, 2, 70, 2, 16, 8, jnp.float32)
    slope = tnl_slopes(2)
    seg = jnp.asarray([[0] * 30 + [1] * 40, [5] * 70], jnp.int32)
    outs = [jaxattn.lightning_attention(q, k, v, slope, initial_state=s0, segment_ids=seg, return_state=True,
                                        impl=impl) for impl in ("xla", "pallas")]
    for a, b in zip(*outs):
        assert_close(b, a, jnp.float32)
    # the second row (one document) is the unpacked op's
    plain = jaxattn.lightning_attention(q, k, v, slope, initial_state=s0, impl="xla")
    assert_close(outs[1][0][1], plain[1], jnp.float32)
    bad = [(dict(segment_ids=seg[:, :69]), r"segment_ids must have shape \[batch, seq\] = \(2, 70\)"),
           (dict(segment_ids=seg.astype(jnp.float32)), r"segment_ids must have an integer dtype"),
           (dict(segment_ids=seg[0]), r"segment_ids must have rank 2")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            jaxattn.lightning_attention(q, k, v, slope, **kwargs)


@pytest.mark.parametrize("scheme,segments", [("scan", 1), ("chunked", 1), ("scan", 4), ("chunked", 4)])
def test_packed_kernels_lower_for_cuda(scheme, segments):
    args = [jax.ShapeDtypeStruct((2, 4000, 2, 128), jnp.bfloat16)] * 3 + [
        jax.ShapeDtypeStruct((2,), jnp.float32), jax.ShapeDtypeStruct((2, 4000), jnp.int32)]
    cfg = dataclasses.replace(lk.lightning_config(128, jnp.bfloat16), forward=scheme, backward=scheme)

    def loss(q, k, v, s, seg):
        o, st = lk.lightning_attention_kernel(q, k, v, s, config=cfg, interpret=False, segments=segments,
                                              segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

    calls = count_triton_calls(lower_for_cuda(jax.grad(loss, (0, 1, 2)), *args))
    assert calls == {("scan", 1): 3, ("chunked", 1): 5, ("scan", 4): 5, ("chunked", 4): 7}[scheme, segments]


@pytest.mark.parametrize("impl", [pytest.param("pallas", marks=pytest.mark.slow), "xla"])  # (the kernels' varlen
def test_varlen_documents_each_from_their_own_state(impl):  # path by default: test_gated_linear, test_gated_delta_varlen
    """cu_seqlens (fla's varlen form): documents packed in one row, each from its own initial state (one empty),
    outputs, each document's final state and the gradients of q, k, v and the initial states equal
    lightning_reference on each document alone (the gated linear attention path with the constant decay)."""
    import numpy as np

    lengths = [7, 0, 33, 1, 20]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    n, h, d = cu[-1], 2, 16
    ks = jax.random.split(jax.random.key(3), 4)
    q, k, v = (0.5 * jax.random.normal(key, (1, n, h, d)) for key in ks[:3])
    slope = jnp.asarray([0.05, 0.4])
    s0 = 0.3 * jax.random.normal(ks[3], (len(lengths), h, d, d))
    ct = jax.random.normal(jax.random.key(9), (1, n, h, d))

    def ours(q, k, v, s0):
        o, s = jaxattn.lightning_attention(q, k, v, slope, initial_state=s0, return_state=True, impl=impl,
                                           cu_seqlens=jnp.asarray(cu, jnp.int32))
        return jnp.sum(o * ct) + jnp.sum(s * jnp.cos(s)), (o, s)

    def alone(q, k, v, s0):
        outs, finals = [], []
        for i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
            if a == e:
                finals.append(s0[i])
                continue
            o, s = lightning_reference(q[:, a:e], k[:, a:e], v[:, a:e], slope, s0[i:i + 1])
            outs.append(o)
            finals.append(s[0])
        o, s = jnp.concatenate(outs, axis=1), jnp.stack(finals)
        return jnp.sum(o * ct) + jnp.sum(s * jnp.cos(s)), (o, s)

    with poison_outputs():
        (_, (o, s)), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, s0)
    (_, (ro, rs)), want = jax.value_and_grad(alone, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, s0)
    assert_close(o, ro, jnp.float32, "output")
    assert_close(s, rs, jnp.float32, "final states")
    for name, a, e in zip(("dq", "dk", "dv", "dstates"), grads, want):
        assert_close(a, e, jnp.float32, name, tol=GRAD_TOL)
