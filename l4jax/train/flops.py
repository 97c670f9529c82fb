"""Model FLOPs (for MFU) and a measured peak: what a step should cost against what the devices can do.

MFU counts only the model's useful work: 2 FLOPs per multiply-add of every matmul a token takes part in, with the
MoE counted at its top-k experts (not all E, which is what a dense implementation would spend), and attention
over the keys each query may actually see (chunked layers see at most a chunk). Training is 3x the forward
(backward = 2x forward); recomputation under remat is not useful work and is not counted.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import TextConfig


def _flops_per_token(cfg: TextConfig, keys: Callable[[int], float]) -> float:
    """Forward FLOPs of one token whose query sees ``keys(i)`` keys in layer i (embedding lookup free, LM head
    counted)."""
    D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    total = 2.0 * D * cfg.vocab_size  # LM head
    for i in range(cfg.num_hidden_layers):
        total += 2.0 * D * hd * (2 * H + 2 * K)  # q, o and k, v projections
        total += 2.0 * 2 * H * hd * keys(i)  # scores and probs @ v
        if cfg.is_moe(i):
            total += 2.0 * D * cfg.num_local_experts  # router
            total += 2.0 * 3 * D * cfg.intermediate_size * (cfg.num_experts_per_tok + 1)  # top-k + shared expert
        else:
            total += 2.0 * 3 * D * cfg.intermediate_size_mlp
    return total


def forward_flops_per_token(cfg: TextConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a [*, seq_len] causal sequence: on average a query sees (span + 1) / 2 keys
    within blocks of ``span`` (the chunk on chunked layers, the sequence elsewhere)."""
    def keys(i):
        span = min(cfg.attention_chunk_size, seq_len) if cfg.chunked_layers[i] else seq_len
        return (span + 1) / 2
    return _flops_per_token(cfg, keys)


def decode_flops_per_token(cfg: TextConfig, context: int) -> float:
    """Forward FLOPs of one new token after ``context`` cached ones: it sees every cached key of a global layer
    and at most a chunk on chunked layers (an upper bound there: within its chunk it sees fewer)."""
    return _flops_per_token(cfg, lambda i: min(cfg.attention_chunk_size, context + 1) if cfg.chunked_layers[i]
                            else context + 1)


def train_flops_per_token(cfg: TextConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def measure_peak_flops(dtype=jnp.bfloat16, mesh: jax.sharding.Mesh | None = None, n: int | None = None,
                       repeats: int = 5) -> float:
    """Measured matmul FLOP/s of the whole mesh (or of one device) in ``dtype``: the MFU denominator.

    Measured rather than taken from a datasheet so MFU is comparable across machines, simulated CPU devices
    included (there they share the host's cores, and a datasheet peak per device would be meaningless).
    """
    devices = mesh.devices.size if mesh is not None else 1
    if n is None:  # large enough to saturate an accelerator; on a CPU the rate is flat from ~1k and time matters
        n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((devices * n, n), dtype)
    b = jnp.ones((n, n), dtype)
    if mesh is not None:
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
        a = jax.device_put(a, rows)
        b = jax.device_put(b, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * devices * n ** 3 / best
