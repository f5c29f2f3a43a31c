"""Expert parallelism (jaxattn.models.moe_parallel) on 4 CPU devices: the experts split over the devices and the
tokens exchanged with all_to_all give one device's values and gradients (dropless; biases; the grouped matmul
kernel in interpret mode and ragged_dot; MXFP4 experts); a capacity drops exactly the assignments past it;
the trainer's expert-parallel steps equal one device's, with the expert weights and their AdamW state split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import run_on_cpu_devices
from jaxattn.bench import aot
from jaxattn.models.moe_parallel import capacity, expert_parallel, expert_split

SCRIPT = """
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxattn.models.moe import moe_dispatch, route
from jaxattn.models.moe_parallel import expert_parallel
from jaxattn.ops.mxfp4 import MXFP4, quantize_mxfp4

mesh = Mesh(np.array(jax.devices()), ("data",))
split = NamedSharding(mesh, P("data"))
T, D, H, E, K = 32, 32, 64, 8, 3
ks = jax.random.split(jax.random.key(0), 7)
x = jax.random.normal(ks[0], (T, D))
router = jax.random.normal(ks[1], (D, E))
gate_up = jax.random.normal(ks[2], (E, D, 2 * H)) * 0.2
down = jax.random.normal(ks[3], (E, H, D)) * 0.2
b1, b2 = jax.random.normal(ks[4], (E, 2 * H)) * 0.3, jax.random.normal(ks[5], (E, D)) * 0.3
ct = jax.random.normal(ks[6], (T, D))

def layer(x, router, gate_up, down, b1, b2, impl="pallas", ep=False, cf=None, keep=None):
    w, e, _ = route(x @ router, K)
    if keep is not None:  # (the oracle of a capacity: the dropped assignments' weights zeroed)
        w = w * keep
    def run():
        return moe_dispatch(x, w, e, gate_up, down, b1, b2, act="gpt_oss", limit=0.8, impl=impl)
    if ep:
        with expert_parallel(mesh, "data", capacity_factor=cf):
            out = run()
    else:
        out = run()
    return jnp.sum(out * ct), out

def grads(**kw):
    return jax.jit(jax.value_and_grad(lambda *a: layer(*a, **kw), argnums=tuple(range(6)), has_aux=True))

args = (x, router, gate_up, down, b1, b2)
placed = (jax.device_put(x, split), router, *(jax.device_put(a, split) for a in args[2:]))
for impl in __IMPLS__:
    want = grads(impl=impl)(*args)
    fn = grads(impl=impl, ep=True)
    text = fn.lower(*placed).as_text()
    assert "all_to_all" in text or "all-to-all" in text, impl
    got = fn(*placed)
    check(got[0][1], want[0][1], 1e-5, impl + " output")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        check(a, b, 1e-5, f"{impl} grad {i}")
    # the expert weights' gradients stay split like the weights
    assert got[1][2].sharding.spec == P("data"), got[1][2].sharding

# a capacity of 2 slots per destination: each device keeps, per destination device, its first 2 assignments
# in (expert, token, choice) order; the rest contribute nothing
w, e, _ = route(x @ router, K)
e = np.asarray(e)
keep = np.zeros((T, K), np.float32)
local = T // 4
for src in range(4):
    flat = [(int(e[t, j]), t, j) for t in range(src * local, (src + 1) * local) for j in range(K)]
    used = {}
    for ex, t, j in sorted(flat, key=lambda a: (a[0], a[1] * K + a[2])):
        dest = ex // (E // 4)
        used[dest] = used.get(dest, 0) + 1
        keep[t, j] = used[dest] <= 2
assert 0 < keep.sum() < T * K
cf = 2 * 4 / (local * K)  # ceil(cf * 24 / 4) = 2
want = grads(keep=jnp.asarray(keep))(*args)
got = grads(ep=True, cf=cf)(*placed)
check(got[0][1], want[0][1], 1e-5, "capacity output")
for i, (a, b) in enumerate(zip(got[1], want[1])):
    check(a, b, 1e-5, f"capacity grad {i}")

# MXFP4 experts, split the same way
packed = [quantize_mxfp4(w) for w in (gate_up, down)]
def packed_layer(x, router, gu, dn, **kw):
    return layer(x, router, MXFP4(gu), MXFP4(dn), b1, b2, **kw)[0]
want = jax.jit(jax.value_and_grad(packed_layer, argnums=(0, 1)))(x, router, *(p.packed for p in packed))
got = jax.jit(jax.value_and_grad(lambda *a: packed_layer(*a, ep=True), argnums=(0, 1)))(
    placed[0], router, *(jax.device_put(p.packed, split) for p in packed))
