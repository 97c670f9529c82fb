"""Hugging Face safetensors -> l4jax parameters, streamed one tensor at a time.

Accepts the multimodal layout (``language_model.model.*``, ``language_model.lm_head.weight``; vision weights are
skipped for text-only loading) and the text-only ``Llama4ForCausalLM`` layout (``model.*``, ``lm_head.weight``).
Nothing is read until every header has been checked: a missing, unexpected, mis-shaped or unsupported tensor is
reported with its key before any weight is loaded. FP8 checkpoints (``quantization_config.quant_method``
``fbgemm_fp8`` or ``compressed-tensors``) are read dequantized (each FP8 weight times its scales, ``scale_key``) or,
with ``keep_fp8``, kept as they are: a ``quant.QArray`` of the FP8 values and a scale per output channel.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Iterator

import ml_dtypes  # also registers bfloat16 with numpy, for bf16 checkpoints
import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import Llama4Config
from ..model.quant import QArray, contracted_axes, scale_shape
from . import safetensors_file
from .hf_names import VISION_PREFIXES, Source, layout, sources
from . import read_ahead
from .read_ahead import Read, Rows

SUPPORTED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64, "F8_E4M3": None}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "F8_E4M3": 4}  # FP8 weights are read dequantized (float32)
FP8 = "F8_E4M3"
FP8_NUMPY = np.dtype(ml_dtypes.float8_e4m3fn)
# FP8 checkpoints as released: Meta's (fbgemm_fp8: per-row scales, the experts' per output column) and
# compressed-tensors' (per output channel, or one per tensor). Weights are dequantized as they are read.
QUANT_METHODS = ("fbgemm_fp8", "compressed-tensors")


class CheckpointError(ValueError):
    """The checkpoint does not match the config: the message names the file and tensor key."""


class SafetensorsIndex:
    """Which file holds each tensor of an HF model folder (one file, or a sharded index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map'): {e}") from e
            self.files = {k: self.folder / f for k, f in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
            self.files = {}
            for f in files:
                for k in self._open(f).keys():
                    self.files[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in the index but missing")
            try:
                h = safe_open(str(f), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
            self._handles[f] = h
        return self._handles[f]

    def keys(self) -> list[str]:
        return list(self.files)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        sl = self._open(self.files[key]).get_slice(key)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, key: str, part: tuple[slice, ...] | None = None) -> np.ndarray:
        """One tensor (or a slice of it) in a fresh array of its own, read from a freshly opened file: nothing of
        the file stays mapped, so pages of tensors already read do not accumulate in resident memory."""
        f = self.files[key]
        part = (part,) if isinstance(part, slice) else part
        try:
            with safe_open(str(f), framework="numpy") as h:
                sl = h.get_slice(key)
                shape, rest = sl.get_shape(), tuple(part or ())[1:]
                whole_rows = all(r.indices(n) == (0, n, 1) for r, n in zip(rest, shape[1:]))
                # Whole rows (and FP8, which numpy cannot take from safetensors) are read straight from the file's
                # bytes: safetensors copies out of a memory map faulted in page by page, twice the time.
                if whole_rows or sl.get_dtype() == FP8:
                    first, stop, _ = (part or (slice(None),))[0].indices(shape[0])
                    return safetensors_file.read_rows(f, key, first, stop)[(slice(None),) + rest]
                return np.asarray(sl[part])  # already a copy of its own
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from e

    def close(self):
        self._handles.clear()


def _layout(index: SafetensorsIndex) -> tuple[str, str]:
    found = layout(index.keys())
    if found is None:
        raise CheckpointError(f"{index.folder}: no Llama 4 text weights found: expected keys under "
                              f"'language_model.model.' or 'model.', found e.g. {sorted(index.keys())[:5]}")
    return found


def plan(index: SafetensorsIndex, config: Llama4Config) -> list[Source]:
    """Check every header against the config before reading any data; return what to read.

    The vision tower and projector are read when the config has a vision part; otherwise their tensors are
    skipped (a text-only load of a multimodal checkpoint)."""
    keys = index.keys()
    prefix, head_key = _layout(index)
    wanted_sources = sources(config, prefix, head_key)
    wanted = {s.key for s in wanted_sources}
    missing = sorted(wanted - set(keys))
    if missing:
        raise CheckpointError(f"{index.folder}: {len(missing)} tensor(s) missing from the checkpoint: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    ignorable = VISION_PREFIXES + ((head_key,) if config.text.tie_word_embeddings else ())
    method = quant_method(index.folder)
    scales = {scale_key(s.key) for s in wanted_sources} if method else set()
    unexpected = sorted(k for k in keys if k not in wanted and k not in scales and not k.startswith(ignorable)
                        and not (method and k.endswith("input_scale")))  # activation scales: weight-only here
    if unexpected:
        raise CheckpointError(f"{index.folder}: {len(unexpected)} unexpected tensor(s) for this config: "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for s in wanted_sources:
        shape, dtype = index.info(s.key)
        if shape != s.shape:
            raise CheckpointError(f"{index.files[s.key]}: tensor {s.key!r} has shape {list(shape)}, the config "
                                  f"expects {list(s.shape)}")
        if dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"{index.files[s.key]}: tensor {s.key!r} has unsupported dtype {dtype}; "
                                  f"supported: {sorted(SUPPORTED_DTYPES)}")
        if dtype == FP8:
            _check_scale(index, s, method)
    return wanted_sources


def quant_method(folder: Path) -> str | None:
    """The ``quantization_config.quant_method`` of the folder's config.json (None without one); one this loader
    does not read is an error naming the field."""
    f = Path(folder) / "config.json"
    q = json.loads(f.read_text()).get("quantization_config") if f.is_file() else None
    if q is None:
        return None
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(f"{f}: quantization_config.quant_method {method!r} is not supported; l4jax reads "
                              f"{', '.join(QUANT_METHODS)} (FP8 weights with their scales)")
    return method


def scale_key(key: str) -> str:
    """Where an FP8 weight's scales are: ``<module>.weight_scale`` beside ``<module>.weight``, ``<name>_scale``
    beside the experts' ``gate_up_proj`` and ``down_proj``."""
    return key[:-len("weight")] + "weight_scale" if key.endswith(".weight") else key + "_scale"


def _check_scale(index: SafetensorsIndex, s: Source, method: str | None) -> None:
    f = index.files[s.key]
    if method is None:
        raise CheckpointError(f"{f}: tensor {s.key!r} is FP8 but config.json has no quantization_config")
    key = scale_key(s.key)
    if key not in index.files:
        raise CheckpointError(f"{f}: FP8 tensor {s.key!r} has no scale tensor {key!r}")
    shape = index.info(key)[0]
    if _broadcast_scale(s.shape, shape) is None:
        raise CheckpointError(f"{index.files[key]}: scale tensor {key!r} has shape {list(shape)}, which does not "
                              f"scale {s.key!r} {list(s.shape)} per row, per output or as a whole")


def _broadcast_scale(w: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axis order that makes ``scale`` broadcast against a weight [w] (None when none does): as it is
    ([out, 1] for [out, in], [E, 1, N] for [E, K, N], one scale), or its last two axes swapped ([E, N, 1])."""
    order = tuple(range(len(scale)))
    for cand in (order, order[:-2] + order[-2:][::-1] if len(scale) >= 2 else order):
        shape = tuple(scale[a] for a in cand)
        if len(shape) <= len(w) and all(n in (1, m) for n, m in zip(shape[::-1], w[::-1])):
            return cand
    return None


def _fp8_scale(index: SafetensorsIndex, s: Source) -> np.ndarray:
    """The float32 scales of FP8 parameter ``s``, broadcast to its rows and cut to its part (a slice of a fused
    tensor: gate or up of ``gate_up_proj``)."""
    key = scale_key(s.key)
    scale = index.read(key).astype(np.float32)
    scale = scale.transpose(_broadcast_scale(s.shape, scale.shape))
    scale = scale.reshape((1,) * (len(s.shape) - scale.ndim) + scale.shape)
    scale = np.broadcast_to(scale, (s.shape[0],) + scale.shape[1:])
    part = s.part or ()
    return scale[tuple(sl if n > 1 else slice(None) for sl, n in zip(part, scale.shape))]


def load_source(index: SafetensorsIndex, s: Source, dtype=None, dequantize: bool = True) -> np.ndarray:
    """Read, transpose, cast and reshape one parameter into a single fresh array (FP8 values times their scales
    unless ``dequantize`` is False).

    The output is allocated once and filled in blocks of ~64 MB of rows (``rows``), so a transpose or a cast never
    holds a second full copy of the tensor: peak memory is the output plus one block.
    """
    out = rows(index, s, dtype, dequantize).read()
    return out.reshape(s.out_shape) if s.out_shape else out


def rows(index: SafetensorsIndex, s: Source, dtype=None, dequantize: bool = True) -> Rows:
    """Parameter ``s`` (before its reshape, if it has one) as blocks of ~64 MB of the rows read, cast and checked
    one at a time when its ``blocks()`` are taken: what a conversion writes as it reads. A transposed one
    (a Linear weight [out, in] -> [in, out]) comes as the blocks of its transpose (``Rows.transposed``)."""
    dtype = _out_dtype(index, s, dtype, dequantize)
    return Rows(s.read_shape[::-1] if s.transpose else s.read_shape, dtype, _block_rows(s, dtype),
                lambda: (block for _, block in _blocks(index, s, dtype, dequantize)), transposed=s.transpose)


def _out_dtype(index: SafetensorsIndex, s: Source, dtype, dequantize: bool) -> np.dtype:
    stored = index.info(s.key)[1]
    if dtype is None:
        dtype = np.float32 if stored == FP8 and dequantize else safetensors_file.NUMPY[stored]
    return np.dtype(dtype)


def _block_rows(s: Source, dtype: np.dtype) -> int:
    return max(1, read_ahead.BLOCK_BYTES // max(1, math.prod(s.read_shape[1:]) * dtype.itemsize))


def _blocks(index: SafetensorsIndex, s: Source, dtype: np.dtype, dequantize: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) of ~64 MB of the rows of ``s`` as read (before any transpose), cast to ``dtype`` (FP8
    values times their scales when ``dequantize``), each checked for NaN and infinity."""
    part = s.part or tuple(slice(None) for _ in s.shape)
    scale = _fp8_scale(index, s) if index.info(s.key)[1] == FP8 and dequantize else None  # dequantized as read
    rows_, step = s.read_shape[0], _block_rows(s, dtype)
    for i in range(0, rows_, step):
        block = index.read(s.key, (slice(i, min(i + step, rows_)),) + part[1:])
        if scale is not None:
            block = block.astype(np.float32) * scale[i:i + step]
        _check_finite(block, index.files[s.key], s.key, i)
        yield i, block.astype(dtype, copy=False)
        del block


def load_fp8(index: SafetensorsIndex, s: Source) -> QArray:
    """FP8 parameter ``s`` kept as FP8: its values transposed and reshaped like the weight, its scales (one per
    output channel: ``keeps_fp8``) reshaped to match."""
    values = load_source(index, s, FP8_NUMPY, dequantize=False)
    scale = _fp8_scale(index, s)  # as read: [out, 1] (a Linear), [E, 1, out] (experts)
    contracted = contracted_axes(s.path)
    scale = np.ascontiguousarray(scale.T if s.transpose else scale, np.float32)
    return QArray(values, scale.reshape(scale_shape(values.shape, contracted, 0)), contracted, 0)


def keeps_fp8(index: SafetensorsIndex, s: Source) -> bool:
    """Whether parameter ``s`` can stay FP8 in l4jax: stored FP8, a weight that l4jax multiplies quantized
    (``quant.contracted_axes``), scaled per output channel or as a whole (not along its input, axis 1 as read)."""
    if index.info(s.key)[1] != FP8 or contracted_axes(s.path) is None:
        return False
    shape = index.info(scale_key(s.key))[0]
    shape = tuple(shape[a] for a in _broadcast_scale(s.shape, shape))
    shape = (1,) * (len(s.shape) - len(shape)) + shape
    return shape[1] == 1


def _check_finite(block: np.ndarray, f: Path, key: str, row: int) -> None:
    """A NaN or an infinity in a weight is damage: name the tensor and the row. A float32 sum (one read of a block
    already in hand, no temporary) is finite unless one of its elements is not; only then look closer, since a
    sum of huge finite values can also overflow."""
    if np.isfinite(block.sum(dtype=np.float32)) or np.isfinite(block).all():
        return
    bad = int(np.argwhere(~np.isfinite(block))[0][0]) + row
    raise CheckpointError(f"{f}: tensor {key!r} holds NaN or infinite values (first in row {bad}); the checkpoint is "
                          "damaged")


def reads(folder: str | Path, config: Llama4Config, dtype=None, keep_fp8: bool = False, as_rows: bool = False
          ) -> list[Read]:
    """(l4jax path, bytes, read) of every parameter, in order. Every header is checked against the config first;
    nothing is read until ``read()`` loads its parameter (``load_source``; with ``keep_fp8``, ``load_fp8`` for
    each FP8 weight that ``keeps_fp8``). With ``as_rows``, a parameter of ``read_ahead.ROWS_BYTES`` or more that
    is neither transposed nor reshaped comes as ``Rows`` instead (``rows``: read block by block as it is written).
    A transposed one is read whole on the read-ahead thread: a transpose as it is written (TensorStore's, or ours
    on the writing thread with a checksum of the transposed order) made the conversion slower on 2 cores."""
    index = SafetensorsIndex(folder)
    try:
        planned = plan(index, config)
        kept = {s.key for s in planned if keep_fp8 and keeps_fp8(index, s)}
        itemsize = {s.key: 1 if s.key in kept else np.dtype(dtype).itemsize if dtype is not None
                    else ITEMSIZE[index.info(s.key)[1]] for s in planned}
        out = []
        for s in planned:
            nbytes = s.size * itemsize[s.key]
            if s.key in kept:
                read = functools.partial(load_fp8, index, s)
            elif as_rows and nbytes >= read_ahead.ROWS_BYTES and not s.transpose and s.out_shape is None:
                read = rows(index, s, dtype)
            else:
                read = functools.partial(load_source, index, s, dtype)
            out.append((s.path, nbytes, read))
    finally:
        index.close()  # headers checked; from here each read opens and closes its own file
    return out


def is_fp8(folder: str | Path) -> bool:
    """Whether an HF folder is an FP8 release (its config.json names a ``quantization_config`` this loader reads)."""
    return quant_method(Path(folder)) is not None


def stream(folder: str | Path, config: Llama4Config, dtype=None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (l4jax path, host array) one parameter at a time; peak memory is about one parameter."""
    for path, _, read in reads(folder, config, dtype):
        yield path, read()


def checkpoint_dtype(folder: str | Path) -> np.dtype:
    """The dtype of the checkpoint's token embedding (bf16 for the released models)."""
    index = SafetensorsIndex(folder)
    prefix, _ = _layout(index)
    return index.read(prefix + "embed_tokens.weight", np.s_[:1]).dtype
