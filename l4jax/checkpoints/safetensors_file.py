"""A safetensors file written one tensor at a time: the header first (every name, dtype, shape and offset is known
from the shapes alone), then each tensor's bytes as it arrives, so host memory holds one tensor, not the file.

The ``safetensors`` library writes a file from a dict of every tensor in memory (``save_file``); its format is
small and fixed, so this writes the same layout: an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces to a multiple
of 8 bytes, then the tensors' C-order bytes back to back. Files are read back with ``safetensors`` itself.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from .read_ahead import Rows

DTYPES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
          np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
          np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32",
          np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
          np.dtype(np.uint64): "U64", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
          np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2"}
NUMPY = {name: dtype for dtype, name in DTYPES.items()}  # safetensors' dtype names -> numpy


def header(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding ``entries`` (name, shape, dtype) in this order."""
    table, offset = {}, 0
    for name, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * dtype.itemsize
        table[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        table = {"__metadata__": metadata, **table}
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write(path: str | Path, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
          arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None, *, start: int = 0,
          on_written: Callable[[str, int], None] | None = None) -> int:
    """Write ``arrays`` (one per entry from ``start`` on, in order, e.g. a generator making each on demand) to
    ``path``; returns the bytes written. Each array must have its entry's shape and dtype.

    An array may come as ``Rows`` (``read_ahead``): its blocks are written as they are read, never whole in memory.
    ``start > 0`` continues a file whose first ``start`` tensors are already written (a resumed export): whatever
    follows them is cut off and the rest written after. With ``on_written``, each tensor is flushed to the disk
    (fsync) before ``on_written(name, bytes)`` is called: a record kept there survives a killed process or node."""
    head = header(entries, metadata)
    offset = len(head) + sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in entries[:start])
    n = 0
    with open(path, "r+b" if start else "wb") as f:
        if start:
            f.truncate(offset)
            f.seek(offset)
        else:
            f.write(head)
        for (name, shape, dtype), array in zip(entries[start:], arrays, strict=True):
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, the header says "
                                 f"{np.dtype(dtype)}{list(shape)}")
            if isinstance(array, Rows):
                _write_rows(f, name, array)
            else:
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            n += array.nbytes
            if on_written is not None:
                f.flush()
                os.fsync(f.fileno())
                on_written(name, array.nbytes)
            del array  # not alive while the next one is made
        f.flush()
    return n


def _write_rows(f, name: str, rows: Rows) -> None:
    """A tensor given as ``Rows``, its blocks written as they come."""
    n = 0
    for block in rows.blocks():
        if tuple(block.shape[1:]) != tuple(rows.shape[1:]) or block.dtype != rows.dtype:
            raise ValueError(f"{name}: a block of {block.dtype}{list(block.shape)}, the header says "
                             f"{rows.dtype}{list(rows.shape)}")
        f.write(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data)
        n += len(block)
        del block
    if n != rows.shape[0]:
        raise ValueError(f"{name}: {n} rows written of {rows.shape[0]}")


def read_rows(path: str | Path, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop (along the first axis) of tensor ``name``, read straight from the file's bytes into a fresh
    array: for dtypes the ``safetensors`` library cannot hand to numpy (FP8: ``F8_E4M3``, ``F8_E5M2``), and for
    whole rows of any tensor (one ``read`` into the array: no memory map faulted in page by page, no second
    copy). A file shorter than its header says is a ValueError."""
    with open(path, "rb", buffering=0) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[name]
        dtype = NUMPY[entry["dtype"]]
        shape = entry["shape"]
        row = math.prod(shape[1:]) * dtype.itemsize
        f.seek(8 + n + entry["data_offsets"][0] + start * row)
        out = np.empty([stop - start] + shape[1:], dtype)
        view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < out.nbytes:
            k = f.readinto(view[got:])  # the kernel hands over at most ~2 GB per call
            if not k:
                raise ValueError(f"the file ends {got} bytes into the {out.nbytes} of rows {start}:{stop}")
            got += k
    return out
