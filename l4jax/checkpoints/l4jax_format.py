"""The l4jax checkpoint format: Orbax, one item per parameter, written and read one tensor at a time.

    <dir>/l4jax.json        {"format": "l4jax-orbax", "version": 1, "dtype": ..., "config": <HF config dict>,
                             "params": [parameter paths, "/"-joined], "checksums": {path: checksum.of_array},
                             "quantized": {weight: {"mode", "contracted", "group"[, "layout"]}} (only when some are)}
    <dir>/params/<path>/    an Orbax PyTree item {"value": array}, readable with ocp.StandardCheckpointer (its array a
                            zarr folder, one file per chunk; an OCDBT database in checkpoints written before
                            2026-11-29, which read the same)
    <dir>/tokenizer*.json   copied from the source model, when present (also generation_ and preprocessor_config)

One Orbax item per tensor (rather than one pytree) is what bounds memory: Orbax 0.12 saves a pytree in one call, so
a whole-model save needs the whole model in host memory. Restoring targets each item's NamedSharding, so every
process reads only its devices' shards; a streamed export reads an item's zarr chunks in blocks of rows with
TensorStore (``stored_rows``), so a large tensor is never whole in memory there either. A checkpoint is written into
a temporary sibling folder and renamed into place at the end (``atomic.atomic_dir``): an interrupted conversion
never leaves a half-written checkpoint at the destination. Each tensor's checksum is written with it and checked as
it is read back (checkpoints written before checksums existed are read without the check).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import itertools
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from .. import tree
from ..model.quant import QArray
from . import checksum, read_ahead
from .atomic import atomic_dir
from .read_ahead import Rows

FORMAT, VERSION = "l4jax-orbax", 1
MANIFEST = "l4jax.json"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
              "preprocessor_config.json")


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    return read_json_manifest(Path(path) / MANIFEST, FORMAT, VERSION, "l4jax")


def read_json_manifest(f: Path, fmt: str, version: int, what: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in ``f`` if it declares ``fmt`` at ``version``; otherwise ``error`` naming the file."""
    try:
        manifest = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{f}: unreadable {what} manifest: {e}") from e
    if manifest.get("format") != fmt or manifest.get("version") != version:
        raise error(f"{f}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this l4jax "
                    f"reads {fmt!r} version {version}")
    return manifest


def save(items: Iterable[tuple[tuple[str, ...], np.ndarray | jax.Array]], out: str | Path, *, config: dict,
         dtype: str, side_files_from: str | Path | None = None,
         progress: Callable[[int], None] | None = None, overwrite: bool = False,
         quantized: dict | None = None) -> Path:
    """Write (path, array) pairs as an l4jax checkpoint at ``out`` (which must not exist yet, unless
    ``overwrite``: then it is replaced once the new checkpoint is complete).

    Arrays may be host numpy arrays (conversion) or global jax arrays spread over several processes
    (``Model.save``): then every process calls this with the same items, writes its own shards, and process 0
    writes the manifest and moves the finished folder into place. ``progress`` gets each tensor's byte count.
    ``quantized``: the manifest's record of quantized weights (``l4jax.model.quant.to_stored``), if any.
    """
    out = Path(out).absolute()
    with atomic_dir(out, overwrite=overwrite, what="checkpoint") as tmp:
        names, sums = [], {}
        with writer() as ckptr:
            for path, array in items:
                name = "/".join(path)
                sums[name], nbytes = write_param(ckptr, tmp, out, name, array)
                names.append(name)
                del array  # not alive while the next tensor is read
                release_freed_memory()
                if progress is not None:
                    progress(nbytes)
        if jax.process_index() == 0:
            write_manifest(tmp, names, sums, config=config, dtype=dtype, side_files_from=side_files_from,
                           quantized=quantized)
    return out


def write_param(ckptr: ocp.Checkpointer, tmp: Path, out: Path, name: str, array) -> tuple[str | dict, int]:
    """One parameter as its Orbax item under ``tmp/params``; returns its checksum and byte count. A quantized weight
    (``QArray``) is two items, <name>/values and <name>/scales: its "checksum" is then {"values", "scales", and how
    it is quantized: QArray.describe()}. A failed write is an OSError naming ``out`` and the
    parameter."""
    if isinstance(array, QArray):
        values, n = write_param(ckptr, tmp, out, f"{name}/values", array.values)
        scales, m = write_param(ckptr, tmp, out, f"{name}/scales", array.scales)
        return {"values": values, "scales": scales, **array.describe()}, n + m
    if isinstance(array, np.ndarray) and array.nbytes >= read_ahead.ROWS_BYTES:  # chunks compressed in parallel
        array = _as_rows(array)
    try:
        if isinstance(array, Rows):
            return _write_rows(ckptr, tmp / "params" / name, array), array.nbytes
        ckptr.save(tmp / "params" / name, args=ocp.args.PyTreeSave({"value": array}))
    except _WriteError as e:
        raise OSError(f"{out}: writing parameter {name!r} failed: {first_line(e.__cause__)}") from e.__cause__
    except Exception as e:  # a full disk or an I/O error, which TensorStore raises in many types
        if isinstance(array, Rows):  # anything else while writing Rows is its reading's (a damaged source tensor)
            raise
        raise OSError(f"{out}: writing parameter {name!r} failed: {first_line(e)}") from e
    return checksum.of_array(array), int(array.nbytes)


