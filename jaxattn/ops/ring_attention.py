"""Ring attention: softmax attention with the sequence split over a mesh axis (Liu et al. 2023,
"Ring Attention with Blockwise Transformers"), with JAX's SPMD.

Each device keeps its contiguous query shard; the key/value shards travel around the ring
(``ppermute``, P - 1 hops). At every hop the device attends to the shard it holds with
:func:`jaxattn.attention` (the flash kernel, which returns the log-sum-exp) and merges the partial
result into its running one by the log-sum-exp:

    lse = logaddexp(lse_acc, lse_r),   o = e^(lse_acc - lse) o_acc + e^(lse_r - lse) o_r

which is exact. Causal: shard ``j`` is visible to query shard ``i`` fully when ``j < i``, under the
causal mask when ``j == i`` (equal shard lengths make it the ordinary square causal mask), and not
at all when ``j > i`` (that hop is skipped with ``lax.cond``). Gradients flow through ``ppermute``
(its transpose is the reverse permutation) and the kernel's ``custom_vjp``.

Load balance (``layout="zigzag"``, as the zig-zag ring of ring-flash-attention / Megatron's context
parallelism): with contiguous shards and a causal mask, device ``P - 1`` attends at every hop while
device 0 idles after the first, so the ring runs at the pace of the busiest device. Zig-zag splits the
sequence into ``2P`` chunks of ``c`` tokens and gives device ``i`` chunks ``i`` and ``2P - 1 - i``;
then every hop after the first costs every device the same half of a full hop: from device ``j < i``
both query chunks see key chunk ``j`` only (chunk ``2P - 1 - j`` lies after them), from ``j > i``
the second query chunk sees both key chunks and the first sees none. The first hop (own keys) is the
ordinary causal mask over the two chunks (their order agrees with the global one).
:func:`zigzag_permutation` is the token order; :func:`ring_attention_sp` converts natural-order global
arrays to it and back with one chunk exchange (two ``ppermute`` s), or takes arrays already in that
order (``zigzagged=True``: a model permutes its tokens once, as ``GPT.enable_sequence_parallel(...,
layout="zigzag")``).

Positions (``local_window_size``, ``alibi_slopes``, ``score_mod``): each call gets its chunks' global
positions (``position_offset`` of :func:`jaxattn.attention`: query chunk start, key chunk start), so
windows, ALiBi distances and score_mod's ``q_idx`` / ``kv_idx`` are those of the whole sequence; every
chunk pair is then its own call, run only when some query of it sees some key (``lax.cond``): with a
window shorter than a shard, a device computes at most its own and its neighbour's keys, whatever the
number of hops. ``score_mod_tables`` are replicated; their gradient is summed over the devices.
``logits_soft_cap`` is elementwise and needs nothing.

Attention dropout: each hop draws its block of the single-device mask (``dropout_offset`` =
(first batch row, ``i * n``, ``j * n``)), so the result equals :func:`jaxattn.attention` with the
same ``dropout_rng`` on the whole sequence; merging by the log-sum-exp stays exact because the
kernel's lse is that of the undropped weights.

* ``ring_attention(q, k, v, axis=...)`` inside a ``shard_map`` over ``axis``;
* :func:`ring_attention_sp` wraps that ``shard_map`` for global arrays and a ``Mesh``;
* :func:`zigzag_permutation`, :func:`to_zigzag` / :func:`from_zigzag` (inside ``shard_map``),
  :func:`zigzag_sp` (global arrays) for the zig-zag layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxattn.ops import _checks, _spmd
from jaxattn.pallas._common import merge_partials, with_sinks
from jaxattn.pallas.flash import window_bounds

__all__ = ["from_zigzag", "ring_attention", "ring_attention_sp", "to_zigzag", "zigzag_permutation", "zigzag_sp"]

Layout = Literal["contiguous", "zigzag"]


def _merge(o_acc, lse_acc, o_r, lse_r):
    """Merges two normalised partial attentions ``o [b, n, h, e]`` with ``lse [b, n, h]``."""
    return merge_partials(jnp.stack([o_acc, o_r], 1), jnp.stack([lse_acc, lse_r], 1))


def zigzag_permutation(seq_len: int, n_shards: int) -> np.ndarray:
    """The zig-zag token order over ``n_shards`` devices: ``x[:, perm]`` split into ``n_shards``
    contiguous shards gives device ``i`` the chunks ``i`` and ``2·n_shards - 1 - i`` of
    ``seq_len / (2·n_shards)`` tokens (``np.argsort(perm)`` restores the natural order)."""
    if seq_len % (2 * n_shards):
        raise ValueError(f"zig-zag layout: sequence length {seq_len} must be divisible by 2 x {n_shards} shards "
                         f"(pad the sequence)")
    chunks = np.arange(seq_len).reshape(2 * n_shards, -1)
    order = [c for i in range(n_shards) for c in (i, 2 * n_shards - 1 - i)]
    return chunks[order].reshape(-1)


def _exchange(x: jax.Array, axis: str, inverse: bool) -> jax.Array:
    """Natural <-> zig-zag shards over ``axis`` inside ``shard_map``: one ``ppermute`` for the even
    chunks and one for the odd (each is a permutation of the devices), then a select by parity."""
    p = int(lax.axis_size(axis))
    idx = lax.axis_index(axis)
    home = lambda m: m if m < p else 2 * p - 1 - m  # noqa: E731  (the device chunk m lives on, zig-zag)
    c = x.shape[1] // 2
    halves = (x[:, :c], x[:, c:])
    if not inverse:  # device i holds chunks 2i, 2i + 1; device j wants j (first) and 2p - 1 - j (second)
        got = [lax.ppermute(halves[h], axis, [(i, home(2 * i + h)) for i in range(p)]) for h in (0, 1)]
        even_first = idx % 2 == 0  # chunk j has j's parity, so j's first chunk arrived with the even ones
        first, second = (jnp.where(even_first, got[0], got[1]), jnp.where(even_first, got[1], got[0]))
        return jnp.concatenate([first, second], axis=1)
    # inverse: device j sends chunk j and chunk 2p - 1 - j; the even one of them goes to its natural half 0
    even_first = idx % 2 == 0
    even, odd = jnp.where(even_first, halves[0], halves[1]), jnp.where(even_first, halves[1], halves[0])
    chunk_of = lambda j, parity: j if j % 2 == parity else 2 * p - 1 - j  # noqa: E731
    got = [lax.ppermute(t, axis, [(j, chunk_of(j, h) // 2) for j in range(p)]) for h, t in ((0, even), (1, odd))]
    return jnp.concatenate(got, axis=1)


def to_zigzag(x: jax.Array, axis: str) -> jax.Array:
    """Inside ``shard_map`` over ``axis``: this device's contiguous shard ``x [batch, seq/P, ...]`` ->
    its zig-zag shard (chunks ``i`` and ``2P - 1 - i`` of the sequence); one exchange of the shard."""
    return _exchange(x, axis, inverse=False)


def from_zigzag(x: jax.Array, axis: str) -> jax.Array:
    """The inverse of :func:`to_zigzag`."""
    return _exchange(x, axis, inverse=True)


def zigzag_sp(x: jax.Array, *, mesh: Mesh, axis: str, batch_axis: str | None = None,
              inverse: bool = False) -> jax.Array:
    """``x[:, zigzag_permutation(seq, P)]`` (``inverse``: back to natural order) for a global array
    ``x [batch, seq, ...]`` split over ``mesh`` axis ``axis``, as one shard exchange
    (:func:`to_zigzag` / :func:`from_zigzag` in a ``shard_map``) instead of a gather of the whole
    sequence."""
    _spmd.check_mesh(mesh, axis, batch_axis)
    zigzag_permutation(x.shape[1], mesh.shape[axis])  # the length check
    spec = P(batch_axis, axis)
    f = from_zigzag if inverse else to_zigzag
    return _spmd.shard_map(lambda t: f(t, axis), mesh=mesh, in_specs=(spec,), out_specs=spec)(x)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis: str, causal: bool = False,
                   scale: float | None = None, local_window_size: int | tuple[int | None, int | None] | None = None,
                   logits_soft_cap: float | None = None, alibi_slopes: jax.Array | None = None,
                   score_mod: Callable | None = None, score_mod_tables: Sequence[jax.Array] = (),
                   sinks: jax.Array | None = None,
                   dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                   batch_axis: str | None = None, impl: Literal["auto", "pallas", "xla"] = "auto",
                   return_lse: bool = False, layout: Layout = "contiguous",
                   segment_ids: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Inside ``shard_map`` over ``axis``: this device's shard of ``softmax(q k^T) v`` where q, k, v
    ``[batch, seq/P, heads, head_dim]`` are its shards: contiguous (shard ``i`` = positions
    ``[i·n, (i+1)·n)``) or, ``layout="zigzag"``, chunks ``i`` and ``2P - 1 - i`` of ``n/2`` tokens
    (balanced causal work; see the module docstring). GQA as in :func:`jaxattn.attention`.
    ``segment_ids`` int ``[batch, seq/P]`` (this shard's, in the same layout): packed sequences, queries see
    only keys of their segment; the keys' ids travel the ring with them.
    ``local_window_size``, ``logits_soft_cap``, ``alibi_slopes`` (``[heads]`` or this shard's ``[batch,
    heads]``), ``score_mod`` and ``score_mod_tables`` (replicated) as :func:`jaxattn.attention`'s, over the
    global positions of the whole sequence; a table's gradient is this device's part (inside your own
    ``shard_map``, give the tables a replicated spec: its transpose sums them). ``sinks [heads]``
    (replicated): attention sinks, merged once into the hops' merged result.
    ``dropout_rate`` / ``dropout_rng`` (the same key on every device): attention dropout with the
    single-device mask; ``batch_axis`` names the mesh axis the batch is split over, if any (the mask
    depends on the global batch row). Returns ``out`` in q's dtype (and the fp32 log-sum-exp
    ``[batch, seq/P, heads]``)."""
    from jaxattn.ops.attention import attention

    check_layout(layout)
    idx = lax.axis_index(axis)
    n_shards = int(lax.axis_size(axis))  # static inside shard_map
    perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"zig-zag layout: the shard length {q.shape[1]} must be even (two chunks per device)")
    window = _checks.check_window(local_window_size)
    positional = window is not None or alibi_slopes is not None or score_mod is not None
    hop = functools.partial(
        _hop, q, q_seg=segment_ids, zigzag=layout == "zigzag", causal=causal, idx=idx, n_shards=n_shards,
        b0=lax.axis_index(batch_axis) * q.shape[0] if batch_axis is not None else 0, dropout=bool(dropout_rate),
        window=window if positional else None, positional=positional,
        call=functools.partial(attention, scale=scale, impl=impl, return_lse=True, dropout_rate=dropout_rate,
                               dropout_rng=dropout_rng, local_window_size=window, logits_soft_cap=logits_soft_cap,
                               alibi_slopes=alibi_slopes, score_mod=score_mod,
                               score_mod_tables=tuple(score_mod_tables)))
    kv_seg = segment_ids
    o_acc, lse_acc = hop(k, v, kv_seg, None)  # this device's own keys: src = idx
    for r in range(1, n_shards):
        k = lax.ppermute(k, axis, perm)
        v = lax.ppermute(v, axis, perm)
        if kv_seg is not None:
            kv_seg = lax.ppermute(kv_seg, axis, perm)
        o_r, lse_r = hop(k, v, kv_seg, (idx - r) % n_shards)  # the shard this device now holds
        o_acc, lse_acc = _merge(o_acc, lse_acc, o_r, lse_r)
    if sinks is not None:  # (once, after the hops: the sink is one more partial)
        o_acc, lse_acc = with_sinks(o_acc, lse_acc, sinks)
    out = o_acc.astype(q.dtype)
    return (out, lse_acc) if return_lse else out


