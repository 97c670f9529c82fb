"""Where every l4jax parameter lives in a Hugging Face Llama 4 checkpoint: the key, shape and transform of each.

One ``Source`` per l4jax parameter: the HF tensor it comes from (or a slice of it), whether the nn.Linear
[out, in] weight becomes an [in, out] kernel, and the final reshape (q/k/v/o split their heads). The text decoder's
keys sit under ``language_model.model.`` in a full ``llama4`` checkpoint and under ``model.`` in a text-only one;
the vision tower's under ``vision_model.`` and the projector's under ``multi_modal_projector.``. The importer
(``hf_import``) streams these one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..config import Llama4Config, TextConfig, VisionConfig

VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclasses.dataclass(frozen=True)
class Source:
    """One l4jax parameter, read from (a slice of) one HF tensor, optionally transposed, then reshaped."""

    key: str                        # HF tensor name
    shape: tuple[int, ...]          # expected HF shape
    path: tuple[str, ...]           # l4jax parameter path
    transpose: bool = False         # nn.Linear [out, in] -> kernel [in, out] (2-D tensors only)
    out_shape: tuple[int, ...] | None = None  # final reshape of the (transposed) tensor
    part: tuple[slice, ...] | None = None     # read only this slice of the HF tensor (first axis whole)

    @property
    def read_shape(self) -> tuple[int, ...]:
        """The shape of what is read: the slice ``part`` of the HF tensor, or all of it."""
        part = self.part or tuple(slice(None) for _ in self.shape)
        return tuple(len(range(*sl.indices(n))) for sl, n in zip(part, self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.read_shape)


def text_sources(cfg: TextConfig, prefix: str, head_key: str) -> list[Source]:
    """Every text parameter's HF origin. ``prefix`` is ``language_model.model.`` or ``model.``."""
    D, V, H, K, hd = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, F, Fm = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    out = [Source(prefix + "embed_tokens.weight", (V, D), ("embed",)),
           Source(prefix + "norm.weight", (D,), ("norm", "scale"))]
    if not cfg.tie_word_embeddings:
        out.append(Source(head_key, (V, D), ("lm_head",), transpose=True))
    for i in range(cfg.num_hidden_layers):
        hf, us = f"{prefix}layers.{i}.", (f"layers_{i}",)
        out += [
            Source(hf + "input_layernorm.weight", (D,), us + ("input_norm", "scale")),
            Source(hf + "post_attention_layernorm.weight", (D,), us + ("post_norm", "scale")),
            Source(hf + "self_attn.q_proj.weight", (H * hd, D), us + ("attn", "q"), True, (D, H, hd)),
            Source(hf + "self_attn.k_proj.weight", (K * hd, D), us + ("attn", "k"), True, (D, K, hd)),
            Source(hf + "self_attn.v_proj.weight", (K * hd, D), us + ("attn", "v"), True, (D, K, hd)),
            Source(hf + "self_attn.o_proj.weight", (D, H * hd), us + ("attn", "o"), True, (H, hd, D)),
        ]
        ff = hf + "feed_forward."
        if cfg.is_moe(i):
            moe = us + ("moe",)
            out += [
                Source(ff + "router.weight", (E, D), moe + ("router",), transpose=True),
                # Experts are stored [E, in, out] and used as x @ W: no transpose. gate_up is gate first, then up.
                Source(ff + "experts.gate_up_proj", (E, D, 2 * F), moe + ("gate",), part=np.s_[:, :, :F]),
                Source(ff + "experts.gate_up_proj", (E, D, 2 * F), moe + ("up",), part=np.s_[:, :, F:]),
                Source(ff + "experts.down_proj", (E, F, D), moe + ("down",)),
                Source(ff + "shared_expert.gate_proj.weight", (F, D), moe + ("shared", "gate"), transpose=True),
                Source(ff + "shared_expert.up_proj.weight", (F, D), moe + ("shared", "up"), transpose=True),
                Source(ff + "shared_expert.down_proj.weight", (D, F), moe + ("shared", "down"), transpose=True),
            ]
        else:
            out += [
                Source(ff + "gate_proj.weight", (Fm, D), us + ("mlp", "gate"), transpose=True),
                Source(ff + "up_proj.weight", (Fm, D), us + ("mlp", "up"), transpose=True),
                Source(ff + "down_proj.weight", (D, Fm), us + ("mlp", "down"), transpose=True),
            ]
    return out


