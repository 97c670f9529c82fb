"""Reading the next tensors on a thread while the caller writes (or places) the one in hand, within a byte budget.

Every streamed conversion is a loop of read (disk, decompression, transposes, casts) then write (disk) or place
(devices). Run one after the other, the slower stage waits for the faster; run on two threads, they overlap:
reads, transposes and casts in numpy, safetensors and TensorStore release the GIL. The budget bounds host memory:
a tensor is read only when it fits beside those read and not yet released (or when none are held, so one larger
than the budget still goes through, alone).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from typing import Callable, Hashable, Iterator, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)
Read = tuple[K, int, Callable[[], np.ndarray]]  # (name, bytes, read()): e.g. hf_import.reads


@contextlib.contextmanager
def read_ahead(todo: list[Read], budget: int) -> Iterator[Iterator[tuple[K, np.ndarray]]]:
    """(name, array) of ``todo`` in order, each read on a thread while the caller handles the ones before it. A
    tensor is read only when the bytes of those read and not yet released, plus its own, fit in ``budget`` (or
    when none are held). One is released when the caller asks for the next, after dropping its own reference. A
    read that fails is raised in its place, after the tensors before it."""
    cond, held, stop, ready = threading.Condition(), [0], threading.Event(), queue.Queue()

    def produce():
        for name, nbytes, read in todo:
            with cond:
                cond.wait_for(lambda: stop.is_set() or held[0] == 0 or held[0] + nbytes <= budget)
                if stop.is_set():
                    return
                held[0] += nbytes
            try:
                ready.put((name, nbytes, read()))
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
                held[0] -= nbytes
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
    budget can never be held together, so after each such one come the smaller tensors (in their order) that fit
    beside it, read while it is written; whatever is left follows at the end. The written result does not depend
    on the order (a checkpoint lists its parameters in their own order)."""
    big = [r for r in todo if 2 * r[1] > budget]
    small = collections.deque(r for r in todo if 2 * r[1] <= budget)
    out = []
    for r in big:
        out.append(r)
        room = budget - r[1]
        while small and small[0][1] <= room:
            room -= small[0][1]
            out.append(small.popleft())
    return out + list(small)
