"""The shipped corpus and its byte-level tokenizer: contents, vocabulary layout, round trips, exact rebuild."""

import hashlib
import random

from l4jax import data
from l4jax.config import load_config
from l4jax.data import corpus
from l4jax import chat_prompt

REPO = data.corpus_dir().parents[2]


# -- corpus -------------------------------------------------------------------------------------------------------
def test_shipped_corpus(docs):
    assert [f.name for f in data.corpus_files()] == ["aesop.txt", "grimm.txt"]
    assert sum(f.stat().st_size for f in data.corpus_files()) == 706_322
    assert len(docs) == 373                                  # 311 fables, then 62 tales
    assert docs[0].startswith("The Wolf And The Lamb\n\nWOLF, meeting with a Lamb")
    assert docs[310].startswith("The Frogs' Complaint Against the Sun")
    assert docs[311].startswith("THE GOLDEN BIRD\n\nA certain king")
    assert docs[-1].startswith("SNOW-WHITE AND ROSE-RED") and docs[-1].endswith("roses, white and red.")
    lengths = [len(d) for d in docs]
    assert min(lengths) == 205 and max(lengths) == 19_507
    text = "".join(docs)
    assert "Gutenberg" not in text and "\f" not in text and "\r" not in text


# -- tokenizer ----------------------------------------------------------------------------------------------------
def test_vocabulary_layout(tok):
    cfg = load_config(REPO / "configs" / "tiny.yaml").text
    assert tok.vocab_size == 512 <= cfg.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_ids) == (cfg.pad_token_id, cfg.bos_token_id, tuple(cfg.eos_token_id))
    assert (tok.pad_id, tok.bos_id, tok.eos_ids) == (0, 1, (2,))
    assert [tok.token_id(s) for s in corpus.SPECIAL_TOKENS] == list(range(16))
    assert tok.stop_ids() == (6, 5, 2)                       # <|eot|>, <|eom|>, <|end_of_text|>
    # Byte b is id 16 + b: a single byte has nothing to merge with.
    assert tok.encode("\x00", add_bos=False) == [16] and tok.encode("A", add_bos=False) == [16 + 65]
    assert tok.encode("\u00e9", add_bos=False) == [16 + 0xC3, 16 + 0xA9]      # é is c3 a9 in UTF-8
    assert tok.encode(" the", add_bos=False) == [275]                         # an early merge
    assert tok.decode(list(range(16)), skip_special_tokens=True) == ""


def test_round_trip(tok, docs):
    for doc in docs:
        assert tok.decode(tok.encode(doc, add_bos=False)) == doc
    samples = ["naïve café, crème brûlée", "日本語のテキスト", "Ελληνικά и русский", "emoji 🙂🚀 ∑∫√",
               "\x00\x01 control\tbytes\r\n", "  leading and trailing  ", "<|eot|> inside text", ""]
    rng = random.Random(0)
    # Random code points from every plane (surrogates excluded: they cannot be encoded as UTF-8).
    samples += ["".join(chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
                        for _ in range(40)) for _ in range(20)]
    for text in samples:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert len(tok.encode("Ελληνικά", add_bos=False)) == len("Ελληνικά".encode())   # no merges outside ASCII


def test_chat_prompt_encodes(tok):
    prompt = chat_prompt([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "A fable?"}])
    ids = tok.encode(prompt)
    assert ids[:2] == [1, 3] and ids[-3:] == [4, 16 + 10, 16 + 10]          # ...<|header_end|>\n\n
    assert ids[0] == 1 and ids.count(1) == 1                 # BOS once, not doubled
    assert ids.count(3) == 3 and ids.count(4) == 3 and ids.count(6) == 2      # 3 headers, 2 finished turns
    assert tok.decode(ids) == prompt


def test_shipped_tokenizer_is_rebuilt_exactly(docs, tmp_path):
    corpus.train_tokenizer(docs, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shipped = hashlib.sha256((data.corpus_dir() / name).read_bytes()).hexdigest()
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == shipped, name
