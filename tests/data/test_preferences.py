"""Preference data (DPO): the response mask covers the answers' assistant turns only (never the prompt, even its
own assistant turns), equal to one built by hand from the Llama 4 format; a pair's two sequences share a row as
segments 2p + 1 and 2p + 2; pairs longer than a row are dropped and counted; bad lines name the file and line;
long conversations split at message boundaries."""

import json

import numpy as np
import pytest

from l4jax.data import Tokenizer, corpus_dir
from l4jax.data.conversations import ConversationError, pack as pack_chat, render, split
from l4jax.data.examples import PREFERENCES_FILE, write_examples
from l4jax.data.preferences import pack, read_jsonl, render_pair
from l4jax.train import TrainConfig

H = "<|header_start|>{}<|header_end|>\n\n"
CALL = {"type": "function", "function": {"name": "now", "arguments": {"zone": "UTC"}}}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(corpus_dir())


def weighted_text(tok, ex) -> list[str]:
    """The decoded runs of consecutive weighted tokens."""
    runs, cur = [], []
    for i, w in zip(ex.ids.tolist(), ex.weights.tolist()):
        if w:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_the_answers_are_the_response_the_prompt_never(tok):
    prompt = [{"role": "system", "content": "Tell fables."},
              {"role": "user", "content": "A fox?"},
              {"role": "assistant", "content": "A fox saw grapes."},   # the prompt's own turn: not a response
              {"role": "user", "content": "And then?"}]
    rejected = [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": "12:00"},
                {"role": "assistant", "content": "At noon she ate them."}]
    pair = render_pair(tok, {"prompt": prompt, "chosen": "She left them.", "rejected": rejected})
    head = ("<|begin_of_text|>" + H.format("system") + "Tell fables.<|eot|>" + H.format("user") + "A fox?<|eot|>"
            + H.format("assistant") + "A fox saw grapes.<|eot|>" + H.format("user") + "And then?<|eot|>"
            + H.format("assistant"))
    assert tok.decode(pair.chosen.ids) == head + "She left them.<|eot|>"
    assert weighted_text(tok, pair.chosen) == ["She left them.<|eot|>"]
    runs = weighted_text(tok, pair.rejected)
    assert len(runs) == 2 and "now" in runs[0] and runs[0].endswith(("<|eom|>", "<|eot|>"))
    assert runs[1] == "At noon she ate them.<|eot|>"
    n = len(tok.encode(head, add_bos=False))  # the prompt: the same tokens in both, none weighted
    assert pair.chosen.ids[:n].tolist() == pair.rejected.ids[:n].tolist()
    assert not pair.chosen.weights[:n].any() and not pair.rejected.weights[:n].any()


def test_pairs_share_a_row_chosen_then_rejected(tok):
    records = [{"prompt": f"Story {k}?", "chosen": "Once " * (k + 1), "rejected": "No."} for k in range(7)]
    pairs = [render_pair(tok, r, f"pair {k}") for k, r in enumerate(records)]
    ds, report = pack(pairs, seq_len=127, batch_size=4)
    assert report["pairs"] == report["used"] == 7 and report["dropped_too_long"] == 0
    seen = 0
    for step in range(ds.steps_per_epoch):
        b = ds.batch(step)
        for row in range(4):
            seg, held = b["segment_ids"][row], int(b["pairs"][row].sum())
            assert b["pairs"][row].tolist() == [1.0] * held + [0.0] * (ds.pairs_per_row - held)
            assert seg.max() == 2 * held  # exactly the row's pairs, two segments each
            for p in range(held):
                c, r = np.flatnonzero(seg == 2 * p + 1), np.flatnonzero(seg == 2 * p + 2)
                assert c.max() < r.min()  # the chosen sequence first
                # Both sequences of the same pair: the same prompt text opens them.
                pc, pr = (b["inputs"][row, at].tolist() for at in (c, r))
                k = next(i for i, (x, y) in enumerate(zip(pc, pr)) if x != y)
                assert tok.decode(pc[:k]).endswith(H.format("assistant"))
                # The mask: the answer's tokens (as targets) only.
                assert b["loss_mask"][row, c].sum() == len(tok.encode(tok.decode(pc[k:]), add_bos=False))
            seen += held
    assert seen == 7 and ds.pairs_per_row >= 2


