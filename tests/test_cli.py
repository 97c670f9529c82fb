"""The l4jax command line, end to end on a tiny checkpoint with its own tokenizer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from l4jax import cli
from l4jax.cli import main
from l4jax.parallel import parse_mesh
from l4jax.data.chat import chat_prompt
from l4jax.data.tokenizer import Tokenizer
from tiny import hf_model, make_tokenizer, save


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    make_tokenizer(path)
    vocab = Tokenizer(path).vocab_size
    model = hf_model("top2", seed=11, vocab_size=vocab + (-vocab % 8))
    save(model, path)
    return path, model


def hf_text(model, tok, text, new):
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=list(tok.stop_ids()), pad_token_id=tok.pad_id)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("extra", [[], pytest.param(["--chat"], marks=pytest.mark.slow),
                                   pytest.param(["--mesh", "data=2,tensor=4"], marks=pytest.mark.slow)])
def test_generate_streams_the_same_text_as_transformers(folder, capsys, extra):
    path, model = folder
    prompt = "the quick brown fox"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "12", *extra]) == 0
    text = chat_prompt([{"role": "user", "content": prompt}]) if "--chat" in extra else prompt
    expect = hf_text(model, Tokenizer(path), text, 12)
    assert capsys.readouterr().out == expect + "\n"
    assert len(expect) > 0


@pytest.mark.slow
def test_generate_quantized_streams_the_text_of_the_quantized_handle(folder, capsys):
    """--quantize int8 loads as l4jax.load(..., quantize="int8") does: the CLI prints that handle's greedy text."""
    import l4jax
    path, _ = folder
    tok, prompt = Tokenizer(path), "the quick brown fox"
    ids = np.asarray([tok.encode(prompt, add_bos=True)])
    out = l4jax.load(path, quantize="int8").generate(ids, max_new_tokens=10, stop_tokens=tok.stop_ids())
    expect = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "10",
                 "--quantize", "int8"]) == 0
    assert capsys.readouterr().out == expect + "\n"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--quantize", "int3"]) == 2
    assert "quantize: expected one of ('int8', 'int4', 'fp8')" in capsys.readouterr().err


def test_generate_continues_a_conversation_with_tools(folder, capsys, tmp_path):
    path, model = folder
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What time is it?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "now", "arguments": {}}}]},
                {"role": "tool", "content": {"time": "12:00"}}]
    (tmp_path / "m.json").write_text(json.dumps({"messages": messages}))
    (tmp_path / "t.json").write_text(json.dumps(tools))
    assert main(["generate", "--model", str(path), "--messages", str(tmp_path / "m.json"), "--tools",
                 str(tmp_path / "t.json"), "--max-new-tokens", "6"]) == 0
    text = chat_prompt(messages, tools=tools)
    assert "<|python_start|><|python_end|>" in text and '"name": "now"' in text
    assert capsys.readouterr().out == hf_text(model, Tokenizer(path), text, 6) + "\n"
    (tmp_path / "bad.json").write_text('[{"role": "user", "content": "x"},]')
    for argv, message in ((["--prompt", "x", "--messages", str(tmp_path / "m.json")], "either --prompt"),
                          (["--messages", str(tmp_path / "bad.json")], "bad.json: not JSON (line 1"),
                          (["--messages", str(tmp_path / "t.json")], "expected a dict with a 'role'"),
                          (["--prompt", "x", "--tools", str(tmp_path / "nope.json")], "nope.json")):
        assert main(["generate", "--model", str(path), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_info_and_errors(folder, capsys):
    path, model = folder
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"text parameters: {sum(p.numel() for p in model.parameters()):,}" in out
    assert main(["generate", "--model", str(path / "nope"), "--prompt", "x"]) == 2
    assert "no config" in capsys.readouterr().err
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("data:2")
    assert parse_mesh("data=2,expert=2,tensor=2") == {"data": 2, "expert": 2, "tensor": 2}
    assert np.prod(list(parse_mesh("fsdp=8").values())) == 8


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_generate_from_converted_checkpoint(folder, capsys, tmp_path):
    path, model = folder
    assert main(["convert", "--from-hf", str(path), "--to", str(tmp_path / "l4")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "l4"), "--prompt", "hello world", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == hf_text(model, Tokenizer(path), "hello world", 8) + "\n"


@pytest.mark.slow
def test_generate_with_a_mesh_on_a_cpu_only_machine(folder):
    """No XLA_FLAGS set by hand: ``--mesh`` splits the host into as many simulated devices as the mesh needs, as
    ``l4jax train`` does, and the text is the single-device text."""
    path, model = folder
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "l4jax.cli", "generate", "--model", str(path), "--prompt", "hello world",
           "--max-new-tokens", "8", "--mesh", "data=2,tensor=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == hf_text(model, Tokenizer(path), "hello world", 8) + "\n"


def test_bad_prompt_bytes_and_token_counts_are_one_line_errors(folder, capsys):
    path, _ = folder
    assert main(["generate", "--model", str(path), "--prompt", os.fsdecode(b"caf\xe9 au lait")]) == 2
    assert capsys.readouterr().err == "l4jax: --prompt: not UTF-8 text (byte b'\\xe9' at character 3)\n"
    assert main(["generate", "--model", str(path), "--prompt", "hello", "--max-new-tokens", "-5"]) == 2
    assert capsys.readouterr().err == "l4jax: max_new_tokens: must be a positive integer, got -5\n"


def test_ctrl_c_is_exit_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    assert main(["train", "--config", "configs/tiny.yaml"]) == 130
    assert capsys.readouterr().err == ("l4jax train: interrupted; the run's checkpoints are kept: continue with "
                                       "--resume\n")


@pytest.mark.slow
def test_ctrl_c_during_training_then_resume(tmp_path):
    """A real SIGINT while the main job trains: exit 130, one line, no traceback; --resume then finishes the run."""
    repo, env = Path(__file__).resolve().parents[1], {**os.environ, "XLA_FLAGS": ""}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "l4jax.cli", "train", "--config", "configs/tiny.yaml", "--steps", "40", "--out",
           str(out)]
    # A test runner started in the background (`cmd &` in a script) ignores SIGINT, and children inherit that:
    # give the run the default disposition, so that Python installs its KeyboardInterrupt handler as in a terminal.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=repo,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.rstrip().endswith("interrupted; the run's checkpoints are kept: continue "
                                                             "with --resume")
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=repo, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model").is_dir()


@pytest.mark.parametrize("case", ["empty config.json", "gpt2 config.json", "lr: fast", "hidden_sise"])
def test_bad_files_through_the_cli_are_one_line(case, folder, tmp_path, capsys):
    """The issue's file cases through the commands a user types: exit 2, one line naming the culprit."""
    import yaml
    from l4jax.config import PRESET_DIR
    tiny = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
    if case.endswith("config.json"):
        (tmp_path / "config.json").write_text("{}" if case.startswith("empty") else '{"model_type": "gpt2"}')
        argv, culprit = ["info", str(tmp_path)], "config.json: Llama4Config.model_type"
    elif case == "lr: fast":
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**tiny, "train": {**tiny["train"], "lr": "fast"}}))
        argv, culprit = ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")], \
            "c.yaml: TrainConfig.lr: must be a number, got 'fast'"
    else:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**tiny, "hidden_sise": 64}))
        argv, culprit = ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")], \
            "TextConfig.hidden_sise: unknown field; did you mean 'hidden_size'?"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
