"""Weight-only quantization: int8 per output channel, int4 in groups along the input, dequantized where used.

A quantized weight is a ``QArray``: ``values`` (int8 or int4) in the weight's own shape, so it shards by the same
logical axes, and fp32 ``scales``, the same shape with each contracted (input) axis reduced: to 1 for int8 (one scale
per output channel); for int4 the last contracted axis to n / group (one scale per group of ``group`` inputs
along it, per output channel and per index of any other contracted axis: attention o's heads).
The weight is ``values * scales`` (each scale repeated over its group); activations stay in the compute dtype.

Which weights are quantized and which of their axes a matmul contracts (``CONTRACTED``): attention q, k, v, o, the
dense and shared-expert MLPs, the routed experts (per expert: the expert axis is a batch axis) and the LM head. The
embedding (a gather), the router (small, and its top-k is sensitive) and the norms stay as they are, as does the
vision tower. Modules declare them with ``layers.param(..., quantized=True)`` and get the ``QArray`` itself:
``layers.project`` multiplies up to ``FUSED_ROWS`` rows (decode) by the values with the scales applied after
(``matmul``: no dequantized weight is written to memory), more rows by the weight dequantized once; the MoE reads only
the experts it uses (``QArray.at``; the grouped matmul dequantizes one expert per tile, ``take``).

Rounding is plain round-to-nearest with symmetric scales (max |w| / 127, or / 7 for int4): what the quality bounds
of the issue are stated against.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree

MODES = ("int8", "int4")
GROUP = 128  # int4: inputs per scale along the last contracted axis (a smaller axis is one group)
# Parameter name (the last two path keys) -> the axes a matmul contracts ("md,edf->mf" contracts d: axis 1).
CONTRACTED = {("attn", "q"): (0,), ("attn", "k"): (0,), ("attn", "v"): (0,), ("attn", "o"): (0, 1),
              ("mlp", "gate"): (0,), ("mlp", "up"): (0,), ("mlp", "down"): (0,),
              ("shared", "gate"): (0,), ("shared", "up"): (0,), ("shared", "down"): (0,),
              ("moe", "gate"): (1,), ("moe", "up"): (1,), ("moe", "down"): (1,)}
HEAD = ("lm_head",)  # [D, V]: contracts D


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight: ``values`` [shape] int8/int4 and fp32 ``scales`` (contracted axes reduced)."""

    values: jax.Array
    scales: jax.Array
    contracted: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))  # 0: one scale per output channel

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def mode(self) -> str:
        return "int4" if self.group else "int8"

    def dequantize(self, dtype) -> jax.Array:
        """The weight [shape] in ``dtype``: values times their scales, computed in fp32. The group follows from
        the shapes, so a device's shard (inside a ``shard_map``) dequantizes the same way as the whole weight."""
        v = self.values.astype(jnp.float32)
        a, shape = self.contracted[-1], self.shape
        groups = self.scales.shape[a]
        if self.group and groups > 1:
            grouped = shape[:a] + (groups, shape[a] // groups) + shape[a + 1:]
            return (v.reshape(grouped) * jnp.expand_dims(self.scales, a + 1)).reshape(shape).astype(dtype)
        return (v * self.scales).astype(dtype)

    def at(self, index) -> QArray:
        """The experts ``index`` [M] (or one, a scalar) of a stack along its first axis, still quantized."""
        if 0 in self.contracted:
            raise ValueError("at: the first axis is contracted; only a batch (expert) axis can be indexed")
        return dataclasses.replace(self, values=self.values[index], scales=self.scales[index],
                                   contracted=tuple(a + jnp.ndim(index) - 1 for a in self.contracted))

    def take(self, index, dtype) -> jax.Array:
        """``dequantize(dtype)[index]`` along the first (expert) axis, dequantizing only the rows taken."""
        return self.at(index).dequantize(dtype)


def scale_shape(shape: tuple[int, ...], contracted: tuple[int, ...], group: int) -> tuple[int, ...]:
    """The scales' shape of a weight [shape]: int8 reduces the contracted axes to 1; int4 the last one to n / group
    (the input of attention's o [H, hd, D] is H x hd: each head's hd inputs are grouped on their own)."""
    if group:
        a = contracted[-1]
        return shape[:a] + (shape[a] // group,) + shape[a + 1:]
    return tuple(1 if a in contracted else n for a, n in enumerate(shape))


def group_size(shape: tuple[int, ...], contracted: tuple[int, ...], mode: str, group: int = GROUP) -> int:
    """0 for int8; for int4 the group along the last contracted axis: ``group``, or the whole axis when shorter.
    An axis that ``group`` does not divide is a ValueError naming both."""
    if mode not in MODES:
        raise ValueError(f"quantize: unknown mode {mode!r}; expected one of {MODES}")
    if mode == "int8":
        return 0
    n = shape[contracted[-1]]
    if n <= group:
        return n
    if n % group:
        raise ValueError(f"quantize int4: an input axis of {n} is not a multiple of the group size {group}")
    return group


def quantize(w, contracted: tuple[int, ...], mode: str, group: int = GROUP) -> QArray:
    """Round-to-nearest symmetric quantization of w (host numpy or jax array) -> QArray (numpy on the host for a
    numpy input, so a loader can quantize tensor by tensor before placing anything on a device). A host array is
    quantized in blocks of ~64 MB of float32 along an axis whose indices have scales of their own, so the
    temporaries stay small beside the tensor."""
    g = group_size(tuple(w.shape), contracted, mode, group)
    if not isinstance(w, np.ndarray):
        values, scales = _rtn(w, contracted, g, mode, jnp)
        return QArray(values, scales, tuple(contracted), g)
    free = [a for a in range(w.ndim) if a not in (contracted[-1:] if g else contracted)]
    values = np.empty(w.shape, jnp.int4 if mode == "int4" else jnp.int8)
    scales = np.empty(scale_shape(tuple(w.shape), tuple(contracted), g), np.float32)
    if not free:
        values[...], scales[...] = _rtn(w, contracted, g, mode, np)
        return QArray(values, scales, tuple(contracted), g)
    a = free[0]
    step = max(1, BLOCK_BYTES // max(1, 4 * w.size // w.shape[a]))
    for i in range(0, w.shape[a], step):
        cut = (slice(None),) * a + (slice(i, i + step),)
        values[cut], scales[cut] = _rtn(w[cut], contracted, g, mode, np)
    return QArray(values, scales, tuple(contracted), g)


BLOCK_BYTES = 64 << 20


def _rtn(w, contracted: tuple[int, ...], g: int, mode: str, xp):
    """(values, scales) of w by round-to-nearest: per output channel (g = 0) or groups of g along the last
    contracted axis."""
    w32 = xp.asarray(w, dtype=xp.float32)
    qmax = 7.0 if mode == "int4" else 127.0
    if g:
        a, shape = contracted[-1], tuple(w.shape)
        grouped = w32.reshape(shape[:a] + (shape[a] // g, g) + shape[a + 1:])
        amax = xp.max(xp.abs(grouped), axis=a + 1, keepdims=True)
        scales = xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)
        values = xp.clip(xp.round(grouped / scales), -qmax, qmax).reshape(shape)
        scales = xp.squeeze(scales, axis=a + 1)
    else:
        amax = xp.max(xp.abs(w32), axis=contracted, keepdims=True)
        scales = xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)
        values = xp.clip(xp.round(w32 / scales), -qmax, qmax)
    return values.astype(jnp.int4 if mode == "int4" else jnp.int8), scales


def contracted_axes(path: tuple[str, ...]) -> tuple[int, ...] | None:
    """The contracted axes of the parameter at ``path`` when it is one that gets quantized, else None: the LM head
    and the weights of ``CONTRACTED`` in the text decoder's layers (never the vision tower's)."""
    if tuple(path) == HEAD:
        return (0,)
    return CONTRACTED.get(tuple(path[-2:])) if path[0].startswith("layers_") else None


def weight(w, dtype) -> jax.Array:
    """A stored parameter as the module uses it: a QArray dequantized, any other array cast to ``dtype``."""
    return w.dequantize(dtype) if isinstance(w, QArray) else w.astype(dtype)


def take(w, index, dtype) -> jax.Array:
    """``w[index]`` along the first (expert) axis in ``dtype``; a QArray dequantizes only the experts taken."""
    return w.take(index, dtype) if isinstance(w, QArray) else w[index].astype(dtype)


def with_scales(w, spec):
    """The PartitionSpec (or anything placed per leaf: a NamedSharding) of a weight, for a QArray a QArray of
    them: the values take the weight's, the scales the same except on axes where they have size 1 (replicated)."""
    if not isinstance(w, QArray):
        return spec
    return dataclasses.replace(w, values=spec, scales=scales_spec(spec, w.scales.shape))


def scales_spec(spec, shape: tuple[int, ...]):
    """``spec`` (a PartitionSpec) with the entries of size-1 axes of ``shape`` dropped."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return type(spec)(*(e if n > 1 else None for e, n in zip(entries, shape)))


# On disk (the l4jax checkpoint format): a quantized weight is two items, <name>/values and <name>/scales, and the
# manifest's "quantized" maps <name> to how it was quantized.

def _is_q(x) -> bool:
    return isinstance(x, QArray)


def to_stored(params: dict) -> tuple[dict, dict]:
    """(params with each QArray as {"values", "scales"}, {"/"-joined name: {"mode", "contracted", "group"}})."""
    out, meta = params, {}
    for path, q in _quantized(params):
        meta["/".join(path)] = {"mode": q.mode, "contracted": list(q.contracted), "group": q.group}
        out = tree.replace(out, {path: {"values": q.values, "scales": q.scales}})
    return out, meta


def from_stored(params: dict, meta: dict) -> dict:
    """``to_stored`` backwards: each {"values", "scales"} named in ``meta`` as a QArray again."""
    out = params
    for name, m in meta.items():
        path = tuple(name.split("/"))
        node = tree.get(out, path)
        out = tree.replace(out, {path: QArray(node["values"], node["scales"], tuple(m["contracted"]), m["group"])})
    return out


def abstract_stored(abstract: dict, meta: dict) -> dict:
    """The ShapeDtypeStructs a checkpoint with quantized weights ``meta`` holds: each named weight's [shape] as
    {"values": int8/int4 [shape], "scales": float32 [scale_shape]}."""
    out = abstract
    for name, m in meta.items():
        path = tuple(name.split("/"))
        shape = tuple(tree.get(out, path).shape)
        dtype = jnp.int4 if m["mode"] == "int4" else jnp.int8
        scales = scale_shape(shape, tuple(m["contracted"]), m["group"])
        out = tree.replace(out, {path: {"values": jax.ShapeDtypeStruct(shape, dtype),
                                        "scales": jax.ShapeDtypeStruct(scales, jnp.float32)}})
    return out


def _quantized(params: dict):
    return [(path, q) for path, q in tree.leaves(params, is_leaf=_is_q) if _is_q(q)]


def abstract_quantized(abstract: dict, mode: str, group: int = GROUP) -> dict:
    """The ShapeDtypeStructs of ``abstract`` (a text decoder's parameters) with each weight that gets quantized as
    a QArray of them: what a model loaded with ``quantize=mode`` holds (``l4jax plan --quantize``)."""
    updates = {}
    for path, leaf in tree.leaves(abstract):
        axes = contracted_axes(path)
        if axes is not None:
            g = group_size(tuple(leaf.shape), axes, mode, group)
            values = jax.ShapeDtypeStruct(leaf.shape, jnp.int4 if mode == "int4" else jnp.int8)
            scales = jax.ShapeDtypeStruct(scale_shape(tuple(leaf.shape), axes, g), jnp.float32)
            updates[path] = QArray(values, scales, axes, g)
    return tree.replace(abstract, updates)


def quantize_params(params: dict, mode: str, group: int = GROUP) -> dict:
    """A text decoder's parameters with each weight that gets quantized replaced by its QArray (computed where the
    arrays are: on the device for jax arrays), the rest as they are."""
    updates = {path: quantize(w, contracted_axes(path), mode, group)
               for path, w in tree.leaves(params) if contracted_axes(path) is not None}
    return tree.replace(params, updates)


# Up to this many rows (decode), a quantized weight is multiplied without being dequantized first: the values are
# only converted (XLA fuses that into the matmul) and the scales applied to the products after. More rows (prefill,
# training) dequantize the weight once and share it, the partial sums of the grouped form would grow with them.
FUSED_ROWS = 64


def matmul(eq: str, x: jax.Array, q: QArray) -> jax.Array:
    """``einsum(eq, x, q.dequantize())`` in float32, computed as dots over the converted values with the scales
    applied after: per output channel (int8) they factor out of the contraction; per group (int4) each group's dot
    is scaled, then the groups (and any other contracted axis, attention o's heads) summed. Compiled for an H100,
    this keeps XLA from writing the dequantized weight to memory (docs/performance.md)."""
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    if "..." in lhs:
        free = "".join(c for c in "zyxwvutsrqponm" if c not in eq)[:x.ndim - len(lhs.replace("...", ""))]
        lhs, out = lhs.replace("...", free), out.replace("...", free)
    f32 = dict(preferred_element_type=jnp.float32)
    v = q.values.astype(x.dtype)
    contracted = [c for c in rhs if c not in out]
    if all(n == 1 for c, n in zip(rhs, q.scales.shape) if c in contracted):  # a scale per output: after the dot
        y = jnp.einsum(f"{lhs},{rhs}->{out}", x, v, **f32)
        kept = "".join(c for c in rhs if c in out)
        s = q.scales.reshape([n for c, n in zip(rhs, q.scales.shape) if c in out])
        return jnp.einsum(f"{out},{kept}->{out}", y, s)
    a = q.contracted[-1]
    c, G = rhs[a], q.scales.shape[a]
    g = next(ch for ch in "ABCDEFGHIJ" if ch not in eq)  # the groups' axis
    i = lhs.index(c)
    x2 = x.reshape(x.shape[:i] + (G, x.shape[i] // G) + x.shape[i + 1:])
    v2 = v.reshape(v.shape[:a] + (G, v.shape[a] // G) + v.shape[a + 1:])
    partial = out + "".join(ch for ch in contracted if ch != c) + g  # one dot per group (and head, for o)
    p = jnp.einsum(f"{lhs.replace(c, g + c)},{rhs.replace(c, g + c)}->{partial}", x2, v2, **f32)
    return jnp.einsum(f"{partial},{rhs.replace(c, g)}->{out}", p, q.scales)
