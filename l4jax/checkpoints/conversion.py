"""Conversions that survive being killed: run the same command again and it continues where it stopped.

Both directions: HF safetensors into the l4jax format (``convert``) and an l4jax checkpoint out to an HF folder
(``export``). The partial folder (``.<name>.partial`` beside the destination: ``atomic.partial_dir``) holds what
is written so far and ``l4jax.partial.json``, rewritten (write, then rename) after each tensor:

    {"format": "l4jax-partial", "version": 1, "source": {"folder": ..., "files": {name: [bytes, mtime_ns]}},
     "dtype": ..., "params": [every tensor, in order], "done": {tensor: checksum (import) or bytes (export)},
     "shards": {file: tensors} (export only)}

A rerun whose source files, dtype and tensor list (and shards) are the same continues with the tensors not in
"done": on import the Orbax item of a tensor that was being written, or written but not yet recorded, is removed
and written again; on export each safetensors shard is cut back to its last recorded tensor (each is fsynced
before it is recorded) and continued. A partial folder of anything else is refused with one line saying what it
is from and how far it got (``restart=True``, the CLI's ``--restart``, starts over). At the end the manifest
(``l4jax.json``; an export's index, config and side files) is written, the record removed and the folder renamed
into place: the result is the one an uninterrupted run writes. A folder without ``l4jax.json`` is never an l4jax
checkpoint, and nothing is at the HF destination before the rename, so a partial folder is never mistaken for a
finished one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import Llama4Config
from ..model.quant import contracted_axes, quantize_param
from . import hf_export, l4jax_format, read_ahead, safetensors_file
from .atomic import atomic_dir, partial_dir
from .read_ahead import Read, Rows, default_budget, interleave

PARTIAL = "l4jax.partial.json"
FORMAT, VERSION = "l4jax-partial", 1
# Orbax writes an item into a temporary sibling and renames it when finished; a kill leaves that behind.
ORBAX_TMP = ".orbax-checkpoint-tmp-"


def source_files(folder: str | Path) -> dict:
    """What identifies the source: its folder and every file's size and modification time."""
    folder = Path(folder).absolute()
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()}
    return {"folder": str(folder), "files": files}


