"""Training: settings (``settings``), the sharded step (``step``), the loop behind ``l4jax train`` (``loop``),
losses (``losses``), LoRA adapters and their files (``lora``, ``lora_files``) and model FLOPs for MFU
(``flops``)."""

from .settings import DistillSettings, TrainConfig
from .step import Trainer

__all__ = ["DistillSettings", "TrainConfig", "Trainer"]
