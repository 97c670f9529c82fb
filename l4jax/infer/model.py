"""The model handle ``Model``: a loaded Llama 4 with its parameters, its mesh, and the compiled forward.

``l4jax.load`` and ``l4jax.init`` (``infer/load.py``) return one. With a mesh the forward is one ``jax.jit`` with
explicit in/out shardings: parameters on their rule shardings, ids and mask split over the batch axes, pixel tiles
replicated, logits [B, T, V] split over batch and vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import tree
from ..checkpoints import hf_export, l4jax_format
from ..config import Llama4Config
from ..model.axes import ACT_VOCAB, BATCH, LENGTH
from ..model.context import check_split
from ..model.decoder import Inputs, Llama4Text
from ..model.kernels import Kernels
from ..model.quant import to_stored
from ..model.vision import check_image_tokens, check_pixels, fuse_images
from ..parallel import pad_batch, param_shardings, partitioning, platform, put
from ..parallel.shardings import for_params
from . import generate as generation
from .inputs import check_tokens


class Model:
    """A loaded Llama 4: ``.config``, ``.params`` (the text decoder's, a plain pytree), ``.vision_params`` (the
    vision tower and projector's, or None for a text-only model), ``.mesh`` and ``.module`` (the decoder, laid out
    on the mesh, with the kernels of the mesh's chip unless ``moe_impl`` / ``attention_impl`` say otherwise: see
    ``l4jax.model.kernels``), and ``__call__(ids, mask, pixel_values) -> logits``.
    """

    def __init__(self, config: Llama4Config, params, *, dtype=jnp.float32, mesh=None, moe_impl: str = "auto",
                 attention_impl: str = "auto", vision_params=None):
        kernels = Kernels.for_platform(platform(mesh), moe=moe_impl, attention=attention_impl)
        if vision_params is not None and config.vision is None:
            raise ValueError("vision_params given, but the config has no vision_config")
        self.config, self.params, self.mesh, self.dtype = config, params, mesh, jnp.dtype(dtype)
        self.vision_params = vision_params
        self.part = partitioning(config.text, mesh)
        self.module = Llama4Text(config.text, self.part, kernels, dtype=self.dtype, param_dtype=self.dtype)
        if mesh is None:
            self._forward, self._forward_mm, self._embed = (jax.jit(f) for f in (self._apply, self._apply_mm,
                                                                                 self._apply_embed))
            return
        tokens, whole = self.part.sharding((BATCH, LENGTH)), NamedSharding(mesh, P())
        logits = self.part.sharding((BATCH, LENGTH, ACT_VOCAB))
        shardings = param_shardings(config, self.part, self.dtype)
        text = for_params({k: v for k, v in shardings.items() if k in params}, params)  # quantized weights too
        self._forward = jax.jit(self._apply, in_shardings=(text, tokens, tokens), out_shardings=logits)
        if vision_params is not None:
            vision = {k: v for k, v in shardings.items() if k in vision_params}
            self._forward_mm = jax.jit(self._apply_mm, in_shardings=(text, vision, tokens, tokens, whole),
                                       out_shardings=logits)
            # generate() embeds the prompt before padding the batch for the mesh: any row count, replicated.
            self._embed = jax.jit(self._apply_embed, in_shardings=(text, vision, whole, whole))

    def _apply(self, params, input_ids, attention_mask):
        return self.module.apply({"params": params}, Inputs(input_ids, attention_mask)).logits

    def _apply_embed(self, params, vision_params, input_ids, pixel_values):
        return fuse_images(self.config, params["embed"], vision_params, input_ids, pixel_values, self.dtype)

    def _apply_mm(self, params, vision_params, input_ids, attention_mask, pixel_values):
        embeds = self._apply_embed(params, vision_params, input_ids, pixel_values)
        return self.module.apply({"params": params}, Inputs(input_ids, attention_mask, embeds=embeds)).logits

    def _put(self, host: np.ndarray, sharding: NamedSharding | None = None) -> jax.Array:
        """A host array onto the mesh (replicated unless ``sharding`` says otherwise), or onto the one device."""
        if self.mesh is None:
            return jnp.asarray(host)
        return put(host, NamedSharding(self.mesh, P()) if sharding is None else sharding)

    def check_images(self, input_ids: np.ndarray, pixel_values) -> np.ndarray:
        """Host-side checks of pixel_values [N, C, S, S] against the model and the prompt (one ``<|patch|>`` per
        image feature row: N * tokens_per_tile in all of input_ids); returns them as a float32 numpy array."""
        if self.vision_params is None:
            why = ("its config has no vision_config" if self.config.vision is None
                   else "it was loaded without its vision tower (vision=False)")
            raise ValueError(f"pixel_values given, but this model has no vision tower: {why}")
        px = np.asarray(pixel_values, np.float32)  # bf16 tiles (the reference's dtype) convert exactly
        vcfg = self.config.vision
        check_pixels(vcfg, px.shape)
        check_image_tokens(input_ids, px.shape[0] * vcfg.tokens_per_tile, self.config.image_token_index)
        return px

    def embed_images(self, input_ids, pixel_values) -> jax.Array:
        """Token embeddings [B, T, D] of input_ids [B, T] with the image features of pixel_values [N, C, S, S]
        written over the ``<|patch|>`` positions (early fusion); ``generate`` prefills from these."""
        ids = np.asarray(input_ids, np.int32)
        px = self.check_images(ids, pixel_values)
        return self._embed(self.params, self.vision_params, self._put(ids), self._put(px))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None) -> jax.Array:
        """input_ids [B, T] ints < vocab; attention_mask [B, T] 0/1 (0 = left padding) -> logits [B, T, V].

        pixel_values [N, C, S, S]: the tiles of every image of every row, in prompt order (``l4jax.data.images``
        makes them); input_ids must then hold N * tokens_per_tile ``<|patch|>`` tokens, whose embeddings the image
        features replace. Under a mesh the inputs are host arrays that every process holds in full; each process
        places only its devices' rows. A batch that the batch axes do not divide is padded with empty rows, cut off
        again after. With several processes the logits are a global array: ``l4jax.parallel.distributed.to_numpy``
        gathers them.
        """
        ids, mask = check_tokens(input_ids, attention_mask, self.config.text.vocab_size,
                                 max_len=self.config.text.max_position_embeddings)
        check_split(ids.shape[1], self.part)  # a long-context mesh splits the sequence evenly
        px = None if pixel_values is None else self.check_images(ids, pixel_values)
        if px is None and self.config.vision is not None:
            check_image_tokens(ids, 0, self.config.image_token_index)
        filler = int(self.config.image_token_index == 0)  # padding rows must hold no image token
        (ids,), B = pad_batch(self.mesh, ids, fill=filler)
        (mask,), _ = pad_batch(self.mesh, mask)  # empty rows: finite garbage, never NaN
        tokens = None if self.mesh is None else self.part.sharding((BATCH, LENGTH))
        ids, mask = self._put(ids, tokens), self._put(mask, tokens)
        if px is None:
            out = self._forward(self.params, ids, mask)
        else:
            out = self._forward_mm(self.params, self.vision_params, ids, mask, self._put(px))
        return out[:B] if out.shape[0] != B else out

    def expert_load(self, input_ids, attention_mask=None) -> np.ndarray:
        """[L_moe, E] counts: how many of the real tokens of input_ids [B, T] each MoE layer routes to each expert
        (each token counts once for each of its top-k experts), layers in order. Text only; one device or a mesh."""
        ids, mask = check_tokens(input_ids, attention_mask, self.config.text.vocab_size,
                                 max_len=self.config.text.max_position_embeddings)
        choices = self._choices(self.params, self._put(ids), self._put(mask))  # {layer: [B, T, k]}
        E, real = self.config.text.num_local_experts, np.asarray(mask, bool)
        return np.stack([np.bincount(np.asarray(choices[i])[real].ravel(), minlength=E) for i in sorted(choices)])

    @functools.cached_property
    def _choices(self):
        """Jitted per model on first use (a jit with the model as a static argument would keep it alive)."""
        def choices(params, input_ids, attention_mask) -> dict[int, jax.Array]:
            _, inter = self.module.apply({"params": params}, Inputs(input_ids, attention_mask),
                                         mutable=["intermediates"])
            return {int(name[len("layers_"):]): layer["moe"]["experts"][0]
                    for name, layer in inter["intermediates"].items() if "moe" in layer}
        return jax.jit(choices)

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
                 max_length: int | None = None, callback=None, pixel_values=None, kv_dtype=None) -> np.ndarray:
        """[B, T] prompt (left-padded) -> [B, T + new] tokens; ``pixel_values`` as in ``__call__`` (they enter
        the prefill only); ``kv_dtype="int8"`` for a quantized cache. See ``l4jax.infer.generate.generate``."""
        return generation.generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                   stop_tokens=stop_tokens, max_length=max_length, callback=callback,
                                   pixel_values=pixel_values, kv_dtype=kv_dtype)

    def save(self, path: str | Path, *, side_files_from: str | Path | None = None, overwrite: bool = False) -> Path:
        """Write the parameters (vision tower included, when loaded) as an l4jax (Orbax) checkpoint, one tensor at
        a time; ``l4jax.load`` reads it back onto any mesh. With several processes every process calls it and
        writes only its own shards. ``side_files_from``: a folder whose tokenizer and generation files are copied
        beside the weights. The checkpoint appears at ``path`` whole or not at all; ``overwrite`` replaces an
        existing one (only once the new one is complete)."""
        # Quantized weights are stored as they are (values and scales), so loading never quantizes them again.
        stored, quantized = to_stored({**self.params, **(self.vision_params or {})})
        # A model without its vision weights is saved as the text-only model it is.
        config = self.config if self.vision_params is not None else dataclasses.replace(self.config, vision=None)
        return l4jax_format.save(tree.leaves(stored), path, config=config.to_hf(), dtype=self.dtype.name,
                                 side_files_from=side_files_from, overwrite=overwrite, quantized=quantized)

    def save_pretrained(self, path: str | Path, *, shard_size: int = hf_export.SHARD_SIZE,
                        hf_config: dict | None = None, side_files_from: str | Path | None = None,
                        overwrite: bool = False) -> Path:
        """Write the model as a Hugging Face folder (``config.json``, safetensors shards of at most ``shard_size``
        bytes and their index), which transformers loads as it loads Meta's release; see
        ``l4jax.checkpoints.hf_export``. ``hf_config``: the config.json to write (default: this config's
        ``to_hf()``). Same ``side_files_from`` and ``overwrite`` as ``save``."""
        config = self.config if self.vision_params is not None else dataclasses.replace(self.config, vision=None)
        _, quantized = to_stored(self.params)
        if quantized:
            raise ValueError(f"save_pretrained: the weights are quantized ({len(quantized)} of them); Hugging Face "
                             "folders hold the unquantized model: save it before quantizing (or use save)")
        return hf_export.save_hf(config, {**self.params, **(self.vision_params or {})}, path, shard_size=shard_size,
                                 hf_config=hf_config, side_files_from=side_files_from, overwrite=overwrite)

    def num_params(self) -> int:
        return tree.count((self.params, self.vision_params or {}))
