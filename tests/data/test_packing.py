"""Packing: text files to documents to token ids to packed rows, on the shipped corpus and hand-made cases."""

import itertools
import json
import shutil

import numpy as np
import pytest

from l4jax import data
from l4jax.data.tokenizer import Tokenizer

def test_read_documents_format(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufefffirst\r\n\r\n  indented line\r\n\f\r\nsecond\n".encode())
    (tmp_path / "b.txt").write_text("\n\n  \t\f  \n\nthird\n\n\n\f\n\n\f\n")   # blank documents are skipped
    (tmp_path / "c.md").write_text("not a .txt file: directories skip it")
    assert data.read_documents([tmp_path / "a.txt"]) == ["first\n\n  indented line", "second"]
    assert data.read_documents([tmp_path]) == ["first\n\n  indented line", "second", "third"]
    (tmp_path / "one.txt").write_text("no separator\n\n\n\nstill one document\n")
    assert data.read_documents([str(tmp_path / "one.txt")]) == ["no separator\n\n\n\nstill one document"]


def test_read_documents_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        data.read_documents([bad])
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        data.read_documents([tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match="paths is empty"):
        data.read_documents([])
    with pytest.raises(TypeError, match="single path"):
        data.read_documents(str(bad))
    (tmp_path / "blank.txt").write_text("\n \f \n\n")
    with pytest.raises(ValueError, match=r"no documents in .*blank\.txt"):
        data.read_documents([tmp_path / "blank.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: directory holds no"):
        data.read_documents([tmp_path / "empty"])


def test_tokenize(tokens, docs, tok):
    assert len(tokens) == 373 and sum(t.size for t in tokens) == 320_687
    assert sum(len(d) for d in docs) / sum(t.size - 2 for t in tokens) == pytest.approx(2.205, abs=1e-3)
    for t, d in zip(tokens[:20], docs[:20]):
        assert t.dtype == np.int32 and t[0] == 1 and t[-1] == 2
        assert t[1:-1].tolist() == tok.encode(d, add_bos=False)
    with pytest.raises(TypeError, match="single str"):
        data.tokenize("one document", tok)



def test_documents_end_with_end_of_text_not_an_instruct_eos(tmp_path, docs):
    """An instruct folder's eos is <|eot|> (a turn's end); documents still end with <|end_of_text|>."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(data.corpus_dir() / name, tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|eot|>"}))
    instruct = Tokenizer(tmp_path)
    assert instruct.eos_ids == (instruct.token_id("<|eot|>"),) != (2,)
    ends = {int(t[-1]) for t in data.tokenize(docs[:5], instruct)}
    assert ends == {instruct.token_id("<|end_of_text|>")} == {2}


# -- packing ------------------------------------------------------------------------------------------------------
def test_small_packing_exact():
    docs = [np.array([1, 5, 6, 2]), np.array([1, 7, 2]), np.array([1, 8, 9, 10, 11, 12, 13, 2])]
    ds = data.PackedDataset(docs, seq_len=7, batch_size=2)
    # Best fit: the 8-token document fills a row; the other two share one.
    assert ds.layout == [[(2, 0, 8)], [(0, 0, 4), (1, 0, 3)]]
    assert (len(ds), ds.rows, ds.steps_per_epoch, ds.tokens_per_batch, ds.num_tokens) == (2, 2, 1, 14, 15)
    b = ds.batch(0)
    r = int(np.flatnonzero(ds.row_indices(0) == 1)[0])      # where the shared row landed in the batch
    assert b["inputs"][r].tolist() == [1, 5, 6, 2, 1, 7, 2]
    assert b["targets"][r].tolist() == [5, 6, 2, 1, 7, 2, 0]
    assert b["segment_ids"][r].tolist() == [1, 1, 1, 1, 2, 2, 2]
    assert b["positions"][r].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert b["loss_mask"][r].tolist() == [1, 1, 1, 0, 1, 1, 0]
    assert b["loss_mask"][1 - r].tolist() == [1] * 7 and b["targets"][1 - r].tolist() == [8, 9, 10, 11, 12, 13, 2]


def test_long_document_is_split_into_segments():
    ds = data.PackedDataset([np.arange(1, 12), np.array([1, 2])], seq_len=4, batch_size=4)
    # 11 tokens -> pieces of 5, 5, 1; the 1-token tail shares a row with the 2-token document.
    assert sorted(ds.layout) == [[(0, 0, 5)], [(0, 5, 10)], [(0, 10, 11), (1, 0, 2)]]
    b, rows = ds.batch(0), ds.row_indices(0).tolist()
    second = rows.index(ds.layout.index([(0, 5, 10)]))
    assert b["inputs"][second].tolist() == [6, 7, 8, 9] and b["positions"][second].tolist() == [0, 1, 2, 3]
    last = rows.index(ds.layout.index([(0, 10, 11), (1, 0, 2)]))
    assert b["segment_ids"][last].tolist() == [1, 2, 2, 0] and b["loss_mask"][last].tolist() == [0, 1, 0, 0]
    assert b["inputs"][rows.index(3)].tolist() == [0, 0, 0, 0]                  # the empty filler row
    assert b["loss_mask"][rows.index(3)].sum() == 0


@pytest.mark.parametrize("seq_len, batch_size, rows", [(128, 8, 2493), (512, 3, 630)])
def test_epoch_invariants_on_corpus(tokens, seq_len, batch_size, rows):
    ds = data.PackedDataset(tokens, seq_len, batch_size, seed=3)
    T, spe = seq_len, ds.steps_per_epoch
    assert ds.rows == rows and spe == -(-rows // batch_size) and ds.fill > 0.97
    pieces = [p for row in ds.layout for p in row]
    assert max(len(row) for row in ds.layout) >= 3          # short documents share rows
    # The pieces tile every document exactly once, in order, none longer than a row.
    by_doc = sorted(pieces)
    for d, t in enumerate(tokens):
        mine = [p for p in by_doc if p[0] == d]
        assert mine[0][1] == 0 and mine[-1][2] == t.size
        assert all(a[2] == b[1] for a, b in itertools.pairwise(mine)) and all(p[2] - p[1] <= T + 1 for p in mine)
    assert len(pieces) == sum(-(-t.size // (T + 1)) for t in tokens)

    seen, count, loss = [], np.zeros(512, np.int64), 0.0
    for step in range(spe):
        b, idx = ds.batch(step), ds.row_indices(step)
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "inputs": ((batch_size, T), "int32"), "targets": ((batch_size, T), "int32"),
            "segment_ids": ((batch_size, T), "int32"), "positions": ((batch_size, T), "int32"),
            "loss_mask": ((batch_size, T), "float32")}
        assert np.array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        full = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)          # the row of T + 1 tokens
        count += np.bincount(full[full > 0], minlength=512)                   # pad (0) never occurs in text
        loss += b["loss_mask"].sum()
        for k, r in enumerate(idx):
            seg, pos, mask = np.zeros(T + 1, int), np.zeros(T + 1, int), np.zeros(T, np.float32)
            at = 0
            for j, (d, start, stop) in enumerate(ds.layout[r] if r < ds.rows else []):
                n = stop - start
                assert np.array_equal(full[k, at:at + n], tokens[d][start:stop])
                seg[at:at + n], pos[at:at + n], mask[at:at + n - 1] = j + 1, np.arange(n), 1
                at += n
            assert not full[k, at:].any()                   # padding only at the end
            assert np.array_equal(b["segment_ids"][k], seg[:T]) and np.array_equal(b["positions"][k], pos[:T])
            assert np.array_equal(b["loss_mask"][k], mask)
        seen += idx.tolist()
    assert sorted(seen) == list(range(spe * batch_size))   # every row (and filler row) once per epoch
    assert np.array_equal(count, np.bincount(np.concatenate(tokens), minlength=512))
    assert loss == ds.num_tokens - len(pieces)              # every next-token pair within a piece, once


def test_batches_are_pure_and_reshuffled_per_epoch(tokens):
    ds = data.PackedDataset(tokens, 256, 8, seed=7)
    spe = ds.steps_per_epoch
    assert (ds.rows, spe) == (1262, 158)
    later = ds.batch(3 * spe + 5)                           # out of order: caching must not leak between epochs
    first = ds.batch(5)
    again = data.PackedDataset(tokens, 256, 8, seed=7)
    for step, ref in ((5, first), (3 * spe + 5, later)):
        for k, v in again.batch(step).items():
            assert np.array_equal(v, ref[k]), (step, k)
    epoch0 = np.concatenate([ds.row_indices(s) for s in range(spe)])
    epoch1 = np.concatenate([ds.row_indices(s) for s in range(spe, 2 * spe)])
    assert sorted(epoch0) == sorted(epoch1) and (epoch0 != epoch1).mean() > 0.9
    other_seed = data.PackedDataset(tokens, 256, 8, seed=8)
    assert not np.array_equal(other_seed.row_indices(0), ds.row_indices(0))
    assert other_seed.layout == ds.layout                   # the seed shuffles rows, not the packing


def test_packing_errors(tokens):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        data.PackedDataset(tokens, 1, 4)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        data.PackedDataset(tokens, 64, 0)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 64.0"):
        data.PackedDataset(tokens, 64.0, 4)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        data.PackedDataset(tokens, 64, 4, seed=-1)
    with pytest.raises(ValueError, match="docs_tokens is empty"):
        data.PackedDataset([], 64, 4)
    with pytest.raises(ValueError, match=r"docs_tokens\[1\] is empty"):
        data.PackedDataset([np.array([1, 2]), np.array([], np.int32)], 64, 4)
    with pytest.raises(ValueError, match=r"docs_tokens\[0\] must be a 1-D integer array, got float64 of shape"):
        data.PackedDataset([np.ones((2, 3))], 64, 4)
    ds = data.PackedDataset(tokens[:3], 64, 4)
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        ds.batch(-1)
