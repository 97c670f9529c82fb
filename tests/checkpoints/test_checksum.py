"""The tensor checksum: the same figure from host numpy (any block size) and from a sharded jax array, and a
different one after any single change."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import l4jax
from l4jax.checkpoints import checksum


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_host_blocks_device_and_shards_agree(dtype, monkeypatch):
    x = np.random.default_rng(0).standard_normal((8, 96, 40)).astype(dtype)
    whole = checksum.of_host(x)
    monkeypatch.setattr(checksum, "_BLOCK", 999)  # blocks that cut rows anywhere
    assert checksum.of_host(x) == whole
    mesh = l4jax.make_mesh(data=2, expert=2, tensor=2)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "tensor")))
    assert checksum.of_array(sharded) == checksum.of_array(jnp.asarray(x)) == whole


def test_any_single_change_is_seen():
    x = np.arange(1, 4097, dtype=np.float32).reshape(64, 64)
    base = checksum.of_host(x)
    swapped = x.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # the same words in another order
    flipped = x.copy()
    flipped.view(np.uint32)[10, 10] ^= 1 << 7
    assert len({base, checksum.of_host(swapped), checksum.of_host(flipped)}) == 3


def test_running_over_pieces_of_any_size_is_the_whole_checksum():
    """Blocks of rows as a tensor is written (l4jax_format._write_rows), cut at offsets that are not multiples of
    the weights' period: the same figure as the whole tensor's."""
    x = np.random.default_rng(1).standard_normal((97, 1531)).astype(ml_dtypes.bfloat16)  # 148507 words: > 2 periods
    running = checksum.Running()
    for a, b in [(0, 3), (3, 4), (4, 50), (50, 97)]:
        running.add(x[a:b])
    assert running.digest() == checksum.of_host(x)
    shifted = checksum.Running()
    shifted.add(x[:4])
    shifted.add(x[5:])
    shifted.add(x[4:5])  # the same blocks in another order: another figure
    assert shifted.digest() != checksum.of_host(x)
