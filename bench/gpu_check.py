"""Numbers on a GPU: the GPU's own kernels (the fused Pallas attention, the MoE tile schedule) against transformers
and against l4jax's XLA paths, run where they compile for real (on the CPU the fused kernel only runs interpreted).

    python bench/gpu_check.py [--out FILE.json]

1. transformers parity: three tiny random HF checkpoints (tests/tiny.py: Scout-like, Maverick-like, top-2), rows
   of 200, 130 and 61 real tokens (left-padded; chunks of 8, so every row crosses many); the reference logits come
   from torch on the CPU in float32. l4jax runs float32 on the GPU with each attention path and each matmul
   precision ("highest": true float32; "default": what XLA picks on the chip, TF32 on Hopper).
2. flash against xla in the network: the ``tiny`` preset (chunk 64), 2 rows of 512 tokens (one left-padded by 37),
   the logits and the gradient of a random projection of them, in float32 and bfloat16.

Each line prints max |ours - ref| / max |ref| over real tokens (gradients: the largest leaf's relative L2 error).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import l4jax  # noqa: E402
from l4jax.model.decoder import Inputs, Llama4Text  # noqa: E402
from l4jax.model.kernels import Kernels  # noqa: E402
from l4jax.parallel import partitioning  # noqa: E402

# On the CPU (to try this script) the fused kernel runs in Pallas' interpret mode.
FLASH = "flash" if jax.default_backend() == "gpu" else "flash_interpret"


def hf_parity(results: dict) -> None:
    from tiny import batch, hf_logits, hf_model, rel_err, save

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("scout", "maverick", "top2"):
            model = hf_model(name, seed=3)
            folder = save(model, Path(tmp) / name)
            ids, mask, pos = batch(lengths=(200, 130, 61), seed=1)
            ref = hf_logits(model, ids, mask, pos)
            for impl in (FLASH, "xla"):
                for precision in ("highest", "default"):
                    with jax.default_matmul_precision(precision):
                        ours = np.asarray(l4jax.load(folder, dtype=jnp.float32, attention_impl=impl)(ids, mask))
                    err = rel_err(ours, ref, mask)
                    results[f"hf_{name}_{impl}_{precision}"] = err
                    print(f"transformers parity  {name:9s} {impl:6s} {precision:8s} {err:.2e}", flush=True)


def flash_vs_xla(results: dict) -> None:
    cfg = l4jax.load_config("tiny").text
    params32 = l4jax.init("tiny", dtype=jnp.float32).params
    B, T, pad = 2, 512, 37
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), jnp.int32).at[1, :pad].set(0)
    proj = jnp.asarray(rng.normal(size=(B, T, cfg.vocab_size)), jnp.float32) * mask[..., None]

    def run(attention: str, dtype):
        module = Llama4Text(cfg, partitioning(cfg, None), Kernels("scan", attention), dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda p: p.astype(dtype), params32)

        def loss(p):
            logits = module.apply({"params": p}, Inputs(ids, mask)).logits.astype(jnp.float32)
            return jnp.sum(logits * proj), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)

    sel = np.asarray(mask).astype(bool)
    for dtype in (jnp.float32, jnp.bfloat16):
        with jax.default_matmul_precision("highest"):
            ref_logits, ref_grads = run("xla", jnp.float32)
            logits, grads = run(FLASH, dtype)
        err = float(np.abs(logits - ref_logits)[sel].max() / np.abs(ref_logits[sel]).max())
        gerr = max(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
                   for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        name = jnp.dtype(dtype).name
        results[f"flash_vs_xla_f32_logits_{name}"], results[f"flash_vs_xla_f32_grads_{name}"] = err, gerr
        print(f"flash ({name}) vs xla (float32, highest): logits {err:.2e}, gradients {gerr:.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    for check in (flash_vs_xla, hf_parity):
        try:
            check(results)
        except Exception as e:  # one failing check must not hide the others' numbers
            results[check.__name__] = f"error: {type(e).__name__}: {str(e)[:400]}"
            print(f"{check.__name__}: {results[check.__name__]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
