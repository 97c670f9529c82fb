"""``l4jax plan`` on this machine's CPU (the compilers for H100s and TPUs are optional extras; see
test_accelerators.py): the real steps compile from abstract shapes, the memory plan holds the arguments a hand count
gives, bad targets and meshes fail with one line, and the JSON output has its documented fields."""

import json

import jax.numpy as jnp
import pytest

import l4jax
from l4jax.cli import main
from l4jax.parallel import make_mesh
from l4jax.plan import report
from l4jax.plan.costs import cache_bytes, weights
from l4jax.plan.planner import Request, plan
from l4jax.plan.programs import decode_program
from l4jax.plan import targets
from l4jax.plan.targets import PlanError, parse_target


def test_targets():
    assert parse_target("h100").topology == "1x1x1" and parse_target("h100x8").devices == 8
    t = parse_target("H100x8x4")
    assert (t.topology, t.devices, t.chip.platform) == ("1x4x8", 32, "cuda")
    assert parse_target("v5p:4x4x4").devices == 64 and parse_target("v5e:2x2").chip.memory == 16 << 30
    assert parse_target("cpu").chip.platform == "cpu"
    with pytest.raises(PlanError, match="expected h100"):
        parse_target("a100x8")


def test_argument_bytes_are_the_hand_count():
    """The decode loop on 8 CPU devices (expert=2, tensor=4): what each device holds, from the shardings, against
    the parameter bytes and cache bytes counted by hand, and against the compiled program's own memory plan."""
    config = l4jax.load_config("tiny")
    program = decode_program(config, make_mesh(expert=2, tensor=4), batch=2, cache=64, dtype=jnp.bfloat16)
    held = report.argument_bytes(program)
    total = 2 * weights(config.text).total + cache_bytes(config.text, 2, 64, 2) + 2 * 512 * 4 + 2 * 64 * 4
    assert total / 8 < held < total  # sharded: more than an even split (norms, kv heads replicated), less than all
    compiled = program.fn.trace(*program.args, **program.kwargs).lower().compile()
    assert compiled.memory_analysis().argument_size_in_bytes == held
    parts = report.held_bytes(program)  # the named parts: within the arguments, each by its own hand count
    assert set(parts) == {"weights", "cache"} and sum(parts.values()) < held
    assert 2 * weights(config.text).total / 8 < parts["weights"] < 2 * weights(config.text).total
    # 2 kv heads do not split over tensor=4: every device holds the whole cache (and its position counter).
    assert 0 <= parts["cache"] - cache_bytes(config.text, 2, 64, 2) <= 16


def test_cpu_plan_of_a_decode_step(capsys):
    assert main(["plan", "--model", "tiny", "--target", "cpu", "--task", "decode", "--batch", "2", "--cache", "64",
                 "--mesh", "expert=2,tensor=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "target", "chip", "devices", "mesh", "task", "shapes", "memory", "capacity", "fits", "program",
            "costs", "bound", "compile_seconds", "error"} <= set(out)
    assert out["devices"] == 8 and out["mesh"] == {"data": 1, "fsdp": 1, "context": 1, "expert": 2, "tensor": 4}
    m = out["memory"]
    assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] > 0
    assert out["program"]["kernels"] > 0 and out["program"]["collectives"].get("all-reduce", 0) > 0
    assert out["fits"] is None and out["bound"]["seconds"] is None  # no datasheet for a CPU
    held = out["held_per_device"]
    assert set(held) == {"weights", "cache"} and sum(held.values()) <= m["arguments"]


def test_bad_requests_fail_with_one_line(capsys):
    argv = ["plan", "--model", "tiny", "--target", "cpu", "--task", "decode"]
    assert main(argv) == 2
    assert "has 8 devices: give --mesh" in capsys.readouterr().err
    assert main(argv + ["--mesh", "tensor=4"]) == 2  # the same ShardingError as at run time
    assert "= 4 devices, but there are 8" in capsys.readouterr().err
    assert main(argv + ["--mesh", "data=8", "--batch", "4"]) == 2
    assert "--batch 4 cannot be split over the mesh's batch axes (data x fsdp = 8)" in capsys.readouterr().err
    with pytest.raises(PlanError, match="--task"):
        Request("serve")
    with pytest.raises(l4jax.ConfigError, match="--dtype: unknown dtype 'int8'"):
        plan(l4jax.load_config("tiny"), parse_target("cpu"), Request("decode", dtype="int8"))


