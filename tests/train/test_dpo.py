"""DPO: the loss sums equal the formula pair by pair; the trainer's loss and gradients equal a torch implementation
of the formula over transformers' logits (policy and reference different models, packed pairs, the SFT term); at
step 0 the loss is log 2 for every pair; under LoRA the reference is the model with its adapters off, held once."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import l4jax
from l4jax.config import ConfigError, load_config
from l4jax.data import corpus_dir
from l4jax.data.conversations import Example, Vision
from l4jax.data.preferences import Pair, PairedDataset, pack, read_jsonl
from l4jax.data.tokenizer import Tokenizer
from l4jax.model.decoder import stack_layers, unstack_layers
from l4jax.train import TrainConfig, Trainer
from l4jax.train.losses import dpo
from l4jax.train.lora import LoraConfig
from l4jax.train.settings import DistillSettings, DpoSettings
from tiny import grads_in_l4jax_layout, hf_model, save, save_vlm

DPO = dict(data=("pairs.jsonl",), data_format="preference", objective="dpo")


def test_dpo_sums_equal_the_formula_pair_by_pair():
    rng = np.random.default_rng(0)
    seg = np.array([[1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 0, 0], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0]], np.int32)
    pairs = np.array([[1, 1], [1, 0]], np.float32)
    mask = ((rng.random(seg.shape) < 0.7) & (seg > 0)).astype(np.float32)
    logp, ref = -rng.random((2, 2, 12)).astype(np.float32) * 3
    beta, w = 0.7, 0.3
    got = jax.device_get(dpo(logp, ref, mask, seg, pairs, beta=beta, sft_weight=w))
    want = {k: 0.0 for k in got}
    for b, p in ((0, 0), (0, 1), (1, 0)):
        c, r = seg[b] == 2 * p + 1, seg[b] == 2 * p + 2
        dc = float(((logp[b] - ref[b]) * mask[b])[c].sum())
        dr = float(((logp[b] - ref[b]) * mask[b])[r].sum())
        z = beta * (dc - dr)
        sft = -float((logp[b] * mask[b])[c].sum()) / mask[b][c].sum()
        loss = -math.log(1 / (1 + math.exp(-z)))
        for k, v in (("loss", loss + w * sft), ("dpo", loss), ("sft", sft), ("margin", z), ("accuracy", z > 0),
                     ("reward_chosen", beta * dc), ("reward_rejected", beta * dr), ("pairs", 1)):
            want[k] += v
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    same = jax.device_get(dpo(logp, logp, mask, seg, pairs, beta=beta))
    np.testing.assert_allclose(same["loss"], 3 * math.log(2), rtol=1e-6)
    assert same["margin"] == 0 and same["accuracy"] == 0


def test_dpo_settings_are_validated():
    with pytest.raises(ConfigError, match="TrainConfig.objective: 'dpo' with data format 'chat'"):
        TrainConfig(data=("x.jsonl",), data_format="chat", objective="dpo")
    with pytest.raises(ConfigError, match="train.dpo.beta: must be a number > 0"):
        TrainConfig.from_dict({"data": {"format": "preference", "files": ["x"]}, "objective": "dpo",
                               "dpo": {"beta": 0}})
    with pytest.raises(ConfigError, match="unknown key.*train.dpo|train.dpo.*gamma"):
        TrainConfig.from_dict({"data": {"format": "preference", "files": ["x"]}, "objective": "dpo",
                               "dpo": {"gamma": 1}})
    with pytest.raises(ConfigError, match="TrainConfig.distill: codistillation"):
        TrainConfig(**DPO, distill=DistillSettings())
    tc = TrainConfig.from_dict({"data": {"format": "preference", "files": ["x"]}, "objective": "dpo",
                                "dpo": {"beta": 0.5, "sft_weight": 1.0}})
    assert tc.dpo == DpoSettings(beta=0.5, sft_weight=1.0)


# -- against transformers -----------------------------------------------------------------------------------------
def synthetic_pairs(n: int = 3, prompt: int = 6, seed: int = 0) -> list[Pair]:
    """Random token pairs: a shared prompt then answers of different lengths (weights 1 on the answers)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        head = rng.integers(3, 300, prompt)
        seqs = []
        for length in (7 - k % 2, 5 + k):
            ids = np.concatenate([head, rng.integers(3, 300, length)]).astype(np.int32)
            seqs.append(Example(ids, np.r_[np.zeros(prompt), np.ones(length)].astype(np.float32), f"pair {k}"))
        out.append(Pair(*seqs, f"pair {k}"))
    return out


