"""Fused (flash) attention for training and prefill: Pallas' kernels, which never write the [T, T] scores.

The kernel (``jax.experimental.pallas.ops.gpu.attention.mha``, Triton) scores each block of queries against the
keys it can see, causal and within one segment, with the softmax accumulated online; its backward pass recomputes
the scores (three kernels). Every mask of the model maps onto that: a segment is a chunk of a chunked layer, a
packed document (and its chunk), or all of a row's real tokens; padding slots get segment 0, which no real token
has. GQA repeats each kv head for its query heads (the kernel wants as many kv heads as q heads).

On the CPU the same kernel runs in Pallas' interpret mode (``interpret=True``): slow, for tests of its numbers.

``flash_attend_tpu`` is the same attention through Pallas' TPU flash kernel
(``jax.experimental.pallas.ops.tpu.flash_attention``: [B, H, T, hd] blocks of 128, segment ids compared for
equality as above, causal, its own backward kernels). On the CPU it runs only inside
``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``, held while the gradient is traced too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

BLOCK = 128  # query and key block of the forward kernel; T is padded up to a multiple
BACKWARD_BLOCK = 32  # the backward kernels' blocks (the kernel's defaults)


def segments(valid: jax.Array, group: jax.Array | None) -> jax.Array:
    """[B, T] segment ids for the kernel: the group (chunk, document) of each real token counted from 1, or 1 for
    all of a row's real tokens (global layers); 0 for padding."""
    seg = jnp.ones_like(valid, jnp.int32) if group is None else group - jnp.min(group) + 1
    return jnp.where(valid, seg, 0).astype(jnp.int32)


def _padded(q, k, v, segment_ids, block: int):
    """q, k, v and segment ids with T padded up to a multiple of ``block`` (padded slots are a segment of their own,
    -1: no real query sees them), each kv head repeated for its query heads (kv head j serves j*rep ...)."""
    pad = -q.shape[1] % block
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    rep = q.shape[2] // k.shape[2]
    return q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2), segment_ids


def flash_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float, *,
                 interpret: bool = False) -> jax.Array:
    """Causal attention within segments. q [B, T, H, hd]; k, v [B, T, K, hd] (the same T tokens, no cache);
    segment_ids [B, T] int (0 = padding) -> [B, T, H, hd]. Rows of padding queries are garbage (finite)."""
    T = q.shape[1]
    # Triton blocks are powers of two: a shorter row is padded up to one (at least the backward block).
    block = BLOCK if T >= BLOCK else max(BACKWARD_BLOCK, 1 << (T - 1).bit_length())
    q, k, v, segment_ids = _padded(q, k, v, segment_ids, block)
    b = BACKWARD_BLOCK
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=b, block_kv_dkv=b, block_q_dq=b,
                                        block_kv_dq=b)
    out = pallas_attention.mha(q, k, v, segment_ids, sm_scale=scale, causal=True, block_sizes=sizes,
                               interpret=interpret)
    return out[:, :T]


TPU_BLOCK = 128  # the TPU kernel's blocks of queries and keys (forward and backward); T is padded up to a multiple


def flash_attend_tpu(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, scale: float) -> jax.Array:
    """``flash_attend`` through the TPU kernel: q [B, T, H, hd]; k, v [B, T, K, hd]; segment_ids [B, T] (0 =
    padding) -> [B, T, H, hd]."""
    T = q.shape[1]
    q, k, v, segment_ids = _padded(q, k, v, segment_ids, TPU_BLOCK)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    b = TPU_BLOCK
    sizes = tpu_attention.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
                                     block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b,
                                     block_k_dq=b, block_q_dq=b)
    out = tpu_attention.flash_attention(q, k, v, segment_ids=tpu_attention.SegmentIds(segment_ids, segment_ids),
                                        causal=True, sm_scale=scale, block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[:, :T]
