"""What every config check shares: the error, typed readers of raw values, dtype names, and the keys an HF Llama 4
config may hold."""

from __future__ import annotations

import difflib
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or inconsistent; the message names the field."""


def _fail(owner: str, field: str, msg: str):
    raise ConfigError(f"{owner}.{field}: {msg}")


def as_int(v, name: str, owner: str = "TextConfig") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(owner, name, f"must be an integer, got {v!r}")
    return v


def as_float(v, name: str, owner: str = "TextConfig") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(owner, name, f"must be a number, got {v!r}")
    return float(v)


# Dtypes by name: the canonical numpy names, and the short ones the command line and configs also accept.
DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def dtype_name(name: str, where: str, allowed: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> str:
    """The canonical name ("bfloat16") of a dtype name or alias ("bf16"); a ConfigError naming ``where`` when it
    is not one of ``allowed``."""
    canonical = DTYPES.get(name) if isinstance(name, str) else None
    if canonical not in allowed:
        names = sorted(k for k, v in DTYPES.items() if v in allowed)
        raise ConfigError(f"{where}: unknown dtype {name!r}; expected one of {names}")
    return canonical


MODEL_TYPES = ("llama4", "llama4_text")
# A text config must state these; every other field has the documented default of TextConfig (Scout's).
REQUIRED_TEXT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "intermediate_size_mlp")
# Keys that Llama4TextConfig / Llama4Config write (transformers 5), read here or carrying nothing for l4jax, and the
# legacy names still read (rope_scaling, rope_theta).
TEXT_KEYS = frozenset((
    "_name_or_path architectures attention_bias attention_chunk_size attention_dropout attn_scale "
    "attn_temperature_tuning bos_token_id chunk_size_feed_forward dtype torch_dtype eos_token_id floor_scale "
    "head_dim hidden_act hidden_size id2label initializer_range interleave_moe_layer_step intermediate_size "
    "intermediate_size_mlp is_encoder_decoder label2id layer_types max_position_embeddings model_type moe_layers "
    "no_rope_layer_interval no_rope_layers num_attention_heads num_experts_per_tok num_hidden_layers "
    "num_key_value_heads num_local_experts output_attentions output_hidden_states output_router_logits "
    "pad_token_id problem_type return_dict rms_norm_eps rope_parameters rope_scaling rope_theta "
    "router_aux_loss_coef router_jitter_noise tie_word_embeddings transformers_version use_cache use_qk_norm "
    "vocab_size").split())
VISION_KEYS = frozenset((
    "_name_or_path architectures attention_dropout chunk_size_feed_forward dtype torch_dtype hidden_act hidden_size "
    "id2label image_size initializer_range intermediate_size is_encoder_decoder label2id model_type "
    "multi_modal_projector_bias norm_eps num_attention_heads num_channels num_hidden_layers output_attentions "
    "output_hidden_states patch_size pixel_shuffle_ratio problem_type projector_dropout projector_input_dim "
    "projector_output_dim return_dict rope_parameters rope_theta transformers_version vision_feature_select_strategy "
    "vision_feature_layer vision_output_dim").split())
FULL_KEYS = frozenset((
    "_name_or_path architectures boi_token_index chunk_size_feed_forward dtype torch_dtype eoi_token_index "
    "id2label image_token_index is_encoder_decoder label2id model_type output_attentions output_hidden_states "
    "problem_type return_dict text_config tie_word_embeddings transformers_version vision_config").split())


def check_hf_keys(d: Mapping[str, Any], owner: str, known: frozenset, *, strict: bool,
                  required: tuple[str, ...] = ()) -> None:
    """Required keys present; with ``strict`` (l4jax's own YAML files, not an HF config.json, which later
    transformers versions may extend) every key known, else an error suggesting the nearest known one."""
    missing = [k for k in required if k not in d]
    if missing:
        raise ConfigError(f"{owner}: missing required fields {missing} (only documented optional fields have "
                          "defaults)")
    if strict:
        reject_unknown(d, owner, known)


# Names other trainers use for l4jax's fields (difflib alone would not connect them): suggested when misused.
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "train_steps": "steps",
           "batch": "batch_size", "global_batch_size": "batch_size", "max_seq_len": "seq_len",
           "seq_length": "seq_len", "max_target_length": "seq_len", "gradient_accumulation_steps": "grad_accum",
           "warmup": "warmup_steps", "max_grad_norm": "clip_norm", "gradient_clipping_threshold": "clip_norm"}


def reject_unknown(d: Mapping[str, Any], owner: str, known) -> None:
    """A ConfigError naming the first key of ``d`` not in ``known``, with the nearest known one."""
    for key in d:
        if key not in known:
            near = [ALIASES[key]] if ALIASES.get(key) in known else difflib.get_close_matches(str(key), sorted(known),
                                                                                                n=1)
            raise ConfigError(f"{owner}.{key}: unknown field" + (f"; did you mean {near[0]!r}?" if near else ""))
