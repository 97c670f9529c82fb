"""The Llama 4 network as Flax linen modules: the text decoder (``decoder``), its layers (``attention``, ``moe``,
``layers``), their maths (``rope``, ``masks``, ``gmm``), the KV cache (``cache``), the vision tower (``vision``)
and the logical axis names every parameter and activation carries (``axes``). Nothing here knows a mesh axis.
Each name loads its module on first use (``l4jax._lazy``)."""

from .._lazy import exports

_NAMES = {"Partitioning": ".axes", "ShardingError": ".axes", "KVCache": ".cache", "Inputs": ".decoder",
          "Llama4Text": ".decoder", "Output": ".decoder"}
__getattr__, __dir__ = exports(__name__, _NAMES)
__all__ = sorted(_NAMES)