def torch_dpo(policy, reference, pairs, beta, sft_weight):
    """The DPO formula over transformers' logits, each sequence run alone: the mean over pairs."""
    def answer_logp(model, ex):
        ids = torch.tensor(ex.ids[None], dtype=torch.long)
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
        w = torch.tensor(ex.weights[1:])
        return (picked * w).sum(), (picked * w).sum() / w.sum()

    total = 0.0
    for p in pairs:
        (c, c_mean), (r, _) = answer_logp(policy, p.chosen), answer_logp(policy, p.rejected)
        with torch.no_grad():
            (rc, _), (rr, _) = answer_logp(reference, p.chosen), answer_logp(reference, p.rejected)
        z = beta * ((c - rc) - (r - rr))
        total = total - torch.nn.functional.logsigmoid(z) - sft_weight * c_mean
    return total / len(pairs)


@pytest.mark.slow  # a loss-and-gradient compile (~30 s on 2 cores) each
@pytest.mark.parametrize("moved", [False, True])
def test_loss_and_gradients_equal_torch_over_transformers(tmp_path, moved):
    """At step 0 (policy = reference: z = 0) and with a policy moved away from its reference (z from -0.6 to 1.5,
    where the sigmoid matters)."""
    beta, sft_weight = 4.0, 0.3
    policy = hf_model("scout", seed=0)
    reference = hf_model("scout", seed=0)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in policy.parameters() if moved else ():
            p.add_(0.2 * p.abs().mean() * torch.randn_like(p))
    pol_dir, ref_dir = save(policy, tmp_path / "policy"), save(reference, tmp_path / "reference")
    pairs = synthetic_pairs()
    ds = PairedDataset(pairs, seq_len=49, batch_size=2)
    assert ds.pairs_per_row == 2 and ds.rows == 2  # one row holds two pairs, the other one (its slot 2 padding)

    want_loss = torch_dpo(policy, reference, pairs, beta, sft_weight)
    (tmp_path / "g").mkdir()
    want = grads_in_l4jax_layout(policy, pol_dir, want_loss, tmp_path / "g")

    config = load_config(pol_dir)
    trainer = Trainer(config, TrainConfig(**DPO, seq_len=49, batch_size=2, dpo=DpoSettings(beta, sft_weight)))
    state, _ = trainer.init_state(l4jax.load(pol_dir).params)
    _, frozen = trainer.init_state(l4jax.load(ref_dir).params)  # the reference: other weights
    mb = jax.tree.map(jnp.asarray, ds.batch(0))

    def mean_loss(p):
        total, sums = trainer.loss(p, frozen, None, mb)
        return total / sums["pairs"]
    loss, grads = jax.value_and_grad(mean_loss)(state["params"])
    want_loss = float(want_loss.detach())
    assert abs(float(loss) - want_loss) < 1e-5 * want_loss, (float(loss), want_loss)
    if not moved:  # log 2 for the DPO term of every pair, plus the weighted SFT term
        terms = jax.device_get(trainer.pair_terms(state, frozen, ds.batch(0)))
        np.testing.assert_allclose(terms["dpo"][ds.batch(0)["pairs"][None] > 0], math.log(2), atol=1e-6)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(unstack_layers(grads, config.text))[0]:
        r = flat_ref[path]
        err = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
        assert err < 1e-4, (jax.tree_util.keystr(path), err)


# -- the reference ------------------------------------------------------------------------------------------------
def nbytes(t) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(t))


