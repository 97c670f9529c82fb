"""Host-side input checks: every bad batch is refused with a message naming the argument."""

import numpy as np
import pytest

from l4jax.infer.inputs import check_tokens


def test_good_batches_pass_as_int32():
    ids, mask = check_tokens([[0, 5, 6]], [[0, 1, 1]], 10, prompt=True, max_len=3)
    assert ids.dtype == mask.dtype == np.int32 and mask.tolist() == [[0, 1, 1]]
    _, mask = check_tokens([[5, 6, 0]], np.array([[True, True, False]]), 10)  # a forward may pad on the right
    assert mask.tolist() == [[1, 1, 0]]


@pytest.mark.parametrize("ids,mask,kw,message", [
    (np.zeros((1, 0), int), None, {}, r"input_ids: expected a non-empty 2-D integer array \[B, T\], got shape \(1, 0"),
    ([1, 2], None, {}, "input_ids: expected a non-empty 2-D"),
    ([[1.5, 2]], None, {}, "input_ids: expected a non-empty 2-D integer"),
    ([[1, 10]], None, {}, r"token ids must be in \[0, 10\), found 1..10"),
    ([[1, 2, 3]], None, dict(max_len=2), "3 tokens per row, more than the model's max_position_embeddings 2"),
    ([[1, 2]], [[1]], {}, r"attention_mask: shape \(1, 1\) does not match input_ids \(1, 2\)"),
    ([[1, 2]], [[1, 2]], {}, r"attention_mask: values must be 0 \(padding\) or 1 \(a token\), found \[2\]"),
    ([[1, 2]], [[0.5, 1]], {}, r"attention_mask: values must be 0 \(padding\) or 1"),
    ([[1, 2], [3, 4]], [[1, 1], [0, 0]], dict(prompt=True), r"rows \[1\] are empty"),
    ([[1, 2, 3]], [[1, 0, 1]], dict(prompt=True), r"attention_mask: rows \[0\] have padding after a token"),
])
def test_bad_batches_name_the_argument(ids, mask, kw, message):
    with pytest.raises(ValueError, match=message):
        check_tokens(ids, mask, 10, **kw)
