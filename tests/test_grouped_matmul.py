"""Grouped matmul kernels (jaxattn.pallas.grouped_matmul, interpret mode) against the row-masked dense oracle
(jaxattn.reference.grouped_matmul_reference), forward and both gradients, on ragged shapes with empty groups,
trailing rows of no group, dims that are not powers of two, every dtype; outputs poisoned; the work list;
CUDA lowering; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SLOW_OFF_GPU, assert_close, count_triton_calls, lower_for_cuda
from jaxattn import grouped_matmul
from jaxattn.pallas._common import compile_for_gpu, poison_outputs
from jaxattn.pallas.grouped_matmul import group_metadata
from jaxattn.reference import grouped_matmul_reference

TOL = {jnp.dtype(jnp.float32): (1e-5, 1e-5), jnp.dtype(jnp.bfloat16): (1.5e-2, 1.5e-2),
       jnp.dtype(jnp.float16): (4e-3, 4e-3)}
GRAD_TOL = {jnp.dtype(jnp.float32): (1e-5, 1e-5), jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
            jnp.dtype(jnp.float16): (5e-3, 5e-3)}

_slow = functools.partial(pytest.param, marks=pytest.mark.slow)
CASES = [  # (rows, K, N, group sizes, dtype)
    (37, 32, 48, [5, 0, 20, 10], jnp.float32),  # 2 rows of no group at the end
    (100, 64, 128, [0, 0, 64, 30, 6], jnp.bfloat16),  # leading empty groups, a group on a tile boundary
    _slow(9, 20, 24, [3, 3, 0], jnp.float32),  # K and N not multiples of 16 (padded), 3 trailing rows
    pytest.param(130, 96, 80, [1, 1, 1, 60, 67], jnp.float16, marks=SLOW_OFF_GPU),  # tiny groups sharing a tile
    _slow(64, 128, 256, [64], jnp.bfloat16),  # one group
    _slow(5, 16, 16, [0, 0, 0, 0], jnp.float32),  # no rows in any group: zeros
]


def _inputs(m, k, n, sizes, dtype):
    ks = jax.random.split(jax.random.key(m * 7 + k), 3)
    lhs = jax.random.normal(ks[0], (m, k)).astype(dtype)
    rhs = jax.random.normal(ks[1], (len(sizes), k, n)).astype(dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), jax.random.normal(ks[2], (m, n))


@pytest.mark.parametrize("m,k,n,sizes,dtype", CASES)
def test_matches_the_oracle_forward_and_gradients(m, k, n, sizes, dtype):
    lhs, rhs, gs, ct = _inputs(m, k, n, sizes, dtype)
    with poison_outputs():
        out = grouped_matmul(lhs, rhs, gs, preferred_element_type=jnp.float32, impl="pallas")
        low = grouped_matmul(lhs, rhs, gs, impl="pallas")
    want = grouped_matmul_reference(lhs, rhs, gs)
    assert out.dtype == jnp.float32 and low.dtype == dtype
    assert_close(out, want, dtype, "forward", tol=TOL)
    assert_close(low, want, dtype, "forward in the input dtype", tol=TOL)
    assert not np.asarray(out[sum(sizes):]).any()  # rows of no group: zeros

    def ours(lhs, rhs):
        return jnp.sum(grouped_matmul(lhs, rhs, gs, preferred_element_type=jnp.float32, impl="pallas") * ct)

    def ref(lhs, rhs):
        return jnp.sum(grouped_matmul_reference(lhs, rhs, gs) * ct)

    with poison_outputs():
        got = jax.grad(ours, argnums=(0, 1))(lhs, rhs)
    exp = jax.grad(ref, argnums=(0, 1))(lhs, rhs)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(got[0], exp[0], dtype, "dlhs", tol=GRAD_TOL)
    assert_close(got[1], exp[1], dtype, "drhs", tol=GRAD_TOL)
    empty = [g for g, s in enumerate(sizes) if s == 0]
    assert not np.asarray(got[1][jnp.asarray(empty, jnp.int32)]).any() if empty else True  # unused groups: zero


def test_xla_path_is_ragged_dot():
    lhs, rhs, gs, _ = _inputs(37, 32, 48, [5, 0, 20, 10], jnp.float32)
    np.testing.assert_allclose(np.asarray(grouped_matmul(lhs, rhs, gs, impl="xla")),
                               np.asarray(jax.lax.ragged_dot(lhs, rhs, gs)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grouped_matmul(lhs, rhs, gs)),  # auto: XLA without a GPU
                               np.asarray(grouped_matmul(lhs, rhs, gs, impl="xla")), rtol=0, atol=0)


@pytest.mark.parametrize("sizes", [[5, 0, 20, 10], [0, 64, 0], [1] * 9 + [0], [0, 0, 0]])
def test_work_list_visits_each_group_row_tile_once(sizes):
    m, bm = 64, 16
    offsets, group, tile = (np.asarray(a) for a in group_metadata(jnp.asarray(sizes), m, bm))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(sizes)]))
    assert len(group) == -(-m // bm) + len(sizes) - 1
    want = [(g, t) for g, s in enumerate(sizes) if s for t in range(offsets[g] // bm, (offsets[g + 1] - 1) // bm + 1)]
    used = group >= 0
    assert list(zip(group[used], tile[used])) == want
    assert used[: len(want)].all() and not used[len(want):].any()  # the unused entries last


def test_lowers_for_cuda_forward_and_backward():
    lhs, rhs, gs, ct = _inputs(100, 64, 128, [0, 0, 64, 30, 6], jnp.bfloat16)

    def step(lhs, rhs):
        return jax.grad(lambda a, b: jnp.sum(grouped_matmul(a, b, gs, preferred_element_type=jnp.float32) * ct),
                        argnums=(0, 1))(lhs, rhs)

    with compile_for_gpu():
        text = lower_for_cuda(step, lhs, rhs)
    assert count_triton_calls(text) == 3 and "ragged_dot" not in text  # forward, dlhs, drhs


def test_bad_input():
    lhs, rhs, gs, _ = _inputs(9, 16, 16, [3, 3, 3], jnp.float32)
    for args, match in [((lhs[None], rhs, gs), "lhs must have rank 2"),
                        ((lhs, rhs[0], gs), "rhs must have rank 3"),
                        ((lhs, rhs[:, :8], gs), "contraction size K"),
                        ((lhs, rhs, gs[:2]), r"group_sizes must be int \[groups\] = \(3,\)"),
                        ((lhs, rhs, gs.astype(jnp.float32)), "group_sizes must be int"),
                        ((lhs, rhs.astype(jnp.bfloat16), gs), "dtype"),
                        ((lhs.astype(jnp.int32), rhs, gs), "lhs")]:
        with pytest.raises(ValueError, match=match):
            grouped_matmul(*args)
    with pytest.raises(ValueError, match="impl"):
        grouped_matmul(lhs, rhs, gs, impl="triton")
