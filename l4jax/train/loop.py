"""The training loop behind ``l4jax train``: data, the sharded step, checkpoints, metrics, the exported model.

    out/checkpoints/<step>/   Orbax train state (params or LoRA adapters, optimizer, step) + run description
    out/metrics.jsonl         one JSON object per logged step: loss, tokens/s, MFU, lr, grad norm
    out/model/                the final weights as an l4jax checkpoint with the tokenizer (``l4jax generate``)
    out/adapters/             LoRA runs only: the adapters alone

Resuming is exact: the batch of step s is a pure function of (data, seed, s), and the state holds everything else,
so a resumed run computes bit-identical losses on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
from tqdm import tqdm

from .. import tree
from ..checkpoints.train_state import CheckpointDamaged, Checkpoints
from ..config import Llama4Config
from ..data import conversations, corpus, packing, preferences
from ..data.examples import CHAT_FILE, PREFERENCES_FILE
from ..data.tokenizer import Tokenizer
from ..infer import Model, load
from ..infer.load import model_config
from ..model.vision import ImageEncoder, init_vision_params
from . import flops, lora_files, peft_files, run_folder
from .settings import DistillSettings, TrainConfig
from .step import Trainer


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, a tokenizer too large); the message says at which step and why."""


def _data(tc: TrainConfig, tokenizer_dir: Path, progress: bool = False,
          vision: conversations.Vision | None = None) -> tuple[Tokenizer, packing.PackedDataset]:
    """The run's tokenizer and packed rows: text documents (every token in the loss), JSONL conversations
    (assistant turns only) or preference pairs (DPO), these two with their images when the model has a vision
    tower (``vision``); for them the counts used and dropped are printed."""
    tok = Tokenizer(tokenizer_dir)
    paths = []
    for p in tc.data:
        if p == "corpus":
            paths += corpus.corpus_files()
        elif p in ("corpus-chat", "corpus-preferences"):
            paths.append(corpus.corpus_dir() / (CHAT_FILE if p == "corpus-chat" else PREFERENCES_FILE))
        else:
            paths.append(Path(p))
    pad = tok.pad_id if tok.pad_id is not None else 0  # the config's pad id, as generate uses it
    if tc.data_format in ("chat", "preference"):
        kind = conversations if tc.data_format == "chat" else preferences
        options = {"too_long": tc.too_long} if tc.data_format == "chat" else {}
        ds, report = kind.pack(kind.read_jsonl(paths, tok, vision), tc.seq_len, tc.batch_size, seed=tc.seed,
                               pad_id=pad, **options)
        if progress:
            print(f"{tc.data_format} data: {kind.describe(report, tc.seq_len + 1)}", flush=True)
        return tok, ds
    docs = packing.tokenize(packing.read_documents(paths), tok)
    return tok, packing.PackedDataset(docs, tc.seq_len, tc.batch_size, seed=tc.seed, pad_id=pad)


def _tokenizer_dir(tc: TrainConfig) -> Path:
    if tc.init_from and (Path(tc.init_from) / "tokenizer.json").is_file():
        return Path(tc.init_from)
    return corpus.corpus_dir()


def run(config: Llama4Config, tc: TrainConfig, out: str | Path, *, mesh=None, resume: bool = False,
        teacher_dir: str | None = None, progress: bool = True, stop_after: int | None = None,
        export_hf: bool = False) -> dict:
    """Train ``config`` with ``tc`` into ``out``; returns the last logged metrics.

    ``stop_after`` ends the loop after that many steps of this call (tests use it to interrupt a run).
    """
    meta = {"model": config.text.to_hf(), "train": _describe(tc), "layout": "scan" if tc.scan else "layers"}
    out = run_folder.claim(out, resume=resume, inputs={"--init-from": tc.init_from, "--teacher": teacher_dir},
                           description=meta)
    tok_dir = _tokenizer_dir(tc)
    vision = None if tc.data_format == "text" else conversations.Vision.for_model(config, tc.init_from or tok_dir)
    tok, ds = _data(tc, tok_dir, progress, vision)
    if tok.vocab_size > config.text.vocab_size:
        raise TrainingError(f"tokenizer in {tok_dir} has {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{config.text.vocab_size}")
    teacher = None if teacher_dir is None else load(teacher_dir, mesh=mesh, vision=False)
    if teacher is not None and tc.distill is None:
        tc = tc.replace(distill=DistillSettings())
    if tc.init_from is not None:
        _check_same_shapes(tc.init_from, model_config(tc.init_from), config, ds.has_images)
    base = None if tc.init_from is None else load(tc.init_from, dtype=tc.param_dtype, mesh=mesh,
                                                   vision=ds.has_images)
    trainer = Trainer(config, tc, mesh, teacher, _vision_weights(config, tc, base) if ds.has_images else None)
    ckpts = Checkpoints(out / "checkpoints", save_every=tc.save_every, keep=tc.keep)
    try:
        state, frozen = _start(trainer, ckpts, meta, resume, None if base is None else base.params)
        del base
        if progress:
            print(f"training {tree.count(trainer.state_shapes['params']):,} parameters on "
                  f"{'1 device' if mesh is None else dict(mesh.shape)}, {len(ds)} packed rows of "
                  f"{tc.seq_len + 1} tokens, from step {int(jax.device_get(state['step']))}", flush=True)
        with MetricsLog(out / "metrics.jsonl", trainer, progress, int(jax.device_get(state["step"]))) as log:
            state, last, step = _loop(trainer, ds, ckpts, meta, state, frozen, log, stop_after)
    finally:
        ckpts.wait()
        ckpts.close()
    if step >= tc.steps:
        export(trainer, state, frozen, out, tok_dir, hf=export_hf)
    return last


