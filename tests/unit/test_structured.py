"""llmlab.structured: schema -> grammar (checked by llama.cpp's own grammar sampler on the
default model's vocabulary), schema errors that name the part, the generic tool-call format,
and turning an OpenAI tool conversation into plain messages."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from llmlab.structured import (
    SchemaError,
    StructuredOutputError,
    Tool,
    ToolCall,
    grammar_for_schema,
    json_schema_of,
    parse_tool_reply,
    prepare_messages,
    tool_grammar,
    tool_prompt,
    tool_reply_schema,
    tools_from_openai,
    validate_reply,
)


class Person(BaseModel):
    name: str
    age: int


class Team(BaseModel):
    lead: Person
    members: list[Person]


class Counted(BaseModel):
    n: int = Field(ge=0)


ADD = Tool(
    "add",
    "Add two numbers.",
    {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
        "required": ["a", "b"],
    },
)
NOW = Tool("now", "The time.", {"type": "object", "properties": {}})
HIRE = Tool("hire", "Hire a person.", Person.model_json_schema() | {"$defs": {}})
TEAM = Tool("team", "Form a team.", Team.model_json_schema())


@pytest.fixture(scope="module")
def accepts():
    """``accepts(gbnf, text)``: does llama.cpp's grammar sampler allow exactly ``text``?

    The text is tokenized with the default model's vocabulary, each token must be allowed in
    turn, and then end-of-generation must be allowed (the grammar is complete).
    """
    import llama_cpp as ll

    from llmlab import registry
    from llmlab.sampling import Grammar

    ll.llama_backend_init()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(registry.resolve(None).path).encode(), params)
    vocab = ll.llama_model_get_vocab(model)

    def tokens(text):
        data = text.encode()
        buf = (ll.llama_token * (len(data) + 8))()
        n = ll.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
        return list(buf[:n])

    def check(gbnf, text):
        grammar = Grammar(vocab, gbnf)
        try:
            for token in tokens(text):
                if not grammar.allows(token):
                    return False
                grammar.accept(token)
            return grammar.allows(ll.llama_vocab_eos(vocab))
        finally:
            grammar.free()

    yield check
    ll.llama_model_free(model)


def test_a_pydantic_schema_becomes_a_grammar_that_holds_it(accepts):
    gbnf = grammar_for_schema(json_schema_of(Person))
    assert accepts(gbnf, '{"name": "Ann", "age": 31}')
    assert not accepts(gbnf, '{"name": "Ann"}')  # a required field missing
    assert not accepts(gbnf, '{"name": "Ann", "age": 31.5}')  # not an integer
    assert not accepts(gbnf, '{"name": "Ann", "age": 31} and more')
    assert not accepts(gbnf, "Ann is 31")


def test_nested_models_with_refs_and_lists(accepts):
    gbnf = grammar_for_schema(json_schema_of(Team))
    lead = '{"name": "A", "age": 1}'
    assert accepts(gbnf, f'{{"lead": {lead}, "members": [{lead}, {lead}]}}')
    assert accepts(gbnf, f'{{"lead": {lead}, "members": []}}')
    assert not accepts(gbnf, f'{{"lead": {lead}, "members": [1]}}')


def test_a_dict_schema_with_enum_and_optional_fields(accepts):
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green"]},
            "note": {"type": "string", "maxLength": 3},
        },
        "required": ["colour"],
    }
    gbnf = grammar_for_schema(schema)
    assert accepts(gbnf, '{"colour": "red"}')
    assert accepts(gbnf, '{"colour": "green", "note": "ok"}')
    assert not accepts(gbnf, '{"colour": "blue"}')
    assert not accepts(gbnf, '{"colour": "red", "note": "too long"}')


@pytest.mark.parametrize(
    "schema, part",
    [
        (
            {"type": "object", "properties": {"x": {"patternProperties": {"^a": {}}}}},
            "'patternProperties' at $.properties.x",
        ),
        (
            json_schema_of(
                type("M", (BaseModel,), {"__annotations__": {"n": int}, "n": Field(ge=0)})
            ),
            "'minimum' at $.properties.n",
        ),
        (
            {"type": "array", "items": {"type": "string", "format": "email"}},
            "format 'email' at $.items",
        ),
        ({"$ref": "https://example.com/s.json"}, "$ref 'https://example.com/s.json' at $"),
        ({"not": {"type": "string"}}, "'not' at $"),
        ({"anyOf": [{"type": "integer"}, {"uniqueItems": True}]}, "'uniqueItems' at $.anyOf[1]"),
    ],
)
def test_a_schema_the_grammar_cannot_hold_is_an_error_naming_the_part(schema, part):
    with pytest.raises(SchemaError, match="unsupported in a JSON schema grammar") as err:
        grammar_for_schema(schema)
    assert part in str(err.value)


def test_an_invalid_json_schema_is_an_error_saying_where():
    with pytest.raises(SchemaError, match=r"not a valid JSON schema at \$.properties.x"):
        grammar_for_schema({"type": "object", "properties": {"x": {"type": 5}}})
    with pytest.raises(SchemaError, match="is an object"):
        grammar_for_schema(["not", "a", "schema"])


def test_validate_reply_returns_the_object_or_names_what_failed():
    assert validate_reply('{"name": "Ann", "age": 3}', Person) == Person(name="Ann", age=3)
    assert validate_reply("[1, 2]", list[int]) == [1, 2]
    schema = json_schema_of(Person)
    assert validate_reply('{"name": "Ann", "age": 3}', schema) == {"name": "Ann", "age": 3}
    with pytest.raises(StructuredOutputError, match="age: Field required"):
        validate_reply('{"name": "Ann"}', Person)
    with pytest.raises(StructuredOutputError, match=r"at \$.age: 'x' is not of type 'integer'"):
        validate_reply('{"name": "Ann", "age": "x"}', schema)
    with pytest.raises(StructuredOutputError, match="not JSON"):
        validate_reply('{"name": ', schema)


CALL_ADD = '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2.5}}]}'
CALL_NOW = '{"tool_calls": [{"name": "now", "arguments": {}}]}'
CALL_BAD_ARGS = '{"tool_calls": [{"name": "add", "arguments": {"a": 1}}]}'
CALL_UNKNOWN = '{"tool_calls": [{"name": "sub", "arguments": {}}]}'
TWO_CALLS = f'{{"tool_calls": [{json.loads(CALL_ADD)["tool_calls"][0]}, {{"name": "now", "arguments": {{}}}}]}}'.replace(
    "'", '"'
)
RESPONSE = '{"response": "It is 3.5."}'


@pytest.mark.parametrize(
    "choice, allowed",
    [
        ("auto", {CALL_ADD, CALL_NOW, TWO_CALLS, RESPONSE}),
        ("required", {CALL_ADD, CALL_NOW, TWO_CALLS}),
        ("add", {CALL_ADD}),
        ("none", {RESPONSE}),
    ],
)
def test_tool_grammar_allows_what_the_choice_allows(accepts, choice, allowed):
    gbnf = tool_grammar([ADD, NOW], choice)
    samples = {CALL_ADD, CALL_NOW, TWO_CALLS, RESPONSE, CALL_BAD_ARGS, CALL_UNKNOWN, "It is 3.5."}
    assert {s for s in samples if accepts(gbnf, s)} == allowed


def test_tool_grammar_holds_parameters_with_refs_of_several_tools(accepts):
    gbnf = tool_grammar([HIRE, TEAM], "required")
    lead = {"name": "A", "age": 1}
    team = {"name": "team", "arguments": {"lead": lead, "members": [lead]}}
    assert accepts(gbnf, json.dumps({"tool_calls": [team]}))
    assert accepts(gbnf, json.dumps({"tool_calls": [{"name": "hire", "arguments": lead}]}))
    bad = {"name": "team", "arguments": {"lead": {"name": "A"}, "members": []}}
    assert not accepts(gbnf, json.dumps({"tool_calls": [bad]}))


def test_tool_choice_naming_an_unknown_tool_is_an_error_listing_the_tools():
    with pytest.raises(ValueError, match="unknown tool 'sub'. Available: add, now"):
        tool_reply_schema([ADD, NOW], "sub")


def test_tool_parameters_the_grammar_cannot_hold_are_a_schema_error():
    bad = Tool("f", "", {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}})
    with pytest.raises(SchemaError, match="'minimum' at"):
        tool_grammar([bad])


def test_tools_from_openai_and_bad_entries():
    openai = [ADD.to_openai(), {"type": "function", "function": {"name": "now"}}]
    tools = tools_from_openai(openai)
    assert tools[0] == ADD
    assert tools[1] == Tool("now", "", {"type": "object", "properties": {}})
    with pytest.raises(ValueError, match=r"tools\[0\]: the function has no name"):
        tools_from_openai([{"type": "function", "function": {"description": "x"}}])
    with pytest.raises(ValueError, match=r"tools\[1\]: 'function'"):
        tools_from_openai([ADD.to_openai(), {"type": "function"}])
    with pytest.raises(ValueError, match="add appear more than once"):
        tools_from_openai([ADD.to_openai(), ADD.to_openai()])


def test_parse_tool_reply():
    content, calls = parse_tool_reply(TWO_CALLS)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2.5}),
        ("now", {}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert parse_tool_reply(RESPONSE) == ("It is 3.5.", [])
    assert parse_tool_reply("plain text") == ("plain text", [])


def test_tool_prompt_names_each_tool_and_the_format():
    prompt = tool_prompt([ADD, NOW])
    assert "- add: Add two numbers." in prompt
    assert '"required": ["a", "b"]' in prompt
    assert '{"tool_calls": [{"name": "<tool name>"' in prompt
    assert '{"response": "<your answer>"}' in prompt


def test_prepare_messages_renders_calls_and_results_as_plain_messages():
    call = ToolCall("call_1", "add", '{"a": 1, "b": 2}')
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    out = prepare_messages(messages, [ADD])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    }
    assert out[3]["content"] == "Result of tool add (call call_1):\n3"
    assert all(set(m) == {"role", "content"} for m in out)


def test_prepare_messages_adds_a_system_message_and_joins_results_in_a_row():
    calls = [ToolCall("c1", "add", "{}").to_openai(), ToolCall("c2", "now", "{}").to_openai()]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ]
    out = prepare_messages(messages, [ADD, NOW])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert (
        out[3]["content"]
        == "Result of tool add (call c1):\n3\n\nResult of tool now (call c2):\nnoon"
    )
    assert prepare_messages([{"role": "user", "content": "hi"}], None) == [
        {"role": "user", "content": "hi"}
    ]


def test_a_tool_result_with_no_matching_call_is_an_error_naming_it():
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [ToolCall("c1", "add", "{}").to_openai()]},
        {"role": "tool", "tool_call_id": "c9", "content": "3"},
    ]
    with pytest.raises(
        ValueError, match=r"messages\[2\]: tool result for tool_call_id 'c9' matches no"
    ):
        prepare_messages(messages, [ADD])
