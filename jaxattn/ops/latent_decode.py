"""``jaxattn.latent_decode_attention``: decoding against a multi-head latent attention cache (DeepSeek's MLA with
the up-projection absorbed, :mod:`jaxattn.models.mla`): every query head attends to one key head whose first
``value_dim`` columns are also the value (the latent)."""

from __future__ import annotations

from typing import Literal

import jax

from jaxattn.ops import _checks, _spmd
from jaxattn.ops.decode import _NO_GRAD, _check_lengths, reference_on
from jaxattn.pallas import decode as _decode
from jaxattn.pallas._common import targets_gpu

__all__ = ["latent_decode_attention"]


def latent_decode_attention(q: jax.Array, cache: jax.Array, lengths: jax.Array | int | None = None, *,
                            value_dim: int, causal: bool = True, scale: float | None = None,
                            impl: Literal["auto", "pallas", "xla"] = "auto", num_splits: int | None = None,
                            return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of ``Sq`` new queries ``q [batch, Sq, heads, D]`` to the first ``lengths[b]`` rows of a latent
    ``cache [batch, S, 1, D]``: keys are its rows, values their first ``value_dim`` columns. ``causal``,
    ``scale``, ``num_splits``, ``return_lse`` as :func:`jaxattn.decode_attention`. ``impl="pallas"``: the
    decode kernel's latent mode (each cache block read once, as a ``value_dim``-wide and a ``D - value_dim``-wide
    tile: both powers of two >= 16, at most 512 and 128; DeepSeek's 512 + 64), ``"xla"`` the dense
    reference (differentiable), ``"auto"`` the kernel on a GPU when the widths fit it. Returns ``out
    [batch, Sq, heads, value_dim]`` in q's dtype (and the fp32 lse)."""
    _checks.check_impl(impl)
    causal = _checks.check_flag("causal", causal)
    _checks.check_rank("q", q, 4, "[batch, Sq, heads, D]")
    _checks.check_rank("cache", cache, 4, "[batch, S, 1, D]")
    _checks.check_float_dtype("q", q)
    _checks.check_same_dtype(q=q, cache=cache)
    batch, _, _, d = q.shape
    if cache.shape[0] != batch or cache.shape[2] != 1 or cache.shape[3] != d:
        raise ValueError(f"cache must be [batch, S, 1, D] = [{batch}, S, 1, {d}] like q {tuple(q.shape)}, got "
                         f"{tuple(cache.shape)}")
    if not isinstance(value_dim, int) or not 0 < value_dim <= d:
        raise ValueError(f"value_dim must be an int in [1, D = {d}] (the latent's width), got {value_dim!r}")
    lengths = _check_lengths(lengths, batch, cache.shape[1])
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    scale = _checks.check_scale(scale)
    kernel_ok = _decode.latent_kernel_ok(d, value_dim)
    if impl == "pallas" and not kernel_ok:
        raise ValueError(f"impl='pallas': the latent decode kernel takes value_dim and D - value_dim powers of two "
                         f">= 16, at most {_decode.LATENT_MAX}; got value_dim={value_dim}, D={d}")
    if (impl == "pallas" or (impl == "auto" and kernel_ok and targets_gpu())) and not _checks.empty(q, cache):
        q, cache = (_checks.no_grad(x, _NO_GRAD) for x in (q, cache))
        out, lse = _spmd.per_batch_shard(
            lambda batch_offset=None, **a: _decode.latent_decode_attention_kernel(
                value_dim=value_dim, causal=causal, scale=scale, num_splits=num_splits, **a),
            dict(q=q, cache=cache, lengths=lengths))
    else:
        out, lse = reference_on(q, cache, cache[..., :value_dim], lengths, causal,
                                dict(scale=scale, local_window_size=None, logits_soft_cap=None, alibi_slopes=None,
                                     num_splits=num_splits, score_mod=None, score_mod_tables=()))
    return (out, lse) if return_lse else out
