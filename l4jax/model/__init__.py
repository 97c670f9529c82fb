"""The Llama 4 network as Flax linen modules: the text decoder (``decoder``), its layers (``attention``, ``moe``,
``layers``), their maths (``rope``, ``masks``, ``gmm``), the KV cache (``cache``), the vision tower (``vision``)
and the logical axis names every parameter and activation carries (``axes``). Nothing here knows a mesh axis."""

from .axes import Partitioning, ShardingError
from .cache import KVCache
from .decoder import Inputs, Llama4Text, Output

__all__ = ["Inputs", "KVCache", "Llama4Text", "Output", "Partitioning", "ShardingError"]
