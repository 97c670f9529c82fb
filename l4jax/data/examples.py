"""Small chat and preference examples made from the shipped public-domain corpus, for ``configs/tiny-sft.yaml``,
``configs/tiny-dpo.yaml`` and the tests; ``python -m l4jax.data.examples`` writes both files (deterministic: the
same bytes come out).

``corpus/chat.jsonl`` holds one conversation per corpus document (373), made by ``chat_examples``. Three shapes, in
turn: asked for a story, the assistant tells its opening; asked how a story begins and then how it ends (after a
system message), it quotes the first and the last sentence; asked for a story's first line, it gives it. Each fits
a 256-token row of the shipped 512-token tokenizer.

``corpus/preferences.jsonl`` holds one pair per document (made by ``preference_examples``): the chosen answer is
the story's own text, the rejected one another story's opening told for this title, the story's first sentence
given for its end, or a refusal. A pair (both sequences) fits a 384-token row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .corpus import corpus_dir, corpus_files
from .packing import read_documents

CHAT_FILE = "chat.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
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
        title, sentences, line = _parts(doc)
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
            messages = [{"role": "user", "content": f'What is the first line of "{title}"?'},
                        {"role": "assistant", "content": _short(line or title)}]
        out.append({"messages": messages})
    return out


def _parts(doc: str) -> tuple[str, list[str], str]:
    head, _, body = doc.partition("\n\n")
    sentences = [s for s in _SENTENCE.split(" ".join(body.split())) if s]
    return _title(head.strip()), sentences, (body.strip().splitlines() or [""])[0]


def preference_examples(documents: list[str]) -> list[dict]:
    """One pair ({"prompt", "chosen", "rejected"}) per document whose answers differ."""
    out = []
    for k, doc in enumerate(documents):
        title, sentences, line = _parts(doc)
        if not sentences:
            continue
        if k % 3 == 0:
            _, other, _ = _parts(documents[(k + len(documents) // 2) % len(documents)])
            prompt = f"Tell me the story of {title}."
            chosen, rejected = _short(" ".join(sentences[:2]), 120), _short(" ".join(other[:2]), 120)
        elif k % 3 == 1:
            prompt = [{"role": "system", "content": "You are a storyteller. Answer briefly."},
                      {"role": "user", "content": f'How does "{title}" end?'}]
            chosen, rejected = _short(sentences[-1], 120), _short(sentences[0], 120)
        else:
            prompt = f'What is the first line of "{title}"?'
            chosen, rejected = _short(line or title, 120), "I do not know that story."
        if chosen != rejected:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def write_examples(folder: Path | None = None) -> list[Path]:
    """Write ``chat.jsonl`` and ``preferences.jsonl`` from the shipped corpus into ``folder`` (default: the
    corpus folder)."""
    docs = read_documents(corpus_files())
    paths = []
    for name, make in ((CHAT_FILE, chat_examples), (PREFERENCES_FILE, preference_examples)):
        path = Path(folder or corpus_dir()) / name
        path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in make(docs)), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    print(*write_examples(), sep="\n")
