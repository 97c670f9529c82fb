"""Training settings: a frozen dataclass read from the ``train:`` section of a config YAML, validated once.

The same YAML holds the model (HF ``config.json`` fields, read by ``config.load_config``) and, under ``train:``,
everything here; command-line flags override single fields. LoRA settings are a ``train.lora.LoraConfig``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError, config_path, dtype_name, read_document, reject_unknown
from ..data.conversations import TOO_LONG
from ..model.decoder import REMAT_POLICIES
from ..model.kernels import QUERY_BLOCK, Kernels
from .lora import LoraConfig, LoraError


DATA_FORMATS = ("text", "chat", "preference")
OBJECTIVES = ("lm", "dpo")


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    alpha: float | str = "confidence"  # a fixed weight in [0, 1] or "confidence" (see losses.codistillation)
    tau: float = 1.0


@dataclasses.dataclass(frozen=True)
class DpoSettings:
    beta: float = 0.1         # the inverse temperature of the implicit reward beta * log(pi / ref)
    sft_weight: float = 0.0   # weight of the chosen answers' cross-entropy added to the DPO loss (0: pure DPO)

    def __post_init__(self):
        for f in ("beta", "sft_weight"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (f == "beta" and v == 0):
                raise ConfigError(f"train.dpo.{f}: must be a number {'> 0' if f == 'beta' else '>= 0'}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # data
    data: tuple[str, ...] = ("corpus",)  # files; "corpus" = the public-domain corpus shipped with l4jax
    data_format: str = "text"            # "text": documents, every token in the loss; "chat": JSONL conversations,
                                         # assistant turns only (data.conversations); "preference": JSONL pairs
                                         # for DPO (data.preferences). YAML: data: {format, files, too_long}
    too_long: str = "drop"               # chat conversations longer than a row: "drop" or "split" at messages
    objective: str = "lm"                # "lm": next-token loss (text, chat); "dpo": preference pairs
    seq_len: int = 128
    batch_size: int = 16                 # sequences per optimizer step (over all devices and microbatches)
    grad_accum: int = 1                  # microbatches per step; batch_size must be a multiple
    # optimizer: AdamW, linear warmup then cosine decay to min_lr_ratio * lr, global-norm clipping
    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # numerics and memory
    compute_dtype: str = "float32"       # "bfloat16": bf16 matmuls and activations ...
    param_dtype: str = "float32"         # ... with fp32 master weights when this stays float32
    scan: bool = True
    remat: str = "none"                  # see model.decoder.REMAT_POLICIES
    moe_impl: str = "auto"               # see model/kernels.py
    attention_impl: str = "auto"         # "auto": the chip's fused kernel on a GPU or TPU, the XLA paths elsewhere
    query_block: int = QUERY_BLOCK       # the XLA attention path scores at most this many queries at once
    # optional router terms (the reference trains without them)
    load_balance: float = 0.0
    z_loss: float = 0.0
    # run
    seed: int = 0
    init_from: str | None = None         # an HF or l4jax model folder; None = random init from the model config
    mesh: Mapping[str, int] = dataclasses.field(default_factory=dict)
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    lora: LoraConfig | None = None
    distill: DistillSettings | None = None
    dpo: DpoSettings | None = None       # objective dpo: its settings (None = the defaults)

    def __post_init__(self):
        def fail(field, msg):
            raise ConfigError(f"TrainConfig.{field}: {msg}")
        for f in ("seq_len", "batch_size", "grad_accum", "steps", "save_every", "keep", "log_every", "query_block"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(f, f"must be a positive integer, got {v!r}")
        if self.seq_len < 2:
            fail("seq_len", f"must be at least 2, got {self.seq_len}")
        if self.batch_size % self.grad_accum:
            fail("batch_size", f"{self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
        for f in ("lr", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip_norm", "load_balance", "z_loss"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                fail(f, f"must be a number, got {v!r}")
        if not self.lr > 0:
            fail("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            fail("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        for f in ("compute_dtype", "param_dtype"):  # "bf16" is accepted and stored as "bfloat16"
            object.__setattr__(self, f, dtype_name(getattr(self, f), f"TrainConfig.{f}", ("float32", "bfloat16")))
        try:
            # The names only (a GPU takes every one but the TPU's attention kernel); the chip is checked when the
            # step is built for it.
            Kernels.for_platform("tpu" if self.attention_impl == "flash_tpu" else "gpu", moe=self.moe_impl,
                                 attention=self.attention_impl, query_block=self.query_block)
        except ConfigError as e:
            raise ConfigError(f"TrainConfig.{e}") from None
        if self.remat not in REMAT_POLICIES:
            fail("remat", f"unknown policy {self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        for f in ("load_balance", "z_loss", "weight_decay", "clip_norm"):
            if getattr(self, f) < 0:
                fail(f, f"must be >= 0, got {getattr(self, f)}")
        if not self.data:
            fail("data", "no data files given")
        if self.data_format not in DATA_FORMATS:
            fail("data_format", f"unknown format {self.data_format!r}; expected one of {', '.join(DATA_FORMATS)}")
        if self.data_format != "text" and "corpus" in self.data:
            fail("data", f"'corpus' is the shipped text corpus; {self.data_format} data are JSONL files (the shipped "
                         "ones: 'corpus-chat', 'corpus-preferences')")
        if self.too_long not in TOO_LONG:
            fail("too_long", f"expected one of {', '.join(TOO_LONG)}, got {self.too_long!r}")
        if self.objective not in OBJECTIVES:
            fail("objective", f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if (self.objective == "dpo") != (self.data_format == "preference"):
            fail("objective", f"{self.objective!r} with data format {self.data_format!r}: DPO trains on preference "
                              "data, and preference data train with the dpo objective")
        if self.objective == "dpo" and self.dpo is None:
            object.__setattr__(self, "dpo", DpoSettings())
        if self.objective != "dpo" and self.dpo is not None:
            fail("dpo", f"DPO settings given but the objective is {self.objective!r}")
        if self.objective == "dpo" and self.distill is not None:
            fail("distill", "codistillation trains on next-token targets, not on preference pairs")

    @property
    def microbatch(self) -> int:
        return self.batch_size // self.grad_accum

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        reject_unknown(d, "train", {f.name for f in dataclasses.fields(cls)})
        if isinstance(d.get("data"), Mapping):  # data: {format: chat, files: [...]}
            spec = dict(d.pop("data"))
            reject_unknown(spec, "train.data", {"format", "files", "too_long"})
            if "files" not in spec:
                raise ConfigError("train.data: give files: [...] (and format: text, chat or preference)")
            d["data"], d["data_format"] = spec["files"], spec.get("format", "text")
            d["too_long"] = spec.get("too_long", "drop")
        if "data" in d:
            d["data"] = tuple([d["data"]] if isinstance(d["data"], str) else d["data"])
        for name, sub in (("lora", LoraConfig), ("distill", DistillSettings), ("dpo", DpoSettings)):
            if d.get(name) is not None:
                v = d[name]
                if not (v is True or isinstance(v, Mapping)):
                    raise ConfigError(f"train.{name}: expected true or a mapping of settings, got {v!r}")
                v = {} if v is True else dict(v)
                reject_unknown(v, f"train.{name}", {f.name for f in dataclasses.fields(sub)})
                try:
                    d[name] = sub(**v)
                except LoraError as e:
                    raise ConfigError(f"train.{name}: {e}") from e
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        """The ``train:`` section of a config file (or of a preset, by name)."""
        path = config_path(path)
        train = read_document(path).get("train")
        if train is not None and not isinstance(train, Mapping):
            raise ConfigError(f"{path}: train: expected a mapping of settings, got {type(train).__name__}")
        try:
            return cls.from_dict(train)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
