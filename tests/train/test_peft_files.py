"""LoRA adapters exported in the PEFT layout: peft loads them onto the transformers model and gives the logits of
l4jax's merged model; the scanned layout exports the same tensors; the target regex leaves the vision tower alone."""

import json
import re

import jax
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

import l4jax
from l4jax.model.decoder import stack_layers
from l4jax.train import lora
from l4jax.train.lora import LoraConfig, LoraError
from l4jax.train.peft_files import CONFIG, WEIGHTS, peft_config, save_peft
from tiny import batch, hf_model, save

CFG = LoraConfig(rank=4, alpha=6.0, targets=("q", "k", "v", "o"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    folder = save(hf_model("top2", seed=8), root / "hf")
    model = l4jax.load(folder)
    adapters = lora.init(model.params, CFG, jax.random.key(1))
    # Trained-looking adapters: B is zero at init, which would make every export look right.
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: np.asarray(rng.normal(0, 0.05, x.shape), np.float32), adapters)
    return root, folder, model, adapters


def test_peft_loads_the_adapters_with_our_logits(setup):
    root, folder, model, adapters = setup
    out = save_peft(root / "adapters", model.config, adapters, CFG, base=folder)
    assert json.loads((out / CONFIG).read_text())["base_model_name_or_path"] == folder
    merged = l4jax.Model(model.config, lora.merge(model.params, adapters, CFG))
    ids, mask, _ = batch()
    ours = np.asarray(merged(ids, mask))
    plain = np.asarray(model(ids, mask))
    peft = PeftModel.from_pretrained(hf_model("top2", seed=8), str(out)).eval()
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours - plain)[real].max() > 1e-2  # the adapters really change the output
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=2e-5)


def test_the_scanned_layout_exports_the_same_tensors(setup, tmp_path):
    root, folder, model, adapters = setup
    save_peft(tmp_path / "a", model.config, adapters, CFG)
    save_peft(tmp_path / "b", model.config, stack_layers(adapters, model.config.text), CFG)
    a, b = load_file(str(tmp_path / "a" / WEIGHTS)), load_file(str(tmp_path / "b" / WEIGHTS))
    n = model.config.text.num_hidden_layers
    assert sorted(a) == sorted(b) and len(a) == 2 * 4 * n
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"].shape == (
        model.config.text.hidden_size, CFG.rank)


def test_targets_and_errors(setup, tmp_path):
    root, folder, model, adapters = setup
    target = peft_config(model.config, LoraConfig(targets=("q", "v")), None)["target_modules"]
    assert re.fullmatch(target, "model.layers.3.self_attn.v_proj")
    assert not re.fullmatch(target, "model.layers.3.self_attn.k_proj")
    scout = peft_config(l4jax.load_config("scout"), CFG, None)["target_modules"]  # a model with a vision tower
    assert re.fullmatch(scout, "language_model.model.layers.47.self_attn.o_proj")
    assert not any(re.fullmatch(t, "vision_model.model.layers.3.self_attn.q_proj") for t in (target, scout))
    with pytest.raises(LoraError, match="expert adapters have no PEFT form"):
        save_peft(tmp_path / "x", model.config, adapters, LoraConfig(rank=4, experts=True))
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileExistsError, match="already exists"):
        save_peft(root / "adapters", model.config, adapters, CFG)
