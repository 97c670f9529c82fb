"""The `bench` steps compiled for one H100 and for a v5e:2x2 slice: what the following issues must keep true.

These need the optional compilers (``pip install -e .[aot-gpu,aot-tpu]``) and take a few minutes; they are marked
``plan`` and CI runs them in a venv with both extras (``.ci/run``). Asserted today: every step fits in the chip's
memory; on a GPU, no ``conditional`` (each would read its predicate on the host: a device sync); the decode loop
writes its cache in place (no concatenate, copy or transpose of a cache-sized array, no cache-sized temporary) and
moves, per token, within 20% of the bytes its weights and cache hold (the HBM traffic estimated from its kernels).
On the H100 the train step and the prefill run attention in the fused kernel and the MoE in the Mosaic GPU
kernels; on the v5e slice the train step runs attention in Pallas' TPU flash kernels.
"""

import re

import jax
import pytest

import l4jax
from l4jax.plan.costs import cache_bytes, weights
from l4jax.plan.planner import Request, plan
from l4jax.plan.targets import parse_target
from l4jax.plan.traffic import shape_bytes

pytestmark = pytest.mark.plan


@pytest.fixture(scope="module")
def bench():
    return l4jax.load_config("bench")


H100 = [("train", dict(batch=4, seq=2048)), ("train", dict(batch=4, seq=2048, objective="dpo")),
        ("prefill", dict(batch=1, seq=8192)), ("decode", dict(batch=1, cache=4096)),
        ("decode", dict(batch=32, cache=4096))]
V5E = [("train", dict(batch=4, seq=2048, remat="full", mesh={"fsdp": 4})),
       ("decode", dict(batch=1, cache=4096, mesh={"tensor": 4})),
       ("decode", dict(batch=32, cache=4096, mesh={"tensor": 4}))]


def weights_and_cache(cfg, batch: int, cache: int, kv_int8: bool = False) -> int:
    """Bytes a decode step's weights and cache hold: every weight a token uses, the routed experts the batch's
    path reads (min(E, B x k) per MoE layer: the gathered path reads the B x k picked, the dense one all E) and
    the whole cache (bf16, or int8 with its fp32 scales)."""
    experts = min(cfg.num_local_experts, batch * cfg.num_experts_per_tok)
    kv = cache_bytes(cfg, batch, cache, 1, scales=True) if kv_int8 else cache_bytes(cfg, batch, cache, 2)
    return weights(cfg).read(experts) * 2 + kv


@pytest.mark.parametrize("task,kw", H100, ids=[f"{t}-{kw.get('objective', '')}{kw['batch']}" for t, kw in H100])
def test_bench_on_one_h100(bench, task, kw):
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    result, planned = plan(bench, parse_target("h100"), Request(task, **kw))
    assert result.fits, result.memory
    assert planned["mesh"] == {"data": 1, "fsdp": 1, "context": 1, "expert": 1, "tensor": 1}
    assert result.program["kernels"] > 0 and not result.program["collectives"]
    assert result.program["conditional"] == 0
    calls = result.program["custom_call_targets"]
    if task == "train":  # the MoE's grouped products are the Mosaic GPU kernels, forward and backward
        assert calls.get("mosaic_gpu_v2", 0) >= 9 * 4, result.program
        # Attention is the fused kernel: its forward and the backward pass's two kernels (dq, dk and dv).
        assert calls.get("__gpu$xla.gpu.triton", 0) >= 3, result.program
    if task == "prefill":  # one fused attention kernel per layer, three grouped products per MoE layer
        assert calls.get("__gpu$xla.gpu.triton", 0) >= bench.text.num_hidden_layers, result.program
        assert calls.get("mosaic_gpu_v2", 0) >= 3 * len(bench.text.moe_layers), result.program


def test_expert_parallel_train_step_on_eight_h100s(bench):
    """Each device runs the Mosaic GPU grouped matmuls on its own 2 experts inside the expert shard_map."""
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    result, planned = plan(bench, parse_target("h100x8"), Request("train", batch=8, seq=2048, mesh={"expert": 8}))
    assert result.fits and planned["mesh"]["expert"] == 8
    assert result.program["conditional"] == 0
    assert result.program["custom_call_targets"].get("mosaic_gpu_v2", 0) >= 9 * 4, result.program


