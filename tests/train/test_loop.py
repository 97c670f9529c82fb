"""The training loop: loss falls on the shipped corpus, exact resume, restore onto another mesh, a save killed
midway, non-finite losses, mismatched checkpoints, LoRA and codistillation runs, and the CLI's main job."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import Llama4ForCausalLM

import l4jax
from l4jax import data as data_lib
from l4jax.checkpoints.train_state import CheckpointMismatch, Checkpoints
from l4jax.config import load_config
from l4jax.data.tokenizer import Tokenizer
from l4jax.model.decoder import stack_layers, unstack_layers
from l4jax.train import lora as lora_lib
from l4jax.train import lora_files
from l4jax.train.lora import LoraConfig
from l4jax.train.loop import TrainingError, _check, run
from l4jax.train.run_folder import RunFolderError
from l4jax.train.settings import TrainConfig
from l4jax.train.step import Trainer
from tiny import damage_largest_file, save_vlm

# Each run compiles a train step (~10-20 s on 2 cores), so most of these are marked slow (CI runs them).
SMALL = dict(seq_len=32, batch_size=8, steps=6, warmup_steps=1, lr=1e-2, save_every=3, log_every=1)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small slice of the shipped corpus (a few fables), so each run tokenizes in well under a second."""
    docs = data_lib.read_documents(data_lib.corpus_files())[:40]
    f = tmp_path_factory.mktemp("text") / "fables.txt"
    f.write_text("\n\f\n".join(docs))
    return str(f)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


@pytest.mark.slow
def test_resume_gives_bit_identical_losses(text, tmp_path):
    config, tc = load_config("tiny"), TrainConfig(data=(text,), **SMALL)
    run(config, tc, tmp_path / "straight", progress=False)
    run(config, tc, tmp_path / "resumed", progress=False, stop_after=3)
    assert Checkpoints(tmp_path / "resumed" / "checkpoints", save_every=3, keep=3).latest() == 3
    run(config, tc, tmp_path / "resumed", progress=False, resume=True)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 6
    assert straight == resumed  # bit-exact on the CPU, not approximately
    assert straight[-1] < straight[0]
    # The exported model reproduces the trained weights: reload it and check it runs to the same vocabulary.
    model = l4jax.load(tmp_path / "straight" / "model")
    assert model(np.array([[1, 20, 30]])).shape == (1, 3, 512)


@pytest.mark.slow
def test_chat_fine_tune_from_the_cli_resumes_bit_exactly(tmp_path):
    """configs/tiny-sft.yaml from a base model: conversations on assistant turns only, LoRA; a run stopped and
    resumed computes the losses of one that was not, and the CLI says what it used."""
    base = l4jax.init(load_config("tiny"), seed=0)
    base.save(tmp_path / "base", side_files_from=data_lib.corpus_dir())
    config = load_config("tiny-sft")
    tc = TrainConfig.from_yaml("tiny-sft").replace(init_from=str(tmp_path / "base"), seq_len=256, batch_size=4,
                                                   steps=4, save_every=2, log_every=1)
    run(config, tc, tmp_path / "straight", progress=False)
    run(config, tc, tmp_path / "resumed", progress=False, stop_after=2)
    run(config, tc, tmp_path / "resumed", progress=False, resume=True)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "straight")) == 4
    assert (tmp_path / "straight" / "adapters").is_dir() and (tmp_path / "straight" / "model").is_dir()
    cli = subprocess.run([sys.executable, "-m", "l4jax.cli", "train", "--config", "tiny-sft", "--init-from",
                          str(tmp_path / "base"), "--steps", "2", "--out", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "chat data: 373 of 373 conversations (0 longer than a row of 257 dropped)" in cli.stdout


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [True, False])
def test_dpo_resumes_bit_exactly(tmp_path, adapters):
    """configs/tiny-dpo.yaml from a base model (LoRA: the reference is the base; full: a frozen copy of it); a run
    stopped and resumed computes the losses and margins of one that was not; the CLI says what data it used."""
    base = l4jax.init(load_config("tiny"), seed=0)
    base.save(tmp_path / "base", side_files_from=data_lib.corpus_dir())
    config = load_config("tiny-dpo")
    tc = TrainConfig.from_yaml("tiny-dpo").replace(init_from=str(tmp_path / "base"), batch_size=4, steps=4,
                                                   save_every=2, log_every=1)
    if not adapters:
        tc = dataclasses.replace(tc, lora=None, seq_len=192)  # pairs longer than a 193-token row are dropped
    run(config, tc, tmp_path / "straight", progress=False)
    run(config, tc, tmp_path / "resumed", progress=False, stop_after=2)
    run(config, tc, tmp_path / "resumed", progress=False, resume=True)
    straight, resumed = (metrics(tmp_path / name) for name in ("straight", "resumed"))
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed] and len(straight) == 4
    assert [m["margin"] for m in straight] == [m["margin"] for m in resumed]
    assert straight[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # step 0: the policy is the reference
    assert straight[-1]["loss"] != straight[0]["loss"]  # the policy has moved off the reference
    assert (tmp_path / "straight" / "model").is_dir()
    assert (tmp_path / "straight" / "adapters").is_dir() == adapters
    if adapters:
        cli = subprocess.run([sys.executable, "-m", "l4jax.cli", "train", "--config", "tiny-dpo", "--init-from",
                              str(tmp_path / "base"), "--steps", "1", "--out", str(tmp_path / "cli")],
                             capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""})
        assert cli.returncode == 0, cli.stderr[-3000:]
        assert "preference data: 372 of 372 preference pairs (0 longer than a row of 385 dropped" in cli.stdout


