"""Chat data: the assistant-only loss mask of rendered conversations equals one built by hand from the Llama 4
format (several turns, a system message, images, tools, tool calls and results); packing keeps conversations apart
and carries the mask into the batches; bad data files name the file and line."""

import json

import jax
import numpy as np
import pytest

import l4jax
from l4jax.data import Tokenizer, corpus_dir
from l4jax.data.conversations import ConversationError, Vision, pack, read_jsonl, render
from l4jax.data.images import PATCH, ImageProcessor, expand_images
from l4jax.data.examples import CHAT_FILE, write_examples
from l4jax.train import TrainConfig, Trainer
from l4jax.train.lora import LoraConfig
from l4jax.train.settings import DistillSettings
from tiny import make_tokenizer, save_images

H = "<|header_start|>{}<|header_end|>\n\n"
CALL = {"type": "function", "function": {"name": "now", "arguments": {"zone": "UTC"}}}
TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(corpus_dir())


def by_hand(tok, pieces):
    """[(text, in the loss)] -> (text, weights): a token is in the loss when its first character is."""
    text = "".join(t for t, _ in pieces)
    flags = np.concatenate([np.full(len(t), w, bool) for t, w in pieces])
    ids, offsets = tok.encode_with_offsets(text)
    return text, ids, np.array([flags[a] for a, _ in offsets], np.float32)


def test_several_turns_system_and_images(tok, tmp_path):
    save_images(tmp_path)  # image1.png fits one 28-px tile: 4 patch tokens with tokens_per_tile=4
    vision = Vision(ImageProcessor.from_folder(tmp_path, 28), tokens_per_tile=4, root=tmp_path)
    messages = [{"role": "system", "content": " Tell fables. "},
                {"role": "user", "content": [{"type": "image", "path": "image1.png"},
                                             {"type": "text", "text": "A fox?"}]},
                {"role": "assistant", "content": "A fox saw grapes."},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": [{"type": "text", "text": "She left them."}]}]
    text, ids, weights = by_hand(tok, [
        ("<|begin_of_text|>" + H.format("system") + "Tell fables.<|eot|>" + H.format("user")
         + "<|image_start|><|image|>" + "<|patch|>" * 4 + "<|image_end|>A fox?<|eot|>" + H.format("assistant"),
         False),
        ("A fox saw grapes.<|eot|>", True),
        (H.format("user") + "And then?<|eot|>" + H.format("assistant"), False),
        ("She left them.<|eot|>", True)])
    ex = render(tok, messages, vision=vision)
    assert tok.chat_prompt(messages, add_generation_prompt=False) == text.replace("<|patch|>" * 4, "").replace(
        "<|image_start|><|image|><|image_end|>", "<|image|>")
    assert ex.ids.tolist() == ids and ex.pixels.shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(ex.weights, weights)
    assert tok.decode(ex.ids[ex.weights > 0]) == "A fox saw grapes.<|eot|>She left them.<|eot|>"
    turns = [0, *ex.turns]  # each message's start, the image expansion counted
    assert tok.decode(ex.ids[turns[2]:turns[3]]) == H.format("assistant") + "A fox saw grapes.<|eot|>"


def test_tools_tool_calls_and_results(tok):
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "content": {"time": "12:00"}},
                {"role": "assistant", "content": "Noon."}]
    ex = render(tok, messages, tools=TOOLS)
    learned = tok.decode(ex.ids[ex.weights > 0])
    assert learned == ('<|python_start|><|python_end|>{"name": "now", "parameters": {"zone": "UTC"}}<|eot|>'
                       "Noon.<|eot|>")
    rendered = tok.decode(ex.ids)
    assert '"name": "now"' in rendered.split("<|eot|>")[0]  # the tools' schemas went into the first user turn
    assert '{"time": "12:00"}' in tok.decode(ex.ids[ex.weights == 0])  # tool results are context, not targets


