"""Masks, positions and temperature tuning against hand-computed cases."""

import jax.numpy as jnp
import numpy as np

from l4jax.model.masks import dense, left_padding, positions_from_mask, segment_positions, temperature_scales
from masks_reference import attention_mask, segment_mask


def test_positions_and_left_padding():
    m = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(left_padding(m), [2, 0])
    np.testing.assert_array_equal(positions_from_mask(m), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_chunked_mask_by_hand():
    # Row 0: 1 pad slot, chunk 3 -> real tokens at slots 1..6 form chunks {1,2,3} and {4,5,6}.
    idx = jnp.arange(7)[None]
    valid = jnp.array([[0, 1, 1, 1, 1, 1, 1], [1] * 7]) > 0
    m = np.asarray(attention_mask(idx, idx, valid, jnp.array([1, 0]), 3)).astype(int)
    np.testing.assert_array_equal(m[0, 5], [0, 0, 0, 0, 1, 1, 0])  # slot 5 sees 4, 5: same chunk, causal
    np.testing.assert_array_equal(m[0, 3], [0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(m[1, 3], [0, 0, 0, 1, 0, 0, 0])  # unpadded: chunks {0,1,2} {3,4,5} {6}
    np.testing.assert_array_equal(m[1, 6], [0, 0, 0, 0, 0, 0, 1])
    full = np.asarray(attention_mask(idx, idx, valid, jnp.array([1, 0]), None)).astype(int)
    np.testing.assert_array_equal(full[0, 5], [0, 1, 1, 1, 1, 1, 0])  # global: everything real and causal


def test_chunks_are_fixed_blocks_not_a_sliding_window():
    idx = jnp.arange(16)[None]
    m = np.asarray(attention_mask(idx, idx, jnp.ones((1, 16), bool), jnp.zeros(1, int), 8))[0]
    assert m.sum(-1).tolist() == [p % 8 + 1 for p in range(16)]


def test_temperature_scales():
    s = np.asarray(temperature_scales(jnp.array([0, 8190, 8191, 16382, 16383]), 8192.0, 0.1))
    np.testing.assert_allclose(s, [1, 1, 1 + 0.1 * np.log(2), 1 + 0.1 * np.log(2), 1 + 0.1 * np.log(3)], rtol=1e-6)


def test_dense_whole_row_masks_follow_the_reference():
    """masks.dense (the pictures' matrices) equals the reference builders for left-padded and packed rows."""
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    idx = jnp.arange(10)[None]
    for chunk in (None, 3):
        np.testing.assert_array_equal(dense(attention_mask=mask, chunk_size=chunk),
                                      attention_mask(idx, idx, mask > 0, left_padding(mask), chunk))
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    for chunk in (None, 3):
        np.testing.assert_array_equal(dense(segment_ids=seg, chunk_size=chunk),
                                      segment_mask(seg, segment_positions(seg), chunk))
    m = np.asarray(dense(segment_ids=seg, chunk_size=3))[0]
    assert m.sum(-1).tolist() == [1, 2, 3, 1, 1, 2, 3, 1, 2, 0]  # chunks restart at each document
