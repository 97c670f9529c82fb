"""Long context: one prefill of --seq tokens on one device and with the sequence split over --context devices,
in the same run (simulated CPU devices on a CPU-only machine).

    python bench/context.py [--seq 65536] [--context 8] [--gather-mib M] [--json]

The model is the ``tiny`` preset (chunk 64: its chunked layers take the halo path, its global layer the ring, or the
row's keys gathered whole when they are small: ``--gather-mib``) with random weights; one row, five slots of left
padding. For each layout: seconds to compile and to run the prefill (``generate``'s: the prompt into an empty cache,
last-token logits), the compiled program's temporaries per device (XLA's ``memory_analysis``) and the KV cache one
device holds, against the whole cache; then the largest difference between the two layouts' last-token logits and
between their caches (real tokens' entries).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--gather-mib", type=float, default=None,
                    help="rows whose keys and values take at most this many MiB are gathered whole, longer ones go "
                         "around the ring (default: l4jax's, context.GATHER_BYTES; 0: always the ring)")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.context}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import l4jax
    from l4jax.infer.generate import _prefill
    from l4jax.model import context
    if args.gather_mib is not None:
        context.GATHER_BYTES = int(args.gather_mib * 2**20)
    from l4jax.model.cache import KVCache
    from l4jax.model.decoder import Inputs

    tiny = l4jax.load_config("tiny").text.to_hf()
    per_layer = ("moe_layers", "no_rope_layers", "layer_types")  # derived from the layer count again
    cfg = l4jax.load_config({**{k: v for k, v in tiny.items() if k not in per_layer},
                             "max_position_embeddings": 2 * args.seq})
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.text.vocab_size, (1, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[:, :5], mask[:, :5] = 0, 0

    rows, results = [], {}
    global_layers = [not c for c in cfg.text.chunked_layers]
    for name, mesh in (("one device", None), (f"context={args.context}", l4jax.make_mesh(context=args.context))):
        model = l4jax.init(cfg, seed=0, mesh=mesh)
        tokens = None if mesh is None else model.part.sharding(("act_batch", "act_length"))
        x, m = (jax.device_put(a, tokens) for a in (ids, mask))
        cache = KVCache.init(cfg.text, 1, args.seq, jnp.float32, model.part)
        step = jax.jit(lambda p, x, m, c: _prefill(model.module, p, Inputs(x, m), c))
        t = time.perf_counter()
        compiled = step.lower(model.params, x, m, cache).compile()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        logits, filled = jax.block_until_ready(compiled(model.params, x, m, cache))
        run_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        held = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(filled))
        whole = sum(leaf.nbytes for leaf in jax.tree.leaves(filled))
        # Keys and values of real tokens (a padding slot's hold whatever its query's empty attention gave, which
        # differs between the paths and is never read): the global layers' first 5 slots left out.
        real = [np.asarray(filled.k[i])[:, :, 5 if g else 0:] for i, g in enumerate(global_layers)]
        real += [np.asarray(filled.v[i])[..., 5 if g else 0:] for i, g in enumerate(global_layers)]
        results[name] = (np.asarray(logits), real)
        rows.append({"layout": name, "compile s": compile_s, "prefill s": run_s,
                     "temporaries MiB / device": mem.temp_size_in_bytes / 2**20 if mem else None,
                     "cache MiB / device": held / 2**20, "cache MiB in all": whole / 2**20})
    (a, ca), (b, cb) = results.values()
    diff = {"logits max |diff|": float(np.abs(a - b).max()),
            "cache max |diff| (real tokens)": max(float(np.abs(x - y).max()) for x, y in zip(ca, cb))}
    if args.json:
        print(json.dumps({"seq": args.seq, "rows": rows, **diff}))
        return
    print(f"prefill of {args.seq} tokens, tiny preset, float32, jax {jax.__version__}, {jax.devices()[0].platform}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    print(", ".join(f"{k}: {v:.2e}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
