"""Logical axis names, the one table that maps them onto the device mesh, and the mesh itself.

Modules name every parameter and key activation with the logical axes below; only ``RULES`` says which mesh
axis (``data``, ``fsdp``, ``expert``, ``tensor``) each one lives on. Parameter and activation axes have separate
names because they shard differently: a parameter's model dimension is split over ``fsdp`` while an activation's
batch is.

``rules_for(cfg, mesh)`` specialises the table to one model on one mesh: it drops mesh axes the mesh does not have,
replicates the axes that may be replicated when their size does not divide (kv heads, vocab), and raises a
``ShardingError`` for the ones that must divide (query heads, experts, MLP widths, the model dimension).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Parameter axes.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERT, EXPERT_MLP, NORM, LAYERS = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "expert_mlp", "norm", "layers")
# Activation axes.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")

Rule = tuple[str, "str | tuple[str, ...] | None"]

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). THE table: nothing else names mesh axes.
RULES: tuple[Rule, ...] = (
    (VOCAB, "tensor"),          # embedding rows and LM-head columns: logits come out vocab-sharded
    (EMBED, "fsdp"),            # the model dimension of every weight (FSDP); gathered per layer by XLA
    (HEADS, "tensor"),          # Megatron attention: q heads and the matching rows of o
    (KV_HEADS, "tensor"),       # replicated instead when tensor does not divide them (see rules_for)
    (HEAD_DIM, None),
    (MLP, "tensor"),            # Megatron MLP: gate/up columns, down rows
    (EXPERT, "expert"),         # each device holds E / expert experts
    (EXPERT_MLP, "tensor"),     # inside an expert, its hidden width is tensor-parallel
    (NORM, None),
    (LAYERS, None),             # the stacked axis of scanned layers: every device holds its slice of every layer
    (BATCH, ("data", "fsdp")),  # FSDP is data parallelism with sharded weights
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)


class ShardingError(ValueError):
    """A mesh or a model does not fit the sharding rules; the message names the axis and the sizes."""


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None, **unknown) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor), all of type ``Auto``.

    The product of the sizes must equal the number of devices (``jax.devices()``, i.e. every process's devices,
    unless ``devices`` is given). Auto, not Explicit (the default of ``jax.make_mesh`` on current JAX): the model
    annotates parameters and a few activations and lets the partitioner (Shardy) propagate the rest; under
    Explicit axes every contraction over a sharded dimension would need an ``out_sharding``.
    """
    if unknown:
        raise ShardingError(f"make_mesh: unknown mesh axis {sorted(unknown)}; the axes are {list(MESH_AXES)}")
    sizes = dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ShardingError(f"make_mesh: {name} must be a positive integer, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ShardingError(f"make_mesh: {shape} = {math.prod(sizes.values())} devices, but there are "
                            f"{len(devices)}; the product of the axis sizes must equal the device count")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def check_mesh(mesh: Mesh) -> None:
    """Every mesh axis must be one of ``MESH_AXES`` (a mesh may omit some)."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ShardingError(f"mesh has unknown axis names {unknown}; l4jax shards over {list(MESH_AXES)}")


def _size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def rules_for(cfg, mesh: Mesh) -> tuple[Rule, ...]:
    """``RULES`` specialised to a ``TextConfig`` on a mesh.

    Mesh axes the mesh lacks are dropped. kv heads fewer than (or not a multiple of) the tensor size are
    replicated: every device then keeps all K kv heads, which is what GQA under tensor parallelism needs. The
    vocabulary is replicated when the tensor size does not divide it. Every other sharded dimension must divide.
    """
    check_mesh(mesh)
    dims = {
        VOCAB: cfg.vocab_size, EMBED: cfg.hidden_size, HEADS: cfg.num_attention_heads,
        KV_HEADS: cfg.num_key_value_heads, MLP: cfg.intermediate_size_mlp, EXPERT: cfg.num_local_experts,
        EXPERT_MLP: cfg.intermediate_size,
    }
    dims.update({ACT_HEADS: dims[HEADS], ACT_KV_HEADS: dims[KV_HEADS], ACT_MLP: dims[MLP], ACT_VOCAB: dims[VOCAB]})
    may_replicate = {KV_HEADS, ACT_KV_HEADS, VOCAB, ACT_VOCAB}
    if not cfg.moe_layers:
        may_replicate |= {EXPERT, EXPERT_MLP}   # no expert weights exist
    if all(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        may_replicate |= {MLP, ACT_MLP}         # no dense MLP layer exists (Scout)
    out = []
    for logical, axes in RULES:
        if axes is not None:
            kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape)
            axes = None if not kept else kept[0] if len(kept) == 1 and isinstance(axes, str) else kept
        n = _size(mesh, axes)
        if logical in dims and dims[logical] % n:
            if logical not in may_replicate:
                raise ShardingError(f"{logical} (size {dims[logical]}) is not divisible by mesh axes {axes} "
                                    f"(size {n}); choose a mesh whose {axes} size divides {dims[logical]}")
            axes = None
        out.append((logical, axes))
    return tuple(out)


def batch_multiple(mesh: Mesh | None) -> int:
    """The batch is split over the mesh axes of ``BATCH``: its size must be a multiple of this."""
    if mesh is None:
        return 1
    axes = dict(RULES)[BATCH]
    return _size(mesh, tuple(a for a in axes if a in mesh.shape))


def logical_sharding(mesh: Mesh, rules, names: Sequence[str | None]) -> NamedSharding:
    """NamedSharding of an array whose dimensions carry the logical ``names``."""
    table = dict(rules)
    return NamedSharding(mesh, P(*(table.get(n) if n is not None else None for n in names)))


def put(host: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """Place a host array that every process holds in full onto ``sharding``, one local shard at a time.

    Works with several processes: each one copies only the slices its own devices hold, and no device ever
    receives more than its shard.
    """
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


__all__ = ["MESH_AXES", "RULES", "ShardingError", "make_mesh", "check_mesh", "rules_for", "batch_multiple",
           "logical_sharding", "put"]