@pytest.mark.slow
def test_restore_onto_another_mesh(text, tmp_path):
    config = load_config("tiny")
    tc = TrainConfig(data=(text,), **dict(SMALL, steps=3))
    run(config, tc, tmp_path, progress=False, mesh=l4jax.make_mesh(data=2, expert=2, tensor=2))
    ckpts = Checkpoints(tmp_path / "checkpoints", save_every=3, keep=3)
    expect = {"model": config.text.to_hf()}
    states = {}
    for name, mesh in (("fsdp8", l4jax.make_mesh(fsdp=8)), ("single", None)):
        trainer = Trainer(config, tc, mesh)
        state = ckpts.restore(3, trainer.abstract_state(), expect)
        if mesh is not None:
            gate = state["params"]["blocks"]["layers_1"]["moe"]["gate"]
            assert gate.sharding.spec[2] == "fsdp"  # laid out for the new mesh: the model dimension over fsdp
        batch = data_lib.PackedDataset(data_lib.tokenize(data_lib.read_documents([text]), _tok()), 32, 8).batch(3)
        states[name] = float(trainer.step(state, {}, batch)[1]["loss"])
    assert states["fsdp8"] == pytest.approx(states["single"], rel=1e-5)


def _tok():
    return Tokenizer(data_lib.corpus_dir())


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(text, tmp_path):
    # An absurd learning rate: step 1 is finite (its loss is computed before the update), then the weights blow up.
    tc = TrainConfig(data=(text,), **dict(SMALL, lr=1e30, warmup_steps=0, save_every=1))
    with pytest.raises(TrainingError, match=r"step \d+: loss .*(nan|inf|NOT finite)"):
        run(load_config("tiny"), tc, tmp_path, progress=False)
    ckpts = Checkpoints(tmp_path / "checkpoints", save_every=1, keep=3)
    good = ckpts.latest()
    assert good is not None
    state = ckpts.restore(good, Trainer(load_config("tiny"), tc).abstract_state(), {})
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_init_from_a_model_of_another_shape_names_the_fields(text, tmp_path):
    other = l4jax.init(load_config({**load_config("tiny").text.to_hf(), "hidden_size": 64, "vocab_size": 520}))
    other.save(tmp_path / "other")
    tc = TrainConfig(data=(text,), **dict(SMALL, steps=1), init_from=str(tmp_path / "other"))
    with pytest.raises(TrainingError, match=r"--init-from .*other: its weights have another shape than the "
                                            r"config's \(vocab_size 520 vs 512; hidden_size 64 vs 128: --init-from "
                                            r"vs config\)"):
        run(load_config("tiny"), tc, tmp_path / "run", progress=False)


