"""llmlab.tool_formats: which templates get the native ``<tool_call>`` format, how a tool
conversation renders with the model's own template, the grammar that holds a reply (checked
with llama.cpp's grammar sampler, and sampled at temperature 1 on a model whose GGUF carries
a Qwen2.5 template), and reading calls back."""

from __future__ import annotations

import json

import gguf
import jsonschema
import pytest
from test_structured import ADD, HIRE, NOW, accepts  # noqa: F401 (a fixture)

from llmlab import registry
from llmlab.engine import Engine, Request
from llmlab.tool_formats import GENERIC, HERMES, render_prompt, tool_format

CALL_1 = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
]


def default_template() -> str:
    reader = gguf.GGUFReader(registry.resolve(None).path)
    return reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()


def test_a_qwen2_5_template_is_native_and_smollm2s_own_is_generic(hermes_template):
    assert tool_format(hermes_template) is HERMES
    assert tool_format(default_template()) is GENERIC
    assert tool_format(None) is GENERIC
    # <tool_call> in a template that never renders tools is not enough
    assert tool_format("{{ messages[0].content }} <tool_call>") is GENERIC


def test_the_template_renders_the_tools_the_call_and_its_result(hermes_template):
    messages, tools = HERMES.prepare(CONVERSATION, [ADD, NOW])
    prompt = render_prompt(hermes_template, messages, tools)
    tools_block = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == [
        ADD.to_openai(),
        NOW.to_openai(),
    ]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 2, "b": 3}'


def test_content_in_parts_becomes_text_for_the_template():
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 3?"}]
    messages, tools = HERMES.prepare([{"role": "user", "content": parts}], None)
    assert messages == [{"role": "user", "content": "What is 2 + 3?"}] and tools is None


def test_a_tool_result_that_answers_no_call_is_refused():
    with pytest.raises(ValueError, match=r"messages\[1\]: tool result for tool_call_id 'x'"):
        HERMES.prepare(
            [CONVERSATION[0], {"role": "tool", "tool_call_id": "x", "content": "5"}], [ADD]
        )


@pytest.mark.parametrize(
    "choice, parallel, allowed",
    [
        ("auto", True, {"text", "call", "calls", "text+call"}),
        ("required", True, {"call", "calls"}),
        ("required", False, {"call"}),
        ("add", True, {"call"}),
        ("none", True, {"text"}),
    ],
)
def test_the_grammar_allows_what_the_choice_allows(accepts, choice, parallel, allowed):  # noqa: F811
    samples = {
        "text": "It is 3.",
        "call": CALL_1,
        "calls": f"{CALL_1}\n{CALL_2}",
        "text+call": f"Let me add.\n{CALL_1}",
        "bad arguments": CALL_1.replace('"b": 2', '"b": "two"'),
        "unknown tool": CALL_1.replace('"add"', '"sub"'),
        "text after a call": f"{CALL_1}\nDone.",
        "a tag in text": "I write <tool_call> here.",
    }
    gbnf = HERMES.grammar([ADD, NOW], choice, parallel)
    assert {name for name, text in samples.items() if accepts(gbnf, text)} == allowed


def test_the_grammar_holds_parameters_with_refs(accepts):  # noqa: F811
    gbnf = HERMES.grammar([HIRE], "required", True)
    call = {"name": "hire", "arguments": {"name": "A", "age": 1}}
    assert accepts(gbnf, f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    assert not accepts(gbnf, '<tool_call>\n{"name": "hire", "arguments": {}}\n</tool_call>')


def test_parse_reads_calls_and_the_text_before_them():
    content, calls = HERMES.parse(f"Let me add.\n{CALL_1}\n{CALL_2}")
    assert content == "Let me add."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2}),
        ("now", {}),
    ]
    assert len({c.id for c in calls}) == 2 and calls[0].id.startswith("call_")
    assert HERMES.parse(CALL_1)[0] is None
    assert HERMES.parse("It is 3.") == ("It is 3.", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert HERMES.parse(broken) == (broken, [])


@pytest.fixture(scope="module")
def hermes_engine(hermes_model):
    spec = registry.resolve(None).model_copy(update={"path": hermes_model})
    with Engine(spec, parallel=1, n_ctx=1024, threads=1) as engine:
        yield engine


def test_the_template_of_the_model_file_is_the_one_rendered(hermes_engine, hermes_template):
    assert tool_format(hermes_engine.chat_template) is HERMES
    messages, tools = HERMES.prepare(CONVERSATION, [ADD])
    # This template writes no BOS or EOS token, so the two renderings must match exactly.
    assert hermes_engine.apply_chat_template(messages, tools) == render_prompt(
        hermes_template, messages, tools
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_sampled_required_reply_is_always_a_valid_call(hermes_engine, seed):
    question = [{"role": "user", "content": "Add 17 and 25, please."}]
    messages, tools = HERMES.prepare(question, [ADD, NOW])
    grammar = HERMES.grammar([ADD, NOW], "required", True)
    request = Request.chat(
        messages, grammar, tools=tools, temperature=1.0, seed=seed, max_tokens=200
    )
    result = hermes_engine.submit(request).result()
    assert result.finish_reason == "stop", result.text
    content, calls = HERMES.parse(result.text)
    assert calls and content is None, result.text
    parameters = {t.name: t.parameters for t in (ADD, NOW)}
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), parameters[call.name])
