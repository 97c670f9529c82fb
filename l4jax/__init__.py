"""l4jax: Llama 4 in JAX/Flax, numerically matching Hugging Face transformers.

The public API: ``load`` / ``init`` a ``Model``, ``load_config`` and the config classes, ``make_mesh``,
``chat_prompt`` (the Llama 4 chat template), and the errors they raise. The packages below hold the rest: ``model``
(the network), ``parallel`` (meshes and sharding rules), ``checkpoints`` (weights on disk), ``infer`` (the model
handle, generation), ``train`` and ``data``. Each name loads its module on first use (``_lazy``): a command
imports only what it runs.
"""

from ._lazy import exports

__version__ = "0.1.0"
_NAMES = {"Model": ".infer", "init": ".infer", "load": ".infer", "load_config": ".config", "ConfigError": ".config",
          "CheckpointError": ".checkpoints", "Llama4Config": ".config", "TextConfig": ".config",
          "VisionConfig": ".config", "RopeScaling": ".config", "make_mesh": ".parallel", "ShardingError": ".parallel",
          "distributed": ".parallel", "chat_prompt": ".data.chat"}
__getattr__, __dir__ = exports(__name__, _NAMES)
__all__ = sorted(_NAMES)
