"""Text side of inference: the HF ``tokenizer.json`` tokenizer and streaming decode (chat templates: ``chat``).

``Tokenizer`` wraps the ``tokenizers`` library (the same Rust tokenizer ``transformers`` uses), so ids match
``PreTrainedTokenizerFast`` exactly. Special tokens (ids from the reference's converter, for the real vocabulary):
200000 ``<|begin_of_text|>``, 200001 ``<|end_of_text|>``, 200005/200006 ``<|header_start|>``/``<|header_end|>``,
200007 ``<|eom|>``, 200008 ``<|eot|>``, 200018 ``<|finetune_right_pad|>`` (pad), 200090 ``<|image|>``,
200092 ``<|patch|>``. They are always looked up by string here, never hard-coded, so small test vocabularies work.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from . import chat
from .chat import chat_prompt  # noqa: F401  (the official template; kept importable from here)

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
EOM = "<|eom|>"        # end of message: the model expects a tool result next
EOT = "<|eot|>"        # end of turn
IMAGE = "<|image|>"    # one per image in the prompt; the vision processor expands it into tiles of <|patch|>

STOP_TOKENS = (EOT, EOM, END_OF_TEXT)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as {"content": ..., ...}."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _as_id_list(value: Any) -> list[int]:
    """An ``eos_token_id``-style field (absent, int, or list of ints) as a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


