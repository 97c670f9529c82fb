"""Small chat examples made from the shipped public-domain corpus, for ``configs/tiny-sft.yaml`` and the tests.

``corpus/chat.jsonl`` holds one conversation per corpus document (373), made by ``chat_examples`` and written by
``python -m l4jax.data.examples`` (deterministic: the same file comes out). Three shapes, in turn: asked for a
story, the assistant tells its opening; asked how a story begins and then how it ends (after a system message), it
quotes the first and the last sentence; asked for a story's first line, it gives it. Each fits a 256-token row of
the shipped 512-token tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .corpus import corpus_dir, corpus_files
from .packing import read_documents

CHAT_FILE = "chat.jsonl"
_SENTENCE = re.compile(r"(?<=[.!?])[\"']?\s+(?=[A-Z\"'])")


def _short(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut at a word boundary to at most ``limit`` characters (then "...")."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:text.rfind(" ", 0, limit)] + "..."


def _title(first_line: str) -> str:
    return " ".join(w.capitalize() if w.isupper() or w.istitle() else w for w in first_line.split())


def chat_examples(documents: list[str]) -> list[dict]:
    """One conversation ({"messages": [...]}) per document: a title line, a blank line, then the text."""
    out = []
    for k, doc in enumerate(documents):
        head, _, body = doc.partition("\n\n")
        title, sentences = _title(head.strip()), [s for s in _SENTENCE.split(" ".join(body.split())) if s]
        if k % 3 == 0:
            messages = [{"role": "user", "content": f"Tell me the story of {title}."},
                        {"role": "assistant", "content": _short(" ".join(sentences[:2]))}]
        elif k % 3 == 1:
            messages = [{"role": "system", "content": "You are a storyteller. Answer briefly."},
                        {"role": "user", "content": f'How does "{title}" begin?'},
                        {"role": "assistant", "content": _short(sentences[0], 140)},
                        {"role": "user", "content": "And how does it end?"},
                        {"role": "assistant", "content": _short(sentences[-1], 140)}]
        else:
            line = body.strip().splitlines()[0] if body.strip() else title
            messages = [{"role": "user", "content": f'What is the first line of "{title}"?'},
                        {"role": "assistant", "content": _short(line)}]
        out.append({"messages": messages})
    return out


def write_chat_examples(folder: Path | None = None) -> Path:
    """Write ``chat.jsonl`` from the shipped corpus into ``folder`` (default: the corpus folder)."""
    path = Path(folder or corpus_dir()) / CHAT_FILE
    lines = [json.dumps(c, ensure_ascii=False) for c in chat_examples(read_documents(corpus_files()))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_chat_examples())
