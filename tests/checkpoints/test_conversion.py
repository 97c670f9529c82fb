"""A killed conversion continues where it stopped when the same command runs again, and ends with the checkpoint
an uninterrupted run writes; a partial folder of another conversion is refused in one line; --restart starts over."""

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import l4jax
from l4jax.checkpoints import atomic, conversion, hf_export, hf_import, l4jax_format, read_ahead, safetensors_file
from l4jax.cli import main
from tiny import hf_model, save, traced_peak, writer_with

N = 47  # parameters of the tiny Maverick-like model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save(hf_model("maverick", seed=7), root / "hf")
    assert main(["convert", "--from-hf", str(root / "hf"), "--to", str(root / "whole")]) == 0
    return root


def same_checkpoint(a: Path, b: Path) -> None:
    """Equal manifests (parameters in order, checksums, dtype, config) and bit-equal tensors."""
    ma, mb = l4jax_format.read_manifest(a), l4jax_format.read_manifest(b)
    assert ma == mb
    pa, pb = l4jax.load(a).params, l4jax.load(b).params
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing is cleaned up."""


def killing_writer(after: int, monkeypatch):
    """A writer that finishes ``after`` tensors, then writes the next one's Orbax item and dies before it is
    recorded (the worst moment), leaving an Orbax temporary behind as a kill inside a save would."""
    def save_then_die(n, path, save):
        save()
        if n == after + 1:
            Path(f"{path}.orbax-checkpoint-tmp-123").mkdir()
            raise Killed
    monkeypatch.setattr(l4jax_format, "writer", writer_with(save_then_die))


def dying_at_rename(monkeypatch) -> None:
    """Dies at the final rename of a partial folder into place (every other rename goes through)."""
    real = os.replace

    def die_at_rename(src, dst):
        if str(src).endswith(".partial"):
            raise Killed
        real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", die_at_rename)


def reads(monkeypatch) -> list:
    """Records every tensor read from the HF files."""
    seen, real = [], hf_import.load_source
    monkeypatch.setattr(hf_import, "load_source", lambda index, s, dtype=None: seen.append(s.path) or real(
        index, s, dtype))
    return seen


@pytest.mark.parametrize("after", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow),
                                   28, pytest.param(N - 1, marks=pytest.mark.slow)])  # none, one, 60%, all but the last
def test_a_killed_conversion_continues_and_ends_as_an_uninterrupted_one(hf, tmp_path, monkeypatch, after):
    out = tmp_path / "out"
    killing_writer(after, monkeypatch)
    with pytest.raises(Killed):
        main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)])
    partial = atomic.partial_dir(out)
    assert not out.exists() and not l4jax_format.is_checkpoint(partial)  # never mistaken for a checkpoint
    record = json.loads((partial / conversion.PARTIAL).read_text())
    assert record["source"]["folder"] == str(hf / "hf") and len(record["done"]) == after
    assert len(record["params"]) == N
    monkeypatch.undo()
    seen = reads(monkeypatch)
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)]) == 0
    assert len(seen) == N - after  # finished tensors are not read again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / conversion.PARTIAL).exists() and not list(out.rglob("*orbax-checkpoint-tmp*"))
    same_checkpoint(out, hf / "whole")


@pytest.mark.parametrize("where", [pytest.param("after the manifest", marks=pytest.mark.slow), "at the final rename"])
def test_killed_at_the_end(hf, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    if where == "after the manifest":
        real = l4jax_format.write_manifest

        def write_then_die(*a, **k):
            real(*a, **k)
            raise Killed
        monkeypatch.setattr(l4jax_format, "write_manifest", write_then_die)
    else:
        dying_at_rename(monkeypatch)
    with pytest.raises(Killed):
        main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)])
    monkeypatch.undo()
    seen = reads(monkeypatch)
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)]) == 0
    assert seen == []
    same_checkpoint(out, hf / "whole")


def test_a_partial_folder_of_another_conversion_is_refused_then_restarted(hf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    killing_writer(5, monkeypatch)
    with pytest.raises(Killed):
        main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out), "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"l4jax: {atomic.partial_dir(out)}: a partial conversion of {hf / 'hf'} to float32 (5 of {N} "
                   "tensors written); its dtype differ from this command's: rerun with --restart to start over"), err
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out), "--dtype", "bf16", "--restart"]) == 0
    assert l4jax_format.read_manifest(out)["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_larger_read_ahead_writes_the_same_checkpoint(hf, tmp_path, capsys):
    args = ["convert", "--from-hf", str(hf / "hf"), "--to", str(tmp_path / "out"), "--read-ahead-gb"]
    assert main(args + ["0"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == "l4jax: --read-ahead-gb: must be a positive number of GB, got 0.0"
    assert main(args + ["1"]) == 0  # every tensor of the tiny model may be in memory at once
    same_checkpoint(tmp_path / "out", hf / "whole")


def test_the_progress_bar_counts_every_byte_also_when_resumed(hf, tmp_path, monkeypatch, capsys):
    killing_writer(20, monkeypatch)
    with pytest.raises(Killed):
        main(["convert", "--from-hf", str(hf / "hf"), "--to", str(tmp_path / "out")])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(tmp_path / "out")]) == 0
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    expected = sum(int(np.prod(s.read_shape)) * 4 for s in hf_import.plan(hf_import.SafetensorsIndex(hf / "hf"),
                                                                              l4jax.load_config(hf / "hf")))
    assert "100%" in last and f"{expected / 1e3:.0f}k/{expected / 1e3:.0f}k" in last, last


def small_rows(monkeypatch) -> list:
    """Tensors of 2 kB or more written in chunks of ~700 bytes of rows, and read as ``Rows`` (block by block, as
    they are written) when they need no transpose, as a 128 MB tensor is; returns the paths of those read so."""
    monkeypatch.setattr(read_ahead, "ROWS_BYTES", 2000)
    monkeypatch.setattr(read_ahead, "BLOCK_BYTES", 700)
    streamed, real = [], hf_import.reads

    class NeverWhole(read_ahead.Rows):
        def read(self):
            pytest.fail("a tensor read as Rows was read whole")

    def reads(*a, **k):
        out = real(*a, **k)
        streamed.extend(path for path, _, r in out if isinstance(r, read_ahead.Rows))
        return [(path, n, NeverWhole(*dataclasses.astuple(r)) if isinstance(r, read_ahead.Rows) else r)
                for path, n, r in out]
    monkeypatch.setattr(hf_import, "reads", reads)
    return streamed


def test_tensors_written_as_they_are_read_give_the_same_checkpoint(hf, tmp_path, monkeypatch):
    """Large tensors in blocks of rows: the embedding and the experts as they are read, the LM head and a q
    projection (transposed, reshaped) from their whole arrays. Bit for bit the checkpoint written tensor by tensor,
    with the same checksums."""
    streamed = small_rows(monkeypatch)
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)]) == 0
    assert {("embed",), ("layers_1", "moe", "gate"), ("layers_1", "moe", "down")} <= set(streamed)
    assert not {("lm_head",), ("layers_0", "attn", "q"), ("layers_0", "mlp", "down")} & set(streamed)
    for name in ("embed", "lm_head", "layers_1/moe/down", "layers_0/attn/q"):
        meta = json.loads((out / "params" / name / "value" / ".zarray").read_text())
        chunks = -(-meta["shape"][0] // meta["chunks"][0])
        assert chunks > 1 and len(list((out / "params" / name / "value").glob("[0-9]*"))) == chunks, name
    same_checkpoint(out, hf / "whole")


def test_killed_while_a_tensor_is_written_in_rows(hf, tmp_path, monkeypatch):
    """Killed half-way through the embedding's blocks (its Orbax item already there, some chunks written), then
    the same command: the half-written item is written again and the result is the uninterrupted one's."""
    small_rows(monkeypatch)
    real = hf_import._blocks

    def dies_in_the_embedding(index, s, *a):
        for n, item in enumerate(real(index, s, *a)):
            if s.path == ("embed",) and n == 3:
                raise Killed
            yield item
    monkeypatch.setattr(hf_import, "_blocks", dies_in_the_embedding)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)])
    partial = atomic.partial_dir(out)
    assert len(list((partial / "params" / "embed" / "value").glob("[0-9]*"))) >= 1
    assert "embed" not in json.loads((partial / conversion.PARTIAL).read_text())["done"]
    monkeypatch.setattr(hf_import, "_blocks", real)
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)]) == 0
    same_checkpoint(out, hf / "whole")


