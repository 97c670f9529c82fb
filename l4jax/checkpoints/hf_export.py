"""Export to Hugging Face: an l4jax model as an HF folder that transformers loads as it loads Meta's release.

    <dir>/config.json                     ``llama4`` (with vision_config) when the model has a vision tower,
                                          ``llama4_text`` otherwise
    <dir>/model-0000i-of-0000n.safetensors shards of at most ``shard_size`` bytes (a larger tensor gets its own)
    <dir>/model.safetensors.index.json    the weight map
    <dir>/tokenizer*.json, ...            copied from the source model, when present

The key names and layouts are ``hf_names.sources`` read backwards: kernels transposed back to nn.Linear's
[out, in], heads merged, each expert layer's gate and up fused back into ``gate_up_proj``. HF tensors are assembled
one at a time on the host (a sharded parameter is fetched whole, tensor by tensor) and a shard is written once
full, so host memory holds at most one shard; all is written into a temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from safetensors.numpy import save_file

from .. import tree
from ..config import Llama4Config
from .atomic import atomic_dir
from .hf_names import Source, sources
from .l4jax_format import SIDE_FILES, first_line

SHARD_SIZE = 5 * 10**9


def _layout(config: Llama4Config) -> tuple[str, str]:
    """(text prefix, lm-head key): a full ``llama4`` checkpoint when there is a vision tower."""
    if config.vision is not None:
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


def _place(out: np.ndarray, s: Source, value: np.ndarray) -> None:
    """Write one l4jax parameter back into its (part of an) HF tensor: undo the reshape, then the transpose."""
    shape = s.read_shape
    value = value.reshape(shape[::-1] if s.transpose else shape)
    out[s.part or ...] = value.T if s.transpose else value


def hf_tensors(config: Llama4Config, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array) for every tensor of the HF checkpoint, one at a time, in ``sources`` order."""
    groups: dict[str, list[Source]] = {}
    for s in sources(config, *_layout(config)):
        groups.setdefault(s.key, []).append(s)
    for key, parts in groups.items():
        values = [np.asarray(jax.device_get(tree.get(params, s.path))) for s in parts]
        out = np.empty(parts[0].shape, dtype or values[0].dtype)
        for s, v in zip(parts, values):
            _place(out, s, v)
        del values
        yield key, out


def save_hf(config: Llama4Config, params: dict, out: str | Path, *, dtype=None, shard_size: int = SHARD_SIZE,
            hf_config: dict | None = None, side_files_from: str | Path | None = None,
            overwrite: bool = False) -> Path:
    """Write ``params`` (text and, with a vision config, ``vision_model`` and ``projector``) as an HF folder.
    ``hf_config``: the config.json to write (an l4jax checkpoint keeps its source's, field for field); default
    ``config.to_hf()``."""
    if hf_config is not None and Llama4Config.from_hf(hf_config) != config:
        raise ValueError("hf_config: describes another model than the parameters' config")
    if shard_size < 1:
        raise ValueError(f"shard_size: must be a positive number of bytes, got {shard_size}")
    out = Path(out).absolute()
    with atomic_dir(out, overwrite=overwrite, what="Hugging Face export") as tmp:
        if jax.process_index() == 0:
            shards = _write_shards(hf_tensors(config, params, dtype), tmp, shard_size)
            _write_index(tmp, shards)
            (tmp / "config.json").write_text(json.dumps(hf_config or config.to_hf(), indent=2))
            if side_files_from is not None:
                for f in SIDE_FILES:
                    if (Path(side_files_from) / f).is_file():
                        shutil.copy2(Path(side_files_from) / f, tmp / f)
        else:  # every process takes part in fetching each sharded tensor
            for _ in hf_tensors(config, params, dtype):
                pass
    return out


def _write_shards(tensors: Iterator[tuple[str, np.ndarray]], folder: Path, shard_size: int) -> list[dict]:
    """Group tensors into files of at most ``shard_size`` bytes, written as they fill; returns each file's keys
    (named model-<i>.safetensors here, renamed with the count by ``_write_index``)."""
    shards, pending, size = [], {}, 0

    def flush():
        nonlocal pending, size
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            try:
                save_file(pending, str(folder / name), metadata={"format": "pt"})
            except Exception as e:  # a full disk or an I/O error
                raise OSError(f"{folder}: writing {name} failed: {first_line(e)}") from e
            shards.append({"file": name, "keys": list(pending), "bytes": size})
        pending, size = {}, 0

    for key, array in tensors:
        if pending and size + array.nbytes > shard_size:
            flush()
        pending[key], size = array, size + array.nbytes
    flush()
    return shards


def _write_index(folder: Path, shards: list[dict]) -> None:
    """Name the shards model-0000i-of-0000n (one file: model.safetensors) and write the index."""
    n, weight_map = len(shards), {}
    for i, shard in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / shard["file"]).rename(folder / name)
        weight_map.update({k: name for k in shard["keys"]})
    if n > 1:
        total = sum(s["bytes"] for s in shards)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
