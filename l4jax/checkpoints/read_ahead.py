"""Reading the next tensors on a thread while the caller writes (or places) the one in hand, within a byte budget.

Every streamed conversion is a loop of read (disk, decompression, transposes, casts) then write (disk) or place
(devices). Run one after the other, the slower stage waits for the faster; run on two threads, they overlap:
reads, transposes and casts in numpy, safetensors and TensorStore release the GIL. The budget bounds host memory:
a tensor is read only when it fits beside those read and not yet released (or when none are held, so one larger
than the budget still goes through, alone). A large tensor can also come as ``Rows``: handed over unread, it is
read block by block by the caller as it writes it (never whole in memory, its reading overlapping its own writing)
while the thread reads the next tensors; the budget counts its blocks in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
from typing import Callable, Hashable, Iterator, TypeVar, Union

import numpy as np

K = TypeVar("K", bound=Hashable)
# Reads, casts and transposes go in blocks of ~BLOCK_BYTES of rows; a host tensor of ROWS_BYTES or more is written
# in chunks of that many rows (``l4jax_format.write_param``), and one that needs no transpose is read as ``Rows``.
BLOCK_BYTES = 64 << 20
ROWS_BYTES = 2 * BLOCK_BYTES


@dataclasses.dataclass(frozen=True)
class Rows:
    """A tensor that comes in consecutive blocks of rows, each of at most ``block_rows``: written as it is read,
    never whole in memory (``l4jax_format.write_param``). ``blocks()`` yields them in order: blocks of the
    tensor's rows (axis 0), or with ``transposed`` (a 2-D tensor [C, R]) blocks [n, C] of the rows of its
    transpose, as a Linear weight is read from an HF file."""

    shape: tuple[int, ...]
    dtype: np.dtype
    block_rows: int
    blocks: Callable[[], Iterator[np.ndarray]]
    transposed: bool = False
    IN_FLIGHT = 4  # blocks alive at once while it is written: one read, one check-summed, two written

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def row_items(self) -> int:
        """Elements in one row of a block."""
        return self.shape[0] if self.transposed else math.prod(self.shape[1:])

    @property
    def block_bytes(self) -> int:
        return self.block_rows * self.row_items * np.dtype(self.dtype).itemsize

    def read(self) -> np.ndarray:
        """The whole tensor, filled block by block (one allocation: a transpose or a cast never holds a second
        full copy)."""
        out = np.empty(self.shape, self.dtype)
        put_rows(out, self.blocks(), self.transposed)
        return out


TILE = 256


def put_rows(dst: np.ndarray, blocks: Iterator[np.ndarray], transposed: bool = False) -> None:
    """Fill ``dst`` from consecutive blocks of its rows, or with ``transposed`` of the rows of its transpose
    (dst[:, rows] = block.T), casting to its dtype on the way."""
    row = 0
    for block in blocks:
        if transposed:
            put_transposed(dst[:, row:row + len(block)], block)
        else:
            dst[row:row + len(block)] = block
        row += len(block)
        del block


def put_transposed(dst: np.ndarray, block: np.ndarray) -> None:
    """dst[:] = block.T in TILE x TILE squares: each square's rows and columns stay in the CPU's caches (1.8x a
    whole-block strided copy for bf16 on this project's machine: 530 against 300 MB/s)."""
    rows, cols = block.shape
    for r in range(0, rows, TILE):
        for c in range(0, cols, TILE):
            dst[c:c + TILE, r:r + TILE] = block[r:r + TILE, c:c + TILE].T


# (name, bytes, read() or Rows): e.g. hf_import.reads
Read = tuple[K, int, Union[Callable[[], np.ndarray], Rows]]


def held(read: Read) -> int:
    """The most bytes of ``read`` in memory at once: the whole tensor, or the blocks of ``Rows`` in flight."""
    return read[2].IN_FLIGHT * read[2].block_bytes if isinstance(read[2], Rows) else read[1]


def default_budget(todo: list[Read]) -> int:
    """The largest tensor read whole, plus the blocks in flight of one read as ``Rows`` (so that a whole tensor is
    read while a streamed one is written), plus one block of room for the small tensors (norms, routers) read
    beside them, which would otherwise hold the large one back until the streamed one is written: the peak stays
    about that of one tensor."""
    whole = max((n for _, n, r in todo if not isinstance(r, Rows)), default=0)
    return whole + max((held(r) for r in todo if isinstance(r[2], Rows)), default=0) + BLOCK_BYTES


@contextlib.contextmanager
def read_ahead(todo: list[Read], budget: int) -> Iterator[Iterator[tuple[K, np.ndarray | Rows]]]:
    """(name, array) of ``todo`` in order, each read on a thread while the caller handles the ones before it. A
    tensor is read only when the bytes of those read and not yet released, plus its own, fit in ``budget`` (or
    when none are held). One is released when the caller asks for the next, after dropping its own reference. A
    ``Rows`` is handed over as it is, its blocks read by the caller as it writes them, while this thread reads the
    next tensors; it counts as its blocks in flight. A read that fails is raised in its place, after the tensors
    before it."""
    cond, held_now, stop, ready = threading.Condition(), [0], threading.Event(), queue.Queue()

    def produce():
        for name, nbytes, read in todo:
            nbytes = held((name, nbytes, read))
            with cond:
                cond.wait_for(lambda: stop.is_set() or held_now[0] == 0 or held_now[0] + nbytes <= budget)
                if stop.is_set():
                    return
                held_now[0] += nbytes
            try:
                ready.put((name, nbytes, read if isinstance(read, Rows) else read()))
            except BaseException as e:  # a damaged tensor: raised in order, where the caller reads it
                ready.put(e)
                return

    def consume():
        for _ in todo:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            name, nbytes, array = item
            del item
            yield name, array
            del array  # the caller has handled it and dropped its own reference
            with cond:
                held_now[0] -= nbytes
                cond.notify()

    thread = threading.Thread(target=produce, name="l4jax-read-ahead", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        with cond:
            stop.set()
            cond.notify()
        thread.join()


def interleave(todo: list[Read], budget: int) -> list[Read]:
    """``todo`` reordered so that reading can overlap writing under ``budget``: two tensors larger than half the
    budget can never be held together, so right after each such one come the next smaller tensors (in their order)
    that fit beside it, read while it is written; the rest keep their order. The written result does not depend
    on the order (a checkpoint lists its parameters in their own order)."""
    out, placed = [], set()
    for i, r in enumerate(todo):
        if i in placed:
            continue
        out.append(r)
        if 2 * held(r) <= budget:
            continue
        room = budget - held(r)
        for j in range(i + 1, len(todo)):
            if j in placed or 2 * held(todo[j]) > budget:
                continue
            if held(todo[j]) > room:
                break
            room -= held(todo[j])
            placed.add(j)
            out.append(todo[j])
    return out
