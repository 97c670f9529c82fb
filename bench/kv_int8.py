"""The int8 KV cache judged on a trained model: held-out perplexity through the cache and greedy continuations,
against the same model with a bf16 cache.

    l4jax train --config configs/tiny.yaml          # the main job: runs/tiny/model
    python bench/kv_int8.py [--model runs/tiny/model] [--text bench/data/heldout.txt] [--json]

Perplexity: the held-out text (``bench/data/heldout.txt``: fables written for this check, in none of the training
data) in rows, each row's first ``--prefix`` tokens prefilled, the rest fed one token at a time through the decode
step (``l4jax.infer.score``). Greedy: the opening tokens of a few corpus documents as prompts, ``--new`` tokens from
each cache; the table counts how many leading tokens agree. The logit bound is max |logit(int8) - logit(bf16)| over
every vocabulary entry at every scored position, beside the same bound between the bf16 model and its float32
original (the scale of bf16's own rounding).
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

import l4jax
from l4jax.data import Tokenizer, corpus_files, read_documents
from l4jax.infer.score import logits_through_cache

PROMPT_DOCS = (0, 40, 120, 200, 300)  # corpus documents whose openings are the greedy prompts
PROMPT_TOKENS = 12


def perplexities(model, fp32, tok: Tokenizer, text: str, rows: int, prefix: int) -> dict:
    """The bf16 ``model``'s held-out perplexity through a bf16 and an int8 cache; ``fp32`` (the same weights in
    float32, with a float32 cache) gives the scale of bf16's own rounding."""
    ids = np.asarray(tok.encode(text, add_bos=True))
    T = len(ids) // rows
    ids = ids[:rows * T].reshape(rows, T)
    out = {}
    logits = {kv: logits_through_cache(model, ids, prefix=prefix, kv_dtype=kv) for kv in ("bfloat16", "int8")}
    logits["float32"] = logits_through_cache(fp32, ids, prefix=prefix)
    for kv, lg in logits.items():
        lg = lg - lg.max(-1, keepdims=True)
        logp = np.take_along_axis(lg, ids[:, prefix:, None], -1)[..., 0] - np.log(np.exp(lg).sum(-1))
        out[f"ppl_{kv}"] = float(np.exp(-logp.mean()))
    out["ppl_rise_pct"] = 100 * (out["ppl_int8"] / out["ppl_bfloat16"] - 1)
    out["max_logit_diff"] = float(np.abs(logits["int8"] - logits["bfloat16"]).max())
    out["max_logit_diff_bf16_vs_fp32"] = float(np.abs(logits["bfloat16"] - logits["float32"]).max())
    out["scored_tokens"] = int(ids[:, prefix:].size)
    return out


def greedy_agreement(reference, other, tok: Tokenizer, new: int) -> list[int]:
    """For each prompt, how many leading greedy tokens ``other(ids, new)`` shares with ``reference(ids, new)`` (of
    ``new``): each a function returning the generated rows (bench/quant.py uses it too)."""
    docs = read_documents(corpus_files())
    agree = []
    for d in PROMPT_DOCS:
        ids = np.asarray([tok.encode(docs[d], add_bos=True)[:PROMPT_TOKENS]])
        a, b = (gen(ids, new)[0, PROMPT_TOKENS:] for gen in (reference, other))
        agree.append(int(new if (a == b).all() else np.argmin(a == b)))
    return agree


def greedy(model, **kw):
    """``model``'s greedy generation without stop tokens, as ``greedy_agreement`` calls it."""
    return lambda ids, new: model.generate(ids, max_new_tokens=new, stop_tokens=(), **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/tiny/model")
    ap.add_argument("--text", default="bench/data/heldout.txt")
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = l4jax.load(args.model, dtype=jnp.bfloat16)
    tok = Tokenizer(args.model)
    with open(args.text, encoding="utf-8") as f:
        result = perplexities(model, l4jax.load(args.model, dtype=jnp.float32), tok, f.read(), args.rows,
                              args.prefix)
    result["greedy_agree"] = greedy_agreement(greedy(model, kv_dtype="bfloat16"), greedy(model, kv_dtype="int8"),
                                              tok, args.new)
    result["new"] = args.new
    if args.json:
        print(json.dumps(result))
        return
    print(f"held-out perplexity through the cache ({result['scored_tokens']} tokens, prefix {args.prefix}):")
    print(f"  bf16 cache {result['ppl_bfloat16']:.4f}   int8 cache {result['ppl_int8']:.4f}   "
          f"rise {result['ppl_rise_pct']:+.3f}%   (fp32 model and cache {result['ppl_float32']:.4f})")
    print(f"max |logit(int8 cache) - logit(bf16 cache)| {result['max_logit_diff']:.4f}; bf16's own rounding: "
          f"max |logit(bf16) - logit(fp32)| {result['max_logit_diff_bf16_vs_fp32']:.4f}")
    print(f"greedy tokens shared with the bf16 cache, of {args.new} per prompt: {result['greedy_agree']}")


if __name__ == "__main__":
    main()
