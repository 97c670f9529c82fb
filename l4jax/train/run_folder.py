"""The output folder of a training run: what a run writes there, and the checks that it never overwrites anything
else.

    out/l4jax-run.json        written first: this folder belongs to an l4jax training run
    out/checkpoints/<step>/   Orbax train states
    out/metrics.jsonl         one JSON object per logged step
    out/model/                the final weights (an l4jax checkpoint), written atomically at the end
    out/adapters/             LoRA runs only: the adapters alone, written atomically at the end
    out/hf/                   with --export-hf: the model (adapters merged) as a Hugging Face folder
    out/peft/                 with --export-hf, LoRA runs on attention only: the adapters in the PEFT layout

A new run takes only a folder that is new or empty. ``--resume`` takes only a folder some run marked, holding
nothing but the names above (a leftover ``.model.partial`` of a killed export included), with ``model/`` and
``adapters/`` in their own formats. Nothing is written before these checks pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import l4jax_format
from . import lora_files, peft_files

MARKER = "l4jax-run.json"
EXPORTS = ("model", "adapters", "hf", "peft")  # written beside their place and renamed in (leftovers: .<name>.partial)
WRITTEN = ("checkpoints", "metrics.jsonl", *EXPORTS, MARKER)


class RunFolderError(RuntimeError):
    """The output folder holds something this run did not write; the message names it and says what to do."""


def _inside(path: str | Path, folder: Path) -> bool:
    path = Path(path).absolute()
    return path == folder or folder in path.parents


def _foreign(out: Path) -> Path | None:
    """The first entry of a run folder that no run writes, or that is not in its writer's format."""
    for entry in sorted(out.iterdir()):
        name = entry.name
        leftover = name.startswith(".") and name.endswith((".partial", ".old")) and name[1:].rsplit(".", 1)[0] in \
            EXPORTS
        if name not in WRITTEN and not leftover:
            return entry
        if name == "model" and not l4jax_format.is_checkpoint(entry):
            return entry
        if name == "adapters" and not (entry / lora_files.MANIFEST).is_file():
            return entry
        if name == "hf" and not (entry / "config.json").is_file():
            return entry
        if name == "peft" and not (entry / peft_files.CONFIG).is_file():
            return entry
    return None


def claim(out: str | Path, *, resume: bool, inputs: dict[str, str | None], description: dict) -> Path:
    """Check that ``out`` may take this run's files, then mark it; returns it as an absolute path.

    ``inputs``: the folders the run reads, by flag (``--init-from``, ``--teacher``): none may lie inside ``out``,
    whose ``model/`` the run replaces. ``description``: what the marker records about the run.
    """
    out = Path(out).absolute()
    for flag, path in inputs.items():
        if path is not None and _inside(path, out):
            raise RunFolderError(f"{flag} {path} lies inside --out {out}, which this run writes into (its model/ is "
                                 "replaced at the end); choose another --out")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries and not resume:
        why = ("holds an earlier run (pass --resume to continue it)" if MARKER in entries
               else f"is not empty (it holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
        raise RunFolderError(f"{out}: {why}; a new run writes only into a new or empty folder: choose another --out")
    if entries:
        if MARKER not in entries:
            raise RunFolderError(f"{out}: not an l4jax training run (no {MARKER}); --resume continues only a run "
                                 "that l4jax train wrote: choose another --out")
        foreign = _foreign(out)
        if foreign is not None:
            raise RunFolderError(f"{foreign}: not written by l4jax train, and resuming would write beside or over "
                                 "it; move it out of the run folder or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():  # a resumed run keeps the mark of the run that made the folder
        (out / MARKER).write_text(json.dumps({"format": "l4jax-run", "version": 1, **description}, indent=1))
    return out