def _prefetched(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``blocks``, each next one read on a thread of its own while the caller handles the one before it."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="l4jax-rows") as pool:
        ahead = pool.submit(next, blocks, None)
        while (block := ahead.result()) is not None:
            ahead = pool.submit(next, blocks, None)
            yield block
            del block


class _WriteError(Exception):
    """A failed TensorStore write inside ``_write_rows`` (raised from it), told apart from a failed read."""


def _as_rows(array: np.ndarray) -> Rows:
    step = max(1, read_ahead.BLOCK_BYTES // max(1, array[:1].nbytes))
    return Rows(array.shape, array.dtype, step, lambda: (array[i:i + step] for i in range(0, len(array), step)))


def _write_rows(ckptr: ocp.Checkpointer, item: Path, rows: Rows) -> str:
    """``rows`` as the Orbax item ``item``, written block by block as its blocks are read: returns its checksum.

    Orbax writes the item (its metadata, and a one-element array of the same rank and dtype as a placeholder);
    the array is then created again in its place with the placeholder's zarr settings, its real shape and chunks of
    one block of rows, and each block is written as it comes: the next block is read on a thread while this one is
    check-summed and TensorStore compresses and writes the ones before on its own threads (at most
    ``Rows.IN_FLIGHT`` blocks alive)."""
    if rows.transposed:
        raise ValueError(f"{item}: a transposed Rows is read whole (Rows.read), not written as it is read")
    shape = rows.shape
    try:
        ckptr.save(item, args=ocp.args.PyTreeSave({"value": np.zeros((1,) * len(shape), rows.dtype)}))
        meta = json.loads((item / "value" / ".zarray").read_text())
        meta.update(shape=list(shape), chunks=[rows.block_rows, *shape[1:]])
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(item / "value")},
                         "metadata": meta}, create=True, delete_existing=True).result()
    except Exception as e:
        raise _WriteError() from e
    running, pending, row = checksum.Running(), collections.deque(), 0
    for block in _prefetched(rows.blocks()):
        running.add(block)
        try:
            pending.append(store[row:row + len(block)].write(block))
            while len(pending) > Rows.IN_FLIGHT - 2:  # two being written, one read, one check-summed
                pending.popleft().result()
        except Exception as e:
            raise _WriteError() from e
        row += len(block)
        del block
    try:
        for f in pending:
            f.result()
    except Exception as e:
        raise _WriteError() from e
    if row != shape[0]:
        raise ValueError(f"{item}: {row} rows read of {shape[0]}")
    return running.digest()


def write_manifest(tmp: Path, names: list[str], sums: dict[str, str], *, config: dict, dtype: str,
                   side_files_from: str | Path | None, quantized: dict | None = None) -> None:
    """The side files and, last, ``l4jax.json``: what makes a folder a checkpoint. A quantized weight is stored as
    two items, <name>/values and <name>/scales, and "quantized" says how ({name: ``QArray.describe()``}; absent
    when nothing is)."""
    copy_side_files(side_files_from, tmp)
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "config": config, "params": names,
                "checksums": sums}
    if quantized:
        manifest["quantized"] = quantized
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def copy_side_files(src: str | Path | None, dst: Path) -> None:
    """The tokenizer, generation and preprocessor files (``SIDE_FILES``) of folder ``src`` that exist, into ``dst``."""
    for f in SIDE_FILES if src is not None else ():
        if (Path(src) / f).is_file():
            shutil.copy2(Path(src) / f, dst / f)


def first_line(e: BaseException) -> str:
    """The first line of an error, without TensorStore's spec dump: what a one-line message can carry."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore")[0][:300]


def writer() -> ocp.Checkpointer:
    """A synchronous Orbax writer whose numpy handler does not deep-copy host arrays, without OCDBT.

    Orbax copies host arrays by default so that an async save cannot see them change; this writer finishes each
    save before returning, so the copy would only double the peak memory of every tensor written. Each item's
    array is a plain zarr folder (one file per chunk) rather than an OCDBT database: ``_write_rows`` writes a
    large tensor's chunks into it as they are read. Orbax reads both kinds (checkpoints written with OCDBT before
    2026-11-29 load as they are).
    """
    th = ocp.type_handlers
    registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                               (jax.Array, th.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False))


class _NoMergeWarning(logging.Filter):
    """Orbax warns, for every item written without OCDBT, that it found no OCDBT parts to merge: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMergeWarning())


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Measured on the bench checkpoint: without this, glibc keeps ~0.6 GB of each large tensor's freed buffers in its
    arenas, so resident memory grows by that much per large tensor and the peak is the sum, not the largest one.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reader() -> ocp.Checkpointer:
    """An Orbax reader for ``read_host``."""
    return ocp.PyTreeCheckpointer()


