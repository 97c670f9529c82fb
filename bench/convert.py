"""Streaming conversion benchmark: throughput and peak host memory of ``l4jax convert``, against a plain copy.

    python bench/convert.py [--config bench] [--layers 8] [--vocab N] [--dir /tmp/l4jax-bench-convert]

Writes a random bf16 HF checkpoint of the given config (the ``bench`` preset is ~5.3 GB; ``--layers 1`` ~2.1 GB;
``--layers 2 --vocab 32768`` ~1.2 GB, the issue's "~1 GB", where the experts outweigh the embedding and LM head)
as ~1 GB safetensors shards with the HF key names, then runs, each in a fresh process: (1) a plain read of every
tensor with ``safe_open``; (2) the copy baseline: that read, each tensor's bytes written to one file, fsync at the
end; (3) import, ``l4jax convert --from-hf``; (4) export, ``--from-l4jax --to-hf``; (5) ``l4jax.load`` of the HF
folder onto a 2-device mesh (simulated CPU devices); (6) resume: the export and the import again, each killed
(SIGKILL) once tensors holding 60% of its bytes are recorded, then the same command, timed alone. First, the
start-up of a process that imports l4jax's CLI (in every l4jax figure). Prints seconds, MB/s, percent of the
copy's MB/s and peak RSS, with the bound the issue sets (largest tensor + 1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml
from safetensors.numpy import save_file

from l4jax.checkpoints import hf_import
from l4jax.checkpoints.hf_names import text_sources
from l4jax.config import PRESET_DIR, load_config

PLAIN_READ = """
import sys, json
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
from pathlib import Path
from safetensors import safe_open
folder = Path(sys.argv[1])
files = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
total = 0
for f in files:
    with safe_open(str(folder / f), framework="numpy") as h:
        for k in h.keys():
            total += h.get_tensor(k).nbytes
print(total)
"""

COPY = """
import os, sys, json
import ml_dtypes  # noqa: F401
from pathlib import Path
from safetensors import safe_open
folder, out = Path(sys.argv[1]), sys.argv[2]
files = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
with open(out, "wb") as w:
    for f in files:
        with safe_open(str(folder / f), framework="numpy") as h:
            for k in h.keys():
                w.write(h.get_tensor(k).tobytes())
    w.flush()
    os.fsync(w.fileno())
"""


LOAD = """
import sys
from l4jax.parallel.mesh import simulate_cpu_devices
simulate_cpu_devices(2)
import l4jax
l4jax.load(sys.argv[1], mesh=l4jax.make_mesh(tensor=2))
"""


def write_checkpoint(folder: Path, config_name: str, layers: int | None, shard_bytes: int = 1 << 30,
                     vocab: int | None = None) -> dict:
    hf_cfg = dict(_hf_config(config_name), model_type="llama4_text")
    if layers is not None:
        hf_cfg["num_hidden_layers"] = layers
    if vocab is not None:  # the special tokens' ids must fit in it
        hf_cfg.update(vocab_size=vocab, bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    cfg = load_config(hf_cfg).text
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    rng = np.random.default_rng(0)
    seen, shard, size, weight_map, n = set(), {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for s in text_sources(cfg, "model.", "lm_head.weight"):
        if s.key in seen:
            continue
        seen.add(s.key)
        a = rng.standard_normal(s.shape, dtype=np.float32).astype(ml_dtypes.bfloat16)
        if size + a.nbytes > shard_bytes:
            flush()
        shard[s.key], size = a, size + a.nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf_cfg


def _hf_config(name: str) -> dict:
    d = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    return d.get("text_config", d)


def run(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one child process.

    Peak RSS is the child's VmHWM, polled from /proc: ``wait4``'s ru_maxrss would also count the memory the child
    inherited from this (large) process before exec.
    """
    os.sync()  # the dirty pages of the workload before (or of writing the checkpoint) are not this one's to flush
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return time.perf_counter() - t, peak / 2**20  # kB -> GiB