def vision_sources(cfg: VisionConfig, text_hidden: int, prefix: str = "vision_model.",
                   projector_prefix: str = "multi_modal_projector.") -> list[Source]:
    """Every vision and projector parameter's HF origin."""
    D, H, F, p = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.patch_size
    hd = D // H
    P = (cfg.image_size // p) ** 2
    Din = round(D / cfg.pixel_shuffle_ratio ** 2)  # the pixel-shuffled width entering the adapter
    Dmid, Dout = cfg.projector_input_dim, cfg.projector_output_dim
    us = ("vision_model",)
    out = [
        Source(prefix + "patch_embedding.linear.weight", (D, cfg.num_channels * p * p), us + ("patch_embed",), True),
        Source(prefix + "class_embedding", (D,), us + ("class_embedding",)),
        Source(prefix + "positional_embedding_vlm", (P + 1, D), us + ("pos_embed",)),
        Source(prefix + "layernorm_pre.weight", (D,), us + ("pre_norm", "scale")),
        Source(prefix + "layernorm_pre.bias", (D,), us + ("pre_norm", "bias")),
        Source(prefix + "layernorm_post.weight", (D,), us + ("post_norm", "scale")),
        Source(prefix + "layernorm_post.bias", (D,), us + ("post_norm", "bias")),
        Source(prefix + "vision_adapter.mlp.fc1.weight", (Dmid, Din), us + ("adapter", "fc1"), True),
        Source(prefix + "vision_adapter.mlp.fc2.weight", (Dout, Dout), us + ("adapter", "fc2"), True),
        Source(projector_prefix + "linear_1.weight", (text_hidden, cfg.vision_output_dim), ("projector", "kernel"),
               True),
    ]
    for j in range(cfg.num_hidden_layers):
        hf, layer = f"{prefix}model.layers.{j}.", us + (f"layers_{j}",)
        attn, mlp = layer + ("attn",), layer + ("mlp",)
        for n in ("q", "k", "v"):
            out += [Source(f"{hf}self_attn.{n}_proj.weight", (D, D), attn + (n,), True, (D, H, hd)),
                    Source(f"{hf}self_attn.{n}_proj.bias", (D,), attn + (n + "_bias",), out_shape=(H, hd))]
        out += [
            Source(hf + "self_attn.o_proj.weight", (D, D), attn + ("o",), True, (H, hd, D)),
            Source(hf + "self_attn.o_proj.bias", (D,), attn + ("o_bias",)),
            Source(hf + "mlp.fc1.weight", (F, D), mlp + ("fc1",), True),
            Source(hf + "mlp.fc1.bias", (F,), mlp + ("fc1_bias",)),
            Source(hf + "mlp.fc2.weight", (D, F), mlp + ("fc2",), True),
            Source(hf + "mlp.fc2.bias", (D,), mlp + ("fc2_bias",)),
            Source(hf + "input_layernorm.weight", (D,), layer + ("input_norm", "scale")),
            Source(hf + "input_layernorm.bias", (D,), layer + ("input_norm", "bias")),
            Source(hf + "post_attention_layernorm.weight", (D,), layer + ("post_norm", "scale")),
            Source(hf + "post_attention_layernorm.bias", (D,), layer + ("post_norm", "bias")),
        ]
    return out


def layout(keys: list[str]) -> tuple[str, str] | None:
    """(text prefix, lm-head key) of a checkpoint's tensor names, or None when it holds no Llama 4 text keys."""
    if any(k.startswith("language_model.") for k in keys):
        return "language_model.model.", "language_model.lm_head.weight"
    if any(k.startswith("model.") for k in keys):
        return "model.", "lm_head.weight"
    return None


def sources(config: Llama4Config, prefix: str, head_key: str) -> list[Source]:
    """Every parameter's HF origin: the text decoder's, then the vision tower's when the config has one."""
    out = text_sources(config.text, prefix, head_key)
    if config.vision is not None:
        out += vision_sources(config.vision, config.text.hidden_size)
    return out
