"""The model's configuration: frozen dataclasses, validated once at construction, built from HF config dicts.

Every value the reference reads is a field here; nothing in the model hard-codes Scout or Maverick. Errors name the
offending field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .base import (FULL_KEYS, MODEL_TYPES, REQUIRED_TEXT, TEXT_KEYS, VISION_KEYS, ConfigError, _fail, as_float,
                   as_int, check_hf_keys)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (HF ``rope_parameters`` with ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.factor > 0:
            _fail("rope_scaling", "factor", f"must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor <= self.high_freq_factor:
            _fail("rope_scaling", "low_freq_factor",
                  f"need 0 < low_freq_factor <= high_freq_factor, got {self.low_freq_factor} and "
                  f"{self.high_freq_factor}")
        if not self.original_max_position_embeddings > 0:
            _fail("rope_scaling", "original_max_position_embeddings",
                  f"must be > 0, got {self.original_max_position_embeddings}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Llama 4 text decoder. Field names follow HF ``Llama4TextConfig`` where one exists.

    ``rope_layers[i]`` is True when layer i applies RoPE (HF ``no_rope_layers[i] == 1``; the HF name reads
    backwards). ``chunked_layers[i]`` is True when layer i uses chunked local attention (HF ``layer_types``).
    """

    vocab_size: int = 202048
    hidden_size: int = 5120
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: tuple[int, ...] = ()
    rope_layers: tuple[bool, ...] = ()
    chunked_layers: tuple[bool, ...] = ()
    attention_chunk_size: int | None = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    def __post_init__(self):
        own = "TextConfig"
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "intermediate_size_mlp", "num_local_experts",
                     "num_experts_per_tok", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                _fail(own, name, f"must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(own, "num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not divisible "
                  f"by num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            _fail(own, "head_dim", f"must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            _fail(own, "num_experts_per_tok", f"top-k {self.num_experts_per_tok} exceeds "
                  f"num_local_experts={self.num_local_experts}")
        L = self.num_hidden_layers
        for name in ("rope_layers", "chunked_layers"):
            if len(getattr(self, name)) != L:
                _fail(own, name, f"has {len(getattr(self, name))} entries, expected num_hidden_layers={L}")
        bad = [i for i in self.moe_layers if not 0 <= i < L]
        if bad:
            _fail(own, "moe_layers", f"indices {bad} are outside [0, {L})")
        if len(set(self.moe_layers)) != len(self.moe_layers):
            _fail(own, "moe_layers", f"has repeated indices: {list(self.moe_layers)}")
        if self.attention_chunk_size is not None:
            if isinstance(self.attention_chunk_size, bool) or not isinstance(self.attention_chunk_size, int) \
                    or self.attention_chunk_size <= 0:
                _fail(own, "attention_chunk_size", f"must be a positive integer or null, got "
                      f"{self.attention_chunk_size!r}")
        elif any(self.chunked_layers):
            _fail(own, "chunked_layers", "chunked attention requested but attention_chunk_size is null")
        if not self.floor_scale > 0:
            _fail(own, "floor_scale", f"must be > 0, got {self.floor_scale}")
        if not self.rope_theta > 0:
            _fail(own, "rope_theta", f"must be > 0, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            _fail(own, "rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")

    # -- derived facts ------------------------------------------------------------------------------------------
    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any], strict: bool = False) -> "TextConfig":
        """Build from an HF ``llama4_text`` dict (the ``text_config`` of a full ``llama4`` config); ``strict``:
        unknown keys are errors (see ``base.check_hf_keys``)."""
        d = dict(d)
        check_hf_keys(d, "TextConfig", TEXT_KEYS, strict=strict, required=REQUIRED_TEXT)
        base = {f.name: f.default for f in dataclasses.fields(cls)}
        get = lambda k: d.get(k, base.get(k))  # noqa: E731
        L = as_int(get("num_hidden_layers"), "num_hidden_layers")
        heads = as_int(get("num_attention_heads"), "num_attention_heads")
        kv = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim", 128)
        if head_dim is None:  # older configs; HF falls back to hidden / heads
            head_dim = as_int(get("hidden_size"), "hidden_size") // heads

        rope_layers, chunked, moe, chunk = _layer_lists(d, L)
        theta, scaling = _rope_from_hf(d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            _fail("TextConfig", "hidden_act", f"only 'silu' is supported, got {act!r}")
        if d.get("attention_bias", False):
            _fail("TextConfig", "attention_bias", "attention biases are not part of Llama 4 and are not supported")
        eos = d.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        # Legacy Scout configs carry attn_temperature_tuning: 4; any truthy value switches it on.
        return cls(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_hidden_layers=L,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            intermediate_size=get("intermediate_size"), intermediate_size_mlp=get("intermediate_size_mlp"),
            num_local_experts=get("num_local_experts"), num_experts_per_tok=get("num_experts_per_tok"),
            moe_layers=tuple(int(i) for i in moe), rope_layers=rope_layers, chunked_layers=chunked,
            attention_chunk_size=chunk, use_qk_norm=bool(get("use_qk_norm")),
            attn_temperature_tuning=bool(get("attn_temperature_tuning")),
            floor_scale=as_float(get("floor_scale"), "floor_scale"),
            attn_scale=as_float(get("attn_scale"), "attn_scale"),
            rope_theta=theta, rope_scaling=scaling, rms_norm_eps=as_float(get("rms_norm_eps"), "rms_norm_eps"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            max_position_embeddings=get("max_position_embeddings"),
            bos_token_id=d.get("bos_token_id", 1), eos_token_id=eos, pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self) -> dict:
        """An HF ``llama4_text`` config dict with every derived list written out; ``from_hf`` inverts it."""
        rs = self.rope_scaling
        return dict(
            model_type="llama4_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, intermediate_size_mlp=self.intermediate_size_mlp,
            num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok,
            moe_layers=list(self.moe_layers), no_rope_layers=[int(r) for r in self.rope_layers],
            layer_types=["chunked_attention" if c else "full_attention" for c in self.chunked_layers],
            attention_chunk_size=self.attention_chunk_size, use_qk_norm=self.use_qk_norm,
            attn_temperature_tuning=self.attn_temperature_tuning,
            # transformers' strict config types floor_scale as int.
            floor_scale=int(self.floor_scale) if float(self.floor_scale).is_integer() else self.floor_scale,
            attn_scale=self.attn_scale, rope_theta=self.rope_theta,
            rope_scaling=None if rs is None else dict(rope_type="llama3", **dataclasses.asdict(rs)),
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id), pad_token_id=self.pad_token_id, hidden_act="silu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The MetaCLIP-style vision encoder, adapter and projector (HF ``Llama4VisionConfig``); see ``vision.py``."""

    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    vision_output_dim: int = 4096
    rope_theta: float = 10000.0

    def __post_init__(self):
        own = "VisionConfig"
        if self.hidden_size % self.num_attention_heads:
            _fail(own, "num_attention_heads", f"hidden_size={self.hidden_size} is not divisible by "
                  f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            _fail(own, "patch_size", f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        expect = round(self.hidden_size / self.pixel_shuffle_ratio ** 2)
        if self.intermediate_size != expect:
            _fail(own, "intermediate_size", f"must equal hidden_size / pixel_shuffle_ratio**2 = {expect} (it is the "
                  f"adapter's input width), got {self.intermediate_size}")

    @property
    def tokens_per_tile(self) -> int:
        """P' = (S / p)^2 r^2: the ``<|patch|>`` tokens each tile contributes (144 for Llama 4)."""
        return round((self.image_size // self.patch_size) ** 2 * self.pixel_shuffle_ratio ** 2)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], strict: bool = False) -> "VisionConfig":
        check_hf_keys(d, "VisionConfig", VISION_KEYS, strict=strict)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        rp = d.get("rope_parameters") or {}
        if "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Llama4Config:
    """A whole model: the text decoder and, for multimodal checkpoints, the vision tower."""

    text: TextConfig
    vision: VisionConfig | None = None
    image_token_index: int = 200092  # <|patch|>: the placeholder overwritten by image features
    boi_token_index: int = 200080
    eoi_token_index: int = 200081

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], strict: bool = False) -> "Llama4Config":
        """From an HF config dict (``llama4`` or ``llama4_text``); ``strict``: unknown keys are errors."""
        kind = d.get("model_type")
        if kind not in MODEL_TYPES:
            _fail("Llama4Config", "model_type", f"{kind!r} is not a Llama 4 model; expected one of {MODEL_TYPES}"
                  if kind is not None else f"missing; expected one of {MODEL_TYPES}")
        if kind == "llama4":
            check_hf_keys(d, "Llama4Config", FULL_KEYS, strict=strict, required=("text_config",))
            vision = d.get("vision_config")
            return cls(text=TextConfig.from_hf(d["text_config"], strict),
                       vision=VisionConfig.from_hf(vision, strict) if vision else None,
                       image_token_index=d.get("image_token_index", 200092),
                       boi_token_index=d.get("boi_token_index", 200080),
                       eoi_token_index=d.get("eoi_token_index", 200081))
        return cls(text=TextConfig.from_hf(d, strict))

    def to_hf(self) -> dict:
        """An HF config dict: ``llama4_text`` alone, or a full ``llama4`` config when there is a vision tower."""
        if self.vision is None:
            return self.text.to_hf()
        return dict(model_type="llama4", text_config=self.text.to_hf(),
                    vision_config=dict(dataclasses.asdict(self.vision), model_type="llama4_vision_model"),
                    image_token_index=self.image_token_index, boi_token_index=self.boi_token_index,
                    eoi_token_index=self.eoi_token_index)


def _layer_lists(d: Mapping[str, Any], L: int) -> tuple[tuple[bool, ...], tuple[bool, ...], list, int | None]:
    """(rope_layers, chunked_layers, moe_layers, attention_chunk_size) of an HF text config of L layers."""
    # HF no_rope_layers: 1 = the layer USES RoPE. Empty/None -> derived from the interval.
    no_rope = d.get("no_rope_layers")
    if not no_rope:
        interval = as_int(d.get("no_rope_layer_interval", 4), "no_rope_layer_interval")
        no_rope = [int((i + 1) % interval != 0) for i in range(L)]
    if any(v not in (0, 1, True, False) for v in no_rope):
        _fail("TextConfig", "no_rope_layers", f"entries must be 0 or 1, got {list(no_rope)}")
    rope_layers = tuple(bool(v) for v in no_rope)

    moe = d.get("moe_layers")
    if moe is None:
        step = as_int(d.get("interleave_moe_layer_step", 1), "interleave_moe_layer_step")
        moe = list(range(step - 1, L, step))

    chunk = d.get("attention_chunk_size", 8192)
    layer_types = d.get("layer_types")
    if layer_types is None:
        chunked = rope_layers
    else:
        unknown = sorted(set(layer_types) - {"chunked_attention", "full_attention"})
        if unknown:
            _fail("TextConfig", "layer_types", f"unknown attention types {unknown}; expected "
                  "'chunked_attention' or 'full_attention'")
        chunked = tuple(t == "chunked_attention" for t in layer_types)
    if chunk is None:  # e.g. Llama Guard 4: no chunking anywhere
        chunked = (False,) * len(chunked)
    return rope_layers, tuple(chunked), moe, chunk


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``rope_parameters`` (transformers 5) or legacy ``rope_scaling`` + ``rope_theta``."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = as_float(params.get("rope_theta", d.get("rope_theta", 500000.0)), "rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        _fail("TextConfig", "rope_scaling", f"unknown rope type {kind!r}; supported: 'default', 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in params]
    if missing:
        _fail("TextConfig", "rope_scaling", f"llama3 scaling is missing {missing}")
    f = {k: as_float(params[k], k, "rope_scaling") for k in ("factor", "low_freq_factor", "high_freq_factor")}
    return theta, RopeScaling(**f, original_max_position_embeddings=as_int(
        params["original_max_position_embeddings"], "original_max_position_embeddings", "rope_scaling"))


__all__ = ["ConfigError", "RopeScaling", "TextConfig", "VisionConfig", "Llama4Config"]