def test_packing_keeps_conversations_apart_and_masks_the_targets(tok):
    examples = [render(tok, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}])
                for i in range(1, 6)]
    long = render(tok, [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}])
    ds, report = pack(examples + [long], seq_len=64, batch_size=2)
    assert report == {"conversations": 6, "used": 5, "dropped_too_long": 1, "split": 0, "cut_inside_a_message": 0,
                      "tokens": sum(len(e.ids) for e in examples),
                      "loss_tokens": int(sum(e.weights.sum() for e in examples))}
    seen = 0.0
    for step in range(ds.steps_per_epoch):
        b = ds.batch(step)
        for row in range(2):
            seg, mask = b["segment_ids"][row], b["loss_mask"][row]
            for k in set(seg[seg > 0].tolist()):
                at = np.flatnonzero(seg == k)
                assert b["inputs"][row, at[0]] == tok.bos_id  # each conversation starts its own segment
                # in the loss: exactly the targets that are assistant tokens of this conversation
                targets = b["targets"][row, at[:-1]]
                assert set(tok.decode([t]) for t, m in zip(targets, mask[at[:-1]]) if m) <= {"a", "<|eot|>"}
                assert mask[at[-1]] == 0  # never across into the next conversation
            seen += mask.sum()
    assert seen == report["loss_tokens"]  # every assistant token is a target once (none is a row's first token)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "an empty assistant turn"),
    ('{"conversation": []}', "expected an object with a 'messages' list"),
    ('{"messages": [{"role": "user"', "not JSON"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
])
def test_bad_lines_name_the_file_and_line(tok, tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (tmp_path / "chat.jsonl").write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ConversationError, match=rf"chat.jsonl:3: .*{message}"):
        read_jsonl([tmp_path / "chat.jsonl"], tok)
    (tmp_path / "ok.jsonl").write_text(good + "\n")
    assert len(read_jsonl([tmp_path / "ok.jsonl"], tok)) == 1


@pytest.mark.slow  # a train step compile at seq_len 256 (~20-40 s on 2 cores)
def test_a_chat_training_step_counts_the_assistant_tokens_only(tok):
    """The trainer's cross-entropy on a packed chat batch (LoRA at step 0: the base model) equals the mean of
    -log p over the assistant tokens, each conversation run alone through the base model."""
    config = l4jax.load_config("tiny")
    ds, report = pack(read_jsonl([corpus_dir() / "chat.jsonl"], tok)[:10], seq_len=256, batch_size=2)
    base = l4jax.init(config, seed=3)
    tc = TrainConfig(data=("corpus-chat",), data_format="chat", seq_len=256, batch_size=2, lora=LoraConfig(rank=4))
    trainer = Trainer(config, tc)
    state, frozen = trainer.init_state(jax.device_get(base.params))
    batch = ds.batch(0)
    _, metrics = trainer.step(state, frozen, batch)
    # Each conversation alone, left-padded into one [S, T] batch of the base model (one compile).
    rows, picks = [], []
    for row in range(2):
        seg = batch["segment_ids"][row]
        for k in sorted(set(seg[seg > 0].tolist())):
            rows.append(np.flatnonzero(seg == k))
            picks.append(row)
    T = tc.seq_len
    ids = np.array([[tok.pad_id] * (T - len(at)) + batch["inputs"][r, at].tolist() for r, at in zip(picks, rows)])
    mask = np.array([[0] * (T - len(at)) + [1] * len(at) for at in rows])
    logp = jax.nn.log_softmax(np.asarray(base(ids, mask)).astype(np.float64), axis=-1)
    total, count = 0.0, 0.0
    for i, (r, at) in enumerate(zip(picks, rows)):
        picked = logp[i, T - len(at):][np.arange(len(at)), batch["targets"][r, at]]
        total -= float((picked * batch["loss_mask"][r, at]).sum())
        count += float(batch["loss_mask"][r, at].sum())
    assert 0 < count < (batch["segment_ids"] > 0).sum()  # the user turns and headers are not in the loss
    assert float(metrics["tokens"]) == count
    np.testing.assert_allclose(float(metrics["ce"]), total / count, rtol=2e-5)
    # Codistillation on chat data: the same tokens; with the student as its own teacher the KL term is 0, so the
    # loss is (1 - alpha) times the cross-entropy.
    distil = Trainer(config, tc.replace(distill=DistillSettings(alpha=0.5)), teacher=base)
    state, frozen = distil.init_state(jax.device_get(base.params))
    _, m = distil.step(state, frozen, batch)
    assert float(m["tokens"]) == count
    np.testing.assert_allclose([float(m["ce"]), float(m["loss"])], [total / count, 0.5 * total / count], rtol=2e-5)


