"""LoRA adapters on disk: a folder holding the adapter arrays (one Orbax PyTree item) and ``lora.json``.

    <dir>/lora.json     {"format": "l4jax-lora", "version": 1, "config": LoraConfig fields, "base": the base
                         model's path or preset, "arrays": {"<path>/a": {"shape", "dtype"}, ...}}
    <dir>/adapters/     the arrays, readable with ocp.StandardCheckpointer

Only the adapters are stored; the base model is loaded from ``base`` (or any model of the same shapes).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from .. import tree
from ..checkpoints.atomic import atomic_dir
from ..checkpoints.l4jax_format import read_json_manifest
from .lora import LoraConfig, LoraError, adapters, check

FORMAT, VERSION, MANIFEST = "l4jax-lora", 1, "lora.json"


def read_manifest(path: str | Path) -> dict:
    """The JSON manifest of a saved adapter folder: format, version, config, base, and each array's shape/dtype."""
    return read_json_manifest(Path(path) / MANIFEST, FORMAT, VERSION, "LoRA", LoraError)


def save(path: str | Path, lora, cfg: LoraConfig, base: str | None = None, *, overwrite: bool = False) -> Path:
    """Write only the adapters (one Orbax PyTree item) plus ``lora.json`` holding ``cfg`` and the ``base`` model's
    path, atomically (``checkpoints.atomic``): ``path`` is either absent, the previous save, or the complete new
    one. ``base`` is stored as given (a folder or a preset name). With several processes every process calls
    this."""
    arrays = {"/".join(p) + "/" + n: ab[n] for p, ab in adapters(lora) for n in ("a", "b")}
    if not arrays:
        raise LoraError("save: the lora tree holds no adapters")
    with atomic_dir(path, overwrite=overwrite, what="LoRA adapter folder (pass overwrite=True)") as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "adapters", lora)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            manifest = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(),
                        "base": None if base is None else str(base),
                        "arrays": {k: {"shape": list(v.shape), "dtype": jnp.dtype(v.dtype).name}
                                   for k, v in arrays.items()}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path).absolute()


def abstract(path: str | Path, shardings=None) -> tuple[dict, LoraConfig]:
    """The adapters saved at ``path`` as ShapeDtypeStructs (on ``shardings``, a tree like the adapters, if given),
    and their config; reads only the manifest. For placing a load: ``logical_axes(abstract(path)[0], base_axes)``
    gives the names whose mesh shardings ``load`` then takes."""
    path = Path(path).absolute()
    manifest = read_manifest(path)
    try:
        cfg = LoraConfig.from_dict(manifest["config"])
        arrays = {k: (tuple(m["shape"]), jnp.dtype(m["dtype"])) for k, m in manifest["arrays"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise LoraError(f"{path / MANIFEST}: malformed LoRA manifest: {e!r}") from e
    out = {}
    for key, (shape, dtype) in arrays.items():
        where = tuple(key.split("/"))
        sharding = None if shardings is None else tree.get(shardings, where, "the shardings")
        out[where] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return tree.replace({}, out), cfg


def load(path: str | Path, *, params=None, shardings=None) -> tuple[dict, LoraConfig]:
    """Read adapters written by ``save`` -> (lora, cfg). The base model's path is ``read_manifest(path)["base"]``.

    With ``params`` (arrays or ShapeDtypeStructs of the base model) every adapter is checked against its base
    weight before anything is read. ``shardings`` (a tree like the adapters: see ``abstract``) places each array on
    its sharding; otherwise they land on the first local device.
    """
    path = Path(path).absolute()
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        want, cfg = abstract(path)
        want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), want)
    else:
        want, cfg = abstract(path, shardings)
    if params is not None:
        check(params, want, cfg)
    wanted = {"/".join(p) + "/" + n: ab[n] for p, ab in adapters(want) for n in ("a", "b")}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(path / "adapters").item_metadata.tree
        except (OSError, ValueError) as e:
            raise LoraError(f"{path}: unreadable adapter arrays: {e}") from e
        stored = {"/".join(p): tuple(m.shape) for p, m in tree.leaves(stored)}
        for key, x in wanted.items():
            if stored.get(key) != x.shape:
                raise LoraError(f"{path}: {key} is stored as {stored.get(key)} but the manifest says {x.shape}")
        if set(stored) != set(wanted):
            raise LoraError(f"{path}: stored arrays {sorted(set(stored) - set(wanted))} are not in the manifest")
        lora = ckptr.restore(path / "adapters", want)
    return lora, cfg


__all__ = ["FORMAT", "MANIFEST", "VERSION", "abstract", "load", "read_manifest", "save"]
