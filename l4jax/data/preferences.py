"""Preference data for DPO: JSONL pairs of answers -> token ids with response masks, packed a pair per group.

File format: one JSON object per line,

    {"prompt": messages, "chosen": answer, "rejected": answer, "tools": [...]}     ("tools" optional)

``prompt`` is a list of messages (or a string: one user message); an answer is a list of messages, one message,
or a string (one assistant message). Each of ``prompt + chosen`` and ``prompt + rejected`` is rendered with the
model's chat template like a conversation (``conversations.render``); only the answers' assistant turns are
response tokens (their ``<|eot|>`` included), never the prompt. Errors name the file and line: a missing or
malformed field, an unknown role, an empty assistant turn, an answer without an assistant turn, a rejected answer
equal to the chosen one.

Packing: a pair's two sequences share a row, the chosen then the rejected, each its own document (segment), so
pair p of a row is segments 2p + 1 (chosen) and 2p + 2 (rejected). ``PairedDataset.batch`` adds ``pairs`` [B, P],
1 where the row holds pair p (P: the most pairs any row holds). A pair longer than a row is dropped and counted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .conversations import (ConversationError, Example, Vision, check_message, jsonl_records, render,
                            tiles_of)
from .packing import PackedDataset
from .tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Pair:
    """The rendered ``prompt + chosen`` and ``prompt + rejected`` (weights: 1 on the answer's assistant tokens)."""

    chosen: Example
    rejected: Example
    where: str


def _messages(value: Any, field: str, where: str, role: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, list) and value:
        return list(value)
    raise ConversationError(f"{where}: '{field}' must be a string, a message or a non-empty list of messages, got "
                            f"{json.dumps(value)[:60]}")


def render_pair(tokenizer: Tokenizer, record: Any, where: str = "pair", vision: Vision | None = None) -> Pair:
    """One JSONL record -> ``Pair``; a bad record is a ``ConversationError`` naming ``where`` and the field."""
    if not isinstance(record, Mapping):
        raise ConversationError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    missing = [f for f in ("prompt", "chosen", "rejected") if f not in record]
    if missing:
        raise ConversationError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    prompt = _messages(record["prompt"], "prompt", where, "user")
    answers = {f: _messages(record[f], f, where, "assistant") for f in ("chosen", "rejected")}
    for f, messages in (("prompt", prompt), *answers.items()):
        for i, m in enumerate(messages):
            check_message(m, f"{where}: {f} message {i}")
    for f, answer in answers.items():
        if not any(m["role"] == "assistant" for m in answer):
            raise ConversationError(f"{where}: '{f}' holds no assistant turn: nothing to compare")
    if answers["chosen"] == answers["rejected"]:
        raise ConversationError(f"{where}: the rejected answer is the same as the chosen one")
    tools = record.get("tools")
    chosen, rejected = (render(tokenizer, prompt + answers[f], tools, f"{where} ({f})", from_message=len(prompt),
                               vision=vision) for f in ("chosen", "rejected"))
    if np.array_equal(chosen.ids, rejected.ids):
        raise ConversationError(f"{where}: the rejected answer renders to the same tokens as the chosen one")
    return Pair(chosen, rejected, where)


def read_jsonl(paths: Sequence[str | Path], tokenizer: Tokenizer, vision: Vision | None = None) -> list[Pair]:
    """Every pair of the JSONL files, rendered (images with ``vision``, relative paths from each file's folder); a
    bad line is an error naming the file and line."""
    return [render_pair(tokenizer, record, where, vision and vision.reading(path))
            for path, where, record in jsonl_records(paths)]


class PairedDataset(PackedDataset):
    """``PackedDataset`` of preference pairs, each pair's chosen and rejected side by side in one row."""

    def __init__(self, pairs: Sequence[Pair], seq_len: int, batch_size: int, seed: int = 0, *, pad_id: int = 0):
        examples = [e for p in pairs for e in (p.chosen, p.rejected)]
        super().__init__([e.ids for e in examples], seq_len, batch_size, seed, pad_id=pad_id,
                         docs_weights=[e.weights for e in examples], docs_pixels=tiles_of(examples),
                         groups=[[2 * i, 2 * i + 1] for i in range(len(pairs))])
        self.num_pairs = len(pairs)
        self._pairs = np.zeros(self._tokens.shape[0], np.int32)
        self._pairs[:self.rows] = [len(row) // 2 for row in self.layout]
        self.pairs_per_row = int(self._pairs.max())

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """``PackedDataset.batch`` and ``pairs`` [B, P] float32: 1 where row b holds pair p (its segments 2p + 1,
        chosen, and 2p + 2, rejected), 0 elsewhere."""
        out = super().batch(step)
        held = self._pairs[self.row_indices(step)]
        out["pairs"] = (np.arange(self.pairs_per_row)[None] < held[:, None]).astype(np.float32)
        return out


def pack(pairs: Sequence[Pair], seq_len: int, batch_size: int, seed: int = 0,
         pad_id: int = 0) -> tuple[PairedDataset, dict[str, int]]:
    """Pairs packed into rows of ``seq_len + 1`` tokens; a pair longer than a row is dropped. Returns the dataset
    and the counts: pairs given, used and dropped, tokens used and response tokens."""
    row_len = seq_len + 1
    keep = [p for p in pairs if len(p.chosen.ids) + len(p.rejected.ids) <= row_len]
    if not keep:
        raise ConversationError(f"every one of the {len(pairs)} preference pairs is longer than a row of {row_len} "
                                "tokens (a pair's chosen and rejected sequences share a row): raise seq_len")
    report = {"pairs": len(pairs), "used": len(keep), "dropped_too_long": len(pairs) - len(keep),
              "tokens": sum(len(p.chosen.ids) + len(p.rejected.ids) for p in keep),
              "loss_tokens": int(sum(p.chosen.weights.sum() + p.rejected.weights.sum() for p in keep))}
    return PairedDataset(keep, seq_len, batch_size, seed, pad_id=pad_id), report


def describe(report: Mapping[str, int], row_len: int) -> str:
    """The counts of ``pack`` as the one line ``l4jax train`` prints."""
    return (f"{report['used']} of {report['pairs']} preference pairs ({report['dropped_too_long']} longer than a row "
            f"of {row_len} dropped: a pair shares a row), {report['tokens']:,} tokens, {report['loss_tokens']:,} of "
            "them in the answers")
