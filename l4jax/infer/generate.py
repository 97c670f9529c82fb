"""Prefill then decode with a preallocated KV cache; both compiled, the decode loop compiled once per shape.

The cache is allocated for the whole run (prompt + new tokens) and donated to every call, so decoding updates it
in place. Decoding runs on the device a chunk of tokens at a time (sampling and the stop check included), and the
host fetches each chunk once. Chunked layers keep a chunk-sized ring (``KVCache``). Rows stop independently at their
stop tokens and are filled with the pad token afterwards, as transformers' ``generate`` does. Images
(``pixel_values``) enter the prefill only: their features replace the prompt's ``<|patch|>`` embeddings, and decode
steps are text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.cache import KVCache
from ..model.decoder import Inputs
from ..model.vision import check_image_tokens
from ..parallel import pad_batch
from .inputs import check_tokens
from .sampling import sample


@functools.partial(jax.jit, static_argnames=("module",), donate_argnames=("cache",))
def _prefill(module, params, inputs: Inputs, cache: KVCache):
    """The prompt [B, T] into an empty cache -> (last logits [B, V] fp32, cache). Only the last token goes through
    the LM head: a long prompt's [B, T, V] logits would be the largest array of the prefill (a 128K-token shard:
    6 GiB in bf16)."""
    out = module.clone(logits=False).apply({"params": params}, inputs, cache)
    return jnp.einsum("bd,dv->bv", out.hidden[:, -1], out.head).astype(jnp.float32), out.cache


# XLA's GPU dot merger joins two matmuls that share an input by concatenating their weights, which in a decode step
# rewrites those weights every step (for `bench` at batch 32: the shared expert's gate and up with the router, 67 MB
# more per layer and step).
DECODE_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}
# Tokens per device call: the host fetches once per chunk. The first call makes one token, so it shows at once.
DECODE_CHUNK = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoding:
    """What decoding carries from token to token, on the device: logits [B, V] fp32 of the next token, the
    sampling key, the KV cache, done [B] (rows that have stopped, and rows that only pad the batch)."""

    logits: jax.Array
    key: jax.Array
    cache: KVCache
    done: jax.Array


@functools.partial(jax.jit, static_argnames=("module", "n", "temperature", "top_k", "top_p"),
                   donate_argnames=("state",), compiler_options=DECODE_COMPILER_OPTIONS)
def _decode(module, params, state: Decoding, mask, stop, pad, limit, *, n: int, temperature, top_k, top_p):
    """Up to ``limit`` (<= n) tokens per row in one device call: sample, stop check and the next forward in a
    ``lax.while_loop`` that also ends once every row is done. mask [B, S]: the whole run's; stop [n_stop] ids;
    pad []: what a stopped row emits. Returns (tokens [B, n] (pad past the steps run), steps run, state).

    A while loop whose bound is an argument reads its predicate on the host once per token on a GPU: one small
    read, where a Python loop over single steps fetched every token and every done flag."""
    def body(carry):
        i, tokens, s = carry
        key, sub = jax.random.split(s.key)
        token = sample(s.logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(s.done, pad, token)
        out = module.apply({"params": params}, Inputs(token[:, None], mask), s.cache)
        s = Decoding(out.logits[:, -1].astype(jnp.float32), key, out.cache, s.done | jnp.isin(token, stop))
        return i + 1, jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], i, 1), s

    tokens = jnp.full((state.done.shape[0], n), pad, jnp.int32)
    i, tokens, state = jax.lax.while_loop(lambda c: (c[0] < limit) & ~jnp.all(c[2].done), body,
                                          (jnp.int32(0), tokens, state))
    return tokens, i, state


KV_DTYPES = ("int8", "bfloat16", "float32")


def _cache_dtype(kv_dtype, model_dtype) -> jnp.dtype:
    if kv_dtype is None:
        return jnp.dtype(model_dtype)
    try:
        name = jnp.dtype(kv_dtype).name
    except TypeError:
        name = None
    if name not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {KV_DTYPES} or None (the model's), got {kv_dtype!r}")
    return jnp.dtype(name)


def stream(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           stop_tokens: Sequence[int] | None = None, max_length: int | None = None,
           pixel_values=None, kv_dtype=None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, [B] int, as soon as it is made (the device makes them a chunk at a
    time: the first alone, then up to ``DECODE_CHUNK``). Arguments as ``generate``."""
    cfg = model.config.text
    cache_dtype = _cache_dtype(kv_dtype, model.dtype)
    ids, mask = check_tokens(input_ids, attention_mask, cfg.vocab_size, prompt=True)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    stop = tuple(cfg.eos_token_id if stop_tokens is None else stop_tokens)
    bad = [t for t in stop if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens: unknown token ids {bad} (vocab size {cfg.vocab_size})")
    B, T = ids.shape
    max_length = cfg.max_position_embeddings if max_length is None else max_length
    if T >= max_length:
        raise ValueError(f"input_ids: prompt length {T} leaves no room under max_length {max_length}")
    new = min(max_new_tokens, max_length - T)
    # Early fusion on the unpadded batch (the image tiles belong to its rows), checked against the prompt first.
    embeds = None if pixel_values is None else model.embed_images(ids, pixel_values)
    if pixel_values is None and model.config.vision is not None:
        check_image_tokens(ids, 0, model.config.image_token_index)
    # The batch axes must divide the batch: extra rows (all padding, done from the start) are never yielded.
    (ids, mask), _ = pad_batch(model.mesh, ids, mask)
    if embeds is not None:
        (embeds,), _ = pad_batch(model.mesh, embeds)
    # A long-context mesh splits the prompt evenly: more left padding (which changes no number) makes it divide.
    left = -T % model.part.context
    if left:
        ids, mask = (np.pad(a, ((0, 0), (left, 0))) for a in (ids, mask))
        embeds = None if embeds is None else jnp.pad(embeds, ((0, 0), (left, 0), (0, 0)))
    full_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, new)), constant_values=1))
    cache = KVCache.init(cfg, ids.shape[0], left + T + new, cache_dtype, model.part)
    logits, cache = _prefill(model.module, model.params, Inputs(jnp.asarray(ids), full_mask, embeds=embeds), cache)
    state = Decoding(logits, jax.random.key(seed), cache, jnp.arange(ids.shape[0]) >= B)
    pad = jnp.int32(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
    made = 0
    while made < new:
        limit = 1 if made == 0 else min(DECODE_CHUNK, new - made)
        tokens, steps, state = _decode(model.module, model.params, state, full_mask, stop_arr, pad, jnp.int32(limit),
                                       n=DECODE_CHUNK, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens, steps, done = jax.device_get((tokens, steps, state.done))  # the one fetch of the chunk
        for j in range(int(steps)):
            yield tokens[:B, j]
        made += int(steps)
        if done[:B].all():
            return


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, max_length: int | None = None,
             callback: Callable[[np.ndarray], None] | None = None, pixel_values=None, kv_dtype=None) -> np.ndarray:
    """Prompt [B, T] (left-padded, attention_mask 0 on padding) -> [B, T + new] tokens.

    temperature 0 is greedy; top_k / top_p filter before sampling; ``seed`` makes sampling reproducible.
    ``stop_tokens`` default to the config's eos ids; a row that emits one is padded afterwards, and generation ends
    when every row has stopped. ``callback`` receives each step's [B] tokens as they are made. ``pixel_values``
    [N, C, S, S] are the image tiles of all rows in prompt order (see ``Model.__call__``). ``kv_dtype``: the KV
    cache's, default the model's; "int8" stores k and v as int8 with a scale per token and kv head (half the bytes
    of bf16; see ``l4jax.model.cache``).
    """
    steps = []
    for token in stream(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, max_length=max_length,
                        pixel_values=pixel_values, kv_dtype=kv_dtype):
        steps.append(token)
        if callback is not None:
            callback(token)
    ids = np.asarray(input_ids)
    return np.concatenate([ids, np.stack(steps, axis=1).astype(ids.dtype)], axis=1) if steps else ids
