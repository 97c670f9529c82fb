"""A training run never writes over what it did not write: new runs take only new or empty folders, --resume only
folders a run marked and holding only run files, and no input may lie inside the output. Every refusal happens
before anything is written, and leaves the folder as it was."""

import json
from pathlib import Path

import pytest

import l4jax
from l4jax.cli import main
from l4jax.train.run_folder import MARKER, RunFolderError, claim

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_takes_only_a_new_or_empty_folder(tmp_path):
    assert claim(tmp_path / "new", resume=False, inputs={}, description={}) == tmp_path / "new"
    assert json.loads((tmp_path / "new" / MARKER).read_text())["format"] == "l4jax-run"
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", resume=False, inputs={}, description={})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(RunFolderError, match=r"mine: is not empty \(it holds notes.txt\).*choose another --out"):
        claim(tmp_path / "mine", resume=False, inputs={}, description={})
    assert snapshot(tmp_path / "mine") == {"notes.txt": b"my notes"}
    with pytest.raises(RunFolderError, match=r"new: holds an earlier run \(pass --resume to continue it\)"):
        claim(tmp_path / "new", resume=False, inputs={}, description={})


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_resume_takes_only_a_marked_folder_of_run_files(tmp_path):
    run = tmp_path / "run"
    claim(run, resume=False, inputs={}, description={"model": "a"})
    (run / "checkpoints").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / ".model.partial").mkdir()  # left by an export that was killed
    l4jax.init("tiny").save(run / "model")
    claim(run, resume=True, inputs={}, description={"model": "b"})
    assert json.loads((run / MARKER).read_text())["model"] == "a"  # the run keeps its own mark
    (run / "weights.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(RunFolderError, match=r"run/weights.bin: not written by l4jax train"):
        claim(run, resume=True, inputs={}, description={})
    (run / "weights.bin").unlink()
    (run / "adapters").mkdir()  # a folder of that name that is not LoRA adapters
    with pytest.raises(RunFolderError, match=r"run/adapters: not written by l4jax train"):
        claim(run, resume=True, inputs={}, description={})
    plain = tmp_path / "plain"
    (plain / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunFolderError, match=r"plain: not an l4jax training run \(no l4jax-run.json\)"):
        claim(plain, resume=True, inputs={}, description={})
    assert not (plain / MARKER).exists()


def test_an_input_inside_the_output_is_refused(tmp_path):
    with pytest.raises(RunFolderError, match=r"--init-from .*x/model lies inside --out .*x, which this run writes"):
        claim(tmp_path / "x", resume=True, inputs={"--init-from": str(tmp_path / "x" / "model")}, description={})
    with pytest.raises(RunFolderError, match=r"--teacher"):
        claim(tmp_path / "x", resume=False, inputs={"--teacher": str(tmp_path / "x")}, description={})
    assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="exists and is not a folder"):
        claim(tmp_path / "file", resume=False, inputs={}, description={})


def test_fine_tuning_a_model_into_its_own_folder_leaves_it_whole(tmp_path, capsys):
    """The reported data loss: ``l4jax train --init-from X/model --out X`` deleted X/model; now it is refused, with
    X byte for byte as it was, whether or not --resume is given."""
    x = tmp_path / "x"
    l4jax.init("tiny").save(x / "model")
    before = snapshot(x)
    for extra in ([], ["--resume"]):
        code = main(["train", "--config", CONFIG, "--init-from", str(x / "model"), "--out", str(x), *extra])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        assert err.startswith("l4jax train: --init-from") and "lies inside --out" in err, err
        assert snapshot(x) == before


def test_a_folder_holding_a_users_model_is_refused_through_the_cli(tmp_path, capsys):
    """``--out DIR`` where DIR/model is the user's own: refused with the path named, nothing deleted."""
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "weights.safetensors").write_bytes(b"precious")
    before = snapshot(tmp_path / "out")
    assert main(["train", "--config", CONFIG, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "out: is not empty (it holds model); a new run writes only into a new or empty folder" in err, err
    assert main(["train", "--config", CONFIG, "--out", str(tmp_path / "out"), "--resume"]) == 1
    assert "not an l4jax training run" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before


def test_an_output_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["train", "--config", CONFIG, "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("l4jax: [Errno 20] Not a directory") and str(blocker) in err and err.count("\n") == 1, err
