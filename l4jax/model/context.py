"""Context parallelism: attention over prefill and training rows whose sequence is split across devices.

On a mesh with a ``context`` axis (the mesh axes of ``LENGTH`` in the rules table), a row of T tokens lives as c
contiguous shards of T / c tokens, one per device along that axis. Everything but attention acts on the tokens where
they are: norms, projections, RoPE, the MoE (each token is routed on its own). Attention needs keys from other
devices, and how many depends on the layer:

- a chunked (RoPE) layer's query sees at most the C - 1 keys before it (C = attention_chunk_size). When a shard
  holds at least C tokens, those keys are on the device itself or on the one before it: each device passes its
  last C - 1 keys, values, slots, validity and groups to the next one (``ppermute``: a halo), and scores each
  block of its queries against only the block + C - 1 entries before its end (halo included). The first device
  gets an invalid halo. A shard shorter than a chunk takes the global path below.
- a global (NoPE) layer's last query sees the whole row, and so does a chunked layer's query when shards are shorter
  than a chunk. A short row (its keys and values at most ``GATHER_BYTES``) is gathered whole in one collective and
  each device scores its queries against it; a longer one goes through ring attention: each device scores its own
  queries against its own keys, then passes its keys and values (with their slots, validity and groups) to the next
  device along the axis and scores the ones it receives, c - 1 times, accumulating an online softmax (running max
  and sum, as flash attention does) over blocks of ``block`` queries and ``block`` keys: a device holds two blocks
  of T / c keys and [B, H, block, block] scores at a time, never the row's keys. With an even shard the ring runs
  zig-zag (``_zigzag``): device d holds chunks d and 2c - 1 - d of the row cut in 2c, and at each step scores only
  the two of its four (query half, key half) pairs that are not wholly in the future: every device does the same
  work, (c + 1) / 2c of a contiguous ring's (bench/ring.py: 0.50-0.57x at c = 8 on the CPU). An odd shard takes the
  contiguous ring (every device scores all T keys, masked). Each send is one packed array (``_send``), which XLA's
  GPU scheduler overlaps with the step's scoring (it keeps one collective-permute in flight at a time).

Both score blocks of queries and keys with an online softmax (``_accumulate``): [B, H, block, block] scores at a
time, whatever the length. Numbers equal the one-device paths' up to the order of the sums
(tests/model/test_context.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .axes import Partitioning, ShardingError
from .masks import visible


def check_split(T: int, part: Partitioning) -> None:
    """A row of T tokens must split evenly over the sequence's mesh axes: a ShardingError names them and T."""
    if T > 1 and T % part.context:
        raise ShardingError(f"context: a sequence of {T} tokens does not split over mesh axes {part.sequence_axes} "
                            f"(size {part.context}); pad the rows to a multiple of {part.context}")


def attend_split(q: jax.Array, k: jax.Array, v: jax.Array, q_index: jax.Array, k_valid: jax.Array,
                 group: jax.Array | None, scale: float, span: int | None, part: Partitioning,
                 block: int) -> jax.Array:
    """``attend`` of fresh tokens (no cache before them) whose sequence is split over ``part``'s sequence axes.

    q [B, T, H, hd]; k, v [B, T, K, hd]; q_index [1|B, T] slots; k_valid [B, T]; group [B, T] (chunk and/or
    document) or None (global, one document); ``span`` the chunk of a chunked layer, else None.
    """
    axes = part.sequence_axes
    if len(axes) != 1:
        raise ShardingError(f"context parallelism splits the sequence over one mesh axis, got {axes}")
    (axis,) = axes
    c, T = part.context, q.shape[1]
    check_split(T, part)
    seq = P(None, axis)
    specs = (P(None, axis, None, None),) * 3 + (seq, seq) + ((seq,) if group is not None else ())
    halo = span is not None and span > 1 and T // c >= span

    def local(q, k, v, q_index, k_valid, *group):
        group = group[0] if group else None
        keys = (k, v, jnp.broadcast_to(q_index, k_valid.shape), k_valid, group)  # slots per row, like the halo's
        if halo:  # the previous device's last span - 1 entries; the first device's arrive zeroed: invalid
            past = _send(jax.tree.map(lambda x: x[:, -(span - 1):], keys), axis,
                         tuple((i, i + 1) for i in range(c - 1)))
            return _local(q, keys, past, scale, span, block)
        if _row_bytes(k, c) <= GATHER_BYTES:
            return _visit_all(q, keys, _gather(keys, axis, c), scale, block)
        return _ring(q, keys, scale, block, axis, c)

    args = (q, k, v, q_index, k_valid) + ((group,) if group is not None else ())
    return jax.shard_map(local, mesh=part.mesh, in_specs=specs, out_specs=specs[0], axis_names={axis},
                         check_vma=False)(*args)


