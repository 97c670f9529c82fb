"""Training: loss and gradients equal transformers', the sharded step equals the single-device step, gradient
accumulation and scan/remat change nothing, router terms reach the router, codistillation's limits, errors."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental.pallas import tpu as pltpu

import l4jax
from l4jax import data as data_lib
from l4jax.config import ConfigError, load_config
from l4jax.data import conversations, preferences
from l4jax.train.losses import codistillation, cross_entropy
from l4jax.model.decoder import unstack_layers
from l4jax.model.moe import router_losses
from l4jax.train.step import Trainer
from l4jax.train.settings import TrainConfig
from tiny import grads_in_l4jax_layout, hf_model, packed_batch, run_steps, save, save_vlm, tiny_setup

# Most tests here compile a train step (20-70 s each on 2 cores) and are marked slow; CI runs them.
T = 24  # crosses two chunk boundaries (chunk 8); floor_scale 4 makes temperature tuning active


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    model = hf_model("scout")
    return model, save(model, tmp_path_factory.mktemp("scout"))


def hf_grads_in_l4jax_layout(model, folder, ids, tmp) -> tuple[float, dict]:
    """transformers' loss and gradients, mapped to l4jax names by the checkpoint converter itself."""
    out = model(torch.tensor(ids), labels=torch.tensor(ids))
    return float(out.loss.detach()), grads_in_l4jax_layout(model, folder, out.loss, tmp)


@pytest.mark.parametrize("scan,remat,query_block,attention", [
    (True, "full", None, "xla"), pytest.param(False, "none", None, "xla", marks=pytest.mark.slow),
    # Global layers score 4 queries at a time, each piece only its visible keys, recomputed in the backward pass.
    pytest.param(True, "full", 4, "xla", marks=pytest.mark.slow),
    # The GPU's fused kernel, run here in Pallas' interpret mode: chunks and documents as its segments.
    pytest.param(True, "full", None, "flash_interpret", marks=pytest.mark.slow),
    # The TPU's flash kernel, likewise (its interpret mode holds while the loss and its gradient are traced; it
    # runs through host callbacks, which remat cannot recompute, so without remat here).
    pytest.param(False, "none", None, "flash_tpu", marks=pytest.mark.slow)])
def test_loss_and_gradients_equal_transformers(scout, tmp_path, scan, remat, query_block, attention):
    model, folder = scout
    ids = np.random.default_rng(0).integers(3, 300, (2, T))
    ref_loss, ref_grads = hf_grads_in_l4jax_layout(model, folder, ids, tmp_path)

    config = load_config(folder)
    trainer = Trainer(config, TrainConfig(seq_len=T, batch_size=2, scan=scan, remat=remat,
                                          query_block=query_block or 1024, attention_impl=attention))
    state, frozen = trainer.init_state(l4jax.load(folder).params)
    mb = jax.tree.map(jnp.asarray, packed_batch(ids))

    def mean_loss(p):
        total, sums = trainer.loss(p, frozen, None, mb)
        return total / sums["tokens"]
    with pltpu.force_tpu_interpret_mode() if attention == "flash_tpu" else contextlib.nullcontext():
        # finished in here: the interpret mode's host callbacks run jax, and a dispatch beside them can deadlock
        loss, grads = jax.block_until_ready(jax.value_and_grad(mean_loss)(state["params"]))
    assert abs(float(loss) - ref_loss) / ref_loss < 1e-5, (float(loss), ref_loss)
    grads = unstack_layers(grads, config.text) if scan else grads
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        r = flat_ref[path]
        err = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
        assert err < 1e-4, (jax.tree_util.keystr(path), err)


def chat_setup(kind: str, **overrides):
    """The tiny model on shipped chat conversations (split at messages to fit) or preference pairs (DPO)."""
    tok = data_lib.Tokenizer(data_lib.corpus_dir())
    if kind == "chat":
        examples = conversations.read_jsonl([data_lib.corpus_dir() / "chat.jsonl"], tok)[:40]
        ds, _ = conversations.pack(examples, seq_len=96, batch_size=8, too_long="split")
        fields = dict(data=("corpus-chat",), data_format="chat", too_long="split", seq_len=96)
    else:
        pairs = preferences.read_jsonl([data_lib.corpus_dir() / "preferences.jsonl"], tok)[:60]
        ds, _ = preferences.pack(pairs, seq_len=192, batch_size=8)
        fields = dict(data=("corpus-preferences",), data_format="preference", objective="dpo", seq_len=192)
    tc = TrainConfig(batch_size=8, steps=10, warmup_steps=2, lr=1e-2, **fields, **overrides)
    return load_config("tiny"), tc, ds.batch(0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "chat", "dpo"])