def test_a_disk_that_fills_while_a_tensor_is_written_in_rows(hf, tmp_path, monkeypatch, capsys):
    """ENOSPC on the embedding's third block (TensorStore raises it as a ValueError): exit 2 and one line naming the
    folder, the parameter and the disk, as for a whole tensor; the same command then finishes the checkpoint."""
    small_rows(monkeypatch)
    real = l4jax_format.ts.open

    class Full:
        def __init__(self, store):
            self.store, self.writes = store, 0

        def __getitem__(self, box):
            self.writes += 1
            if self.writes == 3:
                raise ValueError("OUT_OF_RANGE: Error writing local file: [OS error 28: No space left on device]")
            return self.store[box]

    def opened(spec, **kw):
        future = real(spec, **kw)
        return type("Done", (), {"result": lambda self: Full(future.result())})()
    monkeypatch.setattr(l4jax_format, "ts", types.SimpleNamespace(open=opened))  # Orbax keeps the real one
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"l4jax: {out}: writing parameter 'embed' failed: OUT_OF_RANGE") and \
        "No space left on device" in line and line.endswith("the same command continues from there"), line
    monkeypatch.undo()
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(out)]) == 0
    same_checkpoint(out, hf / "whole")


def test_a_damaged_row_of_a_tensor_read_in_rows_is_named(hf, tmp_path, monkeypatch, capsys):
    """A NaN in a later block of a tensor read as Rows: exit 2, the file, tensor and row named, as whole reads do;
    what was written before it is kept for the same command."""
    small_rows(monkeypatch)
    src = tmp_path / "hf"
    shutil.copytree(hf / "hf", src)
    f = next(src.glob("*.safetensors"))
    key = "model.embed_tokens.weight"
    with safe_open(str(f), framework="numpy") as h:
        shape = h.get_slice(key).get_shape()
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start = json.loads(data[8:header])[key]["data_offsets"][0]
    row = 7
    at = header + start + 4 * (row * shape[1] + 3)
    data[at:at + 4] = np.array([np.nan], np.float32).tobytes()
    f.write_bytes(bytes(data))
    assert main(["convert", "--from-hf", str(src), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"l4jax: {f}: tensor '{key}' holds NaN or infinite values (first in row {row}); the checkpoint is "
                   "damaged"), err


@pytest.mark.slow
def test_kill_9_at_60_percent_then_the_same_command(hf, tmp_path):
    """A real SIGKILL of `l4jax convert` once 60% of the tensors are recorded, then the same command."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "l4jax.cli", "convert", "--from-hf", str(hf / "hf"), "--to", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = atomic.partial_dir(out) / conversion.PARTIAL
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(record.read_text())["done"]) >= 28:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(json.loads(record.read_text())["done"])
    assert 28 <= done < N
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    same_checkpoint(out, hf / "whole")


# Export (l4jax -> HF): streamed from the disk, resumable the same way.

def hf_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exported(hf):
    """The uninterrupted export of the converted checkpoint, in shards of ~60 kB (several files and an index)."""
    assert main(["convert", "--from-l4jax", str(hf / "whole"), "--to-hf", str(hf / "back"), "--shard-size",
                 "0.00006"]) == 0
    return hf / "back"


def test_the_streamed_export_gives_back_the_hf_tensors(hf, exported):
    ref, back = hf_tensors(hf / "hf"), hf_tensors(exported)
    assert sorted(ref) == sorted(back) and all(ref[k].tobytes() == back[k].tobytes() for k in ref)
    assert len(list(exported.glob("*.safetensors"))) > 3 and (exported / "model.safetensors.index.json").is_file()


def dying_record(after: int, monkeypatch):
    """Dies once tensor ``after + 1`` is written and fsynced but before it is recorded (the first record is the
    empty one written at the start)."""
    real, calls = conversion._write_record, [0]

    def record_or_die(tmp, record):
        calls[0] += 1
        if calls[0] == after + 2:
            raise Killed
        real(tmp, record)
    monkeypatch.setattr(conversion, "_write_record", record_or_die)


def assembled(monkeypatch) -> list:
    seen, real = [], hf_export.HFTensor.assemble
    monkeypatch.setattr(hf_export.HFTensor, "assemble", lambda self, get: seen.append(self.key) or real(self, get))
    return seen


@pytest.mark.parametrize("after", [0, pytest.param(1, marks=pytest.mark.slow), 27,
                                   pytest.param(44, marks=pytest.mark.slow)])  # none, one, 60%, all but the last
def test_a_killed_export_continues_and_ends_as_an_uninterrupted_one(hf, exported, tmp_path, monkeypatch, after):
    out, args = tmp_path / "out", ["convert", "--from-l4jax", str(hf / "whole"), "--shard-size", "0.00006"]
    total = len(hf_tensors(exported))
    assert total == 45
    dying_record(after, monkeypatch)
    with pytest.raises(Killed):
        main(args + ["--to-hf", str(out)])
    partial = atomic.partial_dir(out)
    assert not out.exists() and len(json.loads((partial / conversion.PARTIAL).read_text())["done"]) == after
    monkeypatch.undo()
    seen = assembled(monkeypatch)
    assert main(args + ["--to-hf", str(out)]) == 0
    assert len(seen) == total - after  # tensors on the disk are not made again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert files(out) == files(exported)  # byte for byte, every file


def test_an_export_killed_at_the_final_rename_only_renames(hf, exported, tmp_path, monkeypatch):
    out = tmp_path / "out"
    dying_at_rename(monkeypatch)
    args = ["convert", "--from-l4jax", str(hf / "whole"), "--to-hf", str(out), "--shard-size", "0.00006"]
    with pytest.raises(Killed):
        main(args)
    monkeypatch.undo()
    seen = assembled(monkeypatch)
    assert main(args) == 0
    assert seen == [] and files(out) == files(exported)


def test_an_export_partial_folder_of_another_dtype_is_refused_then_restarted(hf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    dying_record(3, monkeypatch)
    with pytest.raises(Killed):
        main(["convert", "--from-l4jax", str(hf / "whole"), "--to-hf", str(out)])
    monkeypatch.undo()
    capsys.readouterr()
    args = ["convert", "--from-l4jax", str(hf / "whole"), "--to-hf", str(out), "--dtype", "bf16"]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"l4jax: {atomic.partial_dir(out)}: a partial conversion of {hf / 'whole'} to float32 "
                          "(3 of ") and err.endswith("its dtype differ from this command's: rerun with --restart "
                                                     "to start over"), err
    assert main(args + ["--restart"]) == 0
    ref, back = hf_tensors(hf / "hf"), hf_tensors(out)
    assert {str(v.dtype) for v in back.values()} == {"bfloat16"}
    assert all(np.array_equal(ref[k].astype(ml_dtypes.bfloat16), back[k]) for k in ref)


def test_the_streamed_export_holds_one_tensor_at_a_time(tmp_path):
    """Traced allocations while exporting into one file, with experts large enough that tensors dominate Orbax's own
    small objects: the tensor being written, one read ahead within the budget (default: the largest) and the
    parameter being placed, never the whole model."""
    save(hf_model("maverick", seed=3, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024),
         tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "l4")]) == 0
    plan = conversion.export_plan(tmp_path / "l4", shard_size=10**12)
    sizes = [t.nbytes for t in plan.tensors]
    assert sum(sizes) > 4 * max(sizes) > 10**7
    peak = traced_peak(lambda: conversion.export(plan, tmp_path / "m"))
    assert peak < 2 * max(sizes) + 2**20, (peak, max(sizes), sum(sizes))
    ref, got = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "m")
    assert sorted(ref) == sorted(got) and all(ref[k].tobytes() == got[k].tobytes() for k in ref)


def test_a_damaged_checkpoint_is_named_and_its_export_left_resumable(hf, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf / "whole", src)
    manifest = json.loads((src / "l4jax.json").read_text())
    manifest["checksums"]["layers_1/attn/q"] = "0" * len(manifest["checksums"]["layers_1/attn/q"])
    (src / "l4jax.json").write_text(json.dumps(manifest))
    assert main(["convert", "--from-l4jax", str(src), "--to-hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"l4jax: {src}: parameter 'layers_1/attn/q' is damaged: its bytes no longer match the checksum "
                   "written with it"), err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_an_export_is_one_line_and_the_same_command_continues(hf, exported, tmp_path,
                                                                                monkeypatch, capsys):
    real, calls = os.fsync, [0]

    def fsync_until_full(fd):
        calls[0] += 1
        if calls[0] == 6:
            raise OSError(28, "No space left on device")
        real(fd)
    monkeypatch.setattr(safetensors_file.os, "fsync", fsync_until_full)
    args = ["convert", "--from-l4jax", str(hf / "whole"), "--to-hf", str(tmp_path / "out"), "--shard-size", "0.00006"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    partial = atomic.partial_dir(tmp_path / "out")
    assert err.startswith(f"l4jax: {partial}: writing model-00004-of-00015.safetensors ") and err.endswith(
        "failed: [Errno 28] No space left on device; the 5 of 45 tensors written are kept there: the same command "
        "continues from there"), err
    monkeypatch.undo()
    seen = assembled(monkeypatch)
    assert main(args) == 0 and len(seen) == 40 and files(tmp_path / "out") == files(exported)


def in_blocks(hf: Path, tmp_path: Path, monkeypatch) -> tuple[Path, dict, set]:
    """A checkpoint written in chunks of ~700 bytes of rows (``small_rows``), and the export set to read tensors
    of 2 kB or more in blocks: returns the checkpoint, the blocks read of each parameter (filled as the export
    runs) and the HF tensors written as their blocks were read."""
    small_rows(monkeypatch)
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(tmp_path / "l4")]) == 0
    counts, streamed = {}, set()
    real_rows, real_stream = l4jax_format.stored_rows, hf_export.HFTensor.rows

    def counted(path, name, sums):
        r = real_rows(path, name, sums)

        def blocks():
            for block in r.blocks():
                counts[name] = counts.get(name, 0) + 1
                yield block
        return None if r is None else dataclasses.replace(r, blocks=blocks)

    def rows(self, stored):
        out = real_stream(self, stored)
        if out is not None:
            streamed.add(self.key)
        return out
    monkeypatch.setattr(l4jax_format, "stored_rows", counted)
    monkeypatch.setattr(hf_export.HFTensor, "rows", rows)
    return tmp_path / "l4", counts, streamed


def test_an_export_in_blocks_writes_the_files_of_a_whole_one(hf, exported, tmp_path, monkeypatch):
    """The embedding and the experts' stacks (gate and up fused back into one tensor block by block) written as
    their blocks are read, the LM head and the projections transposed into place block by block: byte for byte
    the files of the export that reads every parameter whole."""
    src, counts, streamed = in_blocks(hf, tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert main(["convert", "--from-l4jax", str(src), "--to-hf", str(out), "--shard-size", "0.00006"]) == 0
    assert {"model.embed_tokens.weight", "model.layers.1.feed_forward.experts.gate_up_proj",
            "model.layers.1.feed_forward.experts.down_proj"} <= streamed
    assert not {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} & streamed
    assert counts["embed"] > 3 and counts["lm_head"] > 3 and counts["layers_1/moe/gate"] > 1
    assert files(out) == files(exported)
    streamed.clear()  # cast as they stream: the blocks of every part go through one bf16 block
    assert main(["convert", "--from-l4jax", str(src), "--to-hf", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    ref, back = hf_tensors(hf / "hf"), hf_tensors(tmp_path / "bf16")
    assert "model.embed_tokens.weight" in streamed and sorted(ref) == sorted(back)
    assert all(back[k].dtype == ml_dtypes.bfloat16 and np.array_equal(ref[k].astype(ml_dtypes.bfloat16), back[k])
               for k in ref)


def test_an_export_killed_while_a_tensor_is_written_in_blocks(hf, exported, tmp_path, monkeypatch):
    """Killed after three blocks of the embedding are in its shard: the same command cuts the shard back to its
    last recorded tensor, writes the embedding again, and ends with the uninterrupted export's files."""
    src, _, _ = in_blocks(hf, tmp_path, monkeypatch)
    real = safetensors_file._write_rows

    def dies(f, name, rows):
        if name == "model.embed_tokens.weight":
            for block in itertools.islice(rows.blocks(), 3):
                f.write(block.tobytes())
            raise Killed
        real(f, name, rows)
    monkeypatch.setattr(safetensors_file, "_write_rows", dies)
    args = ["convert", "--from-l4jax", str(src), "--to-hf", str(tmp_path / "out"), "--shard-size", "0.00006"]
    with pytest.raises(Killed):
        main(args)
    partial = atomic.partial_dir(tmp_path / "out")
    assert "model.embed_tokens.weight" not in json.loads((partial / conversion.PARTIAL).read_text())["done"]
    monkeypatch.setattr(safetensors_file, "_write_rows", real)
    assert main(args) == 0 and files(tmp_path / "out") == files(exported)


@pytest.mark.parametrize("damage", ["missing chunk", "garbled chunk"])
def test_a_damaged_chunk_of_a_tensor_read_in_blocks_is_named(hf, tmp_path, monkeypatch, capsys, damage):
    """A chunk file of the embedding gone (TensorStore reads zeros in its place: the checksum tells) or garbled
    (zstd fails): exit 2, one line naming the checkpoint and the parameter, nothing at the destination."""
    src, _, _ = in_blocks(hf, tmp_path, monkeypatch)
    chunk = src / "params" / "embed" / "value" / "2.0"
    if damage == "missing chunk":
        chunk.unlink()
    else:
        chunk.write_bytes(b"\0" * 64)
    assert main(["convert", "--from-l4jax", str(src), "--to-hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    want = ("is damaged: its bytes no longer match the checksum written with it" if damage == "missing chunk" else
            "(missing or damaged): ")
    assert err.startswith(f"l4jax: {src}: ") and "parameter 'embed' " in err and want in err, err
    assert not (tmp_path / "out").exists()


# --quantize: each large weight quantized as it is read, stored as values and scales.

def test_a_quantized_conversion_is_the_quantized_load_and_resumes(hf, tmp_path, monkeypatch, capsys):
    from l4jax.model.quant import QArray
    out = tmp_path / "q"
    args = ["convert", "--from-hf", str(hf / "hf"), "--to", str(out), "--quantize", "int4"]
    killing_writer(9, monkeypatch)  # dies in the middle of the quantized weights' items
    with pytest.raises(Killed):
        main(args)
    monkeypatch.undo()
    record = json.loads((atomic.partial_dir(out) / conversion.PARTIAL).read_text())
    assert record["quantize"] == "int4" and 0 < len(record["done"]) < N
    assert main(args[:-1] + ["int8"]) == 2  # another quantization's partial folder: refused
    assert "its quantize differ from this command's" in capsys.readouterr().err
    assert main(args) == 0
    manifest = l4jax_format.read_manifest(out)
    assert manifest["quantized"]["layers_0/attn/q"]["mode"] == "int4" and "layers_0/attn/q/scales" in manifest["params"]
    assert "embed" in manifest["params"] and "layers_1/moe/router" in manifest["params"]
    from tiny import batch
    ids, mask, _ = batch()
    converted = l4jax.load(out)
    assert isinstance(converted.params["layers_1"]["moe"]["down"], QArray)
    np.testing.assert_array_equal(np.asarray(converted(ids, mask)),
                                  np.asarray(l4jax.load(hf / "hf", quantize="int4")(ids, mask)))
    assert main(["convert", "--from-hf", str(hf / "hf"), "--to", str(tmp_path / "x"), "--quantize", "int2"]) == 2
    assert "--quantize: int8, int4, fp8, got 'int2'" in capsys.readouterr().err


def test_a_quantized_conversion_killed_at_the_final_rename_only_renames(hf, tmp_path, monkeypatch):
    out = tmp_path / "q"
    dying_at_rename(monkeypatch)
    args = ["convert", "--from-hf", str(hf / "hf"), "--to", str(out), "--quantize", "int8"]
    with pytest.raises(Killed):
        main(args)
    monkeypatch.undo()
    seen = reads(monkeypatch)
    assert main(args) == 0 and seen == []
    assert l4jax_format.read_manifest(out)["quantized"]["layers_1/moe/gate"]["mode"] == "int8"
