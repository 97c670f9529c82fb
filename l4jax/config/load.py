"""``load_config``: a model's configuration from a preset name, a YAML or JSON file, an HF model folder or a dict.

The presets (``scout``, ``maverick``, ``behemoth``, ``bench``, ``tiny``) are YAML files in ``presets/``, installed
with the package (the repository's ``configs/`` points there). A YAML file may also hold a ``train:`` section
(``l4jax.train.settings``); its model keys are checked strictly, unknown ones being errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from .base import ConfigError
from .model import Llama4Config

PRESET_DIR = Path(__file__).resolve().parent / "presets"
SECTIONS = ("model", "train")  # the top-level sections of an l4jax YAML besides the model's own keys


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_path(source: str | Path) -> Path:
    """The file a config source names: a file, ``folder/config.json``, or a preset's YAML."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and (PRESET_DIR / f"{source}.yaml").is_file():
        path = PRESET_DIR / f"{source}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config at {str(source)!r}: not a file, a model folder with config.json, "
                          f"or a preset ({', '.join(presets())})")
    return path


def read_document(path: Path) -> dict:
    """The parsed top-level mapping of a YAML or JSON config file."""
    try:
        text = path.read_text(encoding="utf-8")
        d = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
    return d


def load_config(source: str | Path | Mapping[str, Any]) -> Llama4Config:
    """Config from a preset name (``scout``), a ``.yaml``/``.json`` file, an HF model folder, or a dict."""
    if isinstance(source, Mapping):
        return Llama4Config.from_hf(source)
    path = config_path(source)
    d = read_document(path)
    yaml_file = path.suffix in (".yaml", ".yml")
    model = d.get("model", {k: v for k, v in d.items() if not (yaml_file and k in SECTIONS)})
    try:
        return Llama4Config.from_hf(model, strict=yaml_file)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
