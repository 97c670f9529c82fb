"""Logits parity with transformers' Llama4ForCausalLM (eager) on tiny random checkpoints."""

import numpy as np
import pytest
import torch

import l4jax
from tiny import CONFIGS, batch, hf_logits, hf_model, rel_err, save


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_transformers(name, tmp_path):
    model = hf_model(name)
    ours = l4jax.load(save(model, tmp_path))
    ids, mask, pos = batch()
    ref = hf_logits(model, ids, mask, pos)
    assert rel_err(ours(ids, mask), ref, mask) <= 1e-4


def test_unpadded_call_matches_transformers_defaults(tmp_path):
    model = hf_model("scout", seed=1)
    ours = l4jax.load(save(model, tmp_path))
    ids = np.random.default_rng(3).integers(0, 300, size=(2, 27))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    assert rel_err(ours(ids), ref, np.ones_like(ids)) <= 1e-4


def test_bf16_logits_close_to_transformers(tmp_path):
    """bf16 weights and activations. Documented tolerance: 3% of the largest logit, against both the reference's
    bf16 run and its fp32 run. Measured (2026-11-24): 1.4-1.6% vs HF bf16, 0.8-1.3% vs HF fp32, while HF bf16 itself
    is 1.3-1.7% from HF fp32 (its eager softmax runs in bf16; ours runs in fp32)."""
    model = hf_model("top2", seed=2, dtype=torch.bfloat16)
    ours = l4jax.load(save(model, tmp_path))
    assert ours.dtype == np.dtype("bfloat16")
    ids, mask, pos = batch()
    logits = ours(ids, mask)
    assert rel_err(logits, hf_logits(model, ids, mask, pos), mask) <= 3e-2
    assert rel_err(logits, hf_logits(hf_model("top2", seed=2), ids, mask, pos), mask) <= 3e-2
