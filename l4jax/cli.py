"""The ``l4jax`` command line. Subcommands: ``info`` (more arrive with inference and training)."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import jax
    import numpy as np
    from flax import linen as nn

    from .api import abstract_params
    from .config import load_config

    cfg = load_config(args.model)
    t = cfg.text
    params = nn.meta.unbox(abstract_params(t))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"text decoder: {t.num_hidden_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} q / "
          f"{t.num_key_value_heads} kv heads x {t.head_dim}, vocab {t.vocab_size}")
    print(f"experts: {t.num_local_experts} (top-{t.num_experts_per_tok}) on {len(t.moe_layers)} layers, "
          f"expert hidden {t.intermediate_size}, dense hidden {t.intermediate_size_mlp}")
    print(f"attention: chunk {t.attention_chunk_size}, qk-norm {t.use_qk_norm}, temperature tuning "
          f"{t.attn_temperature_tuning} (floor {t.floor_scale:g}, scale {t.attn_scale:g}), rope theta "
          f"{t.rope_theta:g}, scaling {t.rope_scaling}")
    print("layer  attention  rope  ffn")
    for i in range(t.num_hidden_layers):
        print(f"{i:5d}  {'chunked' if t.chunked_layers[i] else 'global':9s}  {'yes' if t.rope_layers[i] else 'no':4s}  "
              f"{'moe' if t.is_moe(i) else 'dense'}")
    print(f"text parameters: {total:,}" + ("" if cfg.vision is None else " (vision tower not counted)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l4jax", description="Llama 4 in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a config: preset name, config file or HF model folder")
    info.add_argument("model", help="preset (scout, maverick, behemoth, tiny, bench), .yaml/.json file or folder")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    from .config import ConfigError
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"l4jax: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