def _vision_weights(config: Llama4Config, tc: TrainConfig, base: Model | None) -> dict:
    """The (frozen) vision tower for image data: ``init_from``'s, or random from the seed without one."""
    if base is not None:
        return base.vision_params
    encoder = ImageEncoder(config.vision, config.text.hidden_size, param_dtype=jax.numpy.dtype(tc.param_dtype))
    return nn.meta.unbox(init_vision_params(encoder, jax.random.fold_in(jax.random.key(tc.seed), 2)))


def _start(trainer: Trainer, ckpts: Checkpoints, meta: dict, resume: bool, base: dict | None) -> tuple[dict, dict]:
    """The initial (state, frozen): from ``base`` (``init_from``'s weights) or random, then the latest checkpoint
    when resuming."""
    start = ckpts.latest() if resume else None
    state, frozen = trainer.init_state(base)
    if start is not None:
        state = _restore_newest_good(ckpts, trainer, meta)
    elif resume:
        print(f"l4jax train: --resume: no checkpoint in {ckpts.directory} yet, so the run starts from step 0",
              file=sys.stderr, flush=True)
    return state, frozen


def _restore_newest_good(ckpts: Checkpoints, trainer: Trainer, meta: dict) -> dict:
    """The newest stored step that reads back whole; each damaged one skipped is named in a warning line."""
    damaged = []
    for step in ckpts.steps():
        try:
            state = ckpts.restore(step, trainer.abstract_state(), meta)
        except CheckpointDamaged as e:
            damaged.append(step)
            print(f"l4jax train: --resume: {e}", file=sys.stderr, flush=True)
            continue
        if damaged:
            print(f"l4jax train: --resume: step {damaged[0]} is damaged; resuming from step {step}", file=sys.stderr,
                  flush=True)
        return state
    raise TrainingError(f"--resume: every checkpoint in {ckpts.directory} is damaged (steps {damaged}); start a new "
                        "run in another folder")


# The TextConfig fields that decide the weights' shapes.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "intermediate_size_mlp", "num_local_experts", "moe_layers",
                "tie_word_embeddings")


def _check_same_shapes(source: str, theirs: Llama4Config, ours: Llama4Config, vision: bool = False) -> None:
    diff = [f"{f} {getattr(theirs.text, f)} vs {getattr(ours.text, f)}" for f in SHAPE_FIELDS
            if getattr(theirs.text, f) != getattr(ours.text, f)]
    if vision and theirs.vision != ours.vision:
        diff.append("vision_config")
    if diff:
        raise TrainingError(f"--init-from {source}: its weights have another shape than the config's ("
                            f"{'; '.join(diff)}: --init-from vs config)")


def _loop(trainer: Trainer, ds, ckpts: Checkpoints, meta: dict, state: dict, frozen: dict, log: "MetricsLog",
          stop_after: int | None) -> tuple[dict, dict, int]:
    """Steps until ``tc.steps`` (or ``stop_after`` more); returns (state, last checked metrics, step)."""
    tc = trainer.tc
    step = int(jax.device_get(state["step"]))
    end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    last, pending, saved = {}, None, ckpts.latest()
    while step < end:
        state, m = trainer.step(state, frozen, ds.batch(step))
        step += 1
        # Check the previous step while this one runs (keeps dispatch asynchronous), and always before saving.
        if pending is not None:
            last = _check(*pending, saved)
        pending = (step, m)
        if step % tc.save_every == 0 or step == end:
            last, pending = _check(*pending, saved), None
            ckpts.save(step, state, meta, force=step == end)
            saved = step
        if step % tc.log_every == 0 or step == end:
            if pending is not None:
                last, pending = _check(*pending, saved), None
            last = log.write(step, last)
    if pending is not None:
        last = _check(*pending, saved)
    return state, last, step


