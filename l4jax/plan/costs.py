"""What a step must compute and move, and the fastest it could run on a chip: labelled bounds, not measurements.

FLOPs are model FLOPs (``train.flops``: 2 per multiply-add, the MoE at its top-k experts, attention over the keys
each query can see). Bytes are what must cross HBM at least once per step: the weights a step reads (a decode step
reads only the experts its tokens picked), the KV cache it reads, and in training the parameters and Adam moments
read and written by the update. Activations are not counted, so both figures are lower bounds. The roofline bound
is max(FLOPs / peak, bytes / bandwidth) with the work spread evenly over every device.
"""

from __future__ import annotations

import dataclasses

from ..config import TextConfig
from ..model.cache import KVCache
from ..train.flops import decode_flops_per_token, forward_flops_per_token, train_flops_per_token
from .targets import Chip


@dataclasses.dataclass(frozen=True)
class Weights:
    """Parameter counts of the text decoder by kind (a hand count of its shapes)."""

    embed: int       # the embedding table (a step reads only its tokens' rows, unless it is also the LM head)
    dense: int       # every other weight a token always uses: LM head, norms, attention, dense MLPs, routers,
    #                  shared experts
    experts: int     # routed experts, all of them
    per_expert: int  # one routed expert of one layer (gate, up, down)
    moe_layers: int
    tied: bool

    @property
    def total(self) -> int:
        return self.embed + self.dense + self.experts

    def read(self, experts_per_layer: float) -> float:
        """Weights a forward reads when each MoE layer uses ``experts_per_layer`` distinct experts."""
        return self.dense + (self.embed if self.tied else 0) + self.per_expert * self.moe_layers * experts_per_layer


def weights(cfg: TextConfig) -> Weights:
    D, V, H, K, hd = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    F, Fm, E = cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_local_experts
    dense = (0 if cfg.tie_word_embeddings else V * D) + D  # lm_head, final norm
    n_moe = len(cfg.moe_layers)
    for i in range(cfg.num_hidden_layers):
        dense += 2 * D + D * hd * (2 * H + 2 * K)  # two norms, q k v o
        dense += D * E + 3 * D * F if cfg.is_moe(i) else 3 * D * Fm  # router and shared expert, or dense MLP
    return Weights(V * D, dense, n_moe * E * 3 * D * F, 3 * D * F, n_moe, cfg.tie_word_embeddings)


def experts_touched(cfg: TextConfig, tokens: int) -> float:
    """Expected distinct experts per MoE layer that ``tokens`` tokens pick, under uniform routing."""
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return E * (1 - (1 - k / E) ** tokens)


def cache_bytes(cfg: TextConfig, batch: int, slots: int, itemsize: int, scales: bool = False) -> int:
    """Bytes of a KV cache of ``slots`` slots (chunked layers keep a ring of one chunk); ``scales``: an int8
    cache's fp32 scale per token and kv head, for k and for v."""
    per_slot = cfg.head_dim * itemsize + (4 if scales else 0)
    return sum(2 * batch * n * cfg.num_key_value_heads * per_slot for n in KVCache.lengths(cfg, slots))


@dataclasses.dataclass(frozen=True)
class Costs:
    flops: float       # model FLOPs of the step, all devices together
    bytes: float       # bytes that must move through HBM at least once, all devices together
    devices: int

    def bound_seconds(self, chip: Chip) -> tuple[float | None, str]:
        """The roofline lower bound of the step time on ``devices`` chips, and what bounds it."""
        if chip.peak_flops is None or chip.bandwidth is None:
            return None, "unknown (no datasheet figures for this chip)"
        compute = self.flops / (self.devices * chip.peak_flops)
        memory = self.bytes / (self.devices * chip.bandwidth)
        return max(compute, memory), "compute" if compute >= memory else "memory"


def train_costs(cfg: TextConfig, *, batch: int, seq: int, param_bytes: int, compute_bytes: int,
                devices: int, reference: bool = False) -> Costs:
    """Forward and backward over batch x seq tokens; AdamW reads and writes every parameter and both moments
    (kept in the parameter dtype), and the step reads the weights in the compute dtype twice (forward, backward).
    ``reference`` (DPO): one more forward, of a frozen copy of the weights, read once."""
    n = weights(cfg).total
    flops = train_flops_per_token(cfg, seq) + (forward_flops_per_token(cfg, seq) if reference else 0)
    return Costs(flops * batch * seq, n * (6 * param_bytes + (3 if reference else 2) * compute_bytes), devices)


# Bytes per weight element of a quantized model's matmul weights (its scales are <1% more).
WEIGHT_BYTES = {"int8": 1.0, "int4": 0.5, "fp8": 1.0}


def prefill_costs(cfg: TextConfig, *, batch: int, seq: int, cache: int, itemsize: int, devices: int,
                  kv_int8: bool = False, quantize: str | None = None) -> Costs:
    """The prompt's forward: every weight read once (a long prompt picks every expert), the cache written.
    ``quantize``: the weights read at int8, fp8 or int4 size (the few left unquantized, norms and router, included)."""
    read = weights(cfg).read(experts_touched(cfg, batch * seq)) * WEIGHT_BYTES.get(quantize, itemsize)
    kv = cache_bytes(cfg, batch, cache, 1, scales=True) if kv_int8 else cache_bytes(cfg, batch, cache, itemsize)
    return Costs(forward_flops_per_token(cfg, seq) * batch * seq, read + kv, devices)


def decode_costs(cfg: TextConfig, *, batch: int, cache: int, itemsize: int, devices: int,
                 kv_int8: bool = False, quantize: str | None = None) -> Costs:
    """One token per row after a full cache: the weights of the experts picked (at int8, fp8 or int4 size with
    ``quantize``) and the whole cache read."""
    read = weights(cfg).read(experts_touched(cfg, batch)) * WEIGHT_BYTES.get(quantize, itemsize)
    kv = cache_bytes(cfg, batch, cache, 1, scales=True) if kv_int8 else cache_bytes(cfg, batch, cache, itemsize)
    return Costs(decode_flops_per_token(cfg, cache - 1) * batch, read + kv, devices)
