"""Training data: text files -> documents -> token ids -> packed fixed-length rows with document masks.

The shipped public-domain corpus and its tokenizer are in ``corpus.py`` (and the ``corpus/`` folder).

File format: UTF-8 text; documents are separated by a line holding only a form feed (``\\f``, the ASCII page break,
which prose never contains, unlike runs of blank lines that plays and fairy tales use inside a story). A file
without such a line is one document.

Packing: each document becomes ``[bos] + ids + [<|end_of_text|>]``; documents are packed whole, best fit, into
rows of ``seq_len + 1`` tokens (a row gives ``seq_len`` inputs and the same ``seq_len`` targets shifted by one). A
document longer than a row is cut into row-sized pieces, each its own segment. ``PackedDataset.batch(step)``
depends only on (data, seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .tokenizer import END_OF_TEXT, Tokenizer

_SEPARATOR = re.compile(r"^[ \t]*\f[ \t]*$", re.MULTILINE)


# -- text ---------------------------------------------------------------------------------------------------------
def _expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths with each directory replaced by its ``*.txt`` files (sorted); a missing path is an error."""
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a sequence of paths, got the single path {paths!r}; wrap it in a list")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no *.txt files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Documents of UTF-8 text files, in file order then order within each file.

    Documents are separated by a line holding only a form feed (spaces or tabs around it allowed). Line endings
    are normalised to ``\\n``, a leading byte-order mark is dropped, each document loses its leading blank lines
    and trailing whitespace, and documents left empty are skipped. A directory stands for its ``*.txt`` files, sorted.
    """
    files = _expand(paths)
    if not files:
        raise ValueError("paths is empty: give at least one text file")
    docs = []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise OSError(f"{f}: cannot read ({e.strerror or e})") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text (invalid byte {raw[e.start]:#04x} at offset {e.start})") from e
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        for doc in _SEPARATOR.split(text):
            # Only whole blank lines are trimmed: indentation on the first line is part of the text.
            doc = re.sub(r"^(?:[ \t]*\n)+", "", doc).rstrip()
            if doc:
                docs.append(doc)
    if not docs:
        raise ValueError(f"no documents in {', '.join(map(str, files))}: every file is empty or blank")
    return docs


def tokenize(docs: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each document -> int32 ids [n] = [bos] + ids + [end].

    ``end`` is ``<|end_of_text|>`` when the vocabulary has it, else the tokenizer's first eos id: a Llama 4
    *instruct* folder declares ``<|eot|>`` as its eos (the end of a chat turn), but a document boundary in
    pretraining-style packing is ``<|end_of_text|>``. Special-token strings inside the text (``<|eot|>``...) become
    their single ids, as in ``Tokenizer.encode``.
    """
    if isinstance(docs, str):
        raise TypeError("docs must be a sequence of documents, got a single str; wrap it in a list")
    bos, eos = tokenizer.bos_id, tokenizer.eos_ids
    try:
        end = tokenizer.token_id(END_OF_TEXT)
    except KeyError:
        end = eos[0] if eos else None
    if bos is None or end is None:
        raise ValueError(f"tokenizer {tokenizer.path} declares no {'bos' if bos is None else 'eos'} token; "
                         "packing needs both to mark document boundaries")
    out = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise TypeError(f"docs[{i}] must be a str, got {type(doc).__name__}")
        out.append(np.asarray([bos, *tokenizer.encode(doc, add_bos=False), end], np.int32))
    return out


# -- packing ------------------------------------------------------------------------------------------------------
def _pieces(docs_tokens: Sequence[np.ndarray], row_len: int) -> list[tuple[int, int, int]]:
    """(doc, start, stop) pieces of at most row_len tokens each, after validating every document."""
    pieces = []
    for d, toks in enumerate(docs_tokens):
        toks = np.asarray(toks)
        if toks.ndim != 1 or not np.issubdtype(toks.dtype, np.integer):
            raise ValueError(f"docs_tokens[{d}] must be a 1-D integer array, got {toks.dtype} of shape {toks.shape}")
        if toks.size == 0:
            raise ValueError(f"docs_tokens[{d}] is empty")
        pieces += [(d, s, min(s + row_len, toks.size)) for s in range(0, toks.size, row_len)]
    return pieces


