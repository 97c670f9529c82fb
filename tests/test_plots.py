"""l4jax.plots draws the numbers it is given: the images, bars, labels and lines hold exactly those numbers (Agg
backend, nothing shown); the README's figures script runs and writes its PNGs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg")

from l4jax import make_mesh, plots  # noqa: E402
from l4jax.model.masks import dense  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_training_curves_from_metrics_files(tmp_path):
    runs = {}
    for name, start, n in (("pretrain", 0, 4), ("lora", 0, 2)):
        records = [{"step": start + i + 1, "loss": 5.0 - i, "lr": 1e-3 * (i + 1), "tokens_per_s": 100.0 + i,
                    "mfu": 0.01 * i} for i in range(n)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs[name] = plots.read_metrics(tmp_path / name)
    fig = plots.training_curves(runs)
    loss_ax = fig.axes[0]
    (pre, lora) = loss_ax.get_lines()
    assert pre.get_xdata().tolist() == [1, 2, 3, 4] and lora.get_xdata().tolist() == [5, 6]  # one step axis
    assert pre.get_ydata().tolist() == [5.0, 4.0, 3.0, 2.0]
    mfu_lines = fig.axes[3].get_lines()
    assert mfu_lines[0].get_ydata().tolist() == [0.0, 1.0, 2.0, 3.0]  # percent


def test_expert_load_heatmaps_hold_the_counts():
    loads = {"before": np.array([[3, 1], [0, 4]]), "after": np.array([[2, 2], [2, 2]])}
    fig = plots.expert_load(loads, layers=[1, 3])
    for ax, load in zip(fig.axes, loads.values()):
        np.testing.assert_array_equal(ax.images[0].get_array(), load)
        assert [t.get_text() for t in ax.texts] == [str(n) for n in load.ravel()]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 1", "layer 3"]


def test_visibility_images_are_the_masks():
    pattern = np.asarray(dense(attention_mask=np.array([[0, 1, 1, 1, 1]]), chunk_size=2)[0])
    fig = plots.visibility({"chunked": pattern, "global": np.tril(np.ones((5, 5), bool))}, columns=3)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), pattern)
    assert len(fig.axes) == 3 and not fig.axes[2].axison  # the spare panel is blank


def test_sharding_labels_name_the_devices_of_each_block():
    mesh = make_mesh(data=2, expert=2, tensor=2)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", None, "tensor"))
    w = jax.device_put(np.zeros((4, 3, 8), np.float32), spec)
    fig = plots.sharding({"w": w}, axes={"w": (0, 2)}, letters={"w": "EDF"})
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    expect = sorted(",".join(str(d.id) for d in sorted(devs, key=lambda d: d.id)) for devs in _blocks(w))
    assert labels == expect and len(labels) == 4  # 2 x 2 blocks, each on the 2 devices of one data pair
    assert fig.axes[0].get_xlabel() == "F (8)" and fig.axes[0].get_ylabel() == "E (4)"


def _blocks(array):
    groups = {}
    for device, index in array.sharding.devices_indices_map(array.shape).items():
        groups.setdefault(tuple((s.start, s.stop) for s in index), []).append(device)
    return groups.values()


def test_tiles_lay_the_tiles_back_on_their_canvas():
    rng = np.random.default_rng(0)
    px = rng.uniform(-1, 1, (7, 3, 4, 4)).astype(np.float32)  # 2 x 3 tiles + the thumbnail
    fig = plots.tiles(px, (2, 3))
    canvas = fig.axes[0].images[0].get_array()
    assert canvas.shape == (8, 12, 3)
    np.testing.assert_allclose(canvas[4:8, 8:12], px[5].transpose(1, 2, 0) * 0.5 + 0.5)  # row 1, column 2
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), px[6].transpose(1, 2, 0) * 0.5 + 0.5)


def test_plan_memory_bars_stack_to_the_plans_total():
    gib = plots.GIB
    memory = {"arguments": 10 * gib, "outputs": 3 * gib, "aliased": 2 * gib, "temporaries": 4 * gib}
    fig = plots.plan_memory({"a": ({"weights": 6 * gib, "cache": 3 * gib}, memory, 80 * gib),
                             "b": ({"weights": 1 * gib}, memory, None)})
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:5] == [6, 3, 1, 1, 4] and sum(heights[:5]) == 15  # arguments + outputs - aliased + temporaries
    assert heights[5:] == [1, 9, 1, 4]
    (capacity,) = fig.axes[0].collections  # one capacity line: plan b has no capacity
    assert capacity.get_segments()[0][0][1] == 80


@pytest.mark.slow
def test_the_readme_figures_script(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "docs" / "figures" / "make_figures.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("irope_attention.png", "mesh_layout.png"):
        made, committed = Image.open(tmp_path / name), Image.open(ROOT / "docs" / "figures" / name)
        assert made.size == committed.size and made.size[0] > 600
