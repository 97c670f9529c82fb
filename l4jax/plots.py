"""Pictures of what the model and the mesh do, for the notebooks and the README's figures (``docs/figures``).

Each function draws numbers computed elsewhere (a run's ``metrics.jsonl``, ``Model.expert_load``, ``masks.dense``,
an array's sharding, the preprocessor's tiles, ``l4jax plan``) and returns the matplotlib Figure; the notebooks
assert on those numbers. Needs matplotlib: ``pip install 'l4jax[notebooks]'``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

try:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
except ImportError as e:  # the optional extra
    raise ImportError("l4jax.plots draws with matplotlib: pip install 'l4jax[notebooks]'") from e

GIB = 2**30


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a folder or the file), in order."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves(runs: Mapping[str, Sequence[dict]]):
    """Loss and learning rate (left), tokens/s and MFU (right) against step, for runs drawn one after the other
    on one step axis (e.g. pretraining, then a fine-tune whose step 1 follows the pretraining's last)."""
    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    lr_ax, mfu_ax = loss_ax.twinx(), speed_ax.twinx()
    offset = 0
    for i, (name, records) in enumerate(runs.items()):
        step = offset + np.array([r["step"] for r in records])
        color = f"C{i}"
        loss_ax.plot(step, [r["loss"] for r in records], color=color, label=f"{name}: loss")
        lr_ax.plot(step, [r["lr"] for r in records], color=color, ls=":", label=f"{name}: learning rate")
        speed_ax.plot(step, [r["tokens_per_s"] for r in records], color=color, marker=".", label=f"{name}: tokens/s")
        mfu_ax.plot(step, [100 * r["mfu"] for r in records], color=color, ls="--", label=f"{name}: MFU")
        offset = step[-1]
    loss_ax.set(xlabel="step", ylabel="loss", title="loss and learning rate")
    lr_ax.set_ylabel("learning rate")
    speed_ax.set(xlabel="step", ylabel="tokens / s", title="throughput (over each logging interval)")
    mfu_ax.set_ylabel("MFU (%)")
    for a, b in ((loss_ax, lr_ax), (speed_ax, mfu_ax)):
        lines = a.get_legend_handles_labels(), b.get_legend_handles_labels()
        a.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=7, loc="upper right")
    return fig