def test_a_non_finite_step_says_what_is_kept():
    bad = {"loss": float("nan"), "grad_norm": 1.0, "params_finite": True}
    with pytest.raises(TrainingError, match="step 3: loss nan.*no checkpoint was saved before it"):
        _check(3, bad, None)
    with pytest.raises(TrainingError, match="step 7: .*NOT finite.*the checkpoint of step 5 is kept"):
        _check(7, dict(bad, loss=2.0, params_finite=False), 5)
    assert _check(2, dict(bad, loss=2.0), None)["loss"] == 2.0


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_checkpoint(text, tmp_path, capsys):
    """Step 6's bytes damaged after the save: --resume says so, names both steps and goes on from step 3."""
    config, tc = load_config("tiny"), TrainConfig(data=(text,), **dict(SMALL, steps=9))
    run(config, tc, tmp_path, progress=False, stop_after=6)
    damage_largest_file(tmp_path / "checkpoints" / "6" / "state")
    capsys.readouterr()
    run(config, tc, tmp_path, progress=False, resume=True)
    err = capsys.readouterr().err
    assert "step 6: damaged" in err or "step 6: unreadable" in err
    assert "step 6 is damaged; resuming from step 3" in err
    assert Checkpoints(tmp_path / "checkpoints", save_every=3, keep=3).latest() == 9


@pytest.mark.slow
def test_resume_with_no_checkpoint_says_so_and_starts_at_step_0(text, tmp_path, capsys):
    tc = TrainConfig(data=(text,), **dict(SMALL, steps=1))
    run(load_config("tiny"), tc, tmp_path / "new", progress=False, resume=True)
    assert f"--resume: no checkpoint in {tmp_path / 'new' / 'checkpoints'} yet" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_from_another_model_shape_names_the_field(text, tmp_path):
    tc = TrainConfig(data=(text,), **dict(SMALL, steps=3))
    run(load_config("tiny"), tc, tmp_path, progress=False)
    other = load_config({**load_config("tiny").text.to_hf(), "hidden_size": 64})
    with pytest.raises(CheckpointMismatch, match="hidden_size: checkpoint 128, now 64"):
        run(other, tc.replace(steps=6), tmp_path, progress=False, resume=True)
    with pytest.raises(RunFolderError, match="holds an earlier run .pass --resume"):
        run(load_config("tiny"), tc, tmp_path, progress=False)


@pytest.mark.slow
def test_lora_run_trains_adapters_only_and_merge_reproduces_the_adapted_logits(text, tmp_path):
    config = load_config("tiny")
    base = l4jax.init(config, seed=0)
    base.save(tmp_path / "base")
    tc = TrainConfig(data=(text,), init_from=str(tmp_path / "base"), lora=LoraConfig(rank=4),
                     **dict(SMALL, steps=3))
    run(config, tc, tmp_path / "run", progress=False, export_hf=True)
    adapters, lcfg = lora_files.load(tmp_path / "run" / "adapters")
    saved = {k for k, _ in lora_lib.adapters(adapters)}
    assert saved and all(path[-1] in ("q", "k", "v", "o") for path in saved)
    assert any(np.abs(np.asarray(v["b"])).max() > 0 for _, v in lora_lib.adapters(adapters))  # trained
    # The adapted model computed from the base and the adapters equals the merged export.
    ids = np.array([[1, 40, 41, 42, 43]])
    adapted = unstack_layers(lora_lib.merge(stack_layers(base.params, config.text), adapters, lcfg), config.text)
    expected = l4jax.Model(config, adapted)(ids)
    merged = l4jax.load(tmp_path / "run" / "model")
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(expected), atol=1e-5)
    assert np.abs(np.asarray(expected) - np.asarray(base(ids))).max() > 1e-4
    # --export-hf: the adapters in the PEFT layout, applied by peft to the base model in transformers.
    base.save_pretrained(tmp_path / "base-hf")
    hf_base = Llama4ForCausalLM.from_pretrained(tmp_path / "base-hf", attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(hf_base, str(tmp_path / "run" / "peft")).eval()
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ref, np.asarray(expected), atol=1e-4)


