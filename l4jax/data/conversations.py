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

Images: an image part (``{"type": "image", "image" | "path" | "url": local path}``, a relative path read from the
JSONL file's folder) renders as ``<|image|>``, which becomes the image's tokens (``images.image_tokens``: one
``<|patch|>`` per feature row of its tiles), none of them in the loss; the example carries the tiles (``pixels``
[n, 3, S, S]). A model without a vision tower refuses them, naming the file and line.

A conversation longer than a training row is dropped (counted), or with ``too_long="split"`` cut at message
boundaries into pieces that each fit a row (each its own document; pieces with no assistant token are left out). A
single message longer than a row is then cut inside it, and counted. A conversation with images is never split
(its tiles go with the whole): too long, it is dropped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .chat import ChatTemplateError
from .images import PATCH, ImageError, ImageProcessor, image_tokens, message_images
from .packing import PackedDataset
from .tokenizer import IMAGE, Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")


class ConversationError(ValueError):
    """A conversation that cannot be trained on; the message names the file and line (or the index)."""


TOO_LONG = ("drop", "split")


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered conversation: ``ids`` [N] int32 and ``weights`` [N] float32, 1 on the tokens the model must
    learn to produce (assistant turns), 0 elsewhere; ``turns``: the token index where each message after the first
    starts (its header); ``where`` names its origin."""

    ids: np.ndarray
    weights: np.ndarray
    where: str
    turns: tuple[int, ...] = ()
    pixels: np.ndarray | None = None  # [n, 3, S, S] the tiles of its images, in order (None: no image)


@dataclasses.dataclass(frozen=True)
class Vision:
    """What rendering images needs from the model: its tile maker and ``<|patch|>`` tokens per tile.
    ``root``: the folder relative image paths are read from."""

    processor: ImageProcessor
    tokens_per_tile: int
    root: Path | None = None

    @classmethod
    def for_model(cls, config, folder: str | Path | None) -> "Vision | None":
        """From a ``Llama4Config`` (None without a vision tower) and the folder with its preprocessor_config.json."""
        if config.vision is None:
            return None
        tile = config.vision.image_size
        processor = ImageProcessor.from_folder(folder, tile) if folder else ImageProcessor(tile=tile)
        return cls(processor, config.vision.tokens_per_tile)

    def reading(self, jsonl: Path) -> "Vision":
        """This, with relative image paths read from the folder of the data file ``jsonl``."""
        return dataclasses.replace(self, root=jsonl.parent)


def check_message(m: Any, where: str) -> None:
    """A message has a known role, and an assistant message says something; ``where`` names it in the error."""
    if not isinstance(m, Mapping) or m.get("role") not in ROLES:
        role = m.get("role") if isinstance(m, Mapping) else None
        raise ConversationError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"):
        raise ConversationError(f"{where}: an empty assistant turn (no content, no tool_calls)")


def _check(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        check_message(m, f"{where}: message {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}: no assistant turn: nothing to learn from this conversation")


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools=None,
                    where: str = "conversation", from_message: int = 0
                    ) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(the rendered conversation, the [start, stop) character spans of its assistant turns from message
    ``from_message`` on, the character offset where each message after the first starts)."""
    _check(messages, where)

    def prefix(n: int, generation: bool) -> str:
        head = tokenizer.chat_prompt(messages[:n], add_generation_prompt=generation, tools=tools)
        if not text.startswith(head):
            raise ConversationError(f"{where}: message {n}: the chat template does not render this conversation's "
                                    "prefixes as prefixes of the whole, so its turns cannot be found")
        return head

    try:
        text = tokenizer.chat_prompt(messages, add_generation_prompt=False, tools=tools)
        spans, starts = [], [len(prefix(i, False)) for i in range(1, len(messages))]
        ends = starts + [len(text)]  # message i ends where message i + 1 starts
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < from_message:
                continue
            if i == 0:
                raise ConversationError(f"{where}: message 0: an assistant turn cannot open the conversation")
            spans.append((len(prefix(i, True)), ends[i]))
    except ChatTemplateError as e:
        raise ConversationError(f"{where}: {e}") from None
    return text, spans, starts


def render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools=None,
           where: str = "conversation", from_message: int = 0, vision: Vision | None = None) -> Example:
    """One conversation -> ``Example``: its ids (BOS first, from the template) and the assistant-only weights
    (only the assistant turns from message ``from_message`` on: a preference pair's answers, not its prompt);
    image parts need ``vision`` (the model's)."""
    text, spans, turn_chars = assistant_spans(tokenizer, messages, tools, where, from_message)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([start for start, _ in offsets])
    weights = np.zeros(len(ids), np.float32)
    for lo, hi in spans:
        weights[(starts >= lo) & (starts < hi)] = 1.0
    turns = tuple(int(np.searchsorted(starts, c)) for c in turn_chars)
    example = Example(np.asarray(ids, np.int32), weights, where, turns)
    try:
        sources = message_images(messages)
    except ValueError as e:
        raise ConversationError(f"{where}: {e}") from None
    example = _with_images(tokenizer, example, sources, vision) if sources else example
    if vision is not None:
        # Patch tokens come only from image parts: one typed into a message would take an image feature that is
        # not there (or another image's).
        expected = 0 if example.pixels is None else len(example.pixels) * vision.tokens_per_tile
        if int((example.ids == tokenizer.token_id(PATCH)).sum()) != expected:
            raise ConversationError(f"{where}: {PATCH} typed into a message: image tokens come only from image "
                                    "parts")
    return example


