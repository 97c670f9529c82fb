"""LoRA adapters, merged into the base weights at every forward: W' = W + (alpha / r) * delta(A, B).

The adapters are a nested dict that mirrors only the adapted leaves of the parameter tree, each one
``{"a": A, "b": B}``. Training differentiates ``merge(params, lora, cfg)`` with respect to ``lora`` alone, so the
base weights stay frozen by construction and the optimizer state covers the adapters only.

Factorisation per adapted weight (r = rank; A takes W's input side, B its output side):

    attn q, k, v  W [D, X, hd]  A [D, r]       B [r, X, hd]   delta "dr,rxk->dxk"   (X = H or K)
    attn o        W [H, hd, D]  A [H, hd, r]   B [r, D]       delta "hkr,rd->hkd"
    moe gate, up  W [E, D, F]   A [E, D, r]    B [E, r, F]    delta "edr,erf->edf"  (each expert its own A, B)
    moe down      W [E, F, D]   A [E, F, r]    B [E, r, D]    delta "efr,erd->efd"

Both parameter layouts work: the unstacked one (``layers_{i}/...``) and the scanned one (``blocks/layers_{j}/...``),
whose leaves carry extra leading axes [n_blocks, ...]. Those axes are found from the leaf's ndim versus the
unstacked ndim of its kind, and A and B both keep them. Only ``attn/*`` and ``moe/{gate,up,down}`` leaves are
adapted: the dense MLP and the MoE's shared expert have the same leaf names but other parents.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .. import tree

ATTN_TARGETS = ("q", "k", "v", "o")


class LoraError(ValueError):
    """Adapters that do not fit their config, their base weights or their file; the message names the key."""


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one kind of weight is factorised. W = [*shared, *in, *out] after any leading (stacked) axes; A is
    [*shared, *in, r] and B is [*shared, r, *out]; ``eq`` is the delta's einsum without the leading axes."""

    eq: str
    shared: int  # axes both factors keep (the expert axis)
    n_in: int
    n_out: int

    @property
    def ndim(self) -> int:  # of the unstacked weight
        return self.shared + self.n_in + self.n_out


