"""Shared test helpers: tolerances by dtype, random inputs, poisoned kernel runs."""

from __future__ import annotations

import os

# pytest-xdist runs two workers: on a GPU they must not each grab 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# (atol, rtol) relative to the largest magnitude of the expected value.
TOL = {
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.float16): (4e-3, 4e-3),
    jnp.dtype(jnp.bfloat16): (2.5e-2, 2.5e-2),
}
GRAD_TOL = {
    jnp.dtype(jnp.float32): (5e-5, 5e-5),
    jnp.dtype(jnp.float16): (1e-2, 1e-2),
    jnp.dtype(jnp.bfloat16): (6e-2, 6e-2),
}


def assert_close(actual, expected, dtype, what: str = "", tol=None) -> None:
    """Max-abs check scaled by the expected tensor's magnitude; NaN never passes."""
    atol, rtol = (tol or TOL)[jnp.dtype(dtype)]
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert not np.isnan(a).any(), f"{what}: NaN in result (unwritten or invalid elements)"
    finite = np.isfinite(e)
    assert (a[~finite] == e[~finite]).all(), f"{what}: infinities differ"
    scale = max(1.0, float(np.abs(e[finite]).max(initial=0.0)))
    worst = float(np.abs(a[finite] - e[finite]).max(initial=0.0))
    assert worst <= (atol + rtol) * scale, f"{what}: max error {worst:.3g} > {(atol + rtol) * scale:.3g}"


def randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
