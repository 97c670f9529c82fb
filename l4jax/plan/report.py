"""Compile a program for its target and say what came out: the memory plan per device against the chip's capacity,
the kernels, the control flow, the collectives and the custom calls of the optimized program."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from . import traffic
from .costs import Costs
from .programs import Program
from .targets import Target

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclasses.dataclass
class Plan:
    """Per-device figures of one compiled step (bytes unless said); ``hlo`` is the optimized program's text."""

    memory: dict[str, int | None]   # arguments, outputs, aliased, temporaries, total (None where not known)
    capacity: int | None
    fits: bool | None
    program: dict[str, object]      # kernels, conditional, while, copy, collectives, custom_call_targets
    costs: Costs
    compile_seconds: float
    hlo: str = ""
    error: str | None = None        # why the compiler refused it (a program that does not fit on a TPU)


def summarize(hlo: str) -> dict[str, object]:
    """Counts of the optimized program's instructions: kernels (fusions and custom calls), control flow, copies,
    collectives by kind (async starts counted once), and the custom-call targets."""
    # A tuple type may hold layouts with parentheses (int4's "{1,0:E(4)}"): one level of nesting.
    ops = collections.Counter(re.findall(r"= (?:\((?:[^()]|\([^()]*\))*\)|\S+) ([a-z][a-z-]*)\(", hlo))
    collectives = {c: ops[c] + ops[f"{c}-start"] for c in COLLECTIVES if ops[c] + ops[f"{c}-start"]}
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    body = traffic.loop_body(hlo)
    return {"kernels": ops["fusion"] + ops["custom-call"], "fusion": ops["fusion"], "custom-call": ops["custom-call"],
            "conditional": ops["conditional"], "while": ops["while"], "copy": ops["copy"],
            "concatenate": ops["concatenate"], "collectives": collectives, "custom_call_targets": dict(targets),
            "traffic": {"outside_loops": traffic.traffic(hlo),
                        "loop_trip": None if body is None else traffic.traffic(hlo, body)}}


def _out_of_memory(message: str) -> tuple[str, int] | None:
    """What a TPU program needed, from the compiler's RESOURCE_EXHAUSTED message: ("total", bytes) from "Used
    44.02G of 15.75G hbm", ("temporaries", bytes) from "required for HLO temporaries (16.02G) exceeds"."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    for kind, pattern in (("total", r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm"),
                          ("temporaries", r"HLO temporaries \(([\d.]+)([KMGT]?)\)")):
        m = re.search(pattern, message)
        if m:
            return kind, int(float(m.group(1)) * _UNITS[m.group(2)])
    return None


def argument_bytes(program: Program) -> int:
    """Bytes of the program's arguments on one device (its first), from their shardings."""
    return device_bytes(program.args)


def held_bytes(program: Program) -> dict[str, int]:
    """Bytes on one device of each named part of the arguments (``Program.held``: weights, cache, ...)."""
    return {name: device_bytes(part) for name, part in program.held.items()}


def device_bytes(tree) -> int:
    """Bytes on one device (its first) of the sharded ShapeDtypeStructs in ``tree``."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None:
            # A PRNG key's dtype has no itemsize of its own: it is stored as its key data (2 x uint32).
            data = jax.eval_shape(jax.random.key_data, leaf) if jax.dtypes.issubdtype(
                leaf.dtype, jax.dtypes.prng_key) else leaf
            n = math.prod(leaf.sharding.shard_shape(leaf.shape)) * math.prod(data.shape[len(leaf.shape):])
            total += n * _itemsize(jnp.dtype(data.dtype), next(iter(leaf.sharding.device_set)).platform)
    return int(total)


def _itemsize(dtype, platform: str) -> float:
    """Bytes per element where the arrays live: GPUs and TPUs pack int4 two to a byte, the CPU stores one per byte."""
    return 0.5 if dtype.name in ("int4", "uint4") and platform != "cpu" else dtype.itemsize


def compile_plan(program: Program, target: Target, costs: Costs) -> Plan:
    """Trace, lower and compile ``program`` for ``target``; a program that does not fit becomes a plan that says
    so (with the bytes the compiler needed), not an exception."""
    t0 = time.perf_counter()
    lowered = program.fn.trace(*program.args, **program.kwargs).lower(lowering_platforms=(target.chip.platform,))
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only an out-of-memory refusal is a result, anything else re-raises
        needed = _out_of_memory(str(e))
        if needed is None:
            raise
        args = argument_bytes(program)
        memory = dict(arguments=args, outputs=None, aliased=None, temporaries=None, total=None)
        if needed[0] == "total":
            memory["total"] = needed[1]
        else:  # at least the arguments and these temporaries (the outputs alias the donated state)
            memory.update(temporaries=needed[1], total=args + needed[1])
        return Plan(memory, target.chip.memory, False, {}, costs, time.perf_counter() - t0,
                    error=str(e).splitlines()[0][:300])
    m = compiled.memory_analysis()
    memory = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                  temporaries=m.temp_size_in_bytes)
    memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    capacity = target.chip.memory
    hlo = compiled.as_text()
    return Plan(memory, capacity, None if capacity is None else memory["total"] <= capacity, summarize(hlo), costs,
                time.perf_counter() - t0, hlo)
