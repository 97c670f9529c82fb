"""l4jax: Llama 4 in JAX/Flax, numerically matching Hugging Face transformers."""

from .api import Model, init, load
from .config import ConfigError, Llama4Config, RopeScaling, TextConfig, VisionConfig, load_config
from .convert.hf import CheckpointError
from .sharding import ShardingError, make_mesh
from . import distributed  # noqa: F401  (l4jax.distributed.initialize)

__version__ = "0.1.0"
__all__ = ["Model", "init", "load", "load_config", "ConfigError", "CheckpointError", "Llama4Config", "TextConfig",
           "VisionConfig", "RopeScaling", "make_mesh", "ShardingError"]
