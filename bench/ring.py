"""Ring attention on a split sequence: the zig-zag ring (even shards) against the contiguous one (odd shards).

    python bench/ring.py [--context 8] [--shard 384] [--heads 8] [--kv-heads 2] [--head-dim 64] [--block 128]

Times ``attend_split`` of a global (NoPE) layer on ``--context`` simulated CPU devices for shards of ``--shard``
tokens (even: zig-zag) and ``--shard + 1`` (odd: contiguous), each jitted, one warm-up call then three timed,
twice in alternation. The zig-zag ring scores (c + 1) / 2c of the contiguous ring's pairs.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import l4jax  # noqa: E402
from l4jax.model.context import attend_split  # noqa: E402
from l4jax.parallel import partitioning  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--shard", type=int, default=384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    c, H, K, hd = args.context, args.heads, args.kv_heads, args.head_dim
    text = l4jax.load_config("bench").text
    part = partitioning(text, l4jax.make_mesh(context=c, data=jax.device_count() // c))
    rng = np.random.default_rng(0)
    print(f"{'shard':>6s} {'ring':>11s} {'ms':>8s}")
    for t in (args.shard, args.shard + 1) * 2:
        T = c * t
        q = jnp.asarray(rng.standard_normal((1, T, H, hd)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((1, T, K, hd)), jnp.float32)
        index, valid = jnp.arange(T)[None], jnp.ones((1, T), bool)
        f = jax.jit(lambda q, k, v, i, m: attend_split(q, k, v, i, m, None, 0.1, None, part, args.block))
        f(q, k, k, index, valid).block_until_ready()
        start = time.perf_counter()
        for _ in range(3):
            f(q, k, k, index, valid).block_until_ready()
        ms = (time.perf_counter() - start) / 3 * 1e3
        print(f"{t:6d} {'zig-zag' if t % 2 == 0 else 'contiguous':>11s} {ms:8.0f}", flush=True)
    print(f"zig-zag scores (c + 1) / 2c = {(c + 1) / (2 * c):.3f} of the contiguous ring's pairs")


if __name__ == "__main__":
    main()
