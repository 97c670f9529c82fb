"""HF checkpoint import: layouts (single file, sharded index, multimodal, tied), dtypes and every error."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import l4jax
from l4jax import CheckpointError
from l4jax.checkpoints import hf_import
from l4jax.cli import main
from tiny import CONFIGS, batch, hf_logits, hf_model, rel_err, save

KEY = "model.layers.1.feed_forward.experts.gate_up_proj"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maverick")
    model = hf_model("maverick", seed=4)
    save(model, folder)
    ids, mask, pos = batch()
    return folder, hf_logits(model, ids, mask, pos)


def edited(ckpt, tmp_path, edit):
    """A copy of the checkpoint whose tensors went through edit(dict) -> dict."""
    src, _ = ckpt
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_sharded_index_loads_same_logits(ckpt, tmp_path):
    model = hf_model("maverick", seed=4)
    model.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids, mask, _ = batch()
    assert rel_err(l4jax.load(tmp_path)(ids, mask), ckpt[1], mask) <= 1e-4


def test_multimodal_layout_text_only(tmp_path):
    from transformers import Llama4Config, Llama4ForConditionalGeneration
    text = {k: v for k, v in CONFIGS["top2"].items()}
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=28,
                  patch_size=7, pixel_shuffle_ratio=0.5, projector_input_dim=48, projector_output_dim=48,
                  vision_output_dim=48, rope_theta=10000)
    torch.manual_seed(0)
    cfg = Llama4Config(text_config=text, vision_config=vision, image_token_index=299, boi_token_index=297,
                       eoi_token_index=298)
    cfg._attn_implementation = "eager"
    vlm = Llama4ForConditionalGeneration(cfg).eval()
    vlm.save_pretrained(str(tmp_path))
    keys = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "model.safetensors.index.json").exists() else load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("vision_model.") for k in keys)
    ours = l4jax.load(tmp_path)
    assert ours.config.vision is not None and ours.config.image_token_index == 299
    ids, mask, pos = batch(lengths=(20, 13))
    with torch.no_grad():
        ref = vlm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()
    assert rel_err(ours(ids, mask), ref, mask) <= 1e-4


def test_tied_embeddings(tmp_path):
    model = hf_model("scout", seed=5, tie_word_embeddings=True)
    save(model, tmp_path)
    ids, mask, pos = batch()
    ours = l4jax.load(tmp_path)
    assert "lm_head" not in ours.params
    assert rel_err(ours(ids, mask), hf_logits(model, ids, mask, pos), mask) <= 1e-4


def test_dtype_argument_converts(ckpt):
    m = l4jax.load(ckpt[0], dtype="bfloat16")
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(m.params)} == {"bfloat16"}


def test_missing_tensor(ckpt, tmp_path):
    folder = edited(ckpt, tmp_path, lambda t: {k: v for k, v in t.items() if k != KEY})
    with pytest.raises(CheckpointError, match=f"missing.*{KEY}"):
        l4jax.load(folder)


def test_unexpected_tensor(ckpt, tmp_path):
    folder = edited(ckpt, tmp_path, lambda t: dict(t, **{"model.layers.9.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.9\.mystery\.weight"):
        l4jax.load(folder)


def test_shape_mismatch_names_key_and_both_shapes(ckpt, tmp_path):
    folder = edited(ckpt, tmp_path, lambda t: dict(t, **{KEY: t[KEY][:, :, :-2].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{KEY}.*shape \[4, 64, 62\].*expects \[4, 64, 64\]"):
        l4jax.load(folder)


def test_unsupported_dtype(ckpt, tmp_path):
    folder = edited(ckpt, tmp_path, lambda t: dict(t, **{KEY: t[KEY].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=f"{KEY}.*unsupported dtype I8"):
        l4jax.load(folder)


def test_truncated_and_corrupt_files(ckpt, tmp_path):
    src, _ = ckpt
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("corrupt", lambda b: b"\xff" * 16 + b[16:])]:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        f = dst / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        with pytest.raises(CheckpointError, match="model.safetensors.*(truncated or corrupt)"):
            l4jax.load(dst)


def test_non_finite_weights_are_named(ckpt, tmp_path, capsys):
    """A NaN in a tensor, or bytes flipped to 0xff inside tensor data (a NaN pattern): the tensor and row named,
    by load and by convert (exit 2, nothing written)."""
    def poison(t):
        w = t[KEY].clone()
        w[2, 5, 7] = float("nan")
        return dict(t, **{KEY: w})
    folder = edited(ckpt, tmp_path, poison)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{KEY}' holds NaN or infinite values "
                                              r"\(first in row 2\)"):
        l4jax.load(folder)
    src, _ = ckpt
    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    f = flipped / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    offsets = json.loads(data[8:header])["model.norm.weight"]["data_offsets"]
    data[header + offsets[0]:header + offsets[0] + 4] = b"\xff" * 4
    f.write_bytes(bytes(data))
    assert main(["convert", "--from-hf", str(flipped), "--to", str(tmp_path / "out")]) == 2
    assert "tensor 'model.norm.weight' holds NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_mismatch_and_empty_folder(ckpt, tmp_path):
    src, _ = ckpt
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, num_local_experts=8)))
    with pytest.raises(CheckpointError, match=r"router\.weight.*shape \[4, 64\].*expects \[8, 64\]"):
        l4jax.load(tmp_path / "m")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        l4jax.load(tmp_path / "e")


def test_bad_inputs(ckpt):
    m = l4jax.load(ckpt[0])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        m(np.array([[1, 300]]))
    with pytest.raises(ValueError, match="2-D integer"):
        m(np.array([1, 2]))
    with pytest.raises(ValueError, match="attention_mask: shape"):
        m(np.array([[1, 2]]), np.array([[1, 1, 1]]))


def test_planned_size_is_what_streams(ckpt):
    """The convert progress total is the bytes the stream yields (gate_up_proj is one tensor read as two halves:
    counting its whole shape twice stopped the bar at 65-76%)."""
    folder, _ = ckpt
    config = l4jax.load_config(folder)
    index = hf_import.SafetensorsIndex(folder)
    planned = sum(s.size for s in hf_import.plan(index, config))
    assert planned == sum(a.size for _, a in hf_import.stream(folder, config)) == l4jax.load(folder).num_params()
