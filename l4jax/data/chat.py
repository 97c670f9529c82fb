"""Chat templates: a conversation -> the prompt text, rendered by the model folder's own Jinja template.

As transformers and vLLM do, the template is Jinja run in jinja2's immutable sandbox (templates come from model
folders: untrusted code), with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter that keeps non-ASCII text and does not escape HTML, and the globals ``raise_exception`` and
``strftime_now``. ``{% generation %}`` blocks (transformers' assistant-mask marker) render their body. So a
template renders here character for character as ``apply_chat_template`` renders it.

Where the template comes from (``folder_template``): ``chat_template.jinja``, else ``chat_template.json``, else
the ``chat_template`` field of ``tokenizer_config.json`` (a string, or a list of named templates: "default"). A
folder with none falls back to the official Llama 4 template shipped in ``templates/llama4.jinja`` (its source is in
``templates/README.md``).

Messages are dicts with a ``role`` and usually ``content``: a string or a list of parts ({"type": "text", "text":
...}, {"type": "image"}); assistant messages may carry ``tool_calls`` ([{"type": "function", "function": {"name",
"arguments"}}]); tool results use the role ``tool`` (or ``ipython``). ``tools`` is a list of JSON schemas.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

OFFICIAL = "llama4.jinja"
BOS = "<|begin_of_text|>"


class ChatTemplateError(ValueError):
    """A conversation the template refuses, or a template that fails; the message names the template's source."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text so; here the body renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@functools.cache
def official_template() -> str:
    """The Llama 4 instruct template shipped with l4jax (``templates/llama4.jinja``), read once."""
    return resources.files("l4jax.data").joinpath("templates", OFFICIAL).read_text(encoding="utf-8")


def folder_template(folder: str | Path) -> tuple[str, str] | None:
    """(template text, where it was found) of a model or tokenizer folder, or None when it has none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8"), str(folder / "chat_template.jinja")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ChatTemplateError(f"{path}: not a JSON object ({e})") from None
        if isinstance(value, list):  # named templates, as tokenizer_config.json may hold them
            value = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}.get("default")
        if value is not None:
            if not isinstance(value, str):
                raise ChatTemplateError(f"{path}: chat_template must be a string, got {type(value).__name__}")
            return value, str(path)
    return None


def _check(messages: Any, tools: Any) -> None:
    """The shape every template relies on; the template itself decides what it accepts beyond that."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages: expected a list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i}: expected a dict with a 'role' string, got {message!r:.80}")
    if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)
                              or not all(isinstance(t, Mapping) for t in tools)):
        raise ChatTemplateError(f"tools: expected a list of JSON schemas (dicts), got {tools!r:.80}")


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
           tools: Sequence[Mapping[str, Any]] | None = None, source: str = "chat template",
           **variables: Any) -> str:
    """Render ``messages`` with the Jinja ``template``. ``variables`` (``bos_token``, ``eos_token``, ...) are
    visible to the template as transformers passes a tokenizer's special tokens. Errors name ``source``."""
    _check(messages, tools)
    try:
        return _compile(template).render(messages=[dict(m) for m in messages], tools=None if tools is None else
                                         [dict(t) for t in tools], documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined fields, sandbox refusals
        raise ChatTemplateError(f"{source}: {e}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # e.g. content of the wrong kind
        raise ChatTemplateError(f"{source}: cannot render these messages ({type(e).__name__}: {e})") from None


def chat_prompt(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The official Llama 4 instruct template's rendering of ``messages`` (with ``tools``, function calling):
    ``<|begin_of_text|><|header_start|>user<|header_end|>\\n\\n...<|eot|>`` and, with ``add_generation_prompt``,
    the assistant header for the model to continue. A model folder's own template: ``Tokenizer(path).chat_prompt``.
    """
    return render(official_template(), messages, add_generation_prompt=add_generation_prompt, tools=tools,
                  source=f"the official Llama 4 template ({OFFICIAL})", bos_token=BOS)
