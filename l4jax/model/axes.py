"""The model's logical axis names, and ``Partitioning``: the mesh and rules table a model instance is laid out by.

Modules name every parameter and key activation with the logical axes below. They never name a mesh axis:
``l4jax.parallel.rules`` holds the one table that maps these names onto mesh axes, and hands the model a
``Partitioning`` (the mesh plus that table specialised to it). Parameter and activation axes have separate names
because they shard differently: a parameter's model dimension is split over ``fsdp`` while an activation's batch is.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec as P

# Parameter axes.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERT, EXPERT_MLP, NORM, LAYERS = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "expert_mlp", "norm", "layers")
# Activation axes.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")
CACHE_LENGTH = "cache_length"  # the slots of a global layer's KV cache

def mesh_axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a mesh axis or a tuple of them) as a tuple of mesh axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


class ShardingError(ValueError):
    """A mesh or a model does not fit the sharding rules; the message names the axis and the sizes."""


Rule = tuple[str, "str | tuple[str, ...] | None"]


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """Where a model's logical axes live: a mesh and the rules (logical axis -> mesh axes) specialised to it.

    ``Partitioning()`` (no mesh) is one device: constraints are no-ops and the MoE dispatches without
    ``shard_map``. Hashable, so a module holding it can be a static argument of ``jax.jit``.
    """

    mesh: Mesh | None = None
    rules: tuple[Rule, ...] = ()

    def __post_init__(self):
        if self.mesh is not None and not self.rules:
            raise ValueError("Partitioning: a mesh needs its rules (l4jax.parallel.partitioning builds both)")

    def spec(self, names: Sequence[str | None]) -> P:
        """The PartitionSpec of an array whose dimensions carry the logical ``names``."""
        return nn.logical_to_mesh_axes(tuple(names), self.rules)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> jax.sharding.NamedSharding:
        """The NamedSharding of ``names``; with the array's ``shape``, fitted as ``constrain`` fits it."""
        spec = self.spec(names)
        if shape is not None:
            spec = P(*(self._fit(e, n) for e, n in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape)))
        return jax.sharding.NamedSharding(self.mesh, spec)

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        """``with_sharding_constraint`` by logical names; the identity on one device. A dimension that the mesh
        axes of the sequence (``LENGTH``) do not divide, such as a decode step's one token, is left unsplit on them."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

    def _fit(self, entry, n: int):
        axes = mesh_axes(entry)
        if n % self.axis_size(entry) == 0 or not set(axes) & set(self.sequence_axes):
            return entry
        kept = tuple(a for a in axes if a not in self.sequence_axes)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    @property
    def sequence_axes(self) -> tuple[str, ...]:
        """The mesh axes a prefill or training row's sequence is split over (long context); () on one device."""
        if self.mesh is None:
            return ()
        return tuple(a for a in mesh_axes(self.spec((LENGTH,))[0]) if self.mesh.shape[a] > 1)

    @property
    def context(self) -> int:
        """Devices a row's sequence is split over (1: not split)."""
        return self.axis_size(self.sequence_axes or None)

    def axis_size(self, names) -> int:
        """Devices a dimension sharded as ``names`` (a spec entry: None, a mesh axis or a tuple of them) spans."""
        if self.mesh is None or names is None:
            return 1
        n = 1
        for a in (names,) if isinstance(names, str) else names:
            n *= self.mesh.shape[a]
        return n
