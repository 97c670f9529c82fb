"""The one table that maps the model's logical axes onto the mesh axes, specialised per model and mesh.

The model names its axes (``l4jax.model.axes``); only ``RULES`` says which mesh axis (``data``, ``fsdp``,
``expert``, ``tensor``) each one lives on. ``partitioning(cfg, mesh)`` specialises the table to one model on one
mesh: it drops mesh axes the mesh does not have, replicates the axes that may be replicated when their size does not
divide (kv heads, vocab), and raises a ``ShardingError`` for the ones that must divide (query heads, experts, MLP
widths, the model dimension).
"""

from __future__ import annotations

import math

from jax.sharding import Mesh

from ..config import TextConfig
from ..model.axes import (ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB, BATCH, EMBED, EXPERT, EXPERT_MLP,
                          CACHE_LENGTH, HEAD_DIM, HEADS, KV_HEADS, LAYERS, LENGTH, MLP, NORM, VOCAB, Partitioning, Rule,
                          ShardingError)

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")

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
    (LENGTH, "context"),        # long context: the sequence of prefill and training rows (not a decode step's)
    (CACHE_LENGTH, "context"),  # and the slots of the global layers' caches (a chunked layer's ring is not split)
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)


def check_mesh(mesh: Mesh) -> None:
    """Every mesh axis must be one of ``MESH_AXES`` (a mesh may omit some)."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ShardingError(f"mesh has unknown axis names {unknown}; l4jax shards over {list(MESH_AXES)}")


def axes_size(mesh: Mesh, axes) -> int:
    """Devices spanned by ``axes`` (None, a mesh axis or a tuple of them)."""
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def rules_for(cfg: TextConfig, mesh: Mesh) -> tuple[Rule, ...]:
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
        n = axes_size(mesh, axes)
        if logical in dims and dims[logical] % n:
            if logical not in may_replicate:
                raise ShardingError(f"{logical} (size {dims[logical]}) is not divisible by mesh axes {axes} "
                                    f"(size {n}); choose a mesh whose {axes} size divides {dims[logical]}")
            axes = None
        out.append((logical, axes))
    return tuple(out)


def partitioning(cfg: TextConfig, mesh: Mesh | None) -> Partitioning:
    """The model's layout on ``mesh``: the mesh with ``rules_for(cfg, mesh)``; one device when mesh is None."""
    return Partitioning() if mesh is None else Partitioning(mesh, rules_for(cfg, mesh))


def batch_multiple(mesh: Mesh | None) -> int:
    """The batch is split over the mesh axes of ``BATCH``: its size must be a multiple of this."""
    if mesh is None:
        return 1
    axes = dict(RULES)[BATCH]
    return axes_size(mesh, tuple(a for a in axes if a in mesh.shape))
