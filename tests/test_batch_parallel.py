"""Batch parallelism of the kernels (jaxattn.ops._spmd.batch_parallel): under a jit whose inputs are split over the
batch, XLA would gather the whole batch to every device around each kernel (a custom call it cannot split); in
the context the ops run their kernels per device on the batch shard (shard_map). Checked: the same values and
gradients as one device (4 CPU devices, interpret mode; dropout masks, per-row and shared masks, sinks, ALiBi,
segments, Lightning states), the trainer's data-parallel steps on the kernels, and, compiled for four H100s
with XLA's GPU compiler (the aot extra), kernels that run on local batches with no all-gather."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import run_on_cpu_devices
from jaxattn.bench import aot
from jaxattn.ops._spmd import _BATCH_PARALLEL, batch_parallel, batch_split

SCRIPT = """
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxattn
from jaxattn.ops._spmd import batch_parallel, batch_split

mesh = Mesh(np.array(jax.devices()).reshape(4, 1), ("data", "seq"))
split = NamedSharding(mesh, P("data"))
ks = jax.random.split(jax.random.key(0), 9)
B, N, H, D = 8, 40, 4, 32
q, k, v = (jax.random.normal(x, (B, N, H, D)) for x in ks[:3])
seg = jnp.asarray(np.repeat(np.arange(4), 10)[None].repeat(B, 0))
shared = jax.random.bernoulli(ks[3], 0.8, (1, H, N, N))  # one mask for every row: replicated, its use summed
rows = jax.random.normal(ks[4], (B, 1, N, N))  # a per-row additive mask: split with the batch
sinks, alibi = jax.random.normal(ks[5], (H,)), jax.random.uniform(ks[6], (B, H))
slope = jnp.linspace(0.1, 1.0, H)
state0 = jax.random.normal(ks[7], (B, H, D, D)) * 0.1

def attn(q, k, v, sinks, rows):
    o = jaxattn.attention(q, k, v, causal=True, segment_ids=seg, mask=shared, sinks=sinks, impl="pallas",
                          dropout_rate=0.2, dropout_rng=jax.random.key(7), alibi_slopes=alibi)
    o2 = jaxattn.attention(q, k, v, mask=rows, impl="pallas", logits_soft_cap=5.0)
    return jnp.sum(o * o) + jnp.sum(o2 * jnp.cos(o2))

def light(q, k, v, state0):
    o, s = jaxattn.lightning_attention(q * 0.3, k * 0.3, v, slope, initial_state=state0, return_state=True,
                                       segment_ids=seg, impl="pallas")
    return jnp.sum(o * jnp.sin(o)) + jnp.sum(s * s)

def sparse(q, k, v, sinks):
    mask = jaxattn.BlockMask.power(N, 16, window=16, sink=16)
    o = jaxattn.block_sparse_attention(q, k, v, mask, segment_ids=seg, sinks=sinks, impl="pallas")
    return jnp.sum(o * jnp.sin(o))

tau = jnp.linspace(0.5, 1.5, H)

def linear(q, k, v, tau):
    return jnp.sum(jnp.cos(jaxattn.linear_global_attention(q, k, v, temperature=tau, clamp=1.0, impl="pallas")))

maps = [jax.random.normal(x, (B, 8, 8, 2, 16)) for x in jax.random.split(ks[8], 3)]
rel = jax.random.normal(ks[8], (2, 11, 16)) * 0.3

def halo(q, k, v, rel):
    o = jaxattn.halo_attention(q, k, v, rel[0], rel[1], block_size=4, halo_size=1, impl="pallas")
    return jnp.sum(o * o)

from jaxattn.models.moe import moe_dispatch, route
router = jax.random.normal(ks[5], (32, 4))

def moe(x, gate_up, down):  # (8 tokens: each device routes its own 2)
    w, experts, _ = route(x @ router, 2)
    return jnp.sum(jnp.sin(moe_dispatch(x, w, experts, gate_up, down, act="gpt_oss", limit=2.0, impl="pallas")))

experts_w = (jax.random.normal(ks[6], (4, 32, 48)) * 0.2, jax.random.normal(ks[7], (4, 24, 32)) * 0.2)

def landmark(q, k, v):
    return jnp.sum(jnp.sin(jaxattn.landmark_attention(q, k, v, block_len=8, impl="pallas")))

lengths = jnp.arange(B) * 3 + 10
cache_k, cache_v = k * 0.5, v

def decode(q, cache_k, cache_v, lengths):  # (no gradient: the value alone)
    return jnp.sum(jnp.cos(jaxattn.decode_attention(q[:, :2], cache_k, cache_v, lengths, causal=True, sinks=sinks,
                                                  alibi_slopes=alibi, impl="pallas")))

def delta(q, k, v, state0):  # (the gated delta rule's forward kernel; its backward: XLA's chunked path)
    g, beta = -0.1 * jnp.abs(q[..., 0]), jax.nn.sigmoid(k[..., 0])
    return jnp.sum(jnp.sin(jaxattn.gated_delta_rule(q * 0.2, k * 0.2, v, g, beta, initial_state=state0, impl="pallas")))

CASES = {"attention": (attn, (q, k, v, sinks, rows)), "delta": (delta, (q, k, v, state0)), "lightning": (light, (q, k, v, state0)),
         "moe": (moe, (q[:, 0, 0], *experts_w)), "landmark": (landmark, (q, k, v)),
         "block-sparse": (sparse, (q, k, v, sinks)), "linear-global": (linear, (q, k, v, tau)),
         "halo": (halo, (*maps, rel)), "decode": (decode, (q, cache_k, cache_v, lengths))}
