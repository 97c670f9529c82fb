"""l4jax: Llama 4 in JAX/Flax, numerically matching Hugging Face transformers.

The public API: ``load`` / ``init`` a ``Model``, ``load_config`` and the config classes, ``make_mesh``,
``chat_prompt`` (the Llama 4 chat template), and the errors they raise. The packages below hold the rest: ``model``
(the network), ``parallel`` (meshes and sharding rules), ``checkpoints`` (weights on disk), ``infer`` (the model
handle, generation), ``train`` and ``data``.
"""

from .checkpoints import CheckpointError
from .data.chat import chat_prompt
from .config import ConfigError, Llama4Config, RopeScaling, TextConfig, VisionConfig, load_config
from .infer import Model, init, load
from .parallel import ShardingError, distributed, make_mesh

__version__ = "0.1.0"
__all__ = ["Model", "init", "load", "load_config", "ConfigError", "CheckpointError", "Llama4Config", "TextConfig",
           "VisionConfig", "RopeScaling", "make_mesh", "ShardingError", "distributed", "chat_prompt"]