def test_the_shipped_chat_examples_are_made_from_the_corpus(tok, tmp_path):
    """corpus/chat.jsonl is what l4jax/data/examples.py makes (a rerun writes the same bytes); every conversation
    fits a row of configs/tiny-sft.yaml."""
    made = write_examples(tmp_path)[0]
    assert made.read_bytes() == (corpus_dir() / CHAT_FILE).read_bytes()
    examples = read_jsonl([made], tok)
    seq_len = TrainConfig.from_yaml("tiny-sft").seq_len
    assert len(examples) == 373 and max(len(e.ids) for e in examples) <= seq_len + 1


def test_images_become_their_tokens_out_of_the_loss(tmp_path):
    """Image parts (paths relative to the JSONL file) expand to one <|patch|> run per tile as the processor does,
    none in the loss; the tiles ride along; missing files and models without a vision tower name the line."""
    make_tokenizer(tmp_path)
    paths = save_images(tmp_path)
    tok = Tokenizer(tmp_path)
    vision = Vision(ImageProcessor.from_folder(tmp_path, 28), tokens_per_tile=4)
    messages = [{"role": "user", "content": [{"type": "image", "path": "image0.png"},
                                             {"type": "image", "image": "image1.png"},
                                             {"type": "text", "text": "What are these?"}]},
                {"role": "assistant", "content": "Stripes and noise."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    [ex] = read_jsonl([tmp_path / "chat.jsonl"], tok, vision)
    pixels, grids = vision.processor(paths[:2])
    assert grids[0] != (1, 1) and grids[1] == (1, 1)  # several tiles and a thumbnail, then one tile
    np.testing.assert_array_equal(ex.pixels, pixels)
    text = tok.chat_prompt(messages, add_generation_prompt=False)
    want = tok.encode(expand_images(text, grids, 4), add_bos=False)
    assert ex.ids.tolist() == want
    assert (ex.ids == tok.token_id(PATCH)).sum() == len(pixels) * 4  # one feature row per patch token
    assert tok.decode(ex.ids[ex.weights > 0]) == "Stripes and noise.<|eot|>"
    # Packed: each row's tiles in the order of its patch tokens; empty tile slots are zeros.
    text_only = render(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    ds, _ = pack([ex, text_only, ex], seq_len=len(ex.ids), batch_size=3)
    assert ds.has_images and ds.tiles_per_row == len(pixels)
    b = ds.batch(0)
    for row in range(3):
        n = (b["inputs"][row] == tok.token_id(PATCH)).sum() // 4
        assert not b["pixels"][row, n:].any()
        np.testing.assert_array_equal(b["pixels"][row, :n], pixels[:n])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "path": "nowhere.png"}]},
        {"role": "assistant", "content": "?"}]}) + "\n")
    with pytest.raises(ConversationError, match=r"bad.jsonl:2: .*nowhere.png"):
        read_jsonl([tmp_path / "bad.jsonl"], tok, vision)
    with pytest.raises(ConversationError, match=r"chat.jsonl:1: the conversation has images but the model has no "
                                                r"vision tower"):
        read_jsonl([tmp_path / "chat.jsonl"], tok)
    typed = [{"role": "user", "content": "Look: <|patch|>"}, {"role": "assistant", "content": "At what?"}]
    (tmp_path / "typed.jsonl").write_text(json.dumps({"messages": typed}) + "\n")
    with pytest.raises(ConversationError, match=r"typed.jsonl:1: <\|patch\|> typed into a message"):
        read_jsonl([tmp_path / "typed.jsonl"], tok, vision)