_QKV, _O = _Kind("dr,rxk->dxk", 0, 1, 2), _Kind("hkr,rd->hkd", 0, 2, 1)
_KINDS = {("attn", "q"): _QKV, ("attn", "k"): _QKV, ("attn", "v"): _QKV, ("attn", "o"): _O,
          ("moe", "gate"): _Kind("edr,erf->edf", 1, 1, 1), ("moe", "up"): _Kind("edr,erf->edf", 1, 1, 1),
          ("moe", "down"): _Kind("efr,erd->efd", 1, 1, 1)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r >= 1; alpha > 0 (the update is scaled by alpha / r); targets: a subset of the attention projections
    ("q", "k", "v", "o"); experts: also adapt every routed expert's gate, up and down, each expert on its own."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTN_TARGETS
    experts: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoraConfig.rank: must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise LoraError(f"LoraConfig.alpha: must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.targets, str):  # ("q") is a string: iterating it would silently give its letters
            raise LoraError(f"LoraConfig.targets: must be a sequence of names, got the string {self.targets!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in ATTN_TARGETS]
        if unknown:
            raise LoraError(f"LoraConfig.targets: unknown {unknown}; allowed: {list(ATTN_TARGETS)} (the routed "
                            f"experts are enabled with experts=True)")
        if len(set(targets)) != len(targets):
            raise LoraError(f"LoraConfig.targets: duplicates in {list(targets)}")
        if not isinstance(self.experts, bool):
            raise LoraError(f"LoraConfig.experts: must be True or False, got {self.experts!r}")
        if not targets and not self.experts:
            raise LoraError("LoraConfig: nothing to adapt; give targets or set experts=True")
        object.__setattr__(self, "targets", targets)  # a list from JSON becomes the hashable tuple

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, parent: str, name: str) -> bool:
        """Whether the leaf ``.../{parent}/{name}`` gets an adapter under this config."""
        return (parent == "attn" and name in self.targets) or (parent == "moe" and self.experts
                                                               and (parent, name) in _KINDS)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "experts": self.experts}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LoraError(f"LoraConfig: unknown fields {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ tree helpers

def _is_adapter(node) -> bool:
    return isinstance(node, Mapping) and set(node) == {"a", "b"}


def adapters(lora, path=()):
    """Yield (path tuple, {"a": A, "b": B}) for every adapter in a lora tree, in key order."""
    for k in sorted(lora):
        node = lora[k]
        if _is_adapter(node):
            yield path + (k,), node
        elif isinstance(node, Mapping):
            yield from adapters(node, path + (k,))
        else:
            raise LoraError(f"{'/'.join(path + (k,))}: expected an adapter {{'a', 'b'}} or a subtree, got "
                            f"{type(node).__name__}")


def _get(params, path, what: str):
    try:
        return tree.get(params, path, what)
    except KeyError as e:
        raise LoraError(e.args[0]) from None


def _kind(path, cfg: LoraConfig) -> _Kind:
    key = tuple(path[-2:])
    if key not in _KINDS:
        raise LoraError(f"{'/'.join(path)}: not an adaptable weight; adapters go on attn/{{q,k,v,o}} and "
                        f"moe/{{gate,up,down}}")
    if not cfg.adapts(*key):
        raise LoraError(f"{'/'.join(path)}: adapter present but {cfg} does not adapt {'/'.join(key)}")
    return _KINDS[key]


def _lead(path, kind: _Kind, ndim: int) -> int:
    """Number of leading (stacked) axes of a base weight of ``ndim`` dims: 0 unstacked, 1 in the scanned layout."""
    if ndim < kind.ndim:
        raise LoraError(f"{'/'.join(path)}: base weight has {ndim} dims; a {'/'.join(path[-2:])} weight has "
                        f"{kind.ndim}, plus any stacked leading axes")
    return ndim - kind.ndim


def _factor_shapes(shape: tuple[int, ...], kind: _Kind, rank: int) -> tuple[tuple, tuple, int]:
    """Base weight shape -> (A shape, B shape, fan-in of A)."""
    lead = len(shape) - kind.ndim
    keep, split = lead + kind.shared, lead + kind.shared + kind.n_in
    return shape[:split] + (rank,), shape[:keep] + (rank,) + shape[split:], math.prod(shape[keep:split])


# ------------------------------------------------------------------------------------------------------- the API

def init(params, cfg: LoraConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Fresh adapters for every leaf of ``params`` that ``cfg`` adapts: A ~ normal(0, std 1/sqrt(fan_in)), B = 0.

    B = 0 makes the untrained adapter an exact no-op. fan_in = D for q/k/v and expert gate/up, H*hd for o, F for
    expert down: x @ A then has about the scale of one coordinate of x. (peft's default, kaiming-uniform with
    a = sqrt(5), scales by the same fan-in, with std 1/sqrt(3 fan_in).)
    Only shapes are read from ``params`` (ShapeDtypeStructs work), so this can run under ``jax.jit`` with the
    adapters' shardings as out_shardings. ``dtype`` is the adapters' own (fp32 master weights by default).
    """
    found = []

    def walk(node, path):
        for k in sorted(node):
            sub = node[k]
            if isinstance(sub, Mapping):
                walk(sub, path + (k,))
            elif len(path) >= 1 and cfg.adapts(path[-1], k):
                found.append((path + (k,), tuple(sub.shape)))
    walk(params, ())
    if not found:
        raise LoraError(f"init: no weight in params matches {cfg}; adapters go on attn/{{q,k,v,o}} and "
                        f"moe/{{gate,up,down}}")
    made = {}
    for i, (path, shape) in enumerate(found):
        k = jax.random.fold_in(key, i)  # rather than split(key, n): one compiled program whatever the count
        kind = _KINDS[path[-2:]]
        _lead(path, kind, len(shape))
        a_shape, b_shape, fan_in = _factor_shapes(shape, kind, cfg.rank)
        a = _normal(k, math.prod(a_shape[:-1]), cfg.rank, 1 / math.sqrt(fan_in), jnp.dtype(dtype))
        made[path] = {"a": a.reshape(a_shape), "b": jnp.zeros(b_shape, dtype)}
    return tree.replace({}, made)


@functools.partial(jax.jit, static_argnums=(1, 2, 4))
def _normal(key, rows: int, rank: int, std, dtype):
    """normal(0, std) [rows, r], which the caller reshapes to A's shape (the same distribution). Eager calls thus
    compile one generator per (rows, r), shared by q, k, v and o whenever D = H * hd, instead of one per shape;
    under an outer jit this is simply inlined."""
    return (jax.random.normal(key, (rows, rank), jnp.float32) * std).astype(dtype)


def check(params, lora, cfg: LoraConfig) -> None:
    """Raise a ``LoraError`` naming the key and the shapes unless every adapter fits its base weight at ``cfg``'s
    rank. Reads only shapes; ``merge`` and ``load(params=...)`` call it."""
    for path, ab in adapters(lora):
        kind = _kind(path, cfg)
        w = _get(params, path, "the base params")
        _lead(path, kind, len(w.shape))
        a_shape, b_shape, _ = _factor_shapes(tuple(w.shape), kind, cfg.rank)
        if tuple(ab["a"].shape) != a_shape or tuple(ab["b"].shape) != b_shape:
            raise LoraError(f"{'/'.join(path)}: adapter a {tuple(ab['a'].shape)}, b {tuple(ab['b'].shape)} does not "
                            f"fit the base weight {tuple(w.shape)} at rank {cfg.rank}: expected a {a_shape}, "
                            f"b {b_shape}")


def delta(a: jax.Array, b: jax.Array, kind: tuple[str, str]) -> jax.Array:
    """The unscaled update A B for a weight of ``kind`` (e.g. ("attn", "q")), in fp32, shaped like the weight."""
    if tuple(kind) not in _KINDS:
        raise LoraError(f"delta: unknown kind {kind!r}; known: {sorted('/'.join(k) for k in _KINDS)}")
    lhs, out = _KINDS[tuple(kind)].eq.split("->")
    x, y = lhs.split(",")
    # HIGHEST: at default precision GPUs (TF32) and TPUs (one bf16 pass) round A and B to 10 or 8 mantissa bits
    # before multiplying; the exact fp32 product costs only ~2r flops per weight element.
    return jnp.einsum(f"...{x},...{y}->...{out}", a.astype(jnp.float32), b.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def merge(params, lora, cfg: LoraConfig) -> dict:
    """params with every adapted W replaced by W + (alpha / r) * delta(A, B), in W's dtype.

    Pure and jittable; differentiable in ``lora`` (and in ``params``, though training differentiates only
    ``lora``). The sum is taken in fp32 and rounded once to W's dtype, so B = 0 returns W bit for bit.
    """
    check(params, lora, cfg)
    merged = {}
    for path, ab in adapters(lora):
        w = _get(params, path, "the base params")
        d = delta(ab["a"], ab["b"], path[-2:])
        merged[path] = (w.astype(jnp.float32) + cfg.scale * d).astype(w.dtype)
    return tree.replace(params, merged)


def logical_axes(lora, base_axes) -> dict:
    """Logical axis names of the adapters, from those of the base weights (``nn.get_partition_spec`` of the boxed
    params: a tree of PartitionSpecs, or tuples, of logical names).

    A keeps W's leading, shared (expert) and input-side names and gets None for r; B keeps the leading and shared
    names, None for r, then W's output-side names. So each adapter shards like its base weight, e.g. q's A
    [D, r] is ("embed", None) and B [r, H, hd] is (None, "heads", "head_dim").
    """
    out = {}
    for path, ab in adapters(lora):
        kind = _KINDS.get(tuple(path[-2:]))
        if kind is None:
            raise LoraError(f"{'/'.join(path)}: not an adaptable weight")
        spec = tuple(_get(base_axes, path, "the base axes"))
        w_ndim = len(ab["a"].shape) - 1 + kind.n_out
        if len(spec) > w_ndim:
            raise LoraError(f"{'/'.join(path)}: base axes {spec} have {len(spec)} names for a weight of {w_ndim} "
                            f"dims (adapter a {tuple(ab['a'].shape)})")
        spec += (None,) * (w_ndim - len(spec))  # a PartitionSpec may leave trailing replicated dims out
        keep = w_ndim - kind.ndim + kind.shared
        split = keep + kind.n_in
        out[path] = {"a": P(*spec[:split], None), "b": P(*spec[:keep], None, *spec[split:])}
    return tree.replace({}, out)




__all__ = ["ATTN_TARGETS", "LoraConfig", "LoraError", "adapters", "check", "delta", "init", "logical_axes", "merge"]
