"""Configuration: the model's (``model``: frozen dataclasses built from HF config dicts), loading it from presets,
files and folders (``load``), and what every check shares (``base``: the error, dtype names, the known keys)."""

from .base import DTYPES, ConfigError, dtype_name, reject_unknown
from .load import PRESET_DIR, config_path, load_config, presets, read_document
from .model import Llama4Config, RopeScaling, TextConfig, VisionConfig

__all__ = ["DTYPES", "ConfigError", "dtype_name", "reject_unknown", "PRESET_DIR", "config_path", "load_config",
           "presets", "read_document", "Llama4Config", "RopeScaling", "TextConfig", "VisionConfig"]
