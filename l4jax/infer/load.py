"""``load`` an HF or l4jax checkpoint, or ``init`` random weights: the two ways to get a ``Model``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import tree
from ..checkpoints import hf_import, l4jax_format
from ..checkpoints.read_ahead import default_budget, read_ahead
from ..config import Llama4Config, TextConfig, load_config
from ..model.decoder import Llama4Text, abstract_params, init_params
from ..model.vision import VISION_PARAMS, ImageEncoder, abstract_vision_params, init_vision_params
from ..model.quant import MODES, QArray, abstract_stored, contracted_axes, from_parts, from_stored, quantize_param
from ..parallel import param_shardings, partitioning, put
from ..parallel.shardings import quantized_sharding
from .model import Model


def _resolve_vision(config: Llama4Config, vision: bool | None, where) -> Llama4Config:
    """``vision`` None means: with the vision tower when the config has one. Without it, the config drops its
    vision part, so the handle (and what it saves) is the text-only model."""
    if vision and config.vision is None:
        raise ValueError(f"{where}: vision=True, but the config has no vision_config (a text-only model)")
    if vision is False and config.vision is not None:
        return dataclasses.replace(config, vision=None)
    return config


def abstract_model(config: Llama4Config, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of every parameter (``vision_model`` and ``projector`` too when the config has a vision
    part), unboxed; computes nothing."""
    out = nn.meta.unbox(abstract_params(Llama4Text(config.text, dtype=dtype, param_dtype=dtype)))
    if config.vision is not None:
        encoder = ImageEncoder(config.vision, config.text.hidden_size, dtype=dtype, param_dtype=dtype)
        out.update(nn.meta.unbox(abstract_vision_params(encoder)))
    return out


def _split(config: Llama4Config, params: dict) -> tuple[dict, dict | None]:
    """All parameters -> (text decoder's, vision tower and projector's or None)."""
    text = {k: v for k, v in params.items() if k not in VISION_PARAMS}
    return text, ({k: params[k] for k in VISION_PARAMS} if config.vision is not None else None)


def init(config: Llama4Config | TextConfig | str, *, dtype=jnp.float32, seed: int = 0, mesh=None,
         moe_impl: str = "auto", attention_impl: str = "auto", vision: bool | None = None) -> Model:
    """Random weights (normal, std 0.02; norms at 1), created directly in their shardings when a mesh is given.

    With a mesh the initialiser is one jit whose outputs are the parameter shardings: the partitioner splits the
    (partitionable threefry) random generation, so each device computes only its own shards. The vision tower is
    included when the config has one, unless ``vision=False``.
    """
    if not isinstance(config, Llama4Config):
        config = Llama4Config(text=config) if isinstance(config, TextConfig) else load_config(config)
    config = _resolve_vision(config, vision, "init")
    module = Llama4Text(config.text, dtype=dtype, param_dtype=dtype)
    encoder = None if config.vision is None else ImageEncoder(config.vision, config.text.hidden_size, dtype=dtype,
                                                              param_dtype=dtype)

    def make(key):
        params = nn.meta.unbox(init_params(module, key))
        if encoder is not None:
            params.update(nn.meta.unbox(init_vision_params(encoder, jax.random.fold_in(key, 1))))
        return params

    out_shardings = None if mesh is None else param_shardings(config, partitioning(config.text, mesh), dtype)
    params = jax.jit(make, out_shardings=out_shardings)(jax.random.key(seed))
    text, vision_params = _split(config, params)
    return Model(config, text, dtype=dtype, mesh=mesh, moe_impl=moe_impl, attention_impl=attention_impl,
                 vision_params=vision_params)


def load(path: str | Path, *, dtype=None, mesh=None, moe_impl: str = "auto", attention_impl: str = "auto",
         vision: bool | None = None, quantize: str | None = None) -> Model:
    """Load an HF Llama 4 folder (config.json + safetensors, single or sharded) or an l4jax checkpoint written by
    ``l4jax convert``.

    A full ``llama4`` checkpoint (``language_model.*``, ``vision_model.*``, ``multi_modal_projector.*``) loads
    with its vision tower, so the handle accepts ``pixel_values``; ``vision=False`` loads the text decoder only
    (the vision tensors are then never read). ``dtype`` defaults to the checkpoint's dtype. With a ``mesh`` each
    tensor is placed on its sharding as it is read, so no device holds the whole model; with several processes
    (``l4jax.parallel.distributed``) every process reads the checkpoint and places only the shards of its own
    devices. ``moe_impl`` and ``attention_impl`` override the kernels of the mesh's chip (``l4jax.model.kernels``).
    ``quantize="int8"``, ``"int4"`` or ``"fp8"`` quantizes the text decoder's large matmul weights as they are read
    (``l4jax.model.quant``: per output channel, or groups of 128 inputs), before they reach a device; ``dtype`` is
    then the compute dtype and that of the weights left as they are. An FP8 release (``fbgemm_fp8``,
    ``compressed-tensors``) keeps its FP8 weights with their scales with ``quantize="fp8"``, and by default on GPUs
    with FP8 matmuls (``fp8_matmuls``); otherwise, or with a ``dtype``, it is read dequantized.
    """
    path = Path(path)
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize: expected one of {MODES} or None, got {quantize!r}")
    kernels = dict(moe_impl=moe_impl, attention_impl=attention_impl)
    if l4jax_format.is_checkpoint(path):
        return _load_l4jax(path, dtype, mesh, kernels, vision, quantize)
    config = _resolve_vision(load_config(path), vision, path)
    # An FP8 release keeps its FP8 weights as they are when asked (quantize="fp8") or by default on a chip with FP8
    # matmuls; its other weights (modules_to_not_convert) stay as stored. Otherwise it is read dequantized.
    fp8 = hf_import.is_fp8(path)
    keep = fp8 and (quantize == "fp8" or (quantize is None and dtype is None and fp8_matmuls(mesh)))
    quantize = None if keep else quantize
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(hf_import.checkpoint_dtype(path))
    expected = abstract_model(config, dtype)
    shardings = None if mesh is None else param_shardings(config, partitioning(config.text, mesh), dtype)
    params: dict = {}
    reads = hf_import.reads(path, config, dtype, keep_fp8=keep)
    # The next tensor is read on a thread while one is placed, holding at most the largest tensor's bytes of them
    # (as `l4jax convert` does: checkpoints/read_ahead.py).
    with read_ahead(reads, default_budget(reads)) as tensors:
        for p, host in tensors:
            want = tree.get(expected, p)
            if host.shape != want.shape:  # a converter bug, not a user error
                raise AssertionError(f"{'/'.join(p)}: converted shape {host.shape} != model shape {want.shape}")
            # One tensor at a time; with a mesh each device receives only its shard (each process places its own).
            tree.put(params, p, _place(host, p, shardings, quantize))
            del host
    text, vision_params = _split(config, params)
    return Model(config, text, dtype=dtype, mesh=mesh, vision_params=vision_params, **kernels)


