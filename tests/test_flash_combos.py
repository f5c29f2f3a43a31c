"""Every option of ``jaxattn.attention`` at once, drawn at random: GQA, ragged and cross lengths, head dims
off the powers of two, a value dim of its own, causal, segment ids (one array or a pair), bool / additive /
differentiated masks of each broadcast shape, windows (one int, a pair, an open side), soft cap, ALiBi
([heads] or [batch, heads]), score_mod, a custom scale and the lse, in every dtype. The kernel (interpret
mode, outputs poisoned) against the fp32 oracle on the same rounded inputs, forward, lse and every
gradient (the mask's too when it is differentiated). The options' own files test each alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from conftest import GRAD_TOL, assert_close
from jaxattn.pallas._common import poison_outputs
from jaxattn.reference import attention_reference


def _distance(x, b, h, qi, ki):
    return x - 0.03 * (h + 1) * jnp.abs(qi - ki).astype(x.dtype) + 0.1 * b


def _wavy(x, b, h, qi, ki):
    return 3.0 * jnp.tanh(x / 3.0) + jnp.where((qi + ki) % 3 == 0, 0.5, 0.0)


def _case(seed: int) -> dict:
    r = np.random.default_rng(seed)
    hkv = int(r.choice([1, 2, 3]))
    sq = int(r.integers(1, 150))
    sk = sq if r.random() < 0.5 else int(r.integers(1, 170))
    d = int(r.choice([32, 48, 64, 96, 128]))
    c = dict(b=int(r.integers(1, 3)), sq=sq, sk=sk, hq=hkv * int(r.choice([1, 2])), hkv=hkv, d=d,
             e=d if r.random() < 0.7 else int(r.choice([32, 64, 80])),
             dtype=[jnp.float32, jnp.bfloat16, jnp.float16][seed % 3], causal=bool(r.random() < 0.5))
    if r.random() < 0.4:
        c["seg"] = "pair" if sq != sk or r.random() < 0.3 else "single"
    if r.random() < 0.3:
        c["mask"] = str(r.choice(["bool", "float", "floatgrad"]))
        c["mask_shape"] = [(1, 1, sq, sk), (c["b"], 1, sq, sk), (1, c["hq"], sq, sk), (c["b"], c["hq"], 1, sk)][
            int(r.integers(4))]
    if r.random() < 0.35:
        left = None if r.random() < 0.2 else int(r.integers(0, 40))
        right = None if r.random() < 0.3 else int(r.integers(0, 40))
        c["window"] = (left, right) if r.random() < 0.6 else (7 if left is None else left)
    if r.random() < 0.25:
        c["softcap"] = float(r.choice([5.0, 20.0]))
    if r.random() < 0.25:
        c["alibi"] = "batch" if r.random() < 0.3 else "heads"
    if r.random() < 0.3:
        c["score_mod"] = [_distance, _wavy][int(r.integers(2))]
    if r.random() < 0.15:
        c["scale"] = float(r.choice([0.05, 0.3]))
    c["lse"] = bool(r.random() < 0.3)
    return c


def _inputs(c: dict, seed: int):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    dt = c["dtype"]
    q = jax.random.normal(ks[0], (c["b"], c["sq"], c["hq"], c["d"])).astype(dt)
    k = jax.random.normal(ks[1], (c["b"], c["sk"], c["hkv"], c["d"])).astype(dt)
    v = jax.random.normal(ks[2], (c["b"], c["sk"], c["hkv"], c["e"])).astype(dt)
    do = jax.random.normal(ks[3], (c["b"], c["sq"], c["hq"], c["e"]))
    kw, seg = dict(causal=c["causal"]), {}
    if "seg" in c:
        qs = jnp.sort(jax.random.randint(ks[4], (c["b"], c["sq"]), 0, 3), axis=1)
        kvs = jnp.sort(jax.random.randint(ks[5], (c["b"], c["sk"]), 0, 3), axis=1)
        kw["segment_ids"] = qs if c["seg"] == "single" else (qs, kvs)
        seg = dict(q_segment_ids=qs, kv_segment_ids=qs if c["seg"] == "single" else kvs)
    mask = None
    if "mask" in c:
        mask = (jax.random.bernoulli(ks[6], 0.8, c["mask_shape"]) if c["mask"] == "bool"
                else jax.random.normal(ks[6], c["mask_shape"]).astype(dt))
    if "window" in c:
        kw["local_window_size"] = c["window"]
    if "softcap" in c:
        kw["logits_soft_cap"] = c["softcap"]
    if "alibi" in c:
        kw["alibi_slopes"] = jax.random.uniform(ks[7], (c["b"], c["hq"]) if c["alibi"] == "batch" else (c["hq"],),
                                                minval=0.01, maxval=0.3)
    for name in ("score_mod", "scale"):
        if name in c:
            kw[name] = c[name]
    return q, k, v, do, mask, kw, seg


# (the default suite: four of the richest draws, one per dtype and more; the rest in the slow suite)
DEFAULT = (3, 8, 12, 13)


@pytest.mark.parametrize("seed", [*DEFAULT, *(pytest.param(s, marks=pytest.mark.slow) for s in range(24) if s not in DEFAULT)])
def test_every_option_at_once(seed):
    c = _case(seed)
    q, k, v, do, mask, kw, seg = _inputs(c, seed)
    argnums = (0, 1, 2, 3) if c.get("mask") == "floatgrad" else (0, 1, 2)
    window = kw.get("local_window_size")
    ref_kw = {**{n: x for n, x in kw.items() if n != "segment_ids"}, **seg,
              "local_window_size": (window, window) if isinstance(window, int) else window}

    def objective(out, lse):
        total = (out.astype(jnp.float32) * do).sum()
        return total + (0.1 * jnp.where(jnp.isfinite(lse), lse, 0.0).sum() if c["lse"] else 0.0)

    def kernel(q, k, v, m):
        out, lse = jaxattn.attention(q, k, v, mask=m, impl="pallas", return_lse=True, **kw)
        return objective(out, lse), (out, lse)

    def oracle(q, k, v, m):
        out, lse = attention_reference(q, k, v, mask=m, **ref_kw)
        return objective(out, lse), (out, lse)

    with poison_outputs():
        grads, (out, lse) = jax.jit(jax.grad(kernel, argnums, has_aux=True))(q, k, v, mask)
    f32 = lambda x: x if x is None or x.dtype == jnp.bool_ else x.astype(jnp.float32)  # noqa: E731
    ref_grads, (ref_out, ref_lse) = jax.jit(jax.grad(oracle, argnums, has_aux=True))(*map(f32, (q, k, v, mask)))
    dt = c["dtype"]
    assert out.dtype == dt and out.shape == ref_out.shape
    assert_close(out, ref_out, dt, f"out {c}")
    assert_close(lse, ref_lse, dt, f"lse {c}")
    for name, g, rg in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
        assert_close(g, rg, dt, f"{name} {c}", GRAD_TOL)
