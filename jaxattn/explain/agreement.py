"""Agreement between two token-importance maps (e.g. attention vs gradient importance), as in the
attention-perturbation papers (Kitada & Iyatomi): Pearson r and Kendall tau-b per instance over its
first ``lengths[i]`` tokens, averaged over instances (numpy only).

An instance whose correlation is undefined (fewer than 2 tokens, or a constant map: scipy returns
nan there) is left out of the average; the result is nan when every instance is undefined.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["pearson", "kendall_tau", "per_instance", "gradient_importance"]


def _pair(a, b, lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"a must be a real array [N, T], got shape {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"b must have the shape of a {a.shape}, got {b.shape}")
    n, t = a.shape
    lengths = np.asarray(lengths)
    if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be an integer array [N]=[{n}], got shape {lengths.shape} dtype {lengths.dtype}")
    if (lengths < 0).any() or (lengths > t).any():
        raise ValueError(f"lengths must lie in [0, T={t}], got {lengths.min()}..{lengths.max()}")
    return a, b, lengths


def _pearson1(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _kendall1(x: np.ndarray, y: np.ndarray) -> float:
    """tau-b = sum_{i<j} sx sy / sqrt(sum sx^2 * sum sy^2), s = sign of the pair difference
    (= (C - D) / sqrt((n0 - n1)(n0 - n2)) with the tie corrections n1, n2)."""
    if len(x) < 2:
        return float("nan")
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    den = np.sqrt((sx * sx).sum() * (sy * sy).sum())  # both sums count each pair twice; ratio unchanged
    return float((sx * sy).sum() / den) if den > 0 else float("nan")


def per_instance(a, b, lengths, *, method: str = "pearson") -> np.ndarray:
    """The per-instance correlations ``[N]`` (nan where undefined)."""
    a, b, lengths = _pair(a, b, lengths)
    fn = {"pearson": _pearson1, "kendall": _kendall1}.get(method)
    if fn is None:
        raise ValueError(f"method must be 'pearson' or 'kendall', got {method!r}")
    return np.array([fn(a[i, :lengths[i]], b[i, :lengths[i]]) for i in range(len(a))])


def _mean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def pearson(a, b, lengths) -> float:
    """Mean over instances of Pearson's r between ``a[i, :lengths[i]]`` and ``b[i, :lengths[i]]``."""
    return _mean(per_instance(a, b, lengths, method="pearson"))


def kendall_tau(a, b, lengths) -> float:
    """Mean over instances of Kendall's tau-b (ties corrected, as ``scipy.stats.kendalltau``)."""
    return _mean(per_instance(a, b, lengths, method="kendall"))


def gradient_importance(fn: Callable, embeddings, target=None, *, output: str = "prob"):
    """Gradient word importance ``[N, T]``: the L2 norm over the embedding axis of the gradient of
    the target class's output wrt the token embeddings ``[N, T, D]``.

    ``fn(embeddings) -> logits [N, C]``; ``target [N]`` defaults to the predicted class (argmax of
    the logits); ``output``: ``"prob"`` (softmax probability, default) or ``"logit"``. Each instance's
    output depends only on its own row, so one gradient of the sum gives every instance's gradient.
    """
    import jax
    import jax.numpy as jnp

    if output not in ("prob", "logit"):
        raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
    emb = jnp.asarray(embeddings)
    if emb.ndim != 3 or not jnp.issubdtype(emb.dtype, jnp.floating):
        raise ValueError(f"embeddings must be a float array [N, T, D], got shape {emb.shape} dtype {emb.dtype}")
    logits = fn(emb)
    if logits.ndim != 2 or logits.shape[0] != emb.shape[0]:
        raise ValueError(f"fn must return logits [N, C] with N={emb.shape[0]}, got shape {logits.shape}")
    tgt = jnp.argmax(logits, -1) if target is None else jnp.asarray(target)
    if tgt.shape != (emb.shape[0],):
        raise ValueError(f"target must be an integer array [N]=[{emb.shape[0]}], got shape {tgt.shape}")

    def total(e):
        out = fn(e).astype(jnp.float32)
        out = jax.nn.softmax(out, -1) if output == "prob" else out
        return jnp.take_along_axis(out, tgt[:, None], axis=1).sum()

    g = jax.grad(total)(emb)
    return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), -1))
