"""Weight quantization judged on a trained model: held-out perplexity and greedy continuations with int8 and int4
weights, against the same model unquantized.

    l4jax train --config configs/tiny.yaml          # the main job: runs/tiny/model
    python bench/quant.py [--model runs/tiny/model] [--text bench/data/heldout.txt] [--json]

Perplexity: the held-out text (``bench/data/heldout.txt``: fables written for this check, in none of the training
data) in rows, scored by one forward each (the quantized models are ``l4jax.load(..., quantize=...)``, computing in
float32 so that only the weights' rounding shows). Greedy: the opening tokens of a few corpus documents as prompts,
``--new`` tokens from each model; the table counts how many leading tokens agree with the unquantized model's. The
issue's bounds: the perplexity rises by at most 0.5% with int8 and 3% with int4.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

import l4jax
from kv_int8 import greedy, greedy_agreement  # bench/: the same prompts and count
from l4jax.data import Tokenizer

MODES = ("int8", "int4")


def perplexity(model, ids: np.ndarray) -> float:
    logits = np.asarray(model(ids), np.float64)[:, :-1]
    logits -= logits.max(-1, keepdims=True)
    logp = np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0] - np.log(np.exp(logits).sum(-1))
    return float(np.exp(-logp.mean()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/tiny/model")
    ap.add_argument("--text", default="bench/data/heldout.txt")
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tok = Tokenizer(args.model)
    with open(args.text, encoding="utf-8") as f:
        ids = np.asarray(tok.encode(f.read(), add_bos=True))
    T = len(ids) // args.rows
    ids = ids[:args.rows * T].reshape(args.rows, T)
    full = l4jax.load(args.model, dtype=jnp.float32)
    result = {"tokens": int(ids[:, 1:].size), "ppl_float32": perplexity(full, ids)}
    for mode in MODES:
        q = l4jax.load(args.model, dtype=jnp.float32, quantize=mode)
        result[f"ppl_{mode}"] = perplexity(q, ids)
        result[f"rise_pct_{mode}"] = 100 * (result[f"ppl_{mode}"] / result["ppl_float32"] - 1)
        result[f"greedy_agree_{mode}"] = greedy_agreement(greedy(full), greedy(q), tok, args.new)
    result["new"] = args.new
    if args.json:
        print(json.dumps(result))
        return
    print(f"held-out perplexity ({result['tokens']} tokens): float32 weights {result['ppl_float32']:.4f}")
    for mode in MODES:
        print(f"  {mode} weights {result[f'ppl_{mode}']:.4f}  rise {result[f'rise_pct_{mode}']:+.3f}%  greedy tokens "
              f"shared with float32, of {args.new} per prompt: {result[f'greedy_agree_{mode}']}")


if __name__ == "__main__":
    main()