def read_host(ckptr: ocp.Checkpointer, path: Path, name: str, sums: dict[str, str]) -> np.ndarray:
    """One stored parameter as a host numpy array (no device involved), its checksum checked when ``sums`` has
    one: what a streamed export reads."""
    try:
        value = ckptr.restore(path / "params" / name, args=ocp.args.PyTreeRestore(
            restore_args={"value": ocp.RestoreArgs(restore_type=np.ndarray)}))["value"]
    except Exception as e:  # TensorStore reports damage in many types and pages of text: keep one line
        raise ValueError(f"{path}: cannot read parameter {name!r} (missing or damaged): {first_line(e)}") from e
    _check_sum(path, name, value, sums)
    return value


def _check_sum(path: Path, name: str, value, sums: dict[str, str]) -> None:
    if name in sums and checksum.of_array(value) != sums[name]:
        _damaged(path, name)


def _damaged(path: Path, name: str):
    raise ValueError(f"{path}: parameter {name!r} is damaged: its bytes no longer match the checksum written with it")


READS_IN_FLIGHT = Rows.IN_FLIGHT - 1  # blocks being read (decompressed on TensorStore's threads) beside the one used


def stored_rows(path: Path, name: str, sums: dict[str, str]) -> Rows | None:
    """One stored parameter as ``Rows``: blocks of whole chunks of rows (~``read_ahead.BLOCK_BYTES``, or one chunk
    when a chunk is larger), the next ``READS_IN_FLIGHT`` read and decompressed by TensorStore while the caller uses
    the one before, the checksum checked after the last block (a damaged parameter is a ValueError naming it, raised
    in place of the block after the last). None when the item cannot be read so: an OCDBT checkpoint from before
    2026-11-29, or an array chunked across its trailing axes (``Model.save`` of a sharded array): ``read_host``
    reads those whole."""
    value = path / "params" / name / "value"
    if not (value / ".zarray").is_file():
        return None
    try:
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(value)}}, open=True,
                        read=True).result()
    except Exception as e:
        raise ValueError(f"{path}: cannot read parameter {name!r} (missing or damaged): {first_line(e)}") from e
    shape, dtype = tuple(store.shape), np.dtype(store.dtype.numpy_dtype)
    chunk = tuple(store.chunk_layout.read_chunk.shape)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if not shape or chunk[1:] != shape[1:]:
        return None
    step = chunk[0] * max(1, read_ahead.BLOCK_BYTES // max(1, chunk[0] * row_bytes))

    def read(row: int):  # a future of the block from ``row``
        return store[row:min(row + step, shape[0])].read()

    def blocks() -> Iterator[np.ndarray]:
        running, starts = checksum.Running(), iter(range(0, shape[0], step))
        reads = collections.deque(read(r) for r in itertools.islice(starts, READS_IN_FLIGHT))
        while reads:
            try:
                block = reads.popleft().result()
            except Exception as e:
                raise ValueError(f"{path}: cannot read parameter {name!r} (missing or damaged): {first_line(e)}"
                                 ) from e
            reads.extend(read(r) for r in itertools.islice(starts, 1))
            running.add(block)
            yield block
            del block
        if name in sums and running.digest() != sums[name]:
            _damaged(path, name)
    return Rows(shape, dtype, step, blocks)


def restore(path: str | Path, abstract: dict, shardings: dict | None = None, dtype=None,
            ignore: tuple[str, ...] = (), each: Callable | None = None, exact: tuple[str, ...] = ()) -> dict:
    """Read every parameter of ``abstract`` (ShapeDtypeStructs in the stored dtype) onto its sharding, one at a
    time, cast to ``dtype`` when given. Stored parameters under the top-level names in ``ignore`` are left unread
    (a text-only load of a multimodal checkpoint ignores ``vision_model`` and ``projector``). ``each(path, value)``
    replaces each value as it is read (a quantizing load), before the next one is. Parameters under the names in
    ``exact`` are never cast (a quantized weight's values and scales)."""
    path = Path(path).absolute()
    manifest = read_manifest(path)
    names, sums = {n for n in manifest["params"] if n.split("/")[0] not in ignore}, manifest.get("checksums", {})
    want = {"/".join(p): leaf for p, leaf in tree.leaves(abstract)}
    missing, unexpected = sorted(set(want) - names), sorted(names - set(want))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    params: dict = {}
    with ocp.StandardCheckpointer() as ckptr:
        for name, leaf in want.items():
            keys = tuple(name.split("/"))
            sharding = tree.get(shardings, keys) if shardings is not None else jax.sharding.SingleDeviceSharding(
                jax.devices()[0])
            target = {"value": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)}
            try:
                value = ckptr.restore(path / "params" / name, target)["value"]
            except Exception as e:  # TensorStore reports damage in many types and pages of text: keep one line
                raise ValueError(f"{path}: cannot restore parameter {name!r} as {leaf.shape} {leaf.dtype} (missing "
                                 f"or damaged): {first_line(e)}") from e
            _check_sum(path, name, value, sums)
            if dtype is not None and value.dtype != dtype and not name.startswith(exact):
                value = value.astype(dtype)
            tree.put(params, keys, value if each is None or name.startswith(exact) else each(keys, value))
            del value
    return params