def _with_images(tokenizer: Tokenizer, ex: Example, sources: list, vision: Vision | None) -> Example:
    """Each ``<|image|>`` token of ``ex`` replaced by its image's tokens (weights 0), and the tiles attached."""
    if vision is None:
        raise ConversationError(f"{ex.where}: the conversation has images but the model has no vision tower")
    image_id = tokenizer.token_id(IMAGE)
    at = np.flatnonzero(ex.ids == image_id)
    if len(at) != len(sources):
        raise ConversationError(f"{ex.where}: {len(sources)} image part(s) but {len(at)} {IMAGE} in the rendered "
                                "text (is there an <|image|> typed into a message?)")
    paths = [vision.root / s if vision.root and isinstance(s, str) and not Path(s).is_absolute() else s
             for s in sources]
    try:
        pixels, grids = vision.processor(paths)
    except (ImageError, OSError) as e:
        raise ConversationError(f"{ex.where}: {e}") from None
    ids, weights, new_at = [], [], np.zeros(len(ex.ids) + 1, np.int64)  # new_at[i]: old token i's new index
    prev = 0
    for k, i in enumerate(at):
        ids.append(ex.ids[prev:i])
        weights.append(ex.weights[prev:i])
        block = tokenizer.encode(image_tokens(*grids[k], vision.tokens_per_tile), add_bos=False)
        ids.append(np.asarray(block, np.int32))
        weights.append(np.zeros(len(block), np.float32))
        prev = i + 1
    ids.append(ex.ids[prev:])
    weights.append(ex.weights[prev:])
    sizes = np.ones(len(ex.ids), np.int64)
    sizes[at] = [len(w) for w in weights[1:-1:2]]
    new_at[1:] = np.cumsum(sizes)
    return Example(np.concatenate(ids), np.concatenate(weights), ex.where, tuple(int(new_at[t]) for t in ex.turns),
                   pixels)


def jsonl_records(paths: Sequence[str | Path]) -> Iterator[tuple[Path, str, Any]]:
    """(file, "file:line", parsed object) of every non-blank line of the JSONL files; broken JSON is an error
    naming the file and line."""
    for path in map(Path, paths):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield path, where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversationError(f"{where}: not JSON ({e.msg}, column {e.colno})") from None


