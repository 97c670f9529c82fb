"""HF key mapping of the vision tower (``vision_model.*``) and the projector (``multi_modal_projector.*``).

Same ``Source`` records as ``text_sources``, so the loader streams them one tensor at a time. The l4jax paths are
those of ``vision.ImageEncoder``: ``vision_model/...`` and ``projector/kernel``. nn.Linear weights are [out, in]
and become [in, out] kernels; q/k/v split their output into (heads, head_dim), o its input.
"""

from __future__ import annotations

import numpy as np

from ..config import VisionConfig
from .hf import Source


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


def from_state_dict(sources: list[Source], tensors) -> dict:
    """Build the nested parameter dict from in-memory HF tensors (numpy-convertible), for tests and small models.
    Checkpoint folders should go through ``hf.load_source`` instead, which streams."""
    params: dict = {}
    for s in sources:
        if s.key not in tensors:
            raise KeyError(f"{s.key!r} is missing from the state dict")
        a = np.asarray(tensors[s.key])
        if a.shape != s.shape:
            raise ValueError(f"{s.key!r} has shape {list(a.shape)}, the config expects {list(s.shape)}")
        a = a[s.part] if s.part else a
        a = a.T if s.transpose else a
        a = a.reshape(s.out_shape) if s.out_shape else a
        node = params
        for k in s.path[:-1]:
            node = node.setdefault(k, {})
        node[s.path[-1]] = a
    return params