def test_a_pair_longer_than_a_row_is_dropped_and_counted(tok):
    pairs = [render_pair(tok, {"prompt": "Q?", "chosen": "word " * n, "rejected": "No."}) for n in (3, 200)]
    ds, report = pack(pairs, seq_len=100, batch_size=1)
    assert (report["used"], report["dropped_too_long"]) == (1, 1) and ds.num_pairs == 1
    with pytest.raises(ConversationError, match="longer than a row of 11 tokens"):
        pack(pairs, seq_len=10, batch_size=1)


@pytest.mark.parametrize("record,message", [
    ({"chosen": "a", "rejected": "b"}, "missing field prompt"),
    ({"prompt": "q"}, "missing fields chosen, rejected"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the rejected answer is the same as the chosen one"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "x"}, "rejected": "b"},
     "'chosen' holds no assistant turn"),
    ({"prompt": [{"role": "narrator", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role 'narrator'"),
    ({"prompt": "q", "chosen": "a", "rejected": {"role": "assistant", "content": ""}}, "an empty assistant turn"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' must be a string, a message or a non-empty list"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "'prompt' must be a string, a message or a non-empty list"),
    ("not an object", "expected an object with 'prompt', 'chosen' and 'rejected'"),
])
def test_bad_lines_name_the_file_and_line(tok, tmp_path, record, message):
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    (tmp_path / "pairs.jsonl").write_text(good + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ConversationError, match=rf"pairs.jsonl:3: .*{message}"):
        read_jsonl([tmp_path / "pairs.jsonl"], tok)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ConversationError, match=r"bad.jsonl:1: not JSON"):
        read_jsonl([tmp_path / "bad.jsonl"], tok)


def test_the_shipped_pairs_are_made_from_the_corpus_and_fit_a_row(tok, tmp_path):
    made = write_examples(tmp_path)[1]
    assert made.read_bytes() == (corpus_dir() / PREFERENCES_FILE).read_bytes()
    pairs = read_jsonl([made], tok)
    seq_len = TrainConfig.from_yaml("tiny-dpo").seq_len
    assert len(pairs) == 372 and max(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs) <= seq_len + 1


def test_long_conversations_split_at_message_boundaries(tok):
    messages = [{"role": "system", "content": "Tell fables."}]
    for k in range(6):
        messages += [{"role": "user", "content": f"Fable {k}?"},
                     {"role": "assistant", "content": "A fox saw some grapes and left them. " * (1 + k % 2)}]
    ex = render(tok, messages)
    n = len(ex.ids)
    pieces, inside = split(ex, 60)
    assert not inside and all(len(p.ids) <= 60 for p in pieces)
    # Every cut is at a message start, and every assistant token is kept exactly once.
    rebuilt = np.concatenate([p.ids for p in pieces])
    assert sum(p.weights.sum() for p in pieces) == ex.weights.sum()
    assert set(np.flatnonzero(ex.weights)) <= set(range(n))
    at = 0
    for p in pieces:
        at = next(s for s in [0, *ex.turns] if s >= at and ex.ids[s:s + len(p.ids)].tolist() == p.ids.tolist())
        assert at in (0, *ex.turns)
        np.testing.assert_array_equal(ex.weights[at:at + len(p.ids)], p.weights)
        at += len(p.ids)
    assert len(rebuilt) <= n
    # As configured: dropped, or split and counted; a message longer than a row is cut inside it.
    short = render(tok, messages[:3])
    _, report = pack_chat([ex, short], seq_len=60, batch_size=1)  # short: 61 tokens
    assert (report["used"], report["dropped_too_long"], report["split"]) == (1, 1, 0)
    ds, report = pack_chat([ex, ex], seq_len=59, batch_size=2, too_long="split")
    assert (report["split"], report["cut_inside_a_message"], report["dropped_too_long"]) == (2, 0, 0)
    assert report["loss_tokens"] == 2 * ex.weights.sum()
    _, report = pack_chat([ex], seq_len=19, batch_size=1, too_long="split")
    assert report["cut_inside_a_message"] == 1