@pytest.mark.slow  # three train-step compiles at seq_len 384
def test_step_zero_is_log_2_and_lora_holds_the_base_once():
    config = load_config("tiny")
    tok = Tokenizer(corpus_dir())
    ds, _ = pack(read_jsonl([corpus_dir() / "preferences.jsonl"], tok)[:24], seq_len=384, batch_size=4)
    batch = ds.batch(0)
    base = jax.device_get(l4jax.init(config, seed=3).params)
    tc = TrainConfig(**DPO, seq_len=384, batch_size=4, lr=5e-3, warmup_steps=0, steps=8)
    lora = Trainer(config, tc.replace(lora=LoraConfig(rank=4)))
    state, frozen = lora.init_state(base)
    # The arguments of the compiled step: adapters, optimizer, the base once, the batch; nothing else.
    compiled = lora._step.lower(state, frozen, None, lora.put_batch(batch)).compile()
    assert nbytes(frozen) == nbytes(base)
    assert nbytes(state["params"]) < nbytes(base) / 10
    assert compiled.memory_analysis().argument_size_in_bytes == nbytes(state) + nbytes(frozen) + nbytes(batch)
    for trainer, (st, fr) in ((lora, (state, frozen)), (full := Trainer(config, tc), (None, None))):
        st, fr = (st, fr) if fr is not None else trainer.init_state(base)
        # policy = reference: every pair's loss is log 2, its margin 0
        terms = jax.device_get(trainer.pair_terms(st, fr, batch))
        held = batch["pairs"][None] > 0
        np.testing.assert_allclose(terms["dpo"][held], math.log(2), atol=1e-6)
        np.testing.assert_allclose(terms["margin"][held], 0.0, atol=1e-6)
        _, m = trainer.step(jax.tree.map(jnp.copy, st), fr, batch)
        assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-6) and float(m["pairs"]) == held.sum()
    # After training, LoRA's reference is the base: its loss equals full DPO's with the merged weights as the
    # policy and the base as the reference.
    losses = []
    for _ in range(4):
        state, m = lora.step(state, frozen, batch)
        losses.append(float(m["loss"]))  # (each before its step's update)
    assert losses[-1] < math.log(2) and float(m["accuracy"]) > 0.5
    mb = jax.tree.map(jnp.asarray, ds.batch(1))
    got = jax.jit(lora.loss)(state["params"], frozen, None, mb)[1]
    merged = jax.jit(lora.full_params)(state, frozen)
    _, full_frozen = full.init_state(base)
    want = jax.jit(full.loss)(stack_layers(merged, config.text), full_frozen, None, mb)[1]
    for k in ("loss", "margin", "reward_chosen", "reward_rejected"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow  # a tiny VLM's DPO step
def test_pairs_with_images_start_at_log_2_and_move(tmp_path):
    """Preference pairs whose prompt holds images (tiles carried by both sequences of a pair): log 2 per pair at
    step 0; after full-weight updates (the embeddings move) the reference is still the starting model."""
    save_vlm(tmp_path)
    model = l4jax.load(tmp_path)
    tok = Tokenizer(tmp_path)
    records = [{"prompt": [{"role": "user", "content": [{"type": "image", "path": f"image{i % 3}.png"},
                                                        {"type": "text", "text": "What is it?"}]}],
                "chosen": "Stripes." if i % 3 == 0 else "Noise.", "rejected": "A cat."} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    vision = Vision.for_model(model.config, tmp_path)
    pairs = read_jsonl([tmp_path / "pairs.jsonl"], tok, vision)
    T = max(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
    ds, _ = pack(pairs, seq_len=T, batch_size=4)
    batch = ds.batch(0)
    assert ds.has_images and batch["pixels"].shape[1] == ds.tiles_per_row
    tc = TrainConfig(**DPO, seq_len=T, batch_size=4, lr=1e-2, warmup_steps=0, steps=3)
    trainer = Trainer(model.config, tc, vision=model.vision_params)
    state, frozen = trainer.init_state(model.params)
    held = batch["pairs"][None] > 0
    np.testing.assert_allclose(jax.device_get(trainer.pair_terms(state, frozen, batch))["dpo"][held], math.log(2),
                               atol=1e-6)
    for _ in range(3):
        state, m = trainer.step(state, frozen, batch)
    terms = jax.device_get(trainer.pair_terms(state, frozen, batch))
    # The frozen reference is untouched by the donated steps: a fresh copy of the starting weights gives the same
    # margins.
    full = Trainer(model.config, tc, vision=model.vision_params)
    _, start = full.init_state(model.params)
    np.testing.assert_allclose(terms["margin"], jax.device_get(full.pair_terms(state, start, batch))["margin"],
                               rtol=1e-5, atol=1e-6)
    assert float(m["loss"]) < math.log(2) + 1e-3 and (terms["dpo"][held] < math.log(2)).all()
