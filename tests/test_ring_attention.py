"""Ring attention over 4 forced CPU devices (a subprocess: the device count is fixed when JAX
starts): output and the q/k/v gradients against the dense fp32 oracle on the whole sequence, causal
and not, GQA, the flash kernel (interpret mode) and XLA paths, seq-only and data x seq meshes; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxattn
from conftest import run_on_cpu_devices

SCRIPT = """
    import jax.numpy as jnp
    from jax.sharding import Mesh
    import jaxattn
    from jaxattn.pallas import _dropout
    from jaxattn.reference import attention_reference

    devs = np.array(jax.devices())
    meshes = {"seq4": (Mesh(devs, ("sp",)), None), "data2xseq2": (Mesh(devs.reshape(2, 2), ("dp", "sp")), "dp")}

    cases = [  # (b, n, hq, hkv, d, dtype, causal, mesh, impl, dropout rate)
        (1, 64, 4, 2, 32, jnp.float32, True, "seq4", "pallas", 0.0),
        (2, 48, 2, 2, 16, jnp.float32, False, "seq4", "xla", 0.0),
        (2, 40, 3, 1, 32, jnp.float32, True, "data2xseq2", "xla", 0.0),
        (2, 32, 2, 2, 64, jnp.bfloat16, False, "data2xseq2", "pallas", 0.0),
        # dropout: every hop draws its block of the single-device mask (batch rows split too)
        (1, 64, 4, 2, 32, jnp.float32, True, "seq4", "pallas", 0.2),
        (2, 32, 2, 1, 32, jnp.float32, False, "data2xseq2", "pallas", 0.3),
        (4, 40, 2, 2, 16, jnp.float32, True, "data2xseq2", "xla", 0.3),
    ]
    cases = [cases[i] for i in __CASES__]
    for i, (b, n, hq, hkv, d, dtype, causal, mesh_name, impl, rate) in enumerate(cases):
        mesh, batch_axis = meshes[mesh_name]
        ks = jax.random.split(jax.random.PRNGKey(i), 4)
        q = jax.random.normal(ks[0], (b, n, hq, d)).astype(dtype)
        k = jax.random.normal(ks[1], (b, n, hkv, d)).astype(dtype)
        v = jax.random.normal(ks[2], (b, n, hkv, d)).astype(dtype)
        w = jax.random.normal(ks[3], (b, n, hq, d))
        rng = jax.random.PRNGKey(100 + i)
        ring = lambda q, k, v: jaxattn.ring_attention_sp(q, k, v, mesh=mesh, axis="sp", batch_axis=batch_axis,
                                                         causal=causal, impl=impl, dropout_rate=rate,
                                                         dropout_rng=rng if rate else None)
        ref = lambda q, k, v: attention_reference(q, k, v, causal=causal, dropout_rate=rate,
                                                  dropout_seed=_dropout.seed_from_key(rng))[0]
        tol = 2e-5 if dtype == jnp.float32 else 3e-2
        out = jax.jit(ring)(q, k, v)
        assert out.dtype == dtype and out.shape == (b, n, hq, d)
        check(out, ref(q, k, v), tol, f"case {i} out")
        loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w))
        g = jax.jit(jax.grad(loss(ring), (0, 1, 2)))(q, k, v)
        rg = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
        for name, a, r in zip("qkv", g, rg):
            check(a, r, 3 * tol, f"case {i} d{name}")
        if rate:  # the dropout is real
            plain = attention_reference(q, k, v, causal=causal)[0]
            assert float(jnp.max(jnp.abs(out - plain))) > 0.05, f"case {i}: no dropout"
        print("case", i, "ok")
    print("RING-OK")
"""


@pytest.mark.parametrize("cases", [(0, 3, 5), pytest.param((1, 2, 4, 6), marks=pytest.mark.slow)],
                         ids=["kernel", "xla-and-more-dropout"])
def test_ring_attention_matches_oracle_on_four_devices(cases):
    assert "RING-OK" in run_on_cpu_devices(SCRIPT.replace("__CASES__", repr(list(cases))))


def test_bad_arguments_raise():
    mesh = Mesh(np.array(jax.devices()[:1]), ("sp",))
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="axis 'seq' is not an axis of the mesh"):
        jaxattn.ring_attention_sp(q, q, q, mesh=mesh, axis="seq")
    with pytest.raises(ValueError, match="one sequence length"):
        jaxattn.ring_attention_sp(q, q[:, :4], q[:, :4], mesh=mesh, axis="sp")
    with pytest.raises(ValueError, match="rank 4"):
        jaxattn.ring_attention_sp(q[0], q, q, mesh=mesh, axis="sp")
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        jaxattn.ring_attention_sp(q, q, q, mesh=None, axis="sp")
