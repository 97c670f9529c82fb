"""Weights on disk: Hugging Face safetensors in (``hf_import``, with the key mapping in ``hf_names``), the l4jax
checkpoint format (``l4jax_format``), training checkpoints (``train_state``), and the one atomic folder writer
they share (``atomic``)."""

from .hf_import import CheckpointError

__all__ = ["CheckpointError"]
