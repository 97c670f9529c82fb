"""Training checkpoints: an Orbax ``CheckpointManager`` holding the train state and a JSON description of the run.

Saves are asynchronous (training goes on while the arrays are written) and atomic: Orbax writes each step into a
temporary folder and renames it once complete, so a process killed mid-save leaves the previous step as the
latest restorable one. Restoring takes the target's shardings, so a state saved on one mesh restores onto another.
Every array's checksum is stored in the step's description and checked on restore, so damaged bytes are named
(``CheckpointDamaged``) instead of resuming from garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from . import checksum
from .l4jax_format import first_line


class CheckpointMismatch(ValueError):
    """A checkpoint was written for another model or another training setup; the message says what differs."""


class CheckpointDamaged(ValueError):
    """A stored step cannot be read back as it was written; the message names the step and the array."""


class Checkpoints:
    def __init__(self, directory: str | Path, *, save_every: int, keep: int, use_async: bool = True):
        # Newer Orbax refuses relative paths.
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                               enable_async_checkpointing=use_async)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start saving ``state`` (arrays, any sharding) as step ``step`` if the interval says so (or ``force``)."""
        if not (force or self._mngr.should_save(step)):
            return False
        meta = {**meta, "checksums": checksum.of_tree(state)}
        try:
            return self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # a full disk or an I/O error (an async save reports the previous step's here)
            raise OSError(f"{self.directory}: saving step {step} failed: {first_line(e)}") from e

    def latest(self) -> int | None:
        return self._mngr.latest_step()

    def steps(self) -> list[int]:
        """The stored steps, newest first."""
        return sorted(self._mngr.all_steps(), reverse=True)

    def meta(self, step: int) -> dict:
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: Any, expect: dict) -> Any:
        """The state of ``step`` laid out as ``target`` (ShapeDtypeStructs with shardings), after checking that the
        stored description matches ``expect`` on every key they share."""
        meta = self.meta(step)
        diffs = describe_differences(meta, expect)
        if diffs:
            raise CheckpointMismatch(f"{self.directory} step {step} was written for a different run: "
                                     + "; ".join(diffs))
        try:
            state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # noqa: BLE001 - TensorStore reports unreadable bytes as a bare Exception
            first = first_line(e)
            if isinstance(e, (ValueError, KeyError)) and "TensorStore" not in str(e):
                raise CheckpointMismatch(f"{self.directory} step {step}: the stored state does not fit this model: "
                                         f"{e}") from e
            raise CheckpointDamaged(f"{self.directory} step {step}: unreadable (damaged?): {first}") from e
        stored = meta.get("checksums", {})
        bad = [n for n, c in checksum.of_tree(state).items() if n in stored and stored[n] != c]
        if bad:
            raise CheckpointDamaged(f"{self.directory} step {step}: damaged: {bad[0]} no longer matches the checksum "
                                    f"written with it" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        return state

    def wait(self) -> None:
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # an async save that failed (a full disk, an I/O error)
            raise OSError(f"{self.directory}: saving a checkpoint failed: {first_line(e)}") from e

    def close(self) -> None:
        self._mngr.close()


def describe_differences(stored: dict, expected: dict, prefix: str = "") -> list[str]:
    """'field: checkpoint X, now Y' for every leaf that differs between two nested dicts, on the keys they share
    (a field added to or dropped from the description between versions is not a mismatch)."""
    out = []
    for k in sorted(set(stored) & set(expected)):
        a, b = stored[k], expected[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_differences(a, b, f"{prefix}{k}.")
        elif _norm(a) != _norm(b):
            out.append(f"{prefix}{k}: checkpoint {a!r}, now {b!r}")
    return out


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v
