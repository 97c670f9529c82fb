"""The real steps, built from abstract shapes: the train step (``Trainer``), the prefill and the decode step of
``generate``. Nothing is allocated: every argument is a ShapeDtypeStruct carrying its sharding on the target's
mesh, so a 400B-parameter model is planned on a laptop."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import Llama4Config
from ..infer.generate import DECODE_CHUNK, Decoding, _decode, _prefill
from ..infer.load import abstract_model
from ..model.axes import ACT_VOCAB, BATCH, LENGTH, ShardingError
from ..model.cache import KVCache
from ..model.decoder import Inputs, Llama4Text
from ..model.kernels import Kernels
from ..model.quant import abstract_quantized
from ..parallel import batch_multiple, param_shardings, partitioning, platform
from ..parallel.shardings import for_params
from ..train.settings import TrainConfig
from ..train.step import BATCH_KEYS, Trainer


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted step and the abstract arguments to trace it with: ``fn.trace(*args, **kwargs)``."""

    fn: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    held: dict = dataclasses.field(default_factory=dict)  # named parts of the arguments: weights, cache, optimizer


def _check_batch(batch: int, mesh) -> None:
    n = batch_multiple(mesh)
    if batch % n:
        raise ShardingError(f"--batch {batch} cannot be split over the mesh's batch axes (data x fsdp = {n}); use a "
                            f"multiple of {n}")


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


PAIRS_PER_ROW = 2  # DPO: the preference pairs a planned row holds (``pairs`` [A, b, P])


def train_program(config: Llama4Config, tc: TrainConfig, mesh) -> Program:
    """``Trainer``'s jitted step on [grad_accum, microbatch, seq_len] batches (DPO's with its ``pairs``)."""
    _check_batch(tc.microbatch, mesh)
    trainer = Trainer(config, tc, mesh)
    # LoRA's base, or DPO's reference: the full weights, frozen
    frozen = _abstract(trainer.param_shapes, trainer.frozen_shardings) if trainer.frozen_shardings else {}
    shape = (tc.grad_accum, tc.microbatch, tc.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=trainer.batch_sharding) for k in BATCH_KEYS}
    if "pairs" in trainer.batch_keys:
        batch["pairs"] = jax.ShapeDtypeStruct(shape[:2] + (PAIRS_PER_ROW,), jnp.float32,
                                              sharding=None if mesh is None else trainer.batch_shardings["pairs"])
    state = trainer.abstract_state()
    held = {"weights": (state["params"], frozen), "optimizer state": {k: v for k, v in state.items() if k != "params"}}
    return Program(trainer._step, (state, frozen, {}, batch), held=held)  # fixed: no teacher, no images


def _inference(config: Llama4Config, mesh, dtype, moe_impl: str, quantize: str | None = None):
    """(module, abstract params, the partitioning) of the text decoder for inference in ``dtype``, with the kernels
    of the mesh's chip (as ``l4jax.load`` picks them); with ``quantize``, its large weights quantized as
    ``l4jax.load(..., quantize=...)`` holds them."""
    text = dataclasses.replace(config, vision=None)
    part = partitioning(config.text, mesh)
    shapes = abstract_model(text, dtype)
    if quantize is not None:
        shapes = abstract_quantized(shapes, quantize)
    params = _abstract(shapes, for_params(param_shardings(text, part, dtype), shapes))
    module = Llama4Text(config.text, part, Kernels.for_platform(platform(mesh), moe=moe_impl), dtype=dtype,
                        param_dtype=dtype)
    return module, params, part


def prefill_program(config: Llama4Config, mesh, *, batch: int, seq: int, cache: int, dtype=jnp.bfloat16,
                    moe_impl: str = "auto", kv_dtype=None, quantize: str | None = None) -> Program:
    """``generate``'s prefill: a [batch, seq] prompt into an empty cache of ``cache`` slots (of ``kv_dtype``,
    default ``dtype``)."""
    _check_batch(batch, mesh)
    if cache < seq:
        raise ShardingError(f"--cache {cache} is shorter than the prompt --seq {seq}")
    module, params, part = _inference(config, mesh, jnp.dtype(dtype), moe_impl, quantize)
    tokens = part.sharding((BATCH, LENGTH))
    inputs = Inputs(jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=tokens),
                    jax.ShapeDtypeStruct((batch, cache), jnp.int32, sharding=tokens))
    kv = KVCache.abstract(config.text, batch, cache, kv_dtype or dtype, part)
    return Program(_prefill, (module, params, inputs, kv), held={"weights": params, "cache": kv})


def decode_program(config: Llama4Config, mesh, *, batch: int, cache: int, dtype=jnp.bfloat16,
                   moe_impl: str = "auto", chunk: int = DECODE_CHUNK, kv_dtype=None,
                   quantize: str | None = None) -> Program:
    """``generate``'s decode loop (greedy): up to ``chunk`` tokens per row in one call, onto a cache of ``cache``
    slots (of ``kv_dtype``, default ``dtype``). The program's memory is the loop's; per-token figures (FLOPs,
    bytes) are one trip's."""
    _check_batch(batch, mesh)
    module, params, part = _inference(config, mesh, jnp.dtype(dtype), moe_impl, quantize)
    whole = NamedSharding(mesh, P())
    rows, tokens = part.sharding((BATCH,)), part.sharding((BATCH, LENGTH))
    key = jax.eval_shape(lambda: jax.random.key(0))
    kv = dataclasses.replace(KVCache.abstract(config.text, batch, cache, kv_dtype or dtype, part), empty=False)
    state = Decoding(jax.ShapeDtypeStruct((batch, config.text.vocab_size), jnp.float32,
                                          sharding=part.sharding((BATCH, ACT_VOCAB))),
                     jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=whole),
                     kv,
                     jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=rows))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
    args = (module, params, state, jax.ShapeDtypeStruct((batch, cache), jnp.int32, sharding=tokens),
            jax.ShapeDtypeStruct((len(config.text.eos_token_id) or 1,), jnp.int32, sharding=whole), scalar, scalar)
    return Program(_decode, args, dict(n=chunk, temperature=0.0, top_k=None, top_p=None),
                   held={"weights": params, "cache": kv})


__all__ = ["Program", "decode_program", "prefill_program", "train_program"]
