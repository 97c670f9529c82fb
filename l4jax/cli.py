"""The ``l4jax`` command line: ``info`` describes a config, ``generate`` streams text from a model, ``convert``
turns an HF checkpoint into an l4jax (Orbax) one, ``train`` runs the training loop, ``plan`` compiles a step for an
H100 host or a TPU slice without the hardware."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from . import tree
from .checkpoints import conversion, hf_import, l4jax_format
from .checkpoints.hf_import import CheckpointError
from .config import ConfigError, config_path, dtype_name, load_config, read_document
from .model.quant import MODES
from .plan.targets import COMPILE_ONLY_ENV, PlanError

# Each command imports the rest of l4jax itself: `l4jax convert` never loads Flax, the model or the trainer
# (~1.1 s of start-up; l4jax/_lazy.py).


def _info(args) -> int:
    from .infer.load import abstract_model, model_config
    cfg = model_config(args.model)
    t = cfg.text
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
    params = abstract_model(cfg)
    vision = {k: params.pop(k) for k in ("vision_model", "projector") if k in params}
    print(f"text parameters: {tree.count(params):,}")
    if cfg.vision is not None:
        v = cfg.vision
        print(f"vision tower: {v.num_hidden_layers} layers, hidden {v.hidden_size}, {v.image_size}-px tiles of "
              f"{v.tokens_per_tile} tokens; vision parameters (with the projector): {tree.count(vision):,}")
    return 0


def _mesh(text: str | None):
    from .parallel.mesh import make_mesh, parse_mesh
    return make_mesh(**parse_mesh(text)) if text else None


def _text_argument(text: str, flag: str) -> str:
    """``text`` as given on the command line, if it is UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{flag}: not UTF-8 text (byte {e.object[e.start].encode('utf-8', 'surrogateescape')!r} at "
                         f"character {e.start})") from None
    return text


def _json_file(path: str, flag: str, key: str):
    """The list in a JSON file (or under ``key`` of the object it holds), for --messages / --tools."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text") from None
    if isinstance(value, dict) and key in value:
        value = value[key]
    if not isinstance(value, list):
        raise ValueError(f"{flag} {path}: expected a JSON list of {key} (or an object with a {key!r} list)")
    return value


def _prompt_text(args, tok, n_images: int) -> str:
    from .data.tokenizer import IMAGE
    """The prompt as text: rendered with the model folder's chat template (--chat, --messages), or as given."""
    if (args.prompt is None) == (args.messages is None):
        raise ValueError("give either --prompt TEXT or --messages FILE")
    tools = None if args.tools is None else _json_file(args.tools, "--tools", "tools")
    if args.messages is not None:
        return tok.chat_prompt(_json_file(args.messages, "--messages", "messages"), tools=tools)
    prompt = _text_argument(args.prompt, "--prompt")
    if args.chat or tools is not None:  # images first, then the text, in one user message
        parts = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return tok.chat_prompt([{"role": "user", "content": parts if n_images else prompt}], tools=tools)
    # A raw prompt places its images with <|image|>; without any, they go first.
    return prompt if IMAGE in prompt or not n_images else IMAGE * n_images + prompt