def test_sharded_step_equals_single_device(kind):
    # eps=1e-3: Adam's update is then linear in tiny gradients instead of ~lr * sign(g), so rounding differences
    # between the sharded and the single-device gradient stay rounding-sized in the weights.
    config, tc, batch = tiny_setup(eps=1e-3) if kind == "text" else chat_setup(kind, eps=1e-3)
    ref_losses, ref_params = run_steps(Trainer(config, tc), batch, n=3)
    mesh = l4jax.make_mesh(data=2, expert=2, tensor=2)
    sharded = Trainer(config, tc, mesh)
    losses, params = run_steps(sharded, batch, n=3)
    assert sharded._step._cache_size() == 1  # the initial state is laid out exactly like the step's output
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert ref_losses[2] < ref_losses[0]  # step 0 has lr 0 (warmup), so the weights move from step 1


@pytest.mark.slow
def test_gradient_accumulation_equals_one_batch():
    config, tc, batch = tiny_setup()
    ref, _ = run_steps(Trainer(config, tc), batch, n=2)
    acc, _ = run_steps(Trainer(config, tc.replace(grad_accum=4)), batch, n=2)
    np.testing.assert_allclose(acc, ref, rtol=1e-5)


@pytest.mark.slow
def test_router_terms_reach_the_router():
    # Analytic values: uniform router logits give P_e = 1/E, so load balance = E * sum_e f_e / E = 1; z = log(E)^2.
    logits = jnp.zeros((6, 4))
    lb, z = router_losses(logits, jnp.array([[0], [1], [1], [2], [3], [3]]))
    assert abs(float(lb) - 1.0) < 1e-6 and abs(float(z) - np.log(4) ** 2) < 1e-5

    config, tc, batch = tiny_setup()
    mb = jax.tree.map(lambda a: jnp.asarray(a), batch)

    def router_grad(**kw):
        trainer = Trainer(config, tc.replace(**kw))
        state, frozen = trainer.init_state()
        g = jax.grad(lambda p: trainer.loss(p, frozen, None, mb)[0])(state["params"])
        return np.asarray(g["blocks"]["layers_1"]["moe"]["router"]), trainer.loss(state["params"], frozen, None, mb)
    base, _ = router_grad()
    lb_grad, (_, sums) = router_grad(load_balance=1.0)
    z_grad, _ = router_grad(z_loss=1.0)
    assert float(sums["load_balance"]) / float(sums["tokens"]) >= 1.0 - 1e-6  # the minimum is 1 (balanced)
    assert np.abs(lb_grad - base).max() > 1e-6 and np.abs(z_grad - base).max() > 1e-6


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights():
    config, tc, batch = tiny_setup(compute_dtype="bfloat16")
    losses, params = run_steps(Trainer(config, tc), batch)
    ref, _ = run_steps(Trainer(config, tiny_setup()[1]), batch)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
    np.testing.assert_allclose(losses, ref, rtol=2e-2)


def test_codistillation_limits():
    rng = np.random.default_rng(0)
    s, t = jnp.asarray(rng.normal(size=(2, 5, 11))), jnp.asarray(3 * rng.normal(size=(2, 5, 11)))
    y = jnp.asarray(rng.integers(0, 11, (2, 5)))
    mask = jnp.asarray((rng.random((2, 5)) > 0.2).astype(np.float32))
    ce, n = cross_entropy(s, y, mask)
    zero, n0, _ = codistillation(s, t, y, mask, alpha=0.0, tau=2.0)
    assert float(zero) == pytest.approx(float(ce), rel=1e-6) and float(n0) == float(n)
    one, _, _ = codistillation(s, t, y, mask, alpha=1.0, tau=2.0)
    pt, ps = jax.nn.softmax(t / 2.0), jax.nn.softmax(s / 2.0)
    kl = (pt * (jnp.log(pt) - jnp.log(ps))).sum(-1) * 4.0
    assert float(one) == pytest.approx(float((kl * mask).sum()), rel=1e-5)
    # Confidence weighting: a = teacher's p(label), between the two limits; no gradient into the teacher.
    dyn, _, a_sum = codistillation(s, t, y, mask, alpha="confidence", tau=2.0)
    a = jnp.take_along_axis(jax.nn.softmax(t), y[..., None], -1)[..., 0]
    assert float(a_sum) == pytest.approx(float((a * mask).sum()), rel=1e-5)
    assert float(dyn) == pytest.approx(float(((a * kl + (1 - a) * -jnp.take_along_axis(
        jax.nn.log_softmax(s), y[..., None], -1)[..., 0]) * mask).sum()), rel=1e-5)
    gt = jax.grad(lambda t: codistillation(s, t, y, mask, alpha=0.5)[0])(t)
    assert float(jnp.abs(gt).max()) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        codistillation(s, t, y, mask, alpha=1.5)


