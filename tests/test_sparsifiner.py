"""Sparsifiner: masked attention vs the fp32 oracle, the top-k mask, the predictor, basis
thresholding, the two training stages' parameter sets and losses, errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import GRAD_TOL, assert_close, randn
from jaxattn.models.sparsifiner import (BACKBONE, PREDICTOR, ConnectivityPredictor, Sparsifiner, SparsifinerConfig,
                                        attention_flops, connectivity_mask, keep_count, sparse_attention,
                                        threshold_basis, topk_mask, topk_scatter)
from jaxattn.models.vit import ViT, ViTConfig
from jaxattn.reference.sparsifiner import (connectivity_reference, sparsifiner_mask_reference,
                                           sparsifiner_reference)
from jaxattn.train.images import ImageData
from jaxattn.train.sparsifiner import (SparsifinerRunConfig, attn_recon_loss, distill_loss, make_stage_trainer,
                                       run, sparsifiner_config)

F32 = jnp.float32
TINY = dict(image_size=8, patch_size=4, in_channels=1, num_classes=3, dim=16, depth=1, heads=2,
            attn_impl="xla")  # 4 patches + class token = 5 tokens, head_dim 8


def _tiny_cfg(**kw) -> SparsifinerConfig:
    return SparsifinerConfig(**{**TINY, "reduce_n_factor": 2, **kw})


# -- masked attention vs the oracle -----------------------------------------------------------
@pytest.mark.parametrize("b,n,h,d,rate,has_cls", [(2, 17, 2, 8, 0.25, True), (1, 10, 3, 16, 0.5, False)])
def test_masked_attention_matches_oracle(b, n, h, d, rate, has_cls):
    ks = jax.random.split(jax.random.key(n * 7 + h), 5)
    q, k, v, dout = (randn(ks[i], (b, n, h, d), F32) for i in range(4))
    approx = jax.random.uniform(ks[4], (b, h, n - has_cls, n))
    keep = keep_count(n, rate)
    assert keep == math.ceil(rate * n)
    mask = connectivity_mask(approx, keep, has_cls=has_cls)
    ref, ref_mask = sparsifiner_reference(q, k, v, approx, keep, has_cls=has_cls)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref_mask))
    assert_close(jax.jit(lambda q, k, v: sparse_attention(q, k, v, mask, impl="xla"))(q, k, v), ref, F32, "out")

    def f(q, k, v):
        return jnp.sum(sparse_attention(q, k, v, mask, impl="xla") * dout)

    def g(q, k, v):
        return jnp.sum(sparsifiner_reference(q, k, v, approx, keep, has_cls=has_cls)[0] * dout)

    got, want = jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v), jax.jit(jax.grad(g, (0, 1, 2)))(q, k, v)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, F32, f"d{'qkv'[i]}", tol=GRAD_TOL)


def test_mask_keeps_exactly_k_and_is_detached():
    n, keep = 13, 4
    ks = jax.random.split(jax.random.key(3), 4)
    approx = jax.random.normal(ks[0], (2, 3, n - 1, n))
    mask = connectivity_mask(approx, keep)
    counts = np.asarray(mask.sum(-1))
    assert (counts[:, :, 0] == n).all() and (counts[:, :, 1:] == keep).all()
    # the kept entries are the k largest of their row
    kth = np.sort(np.asarray(approx), -1)[..., -keep]
    assert (np.asarray(approx)[np.asarray(mask[:, :, 1:])].reshape(2, 3, n - 1, keep) >= kth[..., None]).all()
    # detached: no gradient reaches the scores through the mask (the model-level check, that the task
    # loss gives the predictor no gradient in the sparse stage, is in test_model_stages_against_vit)
    g = jax.jit(jax.grad(lambda a: jnp.sum(jnp.where(connectivity_mask(a, keep)[:, :, 1:], 1.0, 0.0) * 3.0)))(approx)
    assert not np.asarray(g).any(), "gradient flowed through the top-k mask"


def test_predictor_matches_oracle_both_stages():
    n, h, d = 11, 2, 8
    p = ConnectivityPredictor(n, h, d, keep_rate=0.3, reduce_n_factor=2, basis_topk=3, rngs=nnx.Rngs(1))
    # make the basis mostly survive the threshold so the ranking is well separated
    p.proj_back_n[...] = p.proj_back_n[...] * 4.0
    ks = jax.random.split(jax.random.key(5), 2)
    q, k = randn(ks[0], (2, n, h, d), F32), randn(ks[1], (2, n, h, d), F32)
    args = (p.proj_c_q.kernel[...], p.proj_c_q.bias[...], p.proj_c_k.kernel[...], p.proj_c_k.bias[...],
            p.proj_n[...], p.proj_back_n[...])
    for stage in ("recon", "sparse"):
        approx, mask = nnx.jit(lambda p, q, k: p(q, k, stage))(p, q, k)
        ref = jax.jit(lambda q, k, a: connectivity_reference(q, k, *a, stage=stage, threshold=0.02,
                                                              coef_topk=3))(q, k, args)
        assert approx.shape == (2, h, n - 1, n)
        assert_close(approx, ref, F32, stage)
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(sparsifiner_mask_reference(ref, p.budget)))
    # the coefficients are a softmax over the n_r basis columns with scale H^-1/2
    coef = p.coefficients(q, k)
    np.testing.assert_allclose(np.asarray(coef.sum(-1)), 1.0, rtol=1e-5)
    assert p.scale == h ** -0.5 and p.reduced_n == n // 2 and p.reduced_c == d // 2


def test_basis_threshold_and_topk_hand_example():
    p_back = jnp.array([[0.01, -0.5], [0.02, 0.03], [-0.021, 0.0]])  # [N=3, n_r=2]
    np.testing.assert_allclose(np.asarray(threshold_basis(p_back, 0.02)),
                               [[0.0, 0.0, 0.021], [0.5, 0.03, 0.0]], rtol=1e-6)  # |.| > 0.02 kept, abs taken
    x = jnp.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.0, 0.4]])
    np.testing.assert_allclose(np.asarray(topk_scatter(x, 2)), [[0, 0.4, 0, 0.3], [0.5, 0, 0, 0.4]])
    np.testing.assert_allclose(np.asarray(topk_scatter(x, 9)), np.asarray(x))  # k > n_r keeps all
    coef = jnp.arange(10.0)[::-1] / 45  # 10 coefficients, keep the 8 largest = the first 8
    kept = topk_scatter(coef, 8)
    assert (np.asarray(kept[:8]) == np.asarray(coef[:8])).all() and not np.asarray(kept[8:]).any()
    # in the module: sparse stage uses the thresholded |P_back|^T, recon the raw P_back^T
    pred = ConnectivityPredictor(3, 1, 4, reduce_n_factor=1, rngs=nnx.Rngs(0))
    pred.proj_back_n[...] = jnp.array([[0.01, -0.5, 0.3], [0.02, 0.03, -0.2], [-0.021, 0.0, 0.1]])
    np.testing.assert_allclose(np.asarray(pred.basis("sparse")),
                               [[0, 0, 0.021], [0.5, 0.03, 0], [0.3, 0.2, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pred.basis("recon")), np.asarray(pred.proj_back_n[...]).T)
    assert keep_count(65, 0.25) == 17 and keep_count(197, 0.25) == 50


# -- the model ------------------------------------------------------------------------------
def test_model_stages_against_vit():
    cfg = _tiny_cfg()
    vit = ViT(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    m = Sparsifiner(cfg, rngs=nnx.Rngs(1))
    nnx.update(m, nnx.state(vit, nnx.Param))
    x = randn(jax.random.key(2), (3, 8, 8, 1), F32)
    recon = nnx.jit(lambda m, x: m.forward(x, stage="recon"))
    sparse = nnx.jit(lambda m, x: m.forward(x, stage="sparse"))
    call = nnx.jit(lambda m, x: m(x))
    want = call(vit, x)
    # stage 1 attends densely: identical to the ViT
    dense = recon(m, x)
    assert_close(dense["logits"], want, F32, "recon")
    # keep everything: the sparse path is the dense ViT again
    full = Sparsifiner(dataclasses.replace(cfg, attn_keep_rate=1.0), rngs=nnx.Rngs(1))
    nnx.update(full, nnx.state(vit, nnx.Param))
    assert_close(call(full, x), want, F32, "keep all")
    out = sparse(m, x)
    assert out["logits"].shape == (3, 3) and out["tokens"].shape == (3, 5, 16)
    assert np.abs(np.asarray(out["tokens"] - dense["tokens"])).max() > 1e-4  # the mask matters
    for mask, attn in zip(out["mask"], out["attn"]):
        assert (np.asarray(mask.sum(-1))[:, :, 1:] == cfg.attn_budget).all()
        assert not np.asarray(jnp.where(mask, 0.0, attn)).any()
        np.testing.assert_allclose(np.asarray(attn.sum(-1)), 1.0, rtol=1e-5)
    assert_close(call(m, x), out["logits"], F32, "__call__ = sparse stage")
    # the task loss gives the predictor no gradient in the sparse stage (top-k is detached) ...
    gd, params, rest = nnx.split(m, PREDICTOR, ...)
    target = [jnp.full((3, 2, 5, 5), 0.2)] * cfg.depth

    @jax.jit
    def grads(p):
        def task(p):
            return jnp.sum(nnx.merge(gd, p, rest).forward(x, stage="sparse")["logits"] ** 2)

        def rec(p):  # ... while the reconstruction loss does reach it
            return attn_recon_loss(nnx.merge(gd, p, rest).forward(x, stage="recon")["approx"], target)

        return jax.grad(task)(p), jax.grad(rec)(p)

    g_task, g_rec = grads(params)
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(g_task))
    assert all(np.asarray(g).any() for g in jax.tree.leaves(g_rec))


def _tiny_data() -> ImageData:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 8, 8, 1), dtype=np.uint8)
    y = np.arange(24) % 3
    return ImageData(x[:16], y[:16], x[16:], y[16:], ["a", "b", "c"], "synthetic", flip=False, crop=False)


def test_stages_update_only_their_parameters():
    data = _tiny_data()
    run_cfg = SparsifinerRunConfig(batch_size=8, stage1_lr=1e-2, stage2_lr=1e-2, warmup=0)
    base = ViTConfig(**TINY)
    scfg = sparsifiner_config(base, data, dataclasses.replace(run_cfg, reduce_n_factor=2))
    teacher = ViT(base, rngs=nnx.Rngs(0))
    teacher.eval()
    init = nnx.state(teacher, nnx.Param)
    for stage, moving, frozen in ((1, PREDICTOR, BACKBONE), (2, BACKBONE, PREDICTOR)):
        tr = make_stage_trainer(stage, scfg, init, teacher, data, run_cfg)
        before = jax.tree.map(lambda a: np.array(a, copy=True), nnx.state(tr.model, nnx.Param))
        if stage == 1:  # the student starts as the teacher
            for a, e in zip(jax.tree.leaves(nnx.state(tr.model, BACKBONE)), jax.tree.leaves(init)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
        tr.train_step(data.train_batch(0, 0, 8))  # warmup: lr 0 at step 0
        out = tr.train_step(data.train_batch(0, 1, 8))
        assert np.isfinite(float(out["loss"]))
        after = nnx.state(tr.model, nnx.Param)
        changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()), after, before)
        moved = jax.tree.leaves(nnx.state(tr.model, moving))
        assert moved and all(jax.tree.leaves(nnx.filter_state(changed, moving))), f"stage {stage}: not all updated"
        assert not any(jax.tree.leaves(nnx.filter_state(changed, frozen))), f"stage {stage}: frozen params moved"
        init = nnx.state(tr.model, nnx.Param)


def test_stage_losses_hand_example():
    # stage 1: 0.01 x mean over layers of the sum-MSE against the teacher's patch-query rows
    t = jnp.array([[[[0.5, 0.5], [0.25, 0.75]]]])  # [B=1, H=1, N=2, N]: row 0 is the class token
    a1, a2 = jnp.array([[[[0.0, 1.0]]]]), jnp.array([[[[0.25, 0.75]]]])
    assert float(attn_recon_loss([a1, a2], [t, t])) == pytest.approx((0.25 ** 2 + 0.25 ** 2 + 0.0) / 2)
    # stage 2: CE + 0.5 KL(p_t || p_s) (batchmean) + 0.5 MSE(patch tokens)
    logits = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    t_logits = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    labels = jnp.array([0, 1])
    tok = jnp.array([[[9.0, 9.0], [1.0, 2.0]], [[9.0, 9.0], [0.0, 0.0]]])  # [B=2, N=2, C=2], token 0 = cls
    t_tok = jnp.array([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    total, parts = jax.jit(distill_loss)(logits, labels, tok, t_logits, t_tok)
    ls = lambda z: np.asarray(z) - np.log(np.exp(np.asarray(z)).sum(-1, keepdims=True))  # noqa: E731
    ce = -(ls(logits)[0, 0] + ls(logits)[1, 1]) / 2
    pt = np.exp(ls(t_logits))
    kl = float((pt * (ls(t_logits) - ls(logits))).sum() / 2)
    mse = (0 + 4 + 1 + 1) / 4  # patch tokens only
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts["kl"]) == pytest.approx(kl, rel=1e-6)
    assert float(parts["token_mse"]) == pytest.approx(mse, rel=1e-6)
    assert float(total) == pytest.approx(ce + 0.5 * kl + 0.5 * mse, rel=1e-6)
    assert float(parts["acc"]) == 1.0
    # gradients reach only the student
    g = jax.jit(jax.grad(lambda s, t: distill_loss(s, labels, tok, t, t_tok)[0], (0, 1)))(logits, t_logits)
    assert np.asarray(g[0]).any() and not np.asarray(g[1]).any()


def test_flops_count():
    f = attention_flops(65, 32, 17, 16, 10)
    kept = 65 + 64 * 17
    assert f["dense"] == 4 * 65 * 65 * 32 and f["sparse"] == 4 * kept * 32
    assert f["predictor"] == 4 * 65 * 32 * 16 + 2 * 16 * 65 * 10 * 2 + 2 * 64 * 10 * 65
    assert f["kept_fraction"] == pytest.approx(kept / 65 ** 2)


# -- errors ----------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="attn_keep_rate"):
        _tiny_cfg(attn_keep_rate=0.0)
    with pytest.raises(ValueError, match="quantized"):
        _tiny_cfg(quantized=True)
    with pytest.raises(ValueError, match="reduce_n_factor"):
        _tiny_cfg(reduce_n_factor=0)
    with pytest.raises(ValueError, match="num_tokens"):
        _tiny_cfg(reduce_n_factor=6)  # 5 tokens // 6 = 0 basis columns
    with pytest.raises(ValueError, match="SparsifinerConfig"):
        Sparsifiner(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="k must be in"):
        topk_mask(jnp.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match=r"approx must be \[batch, heads, N - 1, N\]"):
        connectivity_mask(jnp.zeros((1, 1, 4, 4)), 2)
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="mask must be bool"):
        sparse_attention(q, q, q, jnp.ones((1, 1, 4, 4)))
    p = ConnectivityPredictor(5, 2, 8, reduce_n_factor=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"predictor q and k must be \[batch, 5, 2, 8\]"):
        p(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)))
    with pytest.raises(ValueError, match="stage must be one of"):
        p(jnp.zeros((1, 5, 2, 8)), jnp.zeros((1, 5, 2, 8)), "dense")
    with pytest.raises(ValueError, match="stage must be one of"):
        Sparsifiner(_tiny_cfg(), rngs=nnx.Rngs(0)).set_stage("fast")
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        make_stage_trainer(3, _tiny_cfg(), None, None, None, SparsifinerRunConfig())
    with pytest.raises(ValueError, match="shapes differ"):
        distill_loss(jnp.zeros((2, 3)), jnp.zeros(2, int), jnp.zeros((2, 5, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="labels must be"):
        distill_loss(jnp.zeros((2, 3)), jnp.zeros(3, int), jnp.zeros((2, 5, 4)), jnp.zeros((2, 3)), jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="equal length"):
        attn_recon_loss([jnp.zeros((1, 1, 4, 5))], [])
    with pytest.raises(ValueError, match="registered dense ViT"):
        run(SparsifinerRunConfig(model="gpt-tiny", results=None))