def kill_at(cmd: list[str], out: Path, fraction: float, sizes: dict[str, int]) -> float:
    """Run ``cmd`` and SIGKILL it once ``fraction`` of its bytes are in tensors recorded in its partial folder
    (``sizes``: each tensor's bytes, by the name the record uses); returns the fraction recorded when it died."""
    record = out.parent / f".{out.name}.partial" / "l4jax.partial.json"
    total = sum(sizes.values())

    def recorded() -> float:
        return sum(sizes[name] for name in json.loads(record.read_text())["done"]) / total

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0.0
    while proc.poll() is None:
        try:
            done = recorded()
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        if done >= fraction:
            proc.kill()
            break
        time.sleep(0.01)
    proc.wait()
    return recorded()


def resumed(cmd: list[str], out: Path, sizes: dict[str, int], fraction: float = 0.6) -> tuple[str, float, float]:
    """The same command after a SIGKILL at ``fraction`` of its bytes: (what, seconds, peak RSS)."""
    shutil.rmtree(out, ignore_errors=True)
    killed_at = kill_at(cmd, out, fraction, sizes)
    return (f"after a kill at {killed_at:.0%} of its bytes", *run(cmd))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the config's)")
    ap.add_argument("--dir", default="/tmp/l4jax-bench-convert")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    src, dst = root / "hf", root / "l4jax"
    write_checkpoint(src, args.config, args.layers, vocab=args.vocab)
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = max(int(np.prod(s.shape)) * 2 for s in text_sources(load_config(src).text, "model.", "lm_head.weight"))
    convert = [sys.executable, "-m", "l4jax.cli", "convert"]
    imp = convert + ["--from-hf", str(src), "--to", str(dst)]
    exp = convert + ["--from-l4jax", str(dst), "--to-hf", str(root / "hf2")]
    rows = [("python -c 'import l4jax.cli' (start-up)", *run([sys.executable, "-c", "import l4jax.cli"])),
            ("plain safe_open read", *run([sys.executable, "-c", PLAIN_READ, str(src)])),
            ("copy (read, write, fsync)", *run([sys.executable, "-c", COPY, str(src), str(root / "copy.bin")])),
            ("import (--from-hf)", *run(imp)),
            ("export (--to-hf)", *run(exp)),
            ("l4jax.load(hf, mesh=tensor=2), 2 CPU devices", *run([sys.executable, "-c", LOAD, str(src)]))]
    # The disk's rate moves between runs: the copy and the import once more, the baseline the copies' mean.
    shutil.rmtree(dst)
    rows += [("copy, again", *run([sys.executable, "-c", COPY, str(src), str(root / "copy.bin")])),
             ("import, again", *run(imp))]
    shutil.rmtree(root / "hf2")
    sources = text_sources(load_config(src).text, "model.", "lm_head.weight")
    hf_sizes = {s.key: int(np.prod(s.shape)) * 2 for s in sources}
    what, sec, rss = resumed(exp, root / "hf2", hf_sizes)
    rows.append((f"export resumed {what}", sec, rss))
    what, sec, rss = resumed(imp, dst, {"/".join(path): n for path, n, _ in hf_import.reads(src, load_config(src))})
    rows.append((f"import resumed {what}", sec, rss))
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards, largest tensor "
          f"{largest / 1e9:.2f} GB; bound = largest + 1 GB = {largest / 2**30 + 1:.2f} GiB")
    copy = (total / rows[2][1] + total / rows[6][1]) / 2
    print(f"{'workload':48s} {'seconds':>8s} {'MB/s':>8s} {'% of copy':>10s} {'peak RSS GiB':>13s}")
    for name, sec, rss in rows:
        rate = "" if "start-up" in name else f"{total / 1e6 / sec:8.0f} {100 * total / sec / copy:10.0f}"
        print(f"{name:48s} {sec:8.1f} {rate:>19s} {rss:13.2f}")
    print(f"resumed export: {100 * rows[-2][1] / rows[4][1]:.0f}% of a whole export's time; resumed import: "
          f"{100 * rows[-1][1] / rows[3][1]:.0f}% of a whole import's time")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
