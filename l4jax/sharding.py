"""Logical axis names and the one table that maps them onto the device mesh.

Modules name every parameter and key activation with the logical axes below; only this table says which mesh
axis (``data``, ``fsdp``, ``expert``, ``tensor``) each one lives on. Parameter and activation axes have separate
names because they shard differently: a parameter's model dimension is split over ``fsdp`` while an activation's
batch is.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Parameter axes.
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERT, EXPERT_MLP, NORM = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "expert_mlp", "norm")
# Activation axes.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (EXPERT, "expert"),
    (EXPERT_MLP, "tensor"),
    (NORM, None),
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)
