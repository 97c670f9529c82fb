"""A conversion into the l4jax format that survives being killed: run the same command again and it continues.

The partial folder (``.<name>.partial`` beside the destination: ``atomic.partial_dir``) holds the tensors written
so far and ``l4jax.partial.json``, rewritten (write, then rename) after each tensor:

    {"format": "l4jax-partial", "version": 1, "source": {"folder": ..., "files": {name: [bytes, mtime_ns]}},
     "dtype": ..., "params": [every parameter, in order], "done": {parameter: checksum}}

A rerun whose source files, dtype and parameter list are the same continues with the parameters not in "done"
(the Orbax item of a tensor that was being written, or written but not yet recorded, is removed and written
again); a partial folder of anything else is refused with one line saying what it is from and how far it got
(``restart=True``, the CLI's ``--restart``, starts over). At the end ``l4jax.json`` is written, the record removed
and the folder renamed into place: the checkpoint is the one an uninterrupted run writes. A folder without
``l4jax.json`` is never a checkpoint, so a partial one is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import l4jax_format
from .atomic import atomic_dir, partial_dir

PARTIAL = "l4jax.partial.json"
FORMAT, VERSION = "l4jax-partial", 1
# Orbax writes an item into a temporary sibling and renames it when finished; a kill leaves that behind.
ORBAX_TMP = ".orbax-checkpoint-tmp-"


def source_files(folder: str | Path) -> dict:
    """What identifies the source: its folder and every file's size and modification time."""
    folder = Path(folder).absolute()
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()}
    return {"folder": str(folder), "files": files}


Read = tuple[tuple[str, ...], int, Callable[[], np.ndarray]]  # (path, bytes, read()): hf_import.reads


def convert(reads: list[Read], out: str | Path, *, source: str | Path, config: dict, dtype: str,
            progress: Callable[[int], None] | None = None, restart: bool = False, budget: int | None = None) -> Path:
    """Write the parameters of ``reads`` (path, bytes, read), in this order, as an l4jax checkpoint at ``out``,
    resumably: a parameter an earlier attempt finished is not read again.

    ``source`` is the folder read (its files identify the conversion; its side files are copied). The next tensors
    are read on a thread while one is written, with at most ``budget`` bytes of tensors in memory at once (default:
    the largest tensor's, so the peak stays that of one tensor at a time). ``progress`` gets byte counts, first
    those of the parameters an earlier attempt finished."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite a checkpoint")
    names = ["/".join(path) for path, _, _ in reads]
    record = {"format": FORMAT, "version": VERSION, "source": source_files(source), "dtype": dtype,
              "params": names, "done": {}}
    tmp = partial_dir(out)
    if restart:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        record["done"] = _resumed(tmp, record)
    with atomic_dir(out, what="checkpoint", keep=True) as tmp:
        done = record["done"]  # parameter -> checksum
        _drop_unrecorded(tmp, names, done)
        _write_record(tmp, record)
        todo = [r for name, r in zip(names, reads) if name not in done]
        if progress is not None and done:
            progress(sum(nbytes for name, (_, nbytes, _) in zip(names, reads) if name in done))
        try:
            budget = budget or max((n for _, n, _ in todo), default=0)
            with l4jax_format.writer() as ckptr, _read_ahead(todo, budget) as arrays:
                for path, array in arrays:
                    name = "/".join(path)
                    done[name], nbytes = l4jax_format.write_param(ckptr, tmp, out, name, array)
                    _write_record(tmp, record)
                    del array  # not alive while the next tensor is read
                    l4jax_format.release_freed_memory()
                    if progress is not None:
                        progress(nbytes)
        except OSError as e:  # a full disk: what is done stays done
            raise OSError(f"{e}; the {len(done)} of {len(names)} tensors written are kept in {tmp}: the same "
                          "command continues from there") from None
        l4jax_format.write_manifest(tmp, names, {n: done[n] for n in names}, config=config, dtype=dtype,
                                    side_files_from=source)
        (tmp / PARTIAL).unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _read_ahead(todo: list[Read], budget: int) -> Iterator[Iterator[tuple[tuple[str, ...], np.ndarray]]]:
    """(path, array) of ``todo`` in order, each read on a thread while the caller writes the ones before it (reads,
    transposes and TensorStore's writes release the GIL). A tensor is read only when the bytes of those read and not
    yet released, plus its own, fit in ``budget`` (or when none are held). One is released when the caller asks
    for the next, after dropping its own reference."""
    cond, held, stop, ready = threading.Condition(), [0], threading.Event(), queue.Queue()

    def produce():
        for path, nbytes, read in todo:
            with cond:
                cond.wait_for(lambda: stop.is_set() or held[0] == 0 or held[0] + nbytes <= budget)
                if stop.is_set():
                    return
                held[0] += nbytes
            try:
                ready.put((path, nbytes, read()))
            except BaseException as e:  # a damaged tensor: raised in order, where the caller reads it
                ready.put(e)
                return

    def consume():
        for _ in todo:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            path, nbytes, array = item
            del item
            yield path, array
            del array  # the caller has written it and dropped its own reference
            with cond:
                held[0] -= nbytes
                cond.notify()

    thread = threading.Thread(target=produce, name="l4jax-read-ahead", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        with cond:
            stop.set()
            cond.notify()
        thread.join()


def _resumed(tmp: Path, record: dict) -> dict:
    """The finished parameters of the partial folder ``tmp`` when it is this conversion's; else an error (or, for a
    folder with no record, nothing: it is started over)."""
    f = tmp / PARTIAL
    if not f.is_file():
        if l4jax_format.is_checkpoint(tmp):  # killed between the record's removal and the final rename
            manifest = l4jax_format.read_manifest(tmp)
            if manifest["params"] == record["params"] and manifest["dtype"] == record["dtype"]:
                return {n: manifest["checksums"][n] for n in record["params"]}
        shutil.rmtree(tmp)  # nothing recorded: another writer's leftover, or killed before the first tensor
        return {}
    prev = l4jax_format.read_json_manifest(f, FORMAT, VERSION, "partial conversion")
    changed = [k for k in ("source", "dtype", "params") if prev.get(k) != record[k]]
    if not changed:
        return prev["done"]
    raise ValueError(f"{tmp}: a partial conversion of {prev['source']['folder']} to {prev['dtype']} "
                     f"({len(prev['done'])} of {len(prev['params'])} tensors written); its {', '.join(changed)} "
                     "differ from this command's: rerun with --restart to start over")


def _drop_unrecorded(tmp: Path, names: list[str], done: dict) -> None:
    """Remove Orbax items that are not recorded as finished, and Orbax's own unfinished temporaries."""
    params = tmp / "params"
    if not params.is_dir():
        return
    for name in names:
        if name not in done and (params / name).exists():
            shutil.rmtree(params / name)
    for leftover in [p for p in params.rglob(f"*{ORBAX_TMP}*") if p.is_dir()]:
        shutil.rmtree(leftover, ignore_errors=True)


def _write_record(tmp: Path, record: dict) -> None:
    f = tmp / PARTIAL
    f.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    os.replace(f.with_suffix(".tmp"), f)
