"""``backend.chat(messages, schema=...)`` on the real default model: sampled replies (temperature
1, several seeds) always come back as validated objects on llama.cpp, the batching engine and
transformers; a reply cut short by max_tokens and a schema no grammar can hold are clear errors."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from llmlab import backends
from llmlab.engine import Engine
from llmlab.structured import (
    ReplyCutShortError,
    SchemaError,
    grammar_for_schema,
    json_schema_of,
    validate_reply,
)

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Invent a person. Give their name, age and hobbies as JSON."}]
SEEDS = range(4)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int
    hobbies: list[str] = Field(max_length=3)  # unbounded lists let a small model repeat forever


COLOUR = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
    "required": ["colour", "sure"],
}


@pytest.fixture(scope="module")
def llama():
    with backends.load(backend="llama.cpp") as model:
        yield model


@pytest.mark.parametrize("seed", SEEDS)
def test_llama_cpp_sampled_replies_are_validated_objects(llama, seed):
    person = llama.chat(ASK, schema=Person, temperature=1.0, seed=seed, max_tokens=200)
    assert isinstance(person, Person)


def test_a_dict_schema_gives_a_dict(llama):
    sky = [{"role": "user", "content": "What colour is the sky?"}]
    reply = llama.chat(sky, schema=COLOUR, temperature=1.0, seed=1, max_tokens=32)
    assert reply["colour"] in ("red", "green", "blue") and isinstance(reply["sure"], bool)


def test_a_reply_cut_short_says_so_and_what_to_do(llama):
    with pytest.raises(
        ReplyCutShortError, match=r"cut short at max_tokens \(4 tokens\).*Raise max_tokens"
    ):
        llama.chat(ASK, schema=Person, temperature=0, max_tokens=4)


def test_a_schema_no_grammar_can_hold_fails_before_decoding(llama):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    with pytest.raises(SchemaError, match=r"'minimum' at \$.properties.n"):
        llama.chat(ASK, schema=schema, max_tokens=8)


def test_the_engine_holds_sampled_replies_to_the_schema():
    grammar = grammar_for_schema(json_schema_of(Person))
    with Engine(parallel=4, n_ctx=512) as engine:
        results = engine.generate([engine_request(grammar, seed) for seed in SEEDS])
    for result in results:
        assert result.finish_reason == "stop"
        assert isinstance(validate_reply(result.text, Person), Person)


def engine_request(grammar, seed):
    from llmlab.engine import Request

    return Request.chat(ASK, grammar=grammar, temperature=1.0, seed=seed, max_tokens=200)


def test_transformers_sampled_replies_are_validated_objects():
    # Small replies: the grammar checks the whole vocabulary at every step here (slow on CPU).
    sky = [{"role": "user", "content": "What colour is the sky?"}]
    with backends.load(backend="transformers") as model:
        for seed in range(3):
            reply = model.chat(sky, schema=COLOUR, temperature=1.0, seed=seed, max_tokens=32)
            assert reply["colour"] in ("red", "green", "blue") and isinstance(reply["sure"], bool)
