"""Export to Hugging Face: an l4jax model as an HF folder that transformers loads as it loads Meta's release.

    <dir>/config.json                     ``llama4`` (with vision_config) when the model has a vision tower,
                                          ``llama4_text`` otherwise
    <dir>/model-0000i-of-0000n.safetensors shards of at most ``shard_size`` bytes (a larger tensor gets its own)
    <dir>/model.safetensors.index.json    the weight map
    <dir>/tokenizer*.json, ...            copied from the source model, when present
    <dir>/generation_config.json          the source's, else bos / eos / pad ids from the config

The key names and layouts are ``hf_names.sources`` read backwards: kernels transposed back to nn.Linear's
[out, in], heads merged, each expert layer's gate and up fused back into ``gate_up_proj``.

Memory: the shards are planned from the shapes alone, and each HF tensor is assembled on the host and streamed into
its file (``safetensors_file``) before the next one is made, so host memory holds one tensor (plus one of its parts
while a fused tensor is assembled). A parameter sharded over devices or processes is gathered whole, tensor by
tensor (``distributed.to_numpy``, a collective every process joins); process 0 writes. Everything goes into a
temporary folder renamed at the end (``atomic``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from .. import tree
from ..config import Llama4Config
from ..parallel.distributed import to_numpy
from . import safetensors_file
from .atomic import atomic_dir
from .hf_names import Source, sources
from .l4jax_format import SIDE_FILES, first_line

SHARD_SIZE = 5 * 10**9


def text_layout(config: Llama4Config) -> tuple[str, str]:
    """(text prefix, lm-head key) of the HF names: a full ``llama4`` checkpoint's when there is a vision tower (its
    transformers modules sit at the same paths)."""
    if config.vision is not None:
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


def _place(out: np.ndarray, s: Source, value: np.ndarray) -> None:
    """Write one l4jax parameter back into its (part of an) HF tensor: undo the reshape, then the transpose."""
    shape = s.read_shape
    value = value.reshape(shape[::-1] if s.transpose else shape)
    out[s.part or ...] = value.T if s.transpose else value


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of the HF checkpoint: its key, shape and dtype, and the l4jax parameters it is made of."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[Source, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def assemble(self, params: dict) -> np.ndarray:
        """The tensor on the host, each part gathered (every process must call this) and placed in turn."""
        out = np.empty(self.shape, self.dtype)
        for s in self.parts:
            _place(out, s, to_numpy(tree.get(params, s.path)))
        return out


def hf_plan(config: Llama4Config, params: dict, dtype=None) -> list[HFTensor]:
    """Every HF tensor, in ``sources`` order, from the parameters' shapes and dtypes (nothing is fetched)."""
    groups: dict[str, list[Source]] = {}
    for s in sources(config, *text_layout(config)):
        groups.setdefault(s.key, []).append(s)
    return [HFTensor(key, parts[0].shape, np.dtype(dtype or tree.get(params, parts[0].path).dtype), tuple(parts))
            for key, parts in groups.items()]


def hf_tensors(config: Llama4Config, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array) for every tensor of the HF checkpoint, one at a time, in ``sources`` order."""
    for t in hf_plan(config, params, dtype):
        yield t.key, t.assemble(params)


def save_hf(config: Llama4Config, params: dict, out: str | Path, *, dtype=None, shard_size: int = SHARD_SIZE,
            hf_config: dict | None = None, side_files_from: str | Path | None = None,
            overwrite: bool = False) -> Path:
    """Write ``params`` (text and, with a vision config, ``vision_model`` and ``projector``) as an HF folder.
    ``hf_config``: the config.json to write (an l4jax checkpoint keeps its source's, field for field); default
    ``config.to_hf()``. With several processes every process calls this (each takes part in gathering)."""
    if hf_config is not None and Llama4Config.from_hf(hf_config) != config:
        raise ValueError("hf_config: describes another model than the parameters' config")
    if shard_size < 1:
        raise ValueError(f"shard_size: must be a positive number of bytes, got {shard_size}")
    out = Path(out).absolute()
    shards = shard_plan(hf_plan(config, params, dtype), shard_size)
    with atomic_dir(out, overwrite=overwrite, what="Hugging Face export") as tmp:
        for name, tensors in shards.items():
            _write_shard(tmp / name, tensors, params)
        if jax.process_index() == 0:
            _write_index(tmp, shards)
            (tmp / "config.json").write_text(json.dumps(hf_config or config.to_hf(), indent=2))
            if side_files_from is not None:
                for f in SIDE_FILES:
                    if (Path(side_files_from) / f).is_file():
                        shutil.copy2(Path(side_files_from) / f, tmp / f)
            if not (tmp / "generation_config.json").is_file():  # as transformers derives it from the config
                t = config.text
                (tmp / "generation_config.json").write_text(json.dumps(
                    {"bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_id),
                     "pad_token_id": t.pad_token_id, "_from_model_config": True}, indent=2))
    return out


def shard_plan(tensors: list[HFTensor], shard_size: int) -> dict[str, list[HFTensor]]:
    """File name -> its tensors: files of at most ``shard_size`` bytes (a larger tensor alone in its own), named
    model-0000i-of-0000n.safetensors, or model.safetensors when one file holds everything."""
    groups, size = [[]], 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups, size = groups + [[]], 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return {"model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors": g
            for i, g in enumerate(groups, 1)}


def _write_shard(path: Path, tensors: list[HFTensor], params: dict) -> None:
    """Stream one shard's tensors into ``path`` (process 0); the other processes gather alongside."""
    arrays = (t.assemble(params) for t in tensors)
    if jax.process_index() != 0:
        for _ in arrays:
            pass
        return
    try:
        safetensors_file.write(path, [(t.key, t.shape, t.dtype) for t in tensors], arrays, {"format": "pt"})
    except OSError as e:  # a full disk or an I/O error
        raise OSError(f"{path.parent}: writing {path.name} failed: {first_line(e)}") from e


def _write_index(folder: Path, shards: dict[str, list[HFTensor]]) -> None:
    """``model.safetensors.index.json`` (the weight map and total size), when there is more than one shard."""
    if len(shards) > 1:
        weight_map = {t.key: name for name, tensors in shards.items() for t in tensors}
        total = sum(t.nbytes for tensors in shards.values() for t in tensors)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
