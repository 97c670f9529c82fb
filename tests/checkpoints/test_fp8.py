"""FP8 checkpoints as released (Meta's fbgemm_fp8 layout; compressed-tensors' per-channel scales): l4jax reads them
dequantized and gives the logits of transformers' model built from the same dequantized weights."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import l4jax
from l4jax.cli import main
from l4jax.checkpoints.hf_import import CheckpointError
from l4jax.model.quant import QArray
from tiny import batch, hf_model

FP8_MAX = 448.0


def rowwise_fp8(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and float32 scales of w, one scale per slice along ``dim`` reduced (max |w| / 448)."""
    scale = w.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale.float()


def fp8_checkpoint(model, folder, method: str) -> None:
    """``model`` written as an FP8 release: every linear of the decoder layers and the experts in FP8 with their
    scales (the embedding, router, norms and LM head stay as they are), and ``model``'s weights replaced by the
    dequantized ones, which is what the logits are compared against."""
    folder.mkdir()
    state, out = model.state_dict(), {}
    for key, w in state.items():
        fp8 = ".layers." in key and ("proj" in key) and "router" not in key
        if not fp8:
            out[key] = w.contiguous()
            continue
        if key.endswith("experts.down_proj"):          # [E, F, D]: a scale per output D, stored [E, D, 1]
            q, scale = rowwise_fp8(w, 1)
            out[key + "_scale"] = scale.transpose(1, 2).contiguous()
        elif key.endswith("experts.gate_up_proj"):     # [E, D, 2F]: a scale per output column, [E, 1, 2F]
            q, scale = rowwise_fp8(w, 1)
            out[key + "_scale"] = scale.contiguous()
        else:                                           # nn.Linear [out, in]: a scale per row, [out, 1]
            q, scale = rowwise_fp8(w, 1)
            out[key[:-len("weight")] + "weight_scale"] = scale.contiguous()
        out[key] = q.contiguous()
        with torch.no_grad():
            state[key].copy_(q.float() * scale)
    model.load_state_dict(state)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                      "modules_to_not_convert": ["lm_head"]} if method == "fbgemm_fp8" else
                                     {"quant_method": "compressed-tensors", "config_groups": {}, "ignore": ["lm_head"]})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("method", ["fbgemm_fp8", "compressed-tensors"])
def test_an_fp8_release_gives_the_logits_of_its_dequantized_weights(tmp_path, method):
    model = hf_model("maverick", seed=9)
    ids, mask, _ = batch()
    real = mask.astype(bool)

    def logits():
        with torch.no_grad():
            return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[real]
    unquantized = logits()
    fp8_checkpoint(model, tmp_path / "fp8", method)
    ref = logits()
    assert np.abs(ref - unquantized).max() > 1e-3  # FP8 rounding shows: the comparison below can fail
    ours = np.asarray(l4jax.load(tmp_path / "fp8", dtype="float32")(ids, mask))[real]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.slow  # five loads and a conversion
def test_an_fp8_release_kept_in_fp8(tmp_path):
    """quantize="fp8" keeps the release's FP8 weights with a scale per output channel (the router, norms, embedding
    and LM head as stored): the logits of the dequantized load, on one device and a mesh; saved and loaded bit
    for bit."""
    model = hf_model("maverick", seed=9)
    fp8_checkpoint(model, tmp_path / "fp8", "fbgemm_fp8")
    ids, mask, _ = batch()
    want = np.asarray(l4jax.load(tmp_path / "fp8", dtype="float32")(ids, mask))
    kept = l4jax.load(tmp_path / "fp8", dtype="float32", quantize="fp8")
    layer = kept.params["layers_1"]
    for name, shape in (("attn/q", (1, 4, 16)), ("attn/o", (1, 1, 64)), ("moe/gate", (4, 1, 32)),
                        ("moe/down", (4, 1, 64))):
        q = l4jax.tree.get(layer, tuple(name.split("/")))
        assert isinstance(q, QArray) and q.mode == "fp8" and q.scales.shape == shape, (name, q)
    assert not isinstance(kept.params["lm_head"], QArray) and not isinstance(layer["moe"]["router"], QArray)
    np.testing.assert_allclose(np.asarray(kept(ids, mask)), want, rtol=0, atol=2e-5)
    sharded = l4jax.load(tmp_path / "fp8", dtype="float32", quantize="fp8", mesh=l4jax.make_mesh(expert=2, tensor=4))
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), want, rtol=0, atol=2e-5)
    kept.save(tmp_path / "saved")
    assert main(["convert", "--from-hf", str(tmp_path / "fp8"), "--to", str(tmp_path / "converted"), "--dtype", "fp32",
                 "--quantize", "fp8"]) == 0
    for folder in ("saved", "converted"):
        back = l4jax.load(tmp_path / folder)
        assert back.params["layers_1"]["moe"]["gate"].values.dtype == np.dtype("float8_e4m3fn")
        np.testing.assert_array_equal(np.asarray(back(ids, mask)), np.asarray(kept(ids, mask)))


def test_bad_fp8_checkpoints_name_the_tensor_or_field(tmp_path):
    model = hf_model("maverick", seed=9)
    fp8_checkpoint(model, tmp_path / "fp8", "fbgemm_fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization_config.quant_method 'awq' is not supported"):
        l4jax.load(tmp_path / "fp8")
    config["quantization_config"]["quant_method"] = "fbgemm_fp8"
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    tensors[key] = tensors[key][:3]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"scale tensor '{key}' has shape \\[3, 1\\]"):
        l4jax.load(tmp_path / "fp8")
    del tensors[key]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="FP8 tensor 'model.layers.0.self_attn.q_proj.weight' has no scale "
                                              f"tensor '{key}'"):
        l4jax.load(tmp_path / "fp8")