check(got[0], want[0], 1e-5, "mxfp4 loss")
check(got[1][0], want[1][0], 1e-5, "mxfp4 dx")
check(got[1][1], want[1][1], 1e-5, "mxfp4 drouter")
print("EP-LAYER-OK")

if not __TRAINER__:
    raise SystemExit
# the LM trainer: expert-parallel steps of an MoE GPT equal one device's; the experts and their Adam moments split
from jaxattn.models import create_model
from jaxattn.train.lm import LMConfig, Trainer, get_batch
toks = np.frombuffer(bytes(range(256)) * 40, np.uint8).astype(np.int32)
gpt = lambda rngs: create_model("moe-gpt-tiny", rngs=rngs, vocab_size=256, dim=64, layers=1, heads=2, mlp_dim=64,
                                attn_impl="xla")
losses, params = [], []
for devices, ep in ((jax.devices()[:1], False), (jax.devices(), True)):
    t = Trainer(LMConfig(seq_len=32, batch_size=8, warmup=1, steps=4, expert_parallel=ep), gpt, devices=devices)
    losses.append([float(t.step(get_batch(toks, seed=0, step=s, batch=8, seq_len=32))) for s in range(2)])
    params.append(np.asarray(t.model.blocks[0].mlp.gate_up[...]))
    if ep:  # the experts' weights and both Adam moments split (8 experts: 2 per device), the router not
        split_paths = {jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_flatten_with_path(t.state)[0]
                       if a.sharding.spec == P("data") and a.addressable_shards[0].data.shape[0] == 2}
        assert len([p for p in split_paths if "'gate_up'" in p or "'down'" in p]) == 6, split_paths
        assert not any("router" in p for p in split_paths), split_paths
np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
check(params[1], params[0], 1e-5, "trained experts")
print("EP-TRAINER-OK")
"""


@pytest.mark.parametrize("impls,trainer", [(("pallas",), False), pytest.param(("ragged",), True, marks=pytest.mark.slow)],
                         ids=["kernel-capacity-mxfp4", "ragged-and-trainer"])
def test_expert_parallel_equals_one_device(impls, trainer):
    out = run_on_cpu_devices(SCRIPT.replace("__IMPLS__", repr(impls)).replace("__TRAINER__", repr(trainer)))
    assert "EP-LAYER-OK" in out and ("EP-TRAINER-OK" in out) == trainer


def test_split_conditions_and_capacity():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    assert expert_split(8, 32) is None  # no context
    with expert_parallel(mesh, "data"):
        assert expert_split(8, 32) is None  # an axis of size 1
    assert capacity(24, 4, None) == 24 and capacity(24, 4, 1.0) == 6 and capacity(24, 4, 100.0) == 24
    assert capacity(3, 4, 0.1) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        with expert_parallel(mesh, "data", capacity_factor=0.0):
            pass
    with pytest.raises(ValueError, match="axis 'expert' is not an axis"):
        with expert_parallel(mesh, "expert"):
            pass


@pytest.mark.skipif(aot.available() is not None, reason=str(aot.available()) + " (pip install -e '.[aot]')")
def test_compiled_for_four_gpus_experts_stay_local():
    """Compiled for four compile-only H100s, a layer's forward and backward: the tokens move by all-to-all,
    no expert weight is gathered, and the grouped matmul kernels see each device's 2 of the 8 experts."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxattn.models.moe import moe_dispatch, route
    from jaxattn.pallas import _common

    topo = topologies.get_topology_desc(platform="cuda", target_config=aot.H100_TARGET, topology="1x1x4")
    mesh = topologies.make_mesh(topo, (4,), ("data",))

    def sds(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

    args = (sds((4096, 256), P("data")), sds((256, 8), P()), sds((8, 256, 1024), P("data")), sds((8, 512, 256), P("data")))

    def step(x, router, gate_up, down):
        def loss(x, router, gate_up, down):
            w, e, _ = route(x @ router, 2)
            return jnp.sum(moe_dispatch(x, w, e, gate_up, down, impl="pallas"))

        with expert_parallel(mesh, "data"):
            return jax.grad(loss, argnums=(0, 1, 2, 3))(x, router, gate_up, down)

    with _common.compile_for_gpu():
        text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).compile().as_text()
    calls = [line.split("custom-call(")[0] for line in text.splitlines() if "custom-call(" in line and "triton" in line]
    assert "all-to-all" in text and "all-gather" not in text
    assert len(calls) == 6 and not any("[8,256,1024]" in c or "[8,512,256]" in c for c in calls)  # 2 fwd, 4 bwd
    assert any("[2,256,1024]" in c for c in calls)  # (the tgmm weight gradient of the local experts)