def _generate(args) -> int:
    from .data.images import ImageProcessor, encode_with_images
    from .data.tokenizer import IncrementalDecoder, Tokenizer
    from .infer import load
    from .infer.generate import stream
    from .infer.load import model_config
    from .model.vision import check_image_tokens
    dtype = None if args.dtype is None else dtype_name(args.dtype, "--dtype", ("float32", "bfloat16"))
    images = args.image or []
    model_config(args.model)  # names a missing or broken model folder before the prompt is looked at
    tok = Tokenizer(args.model)
    text = _prompt_text(args, tok, len(images))
    model = load(args.model, dtype=dtype, mesh=_mesh(args.mesh), vision=bool(images),  # the tower only with images
                 quantize=args.quantize)
    pixels = None
    if images:
        processor = ImageProcessor.from_folder(args.model, model.config.vision.image_size)
        ids, pixels = encode_with_images(tok, text, images, model.config, processor)
    else:
        ids = tok.encode(text, add_bos=True)
        # As in transformers, control tokens typed in the prompt are parsed as such (<|eot|> ends a turn), except
        # the image placeholder: only images make those.
        check_image_tokens(ids, 0, model.config.image_token_index)
    decoder = IncrementalDecoder(tok, skip_special_tokens=True)
    for token in stream(model, np.asarray([ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        stop_tokens=tok.stop_ids() or None, pixel_values=pixels,
                        kv_dtype="int8" if args.kv_int8 else None):
        sys.stdout.write(decoder.push(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    return 0


def _export(args) -> int:
    if args.quantize is not None:
        raise ValueError("--quantize: for --from-hf (an HF export holds the unquantized model)")
    if not args.to_hf or args.to:
        raise ValueError("--from-l4jax writes an HF folder: give --to-hf OUT (and no --to)")
    if not l4jax_format.is_checkpoint(args.from_l4jax):
        raise ValueError(f"--from-l4jax {args.from_l4jax}: not an l4jax checkpoint (no {l4jax_format.MANIFEST})")
    if not args.shard_size > 0:
        raise ValueError(f"--shard-size: must be a positive number of GB, got {args.shard_size}")
    dtype = None if args.dtype is None else dtype_name(args.dtype, "--dtype")
    budget = _read_ahead_bytes(args)
    # Streamed from the disk (no device involved) and resumable, as the import (checkpoints/conversion.py); the
    # checkpoint's stored config.json is written back field for field.
    plan = conversion.export_plan(args.from_l4jax, dtype=dtype, shard_size=int(args.shard_size * 1e9))
    with tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"export -> {args.to_hf}", file=sys.stderr) as bar:
        out = conversion.export(plan, args.to_hf, progress=bar.update, restart=args.restart, budget=budget)
    print(f"HF folder written to {out}")
    return 0


def _read_ahead_bytes(args) -> int | None:
    if args.read_ahead_gb is not None and not args.read_ahead_gb > 0:
        raise ValueError(f"--read-ahead-gb: must be a positive number of GB, got {args.read_ahead_gb}")
    return None if args.read_ahead_gb is None else int(args.read_ahead_gb * 1e9)


def _convert(args) -> int:
    if args.from_l4jax is not None:
        return _export(args)
    if not args.to or args.to_hf:
        raise ValueError("--from-hf writes an l4jax checkpoint: give --to OUT (and no --to-hf)")
    src = Path(args.from_hf)
    if l4jax_format.is_checkpoint(src):
        raise ValueError(f"--from-hf {src}: already an l4jax checkpoint (l4jax.load and l4jax generate read it as "
                         "it is; there is nothing to convert)")
    if not src.is_dir():
        raise ValueError(f"--from-hf {src}: {'not a folder' if src.exists() else 'no such folder'} (an HF model "
                         "folder holds config.json and *.safetensors)")
    budget = _read_ahead_bytes(args)
    if args.quantize is not None and args.quantize not in MODES:
        raise ValueError(f"--quantize: {', '.join(MODES)}, got {args.quantize!r}")
    cfg = load_config(src)
    dtype = np.dtype(dtype_name(args.dtype, "--dtype") if args.dtype else hf_import.checkpoint_dtype(src))
    # An FP8 release converted with --quantize fp8 keeps its FP8 weights as they are, the others as stored.
    keep_fp8 = args.quantize == "fp8" and hf_import.is_fp8(src)
    # The vision tower comes along when the config has one (the written config.json keeps its vision_config).
    reads = hf_import.reads(src, cfg, dtype, keep_fp8=keep_fp8, as_rows=True)  # large tensors: as they are read
    # Resumable: a killed conversion's partial folder is continued by the same command (checkpoints/conversion.py).
    with tqdm(total=sum(n for _, n, _ in reads), unit="B", unit_scale=True, desc=f"convert -> {args.to}",
              file=sys.stderr) as bar:
        conversion.convert(reads, args.to, source=src, config=json.loads((src / "config.json").read_text()),
                           dtype=dtype.name, progress=bar.update, restart=args.restart, budget=budget,
                           quantize=None if keep_fp8 else args.quantize)
    return 0


def _train(args) -> int:
    from .parallel.mesh import make_mesh, parse_mesh
    from .train.loop import TrainingError, run
    from .train.lora import LoraConfig
    from .train.run_folder import RunFolderError
    from .train.settings import TrainConfig
    config = load_config(args.config)
    tc = TrainConfig.from_yaml(args.config).replace(steps=args.steps, seed=args.seed, init_from=args.init_from)
    if args.lora and tc.lora is None:
        tc = tc.replace(lora=LoraConfig())
    mesh_axes = parse_mesh(args.mesh) if args.mesh else dict(tc.mesh)
    mesh = make_mesh(**mesh_axes) if mesh_axes else None
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    try:
        last = run(config, tc, out, mesh=mesh, resume=args.resume, teacher_dir=args.teacher, export_hf=args.export_hf)
    except (TrainingError, RunFolderError) as e:
        print(f"l4jax train: {e}", file=sys.stderr)
        return 1
    if last:
        print(f"step {last['step']:.0f}: loss {last['loss']:.4f}; metrics in {out / 'metrics.jsonl'}")
    if (out / "model").is_dir():
        print(f"model written to {out / 'model'}: l4jax generate --model {out / 'model'} --prompt ...")
    return 0


def _plan(args) -> int:
    from .parallel.mesh import parse_mesh
    from .plan.planner import Request, plan, to_json, to_text
    from .plan.targets import parse_target
    target = parse_target(args.target)
    quantize = args.quantize
    if quantize is None and args.task != "train" and Path(args.model).is_dir() and hf_import.is_fp8(args.model):
        quantize = "fp8"  # an FP8 release, as l4jax.load keeps it on a GPU (every large weight counted as FP8)
    req = Request(args.task, batch=args.batch, seq=args.seq, cache=args.cache,
                  mesh=parse_mesh(args.mesh) if args.mesh else {}, dtype=args.dtype, remat=args.remat,
                  moe_impl=args.moe_impl, kv_int8=args.kv_int8, objective=args.objective, quantize=quantize)
    result, planned = plan(load_config(args.model), target, req)
    print(to_json(result, target, args.model, planned) if args.json else to_text(result, target, args.model, planned))
    if args.dump_hlo:
        Path(args.dump_hlo).write_text(result.hlo)
    return 0


def _compile_only() -> None:
    """``l4jax plan`` compiles for chips this machine does not have: the host's CPU backend only (the CUDA plugin
    would look for a GPU, and check the CUDA libraries against one), set up before any backend starts."""
    for name, value in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(name, value)
    jax.config.update("jax_platforms", "cpu")


def _devices_wanted(argv: list[str]) -> int:
    """How many devices the command's mesh needs (``--mesh``, else a config's ``train.mesh``), 1 without one."""
    from .parallel.mesh import parse_mesh
    mesh = None
    if "--mesh" in argv and argv.index("--mesh") + 1 < len(argv):
        try:
            mesh = parse_mesh(argv[argv.index("--mesh") + 1])
        except ValueError:
            return 1  # reported when the command parses its arguments
    elif "--config" in argv and argv.index("--config") + 1 < len(argv):
        try:
            mesh = (read_document(config_path(argv[argv.index("--config") + 1])).get("train") or {}).get("mesh")
        except (ConfigError, AttributeError):
            return 1  # the real error is reported when the config is loaded
    n = 1
    for size in (mesh or {}).values():
        n *= int(size) if isinstance(size, int) else 1
    return n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l4jax", description="Llama 4 in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a config: preset name, config file or HF model folder")
    info.add_argument("model", help="preset (scout, maverick, behemoth, tiny, bench), .yaml/.json file or folder")
    info.set_defaults(run=_info)
    _add_generate(sub)
    conv = sub.add_parser("convert", help="HF safetensors folder -> l4jax (Orbax) checkpoint (--from-hf, --to), or "
                                          "back (--from-l4jax, --to-hf), one tensor at a time")
    src = conv.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", help="HF model folder")
    src.add_argument("--from-l4jax", help="l4jax checkpoint (l4jax convert, Model.save or l4jax train's model/)")
    conv.add_argument("--to", help="with --from-hf: the l4jax checkpoint to write (must not exist)")
    conv.add_argument("--to-hf", help="with --from-l4jax: the HF folder to write (must not exist)")
    conv.add_argument("--shard-size", type=float, default=5.0, help="--to-hf: GB per safetensors shard (5)")
    conv.add_argument("--dtype", default=None, help="bf16, fp32 or fp16 (default: the checkpoint's)")
    conv.add_argument("--read-ahead-gb", type=float, default=None,
                      help="GB of tensors held at once while the next ones are read during a write "
                           "(default: the largest tensor read whole, plus the blocks in flight of one written "
                           "as it is read, so the peak stays about one tensor's)")
    conv.add_argument("--quantize", default=None, help="--from-hf: int8, int4 or fp8, each large weight quantized as "
                      "it is read and stored so (l4jax.load reads it as it is); an FP8 release with fp8 keeps its own")
    conv.add_argument("--restart", action="store_true", help="start over instead of continuing the partial "
                      "folder a killed conversion left (.<name>.partial beside --to or --to-hf)")
    conv.set_defaults(run=_convert)
    _add_train(sub)
    _add_plan(sub)
    return parser


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="stream a completion from an HF model folder (with tokenizer.json)")
    gen.add_argument("--model", required=True, help="HF model folder: config.json, safetensors, tokenizer.json")
    gen.add_argument("--prompt", default=None, help="the prompt text (or --messages)")
    gen.add_argument("--chat", action="store_true", help="render the prompt as a user message with the model "
                                                         "folder's chat template (the official Llama 4 one if none)")
    gen.add_argument("--messages", default=None, metavar="FILE", help="a conversation to continue: a JSON list of "
                     "messages (or {\"messages\": [...]}), rendered with the chat template; images as image parts")
    gen.add_argument("--tools", default=None, metavar="FILE", help="tool JSON schemas (a list, or {\"tools\": [...]}) "
                                                                    "for the chat template; implies --chat")
    gen.add_argument("--image", action="append", default=None, metavar="PATH",
                     help="an image file (repeatable); with --chat the images precede the prompt, without it each "
                          "<|image|> in the prompt takes the next one (or they all go first)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (Meta suggests 0.6 for chat)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--mesh", default=None, help="e.g. data=1,expert=2,tensor=4 (product = device count)")
    gen.add_argument("--dtype", default=None, help="bf16 or fp32 (default: the checkpoint's)")
    gen.add_argument("--quantize", default=None, help="int8, int4 or fp8: quantize the large weights as they are "
                     "read (per output channel, or groups of 128 inputs); a checkpoint saved quantized needs none; an "
                     "FP8 release keeps its FP8 weights with fp8 (and by default on GPUs with FP8 matmuls)")
    gen.add_argument("--kv-int8", action="store_true", help="an int8 KV cache (a scale per token and kv head): "
                                                            "half the cache memory of bf16")
    gen.set_defaults(run=_generate)


def _add_train(sub) -> None:
    tr = sub.add_parser("train", help="train or fine-tune from a config YAML (model fields + a train: section)")
    tr.add_argument("--config", required=True, help="e.g. configs/tiny.yaml")
    tr.add_argument("--mesh", default=None, help="e.g. data=2,expert=2,tensor=2 (default: the config's train.mesh)")
    tr.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the config's)")
    tr.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    tr.add_argument("--lora", action="store_true", help="train LoRA adapters only (settings: train.lora)")
    tr.add_argument("--teacher", default=None, help="codistill from this model folder (settings: train.distill)")
    tr.add_argument("--init-from", default=None, help="start from these weights (HF or l4jax folder)")
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--export-hf", action="store_true", help="also write the trained model as a Hugging Face "
                                                             "folder, DIR/hf")
    tr.set_defaults(run=_train)


def _add_plan(sub) -> None:
    pl = sub.add_parser("plan", help="compile a step for an H100 host or a TPU slice without the hardware: memory, "
                                     "kernels, collectives, roofline bound")
    pl.add_argument("--model", required=True, help="preset, config file or HF model folder")
    pl.add_argument("--target", required=True, help="h100, h100x8, h100x8x2 (8 per host, 2 hosts), v5e:4x4, "
                                                    "v5p:4x4x4, v6e:2x2, or cpu")
    pl.add_argument("--task", required=True, help="train, prefill or decode")
    pl.add_argument("--batch", type=int, default=1, help="sequences (train: per optimizer step)")
    pl.add_argument("--seq", type=int, default=2048, help="tokens per sequence (train, prefill)")
    pl.add_argument("--cache", type=int, default=None, help="KV cache slots (prefill, decode; default --seq)")
    pl.add_argument("--mesh", default=None, help="e.g. fsdp=16,expert=4 (product = the target's devices)")
    pl.add_argument("--dtype", default="bfloat16", help="bf16 or fp32: training's compute dtype (fp32 masters), "
                                                        "inference's weights")
    pl.add_argument("--remat", default="none", help="training: none, full, dots, dots_no_batch")
    pl.add_argument("--moe-impl", default="auto", help="auto (the chip's), scan, ragged_dot or mgpu")
    pl.add_argument("--kv-int8", action="store_true", help="prefill and decode: an int8 KV cache")
    pl.add_argument("--quantize", default=None, help="prefill and decode: int8, int4 or fp8 weights (as "
                    "l4jax.load(..., quantize=...) holds them); an FP8 release's folder plans as fp8")
    pl.add_argument("--objective", default="lm", choices=("lm", "dpo"),
                    help="train: next-token (lm) or DPO (a frozen reference copy of the weights and its forward)")
    pl.add_argument("--json", action="store_true", help="one JSON object (fields: l4jax/plan/planner.py)")
    pl.add_argument("--dump-hlo", default=None, metavar="FILE", help="write the optimized program's text here")
    pl.set_defaults(run=_plan)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plan":
        _compile_only()
    if args.command in ("train", "generate", "plan"):
        # On a CPU-only machine, split the host into as many XLA devices as the mesh needs (before jax starts).
        from .parallel.mesh import simulate_cpu_devices
        simulate_cpu_devices(_devices_wanted(sys.argv[1:] if argv is None else argv))
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, PlanError, ValueError, KeyError) as e:
        print(f"l4jax: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing input, or an output folder that is read-only, full or not a folder
        where = f": {e.filename}" if e.filename and str(e.filename) not in str(e) else ""
        print(f"l4jax: {e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every writer renames complete work into place, so an interrupt leaves only whole files behind.
        what = "; the run's checkpoints are kept: continue with --resume" if args.command == "train" else ""
        print(f"l4jax {args.command}: interrupted{what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
