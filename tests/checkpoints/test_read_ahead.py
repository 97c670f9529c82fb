"""The read-ahead thread of the streamed conversions (l4jax/checkpoints/read_ahead.py)."""

import threading
import time

import numpy as np
import pytest

from l4jax.checkpoints.read_ahead import interleave, read_ahead


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
    assert [n for n, _, _ in interleave(todo, budget=8)] == ["embed", "head", "norm", "a", "b", "c", "d"]
    assert sorted(interleave(todo, budget=100)) == sorted(todo)
