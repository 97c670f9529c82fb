"""Tiny random Hugging Face Llama 4 models, saved with save_pretrained, for parity tests.

Each config exercises a different part of the architecture; all use chunks of 8 and floor_scale 4, so that
sequences of ~20 tokens cross chunk boundaries and temperature tuning is active.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.1, rope_theta=10000.0, attn_temperature_tuning=True,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

CONFIGS = {
    # Scout-like: every layer MoE, QK-norm, llama3 scaling with Scout's 16/1/1 (empty smoothing band).
    "scout": dict(BASE, interleave_moe_layer_step=1, no_rope_layer_interval=4, num_hidden_layers=4, use_qk_norm=True,
                  rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 1.0, "original_max_position_embeddings": 16}),
    # Maverick-like: dense and MoE layers interleaved, no QK-norm, plain RoPE frequencies.
    "maverick": dict(BASE, interleave_moe_layer_step=2, no_rope_layer_interval=2, use_qk_norm=False),
    # Top-2 routing, smooth llama3 band (8/1/4), 8 experts.
    "top2": dict(BASE, num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=2,
                 no_rope_layer_interval=2, use_qk_norm=True,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}),
}


def hf_model(name: str, seed: int = 0, dtype=torch.float32, **overrides) -> Llama4ForCausalLM:
    """A random HF model with randomised norm weights (HF initialises them to 1, which would hide bugs)."""
    torch.manual_seed(seed)
    cfg = Llama4TextConfig(**dict(CONFIGS[name], **overrides), attn_implementation="eager")
    model = Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.to(dtype)


def save(model, folder) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


def batch(vocab: int = 300, lengths=(21, 16, 9), seed: int = 0):
    """Left-padded batch: ids [B, T], mask [B, T], HF-style positions (cumsum(mask) - 1, pads at 0)."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), T))
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    ids = np.where(mask > 0, ids, 0)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    return ids, mask, pos


def hf_logits(model, ids, mask, pos) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    return out.float().numpy()


def rel_err(ours, ref, mask) -> float:
    """max |ours - ref| over real tokens, relative to the largest reference logit."""
    sel = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ours, np.float32) - ref)[sel].max() / np.abs(ref[sel]).max())
