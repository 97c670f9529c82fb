"""The l4jax command line, end to end on a tiny checkpoint with its own tokenizer."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from l4jax.cli import main
from l4jax.parallel import parse_mesh
from l4jax.data.tokenizer import Tokenizer, chat_prompt
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


@pytest.mark.parametrize("extra", [[], ["--chat"], ["--mesh", "data=2,tensor=4"]])
def test_generate_streams_the_same_text_as_transformers(folder, capsys, extra):
    path, model = folder
    prompt = "the quick brown fox"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "12", *extra]) == 0
    text = chat_prompt([{"role": "user", "content": prompt}]) if "--chat" in extra else prompt
    expect = hf_text(model, Tokenizer(path), text, 12)
    assert capsys.readouterr().out == expect + "\n"
    assert len(expect) > 0


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
