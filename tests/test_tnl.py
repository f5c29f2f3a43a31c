"""TransNormerLLM model: slopes, parallel forward vs recurrent generation, kernel vs XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import MODEL_CONFIGS, TNL, create_model, generate, tnl_slopes
from jaxattn.models.tnl import TNLConfig, layer_slopes, srms_norm


def test_slopes_match_alibi_formula():
    np.testing.assert_allclose(tnl_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    twelve = [2.0 ** (-(i + 1)) for i in range(8)] + [2.0 ** (-0.5 * (i + 1)) for i in range(16)][0::2][:4]
    np.testing.assert_allclose(tnl_slopes(12), twelve)
    s = layer_slopes(8, 0, 5)
    np.testing.assert_allclose(s, np.array(tnl_slopes(8)) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(layer_slopes(8, 4, 5), np.array(tnl_slopes(8)) * 1e-5, rtol=1e-5)
    assert np.isfinite(layer_slopes(4, 0, 1)).all()  # L = 1 guarded


def test_srms_norm():
    x = jnp.array([[3.0, 4.0]])
    np.testing.assert_allclose(srms_norm(x), x / np.sqrt(12.5 + 1e-6), rtol=1e-6)


def _tiny(**kw):
    cfg = TNLConfig(vocab_size=64, dim=32, layers=3, heads=2, glu_dim=48, lrpe_layers=(0, 2), **kw)
    return TNL(cfg, rngs=nnx.Rngs(0))


def test_generate_logits_match_parallel_forward():
    m = _tiny()
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)
    out, logits = generate(m, prompt, 10, temperature=0.0, return_logits=True)
    assert out.shape == (2, 19) and (out[:, :9] == prompt).all()
    full = m(out)
    np.testing.assert_allclose(logits, full[:, 8:18], atol=2e-5, rtol=1e-4)
    assert (jnp.argmax(full[:, 8:18], -1) == out[:, 9:]).all()  # greedy picks the argmax
    sampled = generate(m, prompt, 5, temperature=0.8, top_k=5, key=jax.random.PRNGKey(3))
    assert sampled.shape == (2, 14) and int(sampled.max()) < 64


def test_top_p_and_eos():
    from jaxattn.models import sample_logits

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = jax.vmap(lambda k, p: sample_logits(logits, k, 1.0, None, p), in_axes=(0, None))
    for top_p, want in ((0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        assert set(np.asarray(draws(keys, top_p)).ravel().tolist()) == want, top_p
    m = _tiny()
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)
    greedy = np.asarray(generate(m, prompt, 8, temperature=0.0))
    eos = int(greedy[0, 11])  # row 0's third new token
    out = np.asarray(generate(m, prompt, 8, temperature=0.0, eos_id=eos))
    first = [int(np.argmax(r[9:] == eos)) if (r[9:] == eos).any() else None for r in greedy]
    stop = max(f if f is not None else 7 for f in first) + 1  # every row done (or the budget used)
    assert out.shape == (2, 9 + stop)
    for r, f in enumerate(first):
        end = 9 + (stop if f is None else f + 1)
        np.testing.assert_array_equal(out[r, :end], greedy[r, :end])  # as greedy up to its eos
        assert (out[r, end:] == eos).all()  # then eos only
    # several ids (chat models): a row stops at the first of any; it is padded with the first id
    other = int(greedy[1, 10])  # row 1's second new token
    assert other != eos
    out = np.asarray(generate(m, prompt, 8, temperature=0.0, eos_id=[other, eos]))
    for r in range(2):
        hits = [i for i, t in enumerate(greedy[r, 9:]) if t in (other, eos)]
        end = 9 + hits[0] + 1
        np.testing.assert_array_equal(out[r, :end], greedy[r, :end])
        assert (out[r, end:] == other).all()
    assert out.shape[1] == 9 + max(next(i for i, t in enumerate(g[9:]) if t in (other, eos)) for g in greedy) + 1
    with pytest.raises(ValueError, match="eos_id"):
        generate(m, prompt, 2, eos_id=[3, 64])
    with pytest.raises(ValueError, match="top_p"):
        generate(m, prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="eos_id"):
        generate(m, prompt, 2, eos_id=64)


def test_min_p_and_repetition_penalty():
    """min-p keeps the tokens at least min_p x as likely as the top one (after temperature); the repetition
    penalty divides the seen tokens' positive logits and multiplies their negative ones, greedy included:
    greedy generation equals a numpy loop over the parallel forward that penalises every id so far; with
    transformers installed, its own processors give the same scores."""
    from jaxattn.models import apply_repetition_penalty, sample_logits
    from jaxattn.models.generation import warp_logits

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = jax.vmap(lambda k, mp, t: sample_logits(logits, k, t, None, None, mp), in_axes=(0, None, None))
    for min_p, temp, want in ((0.5, 1.0, {0, 1}), (0.25, 1.0, {0, 1, 2}), (0.05, 1.0, {0, 1, 2, 3}),
                              (0.25, 0.5, {0, 1}), (0.0, 1.0, {0, 1, 2, 3})):
        # (temperature 0.5 squares the ratios: 0.15 / 0.5 = 0.3 -> 0.09 < 0.25)
        assert set(np.asarray(draws(keys, min_p, temp)).ravel().tolist()) == want, (min_p, temp)
    raw = jnp.asarray([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, -2.0, 0.0]])
    seen = jnp.asarray([[True, True, False, False], [False, True, True, True]])
    np.testing.assert_allclose(apply_repetition_penalty(raw, seen, 2.0),
                               [[1.0, -2.0, 0.5, -3.0], [1.0, 0.5, -4.0, 0.0]])
    m = _tiny()
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)
    out = np.asarray(generate(m, prompt, 6, temperature=0.0, repetition_penalty=1.8))
    toks = np.asarray(prompt)
    for _ in range(6):  # the oracle: penalise each row's ids so far, then argmax
        lg = np.asarray(nnx.jit(lambda m, t: m(t))(m, jnp.asarray(toks))[:, -1], np.float64)
        for r in range(2):
            ids = np.unique(toks[r])
            lg[r, ids] = np.where(lg[r, ids] < 0, lg[r, ids] * 1.8, lg[r, ids] / 1.8)
        toks = np.concatenate([toks, lg.argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, toks)
    plain = np.asarray(generate(m, prompt, 6, temperature=0.0))
    assert (plain != out).any()  # (the penalty changed something)
    for kw, match in [(dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty")]:
        with pytest.raises(ValueError, match=match):
            generate(m, prompt, 2, **kw)
    try:
        import torch
        from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor
    except ImportError:
        return
    scores = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32) * 3
    ids = np.asarray(prompt)
    seen = np.zeros((2, 64), bool)
    seen[np.arange(2)[:, None], ids] = True
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.as_tensor(ids), torch.as_tensor(scores)).numpy()
    np.testing.assert_allclose(apply_repetition_penalty(jnp.asarray(scores), jnp.asarray(seen), 1.3), want, rtol=1e-6)
    want = MinPLogitsWarper(0.2)(torch.as_tensor(ids), torch.as_tensor(scores / 0.7)).numpy()
    got = np.asarray(warp_logits(jnp.asarray(scores), 0.7, None, None, 0.2))
    assert (np.isinf(got) == np.isinf(want)).all() and 1 < np.isfinite(got).sum() < 100
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_prefill_states_continue_the_sequence():
    m = _tiny()
    toks = jax.random.randint(jax.random.PRNGKey(2), (1, 30), 0, 64)
    full = nnx.jit(lambda m, t: m(t))(m, toks)  # jitted: eager op-by-op dispatch is slow on CPU
    _, states = nnx.jit(lambda m, t: m(t, return_states=True))(m, toks[:, :17])
    rest = nnx.jit(lambda m, t, s: m(t, states=s, offset=17))(m, toks[:, 17:], states)
    np.testing.assert_allclose(rest, full[:, 17:], atol=2e-5, rtol=1e-4)


def test_pallas_kernel_in_model_matches_xla():
    toks = jax.random.randint(jax.random.PRNGKey(4), (2, 40), 0, 64)
    m_xla, m_pal = _tiny(attn_impl="xla"), _tiny(attn_impl="pallas")

    def loss(m):
        lg = m(toks)
        return jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, toks[..., None], -1)[..., 0])

    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(m_xla)
    l2, g2 = nnx.jit(nnx.value_and_grad(loss))(m_pal)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


def test_named_configs_and_param_counts():
    counts = {}
    for name in ("tnl-385m", "tnl-1b"):
        abstract = nnx.eval_shape(lambda n=name: create_model(n, rngs=nnx.Rngs(0)))
        counts[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 0.3e9 < counts["tnl-385m"] < 0.5e9, counts
    assert 0.9e9 < counts["tnl-1b"] < 1.3e9, counts
    assert set(MODEL_CONFIGS) >= {"tnl-tiny", "tnl-385m", "tnl-1b", "tnl-7b"}


def test_bad_input():
    m = _tiny()
    with pytest.raises(ValueError, match="tokens must be int"):
        m(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("tnl-3b", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by heads"):
        TNLConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="prompt must be int"):
        generate(m, jnp.zeros((2, 0), jnp.int32), 3)


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_packed_documents_equal_each_document_alone(impl):
    """segment_ids: a packed row's logits are each document's own (the Lightning state restarts,
    LRPE is relative), gradients too; a given state feeds the first document only, the returned
    states are the last document's."""
    m = _tiny(attn_impl=impl)
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 40), 0, 64)
    seg = jnp.asarray([[4] * 13 + [9] * 20 + [4] * 7, [1] * 40])  # (an id may come back in a later document)
    docs = [(0, 13), (13, 33), (33, 40)]
    run = nnx.jit(lambda m, t, s: m(t, segment_ids=s, return_states=True))
    fwd = nnx.jit(lambda m, t: m(t))  # (jitted: eager op-by-op dispatch is slow on CPU)
    packed, states = run(m, toks, seg)
    alone = [fwd(m, toks[:1, a:z]) for a, z in docs]
    np.testing.assert_allclose(packed[:1], jnp.concatenate(alone, 1), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(packed[1:], fwd(m, toks[1:]), atol=2e-5, rtol=1e-4)
    assert float(jnp.abs(packed[:1, 13:] - fwd(m, toks[:1])[:, 13:]).max()) > 1e-2  # (the masks matter)
    # (LRPE rotates the state's keys at their positions)
    _, last = nnx.jit(lambda m, t: m(t, offset=33, return_states=True))(m, toks[:1, 33:])
    for s, ref in zip(states, last):
        np.testing.assert_allclose(s[:1], ref, atol=2e-5, rtol=1e-4)
    # a prefix's states continue the first document only
    _, prefix = nnx.jit(lambda m, t: m(t, return_states=True))(m, toks[:1, :5])
    cont = nnx.jit(lambda m, t, p, s: m(t, states=p, offset=5, segment_ids=s))(m, toks[:1, 5:], prefix, seg[:1, 5:])
    np.testing.assert_allclose(cont[:, :8], packed[:1, 5:13], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(cont[:, 8:], packed[:1, 13:], atol=2e-5, rtol=1e-4)

    def loss(m, t, s):
        return jnp.mean(m(t, segment_ids=s) ** 2)

    grads = nnx.jit(nnx.grad(loss))(m, toks[:1], seg[:1])
    ref = nnx.jit(nnx.grad(lambda m: sum(jnp.sum(m(toks[:1, a:z]) ** 2) for a, z in docs) / packed[:1].size))(m)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-3)
    with pytest.raises(ValueError, match=r"segment_ids must be int \[batch, seq\] = \(2, 40\)"):
        m(toks, segment_ids=seg[:, :39])
