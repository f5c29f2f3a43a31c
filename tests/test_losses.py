"""The fused cross-entropy against optax's (values and gradients), its gradient's dtype, and
that its backward has no scatter (the transpose of optax's label gather)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import assert_close
from jaxattn.train.losses import cross_entropy_with_integer_labels


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 300)])
def test_matches_optax(shape, dtype):
    ks = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
    logits = (6 * jax.random.normal(ks[0], shape)).astype(dtype)
    labels = jax.random.randint(ks[1], shape[:-1], 0, shape[-1])
    w = jax.random.normal(ks[2], shape[:-1])

    def ours(x):
        return cross_entropy_with_integer_labels(x, labels)

    def theirs(x):
        return optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)

    assert ours(logits).dtype == jnp.float32
    assert_close(ours(logits), theirs(logits), jnp.float32, "loss")
    g = jax.grad(lambda x: jnp.sum(ours(x) * w))(logits)
    assert g.dtype == dtype
    assert_close(g, jax.grad(lambda x: jnp.sum(theirs(x) * w))(logits), dtype, "grad")


def test_backward_has_no_scatter():
    logits = jax.ShapeDtypeStruct((4, 128, 1000), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((4, 128), jnp.int32)
    grad = jax.grad(lambda x, y: cross_entropy_with_integer_labels(x, y).mean())
    text = jax.jit(grad).trace(logits, labels).lower().as_text()
    assert "scatter" not in text and "gather" not in text
    theirs = jax.grad(lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean())
    assert "scatter" in jax.jit(theirs).trace(logits, labels).lower().as_text()  # (the check can fail)


def test_errors():
    x = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="labels must have logits' shape"):
        cross_entropy_with_integer_labels(x, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="labels must be integers"):
        cross_entropy_with_integer_labels(x, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="logits must be floating"):
        cross_entropy_with_integer_labels(jnp.zeros((3, 4), jnp.int32), jnp.zeros((3,), jnp.int32))