class Tokenizer:
    """A Llama 4 tokenizer folder: ``tokenizer.json`` plus, when present, ``tokenizer_config.json`` (bos / eos /
    pad tokens and added special tokens), ``generation_config.json`` and ``config.json`` (extra eos ids).

    ``path`` is the folder or the ``tokenizer.json`` file itself.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        folder, file = (path.parent, path) if path.is_file() else (path, path / "tokenizer.json")
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self.path = folder
        self._tok = tokenizers.Tokenizer.from_file(str(file))
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")
        self._register_added_tokens(tok_cfg, folder / "tokenizer_config.json")

        def config_ids(name: str) -> list[int]:
            # Multimodal config.json files keep the text ids under text_config.
            return (_as_id_list(gen_cfg.get(name)) + _as_id_list(model_cfg.get(name))
                    + _as_id_list((model_cfg.get("text_config") or {}).get(name)))

        def named_id(key: str) -> int | None:
            content = _token_content(tok_cfg.get(key))
            if content is None:
                return None
            try:
                return self.token_id(content)
            except KeyError:
                raise ValueError(f"{folder / 'tokenizer_config.json'}: {key} {content!r} is not in the vocabulary") \
                    from None

        bos = named_id("bos_token")
        if bos is None:
            bos = next(iter(config_ids("bos_token_id")), self._tok.token_to_id(BOS))
        self._bos_id = bos
        # The pad id follows the model's config (generate pads with config.pad_token_id): config.json (or its
        # text_config), then generation_config.json, and only then tokenizer_config.json's pad_token.
        pads = (_as_id_list(model_cfg.get("pad_token_id")) + _as_id_list((model_cfg.get("text_config") or {})
                .get("pad_token_id")) + _as_id_list(gen_cfg.get("pad_token_id")))
        self._pad_id = pads[0] if pads else named_id("pad_token")
        eos = named_id("eos_token")
        eos_ids = ([] if eos is None else [eos]) + config_ids("eos_token_id")
        self._eos_ids = tuple(dict.fromkeys(eos_ids))       # de-duplicated, first mention first
        # The special-token strings a chat template sees (bos_token, eos_token, ...), as transformers passes them.
        self._template_tokens = {k: _token_content(tok_cfg[k]) for k in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token") if tok_cfg.get(k) is not None}
        self._template_tokens.setdefault("bos_token", self._tok.id_to_token(bos) if bos is not None else BOS)

    def _register_added_tokens(self, tok_cfg: Mapping[str, Any], where: Path) -> None:
        """Add tokens that tokenizer_config.json declares but tokenizer.json lacks, and check the declared ids.

        A declared id that disagrees with tokenizer.json means the two files come from different vocabularies; the
        ids would silently be wrong, so that is an error.
        """
        for id_str, spec in tok_cfg.get("added_tokens_decoder", {}).items():
            content, declared = spec["content"], int(id_str)
            if self._tok.token_to_id(content) is None:
                special = spec.get("special", True)
                token = tokenizers.AddedToken(
                    content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", not special), special=special)
                (self._tok.add_special_tokens if special else self._tok.add_tokens)([token])
            actual = self._tok.token_to_id(content)
            if actual != declared:
                raise ValueError(f"{where}: added token {content!r} is declared as id {declared} but tokenizer.json "
                                 f"gives it id {actual}")
        extra = [_token_content(t) for t in tok_cfg.get("additional_special_tokens", [])]
        missing = [t for t in extra if t is not None and self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)

    # -- ids ------------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding table may be larger: it is padded)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """``<|begin_of_text|>`` (or whatever the folder declares as bos_token), None if there is none."""
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every eos id the folder declares: tokenizer_config's eos_token, then generation_config / config ids."""
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        """The config's ``pad_token_id`` (config.json, its text_config, then generation_config.json), as
        ``generate`` and the model use it; else tokenizer_config's pad_token (``<|finetune_right_pad|>``, 200018
        for Llama 4, in both)."""
        return self._pad_id

    def token_id(self, token: str) -> int:
        """The id of one token string, e.g. ``token_id("<|eot|>")``."""
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.path}")
        return token_id

    def stop_ids(self) -> tuple[int, ...]:
        """Ids of ``<|eot|>``, ``<|eom|>`` and ``<|end_of_text|>``, those the vocabulary has, in that order.

        These end a generated turn whatever the folder's eos settings say; combine with ``eos_ids`` if needed.
        """
        ids = (self._tok.token_to_id(t) for t in STOP_TOKENS)
        return tuple(i for i in ids if i is not None)

    # -- chat ---------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _chat_template(self) -> tuple[str, str]:
        # Read on first use (a folder's broken template file fails only chat calls) and kept: chat data render
        # every conversation several times.
        return chat.folder_template(self.path) or (chat.official_template(), f"the official template ({chat.OFFICIAL})")

    def chat_template(self) -> tuple[str, str]:
        """(template text, its source): the folder's own template (``chat.folder_template``), else the official
        Llama 4 template shipped with l4jax."""
        return self._chat_template

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """Render ``messages`` (and ``tools``) with this folder's chat template, as transformers'
        ``apply_chat_template(..., tokenize=False)`` does; ``encode`` the result (it starts with BOS)."""
        template, source = self._chat_template
        return chat.render(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           source=source, **self._template_tokens)

    # -- text <-> ids ---------------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids. Special-token strings in the text (``<|eot|>``...) become their single ids.

        With ``add_bos`` the BOS id is prepended, unless the text already starts with ``<|begin_of_text|>``: a
        rendered ``chat_prompt`` does, and a doubled BOS silently degrades the model. The tokenizer.json
        post-processor is not used, so BOS is added exactly once whichever way the folder was exported.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self._bos_id is None:
                raise ValueError(f"{self.path} declares no BOS token; call encode(..., add_bos=False)")
            if not ids or ids[0] != self._bos_id:
                ids = [self._bos_id, *ids]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Text -> (ids, [start, stop) character span of each id in ``text``), with no BOS added: for rendered
        chat prompts, which carry their own, and for telling which tokens came from which part of the text."""
        if not isinstance(text, str):
            raise TypeError(f"encode_with_offsets expects a str, got {type(text).__name__}")
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """ids [T] (list, numpy or jax array) -> text. Bytes that do not form valid UTF-8 come out as U+FFFD."""
        ids = np.asarray(ids if hasattr(ids, "shape") else list(ids), dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"decode expects one sequence of ids [T], got shape {ids.shape}")
        return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Streams text while tokens arrive: ``push(id)`` returns only the newly completed text.

    Byte-level BPE tokens can end in the middle of a UTF-8 character (日 is three bytes and may span two
    tokens). Decoding such a prefix gives a trailing U+FFFD; ``push`` then returns "" and holds those tokens back
    until the character is complete. So the pieces never contain a half character, and their concatenation
    (plus ``flush()`` at the end) equals ``tokenizer.decode(all ids)``.

    Each push decodes only the tokens since the previous emitted boundary, with one earlier chunk kept as
    context (decoders that treat a sequence's first token specially, e.g. dropping a leading space, then still
    see it mid-text), so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0          # first id of the decode window (context)
        self._done = 0           # ids before this index are fully emitted
        self._prefix = ""        # decode(ids[start:done]): the part of the window already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids[self._start:])
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Text of the held-back tail (invalid bytes come out as U+FFFD); call once the stream has ended."""
        if self._done == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids[self._start:]))

    def _advance(self, text: str) -> str:
        """Emit ``text`` (the decoded window) past the already emitted prefix; the window moves up one chunk."""
        new = text[len(self._prefix):]
        self._start, self._done = self._done, len(self._ids)
        # Decoded on its own, as the next window will see it (not sliced from text), so the next diff lines up.
        self._prefix = self._decode(self._ids[self._start:self._done])
        return new