def read_jsonl(paths: Sequence[str | Path], tokenizer: Tokenizer, vision: Vision | None = None) -> list[Example]:
    """Every conversation of the JSONL files, rendered (images with ``vision``, relative paths from each file's
    folder); a bad line is an error naming the file and line."""
    out = []
    for path, where, record in jsonl_records(paths):
        if not isinstance(record, Mapping) or "messages" not in record:
            raise ConversationError(f"{where}: expected an object with a 'messages' list")
        out.append(render(tokenizer, record["messages"], record.get("tools"), where,
                          vision=vision and vision.reading(path)))
    return out


def split(example: Example, row_len: int) -> tuple[list[Example], bool]:
    """``example`` cut at message starts into pieces of at most ``row_len`` tokens, each as long as it can be;
    a message longer than a row is cut inside (the bool says so). Pieces without an assistant token are left out."""
    cuts, at, inside = [], 0, False
    n = len(example.ids)
    while at < n:
        if n - at <= row_len:
            stop = n
        else:
            fit = [t for t in example.turns if at < t <= at + row_len]
            stop = fit[-1] if fit else at + row_len
            inside |= not fit
        cuts.append((at, stop))
        at = stop
    pieces = [Example(example.ids[a:b], example.weights[a:b], f"{example.where} [tokens {a}:{b}]",
                      tuple(t - a for t in example.turns if a < t < b))
              for a, b in cuts if example.weights[a + 1:b].any()]  # the first token of a piece is never a target
    return pieces, inside


def pack(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int = 0, pad_id: int = 0,
         too_long: str = "drop") -> tuple[PackedDataset, dict[str, int]]:
    """Conversations packed whole into rows of ``seq_len + 1`` tokens (document masks keep them apart), with
    assistant-only loss weights; a conversation longer than a row is dropped, or with ``too_long="split"`` split at
    message boundaries (``split``). Returns the dataset and the counts: conversations given, used, split (and of
    those cut inside a message) and dropped, tokens used and those in the loss."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long: expected one of {', '.join(TOO_LONG)}, got {too_long!r}")
    row_len = seq_len + 1
    keep, n_split, n_inside, dropped = [], 0, 0, 0
    for e in examples:
        if len(e.ids) <= row_len:
            keep.append(e)
        elif too_long == "split" and e.pixels is None:  # (a conversation's images go with it whole)
            pieces, inside = split(e, row_len)
            keep += pieces
            n_split += 1
            n_inside += inside
        else:
            dropped += 1
    if not keep:
        raise ConversationError(f"every one of the {len(examples)} conversations is longer than a row of "
                                f"{row_len} tokens: raise seq_len (or split them: too_long: split)")
    report = {"conversations": len(examples), "used": len(examples) - dropped, "split": n_split,
              "cut_inside_a_message": n_inside, "dropped_too_long": dropped,
              "tokens": sum(len(e.ids) for e in keep), "loss_tokens": int(sum(e.weights.sum() for e in keep))}
    ds = PackedDataset([e.ids for e in keep], seq_len, batch_size, seed, pad_id=pad_id,
                       docs_weights=[e.weights for e in keep], docs_pixels=tiles_of(keep))
    return ds, report


def tiles_of(examples: Sequence[Example]) -> list[np.ndarray | None] | None:
    """Each example's tiles for ``PackedDataset(docs_pixels=...)``; None when no example has an image."""
    return [e.pixels for e in examples] if any(e.pixels is not None for e in examples) else None


def describe(report: Mapping[str, int], row_len: int) -> str:
    """The counts of ``pack`` as the one line ``l4jax train`` prints."""
    text = (f"{report['used']} of {report['conversations']} conversations "
            f"({report['dropped_too_long']} longer than a row of {row_len} dropped")
    if report["split"]:
        text += (f", {report['split']} split at message boundaries, {report['cut_inside_a_message']} of them inside "
                 "a message too long for a row")
    return (text + f"), {report['tokens']:,} tokens, {report['loss_tokens']:,} of them in the loss "
            "(assistant turns)")