def _best_fit(sizes: Sequence[int], row_len: int) -> list[list[int]]:
    """Best-fit decreasing: longest item first, each into the open row it fills most tightly; returns each row's
    item indices.

    Keeps padding low (a few percent on the shipped corpus) where first-come packing would waste the end of most
    rows. Ties break by item order, so the layout is deterministic.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []      # (free slots, row index) of rows with room left, sorted
    for i in order:
        n = sizes[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


class PackedDataset:
    """Documents packed into rows of ``seq_len + 1`` tokens, served as shuffled batches.

    ``docs_tokens``: 1-D integer arrays, one per document (``tokenize`` output). ``batch(step)`` returns
    ``batch_size`` rows; epoch e = step // steps_per_epoch visits every row once in the order of a permutation
    seeded by (seed, e). The row count is rounded up to a multiple of batch_size with empty rows (all padding,
    zero loss), so one epoch covers every document token exactly once.

    Attributes: ``rows`` (packed rows holding data, also ``len(ds)``), ``steps_per_epoch`` (ceil(rows / B)),
    ``num_tokens`` (document tokens, bos / eos included), ``layout``: ``layout[r]`` lists the (doc, start, stop)
    pieces of packed row r in order, segment k + 1 of the row holding ``docs_tokens[doc][start:stop]``.
    ``pad_id`` fills the padding slots (masked out of the loss whatever its value). ``docs_weights`` (optional, one
    float array per document, like its tokens): each token's weight as a target, e.g. 1 on assistant turns and 0
    elsewhere for chat data (``conversations``); the loss mask is then that weight where the target is in the same
    piece. ``groups`` (optional): lists of document indices that must share a row, side by side in that order
    (a preference pair: its chosen then its rejected answer); every document in one group, each whole.
    ``docs_pixels`` (optional, one entry per document: its images' tiles [n, 3, S, S] in order, or None): a row's
    tiles are its documents' in row order, and ``batch`` adds ``pixels`` [B, K, 3, S, S] (K: the most tiles of any
    row; unused slots zero). A document with tiles is never cut (it must fit a row).
    """

    def __init__(self, docs_tokens: Sequence[np.ndarray], seq_len: int, batch_size: int, seed: int = 0, *,
                 pad_id: int = 0, docs_weights: Sequence[np.ndarray] | None = None,
                 groups: Sequence[Sequence[int]] | None = None,
                 docs_pixels: Sequence[np.ndarray | None] | None = None):
        for name, value, least in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if len(docs_tokens) == 0:
            raise ValueError("docs_tokens is empty: the corpus has no documents")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        row_len = self.seq_len + 1
        pieces = _pieces(docs_tokens, row_len)
        if groups is None:
            units = [[p] for p in pieces]
        else:
            whole = {p[0]: p for p in pieces if p[1] == 0 and p[2] == len(docs_tokens[p[0]])}
            if sorted(d for g in groups for d in g) != list(range(len(docs_tokens))):
                raise ValueError("groups: every document must be in exactly one group")
            if any(d not in whole for g in groups for d in g) or any(
                    sum(whole[d][2] for d in g) > row_len for g in groups):
                raise ValueError(f"groups: a group is longer than a row of {row_len} tokens")
            units = [[whole[d] for d in g] for g in groups]
        sizes = [sum(p[2] - p[1] for p in unit) for unit in units]
        # Within a row: groups by their first piece, in document order; a group's pieces in its own order.
        self.layout = [[p for u in sorted(row, key=lambda u: units[u][0]) for p in units[u]]
                       for row in _best_fit(sizes, row_len)]
        self.rows = len(self.layout)
        self.steps_per_epoch = -(-self.rows // self.batch_size)
        slots = self.steps_per_epoch * self.batch_size
        # Token, segment and position of every slot of every row, built once; batches only gather rows.
        self._tokens = np.full((slots, row_len), pad_id, np.int32)
        self._segments = np.zeros((slots, row_len), np.int32)
        self._positions = np.zeros((slots, row_len), np.int32)
        self._weights = None if docs_weights is None else np.zeros((slots, row_len), np.float32)
        if docs_weights is not None and [len(w) for w in docs_weights] != [len(t) for t in docs_tokens]:
            raise ValueError("docs_weights: one weight per token of each document expected")
        for r, row in enumerate(self.layout):
            at = 0
            for k, (d, start, stop) in enumerate(row):
                n = stop - start
                self._tokens[r, at:at + n] = np.asarray(docs_tokens[d])[start:stop]
                self._segments[r, at:at + n] = k + 1
                self._positions[r, at:at + n] = np.arange(n)
                if self._weights is not None:
                    self._weights[r, at:at + n] = np.asarray(docs_weights[d])[start:stop]
                at += n
        self.num_tokens = int(sum(np.asarray(t).size for t in docs_tokens))
        self._row_pixels = None if docs_pixels is None else self._tiles_by_row(docs_tokens, docs_pixels)
        self._perm: tuple[int, np.ndarray] | None = None

    def _tiles_by_row(self, docs_tokens, docs_pixels) -> list[np.ndarray | None]:
        if len(docs_pixels) != len(docs_tokens):
            raise ValueError("docs_pixels: one entry (tiles or None) per document expected")
        shapes = {px.shape[1:] for px in docs_pixels if px is not None}
        if len(shapes) != 1:
            raise ValueError(f"docs_pixels: expected tiles of one shape [3, S, S], got {sorted(shapes)}")
        self._tile_shape = shapes.pop()
        rows = []
        for row in self.layout:
            tiles = []
            for d, start, stop in row:
                if docs_pixels[d] is not None:
                    if (start, stop) != (0, len(docs_tokens[d])):
                        raise ValueError(f"docs_pixels: document {d} has images but is longer than a row")
                    tiles.append(docs_pixels[d])
            rows.append(np.concatenate(tiles) if tiles else None)
        self.tiles_per_row = max(0 if t is None else len(t) for t in rows)
        return rows

    def __len__(self) -> int:
        """Packed rows holding data (the empty rows that round an epoch up to whole batches not counted)."""
        return self.rows

    @property
    def has_images(self) -> bool:
        """Whether batches carry ``pixels`` (some document has image tiles)."""
        return self._row_pixels is not None

    @property
    def tokens_per_batch(self) -> int:
        """Input positions per batch, B * T, padding included (the count a tokens/s figure divides by time)."""
        return self.batch_size * self.seq_len

    @property
    def fill(self) -> float:
        """Fraction of the slots of all rows (rounding rows included) that hold document tokens."""
        return self.num_tokens / self._tokens.size

    def _permutation(self, epoch: int) -> np.ndarray:
        # One epoch's permutation is cached; read and written through locals so that a prefetching thread asking
        # for another epoch can never hand this call the wrong order.
        cached = self._perm
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(self._tokens.shape[0])
        self._perm = (epoch, perm)
        return perm

    def row_indices(self, step: int) -> np.ndarray:
        """[B] packed-row indices (into ``layout``) of batch ``step``; indices >= ``rows`` are empty rows."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return self._permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of training step ``step`` (0-based, any epoch), a pure function of (data, seed, step).

        Returns numpy arrays [B, T] with B = batch_size, T = seq_len: ``inputs`` and ``targets`` int32 (targets =
        the row shifted left by one), ``segment_ids`` int32 (1, 2, ... per document piece in the row, 0 on
        padding), ``positions`` int32 (index within the piece, 0 on padding), ``loss_mask`` float32 (1 where the
        target is the next token of the same piece; 0 on padding and where the target starts another piece); with
        ``docs_pixels``, ``pixels`` float32 [B, K, 3, S, S] (each row's tiles in the order of its image tokens).
        """
        rows = self.row_indices(step)
        tokens, segments = self._tokens[rows], self._segments[rows]
        same = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)).astype(np.float32)
        if self._weights is not None:  # the target's own weight (assistant tokens only, for chat data)
            same *= self._weights[rows, 1:]
        out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments[:, :-1],
               "positions": self._positions[rows, :-1], "loss_mask": same}
        if self._row_pixels is not None:
            pixels = np.zeros((len(rows), self.tiles_per_row, *self._tile_shape), np.float32)
            for b, r in enumerate(rows):
                tiles = self._row_pixels[r] if r < self.rows else None
                if tiles is not None:
                    pixels[b, :len(tiles)] = tiles
            out["pixels"] = pixels
        # Contiguous copies: slices of the gathered rows would be strided views sharing one buffer.
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
