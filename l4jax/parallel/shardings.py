"""The NamedSharding of every parameter of a model on a mesh, from the logical axis names its modules declare."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import Llama4Config
from ..model.axes import Partitioning
from ..model.decoder import Llama4Text, abstract_params
from ..model.vision import ImageEncoder, abstract_vision_params
from .rules import axes_size


def param_shardings(config: Llama4Config, part: Partitioning, dtype=jnp.float32) -> dict:
    """NamedSharding per parameter of the text decoder, and of the vision tower and projector when the config has
    one (``vision_model``, ``projector``), through ``part``'s rules.

    The rules are checked for divisibility against the text decoder's sizes; the vision tower's sizes are unrelated
    (and tiny next to the text: 0.9B of Scout's 109B), so a mesh axis that does not divide one of its dimensions is
    dropped for that dimension (replicated there) instead of refusing a mesh that fits the text.
    """
    boxed = abstract_params(Llama4Text(config.text, dtype=dtype, param_dtype=dtype))
    out = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), part.mesh, part.rules)
    if config.vision is None:
        return out
    boxed = abstract_vision_params(ImageEncoder(config.vision, config.text.hidden_size, dtype=dtype,
                                                param_dtype=dtype))

    def fit(spec, leaf):
        axes = part.spec(spec)
        return NamedSharding(part.mesh, P(*(a if a is None or d % axes_size(part.mesh, a) == 0 else None
                                            for a, d in zip(axes, leaf.shape))))

    vision = jax.tree.map(fit, nn.get_partition_spec(boxed), nn.meta.unbox(boxed), is_leaf=lambda x: isinstance(x, P))
    return {**out, **vision}
