"""The atomic folder writer: a folder appears whole or not at all, and a failed replacement keeps the old one."""

import pytest

from l4jax.checkpoints.atomic import atomic_dir


def files(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_folder_appears_whole_and_replaces_only_when_asked(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
        assert not (tmp_path / "out").exists()  # nothing at the destination while it is written
    assert files(tmp_path / "out") == {"a": "1"}
    with pytest.raises(FileExistsError, match="out: already exists; refusing to overwrite a checkpoint"):
        with atomic_dir(tmp_path / "out", what="checkpoint"):
            pass
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert files(tmp_path / "out") == {"b": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_write_leaves_the_previous_folder(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    (tmp_path / ".out.partial").mkdir()  # left by a killed earlier attempt: replaced, not an error
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "b").write_text("half")
            raise KeyboardInterrupt
    assert files(tmp_path / "out") == {"a": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
