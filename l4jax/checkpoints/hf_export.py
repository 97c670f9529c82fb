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
import math
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from .. import tree
from ..config import Llama4Config
from ..parallel.distributed import to_numpy
from . import safetensors_file
from .atomic import atomic_dir
from .read_ahead import Rows, put_rows
from .hf_names import Source, sources
from .l4jax_format import copy_side_files, first_line

SHARD_SIZE = 5 * 10**9


def text_layout(config: Llama4Config) -> tuple[str, str]:
    """(text prefix, lm-head key) of the HF names: a full ``llama4`` checkpoint's when there is a vision tower (its
    transformers modules sit at the same paths)."""
    if config.vision is not None:
        return "language_model.model.", "language_model.lm_head.weight"
    return "model.", "lm_head.weight"


def _place(out: np.ndarray, s: Source, value: np.ndarray | Rows) -> None:
    """Write one l4jax parameter back into its (part of an) HF tensor: undo the reshape, then the transpose (in
    tiles that stay in the CPU's caches), casting to ``out``'s dtype on the way. A parameter given as ``Rows`` is
    placed block by block as its blocks come (a transpose overlaps the reading of the next blocks)."""
    rows = s.read_shape[::-1] if s.transpose else s.read_shape  # the parameter as rows of the (transposed) HF tensor
    want = s.out_shape or rows
    if tuple(value.shape) != tuple(want):
        raise ValueError(f"parameter {'/'.join(s.path)!r} has shape {list(value.shape)}; {s.key!r} needs "
                         f"{list(want)}")
    if isinstance(value, Rows) and math.prod(want[1:]) % math.prod(rows[1:]) == 0:  # a block is whole rows of it
        blocks = (block.reshape(-1, *rows[1:]) for block in value.blocks())
    else:
        blocks = [(value.read() if isinstance(value, Rows) else value).reshape(rows)]
    put_rows(out[s.part or ...], blocks, s.transpose)


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

    def assemble(self, get: Callable[[tuple[str, ...]], np.ndarray | Rows]) -> np.ndarray:
        """The tensor on the host, each part fetched with ``get(path)`` and placed in turn (host memory: the tensor
        and one part, or a part's blocks in flight when it comes as ``Rows``)."""
        out = np.empty(self.shape, self.dtype)
        for s in self.parts:
            _place(out, s, get(s.path))
        return out

    def rows(self, stored: list[Rows | None]) -> Rows | None:
        """The tensor as ``Rows``, each block made from the same rows of every part (``stored``, one per part, in
        order), never whole in memory: when every part comes in blocks of the same rows and sits in the tensor
        neither transposed nor reshaped (the embedding, the experts' stacks; a part's slice keeps the first axis
        whole). Else None: the tensor is assembled whole."""
        if any(r is None for r in stored) or len({r.block_rows for r in stored}) != 1 or any(
                s.transpose or tuple(r.shape) != s.read_shape for s, r in zip(self.parts, stored)):
            return None
        whole = len(self.parts) == 1 and self.parts[0].part is None and stored[0].dtype == self.dtype

        def blocks() -> Iterator[np.ndarray]:
            for pieces in zip(*(r.blocks() for r in stored), strict=True):
                if whole:
                    yield pieces[0]
                    continue
                out = np.empty((len(pieces[0]), *self.shape[1:]), self.dtype)
                for s, piece in zip(self.parts, pieces):
                    out[(slice(None), *(s.part or ())[1:])] = piece
                del pieces
                yield out
        return Rows(self.shape, self.dtype, stored[0].block_rows, blocks)


def hf_plan(config: Llama4Config, dtype_of: Callable[[tuple[str, ...]], np.dtype]) -> list[HFTensor]:
    """Every HF tensor, in ``sources`` order, from the shapes alone; ``dtype_of(path)``: the dtype the tensor made
    from that l4jax parameter is written in."""
    groups: dict[str, list[Source]] = {}
    for s in sources(config, *text_layout(config)):
        groups.setdefault(s.key, []).append(s)
    return [HFTensor(key, parts[0].shape, np.dtype(dtype_of(parts[0].path)), tuple(parts))
            for key, parts in groups.items()]


def _gather(params: dict) -> Callable[[tuple[str, ...]], np.ndarray]:
    """A parameter of ``params`` on the host, gathered whole (a collective every process joins)."""
    return lambda path: to_numpy(tree.get(params, path))


def _dtypes(params: dict, dtype) -> Callable[[tuple[str, ...]], np.dtype]:
    return lambda path: np.dtype(dtype or tree.get(params, path).dtype)


def hf_tensors(config: Llama4Config, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, host array) for every tensor of the HF checkpoint, one at a time, in ``sources`` order."""
    for t in hf_plan(config, _dtypes(params, dtype)):
        yield t.key, t.assemble(_gather(params))


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
    shards = shard_plan(hf_plan(config, _dtypes(params, dtype)), shard_size)
    with atomic_dir(out, overwrite=overwrite, what="Hugging Face export") as tmp:
        for name, tensors in shards.items():
            _write_shard(tmp / name, tensors, params)
        if jax.process_index() == 0:
            write_index(tmp, shards)
            write_side_files(tmp, config, hf_config, side_files_from)
    return out


def write_side_files(folder: Path, config: Llama4Config, hf_config: dict | None,
                     side_files_from: str | Path | None) -> None:
    """config.json (``hf_config``, default ``config.to_hf()``), the source's tokenizer and generation files, and a
    generation_config.json derived from the config when the source has none."""
    (folder / "config.json").write_text(json.dumps(hf_config or config.to_hf(), indent=2))
    copy_side_files(side_files_from, folder)
    if not (folder / "generation_config.json").is_file():  # as transformers derives it from the config
        t = config.text
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": t.bos_token_id, "eos_token_id": list(t.eos_token_id),
             "pad_token_id": t.pad_token_id, "_from_model_config": True}, indent=2))


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
    arrays = (t.assemble(_gather(params)) for t in tensors)
    if jax.process_index() != 0:
        for _ in arrays:
            pass
        return
    try:
        safetensors_file.write(path, [(t.key, t.shape, t.dtype) for t in tensors], arrays, {"format": "pt"})
    except OSError as e:  # a full disk or an I/O error
        raise OSError(f"{path.parent}: writing {path.name} failed: {first_line(e)}") from e


def write_index(folder: Path, shards: dict[str, list[HFTensor]]) -> None:
    """``model.safetensors.index.json`` (the weight map and total size), when there is more than one shard."""
    if len(shards) > 1:
        weight_map = {t.key: name for name, tensors in shards.items() for t in tensors}
        total = sum(t.nbytes for tensors in shards.values() for t in tensors)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