@pytest.mark.parametrize("batch", [1, 32])
def test_bench_decode_on_one_h100_writes_the_cache_in_place(bench, batch):
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    result, _ = plan(bench, parse_target("h100"), Request("decode", batch=batch, cache=4096))
    smallest_layer = cache_bytes(bench.text, batch, 4096, 2) // (2 * bench.text.num_hidden_layers) // 2
    big = [m.group(0)[:80] for m in re.finditer(r"= (\S+) (concatenate|copy|transpose)\(", result.hlo)
           if shape_bytes(m.group(1)) >= smallest_layer]
    assert not big, big
    assert result.memory["temporaries"] < 0.05 * cache_bytes(bench.text, batch, 4096, 2)
    per_token, held = result.program["traffic"]["loop_trip"], weights_and_cache(bench.text, batch, 4096)
    assert abs(per_token / held - 1) < 0.2, (per_token, held)


def test_int8_cache_decode_on_one_h100_reads_the_int8_cache_in_place(bench):
    """The int8 cache is read as int8 (no dequantized copy: the bytes per token stay within 20% of the weights and
    the int8 cache) and written in place."""
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    result, planned = plan(bench, parse_target("h100"), Request("decode", batch=32, cache=4096, kv_int8=True))
    assert planned["shapes"]["kv_dtype"] == "int8" and result.program["conditional"] == 0
    int8 = cache_bytes(bench.text, 32, 4096, 1, scales=True)
    big = [m.group(0)[:80] for m in re.finditer(r"= (\S+) (concatenate|copy|transpose)\(", result.hlo)
           if shape_bytes(m.group(1)) >= int8 // (4 * bench.text.num_hidden_layers)]
    assert not big, big
    per_token, held = result.program["traffic"]["loop_trip"], weights_and_cache(bench.text, 32, 4096, kv_int8=True)
    assert abs(per_token / held - 1) < 0.2, (per_token, held)
    bf16, _ = plan(bench, parse_target("h100"), Request("decode", batch=32, cache=4096))
    saved = bf16.program["traffic"]["loop_trip"] - per_token  # the int8 cache's saving is the bytes it does not hold
    want = cache_bytes(bench.text, 32, 4096, 2) - int8
    assert abs(saved / want - 1) < 0.1, (saved, want)


def test_int4_decode_on_one_h100_reads_the_expert_stacks_as_they_are():
    """Scout's shapes (two layers): int4 batch-1 decode keeps no relaid-out copy of an expert stack (the gate and up
    stacks [E, D, F] are kept [E, F, D], quant.stored_layout; before, XLA copied both of every layer before the
    loop: 0.67 GiB per layer, 31.5 GiB for Scout) and its temporaries stay under one stack's bytes."""
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    scout = l4jax.load_config("scout").text.to_hf()
    per_layer = ("moe_layers", "no_rope_layers", "layer_types")  # derived from the count again
    cfg = l4jax.load_config({**{k: v for k, v in scout.items() if k not in per_layer}, "num_hidden_layers": 2})
    result, _ = plan(cfg, parse_target("h100"), Request("decode", batch=1, cache=8192, quantize="int4"))
    assert result.fits and result.program["conditional"] == 0
    stack = cfg.text.num_local_experts * cfg.text.hidden_size * cfg.text.intermediate_size // 2  # int4 bytes
    big = [m.group(0)[:80] for m in re.finditer(r"= (s4\S+) (copy|transpose)\(", result.hlo)
           if shape_bytes(m.group(1)) >= stack // 4]
    assert not big, big
    assert result.memory["temporaries"] < stack, result.memory  # was 4 stacks (both layers' gate and up)


def test_a_long_prefill_split_over_eight_h100s():
    """Scout's shapes (two layers: a chunked one, a global one at 131072 tokens), context=8: the sequence stays split
    (the halo and the ring are collective-permutes, no all-gather of a sequence-sized array), no conditional, and
    the temporaries stay within a few blocks' scores (before the blockwise paths: 68 GiB for 4 layers)."""
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    scout = l4jax.load_config("scout").text.to_hf()
    per_layer = ("moe_layers", "no_rope_layers", "layer_types")
    cfg = l4jax.load_config({**{k: v for k, v in scout.items() if k not in per_layer}, "num_hidden_layers": 2,
                             "no_rope_layer_interval": 2})
    result, _ = plan(cfg, parse_target("h100x8"), Request("prefill", batch=1, seq=131072, mesh={"context": 8}))
    assert result.fits and result.program["conditional"] == 0, result.memory
    assert result.program["collectives"].get("collective-permute", 0) >= 2, result.program["collectives"]
    big = [m.group(0)[:80] for m in re.finditer(r"= (\S+) all-gather\(", result.hlo)
           if shape_bytes(m.group(1)) >= 131072 * 8 * 128 * 2 // 8]  # an eighth of one layer's keys
    assert not big, big
    assert result.memory["temporaries"] < 4 * 2**30, result.memory
    # The ring's step sends one array (keys, values, slots, validity packed) and scores the block it holds (the
    # zig-zag's two pairs) between the send's start and done: the transfer runs under the scoring (XLA keeps one
    # permute in flight at a time).
    steps = [body for body in re.split(r"\n(?=%|ENTRY)", result.hlo)
             if not body.startswith("ENTRY") and "collective-permute-start(" in body]
    assert steps
    for body in steps:
        order = [op for line in body.splitlines()
                 for op in re.findall(r" (collective-permute-start|collective-permute-done|while)\(%", line)]
        assert order[0] == "collective-permute-start" and order[-1] == "collective-permute-done", order
        assert len(order) >= 3 and set(order[1:-1]) == {"while"}, order


@pytest.mark.parametrize("task,kw", V5E, ids=[f"{t}-{kw['batch']}" for t, kw in V5E])
def test_bench_on_a_v5e_slice(bench, task, kw):
    pytest.importorskip("libtpu", reason="needs pip install -e .[aot-tpu]")
    # At jax's default matmul precision, as users train (the suite sets "highest" for its CPU numbers, under which
    # the TPU attention kernel gives way to the XLA paths for bf16: tests/model/test_attention.py).
    with jax.default_matmul_precision("default"):
        result, _ = plan(bench, parse_target("v5e:2x2"), Request(task, **kw))
    assert result.fits, (result.memory, result.error)
    assert result.program["collectives"]  # the work is split over 4 chips
    assert result.program["conditional"] == 0
    if task == "train":  # attention in Pallas' TPU flash kernels (forward, and the backward's dq and dk/dv), per chip
        assert result.program["custom_call_targets"].get("tpu_custom_call", 0) >= 3, result.program


def test_two_hosts_of_h100s():
    """A topology of 2 hosts x 8 GPUs compiles one program over all 16 (the devices of two processes)."""
    pytest.importorskip("jax_cuda12_plugin", reason="needs pip install -e .[aot-gpu]")
    target = parse_target("h100x8x2")
    assert len({d.process_index for d in target.device_list()}) == 2
    result, planned = plan(l4jax.load_config("tiny"), target, Request("train", batch=16, seq=256,
                                                                      mesh={"fsdp": 16}))
    assert result.fits and planned["mesh"]["fsdp"] == 16


def test_a_mesh_axis_that_splits_torus_axes():
    """tensor=2 on a v5p 8x8x8 torus is no product of whole torus axes: jax.make_mesh refuses it, l4jax splits
    physical axes (as MaxText's allow_split_physical_axes) and every device appears once."""
    pytest.importorskip("libtpu", reason="needs pip install -e .[aot-tpu]")
    from l4jax.parallel import make_mesh
    devices = parse_target("v5p:8x8x8").device_list()
    mesh = make_mesh(fsdp=32, expert=8, tensor=2, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "context": 1, "expert": 8, "tensor": 2}
    assert len({d.id for d in mesh.devices.flat}) == 512
