"""Config loading: real-shaped Scout and Maverick config.json files, presets, derived layer lists, errors."""

import dataclasses
import json

import pytest
import yaml
from transformers import Llama4TextConfig

import l4jax
from l4jax import tree
from l4jax.config import PRESET_DIR, ConfigError, TextConfig, load_config
from l4jax.train.settings import TrainConfig
from l4jax.infer.load import abstract_model

VISION = dict(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
              image_size=336, patch_size=14, num_channels=3, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
              projector_output_dim=4096, vision_output_dim=4096, rope_theta=10000, hidden_act="gelu",
              model_type="llama4_vision_model", norm_eps=1e-5, vision_feature_layer=-1)
COMMON = dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120, num_hidden_layers=48,
              num_attention_heads=40, num_key_value_heads=8, head_dim=128, intermediate_size=8192,
              intermediate_size_mlp=16384, num_experts_per_tok=1, attention_chunk_size=8192, floor_scale=8192,
              attn_scale=0.1, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=200000,
              eos_token_id=[200001, 200007, 200008], pad_token_id=200018, hidden_act="silu",
              for_llm_compressor=False, router_aux_loss_coef=0.001, torch_dtype="bfloat16")
# As released in the 4.51 era: legacy rope_scaling + rope_theta keys and attn_temperature_tuning: 4.
SCOUT_TEXT = dict(COMMON, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                  attn_temperature_tuning=4, max_position_embeddings=10485760,
                  rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
MAVERICK_TEXT = dict(COMMON, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                     attn_temperature_tuning=True, max_position_embeddings=1048576, rope_scaling=None)


def full(text):
    return dict(model_type="llama4", text_config=text, vision_config=VISION, image_token_index=200092,
                boi_token_index=200080, eoi_token_index=200081, tie_word_embeddings=False)


def write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def hf_derived(text):
    """transformers' own derivation (its strict config needs the legacy int turned into a bool)."""
    d = {k: v for k, v in text.items() if k not in ("model_type", "torch_dtype", "for_llm_compressor")}
    return Llama4TextConfig(**dict(d, attn_temperature_tuning=bool(d["attn_temperature_tuning"])))


def test_scout_config_json(tmp_path):
    cfg = load_config(write(tmp_path, full(SCOUT_TEXT)))
    t, hf = cfg.text, hf_derived(SCOUT_TEXT)
    assert t.rope_layers == tuple(bool(v) for v in hf.no_rope_layers)
    assert [i for i, r in enumerate(t.rope_layers) if not r] == list(range(3, 48, 4))  # 12 NoPE layers
    assert t.chunked_layers == tuple(x == "chunked_attention" for x in hf.layer_types)
    assert t.moe_layers == tuple(hf.moe_layers) == tuple(range(48))
    assert t.use_qk_norm and t.attn_temperature_tuning  # legacy 4 counts as true
    assert t.rope_scaling == l4jax.RopeScaling(16.0, 1.0, 1.0, 8192) and t.rope_theta == 500000.0
    assert t.eos_token_id == (200001, 200007, 200008)
    assert cfg.vision.hidden_size == 1408 and cfg.image_token_index == 200092


def test_maverick_config_json(tmp_path):
    cfg = load_config(write(tmp_path, full(MAVERICK_TEXT)))
    t, hf = cfg.text, hf_derived(MAVERICK_TEXT)
    assert t.moe_layers == tuple(hf.moe_layers) == tuple(range(1, 48, 2))
    assert t.rope_layers == tuple(bool(v) for v in hf.no_rope_layers)
    assert t.rope_scaling is None and not t.use_qk_norm and t.num_local_experts == 128


def test_text_only_config_and_transformers5_rope_parameters(tmp_path):
    text = dict(SCOUT_TEXT, rope_parameters=dict(SCOUT_TEXT["rope_scaling"], rope_theta=250000.0))
    del text["rope_scaling"], text["rope_theta"]
    cfg = load_config(write(tmp_path, text))
    assert cfg.vision is None and cfg.text.rope_theta == 250000.0 and cfg.text.rope_scaling.factor == 16.0


def test_explicit_lists_and_null_chunk():
    t = TextConfig.from_hf(dict(MAVERICK_TEXT, num_hidden_layers=4, moe_layers=[0, 3], no_rope_layers=[1, 0, 1, 1]))
    assert t.moe_layers == (0, 3) and t.rope_layers == (True, False, True, True)
    assert t.chunked_layers == (True, False, True, True)
    guard = TextConfig.from_hf(dict(MAVERICK_TEXT, attention_chunk_size=None))  # Llama Guard 4 style
    assert guard.attention_chunk_size is None and not any(guard.chunked_layers)


def test_presets_match_reference_parameter_counts():
    """Reference totals minus vision tower (850,960,896) and projector (20,971,520)."""
    count = lambda name: tree.count(abstract_model(dataclasses.replace(load_config(name), vision=None)))  # noqa: E731
    assert count("scout") == 108_641_793_536 - 850_960_896 - 20_971_520
    assert count("maverick") == 401_583_781_376 - 850_960_896 - 20_971_520
    b = load_config("bench").text
    assert (b.hidden_size, b.num_hidden_layers, len(b.moe_layers), b.num_local_experts, b.num_experts_per_tok,
            b.num_attention_heads, b.num_key_value_heads, b.head_dim, b.intermediate_size, b.vocab_size,
            b.attention_chunk_size) == (2048, 8, 8, 16, 1, 16, 8, 128, 2048, 202048, 2048)
    # Behemoth's shape is an estimate; it must reproduce Meta's published totals (~2T total, 288B active).
    t = load_config("behemoth").text
    total = count("behemoth")
    inactive = len(t.moe_layers) * (t.num_local_experts - t.num_experts_per_tok) * 3 * t.hidden_size \
        * t.intermediate_size
    assert 1.9e12 < total < 2.0e12 and abs((total - inactive) / 288e9 - 1) < 0.02


@pytest.mark.parametrize("change,field", [
    (dict(num_key_value_heads=7), "num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 4.0}), "rope_scaling"),
    (dict(no_rope_layers=[1, 0, 1]), "rope_layers"),
    (dict(layer_types=["full_attention"] * 5), "chunked_layers"),
    (dict(layer_types=["sliding_attention"] * 48), "layer_types"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(moe_layers=[0, 48]), "moe_layers"),
    (dict(head_dim=127), "head_dim"),
    (dict(hidden_size="5120"), "hidden_size"),
    (dict(attention_chunk_size=0), "attention_chunk_size"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(floor_scale=0), "floor_scale"),
    (dict(floor_scale="abc"), r"TextConfig.floor_scale: must be a number, got 'abc'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": "x", "low_freq_factor": 1, "high_freq_factor": 4,
                        "original_max_position_embeddings": 64}), r"rope_scaling.factor: must be a number"),
    (dict(vocab_size=None), r"TextConfig.vocab_size: must be a positive integer, got None"),
])
def test_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        TextConfig.from_hf(dict(SCOUT_TEXT, **change))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config at"):
        load_config(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: cannot read the config"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="text_config"):
        load_config({"model_type": "llama4"})


@pytest.mark.parametrize("doc,message", [
    ({}, r"config.json: Llama4Config.model_type: missing; expected one of \('llama4', 'llama4_text'\)"),
    ({"model_type": "gpt2", "n_embd": 768}, r"config.json: Llama4Config.model_type: 'gpt2' is not a Llama 4 model"),
    ({"model_type": "llama4_text", "vocab_size": 32}, r"config.json: TextConfig: missing required fields "
                                                       r"\['hidden_size', 'num_hidden_layers'"),
    ({"model_type": "llama4", "text_config": {"model_type": "llama4_text"}}, "missing required fields"),
])
def test_config_json_that_is_not_a_llama4_config(tmp_path, doc, message):
    """Empty, another model's, or missing what it must state: never a Scout-sized default model."""
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


def test_yaml_keys_are_checked_and_json_extras_are_not(tmp_path):
    tiny = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**tiny, "hidden_sise": 256}))
    with pytest.raises(ConfigError, match=r"typo.yaml: TextConfig.hidden_sise: unknown field; did you mean "
                                          r"'hidden_size'\?"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**tiny, "train": {**tiny["train"], "stpes": 3}}))
    with pytest.raises(ConfigError, match=r"train.yaml: train.stpes: unknown field; did you mean 'steps'\?"):
        TrainConfig.from_yaml(tmp_path / "train.yaml")
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump({**tiny, "train": {"lora": {"rnk": 4}}}))
    with pytest.raises(ConfigError, match=r"train.lora.rnk: unknown field; did you mean 'rank'\?"):
        TrainConfig.from_yaml(tmp_path / "lora.yaml")
    scout = yaml.safe_load((PRESET_DIR / "scout.yaml").read_text())
    scout["vision_config"]["patch_sise"] = 14
    (tmp_path / "vision.yaml").write_text(yaml.safe_dump(scout))
    with pytest.raises(ConfigError, match=r"VisionConfig.patch_sise: unknown field; did you mean 'patch_size'\?"):
        load_config(tmp_path / "vision.yaml")
    # An HF config.json carries keys of its own (and later transformers versions add more): read, not refused.
    hf = {k: v for k, v in tiny.items() if k != "train"}
    (tmp_path / "config.json").write_text(json.dumps({**hf, "some_future_field": 1, "architectures": ["X"]}))
    assert load_config(tmp_path) == load_config("tiny")
    assert TrainConfig.from_yaml("tiny").steps == tiny["train"]["steps"]  # presets by name too
