"""``l4jax plan``: one model, task and mesh, compiled for a target, described in text or as one JSON object.

JSON fields (every byte figure per device):
    model, target, chip, devices, mesh {axis: size}, task, shapes {batch, seq, cache, dtype, ...}
    memory {arguments, outputs, aliased, temporaries, total}, capacity, fits (true / false / null when unknown)
    program {kernels, fusion, custom-call, conditional, while, copy, concatenate, collectives {kind: count},
             custom_call_targets {target: count}, traffic {outside_loops, loop_trip}: HBM bytes estimated from the
             kernels' operands and results (``plan/traffic.py``), outside any loop and per trip of the entry's first
             loop (a decode loop's trip is one token)}      (empty when the compiler refused the program)
    costs {flops, bytes} for the whole step on all devices; bound {seconds, by, peak_flops, bandwidth}: the roofline
    lower bound on this chip (a bound, not a measurement); compile_seconds; error (the compiler's refusal, if any)
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp

from ..config import Llama4Config, dtype_name
from ..model.quant import MODES
from ..parallel import make_mesh
from ..train.settings import TrainConfig
from . import costs as costs_lib
from .programs import decode_program, prefill_program, train_program
from .report import Plan, compile_plan, held_bytes
from .targets import PlanError, Target

TASKS = ("train", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class Request:
    """What to plan: the task's shapes and settings (``cache`` defaults to ``seq``)."""

    task: str
    batch: int = 1
    seq: int = 2048
    cache: int | None = None
    mesh: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"  # train: the compute dtype (master weights float32); inference: weights and compute
    remat: str = "none"
    moe_impl: str = "auto"
    kv_int8: bool = False  # prefill and decode: an int8 KV cache
    quantize: str | None = None  # prefill and decode: int8, int4 or fp8 weights (l4jax.model.quant)
    objective: str = "lm"  # train: "lm" or "dpo" (a frozen reference copy of the weights, its forward in the step)

    def __post_init__(self):
        if self.task not in TASKS:
            raise PlanError(f"--task {self.task!r}: expected one of {TASKS}")
        for name in ("batch", "seq", "cache"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise PlanError(f"--{name}: must be a positive integer, got {v!r}")
        if self.kv_int8 and self.task == "train":
            raise PlanError("--kv-int8: an inference cache setting (tasks prefill and decode), not for train")
        if self.quantize is not None and (self.quantize not in MODES or self.task == "train"):
            raise PlanError(f"--quantize {self.quantize!r}: {' or '.join(MODES)}, for tasks prefill and decode")
        if self.objective not in ("lm", "dpo") or (self.objective == "dpo" and self.task != "train"):
            raise PlanError(f"--objective {self.objective!r}: lm or dpo, and dpo with --task train only")
        object.__setattr__(self, "dtype", dtype_name(self.dtype, "--dtype", ("float32", "bfloat16")))


def plan(config: Llama4Config, target: Target, req: Request) -> tuple[Plan, dict]:
    """Build the task's real step from abstract shapes on the target's mesh, compile it, and return the plan and
    what was planned."""
    if not req.mesh and target.devices > 1:
        raise PlanError(f"--target {target.text} has {target.devices} devices: give --mesh (their sizes multiply to "
                        f"{target.devices}), e.g. fsdp={target.devices} to train or expert=... ,tensor=... to serve")
    mesh = make_mesh(**req.mesh, devices=target.device_list())
    cfg, itemsize = config.text, jnp.dtype(req.dtype).itemsize
    cache, kv_dtype = req.cache or req.seq, jnp.int8 if req.kv_int8 else None
    if req.task == "train":
        dpo = req.objective == "dpo"
        data = dict(data=("pairs.jsonl",), data_format="preference", objective="dpo") if dpo else {}
        tc = TrainConfig(seq_len=req.seq, batch_size=req.batch, compute_dtype=req.dtype, remat=req.remat,
                         moe_impl=req.moe_impl, **data)
        program = train_program(config, tc, mesh)
        cost = costs_lib.train_costs(cfg, batch=req.batch, seq=req.seq, param_bytes=4, compute_bytes=itemsize,
                                     devices=target.devices, reference=dpo)
    elif req.task == "prefill":
        program = prefill_program(config, mesh, batch=req.batch, seq=req.seq, cache=cache, dtype=req.dtype,
                                  moe_impl=req.moe_impl, kv_dtype=kv_dtype, quantize=req.quantize)
        cost = costs_lib.prefill_costs(cfg, batch=req.batch, seq=req.seq, cache=cache, itemsize=itemsize,
                                       devices=target.devices, kv_int8=req.kv_int8, quantize=req.quantize)
    else:
        program = decode_program(config, mesh, batch=req.batch, cache=cache, dtype=req.dtype, moe_impl=req.moe_impl,
                                 kv_dtype=kv_dtype, quantize=req.quantize)
        cost = costs_lib.decode_costs(cfg, batch=req.batch, cache=cache, itemsize=itemsize, devices=target.devices,
                                      kv_int8=req.kv_int8, quantize=req.quantize)
    shapes = {"batch": req.batch, "seq": req.seq if req.task != "decode" else 1, "cache": None if req.task == "train"
              else cache, "dtype": req.dtype, "remat": req.remat if req.task == "train" else None,
              "moe_impl": req.moe_impl, "kv_dtype": None if req.task == "train" else "int8" if req.kv_int8
              else req.dtype, "objective": req.objective if req.task == "train" else None,
              "quantize": req.quantize}
    return compile_plan(program, target, cost), {"task": req.task, "mesh": dict(mesh.shape), "shapes": shapes,
                                                 "held_per_device": held_bytes(program)}


def to_json(p: Plan, target: Target, model: str, planned: dict) -> str:
    seconds, by = p.costs.bound_seconds(target.chip)
    return json.dumps({
        "model": model, "target": target.text, "chip": target.chip.name, "devices": target.devices, **planned,
        "memory": p.memory, "capacity": p.capacity, "fits": p.fits, "program": p.program,
        "costs": {"flops": p.costs.flops, "bytes": p.costs.bytes},
        "bound": {"seconds": seconds, "by": by, "peak_flops": target.chip.peak_flops,
                  "bandwidth": target.chip.bandwidth},
        "compile_seconds": round(p.compile_seconds, 1), "error": p.error}, indent=1)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:,.2f} GiB"


