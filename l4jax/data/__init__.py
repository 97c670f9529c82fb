"""Data: text files to packed training rows (``packing``), the tokenizer and chat template (``tokenizer``), images
to pixel tiles and prompt expansion (``images``), and the shipped public-domain corpus with its tokenizer
(``corpus``)."""

from .corpus import corpus_dir, corpus_files
from .packing import PackedDataset, read_documents, tokenize
from .tokenizer import Tokenizer, chat_prompt

__all__ = ["PackedDataset", "Tokenizer", "chat_prompt", "corpus_dir", "corpus_files", "read_documents", "tokenize"]
