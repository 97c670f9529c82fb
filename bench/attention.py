"""Attention memory and time: chunked layers' dense path (one [T, T] score matrix) against the blockwise path
(``attend_local``); with ``--global``, a global layer all queries at once against ``attend_by_query_blocks``
(``QUERY_BLOCK`` queries at a time, each piece scoring only its visible keys), its forward or, with ``--train``, its
gradient.

    python bench/attention.py [--seq 2048 4096 8192] [--chunk 2048] [--batch 1] [--dtype bfloat16] [--global [--train]]

The shapes default to the ``bench`` preset's attention (16 query heads, 8 kv heads, head_dim 128, chunk 2048), one
left-padded row. For each length it prints the compiled program's temporary memory (XLA's ``memory_analysis``:
device-independent, it is what the score matrices cost), the median time of 5 calls after compiling, and the
largest difference between the two paths' outputs on real tokens.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.model.attention import QUERY_BLOCK, attend, attend_by_query_blocks, attend_local, use_local
from l4jax.model.masks import chunk_ids, visible


def measure(fns: dict, args: tuple, row: dict, repeats: int) -> dict:
    """Compile each jitted function on ``args``; put its temp MiB and median ms of ``repeats`` calls (after a first
    one) in ``row``; return each one's output."""
    outs = {}
    for name, f in fns.items():
        compiled = f.lower(*args).compile()
        mem = compiled.memory_analysis()
        row[f"{name} temp MiB"] = None if mem is None else mem.temp_size_in_bytes / 2**20
        outs[name] = jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t)
        row[f"{name} ms"] = 1e3 * float(np.median(times))
    return outs


def run(T: int, C: int, B: int, H: int, K: int, hd: int, dtype, dense: bool, block: int | None) -> dict:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, hd)), dtype) for n in (H, K, K))
    left_pad = jnp.full((B,), 5)
    index = jnp.arange(T)[None]
    valid = index >= left_pad[:, None]
    group = chunk_ids(index, left_pad, C)
    scale = hd ** -0.5
    paths = {"blockwise": jax.jit(lambda q, k, v: attend_local(q, k, v, index, group, valid, group, scale, C,
                                                                         block=block))}
    if dense:
        paths["dense"] = jax.jit(lambda q, k, v: attend(q, k, v, visible(index, index, valid, group, group), scale))
    row = {"T": T, "blockwise chosen": use_local(T, 0, C)}
    outs = measure(paths, (q, k, v), row, repeats=5)
    if dense:
        real = np.asarray(valid)
        diff = np.abs(np.asarray(outs["dense"], np.float32) - np.asarray(outs["blockwise"], np.float32))[real]
        row["max |diff|"] = float(diff.max())
    return row


def run_global(T: int, B: int, H: int, K: int, hd: int, dtype, train: bool) -> dict:
    """A global layer over T fresh tokens (no cache): all queries at once vs ``attend_by_query_blocks``.

    With ``train``, the gradient of a weighted sum of the output with respect to q, k and v (what a training step
    computes for attention), else the forward alone (a prefill).
    """
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, hd)), dtype) for n in (H, K, K))
    w = jnp.asarray(rng.normal(size=(B, T, H, hd)), dtype)
    index = jnp.arange(T)[None]
    valid = jnp.ones((B, T), bool)
    scale = hd ** -0.5
    fns = {"dense": lambda q, k, v: attend(q, k, v, visible(index, index, valid), scale),
           "blockwise": lambda q, k, v: attend_by_query_blocks(q, k, v, index, index, valid, None, None, scale,
                                                               QUERY_BLOCK)}
    if train:
        fns = {name: jax.grad(lambda q, k, v, f=f: jnp.sum((f(q, k, v) * w).astype(jnp.float32)), (0, 1, 2))
               for name, f in fns.items()}
    row = {"T": T, "blockwise chosen": T > QUERY_BLOCK}
    outs = measure({name: jax.jit(f) for name, f in fns.items()}, (q, k, v), row, repeats=1)
    row["max |diff|"] = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                            for a, b in zip(jax.tree.leaves(outs["dense"]), jax.tree.leaves(outs["blockwise"])))
    row["max |dense|"] = max(float(np.abs(np.asarray(a, np.float32)).max()) for a in jax.tree.leaves(outs["dense"]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block", type=int, default=None, help="query block of the blockwise path (default chunk / 4)")
    ap.add_argument("--dense-max", type=int, default=8192, help="longest T also run on the dense path")
    ap.add_argument("--global", dest="global_layers", action="store_true",
                    help=f"global layers: all queries at once vs {QUERY_BLOCK} at a time, visible keys only")
    ap.add_argument("--train", action="store_true", help="with --global: time the gradient, not the forward")
    a = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"B={a.batch} H={a.heads} K={a.kv_heads} hd={a.head_dim} C={a.chunk} {a.dtype}")
    if a.global_layers:
        rows = [run_global(T, a.batch, a.heads, a.kv_heads, a.head_dim, jnp.dtype(a.dtype), a.train)
                for T in a.seq]
    else:
        rows = [run(T, a.chunk, a.batch, a.heads, a.kv_heads, a.head_dim, jnp.dtype(a.dtype), T <= a.dense_max,
                    a.block)
                for T in a.seq]
    cols = ["T", "blockwise chosen", "dense temp MiB", "blockwise temp MiB", "dense ms", "blockwise ms", "max |diff|",
            "max |dense|"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [r.get(c) for c in cols]
        print("| " + " | ".join("-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
                                for x in cells) + " |")


if __name__ == "__main__":
    main()
