"""Kernel candidates for the training hot paths, timed on the device at the ``bench`` preset's shapes.

    python bench/kernels.py [--tokens 8192] [--out FILE.json]

MoE grouped matmul (x [M, D] sorted by expert @ w [E, D, F] per expert, M = B * T * top-k = 8192, D = F = 2048,
E = 16; balanced and skewed group sizes), forward and the two backward products:
  scan        l4jax's tile schedule (``l4jax.model.gmm``; the GPU default before "mgpu")
  ragged_dot  ``jax.lax.ragged_dot`` (dense over every expert on GPUs, per the compiled program)
  mgpu        Pallas Mosaic GPU kernels (Hopper wgmma): ``ragged_dot_mgpu`` for y = x W and dx = dy W^T
              (``transpose_rhs``), ``transposed_ragged_dot_mgpu`` for dW = x^T dy
  one matmul  [M, D] @ [D, F]: the same FLOPs in one cuBLAS call, the ceiling
Attention (B=4, T=2048, 16 query heads, 8 kv heads, head_dim 128, bf16, causal), forward and forward+backward:
  flash (l4jax's Triton kernel, what training uses), cudnn (``jax.nn.dot_product_attention``), mgpu (Pallas'
  Hopper kernel; causal forward only), xla.
Each row: median ms of 20 calls after a compiling one, TFLOP/s of useful work, and max |out - ref| / max |ref| against
float32 ``lax.ragged_dot`` / xla attention. A candidate that fails to compile prints its error and the rest go on.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from l4jax.model.gmm import gmm


def median_ms(f, *args, reps: int = 20) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def row(results: dict, name: str, fn, args, flops: float, ref=None) -> None:
    try:
        out = jax.block_until_ready(fn(*args))
        ms = median_ms(fn, *args)
        err = rel(out, ref) if ref is not None else float("nan")
        results[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err": err}
        print(f"{name:44s} {ms:9.3f} {flops / ms / 1e9:8.1f} {err:10.2e}", flush=True)
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile is a result too
        results[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
        print(f"{name:44s} error: {type(e).__name__}: {str(e)[:200]}", flush=True)


def group_sizes(M: int, E: int, skewed: bool) -> jnp.ndarray:
    if not skewed:
        return jnp.full((E,), M // E, jnp.int32)
    p = np.random.default_rng(1).dirichlet(np.full(E, 0.5))  # a router's uneven load; some experts near empty
    sizes = np.floor(p * M).astype(np.int32)
    sizes[0] += M - sizes.sum()
    return jnp.asarray(sizes)


def moe(results: dict, M: int, D: int, F: int, E: int) -> None:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (M, D), jnp.bfloat16)
    w = (jax.random.normal(k[1], (E, D, F), jnp.float32) * 0.02).astype(jnp.bfloat16)
    dy = jax.random.normal(k[2], (M, F), jnp.bfloat16)
    flops = 2.0 * M * D * F
    mg = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
    for skewed in (False, True):
        sizes = group_sizes(M, E, skewed)
        tag = "skewed" if skewed else "balanced"
        f32 = functools.partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32)
        ref_y = f32(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
        ref_dx = f32(dy.astype(jnp.float32), jnp.swapaxes(w, 1, 2).astype(jnp.float32), sizes)
        ref_dw = jax.vjp(lambda w_: f32(x.astype(jnp.float32), w_, sizes), w.astype(jnp.float32))[1](
            dy.astype(jnp.float32))[0]
        print(f"-- MoE grouped matmul, {tag} groups (M={M}, D={D}, F={F}, E={E})", flush=True)
        row(results, f"moe_{tag}_fwd_scan", jax.jit(lambda x, w, s: gmm(x, w, s, impl="scan")), (x, w, sizes),
            flops, ref_y)
        row(results, f"moe_{tag}_fwd_ragged_dot", jax.jit(jax.lax.ragged_dot), (x, w, sizes), flops, ref_y)
        for bn, gbn in ((128, 1), (128, 4), (256, 2)):
            cfg = dict(mg, block_n=bn, grid_block_n=gbn)
            row(results, f"moe_{tag}_fwd_mgpu_bn{bn}_g{gbn}",
                jax.jit(lambda x, w, s, c=cfg: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=s, **c)),
                (x, w, sizes), flops, ref_y)
        row(results, f"moe_{tag}_dx_mgpu_transpose_rhs",
            jax.jit(lambda d, w, s: ragged_dot_mgpu.ragged_dot(d, w, group_sizes=s, transpose_rhs=True, **mg)),
            (dy, w, sizes), flops, ref_dx)
        row(results, f"moe_{tag}_dw_mgpu_transposed",
            jax.jit(lambda x, d, s: transposed_ragged_dot_mgpu.transposed_ragged_dot(x, d, group_sizes=s, **mg)),
            (x, dy, sizes), flops, ref_dw)

        def scan_grad(x, w, s, d):
            _, vjp = jax.vjp(lambda x_, w_: gmm(x_, w_, s, impl="scan"), x, w)
            return vjp(d)

        def rd_grad(x, w, s, d):
            _, vjp = jax.vjp(lambda x_, w_: jax.lax.ragged_dot(x_, w_, s), x, w)
            return vjp(d)

        row(results, f"moe_{tag}_bwd_scan (dx + dw)", jax.jit(scan_grad), (x, w, sizes, dy), 2 * flops)
        row(results, f"moe_{tag}_bwd_ragged_dot (dx + dw)", jax.jit(rd_grad), (x, w, sizes, dy), 2 * flops)
    row(results, "moe_one_matmul_same_flops", jax.jit(lambda x, w: x @ w[0]), (x, w), flops)


def attention(results: dict, B: int = 4, T: int = 2048, H: int = 16, K: int = 8, hd: int = 128) -> None:
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    from l4jax.model.flash import flash_attend

    k = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(k[0], (B, T, H, hd), jnp.bfloat16)
    kk = jax.random.normal(k[1], (B, T, K, hd), jnp.bfloat16)
    v = jax.random.normal(k[2], (B, T, K, hd), jnp.bfloat16)
    do = jax.random.normal(k[3], (B, T, H, hd), jnp.bfloat16)
    scale = hd ** -0.5
    seg = jnp.ones((B, T), jnp.int32)
    fwd_flops = 2 * 2 * B * H * T * T * hd / 2  # two products, half the square (causal)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="xla")

    impls = {
        "flash": lambda q, k, v: flash_attend(q, k, v, seg, scale),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                              implementation="cudnn"),
        "xla": xla,
    }
    ref = xla(q.astype(jnp.float32), kk.astype(jnp.float32), v.astype(jnp.float32))
    print(f"-- attention, causal (B={B}, T={T}, H={H}, K={K}, hd={hd}, bf16)", flush=True)
    for name, f in impls.items():
        row(results, f"attn_fwd_{name}", jax.jit(f), (q, kk, v), fwd_flops, ref)
    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    row(results, "attn_fwd_mgpu", jax.jit(lambda q, k, v: attention_mgpu.attention(q * scale, k, v, cfg)),
        (q, kk, v), fwd_flops, ref)
    for name, f in impls.items():
        def grad(q, k, v, f=f):
            _, vjp = jax.vjp(f, q, k, v)
            return vjp(do)
        row(results, f"attn_fwd_bwd_{name}", jax.jit(grad), (q, kk, v), 3.5 * fwd_flops)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    print(f"{'kernel':44s} {'ms':>9s} {'TFLOP/s':>8s} {'rel err':>10s}", flush=True)
    results: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    for part in (lambda r: moe(r, args.tokens, 2048, 2048, 16), attention):
        try:
            part(results)
        except Exception as e:  # noqa: BLE001 - e.g. an import missing from this jax
            print(f"error: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.setdefault("errors", []).append(f"{type(e).__name__}: {str(e)[:300]}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
