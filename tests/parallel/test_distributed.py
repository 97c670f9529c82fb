"""Two processes x 4 CPU devices on localhost through ``l4jax.distributed``: the same logits as one process.

Each worker is a fresh Python process (the device count is fixed at jax import), joins the job through
``l4jax.distributed.initialize``, loads the checkpoint onto a mesh over all 8 global devices (each process placing
only its own shards), runs the forward and gathers the logits; then saves the sharded model as an l4jax (Orbax)
checkpoint from both processes and restores it onto another mesh, and exports it to Hugging Face (process 0
writes while both gather each tensor), byte for byte the checkpoint it came from.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import l4jax
from tiny import batch, hf_logits, hf_model, rel_err, save

WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import l4jax

    address, pid, folder, data, out, saved, hf_out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:8]
    l4jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    ids, mask = np.load(data)["ids"], np.load(data)["mask"]
    results = {}
    # data spans the two processes (each places its half of the batch); expert spans them in the second mesh.
    for name, shape in {"data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
                        "expert4_tensor2": dict(expert=4, tensor=2)}.items():
        model = l4jax.load(folder, mesh=l4jax.make_mesh(**shape))
        assert not model.params["embed"].is_fully_addressable  # really spread over both processes
        results[name] = l4jax.distributed.to_numpy(model(ids, mask))
    # Checkpointing across processes: each process writes its own shards of the expert4_tensor2 model, then the
    # checkpoint is read back onto a different mesh.
    model.save(saved)
    restored = l4jax.load(saved, mesh=l4jax.make_mesh(fsdp=2, tensor=4))
    results["saved_then_restored"] = l4jax.distributed.to_numpy(restored(ids, mask))
    restored.save_pretrained(hf_out, shard_size=40_000)  # several shards, each tensor gathered from both processes
    if l4jax.distributed.is_main():
        np.savez(out, **results)
    l4jax.distributed.sync("done")
    l4jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh processes, about 50 s on 2 cores
def test_two_processes_match_one(tmp_path):
    model = hf_model("top2", seed=4)
    folder = save(model, tmp_path / "ckpt")
    ids, mask, pos = batch()
    np.savez(tmp_path / "batch.npz", ids=ids, mask=mask)
    single = np.asarray(l4jax.load(folder)(ids, mask))
    ref = hf_logits(model, ids, mask, pos)

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "logits.npz"
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i), folder, str(tmp_path / "batch.npz"),
                               str(out), str(tmp_path / "saved"), str(tmp_path / "hf_export")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:] if i < len(logs) else ''}"

    results = np.load(out)
    real = mask.astype(bool)
    for name in ("data2_expert2_tensor2", "expert4_tensor2", "saved_then_restored"):
        got = results[name]
        assert got.shape == single.shape, name
        np.testing.assert_allclose(got[real], single[real], rtol=0, atol=1e-5, err_msg=name)
        assert rel_err(got, ref, mask) <= 1e-4, name
    source, exported = tensors(folder), tensors(tmp_path / "hf_export")
    assert sorted(source) == sorted(exported) and len(list((tmp_path / "hf_export").glob("*.safetensors"))) > 2
    assert all(source[k].tobytes() == exported[k].tobytes() for k in source)


def tensors(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
