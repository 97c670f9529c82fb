"""A killed conversion continues where it stopped when the same command runs again, and ends with the checkpoint
an uninterrupted run writes; a partial folder of another conversion is refused in one line; --restart starts over."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import l4jax
from l4jax.checkpoints import atomic, conversion, hf_import, l4jax_format
from l4jax.cli import main
from tiny import hf_model, save, writer_with

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
        real = os.replace

        def die_at_rename(src, dst):
            if str(src).endswith(".partial"):
                raise Killed
            real(src, dst)
        monkeypatch.setattr(atomic.os, "replace", die_at_rename)
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


def test_read_ahead_keeps_order_and_the_byte_budget_and_raises_in_place():
    """Reads run ahead on a thread, but never hold more than the budget (one tensor larger than it, alone); a read
    that fails raises where its tensor comes, after the ones before it."""
    held, peak, log, lock = [0], [0], [], threading.Lock()
    sizes = [5, 3, 3, 9, 1, 1, 2, 4]

    def read(i):
        def go():
            with lock:
                held[0] += sizes[i]
                peak[0] = max(peak[0], held[0])
            time.sleep(0.002)
            if i == 6:
                raise ValueError("tensor 6 is damaged")
            return np.full(sizes[i], i)
        return go

    todo = [((f"p{i}",), n, read(i)) for i, n in enumerate(sizes)]
    with pytest.raises(ValueError, match="tensor 6"):
        with conversion._read_ahead(todo, budget=6) as arrays:
            for path, array in arrays:
                time.sleep(0.01)  # writing: the thread reads ahead meanwhile
                with lock:
                    log.append((path[0], int(array[0]), held[0]))
                    held[0] -= array.size
                del array
    assert [p for p, _, _ in log] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert all(f"p{v}" == p for p, v, _ in log)
    assert peak[0] == 9  # p3 alone; every other moment within the budget of 6
    assert max(h for p, _, h in log if p != "p3") <= 6
