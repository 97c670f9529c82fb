"""Chat templates rendered with jinja2 as transformers renders them: the shipped official Llama 4 template against
transformers' ``apply_chat_template`` (text and token ids) on conversations with tools, tool calls, tool results,
images and system parts; a folder's own template; errors naming the template."""

import json
import shutil

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.llama4.processing_llama4 import chat_template as HF_TEMPLATE

import l4jax
from l4jax.data import Tokenizer, corpus_dir
from l4jax.data.chat import ChatTemplateError, chat_prompt, official_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place, now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time <UTC> & date",
                                          "parameters": {"type": "object", "properties": {}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}

# (messages, tools): every case the template renders differently.
CASES = {
    "one user turn": ([{"role": "user", "content": "naïve café 日本?"}], None),
    "system, turns": ([{"role": "system", "content": " sys \n"}, {"role": "user", "content": " u "},
                       {"role": "assistant", "content": "a\n"}, {"role": "user", "content": "again"}], None),
    "images": ([{"role": "user", "content": [{"type": "text", "text": "two images: "}, {"type": "image"},
                                             {"type": "text", "text": " and "}, {"type": "image"}]}], None),
    "system as parts": ([{"role": "system", "content": [{"type": "text", "text": "\tsystem as parts "}]},
                         {"role": "user", "content": "q"}], None),
    "late system": ([{"role": "user", "content": "q"}, {"role": "system", "content": " late "}], None),
    "tools": ([{"role": "user", "content": " Weather in Zürich? "}], [WEATHER, CLOCK]),
    "tools + system": ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Time?"}], [CLOCK]),
    "tool call": ([{"role": "user", "content": "Weather?"},
                   {"role": "assistant", "content": "", "tool_calls": [CALL]}], None),
    "tool call, text": ([{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, CALL]}], None),
    "tool call, string arguments": ([{"role": "assistant", "content": [{"type": "text", "text": "x"}], "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": "{}"}}]}], None),
    "tool result": ([{"role": "user", "content": "Weather?"},
                     {"role": "assistant", "content": "", "tool_calls": [CALL]},
                     {"role": "tool", "content": {"temperature": 21, "sky": "clear"}}], [WEATHER]),
    "tool result as text": ([{"role": "user", "content": "Weather?"},
                             {"role": "tool", "content": "21 degrees"}], None),
    "ipython role": ([{"role": "user", "content": "2+2?"}, {"role": "ipython", "content": [4]}], None),
    "empty tool_calls": ([{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello", "tool_calls": []}], None),
    "image and tools": ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
                         {"role": "assistant", "content": "Paris."}], [WEATHER]),
    "unicode, specials in text": ([{"role": "user", "content": "🙂 <|eot|> & <b>"}], None),
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(corpus_dir())


@pytest.fixture(scope="module")
def hf():
    return PreTrainedTokenizerFast(tokenizer_file=str(corpus_dir() / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad|>")


def test_the_shipped_template_is_transformers_llama4_template():
    assert official_template() == HF_TEMPLATE


def test_by_hand():
    messages = [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert l4jax.chat_prompt(messages) == (
        "<|begin_of_text|>"
        "<|header_start|>system<|header_end|>\n\nYou are terse.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi!<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHello.<|eot|>"
        "<|header_start|>user<|header_end|>\n\n<|image|>What is this?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n")
    # The official template skips an assistant message with an empty tool_calls list (transformers renders the same).
    assert chat_prompt([{"role": "assistant", "content": "x", "tool_calls": []}], False) == "<|begin_of_text|>"
    call = chat_prompt([{"role": "assistant", "content": "", "tool_calls": [CALL]}], add_generation_prompt=False)
    assert call == ('<|begin_of_text|><|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>'
                    '{"name": "get_weather", "parameters": {"city": "Zürich"}}<|eot|>')


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_text_and_ids_match_transformers(tok, hf, case, gen):
    messages, tools = CASES[case]
    expect = hf.apply_chat_template(messages, tools=tools, chat_template=HF_TEMPLATE, tokenize=False,
                                    add_generation_prompt=gen)
    ours = chat_prompt(messages, add_generation_prompt=gen, tools=tools)
    assert ours == expect
    assert tok.chat_prompt(messages, add_generation_prompt=gen, tools=tools) == expect  # no template: the official
    ids = hf.apply_chat_template(messages, tools=tools, chat_template=HF_TEMPLATE, tokenize=True,
                                 add_generation_prompt=gen, return_dict=False)
    assert tok.encode(ours) == list(ids)


@pytest.mark.parametrize("where", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json", "named"])
def test_a_folders_own_template(tmp_path, where):
    """A folder's template wins over the official one, wherever transformers would find it."""
    shutil.copytree(corpus_dir(), tmp_path / "m")
    own = ("{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}"
           "{% generation %}|{% endgeneration %}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    cfg_path = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if where == "chat_template.jinja":
        (tmp_path / "m" / where).write_text(own)
    elif where == "chat_template.json":
        (tmp_path / "m" / where).write_text(json.dumps({"chat_template": own}))
    else:
        cfg["chat_template"] = own if where == "tokenizer_config.json" else [
            {"name": "tool_use", "template": "unused"}, {"name": "default", "template": own}]
        cfg_path.write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = Tokenizer(tmp_path / "m").chat_prompt(messages)
    assert ours == "<|begin_of_text|>[USER] hi|[ASSISTANT] yo|>"
    if where != "chat_template.json":  # transformers' processors read that file, its tokenizers do not
        assert ours == AutoTokenizer.from_pretrained(tmp_path / "m").apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_errors_name_the_template(tmp_path):
    with pytest.raises(ChatTemplateError, match=r"official Llama 4 template.*no first user message"):
        chat_prompt([{"role": "system", "content": "s"}], tools=[WEATHER])
    with pytest.raises(ChatTemplateError, match=r"message 1: expected a dict with a 'role' string"):
        chat_prompt([{"role": "user", "content": "a"}, {"content": "no role"}])
    with pytest.raises(ChatTemplateError, match=r"messages: expected a list of messages, got str"):
        chat_prompt("hi")
    with pytest.raises(ChatTemplateError, match=r"tools: expected a list of JSON schemas"):
        chat_prompt([{"role": "user", "content": "a"}], tools={"name": "f"})
    shutil.copytree(corpus_dir(), tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match=r"chat_template.jinja: not a valid Jinja template \(line 1"):
        Tokenizer(tmp_path / "m").chat_prompt([{"role": "user", "content": "a"}])
    (tmp_path / "m" / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # the sandbox refuses
    with pytest.raises(ChatTemplateError, match=r"chat_template.jinja: .*unsafe|chat_template.jinja: .*__class__"):
        Tokenizer(tmp_path / "m").chat_prompt([{"role": "user", "content": "a"}])
