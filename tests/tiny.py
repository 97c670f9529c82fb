"""Tiny random Hugging Face Llama 4 models, saved with save_pretrained, for parity tests.

Each config exercises a different part of the architecture; all use chunks of 8 and floor_scale 4, so that
sequences of ~20 tokens cross chunk boundaries and temperature tuning is active.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import jax
import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
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


# In Llama 4's order (ids 200000, 200001, 200005..200009, 200018, 200080, 200081, 200090, 200092 in the real vocab;
# here they follow the trained vocabulary in this order), then the tile separators (200084, 200085 in the real vocab;
# last here so that the ids of the others stay as the tests have them).
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>",
            "<|step|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
            "<|tile_x_separator|>", "<|tile_y_separator|>"]
CORPUS = ["Hello world, this is a tiny corpus for the tokenizer test.",
          "naïve café, crème brûlée and a piñata",
          "日本語のテキストと日本の文化", "Ελληνικά και русский текст",
          "emoji 🙂🚀 and math ∑∫√", "the quick brown fox jumps over the lazy dog"] * 4


def make_tokenizer(path: Path) -> int:
    """Write a small Llama-4-style tokenizer into ``path``: tokenizer.json (byte-level BPE + Llama 4 specials +
    BOS post-processor, like the real export), tokenizer_config.json and generation_config.json. Returns the id of
    the first special token (the trained vocabulary's size); the specials follow in SPECIALS order."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = tok.get_vocab_size()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", base)])
    tok.save(str(path / "tokenizer.json"))
    added = {str(base + i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                             "normalized": False, "single_word": False} for i, s in enumerate(SPECIALS)}
    # Declared only here, not in tokenizer.json: the wrapper must add it with this id.
    added[str(base + len(SPECIALS))] = {"content": "<|reserved_special_token_0|>", "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot|>", "special": True},
        "pad_token": "<|finetune_right_pad|>", "added_tokens_decoder": added,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    ids = {s: base + i for i, s in enumerate(SPECIALS)}
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]}))
    return base




VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
          "image_size": 28, "patch_size": 7, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48,
          "projector_output_dim": 48, "vision_output_dim": 48, "rope_theta": 10000}


def save_images(folder: Path) -> list[Path]:
    """A preprocessor config (28-px tiles, at most 6) and three PNG images in ``folder``: a wide one (several tiles
    and a thumbnail), then two that fit one tile."""
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 28, "width": 28}, "max_patches": 6, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:50, 0:90]
    images = [np.stack([x * 2, y * 5, (x + y) * 3], -1).astype(np.uint8),
              rng.integers(0, 256, (20, 25, 3), dtype=np.uint8), rng.integers(0, 256, (17, 26, 3), dtype=np.uint8)]
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"image{i}.png")
        Image.fromarray(im).save(paths[-1])
    return paths


def save_vlm(folder: Path):
    """A tiny random Llama4ForConditionalGeneration (the top2 text config, VISION) saved in ``folder`` with its
    tokenizer (``make_tokenizer``) and ``save_images``; norms and biases randomised (HF inits them to 1/0).
    Returns (the model, the image paths)."""
    from transformers import Llama4Config as HFConfig
    from transformers import Llama4ForConditionalGeneration
    base = make_tokenizer(folder)
    vocab = base + len(SPECIALS) + 1
    ids = {s: base + i for i, s in enumerate(SPECIALS)}
    torch.manual_seed(0)
    cfg = HFConfig(text_config=dict(CONFIGS["top2"], vocab_size=vocab + (-vocab % 8)),
                   vision_config=VISION, image_token_index=ids["<|patch|>"],
                   boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"])
    cfg._attn_implementation = "eager"
    model = Llama4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias") or n.startswith("vision_model.class") or "positional" in n:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return model, save_images(folder)


def grads_in_l4jax_layout(model, folder, loss, tmp: Path) -> dict:
    """The gradients of a torch ``loss`` of the HF ``model`` saved in ``folder``, mapped to l4jax names by the
    checkpoint converter itself (written to ``tmp`` as a checkpoint and read back)."""
    from safetensors.torch import save_file

    from l4jax import tree
    from l4jax.checkpoints import hf_import
    from l4jax.config import load_config
    model.zero_grad()
    loss.backward()
    save_file({n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters()},
              str(tmp / "model.safetensors"))
    shutil.copy(f"{folder}/config.json", tmp / "config.json")
    out: dict = {}
    for path, arr in hf_import.stream(tmp, load_config(folder)):
        tree.put(out, path, arr)
    return out


def damage_largest_file(folder: Path) -> Path:
    """Overwrite 64 bytes in the middle of the largest file under ``folder`` (a checkpoint's tensor data)."""
    f = max((p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    f.write_bytes(bytes(raw))
    return f


def writer_with(on_save):
    """A stand-in for ``l4jax_format.writer`` (to monkeypatch in): the real writer, whose ``save(path, ...)`` goes
    through ``on_save(n, path, save)``; n counts the saves from 1, ``save()`` does the real one."""
    from l4jax.checkpoints import l4jax_format

    real = l4jax_format.writer

    class Writer:
        def __init__(self):
            self.inner, self.n = real(), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def save(self, path, *args, **kw):
            self.n += 1
            return on_save(self.n, path, lambda: self.inner.save(path, *args, **kw))
    return Writer


def traced_peak(fn) -> int:
    """The peak of Python's traced allocations (numpy's included) while ``fn()`` runs, in bytes."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Training on the tiny preset (tests/train, tests/model/test_context.py).

def packed_batch(ids: np.ndarray, docs_per_row: int = 1) -> dict:
    """A batch dict as ``PackedDataset.batch`` gives it: rows of ``docs_per_row`` equal documents."""
    B, n = ids.shape
    seg = np.repeat(np.arange(1, docs_per_row + 1), n // docs_per_row)[None].repeat(B, 0).astype(np.int32)
    pos = (np.arange(n) % (n // docs_per_row))[None].repeat(B, 0).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], axis=1).astype(np.int32)
    loss_mask = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((B, 1), bool)], axis=1).astype(np.float32)
    return {"inputs": ids.astype(np.int32), "targets": targets, "segment_ids": seg, "positions": pos,
            "loss_mask": loss_mask}


def tiny_setup(**overrides):
    """The tiny preset, its train settings (32 tokens, 8 rows) and a batch of two documents per row."""
    from l4jax.config import load_config
    from l4jax.train.settings import TrainConfig
    config = load_config("tiny")
    tc = TrainConfig(seq_len=32, batch_size=8, steps=10, warmup_steps=2, lr=1e-2, **overrides)
    ids = np.random.default_rng(1).integers(3, 512, (8, 32))
    return config, tc, packed_batch(ids, docs_per_row=2)


def run_steps(trainer, batch, n=2, params=None):
    """n steps of ``trainer`` on one batch: (the losses, the weights after them)."""
    state, frozen = trainer.init_state(params)
    losses = []
    for _ in range(n):
        state, m = trainer.step(state, frozen, batch)
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state["params"])
