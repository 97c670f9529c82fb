"""Weight-only quantization: int8 or fp8 per output channel, int4 in groups along the input, dequantized where used.

A quantized weight is a ``QArray``: ``values`` (int8, fp8 or int4) in the weight's own shape, so it shards by the
same logical axes (kept with their axes in another order where XLA wants that: ``stored_layout``), and fp32
``scales``, the same shape with each contracted (input) axis reduced: to 1 for int8 and fp8 (one scale per output
channel); for int4 the last contracted axis to n / group (one scale per group of ``group`` inputs
along it, per output channel and per index of any other contracted axis: attention o's heads).
The weight is ``values * scales`` (each scale repeated over its group); activations stay in the compute dtype.

Which weights are quantized and which of their axes a matmul contracts (``CONTRACTED``): attention q, k, v, o, the
dense and shared-expert MLPs, the routed experts (per expert: the expert axis is a batch axis) and the LM head. The
embedding (a gather), the router (small, and its top-k is sensitive) and the norms stay as they are, as does the
vision tower. Modules declare them with ``layers.param(..., quantized=True)`` and get the ``QArray`` itself:
``layers.project`` multiplies up to ``FUSED_ROWS`` rows (decode) by the values with the scales applied after
(``matmul``: no dequantized weight is written to memory), more rows by the weight dequantized once; the MoE reads only
the experts it uses (``QArray.at``; the grouped matmul dequantizes one expert per tile, ``take``).

Rounding is plain round-to-nearest with symmetric scales (max |w| / 127, / 7 for int4, / 448 for fp8): what the
quality bounds of the issue are stated against. fp8 is also how Meta's FP8 releases store their weights
(float8_e4m3fn, a scale per output channel): ``l4jax.load`` keeps those as they are (``checkpoints/hf_import.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree

MODES = ("int8", "int4", "fp8")
# Stored values and the largest magnitude they take: fp8 is float8_e4m3fn (what Meta's FP8 releases hold; its
# largest finite value is 448), rounded by the cast, with a scale per output channel like int8.
DTYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
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
    """A quantized weight: ``values`` int8/int4 and fp32 ``scales`` (contracted axes reduced), both with their axes in
    the order ``layout`` (None: the weight's own order; ``shape`` and ``contracted`` always speak of the weight's)."""

    values: jax.Array
    scales: jax.Array
    contracted: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))  # 0: one scale per output channel
    layout: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return _unpermute(tuple(self.values.shape), self.layout)

    @property
    def mode(self) -> str:
        return "int4" if self.group else "fp8" if self.values.dtype == jnp.float8_e4m3fn else "int8"

    def axis(self, a: int) -> int:
        """Where the weight's axis ``a`` is in ``values`` and ``scales``."""
        return a if self.layout is None else self.layout.index(a)

    def dequantize(self, dtype) -> jax.Array:
        """The weight [shape] in ``dtype``: values times their scales, computed in fp32. The group follows from
        the shapes, so a device's shard (inside a ``shard_map``) dequantizes the same way as the whole weight."""
        v = self.values.astype(jnp.float32)
        a, shape = self.axis(self.contracted[-1]), tuple(self.values.shape)
        groups = self.scales.shape[a]
        if self.group and groups > 1:
            grouped = shape[:a] + (groups, shape[a] // groups) + shape[a + 1:]
            w = (v.reshape(grouped) * jnp.expand_dims(self.scales, a + 1)).reshape(shape)
        else:
            w = v * self.scales
        return (w if self.layout is None else jnp.transpose(w, _inverse(self.layout))).astype(dtype)

    def at(self, index) -> QArray:
        """The experts ``index`` [M] (or one, a scalar) of a stack along its first axis, still quantized."""
        if 0 in self.contracted or self.axis(0) != 0:
            raise ValueError("at: the first axis is contracted; only a batch (expert) axis can be indexed")
        d = jnp.ndim(index) - 1  # -1: a scalar index drops the expert axis
        layout = self.layout if self.layout is None or d == 0 else tuple(a - 1 for a in self.layout[1:])
        return dataclasses.replace(self, values=self.values[index], scales=self.scales[index],
                                   contracted=tuple(a + d for a in self.contracted), layout=layout)

    def take(self, index, dtype) -> jax.Array:
        """``dequantize(dtype)[index]`` along the first (expert) axis, dequantizing only the rows taken."""
        return self.at(index).dequantize(dtype)

    def describe(self) -> dict:
        """How it is quantized, as the checkpoint manifest records it (``from_parts`` reads it back)."""
        d = {"mode": self.mode, "contracted": list(self.contracted), "group": self.group}
        return d if self.layout is None else {**d, "layout": list(self.layout)}


def from_parts(values, scales, described: dict) -> QArray:
    """A QArray of stored ``values`` and ``scales`` and its ``describe()`` record."""
    layout = described.get("layout")
    return QArray(values, scales, tuple(described["contracted"]), described["group"],
                  None if layout is None else tuple(layout))


def _inverse(layout: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(layout.index(a) for a in range(len(layout)))


def _permute(shape: tuple, layout: tuple[int, ...] | None) -> tuple:
    return shape if layout is None else tuple(shape[a] for a in layout)


def _unpermute(shape: tuple, layout: tuple[int, ...] | None) -> tuple:
    return shape if layout is None else _permute(shape, _inverse(layout))


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
    if mode != "int4":
        return 0
    n = shape[contracted[-1]]
    if n <= group:
        return n
    if n % group:
        raise ValueError(f"quantize int4: an input axis of {n} is not a multiple of the group size {group}")
    return group


def quantize(w, contracted: tuple[int, ...], mode: str, group: int = GROUP,
             layout: tuple[int, ...] | None = None) -> QArray:
    """Round-to-nearest symmetric quantization of w (host numpy or jax array) -> QArray, its values and scales
    stored with their axes in the order ``layout`` (None: w's own). Numpy on the host for a numpy input, so a
    loader can quantize tensor by tensor before placing anything on a device: quantized in blocks of ~64 MB of
    float32 along an axis whose indices have scales of their own, so the temporaries stay small beside the tensor."""
    contracted = tuple(contracted)
    g = group_size(tuple(w.shape), contracted, mode, group)
    if not isinstance(w, np.ndarray):
        values, scales = _rtn(w, contracted, g, mode, jnp)
        if layout is not None:
            values, scales = jnp.transpose(values, layout), jnp.transpose(scales, layout)
        return QArray(values, scales, contracted, g, layout)
    order = layout or tuple(range(w.ndim))
    free = [a for a in range(w.ndim) if a not in (contracted[-1:] if g else contracted)]
    values = np.empty(_permute(tuple(w.shape), layout), DTYPES[mode])
    scales = np.empty(_permute(scale_shape(tuple(w.shape), contracted, g), layout), np.float32)
    a = free[0] if free else 0
    step = max(1, BLOCK_BYTES // max(1, 4 * w.size // w.shape[a])) if free else w.shape[a]
    for i in range(0, w.shape[a], step):
        cut = (slice(None),) * a + (slice(i, i + step),)
        v, sc = _rtn(w[cut], contracted, g, mode, np)
        into = (slice(None),) * order.index(a) + (slice(i, i + step),)
        values[into], scales[into] = np.transpose(v, order), np.transpose(sc, order)
    return QArray(values, scales, contracted, g, layout)


BLOCK_BYTES = 64 << 20


def _rtn(w, contracted: tuple[int, ...], g: int, mode: str, xp):
    """(values, scales) of w by round-to-nearest: per output channel (g = 0) or groups of g along the last
    contracted axis."""
    w32 = xp.asarray(w, dtype=xp.float32)
    qmax = QMAX[mode]
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
        values = xp.clip(w32 / scales, -qmax, qmax)
        values = values if mode == "fp8" else xp.round(values)  # fp8: the cast rounds to its own grid
    return values.astype(DTYPES[mode]), scales


def contracted_axes(path: tuple[str, ...]) -> tuple[int, ...] | None:
    """The contracted axes of the parameter at ``path`` when it is one that gets quantized, else None: the LM head
    and the weights of ``CONTRACTED`` in the text decoder's layers (never the vision tower's)."""
    if tuple(path) == HEAD:
        return (0,)
    return CONTRACTED.get(tuple(path[-2:])) if path[0].startswith("layers_") else None


def stored_layout(path: tuple[str, ...], mode: str) -> tuple[int, ...] | None:
    """The order of axes a weight's quantized values are kept in: the weight's own (None), except int4 routed-expert
    ``gate`` and ``up`` stacks [E, D, F], kept [E, F, D] (D, the contracted axis, minor). Compiled for an H100, XLA
    otherwise relays both stacks of every layer out that way before the decode loop (Scout: 31.5 GiB of copies);
    the other int4 weights it reads as they are (docs/performance.md)."""
    return (0, 2, 1) if mode == "int4" and tuple(path[-2:]) in MINOR else None


MINOR = {("moe", "gate"), ("moe", "up")}


def quantize_param(path: tuple[str, ...], w, mode: str, group: int = GROUP) -> QArray:
    """The parameter at ``path`` (one that gets quantized: ``contracted_axes``) quantized as the model keeps it."""
    return quantize(w, contracted_axes(path), mode, group, stored_layout(path, mode))


def weight(w, dtype) -> jax.Array:
    """A stored parameter as the module uses it: a QArray dequantized, any other array cast to ``dtype``."""
    return w.dequantize(dtype) if isinstance(w, QArray) else w.astype(dtype)


def take(w, index, dtype) -> jax.Array:
    """``w[index]`` along the first (expert) axis in ``dtype``; a QArray dequantizes only the experts taken."""
    return w.take(index, dtype) if isinstance(w, QArray) else w[index].astype(dtype)


def with_scales(w, spec):
    """The PartitionSpec of a weight, for a QArray a QArray of them: the values take the weight's (in their
    ``layout``), the scales the same except on axes where they have size 1 (replicated)."""
    if not isinstance(w, QArray):
        return spec
    entries = tuple(spec) + (None,) * (len(w.shape) - len(spec))
    values = type(spec)(*_permute(entries, w.layout))
    return dataclasses.replace(w, values=values, scales=scales_spec(values, w.scales.shape))


def scales_spec(spec, shape: tuple[int, ...]):
    """``spec`` (a PartitionSpec) with the entries of size-1 axes of ``shape`` dropped."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    return type(spec)(*(e if n > 1 else None for e, n in zip(entries, shape)))


# On disk (the l4jax checkpoint format): a quantized weight is two items, <name>/values and <name>/scales, and the
# manifest's "quantized" maps <name> to how it was quantized.

def _is_q(x) -> bool:
    return isinstance(x, QArray)


def to_stored(params: dict) -> tuple[dict, dict]:
    """(params with each QArray as {"values", "scales"}, {"/"-joined name: its ``describe()``})."""
    out, meta = params, {}
    for path, q in _quantized(params):
        meta["/".join(path)] = q.describe()
        out = tree.replace(out, {path: {"values": q.values, "scales": q.scales}})
    return out, meta


def from_stored(params: dict, meta: dict) -> dict:
    """``to_stored`` backwards: each {"values", "scales"} named in ``meta`` as a QArray again."""
    out = params
    for name, m in meta.items():
        path = tuple(name.split("/"))
        node = tree.get(out, path)
        out = tree.replace(out, {path: from_parts(node["values"], node["scales"], m)})
    return out


def abstract_stored(abstract: dict, meta: dict) -> dict:
    """The ShapeDtypeStructs a checkpoint with quantized weights ``meta`` holds: each named weight's [shape] as
    {"values": int8/int4, "scales": float32 [scale_shape]}, both in the recorded layout."""
    out = abstract
    for name, m in meta.items():
        path = tuple(name.split("/"))
        shape = tuple(tree.get(out, path).shape)
        dtype = DTYPES[m["mode"]]
        layout = None if m.get("layout") is None else tuple(m["layout"])
        scales = scale_shape(shape, tuple(m["contracted"]), m["group"])
        out = tree.replace(out, {path: {"values": jax.ShapeDtypeStruct(_permute(shape, layout), dtype),
                                        "scales": jax.ShapeDtypeStruct(_permute(scales, layout), jnp.float32)}})
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
            g, layout = group_size(tuple(leaf.shape), axes, mode, group), stored_layout(path, mode)
            shape, scales = tuple(leaf.shape), scale_shape(tuple(leaf.shape), axes, g)
            values = jax.ShapeDtypeStruct(_permute(shape, layout), DTYPES[mode])
            updates[path] = QArray(values, jax.ShapeDtypeStruct(_permute(scales, layout), jnp.float32), axes, g,
                                   layout)
    return tree.replace(abstract, updates)


def quantize_params(params: dict, mode: str, group: int = GROUP) -> dict:
    """A text decoder's parameters with each weight that gets quantized replaced by its QArray (computed where the
    arrays are: on the device for jax arrays), the rest as they are."""
    updates = {path: quantize_param(path, w, mode, group)
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
    rhs = "".join(_permute(tuple(rhs), q.layout))  # the values' own axis order
    contracted = [c for c in rhs if c not in out]
    if all(n == 1 for c, n in zip(rhs, q.scales.shape) if c in contracted):  # a scale per output: after the dot
        y = jnp.einsum(f"{lhs},{rhs}->{out}", x, v, **f32)
        kept = "".join(c for c in rhs if c in out)
        s = q.scales.reshape([n for c, n in zip(rhs, q.scales.shape) if c in out])
        return jnp.einsum(f"{out},{kept}->{out}", y, s)
    a = q.axis(q.contracted[-1])
    c, G = rhs[a], q.scales.shape[a]
    g = next(ch for ch in "ABCDEFGHIJ" if ch not in eq)  # the groups' axis
    i = lhs.index(c)
    x2 = x.reshape(x.shape[:i] + (G, x.shape[i] // G) + x.shape[i + 1:])
    v2 = v.reshape(v.shape[:a] + (G, v.shape[a] // G) + v.shape[a + 1:])
    partial = out + "".join(ch for ch in contracted if ch != c) + g  # one dot per group (and head, for o)
    p = jnp.einsum(f"{lhs.replace(c, g + c)},{rhs.replace(c, g + c)}->{partial}", x2, v2, **f32)
    return jnp.einsum(f"{partial},{rhs.replace(c, g)}->{out}", p, q.scales)
