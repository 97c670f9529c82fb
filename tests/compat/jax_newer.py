"""The same model on the newer JAX the GPU machines run (jax 0.11.x needs Python >= 3.12, where the CPU torch wheel
is not available): reference numbers are made with transformers in the test environment, then checked by l4jax
running in a second environment that has only l4jax's own dependencies.

    python tests/compat/jax_newer.py make DIR    # test env: tiny HF checkpoints, HF logits and greedy tokens
    python tests/compat/jax_newer.py check DIR   # newer-JAX env: l4jax on 4 meshes, generate, save/restore,
                                                 # a sharded train step, a training checkpoint onto another mesh,
                                                 # logits and train steps with the sequence split (context=4)
"""

import os
import shutil
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

NAMES = ("scout", "top2")
MESHES = (None, dict(data=2, tensor=4), dict(expert=4, tensor=2), dict(fsdp=8))


def make(folder):
    import torch
    from tiny import batch, hf_logits, hf_model, save
    out = {}
    for name in NAMES:
        model = hf_model(name, seed=21)
        save(model, os.path.join(folder, name))
        ids, mask, pos = batch()
        out[f"{name}_ids"], out[f"{name}_mask"], out[f"{name}_hf"] = ids, mask, hf_logits(model, ids, mask, pos)
        with torch.no_grad():
            out[f"{name}_gen"] = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                                max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                                pad_token_id=0).numpy()
            train_ids = np.random.default_rng(5).integers(3, 300, (2, 24))
            out[f"{name}_train_ids"] = train_ids
            out[f"{name}_hf_loss"] = float(model(torch.tensor(train_ids), labels=torch.tensor(train_ids)).loss)
    np.savez(os.path.join(folder, "ref.npz"), **out)


def check(folder) -> int:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import flax

    import l4jax
    print(f"jax {jax.__version__}, flax {flax.__version__}, python {sys.version.split()[0]}")
    ref = np.load(os.path.join(folder, "ref.npz"))
    failures = 0

    def report(what, ok, detail=""):
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what} {detail}")

    for name in NAMES:
        path, ids, mask, hf = os.path.join(folder, name), ref[f"{name}_ids"], ref[f"{name}_mask"], ref[f"{name}_hf"]
        sel = mask.astype(bool)
        rel = lambda x: float(np.abs(np.asarray(x) - hf)[sel].max() / np.abs(hf[sel]).max())  # noqa: E731
        for mesh in MESHES:
            m = l4jax.load(path, mesh=None if mesh is None else l4jax.make_mesh(**mesh))
            err = rel(m(ids, mask))
            report(f"{name} logits, mesh {mesh}", err <= 1e-4, f"rel err {err:.1e}")
        # The sequence split over devices (ring attention and its packed sends), left-padded to split in four,
        # against one device on the same rows (extra left padding moves HF's chunk boundaries, so not against HF).
        rows = [np.pad(x, ((0, 0), (-ids.shape[1] % 4, 0))) for x in (ids, mask)]
        one = np.asarray(l4jax.load(path)(*rows))
        split = np.asarray(l4jax.load(path, mesh=l4jax.make_mesh(context=4, tensor=2))(*rows))
        real = rows[1].astype(bool)
        err = float(np.abs(split - one)[real].max() / np.abs(one[real]).max())
        report(f"{name} logits, mesh context=4, tensor=2, equal one device's", err <= 1e-5, f"rel err {err:.1e}")
        gen = l4jax.load(path).generate(ids, mask, max_new_tokens=20, stop_tokens=())
        report(f"{name} greedy tokens equal transformers", np.array_equal(gen, ref[f"{name}_gen"]))
        saved = os.path.join(folder, f"{name}-saved")
        shutil.rmtree(saved, ignore_errors=True)
        l4jax.load(path, mesh=l4jax.make_mesh(expert=2, tensor=4)).save(saved)
        err = rel(l4jax.load(saved)(ids, mask))
        report(f"{name} save on a mesh, restore on one device", err <= 1e-4, f"rel err {err:.1e}")
        train_checks(name, path, ref, folder, report)
    print(f"{'compat:' if failures == 0 else 'compat FAILED:'} {failures} failed")
    return 1 if failures else 0


def train_checks(name, path, ref, folder, report):
    """A sharded train step's loss against transformers' loss; a checkpoint of the sharded run restored onto one
    device continues with the same losses."""
    import jax

    import l4jax
    from l4jax.checkpoints.train_state import Checkpoints
    from l4jax.train.step import Trainer
    from l4jax.train.settings import TrainConfig

    ids = ref[f"{name}_train_ids"].astype(np.int32)
    batch = {"inputs": ids, "targets": np.roll(ids, -1, axis=1), "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape).copy(),
             "loss_mask": np.concatenate([np.ones((2, ids.shape[1] - 1)), np.zeros((2, 1))], 1).astype(np.float32)}
    config = l4jax.load_config(path)
    tc = TrainConfig(seq_len=ids.shape[1], batch_size=2, remat="full", steps=10, warmup_steps=0, lr=1e-3)
    sharded = Trainer(config, tc, l4jax.make_mesh(data=2, expert=2, tensor=2))
    state, frozen = sharded.init_state(l4jax.load(path).params)
    state, m = sharded.step(state, frozen, batch)
    first = float(m["loss"])
    hf = float(ref[f"{name}_hf_loss"])
    err = abs(float(m["loss"]) - hf) / hf
    report(f"{name} sharded train step loss equals transformers", err <= 1e-5, f"{float(m['loss']):.7f} vs {hf:.7f}")
    ckpts = Checkpoints(os.path.join(folder, f"{name}-train"), save_every=1, keep=2)
    ckpts.save(1, state, {"model": config.text.to_hf()}, force=True)
    ckpts.wait()
    straight = []
    for _ in range(2):
        state, m = sharded.step(state, frozen, batch)
        straight.append(float(m["loss"]))
    single = Trainer(config, tc)
    restored = ckpts.restore(1, single.abstract_state(), {"model": config.text.to_hf()})
    ckpts.close()
    resumed = []
    for _ in range(2):
        restored, m = single.step(restored, {}, batch)
        resumed.append(float(m["loss"]))
    ok = np.allclose(straight, resumed, rtol=1e-5) and straight[1] < straight[0] < hf  # the weights do move
    report(f"{name} training checkpoint restored onto one device continues", ok, f"{straight} vs {resumed}")
    # The same three steps with the sequence split over devices: the gradients through the ring's sends too.
    split = Trainer(config, tc, l4jax.make_mesh(context=4, tensor=2))
    state, frozen = split.init_state(l4jax.load(path).params)
    losses = []
    for _ in range(3):
        state, m = split.step(state, frozen, batch)
        losses.append(float(m["loss"]))
    ok = np.allclose(losses, [first] + straight, rtol=1e-5)
    report(f"{name} train steps on mesh context=4, tensor=2 equal the data-parallel ones", ok, f"{losses}")
    jax.clear_caches()


if __name__ == "__main__":
    mode, folder = sys.argv[1], sys.argv[2]
    os.makedirs(folder, exist_ok=True)
    sys.exit(make(folder) if mode == "make" else check(folder))
