"""Tokenizer and streaming decoder, on a small byte-level BPE built here (nothing is downloaded), checked by hand and
against transformers' PreTrainedTokenizerFast (chat templates: test_chat.py)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from l4jax.data.chat import chat_prompt
from l4jax.data.tokenizer import IncrementalDecoder, Tokenizer
from tiny import SPECIALS, make_tokenizer

TEXTS = ["naïve café 日本", "Hello world", "  leading and trailing spaces  ",
         "line\nbreaks\n\nand\ttabs", "emoji 🙂🚀 mixed with 日本語 and Ελληνικά",
         "<|header_start|>user<|header_end|>\n\nhi<|eot|>", ""]



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    return path, make_tokenizer(path)


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer(folder[0])


@pytest.fixture(scope="module")
def hf(folder):
    return PreTrainedTokenizerFast(tokenizer_file=str(folder[0] / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                   eos_token="<|eot|>", pad_token="<|finetune_right_pad|>")


# -- ids ----------------------------------------------------------------------------------------------------------
def test_special_ids_and_config(tok, folder):
    _, base = folder
    assert base > 256
    assert tok.bos_id == base
    assert tok.pad_id == base + 7
    assert tok.eos_ids == (base + 5, base + 1, base + 4)     # eos_token first, then generation_config, no repeats
    assert tok.stop_ids() == (base + 5, base + 4, base + 1)  # <|eot|>, <|eom|>, <|end_of_text|>
    assert [tok.token_id(s) for s in SPECIALS] == list(range(base, base + len(SPECIALS)))
    assert tok.token_id("<|reserved_special_token_0|>") == base + len(SPECIALS)
    assert tok.vocab_size == base + len(SPECIALS) + 1


def test_unknown_token_names_it(tok):
    with pytest.raises(KeyError, match=r"'<\|nope\|>' is not in the vocabulary"):
        tok.token_id("<|nope|>")


def test_specials_encode_as_single_ids(tok, folder):
    _, base = folder
    ids = tok.encode("<|header_start|>user<|header_end|>\n\nhi<|eot|><|image|><|patch|>", add_bos=False)
    assert ids[0] == base + 2 and ids[-3:] == [base + 5, base + 10, base + 11]
    assert base + 3 in ids
    assert tok.decode(ids[1:-3]) == "user<|header_end|>\n\nhi"
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\nhi"


def test_round_trip_with_non_ascii(tok, folder):
    _, base = folder
    ids = tok.encode("naïve café 日本")
    assert ids[0] == base and base not in ids[1:]
    assert all(i < base for i in ids[1:])                     # plain text never produces special ids
    assert tok.decode(ids) == "<|begin_of_text|>naïve café 日本"
    assert tok.decode(ids, skip_special_tokens=True) == "naïve café 日本"
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    # Arrays from the decode loop are accepted as they are.
    assert tok.decode(np.array(ids)) == tok.decode(jnp.array(ids)) == tok.decode(ids)
    with pytest.raises(ValueError, match=r"one sequence of ids \[T\], got shape \(1, "):
        tok.decode(np.array([ids]))


def test_bos_is_added_once(tok, folder):
    _, base = folder
    assert tok.encode("hi")[0] == base and tok.encode("hi")[1] != base
    assert tok.encode("hi", add_bos=False)[0] != base
    prompt = chat_prompt([{"role": "user", "content": "hi"}])
    assert tok.encode(prompt)[:2] == [base, base + 2]         # not [bos, bos, header_start]
    assert tok.encode(prompt) == tok.encode(prompt, add_bos=False)


def test_ids_match_transformers(tok, hf):
    for text in TEXTS + [chat_prompt([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "naïve café 日本?"}])]:
        expect = hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_bos=False) == expect, text
        if not text.startswith("<|begin_of_text|>"):
            assert tok.encode(text) == hf(text)["input_ids"], text       # HF adds BOS via the post-processor
        assert tok.decode(expect) == hf.decode(expect), text
        assert tok.decode(expect, skip_special_tokens=True) == hf.decode(expect, skip_special_tokens=True), text


def test_config_token_with_wrong_id_is_an_error(folder, tmp_path):
    src, base = folder
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"5": {"content": "<|eot|>", "special": True}}}))
    with pytest.raises(ValueError, match=rf"'<\|eot\|>' is declared as id 5 but tokenizer.json gives it id {base + 5}"):
        Tokenizer(tmp_path)


def test_the_pad_id_follows_the_config(folder, tmp_path):
    """generate pads with config.pad_token_id; the tokenizer says the same id, whatever tokenizer_config says."""
    src, base = folder
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / f).write_text((src / f).read_text())
    assert Tokenizer(tmp_path).pad_id == base + 7                          # tokenizer_config's pad_token only
    gen = json.loads((src / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(gen, pad_token_id=base + 1)))
    assert Tokenizer(tmp_path).pad_id == base + 1                          # generation_config over tokenizer_config
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"pad_token_id": base + 2}}))
    assert Tokenizer(tmp_path).pad_id == base + 2                          # the model's config over both
    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": base + 3}))
    assert Tokenizer(tmp_path).pad_id == base + 3


def test_folder_without_configs(folder, tmp_path):
    src, base = folder
    (tmp_path / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    tok = Tokenizer(tmp_path / "tokenizer.json")             # the file itself also works
    assert tok.bos_id == base                                  # found by name
    assert tok.eos_ids == () and tok.pad_id is None
    assert tok.stop_ids() == (base + 5, base + 4, base + 1)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json at"):
        Tokenizer(tmp_path / "missing")


# -- streaming decode ---------------------------------------------------------------------------------------------
def test_incremental_decoder_matches_full_decode(tok):
    text = "naïve café 日本語のテキスト 🙂🚀 Ελληνικά ∑∫√ done"
    ids = tok.encode(text)
    # The test is only meaningful if some token ends mid-character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces                                        # held back at least once
    assert all("\ufffd" not in p for p in pieces)
    assert dec.flush() == ""
    assert "".join(pieces) == tok.decode(ids) == "<|begin_of_text|>" + text
    # Every emitted prefix is a prefix of the final text: text is never taken back.
    joined = ""
    for p in pieces:
        joined += p
        assert ("<|begin_of_text|>" + text).startswith(joined)


def test_incremental_decoder_skips_specials_and_flushes_invalid_tail(tok):
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    ids = tok.encode("日本<|eot|>", add_bos=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "日本"
    # A lone lead byte (0xE6, shown as 'æ' in the byte-level alphabet) stays held until flush.
    dec = IncrementalDecoder(tok)
    assert dec.push(tok.token_id("a")) == "a"
    assert dec.push(tok.token_id("æ")) == ""
    assert dec.flush() == "\ufffd"
    assert dec.push(np.int32(tok.token_id("b"))) == "b"
