"""LoRA adapters in the PEFT layout, for serving stacks that load adapters on a base model (transformers + peft,
vLLM's LoRA support):

    <dir>/adapter_config.json          peft's LoraConfig: r, lora_alpha, target_modules (a regex over the text
                                       decoder's attention projections), base_model_name_or_path, ...
    <dir>/adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]

peft applies W x + (lora_alpha / r) B_peft A_peft x to nn.Linear weights W [out, in]; l4jax's adapters factor the
kernel [in, out] as A [in.., r] B [r, out..] with the same alpha / r, so A_peft = A^T and B_peft = B^T once the head
axes are flattened:

    q, k, v   A [D, r]       -> lora_A [r, D]        B [r, X, hd] -> lora_B [X*hd, r]
    o         A [H, hd, r]   -> lora_A [r, H*hd]     B [r, D]     -> lora_B [D, r]

Only attention adapters have a PEFT form here (peft adapts nn.Linear modules; the fused [E, D, 2F] experts of
transformers' Llama 4 are not nn.Linear), so runs with ``experts=True`` export merged weights only.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from ..checkpoints.atomic import atomic_dir
from ..checkpoints.hf_export import text_layout
from ..config import Llama4Config
from ..model.decoder import unstack_layers
from ..parallel.distributed import to_numpy
from .lora import LoraConfig, LoraError, adapters

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_tensors(config: Llama4Config, lora: dict, cfg: LoraConfig) -> dict[str, np.ndarray]:
    """The adapters as peft's state dict (keys ``base_model.model.<module>.lora_{A,B}.weight``), on the host.
    ``lora``: per-layer (``layers_{i}``) or scanned (``blocks``) layout, as training holds it."""
    if cfg.experts:
        raise LoraError("PEFT export: expert adapters have no PEFT form (transformers' Llama 4 experts are fused, "
                        "not nn.Linear); export the merged weights instead")
    if "blocks" in lora:
        lora = unstack_layers(lora, config.text)
    out, prefix = {}, text_layout(config)[0]  # the text decoder's module path in transformers
    for path, ab in adapters(lora):
        if len(path) != 3 or path[1] != "attn" or not path[0].startswith("layers_"):
            raise LoraError(f"{'/'.join(path)}: not a text attention adapter")
        a, b = to_numpy(ab["a"]), to_numpy(ab["b"])
        r = a.shape[-1]
        module = f"base_model.model.{prefix}layers.{path[0][len('layers_'):]}.self_attn.{path[2]}_proj"
        out[module + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        out[module + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    return out


def peft_config(config: Llama4Config, cfg: LoraConfig, base: str | None) -> dict:
    """adapter_config.json: a regex target (``fullmatch`` on module names) so the vision tower's q/k/v/o, which
    share the names, stay untouched."""
    projections = "|".join(f"{t}_proj" for t in cfg.targets)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.rank,
            "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "inference_mode": True, "modules_to_save": None,
            "target_modules": text_layout(config)[0].replace(".", r"\.") + rf"layers\.\d+\.self_attn\.({projections})"}


def save_peft(path: str | Path, config: Llama4Config, lora: dict, cfg: LoraConfig, base: str | None = None, *,
              overwrite: bool = False) -> Path:
    """Write the attention adapters as a PEFT adapter folder, atomically; ``base``: the base model's name or path
    (recorded for ``PeftModel.from_pretrained``). With several processes every process calls this."""
    tensors = peft_tensors(config, lora, cfg)
    with atomic_dir(path, overwrite=overwrite, what="PEFT adapter folder") as tmp:
        if jax.process_index() == 0:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / CONFIG).write_text(json.dumps(peft_config(config, cfg, base), indent=2))
    return Path(path).absolute()