def test_a_missing_compiler_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)  # as in a venv without the extras
    with pytest.raises(PlanError, match=r"needs the CUDA plugin.*pip install -e \.\[aot-gpu\]") as e:
        targets._require_compiler("cuda")
    assert f'jax[cuda12]=={targets.jax.__version__}' in str(e.value)
    assert main(["plan", "--model", "tiny", "--target", "v5e:2x2", "--task", "decode", "--mesh", "tensor=4"]) == 2
    assert "needs the TPU compiler (libtpu)" in capsys.readouterr().err


def test_out_of_memory_messages_become_figures():
    assert report._out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 44.02G of 15.75G "
                                  "hbm. Exceeded hbm capacity by 28.27G.") == ("total", int(44.02 * 2**30))
    assert report._out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                                  "temporaries (16.02G) exceeds available HBM (15.75G).") == (
        "temporaries", int(16.02 * 2**30))
    assert report._out_of_memory("INTERNAL: something else") is None


@pytest.mark.slow  # two train-step compiles
def test_a_dpo_plan_holds_the_reference_and_counts_its_forward():
    """DPO without LoRA holds a frozen copy of the weights beside the trained ones (twice the weight bytes of the
    next-token step), and its FLOPs are the train step's plus one forward."""
    from l4jax.train.flops import forward_flops_per_token
    config, target = l4jax.load_config("tiny"), parse_target("cpu")
    runs = {obj: plan(config, target, Request("train", batch=8, seq=64, mesh={"fsdp": 8}, objective=obj))
            for obj in ("lm", "dpo")}
    (lm, lm_planned), (dpo, dpo_planned) = runs["lm"], runs["dpo"]
    n = weights(config.text).total
    assert 4 * n / 8 <= lm_planned["held_per_device"]["weights"] < 4 * n  # fp32 masters, mostly split over fsdp
    assert dpo_planned["held_per_device"]["weights"] == 2 * lm_planned["held_per_device"]["weights"]
    assert dpo.costs.flops == lm.costs.flops + forward_flops_per_token(config.text, 64) * 8 * 64
    assert dpo.program["conditional"] == 0 and dpo_planned["shapes"]["objective"] == "dpo"
    with pytest.raises(PlanError, match="--objective 'dpo': lm or dpo, and dpo with --task train only"):
        Request("decode", objective="dpo")


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_a_quantized_decode_plan_holds_quantized_weights(capsys):
    """--quantize int4: the weights the step holds are the int4 values (one byte each on the CPU, which does not
    pack them) and scales, less than the bf16 plan's; the bytes that must move count the weights at half a byte."""
    args = ["plan", "--model", "tiny", "--target", "cpu", "--task", "decode", "--batch", "2", "--cache", "64", "--json",
            "--mesh", "data=2,expert=2,tensor=2"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--quantize", "int4"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["shapes"]["quantize"] == "int4" and plain["shapes"]["quantize"] is None
    assert q["held_per_device"]["weights"] < 0.75 * plain["held_per_device"]["weights"]
    assert q["costs"]["bytes"] < plain["costs"]["bytes"]
    assert main(["plan", "--model", "tiny", "--target", "cpu", "--task", "train", "--quantize", "int4", "--mesh",
                 "fsdp=8"]) == 2
    assert "--quantize 'int4': int8 or int4 or fp8, for tasks prefill and decode" in capsys.readouterr().err


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_an_fp8_release_plans_with_its_fp8_weights(tmp_path, capsys):
    """An FP8 release's folder (config.json with a quantization_config) plans as fp8: a byte per large weight
    and its scales, as --quantize fp8 gives for the same model in bf16."""
    config = l4jax.load_config("tiny").text.to_hf()
    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "fbgemm_fp8", "modules_to_not_convert": ["lm_head"]}}))
    args = ["--target", "cpu", "--task", "decode", "--batch", "8", "--cache", "64", "--json", "--mesh", "data=8"]
    assert main(["plan", "--model", str(tmp_path / "fp8")] + args) == 0
    release = json.loads(capsys.readouterr().out)
    assert main(["plan", "--model", "tiny", "--quantize", "fp8"] + args) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert main(["plan", "--model", "tiny"] + args) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert release["shapes"]["quantize"] == fp8["shapes"]["quantize"] == "fp8"
    assert release["held_per_device"]["weights"] == fp8["held_per_device"]["weights"]
    assert fp8["held_per_device"]["weights"] < 0.6 * fp32["held_per_device"]["weights"]
