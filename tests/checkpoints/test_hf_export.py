"""Export to Hugging Face: HF -> l4jax -> HF gives the same tensors byte for byte and the same config; the exported
folder loads in transformers with l4jax's logits; sharded models export the same bytes."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import GenerationConfig, Llama4ForCausalLM, Llama4TextConfig

import l4jax
from l4jax.checkpoints.hf_export import hf_plan
from l4jax.cli import main
from tiny import batch, hf_logits, hf_model, rel_err, save, traced_peak


def tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A maverick-like HF model, converted to l4jax and exported back in shards of 40 kB (with an index)."""
    root = tmp_path_factory.mktemp("export")
    save(hf_model("maverick", seed=21), root / "hf")
    (root / "hf" / "tokenizer.json").write_text("{}")
    assert main(["convert", "--from-hf", str(root / "hf"), "--to", str(root / "l4")]) == 0
    assert main(["convert", "--from-l4jax", str(root / "l4"), "--to-hf", str(root / "back"), "--shard-size",
                 "0.00004"]) == 0
    return root


def test_round_trip_is_byte_identical(exported):
    ref, back = tensors(exported / "hf"), tensors(exported / "back")
    assert sorted(ref) == sorted(back)
    for k in ref:
        assert ref[k].dtype == back[k].dtype and ref[k].shape == back[k].shape, k
        assert ref[k].tobytes() == back[k].tobytes(), k
    index = json.loads((exported / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and set(index["weight_map"]) == set(ref)
    assert (exported / "back" / "tokenizer.json").read_text() == "{}"
    assert (exported / "back" / "generation_config.json").read_text() == (exported / "hf" /
                                                                          "generation_config.json").read_text()
    hf_cfg = Llama4TextConfig.from_pretrained(exported / "hf").to_dict()
    back_cfg = Llama4TextConfig.from_pretrained(exported / "back").to_dict()
    skip = {"transformers_version", "_name_or_path", "architectures", "dtype"}
    assert {k: v for k, v in hf_cfg.items() if k not in skip} == {k: v for k, v in back_cfg.items() if k not in skip}


def test_transformers_loads_the_export_with_our_logits(exported):
    ids, mask, _ = batch()
    ours = np.asarray(l4jax.load(exported / "l4")(ids, mask))
    hf = Llama4ForCausalLM.from_pretrained(exported / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=1e-5)


def test_bf16_round_trip_and_logits(tmp_path):
    """A bf16 checkpoint comes back bf16 and byte for byte; transformers' bf16 logits on the export are within the
    bf16 bound documented in tests/model/test_decoder.py (3% of the largest logit)."""
    save(hf_model("top2", seed=5, dtype=torch.bfloat16), tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "l4")]) == 0
    assert main(["convert", "--from-l4jax", str(tmp_path / "l4"), "--to-hf", str(tmp_path / "back")]) == 0
    ref, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
    assert sorted(ref) == sorted(back) and {str(v.dtype) for v in back.values()} == {"bfloat16"}
    assert all(ref[k].tobytes() == back[k].tobytes() for k in ref)
    ids, mask, pos = batch()
    exported = Llama4ForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert next(exported.parameters()).dtype == torch.bfloat16
    assert rel_err(l4jax.load(tmp_path / "l4")(ids, mask), hf_logits(exported, ids, mask, pos), mask) <= 3e-2


def test_host_memory_holds_one_tensor_at_a_time(exported, tmp_path):
    """One file for everything (no shard limit): the host still holds only the tensor being written (traced numpy
    allocations; the whole model is several times the largest tensor, so writing it at once would show)."""
    model = l4jax.load(exported / "l4")
    sizes = [t.nbytes for t in hf_plan(model.config, lambda p: model.dtype)]
    assert sum(sizes) > 5 * max(sizes)
    peak = traced_peak(lambda: model.save_pretrained(tmp_path / "m", shard_size=10**12))
    assert peak < 2 * max(sizes) + 2**18, (peak, max(sizes), sum(sizes))
    ref, got = tensors(exported / "hf"), tensors(tmp_path / "m")
    assert sorted(ref) == sorted(got) and all(ref[k].tobytes() == got[k].tobytes() for k in ref)


def test_a_checkpoint_saved_from_a_mesh_exports_the_same_bytes(exported, tmp_path):
    """``Model.save`` on a mesh stores each array in chunks of its shards: across the trailing axes for the
    tensor-sharded ones (read whole by the export), along the rows for the others (read in blocks)."""
    sharded = l4jax.load(exported / "l4", mesh=l4jax.make_mesh(fsdp=4, tensor=2))
    sharded.save(tmp_path / "s")
    chunks = {p.parent.parent.relative_to(tmp_path / "s" / "params").as_posix():
              (json.loads(p.read_text())["chunks"], json.loads(p.read_text())["shape"])
              for p in (tmp_path / "s" / "params").rglob(".zarray")}
    assert any(c[1:] != s[1:] for c, s in chunks.values()) and any(c[0] < s[0] for c, s in chunks.values()), chunks
    assert main(["convert", "--from-l4jax", str(tmp_path / "s"), "--to-hf", str(tmp_path / "back")]) == 0
    ref, got = tensors(exported / "hf"), tensors(tmp_path / "back")
    assert sorted(ref) == sorted(got) and all(ref[k].tobytes() == got[k].tobytes() for k in ref)


@pytest.mark.slow
def test_a_sharded_model_exports_the_same_bytes(exported, tmp_path):
    sharded = l4jax.load(exported / "l4", mesh=l4jax.make_mesh(data=2, expert=2, tensor=2))
    sharded.save_pretrained(tmp_path / "m")
    ref, got = tensors(exported / "hf"), tensors(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()  # one shard under the default size: no index
    gen = GenerationConfig.from_pretrained(tmp_path / "m")  # none to copy here: made from the config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        sharded.config.text.bos_token_id, list(sharded.config.text.eos_token_id), sharded.config.text.pad_token_id)
    assert all(ref[k].tobytes() == got[k].tobytes() for k in ref) and sorted(ref) == sorted(got)


def test_export_arguments_are_checked(exported, tmp_path, capsys):
    for argv, message in (
            (["--from-l4jax", str(exported / "hf"), "--to-hf", str(tmp_path / "x")], "not an l4jax checkpoint"),
            (["--from-l4jax", str(exported / "l4"), "--to", str(tmp_path / "x")], "give --to-hf OUT"),
            (["--from-hf", str(exported / "hf"), "--to-hf", str(tmp_path / "x")], "give --to OUT"),
            (["--from-l4jax", str(exported / "l4"), "--to-hf", str(exported / "back")], "already exists")):
        assert main(["convert", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