def fp8_matmuls(mesh=None) -> bool:
    """Whether the mesh's chips (or the default devices) multiply FP8: NVIDIA GPUs from compute capability 8.9."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    return all(d.platform == "gpu" and float(getattr(d, "compute_capability", 0) or 0) >= 8.9 for d in devices)


def _place(host, path: tuple[str, ...], shardings: dict | None, quantize: str | None):
    """One parameter onto its sharding (or the one device), quantized first on the host when asked and it is one
    of the weights that get quantized (``quant.contracted_axes``); a ``QArray`` read as such (an FP8 release's
    weight) is placed as it is."""
    sh = None if shardings is None else tree.get(shardings, path)
    axes = None if quantize is None else contracted_axes(path)
    if axes is None and not isinstance(host, QArray):
        return host if isinstance(host, jax.Array) else put(host, sh)
    # on the host for a host array, else where the array is
    q = host if isinstance(host, QArray) else quantize_param(path, host, quantize)
    qsh = None if sh is None else quantized_sharding(sh, q, path)
    if isinstance(host, jax.Array):
        return jax.device_put(q, qsh) if qsh is not None else q
    return dataclasses.replace(q, values=put(q.values, qsh and qsh.values), scales=put(q.scales, qsh and qsh.scales))


def _stored_shardings(shardings: dict, abstract: dict, meta: dict) -> dict:
    """Shardings for a checkpoint's quantized weights as stored ({"values", "scales"}): those of the weight's
    QArray (``quantized_sharding``)."""
    updates = {}
    for name, m in meta.items():
        path = tuple(name.split("/"))
        node = tree.get(abstract, path)
        q = from_parts(node["values"], node["scales"], m)
        qsh = quantized_sharding(tree.get(shardings, path), q, path)
        updates[path] = {"values": qsh.values, "scales": qsh.scales}
    return tree.replace(shardings, updates)


def model_config(path: str | Path) -> Llama4Config:
    """The config of a model folder, an l4jax checkpoint (its manifest) or an HF folder (config.json), without
    reading any weight."""
    if l4jax_format.is_checkpoint(path):
        return Llama4Config.from_hf(l4jax_format.read_manifest(path)["config"])
    return load_config(path)


def _load_l4jax(path: Path, dtype, mesh, kernels: dict, vision: bool | None, quantize: str | None) -> Model:
    manifest = l4jax_format.read_manifest(path)
    config = _resolve_vision(model_config(path), vision, path)
    stored = jnp.dtype(manifest["dtype"])
    dtype = jnp.dtype(dtype) if dtype is not None else stored
    if config.vision is not None and not any(n.split("/")[0] in VISION_PARAMS for n in manifest["params"]):
        raise ValueError(f"{path}: the config has a vision_config but the checkpoint holds no vision weights "
                         f"(converted text-only?); load it with vision=False")
    shardings = None if mesh is None else param_shardings(config, partitioning(config.text, mesh), dtype)
    meta = manifest.get("quantized", {})  # weights stored quantized: read as they are
    modes = sorted({m["mode"] for m in meta.values()})
    if quantize is not None and modes and modes != [quantize]:
        raise ValueError(f"{path}: its weights are stored quantized to {', '.join(modes)}; quantize={quantize!r} "
                         "cannot be applied on top (load it without quantize)")
    abstract = abstract_stored(abstract_model(config, stored), meta)
    if shardings is not None and meta:
        shardings = _stored_shardings(shardings, abstract, meta)
    restored = l4jax_format.restore(path, abstract, shardings, dtype,
                                    ignore=VISION_PARAMS if config.vision is None else (),
                                    each=None if quantize is None else lambda p, v: _place(v, p, shardings, quantize),
                                    exact=tuple(f"{name}/" for name in meta))
    text, vision_params = _split(config, from_stored(restored, meta))
    return Model(config, text, dtype=dtype, mesh=mesh, vision_params=vision_params, **kernels)
