"""The ``l4jax`` command line: ``info`` describes a config, ``generate`` streams text from a model, ``convert``
turns an HF checkpoint into an l4jax (Orbax) one."""

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


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,expert=2,tensor=2' -> {'data': 2, 'expert': 2, 'tensor': 2}."""
    axes = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if not size.strip().isdigit():
            raise ValueError(f"--mesh: expected AXIS=SIZE pairs like data=2,tensor=4, got {part!r}")
        axes[name.strip()] = int(size)
    return axes


def _generate(args) -> int:
    import numpy as np

    from . import load, make_mesh
    from .generate import stream
    from .tokenizer import IncrementalDecoder, Tokenizer, chat_prompt

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    dtype = DTYPES.get(args.dtype, args.dtype)
    model = load(args.model, dtype=dtype, mesh=mesh)
    tok = Tokenizer(args.model)
    text = chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = np.asarray([tok.encode(text, add_bos=True)])
    decoder = IncrementalDecoder(tok, skip_special_tokens=True)
    for token in stream(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        stop_tokens=tok.stop_ids() or None):
        sys.stdout.write(decoder.push(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    return 0


def _convert(args) -> int:
    import json
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from .config import load_config
    from .convert import hf, orbax

    src = Path(args.from_hf)
    cfg = load_config(src)
    dtype = np.dtype(DTYPES.get(args.dtype, args.dtype)) if args.dtype else hf.checkpoint_dtype(src)
    index = hf.SafetensorsIndex(src)
    total = sum(int(np.prod(s.shape)) for s in hf.plan(index, cfg.text)) * dtype.itemsize
    index.close()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {args.to}", file=sys.stderr) as bar:
        orbax.save(hf.stream(src, cfg.text, dtype), args.to, config=json.loads((src / "config.json").read_text()),
                   dtype=dtype.name, side_files_from=src, progress=bar.update)
    return 0


DTYPES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l4jax", description="Llama 4 in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a config: preset name, config file or HF model folder")
    info.add_argument("model", help="preset (scout, maverick, behemoth, tiny, bench), .yaml/.json file or folder")
    info.set_defaults(run=_info)
    gen = sub.add_parser("generate", help="stream a completion from an HF model folder (with tokenizer.json)")
    gen.add_argument("--model", required=True, help="HF model folder: config.json, safetensors, tokenizer.json")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the Llama 4 chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (Meta suggests 0.6 for chat)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--mesh", default=None, help="e.g. data=1,expert=2,tensor=4 (product = device count)")
    gen.add_argument("--dtype", default=None, help="bf16 or fp32 (default: the checkpoint's)")
    gen.set_defaults(run=_generate)
    conv = sub.add_parser("convert", help="HF safetensors folder -> l4jax (Orbax) checkpoint, one tensor at a time")
    conv.add_argument("--from-hf", required=True, help="HF model folder")
    conv.add_argument("--to", required=True, help="output folder (must not exist)")
    conv.add_argument("--dtype", default=None, help="bf16, fp32 or fp16 (default: the checkpoint's)")
    conv.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    from .config import ConfigError
    from .convert.hf import CheckpointError
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"l4jax: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
