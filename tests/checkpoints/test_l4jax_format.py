"""l4jax (Orbax) checkpoints: convert from HF, load back (plain and onto a mesh), never half-written."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import l4jax
from l4jax.data import corpus_dir
from l4jax.cli import main
from l4jax.checkpoints import l4jax_format
from tiny import batch, damage_largest_file, hf_model, save, writer_with


def hf_tensors(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    save(hf_model("maverick", seed=12), root / "hf")
    (root / "hf" / "tokenizer.json").write_text("{}")  # side files travel with the checkpoint
    assert main(["convert", "--from-hf", str(root / "hf"), "--to", str(root / "l4")]) == 0
    return root


def test_converted_checkpoint_gives_identical_logits(converted):
    ids, mask, _ = batch()
    ref = np.asarray(l4jax.load(converted / "hf")(ids, mask))
    ours = l4jax.load(converted / "l4")
    np.testing.assert_array_equal(np.asarray(ours(ids, mask)), ref)
    assert (converted / "l4" / "tokenizer.json").read_text() == "{}"
    assert l4jax_format.read_manifest(converted / "l4")["dtype"] == "float32"


def test_checkpoints_written_with_ocdbt_still_load(converted, tmp_path, monkeypatch):
    """Before 2026-11-29 each item's array was an OCDBT database (Orbax's default); items are plain zarr folders
    now. A checkpoint written the old way loads to the same logits and exports the same HF tensors."""
    import orbax.checkpoint as ocp
    th = ocp.type_handlers

    def old_writer():
        registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                                   (jax.Array, th.ArrayHandler()))
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    monkeypatch.setattr(l4jax_format, "writer", old_writer)
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(tmp_path / "old")]) == 0
    monkeypatch.undo()
    assert (tmp_path / "old" / "params" / "embed" / "manifest.ocdbt").is_file()
    assert not (converted / "l4" / "params" / "embed" / "manifest.ocdbt").exists()
    ids, mask, _ = batch()
    want = np.asarray(l4jax.load(converted / "l4")(ids, mask))
    np.testing.assert_array_equal(np.asarray(l4jax.load(tmp_path / "old")(ids, mask)), want)
    assert main(["convert", "--from-l4jax", str(tmp_path / "old"), "--to-hf", str(tmp_path / "back")]) == 0
    ref, back = hf_tensors(converted / "hf"), hf_tensors(tmp_path / "back")
    assert sorted(ref) == sorted(back) and all(ref[k].tobytes() == back[k].tobytes() for k in ref)


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_restore_onto_mesh_and_cast(converted):
    ids, mask, _ = batch()
    ref = np.asarray(l4jax.load(converted / "hf")(ids, mask))
    mesh = l4jax.make_mesh(data=2, expert=2, tensor=2)
    sharded = l4jax.load(converted / "l4", mesh=mesh)
    assert sharded.params["layers_1"]["moe"]["gate"].sharding.shard_shape((4, 64, 32)) == (2, 64, 16)
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), ref, atol=1e-5 * np.abs(ref).max())
    bf16 = l4jax.load(converted / "l4", dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(bf16.params)} == {"bfloat16"}


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_convert_with_dtype(converted, tmp_path):
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    m = l4jax.load(tmp_path / "b")
    assert m.dtype == np.dtype("bfloat16")
    ids, mask, _ = batch()
    ref = np.asarray(l4jax.load(converted / "hf", dtype="bfloat16")(ids, mask), np.float32)
    np.testing.assert_array_equal(np.asarray(m(ids, mask), np.float32), ref)


def test_existing_destination_is_refused(converted, capsys):
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(converted / "l4")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_source_must_be_an_hf_folder(converted, tmp_path, capsys):
    """A file, a missing path, an l4jax checkpoint, a bad --dtype: one line each, exit 2, nothing written."""
    weights = next((converted / "hf").glob("*.safetensors"))
    for src, message in ((weights, "not a folder"), (tmp_path / "nope", "no such folder"),
                         (converted / "l4", "already an l4jax checkpoint")):
        assert main(["convert", "--from-hf", str(src), "--to", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"l4jax: --from-hf {src}: {message}") and err.count("\n") == 1, err
    for dtype in ("int8", "banana"):
        args = ["convert", "--from-hf", str(converted / "hf"), "--to", str(tmp_path / "out"), "--dtype", dtype]
        assert main(args) == 2
        assert f"--dtype: unknown dtype '{dtype}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_damaged_tensor_bytes_are_named(converted, tmp_path, capsys):
    """Bytes overwritten inside a stored tensor: loading names the parameter (its checksum), in one line."""
    import shutil
    shutil.copytree(converted / "l4", tmp_path / "c")
    damage_largest_file(tmp_path / "c" / "params" / "lm_head")
    shutil.copy(corpus_dir() / "tokenizer.json", tmp_path / "c")  # generate reads the tokenizer first
    with pytest.raises(ValueError, match=r"(parameter 'lm_head' is damaged|cannot restore parameter 'lm_head')"):
        l4jax.load(tmp_path / "c")
    assert main(["generate", "--model", str(tmp_path / "c"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "'lm_head'" in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_output_that_cannot_be_written_is_one_line(converted, tmp_path, capsys, monkeypatch):
    """--to under a file (not a folder), or a read-only or full disk (simulated: mkdir refused): exit 2, one line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # after the progress bar's line
    assert line == f"l4jax: [Errno 20] {blocker / 'out'}: cannot write the checkpoint there (Not a directory)", err

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(tmp_path / "ro" / "out")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == f"l4jax: [Errno 13] {tmp_path / 'ro' / 'out'}: cannot write the checkpoint there (Permission " \
                   "denied)", line


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_a_disk_that_fills_during_the_write_is_one_line(converted, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a conversion (simulated: the writer fails on the third tensor, as TensorStore does,
    with a bare Exception): exit 2, one line naming the folder and the tensor and where the two finished tensors
    are kept; nothing at the destination; with space again the same command finishes the checkpoint."""
    real = l4jax_format.writer

    def fill_at_the_third(n, path, save):
        if n == 3:
            raise Exception("OUT_OF_RANGE: Error writing local file: [OS error 28: No space left on device]")
        return save()
    monkeypatch.setattr(l4jax_format, "writer", writer_with(fill_at_the_third))
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"l4jax: {tmp_path / 'out'}: writing parameter ") and "No space left on device" in line
    assert line.endswith(f"the 2 of 47 tensors written are kept in {tmp_path / '.out.partial'}: the same command "
                         "continues from there"), line
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]
    monkeypatch.setattr(l4jax_format, "writer", real)
    assert main(["convert", "--from-hf", str(converted / "hf"), "--to", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    ids, mask, _ = batch()
    np.testing.assert_array_equal(np.asarray(l4jax.load(tmp_path / "out")(ids, mask)),
                                  np.asarray(l4jax.load(converted / "l4")(ids, mask)))


def test_interrupted_conversion_leaves_nothing(converted, tmp_path):
    def items():
        yield ("embed",), np.zeros((3, 4), np.float32)
        raise KeyboardInterrupt  # killed half-way
    with pytest.raises(KeyboardInterrupt):
        l4jax_format.save(items(), tmp_path / "out", config={}, dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_mismatched_checkpoint_names_the_problem(converted, tmp_path):
    import shutil
    shutil.copytree(converted / "l4", tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "l4jax.json").read_text())
    manifest["config"]["num_local_experts"] = 8
    (tmp_path / "c" / "l4jax.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"layers_1/moe/(router|gate|up|down).*not compatible"):
        l4jax.load(tmp_path / "c")
    manifest["version"] = 99
    (tmp_path / "c" / "l4jax.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        l4jax.load(tmp_path / "c")


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_model_save_from_a_mesh_restores_onto_another(converted, tmp_path):
    ids, mask, _ = batch()
    ref = np.asarray(l4jax.load(converted / "hf")(ids, mask))
    model = l4jax.load(converted / "hf", mesh=l4jax.make_mesh(expert=4, tensor=2))
    model.save(tmp_path / "saved")
    back = l4jax.load(tmp_path / "saved", mesh=l4jax.make_mesh(fsdp=8))
    assert back.config == model.config
    np.testing.assert_allclose(np.asarray(back(ids, mask)), ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("preset", ["scout", "maverick", "tiny"])
def test_config_to_hf_round_trips(preset):
    cfg = l4jax.load_config(preset)
    assert l4jax.Llama4Config.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
