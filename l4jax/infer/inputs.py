"""Host-side checks of what a user passes to a forward or to generation, before anything is compiled."""

from __future__ import annotations

import numpy as np


def check_tokens(ids, mask, vocab: int, *, prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Host checks of input_ids [B, T] and attention_mask [B, T] (None = all ones) -> both as int32 numpy.

    ``prompt``: generation's rules too (a non-empty prompt, no row that is all padding).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or (prompt and ids.shape[1] == 0):
        raise ValueError(f"input_ids: expected a {'non-empty ' if prompt else ''}2-D integer array [B, T], got "
                         f"shape {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids: token ids must be in [0, {vocab}), found {ids.min()}..{ids.max()}")
    mask = np.ones_like(ids, np.int32) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
    if prompt:
        empty = np.flatnonzero(mask.sum(-1) == 0)
        if empty.size:
            raise ValueError(f"input_ids: rows {empty.tolist()} are empty (attention_mask is all zeros)")
    return ids.astype(np.int32), mask.astype(np.int32)
