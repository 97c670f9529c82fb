"""Training benchmark: tokens/s and MFU of one train step, l4jax against transformers, in one run.

    python bench/train.py [--config bench] [--batch 4] [--seq 2048] [--steps 5] [--remat none] [--no-hf]

Random weights of the given preset (``bench``: hidden 2048, 8 MoE layers, 16 experts top-1, vocab 202048), bf16
compute with fp32 master weights and AdamW on both sides. MFU = model FLOPs per token (top-k experts only, see
``l4jax.train.flops``) x tokens/s / the device's measured bf16 matmul rate. transformers computes every expert for every
token (its Llama 4 MoE is dense), so its MFU counts only the useful top-k work too.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import l4jax
from l4jax.model.gmm import IMPLS
from l4jax.train import TrainConfig, Trainer, flops


def random_batch(vocab: int, batch: int, seq: int) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq)).astype(np.int32)
    return {"inputs": ids, "targets": np.roll(ids, -1, axis=1), "segment_ids": np.ones_like(ids),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
            "loss_mask": np.ones(ids.shape, np.float32)}


def time_l4jax(config, tc: TrainConfig, steps: int) -> float:
    """Seconds per step (median of ``steps`` after one compiling step)."""
    trainer = Trainer(config, tc)
    state, frozen = trainer.init_state()
    batch = random_batch(config.text.vocab_size, tc.batch_size, tc.seq_len)
    state, m = trainer.step(state, frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = trainer.step(state, frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_hf(config_name: str, batch: int, seq: int, steps: int) -> float:
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    text = l4jax.load_config(config_name).text.to_hf()
    text.pop("model_type")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Llama4ForCausalLM(Llama4TextConfig(**text, attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, text["vocab_size"], (batch, seq), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 1):
        sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):  # bf16 compute, fp32 master weights, as l4jax's
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--moe-impl", default="auto", choices=("auto",) + IMPLS)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-only", action="store_true", help="only the transformers row (its own process: JAX's "
                    "allocator keeps what the l4jax step used)")
    args = ap.parse_args()
    config = l4jax.load_config(args.config)
    tc = TrainConfig(seq_len=args.seq, batch_size=args.batch, compute_dtype="bfloat16", param_dtype="float32",
                     remat=args.remat, moe_impl=args.moe_impl, steps=1000)
    per_token = flops.train_flops_per_token(config.text, args.seq)
    peak = flops.measure_peak_flops(jnp.bfloat16)
    print(f"device: {jax.devices()[0].device_kind}; measured bf16 matmul {peak / 1e12:.1f} TFLOP/s; config "
          f"{args.config}, batch {args.batch} x {args.seq}, remat {args.remat}, moe_impl {args.moe_impl}; "
          f"{per_token / 1e9:.2f} GFLOP per token")
    print(f"{'impl':14s} {'s/step':>8s} {'tokens/s':>10s} {'MFU %':>7s}")
    tokens = args.batch * args.seq
    rows = []
    for name, timed in (("l4jax", lambda: time_l4jax(config, tc, args.steps)),
                        ("transformers", lambda: time_hf(args.config, args.batch, args.seq, args.steps))):
        if (name == "l4jax" and args.hf_only) or (name == "transformers" and args.no_hf):
            continue
        rows.append((name, timed()))
        s = rows[-1][1]  # printed at once: a later row that fails keeps this one
        print(f"{name:14s} {s:8.3f} {tokens / s:10.0f} {100 * tokens / s * per_token / peak:7.1f}", flush=True)
    if len(rows) == 2:
        print(f"l4jax / transformers tokens/s: {rows[1][1] / rows[0][1]:.1f}x")


if __name__ == "__main__":
    main()
