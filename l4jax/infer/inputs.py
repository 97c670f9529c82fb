"""Host-side checks of what a user passes to a forward or to generation, before anything is compiled."""

from __future__ import annotations

import numpy as np


def check_tokens(ids, mask, vocab: int, *, prompt: bool = False,
                 max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host checks of input_ids [B, T] and attention_mask [B, T] (None = all ones, else only 0 and 1) -> both as
    int32 numpy. ``max_len``: the most tokens a row may hold (the model's max_position_embeddings).

    ``prompt``: generation's rules too (no row that is all padding, and padding only on the left).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty 2-D integer array [B, T], got shape {ids.shape} "
                         f"{ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids: token ids must be in [0, {vocab}), found {ids.min()}..{ids.max()}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"input_ids: {ids.shape[1]} tokens per row, more than the model's "
                         f"max_position_embeddings {max_len}")
    mask = np.ones_like(ids, np.int32) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"attention_mask: values must be 0 (padding) or 1 (a token), found "
                         f"{sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]}")
    mask = mask.astype(np.int32)
    if prompt:
        empty = np.flatnonzero(mask.sum(-1) == 0)
        if empty.size:
            raise ValueError(f"input_ids: rows {empty.tolist()} are empty (attention_mask is all zeros)")
        right = np.flatnonzero((np.diff(mask, axis=-1) < 0).any(-1))
        if right.size:
            raise ValueError(f"attention_mask: rows {right.tolist()[:5]} have padding after a token; generation "
                             "takes left-padded prompts (padding first, then the tokens)")
    return ids.astype(np.int32), mask
