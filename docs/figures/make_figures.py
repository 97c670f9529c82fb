"""Draw the README's figures from the code they explain (run from anywhere; about 20 s on 2 cores):

    python docs/figures/make_figures.py [OUT_DIR]    # default: this folder

irope_attention.png  what each query sees in a chunked (RoPE) layer and a global (NoPE) layer, for a left-padded
                     row and for a row packing three documents (``masks.dense``: the rule the attention uses)
mesh_layout.png      which of 8 devices holds which block of an expert weight, the KV cache and the logits on a
                     data=2, expert=2, tensor=2 mesh (the shardings ``l4jax.load`` and ``generate`` use)
"""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import l4jax  # noqa: E402
from l4jax import plots  # noqa: E402
from l4jax.model import KVCache  # noqa: E402
from l4jax.model.masks import dense  # noqa: E402


def irope(out: Path) -> None:
    T, C = 24, 8
    padded = np.array([[0] * 5 + [1] * (T - 5)])                  # 5 padding slots, then one prompt
    packed = np.array([[1] * 7 + [2] * 11 + [3] * 4 + [0] * 2])   # three documents and 2 empty slots
    fig = plots.visibility({
        f"chunked layer (chunk {C}), left-padded row": dense(attention_mask=padded, chunk_size=C)[0],
        "global layer, left-padded row": dense(attention_mask=padded)[0],
        f"chunked layer (chunk {C}), packed documents": dense(segment_ids=packed, chunk_size=C)[0],
        "global layer, packed documents": dense(segment_ids=packed)[0]})
    fig.suptitle("iRoPE: what each query sees (dark = visible)")
    fig.savefig(out / "irope_attention.png", dpi=110)


def mesh_layout(out: Path) -> None:
    config = l4jax.load_config("tiny")
    mesh = l4jax.make_mesh(data=2, expert=2, tensor=2)
    model = l4jax.init(config, seed=0, mesh=mesh)
    cache = KVCache.abstract(config.text, 4, 32, jnp.float32, model.part)
    glob = config.text.chunked_layers.index(False)  # a global layer: its cache spans all 32 slots
    logits = model(np.ones((4, 8), np.int32))
    gate, k, lg = "expert gate", f"KV cache (layer {glob}, k)", "logits"
    fig = plots.sharding({gate: model.params["layers_1"]["moe"]["gate"], k: cache.k[glob], lg: logits},
                         axes={gate: (0, 2), k: (0, 1), lg: (0, 2)},
                         letters={gate: "EDF", k: ["B", "K", "S", "hd"], lg: "BTV"})
    fig.suptitle(f"8 devices, mesh {', '.join(f'{a}={n}' for a, n in mesh.shape.items() if n > 1)}: the devices "
                 "holding each block")
    fig.savefig(out / "mesh_layout.png", dpi=110)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    target.mkdir(parents=True, exist_ok=True)
    irope(target)
    mesh_layout(target)
    print("written:", *sorted(p.name for p in target.glob("*.png")))
