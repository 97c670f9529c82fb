"""Hugging Face safetensors -> l4jax parameters, streamed one tensor at a time.

Accepts the multimodal layout (``language_model.model.*``, ``language_model.lm_head.weight``; vision weights are
skipped for text-only loading) and the text-only ``Llama4ForCausalLM`` layout (``model.*``, ``lm_head.weight``).
Nothing is read until every header has been checked: a missing, unexpected, mis-shaped or unsupported tensor is
reported with its key before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 checkpoints)
import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import TextConfig

SUPPORTED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64}
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


class CheckpointError(ValueError):
    """The checkpoint does not match the config: the message names the file and tensor key."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One l4jax parameter, read from (a slice of) one HF tensor, optionally transposed, then reshaped."""

    key: str                        # HF tensor name
    shape: tuple[int, ...]          # expected HF shape
    path: tuple[str, ...]           # l4jax parameter path
    transpose: bool = False         # nn.Linear [out, in] -> kernel [in, out] (2-D tensors only)
    out_shape: tuple[int, ...] | None = None  # final reshape of the (transposed) tensor
    part: tuple[slice, ...] | None = None     # read only this slice of the HF tensor (first axis whole)


def text_sources(cfg: TextConfig, prefix: str, head_key: str) -> list[Source]:
    """Every text parameter's HF origin. ``prefix`` is ``language_model.model.`` or ``model.``."""
    D, V, H, K, hd = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, F, Fm = cfg.num_local_experts, cfg.intermediate_size, cfg.intermediate_size_mlp
    out = [Source(prefix + "embed_tokens.weight", (V, D), ("embed",)),
           Source(prefix + "norm.weight", (D,), ("norm", "scale"))]
    if not cfg.tie_word_embeddings:
        out.append(Source(head_key, (V, D), ("lm_head",), transpose=True))
    for i in range(cfg.num_hidden_layers):
        hf, us = f"{prefix}layers.{i}.", (f"layers_{i}",)
        out += [
            Source(hf + "input_layernorm.weight", (D,), us + ("input_norm", "scale")),
            Source(hf + "post_attention_layernorm.weight", (D,), us + ("post_norm", "scale")),
            Source(hf + "self_attn.q_proj.weight", (H * hd, D), us + ("attn", "q"), True, (D, H, hd)),
            Source(hf + "self_attn.k_proj.weight", (K * hd, D), us + ("attn", "k"), True, (D, K, hd)),
            Source(hf + "self_attn.v_proj.weight", (K * hd, D), us + ("attn", "v"), True, (D, K, hd)),
            Source(hf + "self_attn.o_proj.weight", (D, H * hd), us + ("attn", "o"), True, (H, hd, D)),
        ]
        ff = hf + "feed_forward."
        if cfg.is_moe(i):
            moe = us + ("moe",)
            out += [
                Source(ff + "router.weight", (E, D), moe + ("router",), transpose=True),
                # Experts are stored [E, in, out] and used as x @ W: no transpose. gate_up is gate first, then up.
                Source(ff + "experts.gate_up_proj", (E, D, 2 * F), moe + ("gate",), part=np.s_[:, :, :F]),
                Source(ff + "experts.gate_up_proj", (E, D, 2 * F), moe + ("up",), part=np.s_[:, :, F:]),
                Source(ff + "experts.down_proj", (E, F, D), moe + ("down",)),
                Source(ff + "shared_expert.gate_proj.weight", (F, D), moe + ("shared", "gate"), transpose=True),
                Source(ff + "shared_expert.up_proj.weight", (F, D), moe + ("shared", "up"), transpose=True),
                Source(ff + "shared_expert.down_proj.weight", (D, F), moe + ("shared", "down"), transpose=True),
            ]
        else:
            out += [
                Source(ff + "gate_proj.weight", (Fm, D), us + ("mlp", "gate"), transpose=True),
                Source(ff + "up_proj.weight", (Fm, D), us + ("mlp", "up"), transpose=True),
                Source(ff + "down_proj.weight", (D, Fm), us + ("mlp", "down"), transpose=True),
            ]
    return out


