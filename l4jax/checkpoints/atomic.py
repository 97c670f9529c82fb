"""The one atomic folder writer: a folder appears whole at its destination, or not at all.

Every l4jax writer (the l4jax checkpoint format, LoRA adapters, the model a training run exports) fills a
temporary sibling ``.<name>.partial`` and renames it into place at the end, so an interrupted write never leaves a
half-written folder at the destination (and a killed run's leftover is replaced by the next attempt). With several
processes every process enters the block and writes its own shards; process 0 creates, finalises and renames.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import jax

from ..parallel.distributed import sync


def partial_dir(out: str | Path) -> Path:
    """The temporary sibling that ``atomic_dir`` fills before renaming it to ``out``."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, what: str = "folder", keep: bool = False
               ) -> Iterator[Path]:
    """Yield the temporary folder to fill; on leaving the block without an error it becomes ``out``.

    ``out`` must not exist unless ``overwrite``; then the previous folder is moved aside first (a directory
    cannot be replaced in one rename), so a crash in the instant between the two renames leaves it at
    ``.<name>.old`` beside ``out``. On an error the temporary folder is removed and ``out`` is untouched.
    With ``keep`` (a resumable writer, conversion.py) an existing temporary folder is filled further, and kept on
    an error for the next attempt.
    """
    out = Path(out).absolute()  # newer Orbax refuses relative paths
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; refusing to overwrite a {what}")
    primary = jax.process_index() == 0
    # The same names on every process (they share the filesystem).
    tmp, old = partial_dir(out), out.parent / f".{out.name}.old"
    if primary:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        try:
            tmp.mkdir(parents=True, exist_ok=keep)
        except OSError as e:  # a read-only or full disk, a file where a folder should be: name the destination
            raise type(e)(e.errno, f"{out}: cannot write the {what} there ({e.strerror})") from e
    sync(f"l4jax-atomic-start-{out.name}")
    try:
        yield tmp
        sync(f"l4jax-atomic-written-{out.name}")
        if primary:
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        sync(f"l4jax-atomic-done-{out.name}")
    except BaseException:
        if primary and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