def _hop(q, k, v, kv_seg, src, *, q_seg, zigzag: bool, causal: bool, idx, n_shards: int, call, b0, dropout: bool,
         window=None, positional: bool = False):
    """One hop of the ring: (o, lse) of this device's queries against the keys of device ``src`` (None: its
    own). A device's shard is one chunk (contiguous: chunk ``dev``) or two (zig-zag: chunks ``dev`` and
    ``2P-1-dev``) of ``c`` tokens; the attention runs on the chunk pairs that are visible, fused where they are
    contiguous, each query chunk's results merged. With dropout every call is one chunk pair (its mask offset
    is that pair's). ``q_seg`` / ``kv_seg``: segment ids, or None. ``positional`` (a window, ALiBi or
    score_mod): every chunk pair is a call with its global positions, run when :func:`_pair_visible`."""
    halves = 2 if zigzag else 1
    c = q.shape[1] // halves
    chunk = lambda dev, half: dev if half == 0 else 2 * n_shards - 1 - dev  # noqa: E731
    src_dev = idx if src is None else src
    rows = lambda t, hs: t[:, hs[0] * c:(hs[-1] + 1) * c]  # noqa: E731  (contiguous chunks hs of a shard)
    empty = (jnp.zeros(q.shape[:1] + (c,) + q.shape[2:3] + v.shape[3:], jnp.float32),
             jnp.full(q.shape[:1] + (c,) + q.shape[2:3], -jnp.inf))  # (a query chunk that sees no key)

    def run(calls):
        """``calls``: (query chunks, key chunks, causal), each a run of contiguous chunks. With dropout or
        ``positional``, one call per chunk pair (``positional``: with its global positions, skipped by
        ``lax.cond`` when :func:`_pair_visible` says it sees nothing)."""
        if dropout or positional:
            calls = [((a,), (b,), cz) for qs, ks, cz in calls for a in qs for b in ks]
        acc = [None] * halves
        for qs, ks, cz in calls:
            seg = {} if q_seg is None else {"segment_ids": (rows(q_seg, qs), rows(kv_seg, ks))}
            q0, k0 = chunk(idx, qs[0]) * c, chunk(src_dev, ks[0]) * c
            pos = {"position_offset": (q0, k0)} if positional else {}

            def attend(qs=qs, ks=ks, cz=cz, seg=seg, q0=q0, k0=k0, pos=pos):
                o, lse = call(rows(q, qs), rows(k, ks), rows(v, ks), causal=cz, dropout_offset=(b0, q0, k0),
                              **pos, **seg)
                return o.astype(jnp.float32), lse.astype(jnp.float32)

            visible = _pair_visible(chunk(idx, qs[0]), chunk(src_dev, ks[0]), c, causal, window) if positional else None
            o, lse = attend() if visible is None else lax.cond(visible, attend, lambda: empty)
            for j, a in enumerate(qs):
                part = (o[:, j * c:(j + 1) * c], lse[:, j * c:(j + 1) * c])
                acc[a] = part if acc[a] is None else _merge(*acc[a], *part)
        return tuple(jnp.concatenate(t, axis=1) for t in zip(*(empty if a is None else a for a in acc)))

    every = tuple(range(halves))
    if positional:  # (the kernel masks by global positions; invisible pairs are skipped)
        return run([(every, every, causal)])
    if not causal:
        return run([(every, every, False)])
    if src is None:  # own keys: the chunks in global order, so the plain causal mask
        if zigzag and dropout:  # (chunk 2P-1-idx sees chunk idx whole)
            return run([((0,), (0,), True), ((1,), (0,), False), ((1,), (1,), True)])
        return run([(every, every, True)])
    # src < idx: every query chunk sees key chunk src (zig-zag: not 2P-1-src); src > idx: contiguous, nothing;
    # zig-zag, query chunk 2P-1-idx sees both key chunks
    after = [((1,), (0, 1), False)] if zigzag else []
    return lax.cond(src < idx, lambda: run([(every, (0,), False)]), lambda: run(after))