class MetricsLog:
    """metrics.jsonl and the progress bar: tokens/s and MFU over each logging interval. ``run`` writes one per run;
    a loop of its own over ``Trainer.step`` can too (``write`` every ``tc.log_every`` steps)."""

    def __init__(self, path: str | Path, trainer: Trainer, progress: bool = False, start: int = 0):
        tc = trainer.tc
        self.every = tc.log_every
        self.flops_per_token = flops.train_flops_per_token(trainer.config.text, tc.seq_len)
        self.peak = flops.measure_peak_flops(jax.numpy.dtype(tc.compute_dtype), trainer.mesh)
        self.file = Path(path).open("a")
        self.bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True) if progress else None
        self.t0 = time.perf_counter()

    def write(self, step: int, m: dict) -> dict:
        """``m`` (the metrics of ``step``: as ``Trainer.step`` returns them, or checked) as floats and completed
        with the throughput, appended to the file and shown; returns it."""
        m = {k: v if isinstance(v, bool) else float(v) for k, v in jax.device_get(m).items()}
        now = time.perf_counter()
        n_steps = self.every if step % self.every == 0 else step % self.every
        tps = m["tokens"] * n_steps / (now - self.t0)
        m.update(step=step, tokens_per_s=tps, mfu=tps * self.flops_per_token / self.peak, time=now)
        self.t0 = now
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {m['loss']:.3f}  {m['tokens_per_s']:,.0f} tok/s  MFU {100 * m['mfu']:.1f}%")
            self.bar.refresh()
        return m

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()


def _check(step: int, m: dict, saved: int | None) -> dict:
    """Step ``step``'s metrics as floats; a non-finite step stops the run, saying what ``saved`` (the last
    checkpoint's step, or None) leaves to resume from."""
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    m["params_finite"] = bool(m["params_finite"])
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["params_finite"]):
        kept = ("no checkpoint was saved before it (nothing to resume: lower the learning rate and start again)"
                if saved is None else f"the checkpoint of step {saved} is kept (resume with --resume)")
        raise TrainingError(f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}, weights after the "
                            f"update {'finite' if m['params_finite'] else 'NOT finite'}: training stopped; {kept}")
    return m


def export(trainer: Trainer, state: dict, frozen: dict, out: Path, tokenizer_dir: Path, hf: bool = False) -> Path:
    """Write the trained model (adapters merged) as an l4jax checkpoint ``out/model`` with the tokenizer (with
    ``hf`` also as a Hugging Face folder ``out/hf``), and the adapters alone to ``out/adapters`` (with ``hf``, and
    attention adapters only, also in the PEFT layout to ``out/peft``). Each is written
    beside its destination and renamed into place, replacing what an earlier export of this run left there
    (``run_folder`` has checked that nothing else is)."""
    target = out / "model"
    params = jax.jit(trainer.full_params)(state, frozen)
    # The vision tower goes out as it came in (frozen); a run without images writes the text model only.
    config = trainer.config if trainer.vision is not None else dataclasses.replace(trainer.config, vision=None)
    model = Model(config, params, dtype=trainer.tc.param_dtype, vision_params=trainer.vision)
    model.save(target, side_files_from=tokenizer_dir, overwrite=True)
    if hf:
        model.save_pretrained(out / "hf", side_files_from=tokenizer_dir, overwrite=True)
    if trainer.lora is not None:
        lora_files.save(out / "adapters", state["params"], trainer.lora, base=trainer.tc.init_from, overwrite=True)
        if hf and not trainer.lora.experts:  # the PEFT form exists for attention adapters only
            peft_files.save_peft(out / "peft", trainer.config, state["params"], trainer.lora,
                                 base=trainer.tc.init_from, overwrite=True)
    return target


def _describe(tc: TrainConfig) -> dict:
    """The part of the training config a resumed run must share (the rest, e.g. steps or logging, may change)."""
    d = tc.to_dict()
    keys = ("seq_len", "batch_size", "seed", "data", "lora", "scan", "param_dtype")
    # Later fields only when not their default, so that runs written before they existed still resume.
    later = {"data_format": "text", "too_long": "drop", "objective": "lm", "dpo": None}
    return {k: d[k] for k in keys + tuple(k for k, default in later.items() if d[k] != default)}
