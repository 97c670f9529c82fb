"""Data: text files to packed training rows (``packing``), the tokenizer (``tokenizer``), chat templates
(``chat``), images to pixel tiles and prompt expansion (``images``), and the shipped public-domain corpus with its
tokenizer (``corpus``)."""

from .corpus import corpus_dir, corpus_files
from .packing import PackedDataset, read_documents, tokenize
from .chat import chat_prompt
from .tokenizer import Tokenizer

__all__ = ["PackedDataset", "Tokenizer", "chat_prompt", "corpus_dir", "corpus_files", "read_documents", "tokenize"]