class SafetensorsIndex:
    """Which file holds each tensor of an HF model folder (one file, or a sharded index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map'): {e}") from e
            self.files = {k: self.folder / f for k, f in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
            self.files = {}
            for f in files:
                for k in self._open(f).keys():
                    self.files[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in the index but missing")
            try:
                h = safe_open(str(f), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
            self._handles[f] = h
        return self._handles[f]

    def keys(self) -> list[str]:
        return list(self.files)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        sl = self._open(self.files[key]).get_slice(key)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, key: str, part: tuple[slice, ...] | None = None) -> np.ndarray:
        """One tensor (or a slice of it), copied out of a freshly opened file: the file's memory map is dropped
        right after, so mapped pages of tensors already read do not accumulate in resident memory."""
        f = self.files[key]
        try:
            with safe_open(str(f), framework="numpy") as h:
                sl = h.get_slice(key)
                return np.array(sl[part] if part is not None else sl[:])
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from e

    def close(self):
        self._handles.clear()


def _layout(keys: list[str]) -> tuple[str, str]:
    if any(k.startswith("language_model.") for k in keys):
        return "language_model.model.", "language_model.lm_head.weight"
    if any(k.startswith("model.") for k in keys):
        return "model.", "lm_head.weight"
    raise CheckpointError(f"no Llama 4 text weights found: expected keys under 'language_model.model.' or "
                          f"'model.', found e.g. {sorted(keys)[:5]}")


def plan(index: SafetensorsIndex, cfg: TextConfig, extra: Sequence[Source] = ()) -> list[Source]:
    """Check every header against the config before reading any data; return what to read.

    ``extra`` are further sources to load and check, e.g. ``hf_vision.vision_sources`` for the vision tower
    (without them, vision tensors are skipped)."""
    keys = index.keys()
    prefix, head_key = _layout(keys)
    sources = text_sources(cfg, prefix, head_key) + list(extra)
    wanted = {s.key for s in sources}
    missing = sorted(wanted - set(keys))
    if missing:
        raise CheckpointError(f"{index.folder}: {len(missing)} tensor(s) missing from the checkpoint: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    ignorable = VISION_PREFIXES + ((head_key,) if cfg.tie_word_embeddings else ())
    unexpected = sorted(k for k in keys if k not in wanted and not k.startswith(ignorable))
    if unexpected:
        raise CheckpointError(f"{index.folder}: {len(unexpected)} unexpected tensor(s) for this config: "
                              f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for s in sources:
        shape, dtype = index.info(s.key)
        if shape != s.shape:
            raise CheckpointError(f"{index.files[s.key]}: tensor {s.key!r} has shape {list(shape)}, the config "
                                  f"expects {list(s.shape)}")
        if dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"{index.files[s.key]}: tensor {s.key!r} has unsupported dtype {dtype}; "
                                  f"supported: {sorted(SUPPORTED_DTYPES)}")
    return sources


BLOCK_BYTES = 64 << 20


def load_source(index: SafetensorsIndex, s: Source, dtype=None) -> np.ndarray:
    """Read, transpose, cast and reshape one parameter into a single fresh array.

    The output is allocated once and filled in blocks of ~64 MB of rows, so a transpose or a cast never holds a
    second full copy of the tensor: peak memory is the output plus one block.
    """
    part = s.part or tuple(slice(None) for _ in s.shape)
    src_shape = tuple(len(range(*sl.indices(n))) for sl, n in zip(part, s.shape))
    _, stored = index.info(s.key)
    dtype = np.dtype(dtype) if dtype is not None else index.read(s.key, (slice(0, 0),) + part[1:]).dtype
    out = np.empty(src_shape[::-1] if s.transpose else src_shape, dtype)
    rows = src_shape[0]
    step = max(1, BLOCK_BYTES // max(1, int(np.prod(src_shape[1:])) * out.itemsize))
    for i in range(0, rows, step):
        block = index.read(s.key, (slice(i, min(i + step, rows)),) + part[1:])
        if s.transpose:
            out[:, i:i + step] = block.T
        else:
            out[i:i + step] = block
        del block
    return out.reshape(s.out_shape) if s.out_shape else out


def stream(folder: str | Path, cfg: TextConfig, dtype=None,
           extra: Sequence[Source] = ()) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (l4jax path, host array) one parameter at a time; peak memory is about one parameter."""
    index = SafetensorsIndex(folder)
    try:
        sources = plan(index, cfg, extra)
        index.close()  # headers checked; from here each read opens and closes its own file
        for s in sources:
            yield s.path, load_source(index, s, dtype)
    finally:
        index.close()


def checkpoint_dtype(folder: str | Path) -> np.dtype:
    """The dtype of the checkpoint's token embedding (bf16 for the released models)."""
    index = SafetensorsIndex(folder)
    prefix, _ = _layout(index.keys())
    return index.read(prefix + "embed_tokens.weight", np.s_[:1]).dtype
