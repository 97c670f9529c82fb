"""The NamedSharding of every parameter of a model on a mesh, from the logical axis names its modules declare."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import Llama4Config
from .. import tree
from ..model.axes import Partitioning, ShardingError
from ..model.decoder import Llama4Text, abstract_params
from ..model.quant import QArray, with_scales
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


def for_params(shardings: dict, params: dict) -> dict:
    """``shardings`` (one NamedSharding per parameter) shaped like ``params``: a quantized weight (``QArray``) gets a
    QArray of shardings (``quantized_sharding``)."""
    found = {path: quantized_sharding(tree.get(shardings, path), q, path)
             for path, q in tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)) if isinstance(q, QArray)}
    return tree.replace(shardings, found) if found else shardings


def quantized_sharding(sh: NamedSharding, q: QArray, path: tuple[str, ...]) -> QArray:
    """The shardings of a quantized weight placed like the weight ``sh``: its values on ``sh``, its scales the same
    but replicated along their size-1 axes. A scale axis that its mesh axes do not divide is a ShardingError naming
    the parameter."""
    specs = with_scales(q, sh.spec)  # in the values' layout
    for axis, (entry, n) in enumerate(zip(specs.scales, q.scales.shape)):
        if entry is not None and n % axes_size(sh.mesh, entry):
            raise ShardingError(f"{'/'.join(path)}: its {n} int4 scale groups along axis {q.axis(axis)} do not split "
                                f"over mesh axes {entry} (size {axes_size(sh.mesh, entry)}); use int8 or another mesh")
    return dataclasses.replace(q, values=NamedSharding(sh.mesh, specs.values),
                               scales=NamedSharding(sh.mesh, specs.scales))