def convert(reads: list[Read], out: str | Path, *, source: str | Path, config: dict, dtype: str,
            progress: Callable[[int], None] | None = None, restart: bool = False, budget: int | None = None,
            quantize: str | None = None) -> Path:
    """Write the parameters of ``reads`` (path, bytes, read), in this order, as an l4jax checkpoint at ``out``,
    resumably: a parameter an earlier attempt finished is not read again.

    ``source`` is the folder read (its files identify the conversion; its side files are copied). The next tensors
    are read on a thread while one is written, with at most ``budget`` bytes of tensors in memory at once (default:
    the largest tensor's, plus two blocks when some come as ``Rows``, so the peak stays about that of one tensor at
    a time); a larger budget also reorders the reads so
    that smaller tensors are read while a large one is written (``read_ahead.interleave``). A ``Rows`` read is
    written block by block as it is read (its blocks count against the budget). ``progress`` gets byte counts,
    first those of the parameters an earlier attempt finished."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite a checkpoint")
    names = ["/".join(path) for path, _, _ in reads]
    record = {"format": FORMAT, "version": VERSION, "source": source_files(source), "dtype": dtype,
              "params": names, "done": {}}
    if quantize is not None:
        record["quantize"] = quantize
        reads = [(path, n, _quantizing(read, path, quantize)) for path, n, read in reads]
    planned = dict(zip(names, (n for _, n, _ in reads)))
    tmp = partial_dir(out)
    if restart:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        record["done"] = _resumed(tmp, record, _finished_checkpoint(record))
    with atomic_dir(out, what="checkpoint", keep=True) as tmp:
        done = record["done"]  # parameter -> checksum
        _drop_unrecorded(tmp, names, done)
        _write_record(tmp, record)
        todo = [r for name, r in zip(names, reads) if name not in done]
        if progress is not None and done:
            progress(sum(planned[name] for name in done))
        try:
            budget = budget or default_budget(todo)
            with l4jax_format.writer() as ckptr, read_ahead.read_ahead(interleave(todo, budget), budget) as arrays:
                for path, array in arrays:
                    name = "/".join(path)
                    done[name], _ = l4jax_format.write_param(ckptr, tmp, out, name, array)
                    _write_record(tmp, record)
                    del array  # not alive while the next tensor is read
                    l4jax_format.release_freed_memory()
                    if progress is not None:
                        progress(planned[name])
        except OSError as e:  # a full disk: what is done stays done
            raise OSError(f"{e}; the {len(done)} of {len(names)} tensors written are kept in {tmp}: the same "
                          "command continues from there") from None
        stored, sums, quantized = _stored(names, done)
        l4jax_format.write_manifest(tmp, stored, sums, config=config, dtype=dtype, side_files_from=source,
                                    quantized=quantized)
        (tmp / PARTIAL).unlink(missing_ok=True)
    return out


def _quantizing(read: Callable | Rows, path: tuple[str, ...], mode: str) -> Callable | Rows:
    """``read``, followed by quantization on the host when the parameter is one that gets quantized (whole: its
    scales span the rows)."""
    if contracted_axes(path) is None:
        return read
    whole = read.read if isinstance(read, Rows) else read
    return lambda: quantize_param(path, whole(), mode)


def _stored(names: list[str], done: dict) -> tuple[list[str], dict, dict]:
    """The checkpoint's item names, checksums and quantized-weight record from the finished parameters (a quantized
    one is two items: write_param)."""
    stored, sums, quantized = [], {}, {}
    for n in names:
        if isinstance(done[n], dict):
            q = done[n]
            stored += [f"{n}/values", f"{n}/scales"]
            sums.update({f"{n}/values": q["values"], f"{n}/scales": q["scales"]})
            quantized[n] = {k: v for k, v in q.items() if k not in ("values", "scales")}
        else:
            stored.append(n)
            sums[n] = done[n]
    return stored, sums, quantized


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What an export of the l4jax checkpoint ``src`` writes: every HF tensor (in order) and the shard files."""

    src: Path
    manifest: dict
    config: Llama4Config
    dtype: np.dtype
    tensors: list[hf_export.HFTensor]
    shards: dict[str, list[hf_export.HFTensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def export_plan(src: str | Path, *, dtype=None, shard_size: int = hf_export.SHARD_SIZE) -> ExportPlan:
    """Plan the export of ``src`` from its manifest alone (nothing is read): ``dtype`` casts (default: the stored
    one); a checkpoint whose parameters are not its config's is one line naming them."""
    src = Path(src).absolute()
    manifest = l4jax_format.read_manifest(src)
    if manifest.get("quantized"):
        raise ValueError(f"{src}: its weights are stored quantized; a Hugging Face folder holds the unquantized "
                         "model: export the checkpoint it was quantized from")
    config = Llama4Config.from_hf(manifest["config"])
    dtype = np.dtype(dtype or manifest["dtype"])
    tensors = hf_export.hf_plan(config, lambda path: dtype)
    _check_params(src, manifest["params"], tensors)
    return ExportPlan(src, manifest, config, dtype, tensors, hf_export.shard_plan(tensors, shard_size))


def export(plan: ExportPlan, out: str | Path, *, progress: Callable[[int], None] | None = None,
           restart: bool = False, budget: int | None = None) -> Path:
    """Write the planned l4jax checkpoint as an HF folder at ``out`` (``hf_export``'s layout, its stored
    config.json field for field), streamed from the disk and resumably: nothing is loaded onto a device; a large
    tensor that lies in its parameters' stored rows (the embedding, the experts' stacks) is written block by block
    as its chunks are read and decompressed, any other is assembled from its parameters on a thread while the one
    before it is written (at most ``budget`` bytes of tensors held, default the largest assembled tensor's plus
    the blocks in flight of a streamed one), and a rerun continues after the last tensor recorded.
    ``progress`` gets byte counts, first those of the tensors an earlier attempt finished."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite a Hugging Face export")
    tensors, shards = plan.tensors, plan.shards
    record = {"format": FORMAT, "version": VERSION, "source": source_files(plan.src), "dtype": plan.dtype.name,
              "params": [t.key for t in tensors], "shards": {name: len(ts) for name, ts in shards.items()},
              "done": {}}
    tmp = partial_dir(out)
    if restart:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        record["done"] = _resumed(tmp, record, lambda tmp: _finished_export(tmp, tensors, shards))
    with atomic_dir(out, what="Hugging Face export", keep=True) as tmp:
        done = record["done"]  # HF key -> bytes
        _write_record(tmp, record)
        if progress is not None and done:
            progress(sum(done.values()))
        todo = [t for t in tensors if t.key not in done]
        sums = plan.manifest.get("checksums", {})
        with l4jax_format.reader() as ckptr:
            def stored(path):  # Rows, or None when the parameter cannot be read in blocks
                return l4jax_format.stored_rows(plan.src, "/".join(path), sums)

            def get(path):
                rows = stored(path)
                return rows if rows is not None else l4jax_format.read_host(ckptr, plan.src, "/".join(path), sums)

            reads = [(t.key, t.nbytes, _export_read(t, get, stored)) for t in todo]
            with read_ahead.read_ahead(reads, budget or default_budget(reads)) as arrays:
                for name, ts in shards.items():
                    _write_shard(tmp / name, ts, arrays, record, tmp, progress)
        hf_export.write_index(tmp, shards)
        hf_export.write_side_files(tmp, plan.config, plan.manifest["config"], plan.src)
        (tmp / PARTIAL).unlink()
    return out


def _export_read(t: hf_export.HFTensor, get: Callable, stored: Callable) -> Callable[[], np.ndarray] | Rows:
    """How one HF tensor is read: a large one that lies in its parameters' rows as they are stored (the embedding,
    the experts' stacks) as ``Rows``, written as its blocks are read; any other is assembled whole by ``get`` (a
    part that comes in blocks placed as its blocks are read: the LM head's transpose overlaps its reading)."""
    if t.nbytes >= read_ahead.ROWS_BYTES:
        rows = t.rows([stored(s.path) for s in t.parts])
        if rows is not None:
            return rows
    return functools.partial(t.assemble, get)


def _check_params(src: Path, stored: list[str], tensors: list[hf_export.HFTensor]) -> None:
    """The checkpoint holds exactly the parameters the HF tensors are made of: else one line naming them."""
    wanted = {"/".join(s.path) for t in tensors for s in t.parts}
    missing, unexpected = sorted(wanted - set(stored)), sorted(set(stored) - wanted)
    if missing or unexpected:
        raise ValueError(f"{src}: the checkpoint does not match its config: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}")


def _write_shard(path: Path, ts: list[hf_export.HFTensor], arrays, record: dict, tmp: Path,
                 progress: Callable[[int], None] | None) -> None:
    """One safetensors shard, continued after its recorded tensors (always a prefix: tensors go in order)."""
    done = record["done"]
    start = next((i for i, t in enumerate(ts) if t.key not in done), len(ts))
    if start == len(ts):
        return

    def written(key: str, nbytes: int) -> None:
        done[key] = nbytes
        _write_record(tmp, record)
        if progress is not None:
            progress(nbytes)

    def own():  # this shard's arrays, in order, dropping each reference once it is written
        for _ in ts[start:]:
            _, array = next(arrays)
            yield array
            del array

    try:
        safetensors_file.write(path, [(t.key, t.shape, t.dtype) for t in ts], own(), {"format": "pt"}, start=start,
                               on_written=written)
    except OSError as e:  # a full disk: what is done stays done
        raise OSError(f"{path.parent}: writing {path.name} failed: {l4jax_format.first_line(e)}; the {len(done)} "
                      f"of {len(record['params'])} tensors written are kept there: the same command continues from "
                      "there") from None


def _finished_export(tmp: Path, tensors: list[hf_export.HFTensor], shards: dict) -> dict | None:
    """Every tensor, when ``tmp`` is a complete export killed before its rename. Without a record, shard files mean
    that: the record is written before any shard and removed only once everything else is."""
    if all((tmp / name).is_file() for name in shards):
        return {t.key: t.nbytes for t in tensors}
    return None


def _resumed(tmp: Path, record: dict, finished: Callable[[Path], dict | None]) -> dict:
    """The finished tensors of the partial folder ``tmp`` when it is this conversion's; else an error. Without a
    record, ``finished(tmp)`` says whether it is complete (killed between the record's removal and the final
    rename); otherwise it is started over (another writer's leftover, or killed before the first tensor)."""
    f = tmp / PARTIAL
    if not f.is_file():
        done = finished(tmp)
        if done is not None:
            return done
        shutil.rmtree(tmp)
        return {}
    prev = l4jax_format.read_json_manifest(f, FORMAT, VERSION, "partial conversion")
    changed = [k for k in record if k != "done" and prev.get(k) != record[k]]
    if not changed:
        return prev["done"]
    raise ValueError(f"{tmp}: a partial conversion of {prev['source']['folder']} to {prev['dtype']} "
                     f"({len(prev['done'])} of {len(prev['params'])} tensors written); its {', '.join(changed)} "
                     "differ from this command's: rerun with --restart to start over")


def _finished_checkpoint(record: dict) -> Callable[[Path], dict | None]:
    def finished(tmp: Path) -> dict | None:
        if not l4jax_format.is_checkpoint(tmp):
            return None
        manifest = l4jax_format.read_manifest(tmp)
        sums, quantized = manifest["checksums"], manifest.get("quantized", {})
        done = {n: {"values": sums.get(f"{n}/values"), "scales": sums.get(f"{n}/scales"), **quantized[n]}
                if n in quantized else sums.get(n) for n in record["params"]}
        if manifest["dtype"] == record["dtype"] and _stored(record["params"], done)[0] == manifest["params"]:
            return done
        return None
    return finished


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
