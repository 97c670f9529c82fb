"""A checksum of a tensor's bytes that a host numpy array and a sharded jax array compute alike.

Each element's bits, as an unsigned word w_i (16 or 32 bits), enter two sums mod 2^32: sum w_i, and
sum (i mod 65521 + 1) w_i over the flat (row-major) index i, so a changed, swapped or shifted word changes one of
them. Integer sums wrap exactly in any order, so the figure does not depend on the sharding or the block size, and
on a device it is one reduction over the shards each device already holds (no gather).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import tree as tree_lib

MOD = 65521
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_BLOCK = 1 << 22  # host elements per step: bounds the temporaries of the numpy version


SUB_BYTE = {"int4": np.int8, "uint4": np.uint8, "int2": np.int8, "uint2": np.uint8}


def _whole_bytes(x):
    """A sub-byte integer array (int4: quantized weights) as the 8-bit integers of the same values, so that the
    host (one element per byte) and a device (two per byte) sum the same words."""
    return x.astype(SUB_BYTE[x.dtype.name]) if x.dtype.name in SUB_BYTE else x


def _format(s1: int, s2: int) -> str:
    return f"{int(s1) & 0xFFFFFFFF:08x}{int(s2) & 0xFFFFFFFF:08x}"


def of_host(x: np.ndarray) -> str:
    """The checksum of a numpy array, at memory speed (``Running``, in one piece)."""
    running = Running()
    running.add(x)
    return running.digest()


class Running:
    """The checksum of an array given in consecutive pieces of its flat (row-major) order: blocks of rows as they
    are written. The weights (i mod MOD) + 1 repeat every MOD words, so each piece's words are summed per column
    of a [rows, MOD] view (one pass, no temporary of the piece's size) and its MOD column sums are rotated by the
    piece's offset before they are added; ``digest`` weights the MOD sums once. uint64 sums wrap mod 2^64, which
    keeps them exact mod 2^32."""

    def __init__(self):
        self.cols, self.offset = np.zeros(MOD, np.uint64), 0

    def add(self, x: np.ndarray) -> None:
        x = _whole_bytes(x)
        flat = np.ascontiguousarray(x).reshape(-1).view(_WORDS[x.dtype.itemsize])
        rows = flat.size // MOD
        cols = np.zeros(MOD, np.uint64)
        step = max(1, _BLOCK // MOD)
        grid = flat[:rows * MOD].reshape(rows, MOD)
        for r in range(0, rows, step):  # blocks of rows bound numpy's conversion buffers
            cols += grid[r:r + step].sum(axis=0, dtype=np.uint64)
        tail = flat[rows * MOD:].astype(np.uint64)
        cols[:tail.size] += tail
        self.cols += np.roll(cols, self.offset % MOD)  # column c of this piece is column (offset + c) mod MOD
        self.offset += flat.size

    def digest(self) -> str:
        with np.errstate(over="ignore"):
            s2 = int((self.cols * np.arange(1, MOD + 1, dtype=np.uint64)).sum(dtype=np.uint64))
        return _format(int(self.cols.sum(dtype=np.uint64)), s2)


@jax.jit
def _device_sums(x: jax.Array) -> jax.Array:
    x = _whole_bytes(x)
    w = jax.lax.bitcast_convert_type(x, jnp.dtype(_WORDS[x.dtype.itemsize])).astype(jnp.uint32)
    # (flat index mod MOD), from each axis's index and stride mod MOD: every product stays below 2^32.
    pos = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        i = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) % MOD
        pos = (pos + i * jnp.uint32(stride % MOD)) % MOD
        stride *= x.shape[axis]
    return jnp.stack([jnp.sum(w), jnp.sum(w * (pos + 1))])


def of_array(x) -> str:
    """The checksum of a numpy or (possibly sharded, multi-process) jax array."""
    if isinstance(x, np.ndarray):
        return of_host(x)
    s1, s2 = np.asarray(jax.device_get(_device_sums(x)))
    return _format(s1, s2)


@jax.jit
def _tree_sums(tree):
    return jax.tree.map(_device_sums, tree)


def of_tree(tree) -> dict[str, str]:
    """'/'-joined path -> checksum of every jax array leaf of a nested dict, in one device call."""
    sums = jax.device_get(_tree_sums(tree))
    return {"/".join(path): _format(*np.asarray(v)) for path, v in tree_lib.leaves(sums)}