def _pair_visible(qc, kc, c: int, causal: bool, window):
    """Whether some query of chunk ``qc`` sees some key of chunk ``kc`` (chunks of ``c`` tokens; traced
    chunk indices), under ``causal`` and ``window = (left, right)``; None when every pair is visible."""
    left, right = window_bounds(window, causal)
    gap = (kc - qc) * c  # key position - query position ranges over gap - (c - 1) .. gap + (c - 1)
    visible = None
    if right is not None:
        visible = gap - (c - 1) <= right
    if left is not None:
        far = gap + (c - 1) >= -left
        visible = far if visible is None else visible & far
    return visible


def check_layout(layout: str) -> None:
    """A ``ValueError`` unless ``layout`` is ``"contiguous"`` or ``"zigzag"``."""
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")


def ring_attention_sp(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis: str,
                      batch_axis: str | None = None, causal: bool = False, scale: float | None = None,
                      local_window_size: int | tuple[int | None, int | None] | None = None,
                      logits_soft_cap: float | None = None, alibi_slopes: jax.Array | None = None,
                      score_mod: Callable | None = None, score_mod_tables: Sequence[jax.Array] = (),
                      sinks: jax.Array | None = None, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                      impl: Literal["auto", "pallas", "xla"] = "auto", layout: Layout = "contiguous",
                      zigzagged: bool = False, segment_ids: jax.Array | None = None) -> jax.Array:
    """:func:`jaxattn.attention` (no masks; segment ids below) with the sequence split over ``mesh``
    axis ``axis`` (and the batch over ``batch_axis``) by :func:`ring_attention`. q and k/v must
    have the same length, divisible by the size of ``axis`` (by twice it for ``layout="zigzag"``).
    With ``dropout_rate`` > 0 the result equals :func:`jaxattn.attention` with the same
    ``dropout_rng`` (the same mask). ``layout="zigzag"`` balances causal work over the devices: the
    arrays are in natural order and are exchanged into the zig-zag shards and back, unless
    ``zigzagged=True`` says they are already in :func:`zigzag_permutation` order (the result then is too).
    ``segment_ids`` int ``[batch, seq]`` (in the arrays' order): packed sequences, as :func:`jaxattn.attention`'s.
    ``local_window_size``, ``logits_soft_cap``, ``alibi_slopes``, ``score_mod`` / ``score_mod_tables``: as
    :func:`jaxattn.attention`'s, over the natural (global) positions, whatever the layout; a window skips
    the hops it cannot see. ``sinks [heads]``: attention sinks, as :func:`jaxattn.attention`'s."""
    _spmd.check_mesh(mesh, axis, batch_axis)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_rank(name, x, 4, "[batch, seq, heads, head_dim]")
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(f"ring attention needs q, k and v of one sequence length, got {q.shape[1]}, "
                         f"{k.shape[1]}, {v.shape[1]}")
    _spmd.check_split(q, mesh, axis, batch_axis)
    _checks.check_dropout(dropout_rate, dropout_rng)
    check_layout(layout)
    _checks.check_window(local_window_size)
    _checks.check_soft_cap(logits_soft_cap)
    score_mod, tables = _checks.check_score_mod(score_mod, score_mod_tables)
    sinks = _checks.check_sinks(sinks, q.shape[2])
    if alibi_slopes is not None:  # [B, heads], split with the batch
        alibi_slopes = jnp.broadcast_to(
            jnp.asarray(_checks.check_alibi(alibi_slopes, q.shape[0], q.shape[2]), jnp.float32).reshape(-1, q.shape[2]),
            (q.shape[0], q.shape[2]))
    if segment_ids is not None and (segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be int [batch, seq] = {tuple(q.shape[:2])}, got "
                         f"{jnp.dtype(segment_ids.dtype).name} {tuple(segment_ids.shape)}")
    if layout == "zigzag":
        zigzag_permutation(q.shape[1], mesh.shape[axis])  # the length check
    elif zigzagged:
        raise ValueError("zigzagged=True needs layout='zigzag'")
    spec = P(batch_axis, axis)
    convert = layout == "zigzag" and not zigzagged
    seed = _dropout_key_data(dropout_rng) if dropout_rate else jnp.zeros((2,), jnp.uint32)  # replicated

    def body(q, k, v, seed, seg, slopes, tables, sinks):
        if convert:
            q, k, v = (to_zigzag(t, axis) for t in (q, k, v))
            seg = None if seg is None else to_zigzag(seg, axis)
        out = ring_attention(q, k, v, axis=axis, causal=causal, scale=scale, local_window_size=local_window_size,
                             logits_soft_cap=logits_soft_cap, alibi_slopes=slopes, score_mod=score_mod,
                             score_mod_tables=tables, sinks=sinks, dropout_rate=dropout_rate,
                             dropout_rng=seed if dropout_rate else None, batch_axis=batch_axis, impl=impl,
                             layout=layout, segment_ids=seg)
        return from_zigzag(out, axis) if convert else out

    # (None for the ids or slopes: nothing to pass; the tables are replicated)
    args = (q, k, v, seed, segment_ids, alibi_slopes, tables, sinks)
    specs = (spec, spec, spec, P(), None if segment_ids is None else spec,
             None if alibi_slopes is None else P(batch_axis), tuple(P() for _ in tables),
             None if sinks is None else P())
    return _spmd.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec)(*args)


def _dropout_key_data(rng: jax.Array) -> jax.Array:
    """A PRNG key as raw key data (typed keys become ``uint32[2]``); ``_dropout`` accepts both."""
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
