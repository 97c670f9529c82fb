"""Training checkpoints: a step whose bytes were damaged after saving is named, never restored as garbage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l4jax.checkpoints.train_state import CheckpointDamaged, Checkpoints
from tiny import damage_largest_file


def test_a_damaged_step_is_named_and_the_others_restore(tmp_path):
    state = {"w": jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024) / 7, "step": jnp.int32(3)}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    ckpts = Checkpoints(tmp_path, save_every=1, keep=3, use_async=False)
    ckpts.save(1, state, {"run": "a"})
    ckpts.save(2, jax.tree.map(lambda x: x + 1, state), {"run": "a"})
    ckpts.wait()
    assert ckpts.steps() == [2, 1]
    damage_largest_file(tmp_path / "2" / "state")
    with pytest.raises(CheckpointDamaged, match=r"step 2: (damaged: w no longer matches|unreadable)"):
        ckpts.restore(2, target, {"run": "a"})
    back = ckpts.restore(1, target, {"run": "a"})
    np.testing.assert_array_equal(back["w"], state["w"])
    ckpts.close()