def test_errors_name_the_field():
    config, tc, _ = tiny_setup()
    with pytest.raises(ConfigError, match="batch_size.*data x fsdp = 8"):
        Trainer(config, tc.replace(batch_size=4), l4jax.make_mesh(data=8))
    with pytest.raises(ConfigError, match="grad_accum=3"):
        tc.replace(grad_accum=3)
    with pytest.raises(ConfigError, match="remat"):
        tc.replace(remat="sometimes")
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown field; did you mean 'lr'\?"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="TrainConfig.lr: must be a number, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(ConfigError, match="TrainConfig.b2: must be a number, got None"):
        TrainConfig.from_dict({"b2": None})
    with pytest.raises(ConfigError, match="seq_len: 8192 is longer than the model's max_position_embeddings 4096"):
        Trainer(config, tc.replace(seq_len=8192))
    assert json.dumps(tc.to_dict())  # the run description stored in checkpoints is plain JSON


@pytest.mark.slow  # train-step compiles of a tiny VLM, single device and a mesh
def test_a_chat_step_with_images_equals_the_multimodal_forward(tmp_path):
    """Conversations with images packed into rows (each row its own tiles): the step's cross-entropy equals the mean
    of -log p over the assistant tokens with each conversation run alone through the multimodal model (whose
    logits equal transformers', tests/model/test_vision.py); the sharded step gives the same."""
    save_vlm(tmp_path)
    model = l4jax.load(tmp_path)
    tok = data_lib.Tokenizer(tmp_path)
    ask = lambda *images: [*({"type": "image", "path": f"image{i}.png"} for i in images),  # noqa: E731
                           {"type": "text", "text": "What is this?"}]
    chats = [[{"role": "user", "content": ask(0)}, {"role": "assistant", "content": "Stripes."}],
             [{"role": "user", "content": ask(1, 2)}, {"role": "assistant", "content": "Noise, twice."},
              {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
             [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}],
             [{"role": "user", "content": ask(2)}, {"role": "assistant", "content": "Noise."}]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    vision = conversations.Vision.for_model(model.config, tmp_path)
    examples = conversations.read_jsonl([tmp_path / "chat.jsonl"], tok, vision)
    T = 2 * max(len(e.ids) for e in examples)
    ds, report = conversations.pack(examples, seq_len=T, batch_size=2)
    assert ds.has_images and report["used"] == 4
    batch = ds.batch(0)
    assert set(batch["segment_ids"].max(1)) == {2}  # two conversations a row
    tc = TrainConfig(data=("chat.jsonl",), data_format="chat", seq_len=T, batch_size=2, warmup_steps=0)
    trainer = Trainer(model.config, tc, vision=model.vision_params)
    state, frozen = trainer.init_state(model.params)
    _, metrics = trainer.step(state, frozen, batch)

    total, count = 0.0, 0.0
    for e in examples:
        logits = np.asarray(model(e.ids[None], pixel_values=e.pixels)).astype(np.float64)[0, :-1]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        picked = logp[np.arange(len(e.ids) - 1), e.ids[1:]]
        total -= float((picked * e.weights[1:]).sum())
        count += float(e.weights[1:].sum())
    assert float(metrics["tokens"]) == count
    np.testing.assert_allclose(float(metrics["ce"]), total / count, rtol=2e-5)

    sharded = Trainer(model.config, tc, l4jax.make_mesh(data=2, expert=2, tensor=2), vision=model.vision_params)
    state, frozen = sharded.init_state(model.params)
    _, m = sharded.step(state, frozen, batch)
    np.testing.assert_allclose(float(m["ce"]), float(metrics["ce"]), rtol=1e-5)
