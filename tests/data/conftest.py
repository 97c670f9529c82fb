"""Fixtures of the data tests: the shipped corpus, its tokenizer, and its documents as token ids."""

import pytest

from l4jax import data


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer(data.corpus_dir())


@pytest.fixture(scope="module")
def docs():
    return data.read_documents(data.corpus_files())


@pytest.fixture(scope="module")
def tokens(docs, tok):
    return data.tokenize(docs, tok)
