"""The read-ahead thread of the streamed conversions (l4jax/checkpoints/read_ahead.py)."""

import threading
import time

import numpy as np
import pytest

from l4jax.checkpoints.read_ahead import BLOCK_BYTES, Rows, default_budget, interleave, read_ahead
from l4jax.checkpoints.read_ahead import held as held_bytes


def test_read_ahead_keeps_order_and_the_byte_budget_and_raises_in_place():
    """Reads run ahead on a thread, but never hold more than the budget (one tensor larger than it, alone); a read
    that fails raises where its tensor comes, after the ones before it."""
    held, peak, log, lock = [0], [0], [], threading.Lock()
    sizes = [5, 3, 3, 9, 1, 1, 2, 4]

    def read(i):
        def go():
            with lock:
                held[0] += sizes[i]
                peak[0] = max(peak[0], held[0])
            time.sleep(0.002)
            if i == 6:
                raise ValueError("tensor 6 is damaged")
            return np.full(sizes[i], i)
        return go

    todo = [((f"p{i}",), n, read(i)) for i, n in enumerate(sizes)]
    with pytest.raises(ValueError, match="tensor 6"):
        with read_ahead(todo, budget=6) as arrays:
            for path, array in arrays:
                time.sleep(0.01)  # writing: the thread reads ahead meanwhile
                with lock:
                    log.append((path[0], int(array[0]), held[0]))
                    held[0] -= array.size
                del array
    assert [p for p, _, _ in log] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert all(f"p{v}" == p for p, v, _ in log)
    assert peak[0] == 9  # p3 alone; every other moment within the budget of 6
    assert max(h for p, _, h in log if p != "p3") <= 6


def test_interleave_puts_smaller_tensors_beside_each_large_one():
    sizes = [("embed", 8), ("norm", 1), ("head", 8), ("a", 2), ("b", 2), ("c", 3), ("d", 1)]
    todo = [(n, size, None) for n, size in sizes]
    order = [n for n, _, _ in interleave(todo, budget=11)]
    assert order == ["embed", "norm", "a", "head", "b", "c", "d"]  # beside each 8: up to 3 more, in their order
    assert [n for n, _, _ in interleave(todo, budget=8)] == ["embed", "norm", "head", "a", "b", "c", "d"]
    assert sorted(interleave(todo, budget=100)) == sorted(todo)


def test_rows_are_handed_over_unread_and_count_as_their_blocks_in_flight():
    """A ``Rows`` tensor is handed over unread (the caller reads its blocks as it writes them) and counts against
    the budget as its blocks in flight, so the next whole tensor is read meanwhile, not after it."""
    log, lock = [], threading.Lock()

    def blocks():
        for i in range(4):
            with lock:
                log.append(("block", i, threading.current_thread().name))
            yield np.full((1, 2), i)

    def whole():
        with lock:
            log.append(("whole", None, threading.current_thread().name))
        return np.zeros(2)

    rows = Rows((4, 2), np.dtype(np.int64), 1, blocks)
    todo = [("rows", 64, rows), ("whole", 16, whole)]
    assert held_bytes(todo[0]) == Rows.IN_FLIGHT * 16 and default_budget(todo) == 16 + Rows.IN_FLIGHT * 16 + BLOCK_BYTES
    with read_ahead(todo, default_budget(todo)) as arrays:
        name, item = next(arrays)
        assert name == "rows" and item is rows
        deadline = time.time() + 10  # the thread reads the next tensor while this one's blocks are written
        while not log and time.time() < deadline:
            time.sleep(0.005)
        assert log == [("whole", None, "l4jax-read-ahead")]
        assert [int(b[0, 0]) for b in item.blocks()] == [0, 1, 2, 3]
        del item
        assert next(arrays)[0] == "whole"
    with read_ahead(todo, 16) as arrays:  # no room beside the blocks: the whole tensor waits for them
        name, item = next(arrays)
        time.sleep(0.05)
        assert len(log) == 5
        del item
        next(arrays)
    assert len(log) == 6
    x = np.arange(10).reshape(5, 2)
    assert Rows((5, 2), x.dtype, 2, lambda: iter(x[i:i + 2] for i in (0, 2, 4))).read().tolist() == x.tolist()


def test_a_small_tensor_between_does_not_hold_the_next_large_one_back():
    """The embedding (streamed), a norm, the LM head (whole), as an import reads them: with the default budget the
    LM head is read while the embedding's blocks are still being written, although the norm is held too."""
    read = threading.Event()
    rows = Rows((4, 2), np.dtype(np.int64), 1, lambda: iter(np.zeros((1, 2), np.int64) for _ in range(4)))
    todo = [("embed", 64, rows), ("norm", 8, lambda: np.zeros(1)),
            ("head", BLOCK_BYTES, lambda: read.set() or np.zeros(2))]
    with read_ahead(todo, default_budget(todo)) as arrays:
        name, item = next(arrays)
        assert name == "embed" and read.wait(10)  # the embedding still in hand
        del item
        assert [name for name, _ in arrays] == ["norm", "head"]