def to_text(p: Plan, target: Target, model: str, planned: dict) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in planned["mesh"].items() if v > 1) or "one device"
    shapes = ", ".join(f"{k} {v}" for k, v in planned["shapes"].items() if v is not None)
    m = p.memory
    verdict = "unknown capacity" if p.fits is None else "FITS" if p.fits else "DOES NOT FIT"
    lines = [f"{model}: {planned['task']} on {target.text} ({target.devices} x {target.chip.name}), mesh {mesh}",
             f"  shapes: {shapes}",
             f"  memory per device: {_gib(m['total'])} of {_gib(p.capacity)}: {verdict}",
             f"    arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}, aliased {_gib(m['aliased'])}, "
             f"temporaries {_gib(m['temporaries'])}",
             "    of the arguments: " + ", ".join(f"{k} {_gib(v)}" for k, v in planned["held_per_device"].items())]
    if p.error:
        lines.append(f"  the compiler refused it: {p.error}")
    if p.program:
        g = p.program
        coll = ", ".join(f"{k} {v}" for k, v in g["collectives"].items()) or "none"
        lines += [f"  program: {g['kernels']} kernels ({g['fusion']} fusions, {g['custom-call']} custom calls), "
                  f"{g['conditional']} conditional, {g['while']} while, {g['copy']} copy, "
                  f"{g['concatenate']} concatenate",
                  f"    collectives: {coll}",
                  f"    custom-call targets: "
                  f"{', '.join(f'{k} x{v}' for k, v in g['custom_call_targets'].items()) or 'none'}",
                  f"    HBM traffic estimated from the kernels: {g['traffic']['outside_loops']:.3e} bytes outside loops"
                  + ("" if g["traffic"]["loop_trip"] is None
                     else f", {g['traffic']['loop_trip']:.3e} per trip of the outer loop")]
    seconds, by = p.costs.bound_seconds(target.chip)
    bound = "unknown" if seconds is None else f"{seconds * 1e3:,.3f} ms ({by}-bound)"
    lines += [f"  model FLOPs per step {p.costs.flops:.3e}; bytes that must move {p.costs.bytes:.3e}",
              f"  roofline lower bound (a bound, not a measurement): {bound}",
              f"  compiled in {p.compile_seconds:.1f} s"]
    return "\n".join(lines)
