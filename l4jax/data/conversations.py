"""Chat data for fine-tuning: JSONL conversations -> token ids with a loss mask over the assistant turns only.

A conversation is rendered with the model folder's chat template (``Tokenizer.chat_prompt``), then tokenized
once, whole. What counts as an assistant turn is found from the template itself: the text assistant message i
adds is ``render(messages[:i + 1]) - render(messages[:i], add_generation_prompt=True)``, i.e. its content, its
tool calls and its closing ``<|eot|>`` (or ``<|eom|>``), but not the ``<|header_start|>assistant<|header_end|>``
that the prompt already holds. A token is in the loss when its first character lies in such a span. This works
for every template that renders a conversation's prefixes as prefixes of the whole (the Llama 4 one does); one
that does not is refused, naming the message.

File format: one JSON object per line, ``{"messages": [...]}`` (roles and parts as ``l4jax.data.chat``
describes; ``"tools": [...]`` optional). Errors and skips name the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chat import ChatTemplateError
from .packing import PackedDataset
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")


class ConversationError(ValueError):
    """A conversation that cannot be trained on; the message names the file and line (or the index)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered conversation: ``ids`` [N] int32 and ``weights`` [N] float32, 1 on the tokens the model must
    learn to produce (assistant turns), 0 elsewhere; ``where`` names its origin."""

    ids: np.ndarray
    weights: np.ndarray
    where: str


def _check(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, Mapping) else None
            raise ConversationError(f"{where}: message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"):
            raise ConversationError(f"{where}: message {i}: an empty assistant turn (no content, no tool_calls)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}: no assistant turn: nothing to learn from this conversation")


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools=None,
                    where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the [start, stop) character spans of its assistant turns)."""
    _check(messages, where)
    try:
        text = tokenizer.chat_prompt(messages, add_generation_prompt=False, tools=tools)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ConversationError(f"{where}: message 0: an assistant turn cannot open the conversation")
            before = tokenizer.chat_prompt(messages[:i], add_generation_prompt=True, tools=tools)
            upto = tokenizer.chat_prompt(messages[:i + 1], add_generation_prompt=False, tools=tools)
            if not upto.startswith(before) or not text.startswith(upto):
                raise ConversationError(f"{where}: message {i}: the chat template does not render this conversation's "
                                        "prefixes as prefixes of the whole, so its assistant turns cannot be found")
            spans.append((len(before), len(upto)))
    except ChatTemplateError as e:
        raise ConversationError(f"{where}: {e}") from None
    return text, spans


def render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools=None,
           where: str = "conversation") -> Example:
    """One conversation -> ``Example``: its ids (BOS first, from the template) and the assistant-only weights."""
    text, spans = assistant_spans(tokenizer, messages, tools, where)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([start for start, _ in offsets])
    weights = np.zeros(len(ids), np.float32)
    for lo, hi in spans:
        weights[(starts >= lo) & (starts < hi)] = 1.0
    return Example(np.asarray(ids, np.int32), weights, where)


def read_jsonl(paths: Sequence[str | Path], tokenizer: Tokenizer) -> list[Example]:
    """Every conversation of the JSONL files, rendered; a bad line is an error naming the file and line."""
    out = []
    for path in map(Path, paths):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversationError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, Mapping) or "messages" not in record:
                raise ConversationError(f"{where}: expected an object with a 'messages' list")
            out.append(render(tokenizer, record["messages"], record.get("tools"), where))
    return out


def pack(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int = 0,
         pad_id: int = 0) -> tuple[PackedDataset, dict[str, int]]:
    """Conversations packed whole into rows of ``seq_len + 1`` tokens (document masks keep them apart), with
    assistant-only loss weights; a conversation longer than a row is dropped and counted. Returns the dataset and
    the counts: conversations given, used and dropped, tokens used and those in the loss."""
    keep = [e for e in examples if len(e.ids) <= seq_len + 1]
    if not keep:
        raise ConversationError(f"every one of the {len(examples)} conversations is longer than a row of "
                                f"{seq_len + 1} tokens: raise seq_len")
    report = {"conversations": len(examples), "used": len(keep), "dropped_too_long": len(examples) - len(keep),
              "tokens": sum(len(e.ids) for e in keep), "loss_tokens": int(sum(e.weights.sum() for e in keep))}
    ds = PackedDataset([e.ids for e in keep], seq_len, batch_size, seed, pad_id=pad_id,
                       docs_weights=[e.weights for e in keep])
    return ds, report