@pytest.mark.slow
def test_codistillation_run_with_a_teacher(text, tmp_path):
    config = load_config("tiny")
    l4jax.init(config, seed=7).save(tmp_path / "teacher")
    tc = TrainConfig(data=(text,), **dict(SMALL, steps=2))
    last = run(config, tc, tmp_path / "run", progress=False, teacher_dir=str(tmp_path / "teacher"))
    assert 0.0 < last["alpha"] < 1.0  # the teacher's confidence weights soft against hard targets
    assert np.isfinite(last["loss"]) and last["loss"] != last["ce"]


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_checkpoint(text, tmp_path):
    """A child process trains, saves step 2, then is SIGKILLed while writing step 4."""
    script = textwrap.dedent(f"""
        import os, signal
        os.environ["JAX_PLATFORMS"] = "cpu"
        import l4jax.checkpoints.train_state as ck
        from l4jax.config import load_config
        from l4jax.train.settings import TrainConfig
        from l4jax.train.loop import run
        real = ck.Checkpoints.save
        def save(self, step, state, meta, force=False):
            out = real(self, step, state, meta, force=force)
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # the async write of step 4 is still under way
            self.wait()
            return out
        ck.Checkpoints.save = save
        run(load_config("tiny"), TrainConfig(data=({text!r},), seq_len=32, batch_size=8, steps=6, save_every=2,
            warmup_steps=1), {str(tmp_path)!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == -9, proc.stderr[-2000:]
    config, tc = load_config("tiny"), TrainConfig(data=(text,), seq_len=32, batch_size=8, steps=6, save_every=2)
    ckpts = Checkpoints(tmp_path / "checkpoints", save_every=2, keep=3)
    assert ckpts.latest() == 2
    state = ckpts.restore(2, Trainer(config, tc).abstract_state(), {})
    assert int(state["step"]) == 2
    run(config, tc, tmp_path, progress=False, resume=True)  # and training continues from it
    assert ckpts.latest() == 6 or Checkpoints(tmp_path / "checkpoints", save_every=2, keep=3).latest() == 6


@pytest.mark.slow
def test_main_job_cli_trains_then_generates(main_job):
    """The README's two commands (the training run is the session's, shared with the tests that need a trained
    model): the loss falls on the shipped corpus as the README says, then generate prints text."""
    env = {**os.environ, "XLA_FLAGS": ""}  # the CLI sets up its own 8 simulated devices
    out = main_job
    seen = losses(out)
    assert seen[0] > 5.5 and seen[-1] < 4.0, seen  # README: about 6.2 to about 3.6 (first logged: step 10)
    ids = np.array([[1, 20, 30, 40]])  # --export-hf: the HF folder holds the same model
    np.testing.assert_array_equal(np.asarray(l4jax.load(out / "hf")(ids)), np.asarray(l4jax.load(out / "model")(ids)))
    assert (out / "hf" / "tokenizer.json").is_file()
    gen = subprocess.run([sys.executable, "-m", "l4jax.cli", "generate", "--model", str(out / "model"),
                          "--prompt", "The fox", "--max-new-tokens", "20"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert len(gen.stdout.strip()) > 0


@pytest.mark.slow
def test_a_run_on_chat_with_images_resumes_and_exports_the_vision_tower(tmp_path):
    """A VLM fine-tuned (LoRA) on conversations with images: resumes bit-exactly; the exported model keeps the
    (frozen) vision tower and reads images."""
    model_dir = tmp_path / "vlm"
    model_dir.mkdir()
    save_vlm(model_dir)
    chats = [[{"role": "user", "content": [{"type": "image", "path": f"vlm/image{i % 3}.png"},
                                           {"type": "text", "text": f"Picture {i}?"}]},
              {"role": "assistant", "content": "A picture." if i % 2 else "Noise."}] for i in range(8)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    config = load_config(model_dir)
    tc = TrainConfig(data=(str(tmp_path / "chat.jsonl"),), data_format="chat", init_from=str(model_dir),
                     lora=LoraConfig(rank=4), **dict(SMALL, seq_len=128, batch_size=4, steps=4, save_every=2))
    run(config, tc, tmp_path / "straight", progress=False)
    run(config, tc, tmp_path / "resumed", progress=False, stop_after=2)
    run(config, tc, tmp_path / "resumed", progress=False, resume=True)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") and len(losses(tmp_path / "straight")) == 4
    trained, base = l4jax.load(tmp_path / "straight" / "model"), l4jax.load(model_dir)
    assert trained.vision_params is not None
    for a, b in zip(jax.tree.leaves(trained.vision_params), jax.tree.leaves(base.vision_params)):
        np.testing.assert_array_equal(a, b)  # the tower was frozen
