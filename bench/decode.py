"""Inference benchmark: prefill tokens/s and decode ms/step, l4jax against transformers, in one run.

    python bench/decode.py [--config bench] [--prompt 2048] [--new 64] [--batch 1 32] [--dtype bfloat16] [--kv-int8]
                           [--quantize int8 int4] [--no-hf]

Random weights of the given preset (the ``bench`` preset: hidden 2048, 8 MoE layers, 16 experts top-1, vocab
202048). Decode is greedy, no stop token, through ``l4jax.infer.generate.stream`` (the real API: a compiled loop of
up to 32 tokens per device call, with a donated cache). The roofline column divides the bytes a step must read
(``plan.costs.decode_costs``: every weight a token uses, the routed experts the batch is expected to pick, and the
cache at its fullest, int8 with its scales for the ``kv int8`` row, the weights at 1 or 0.5 bytes for the ``int8`` /
``int4`` rows: the same random weights quantized) by the measured copy bandwidth of the device.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import l4jax
from l4jax.infer.generate import stream
from l4jax.infer.model import Model
from l4jax.model.gmm import IMPLS
from l4jax.model.quant import MODES, quantize_params
from l4jax.plan.costs import decode_costs


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device copy (read + write), the ceiling for a weight-streaming decode step."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    times = []
    for _ in range(6):  # the first compiles
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / float(np.median(times[1:]))


def time_l4jax(model, batch: int, prompt: int, new: int, kv_dtype=None) -> tuple[float, float]:
    ids = np.random.default_rng(0).integers(0, model.config.text.vocab_size, size=(batch, prompt))
    for _ in range(2):  # the first run compiles
        it = stream(model, ids, max_new_tokens=new, stop_tokens=(), kv_dtype=kv_dtype)
        t0 = time.perf_counter()
        next(it)  # prefill + first token
        t1 = time.perf_counter()
        n = sum(1 for _ in it)
        t2 = time.perf_counter()
    return batch * prompt / (t1 - t0), (t2 - t1) / max(n, 1) * 1e3


def time_hf(cfg_name: str, batch: int, prompt: int, new: int, dtype: str) -> tuple[float, float]:
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    text = l4jax.load_config(cfg_name).text.to_hf()
    text.pop("model_type")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    with torch.device(device):
        model = Llama4ForCausalLM(Llama4TextConfig(**text, attn_implementation="sdpa")).to(tdtype).eval()
    ids = torch.randint(0, text["vocab_size"], (batch, prompt), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            model(ids)
            sync()
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync()
            t2 = time.perf_counter()
    return batch * prompt / (t1 - t0), ((t2 - t1) - (t1 - t0)) / max(new - 1, 1) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--moe-impl", default="auto", choices=("auto",) + IMPLS)
    ap.add_argument("--kv-int8", action="store_true", help="also an l4jax row with the int8 KV cache")
    ap.add_argument("--quantize", nargs="*", default=[], choices=MODES,
                    help="also l4jax rows with these weight quantizations (int8, int4, fp8) of the same weights")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    model = l4jax.init(args.config, dtype=jnp.dtype(args.dtype), moe_impl=args.moe_impl)
    quantized = {m: Model(model.config, quantize_params(model.params, m), dtype=model.dtype, moe_impl=args.moe_impl)
                 for m in args.quantize}
    cfg = model.config.text
    bw = copy_bandwidth()  # read + write of a copy: the bandwidth a weight-streaming step can use
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {bw / 1e9:.0f} GB/s; config {args.config}, "
          f"{args.dtype}, prompt {args.prompt}, {args.new} new tokens, moe_impl {args.moe_impl}")
    print(f"{'impl':14s} {'batch':>5s} {'prefill tok/s':>14s} {'decode ms/step':>15s} {'decode tok/s':>13s} "
          f"{'step GB':>8s} {'roofline %':>11s}")
    for b in args.batch:
        # What a step must read: the weights its tokens use and the cache at its fullest (plan/costs.py).
        def step_bytes(kv_int8=False, quantize=None):
            return decode_costs(cfg, batch=b, cache=args.prompt + args.new, itemsize=jnp.dtype(args.dtype).itemsize,
                                devices=1, kv_int8=kv_int8, quantize=quantize).bytes

        rows = [("l4jax", time_l4jax(model, b, args.prompt, args.new), step_bytes())]
        if args.kv_int8:
            rows.append(("l4jax kv int8", time_l4jax(model, b, args.prompt, args.new, "int8"), step_bytes(True)))
        for m, qmodel in quantized.items():
            rows.append((f"l4jax {m}", time_l4jax(qmodel, b, args.prompt, args.new), step_bytes(quantize=m)))
        if not args.no_hf:
            rows.append(("transformers", time_hf(args.config, b, args.prompt, args.new, args.dtype), step_bytes()))
        for name, (pre, ms), nbytes in rows:
            print(f"{name:14s} {b:5d} {pre:14.0f} {ms:15.2f} {b / ms * 1e3:13.0f} {nbytes / 1e9:8.3f} "
                  f"{nbytes / bw * 1e3 / ms * 100:11.1f}")


if __name__ == "__main__":
    main()