for name in __OPS__:
    f, args = CASES[name]
    step = jax.value_and_grad(f, argnums=tuple(range(len(args))))
    if f is decode:
        step = lambda *a: (decode(*a), ())
    want = jax.jit(step)(*args)

    def par(*a):
        with batch_parallel(mesh, "data"):
            assert batch_split(B) == (mesh, "data") and batch_split(B + 2) is None
            return step(*a)

    placed = [jax.device_put(x, split) if x.shape[0] == B else x for x in args]
    fn = jax.jit(par)
    text = fn.lower(*placed).as_text()
    assert "sdy.manual_computation" in text or "shard_map" in text, name  # (the kernels per shard)
    got = fn(*placed)
    check(got[0], want[0], 1e-5, name + " value")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        check(a, b, 1e-5, f"{name} grad {i}")

# inside a shard_map that made the axis manual (ring attention's), the ops do not split again
from jaxattn.ops._spmd import shard_map
seen = []

def body(x):
    seen.append(batch_split(8))
    return x

with batch_parallel(mesh, "data"):
    jax.jit(shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(jnp.ones((8, 2)))
    assert seen == [None] and batch_split(8) == (mesh, "data")

# the trainer: data-parallel steps of a GPT on the flash kernels (interpret mode), as on one device
if not __TRAINER__:
    print("BATCH-OK")
    raise SystemExit
from jaxattn.models import create_model
from jaxattn.train.lm import LMConfig, Trainer, get_batch
toks = np.frombuffer(bytes(range(256)) * 40, np.uint8).astype(np.int32)
gpt = lambda rngs: create_model("gpt-tiny", rngs=rngs, vocab_size=256, dim=64, layers=1, heads=2, attn_impl="pallas")
cfg = LMConfig(seq_len=32, batch_size=8, warmup=1, steps=4)
losses = []
for devices in (jax.devices()[:1], jax.devices()):
    t = Trainer(cfg, gpt, devices=devices)
    losses.append([float(t.step(get_batch(toks, seed=0, step=s, batch=8, seq_len=32))) for s in range(2)])
np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
print("BATCH-OK")
"""


@pytest.mark.parametrize("ops,trainer", [
    (("attention", "lightning", "moe"), False),
    pytest.param(("landmark", "block-sparse", "linear-global", "halo", "decode", "delta"), True, marks=pytest.mark.slow)],
    ids=["attention-lightning-moe", "other-ops-and-trainer"])
def test_kernels_split_over_the_batch_equal_one_device(ops, trainer):
    assert "BATCH-OK" in run_on_cpu_devices(SCRIPT.replace("__OPS__", repr(ops)).replace("__TRAINER__", repr(trainer)))


def test_batch_split_rules():
    assert batch_split(8) is None  # no context
    one = Mesh(np.array(jax.devices()[:1]), ("data",))
    with batch_parallel(one, "data"):
        assert _BATCH_PARALLEL.get() == (one, "data")
        assert batch_split(8) is None  # an axis of size 1: nothing to split
    assert _BATCH_PARALLEL.get() is None
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        with batch_parallel(one, "batch"):
            pass


@pytest.mark.skipif(aot.available() is not None, reason=str(aot.available()) + " (pip install -e '.[aot]')")
def test_compiled_for_four_gpus_the_kernels_run_on_local_batches():
    """Compiled for four compile-only H100s: without the context XLA gathers q, k, v around the flash kernel;
    with it, every kernel (flash forward, dq, dk/dv; Lightning's) takes the local batch and nothing is
    gathered."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxattn
    from jaxattn.pallas import _common

    topo = topologies.get_topology_desc(platform="cuda", target_config=aot.H100_TARGET, topology="1x1x4")
    mesh = topologies.make_mesh(topo, (4,), ("data",))
    x = jax.ShapeDtypeStruct((8, 512, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    slope = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(q, k, v, slope):
        o = jaxattn.attention(q, k, v, causal=True, impl="pallas").astype(jnp.float32)
        return jnp.sum(o) + jnp.sum(jaxattn.lightning_attention(q, k, v, slope, impl="pallas").astype(jnp.float32))

    def compiled(context: bool) -> str:
        def step(q, k, v, slope):  # (a fresh function per trace: the context is read when tracing)
            if not context:
                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v, slope)
            with batch_parallel(mesh, "data"):
                return jax.grad(loss, argnums=(0, 1, 2))(q, k, v, slope)

        with _common.compile_for_gpu():
            return jax.jit(step).trace(x, x, x, slope).lower(lowering_platforms=("cuda",)).compile().as_text()

    calls = lambda text: [line for line in text.splitlines() if "custom-call(" in line and "triton" in line]  # noqa: E731
    gathered = compiled(False)
    assert "all-gather" in gathered and any("bf16[8,512,4,64]" in c for c in calls(gathered))
    local = compiled(True)
    assert "all-gather" not in local
    assert len(calls(local)) >= 5 and all("[8," not in c.split("custom-call(")[0] for c in calls(local))
    assert all(re.search(r"\[(1,)?2,512,", c.split("custom-call(")[0]) for c in calls(local))  # (Lightning: [1, B, ...])