def expert_load(loads: Mapping[str, np.ndarray], layers: Sequence[int]):
    """Heatmaps of tokens per expert (columns) per MoE layer (rows), one per entry of ``loads`` ([L_moe, E] each,
    as ``Model.expert_load`` returns them), on one colour scale."""
    top = max(int(np.max(v)) for v in loads.values())
    fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads) + 1, 0.45 * len(layers) + 1.6),
                             layout="constrained", squeeze=False)
    for ax, (name, load) in zip(axes[0], loads.items()):
        image = ax.imshow(load, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        for (r, c), n in np.ndenumerate(load):
            ax.text(c, r, int(n), ha="center", va="center", fontsize=7, color="w" if n < 0.6 * top else "k")
        ax.set(title=name, xlabel="expert", xticks=range(load.shape[1]), yticks=range(len(layers)),
               yticklabels=[f"layer {i}" for i in layers])
    fig.colorbar(image, ax=axes[0].tolist(), label="tokens routed")
    return fig


def visibility(patterns: Mapping[str, np.ndarray], columns: int = 2):
    """Each [T, T] boolean matrix (query rows, key columns; ``masks.dense``) as an image: dark = visible."""
    rows = -(-len(patterns) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.3 * rows), layout="constrained",
                             squeeze=False)
    for ax, (name, pattern) in zip(axes.flat, patterns.items()):
        ax.imshow(np.asarray(pattern), cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
        ax.set(xlabel="key", ylabel="query", xticks=[], yticks=[])
        ax.set_title(name, fontsize=9)
    for ax in axes.flat[len(patterns):]:
        ax.axis("off")
    return fig


def sharding(arrays: Mapping[str, object], axes: Mapping[str, tuple[int, int]] | None = None,
             letters: Mapping[str, str] | None = None):
    """Which devices hold which block of each array: two of its axes (``axes[name]``, default the first two) drawn
    as a grid, each block labelled with the devices holding it (several ids = replicated). ``letters[name]``: the
    array's axis letters (e.g. "EDF"), for the axis labels."""
    fig, plots = plt.subplots(1, len(arrays), figsize=(3.4 * len(arrays), 3.6), layout="constrained", squeeze=False)
    for ax, (name, array) in zip(plots[0], arrays.items()):
        i, j = (axes or {}).get(name, (0, 1))
        blocks: dict[tuple, list[int]] = {}
        for device, index in array.sharding.devices_indices_map(array.shape).items():
            rows, cols = index[i].indices(array.shape[i])[:2], index[j].indices(array.shape[j])[:2]
            blocks.setdefault((rows, cols), []).append(device.id)
        for k, ((rows, cols), ids) in enumerate(sorted(blocks.items(), key=lambda b: min(b[1]))):
            ax.add_patch(Rectangle((cols[0], rows[0]), cols[1] - cols[0], rows[1] - rows[0], color=f"C{k % 10}",
                                   alpha=0.55, ec="k"))
            ax.text((cols[0] + cols[1]) / 2, (rows[0] + rows[1]) / 2, ",".join(map(str, sorted(ids))),
                    ha="center", va="center", fontsize=8)
        names = (letters or {}).get(name) or [f"axis {a}" for a in range(len(array.shape))]
        ax.set(xlim=(0, array.shape[j]), ylim=(array.shape[i], 0), xlabel=f"{names[j]} ({array.shape[j]})",
               ylabel=f"{names[i]} ({array.shape[i]})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{name} {list(array.shape)}\n{array.sharding.spec}", fontsize=9)
    return fig


def tiles(pixel_values: np.ndarray, grid: tuple[int, int], mean: float = 0.5, std: float = 0.5):
    """One image's tiles [N, 3, S, S] (normalised as the preprocessor makes them) laid back on their rows x cols
    canvas, with the tile grid, and the global thumbnail that follows them when there are several."""
    (rows, cols), S = grid, pixel_values.shape[-1]
    picture = np.clip(np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1) * std + mean, 0, 1)
    canvas = picture[:rows * cols].reshape(rows, cols, S, S, 3).transpose(0, 2, 1, 3, 4).reshape(rows * S, cols * S, 3)
    thumb = len(picture) > rows * cols
    fig, axes = plt.subplots(1, 1 + thumb, figsize=(4 + 2.5 * thumb, 3), layout="constrained", squeeze=False,
                             width_ratios=[cols, 1][:1 + thumb])
    axes[0, 0].imshow(canvas)
    for r in range(rows):
        for c in range(cols):
            axes[0, 0].add_patch(Rectangle((c * S - 0.5, r * S - 0.5), S, S, fill=False, ec="red", lw=1.5))
            axes[0, 0].text(c * S + 2, r * S + 2, f"tile {r * cols + c}", color="red", va="top", fontsize=8)
    axes[0, 0].set(title=f"canvas {rows} x {cols} tiles of {S} px", xticks=[], yticks=[])
    if thumb:
        axes[0, 1].imshow(picture[-1])
        axes[0, 1].set(title="thumbnail", xticks=[], yticks=[])
    return fig


def plan_memory(plans: Mapping[str, tuple[dict, dict, int | None]]):
    """Stacked bars of one device's memory per plan (``label: (held_per_device, memory, capacity)`` from ``l4jax
    plan``): the named parts of the arguments (weights, cache or optimizer state), the rest of them, outputs not
    aliased, temporaries; each chip's capacity as a black line across its bar."""
    colors = {"weights": "C0", "cache": "C1", "optimizer state": "C2", "other arguments": "C7",
              "outputs (not aliased)": "C4", "temporaries": "C3"}
    fig, ax = plt.subplots(figsize=(1.8 * len(plans) + 3, 3.8), layout="constrained")
    for x, (held, memory, capacity) in enumerate(plans.values()):
        parts = dict(held)
        parts["other arguments"] = memory["arguments"] - sum(held.values())
        parts["outputs (not aliased)"] = memory["outputs"] - memory["aliased"]
        parts["temporaries"] = memory["temporaries"]
        bottom = 0.0
        for name, size in parts.items():
            ax.bar(x, size / GIB, bottom=bottom, color=colors[name], label=name)
            bottom += size / GIB
        if capacity is not None:
            ax.hlines(capacity / GIB, x - 0.45, x + 0.45, color="k", lw=2.5, label="the chip's memory")
    unique = dict(zip(*reversed(ax.get_legend_handles_labels())))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set(xticks=range(len(plans)), xticklabels=list(plans), ylabel="GiB per device", title="memory per device")
    ax.tick_params(axis="x", labelsize=8)
    return fig
