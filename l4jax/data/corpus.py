"""The public-domain corpus shipped with l4jax, and the byte-level BPE tokenizer trained on it.

``corpus/*.txt`` holds Aesop's fables and Grimms' tales (see ``corpus/SOURCE.md``); ``corpus/tokenizer.json`` and
``tokenizer_config.json`` a 512-id byte-level BPE trained on them, so the training demo needs nothing from the
network. The folder is also a tokenizer folder: ``Tokenizer(corpus_dir())``. ``python -m l4jax.data.corpus``
rebuilds the tokenizer from the corpus (deterministic: the same files come out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .packing import read_documents
from .tokenizer import BOS, END_OF_TEXT, EOM, EOT, HEADER_END, HEADER_START, IMAGE

PAD = "<|finetune_right_pad|>"
# The Llama 4 specials the tokenizer wrapper, its chat template and the vision prompt format use, at the bottom of
# the vocabulary so that pad / bos / eos are 0 / 1 / 2 as in configs/tiny.yaml. Then the 256 byte symbols (id
# N_SPECIAL + byte value), then the learned merges.
SPECIAL_TOKENS = (PAD, BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOM, EOT, "<|step|>",
                  "<|python_start|>", "<|python_end|>", "<|image_start|>", "<|image_end|>", IMAGE, "<|patch|>",
                  "<|tile_x_separator|>", "<|tile_y_separator|>")
N_SPECIAL = len(SPECIAL_TOKENS)
VOCAB_SIZE = 512


def corpus_dir() -> Path:
    """The shipped corpus folder; it is also a tokenizer folder: ``Tokenizer(corpus_dir())``."""
    return Path(__file__).resolve().parent / "corpus"


def corpus_files() -> list[Path]:
    """The shipped corpus text files, sorted by name."""
    return sorted(corpus_dir().glob("*.txt"))


# -- the tokenizer ----------------------------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each byte value 0..255 (GPT-2's mapping).

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, DEL, NBSP, soft hyphen) take
    code points 256, 257, ... in byte order, so that no symbol is whitespace or invisible.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, moved = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + moved))
            moved += 1
    return out


def train_tokenizer(docs: Sequence[str], folder: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE on ``docs`` and write ``tokenizer.json`` and ``tokenizer_config.json`` to ``folder``.

    Vocabulary: ids 0..N_SPECIAL-1 the SPECIAL_TOKENS, then byte b at id N_SPECIAL + b, then merges in the order
    learned, vocab_size ids in all. The ``tokenizers`` trainer orders its byte symbols by code point, so its
    vocabulary is renumbered here into that fixed layout; the merges are unchanged. Returns ``folder``.
    """
    n_merges = vocab_size - N_SPECIAL - 256
    if n_merges < 0:
        raise ValueError(f"vocab_size must be >= {N_SPECIAL + 256} (specials + bytes), got {vocab_size}")
    symbols = _byte_symbols()
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=256 + n_merges, initial_alphabet=symbols,
                                                      show_progress=False))
    learned = json.loads(bpe.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({s: N_SPECIAL + b for b, s in enumerate(symbols)})
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Like the released Llama 4 export (the l4jax wrapper adds BOS itself and ignores this).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in enumerate(SPECIAL_TOKENS)}
    config = {"bos_token": BOS, "eos_token": END_OF_TEXT, "pad_token": PAD, "added_tokens_decoder": added,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


if __name__ == "__main__":
    # Rebuild the shipped tokenizer from the shipped corpus (deterministic: the same files come out).
    print(train_tokenizer(read_documents(corpus_files()), corpus_dir()))