FILLS = (0, 0, -1, False, -1)  # padding of keys, values, slots, validity, groups: never visible
# A row whose keys and values take at most this many bytes (the whole row's, on each device) is gathered in one
# collective and scored at once; a longer one goes around the ring (c - 1 steps under the scoring, zig-zag).
# 32 MiB is 8192 tokens of Scout's 8 kv heads of 128 in bf16: below it a step is latency, not transfer or work.
GATHER_BYTES = 32 << 20


def _row_bytes(k, c: int) -> int:
    """Bytes of the whole rows' keys and values, from one device's k [B, t, K, hd] (B and K as it sees them)."""
    return 2 * c * k.size * k.dtype.itemsize


def _visit_all(q, own, keys, scale: float, block: int) -> jax.Array:
    """One device's queries q [B, t, H, hd] (slots and groups those of its ``own`` keys) against the whole row's
    ``keys`` (gathered), in blocks."""
    blocks = _query_blocks(q, own[2], own[4], block, own[0].shape[2])
    return _finish(_visit(jax.vmap(_empty)(blocks[0]), blocks, keys, scale, block), q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(keys, axis: str, c: int):
    """The whole row's ``keys`` (k, v, slots, validity, groups or None) from every device's part along ``axis``:
    one all-gather of the packed array (``_pack``). The gradient of k and v comes back as one reduce-scatter."""
    packed, layout = _pack(keys)
    whole = tuple(None if x is None else ((x[0][0], x[0][1] * c) + x[0][2:], x[1], x[2]) for x in layout)
    return _unpack(jax.lax.all_gather(packed, axis, axis=1, tiled=True), whole)


def _gather_fwd(keys, axis: str, c: int):
    return _gather(keys, axis, c), None


def _gather_bwd(axis: str, c: int, _, cot):
    dk, dv = jax.lax.psum_scatter(jnp.stack(cot[:2]), axis, scatter_dimension=2, tiled=True)
    ints = tuple(None if x is None else np.zeros((x.shape[0], x.shape[1] // c) + x.shape[2:], jax.dtypes.float0)
                 for x in cot[2:])  # no gradient
    return ((dk, dv) + ints,)


_gather.defvjp(_gather_fwd, _gather_bwd)


def _local(q, keys, past, scale: float, span: int, block: int) -> jax.Array:
    """A chunked layer's shard q [B, t, H, hd] (t >= span), its own ``keys`` (k, v [B, t, K, hd], slots, validity,
    groups [B, t]) and the ``past`` span - 1 entries before them: query block i (of b = ``block``) can see only the
    b + span - 1 entries ending at its own end, and scores just those (t (b + span) pairs, not t^2)."""
    ext = tuple(jnp.concatenate([p, x], 1) for p, x in zip(past, keys))
    qs, qi, qg = _query_blocks(q, keys[2], keys[4], block, keys[0].shape[2])
    n, b = qs.shape[0], qs.shape[2]
    width = b + span - 1
    ext = tuple(jnp.pad(x, [(0, 0), (0, (n - 1) * b + width - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                        constant_values=f) for x, f in zip(ext, FILLS))

    def one(xs):
        i, acc = xs[0], _empty(xs[1])
        seen = tuple(jax.lax.dynamic_slice_in_dim(x, i * b, width, axis=1) for x in ext)
        return _accumulate(xs[1], xs[2], xs[3], acc, seen, scale, block)

    return _finish(jax.lax.map(one, (jnp.arange(n), qs, qi, qg)), q)


def _ring(q, keys, scale: float, block: int, axis: str, c: int) -> jax.Array:
    """Ring attention on one device's shard: its queries q [B, t, H, hd] against every device's ``keys`` (k, v
    [B, t, K, hd], slots, validity, groups [B, t]), which travel around the ring: c - 1 sends (``_send``), each
    block scored as it arrives (``_accumulate``, an online softmax): a device holds 2 blocks of t keys at a time.
    An even shard goes the zig-zag way (``_zigzag``): half the pairs."""
    if q.shape[1] % 2 == 0:
        return _zigzag(q, keys, scale, block, axis, c)
    qs, qi, qg = _query_blocks(q, keys[2], keys[4], block, keys[0].shape[2])
    acc = jax.vmap(_empty)(qs)

    def step(_, state):
        keys, acc = state
        # Send the block on first, then score it: the transfer (an async collective-permute) runs under the scoring.
        return _send(keys, axis, _next(c)), _visit(acc, (qs, qi, qg), keys, scale, block)

    keys, acc = jax.lax.fori_loop(0, c - 1, step, (keys, acc))
    return _finish(_visit(acc, (qs, qi, qg), keys, scale, block), q)


def _next(c: int) -> tuple[tuple[int, int], ...]:
    return tuple((j, (j + 1) % c) for j in range(c))


def _visit(acc, queries, keys, scale: float, block: int):
    """Query blocks (q [n, B, b, K, G, hd], slots, groups [n, B, b] or None) through ``keys``, their running sums
    ``acc`` carried on (``_accumulate``)."""
    qs, qi, qg = queries
    return jax.lax.map(lambda xs: _accumulate(xs[0], xs[1], xs[2], xs[3:], keys, scale, block), (qs, qi, qg, *acc))


def _zigzag(q, keys, scale: float, block: int, axis: str, c: int) -> jax.Array:
    """Ring attention with the row cut into 2c chunks and device d holding chunks d and 2c - 1 - d (a zig-zag):
    whichever device a block of keys comes from, half of the (query half, key half) pairs are wholly in the future
    and skipped, so every device scores the same half of the pairs the contiguous ring does.

    Its chunks come from the devices holding them (two sends of half a shard each way: queries, keys, and the
    output back). At step s a device holds the keys of device j = d - s (mod c): for s <= d (j < d) both its query
    halves see the first key half and neither sees the second; for s > d only its second query half sees keys,
    both halves of them. The masks (slots, validity, groups) still decide every pair: skipping only drops pairs
    they would hide."""
    d, h = jax.lax.axis_index(axis), q.shape[1] // 2
    zig = [m if m < c else 2 * c - 1 - m for m in range(2 * c)]  # chunk -> device
    there = tuple(tuple((i, zig[2 * i + half]) for i in range(c)) for half in (0, 1))  # each half's sends
    even = d % 2 == 0  # chunk d came with the first halves' send, chunk 2c - 1 - d with the second's; or the reverse

    def placed(x, send):  # x [B, t, ...] cut in halves, each sent where its chunk lives: (chunk d, chunk 2c-1-d)
        a, b = (send(jax.tree.map(lambda y: y[:, half * h:(half + 1) * h], x), there[half]) for half in (0, 1))
        return _pick(even, a, b), _pick(even, b, a)

    (qa,), (qb,) = placed((q,), lambda x, pairs: (jax.lax.ppermute(x[0], axis, pairs),))
    ka, kb = placed(keys, lambda x, pairs: _send(x, axis, pairs))
    K = keys[0].shape[2]
    first, second = _query_blocks(qa, ka[2], ka[4], block, K), _query_blocks(qb, kb[2], kb[4], block, K)
    acc = (jax.vmap(_empty)(first[0]), jax.vmap(_empty)(second[0]))
    own = jax.tree.map(lambda x, y: jnp.concatenate([x, y], 1), ka, kb)

    def score(s, keys, acc):  # keys of device d - s (mod c), s >= 1: two of the four pairs
        early = s <= d
        k1 = jax.tree.map(lambda x: x[:, :h], keys)
        k2 = _pick(early, k1, jax.tree.map(lambda x: x[:, h:], keys))
        r1 = _visit(_pick(early, acc[0], acc[1]), _pick(early, first, second), k1, scale, block)
        r2 = _visit(_pick(early, acc[1], r1), second, k2, scale, block)
        return _pick(early, r1, acc[0]), r2

    sent = _send(own, axis, _next(c))  # in flight while the own keys are scored
    acc = (_visit(acc[0], first, own, scale, block), _visit(acc[1], second, own, scale, block))

    def step(s, state):
        keys, acc = state
        return _send(keys, axis, _next(c)), score(s, keys, acc)

    keys, acc = jax.lax.fori_loop(1, c - 1, step, (sent, acc))
    acc = score(c - 1, keys, acc)
    oa, ob = _finish(acc[0], qa), _finish(acc[1], qb)
    back = [tuple((b, a) for a, b in pairs) for pairs in there]
    lo = jax.lax.ppermute(jnp.where(even, oa, ob), axis, back[0])
    hi = jax.lax.ppermute(jnp.where(even, ob, oa), axis, back[1])
    return jnp.concatenate([lo, hi], 1)


def _pick(pred, a, b):
    """``a`` where ``pred`` (a traced boolean) else ``b``, leaf by leaf (None stays None): a select, not a branch."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _send(keys, axis: str, pairs: tuple[tuple[int, int], ...]):
    """``keys`` (k, v, slots, validity, groups or None) sent between devices along ``axis`` (``pairs`` of source
    and target, as ``ppermute``'s), as one array (``_pack``): XLA's GPU scheduler keeps one collective-permute in
    flight at a time, so a tuple (a permute per array) had only its last part under the ring step's scoring. The
    gradient of k and v goes back the same way, as one array too."""
    packed, layout = _pack(keys)
    return _unpack(jax.lax.ppermute(packed, axis, pairs), layout)


def _send_fwd(keys, axis: str, pairs):
    return _send(keys, axis, pairs), None


def _send_bwd(axis: str, pairs, _, cot):
    dk, dv = jax.lax.ppermute(jnp.stack(cot[:2]), axis, tuple((b, a) for a, b in pairs))
    ints = tuple(None if x is None else np.zeros(x.shape, jax.dtypes.float0) for x in cot[2:])  # no gradient
    return ((dk, dv) + ints,)


_send.defvjp(_send_fwd, _send_bwd)


def _pack(keys):
    """The ring's (k, v [B, t, K, hd], slots, validity, groups [B, t] or None) as one array [B, t, n] of unsigned
    words of k's size, every part bitcast (floats carried as integers: no NaN or denormal can be rewritten on the
    way), and the layout ``_unpack`` reads."""
    k = keys[0]
    carrier = jnp.dtype(f"uint{8 * k.dtype.itemsize}")
    parts, layout = [], []
    for x in keys:
        if x is None:
            layout.append(None)
            continue
        y = jax.lax.bitcast_convert_type(x.astype(jnp.int32) if x.dtype == jnp.bool_ else x, carrier)
        y = y.reshape(*k.shape[:2], -1)
        layout.append((x.shape, x.dtype, y.shape[-1]))
        parts.append(y)
    return jnp.concatenate(parts, -1), tuple(layout)


def _unpack(packed, layout):
    """``_pack``'s inverse."""
    out, at = [], 0
    for spec in layout:
        if spec is None:
            out.append(None)
            continue
        shape, dtype, n = spec
        words = jnp.dtype(jnp.int32) if dtype == jnp.bool_ else jnp.dtype(dtype)
        ratio = words.itemsize // packed.dtype.itemsize
        y = packed[..., at:at + n]
        at += n
        y = jax.lax.bitcast_convert_type(y.reshape(*y.shape[:-1], n // ratio, ratio) if ratio > 1 else y, words)
        out.append((y != 0 if dtype == jnp.bool_ else y).reshape(shape))
    return tuple(out)


def _query_blocks(q, index, group, block: int, K: int):
    """q [B, t, H, hd] -> [n, B, b, K, G, hd] (G = H / K query heads per kv head), and the slots and groups [B, t]
    of the queries -> [n, B, b] (groups None for a global layer)."""
    B, t, H, hd = q.shape
    qs = _blocks(q.reshape(B, t, K, H // K, hd), block)
    return qs, _blocks(index, block, -1), None if group is None else _blocks(group, block, -1)


def _empty(qb):
    """The online softmax's start for a query block [B, b, K, G, hd]: no sum, the lowest max, no weight."""
    B, b, K, G, hd = qb.shape
    f32 = jnp.float32
    return (jnp.zeros((B, K, G, b, hd), f32), jnp.full((B, K, G, b), jnp.finfo(f32).min, f32),
            jnp.zeros((B, K, G, b), f32))


def _finish(acc, q) -> jax.Array:
    """Accumulated blocks ([n, B, K, G, b, hd] sums, [n, B, K, G, b] weights) -> the attention output like q."""
    o, _, total = acc
    B, t, H, hd = q.shape
    n, b = o.shape[0], o.shape[4]
    out = o / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    out = jnp.moveaxis(out, 4, 2).reshape(n, B, b, H, hd)
    return jnp.moveaxis(out, 0, 1).reshape(B, n * b, H, hd)[:, :t].astype(q.dtype)


@functools.partial(jax.checkpoint, static_argnums=(5, 6))
def _accumulate(q, q_index, q_group, acc, keys, scale: float, block: int):
    """One query block q [B, b, K, G, hd] (slots [B, b], groups or None) through a block of keys (k, v [B, s, K, hd],
    slots, validity, groups), ``block`` keys at a time: the running (sum of p v [B, K, G, b, hd], max [B, K, G, b],
    sum of p) of an online softmax. Masked scores are the float32 minimum, as in ``attention.attend``: a row that
    has seen no visible key yet holds finite garbage that the first visible one scales to zero."""
    k, v, k_index, k_valid, k_group = keys

    def one(acc, kb):
        o, m, total = acc
        kk, vv, ki, kv, kg = kb
        s = jnp.einsum("bqkgd,bskd->bkgqs", q, kk, preferred_element_type=jnp.float32) * scale
        mask = visible(q_index, ki, kv, q_group, kg)[:, None, None]     # [B, 1, 1, b, s]
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
        new = jnp.maximum(m, s.max(-1))
        p, fade = jnp.exp(s - new[..., None]), jnp.exp(m - new)
        o = o * fade[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vv.dtype), vv,
                                             preferred_element_type=jnp.float32)
        return (o, new, total * fade + p.sum(-1)), None

    kbs = tuple(None if x is None else _blocks(x, block, fill) for x, fill in zip(keys, FILLS))
    acc, _ = jax.lax.scan(one, tuple(acc), kbs)
    return acc


def _blocks(x: jax.Array, block: int, fill=0) -> jax.Array:
    """[B, t, ...] -> [ceil(t / b), B, b, ...], b = min(block, t), the last block padded with ``fill``: a loop's
    leading axis."""
    b = min(block, x.shape[1])
    m = -(-x.shape[1] // b)
    x = jnp.pad(x, [(0, 0), (0, m * b - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], m, b, *x.shape[2:]), 1, 0)
