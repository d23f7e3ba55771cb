"""LangChain's ``ChatOpenAI``, unchanged, against part5/combined_app: structured output (its
default method, ``json_schema``), tool binding, and a tool result sent back.

One server (real default model, uvicorn in a thread on 127.0.0.1) serves the whole module.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

pytestmark = pytest.mark.slow


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int


@tool
def get_weather(city: str) -> str:
    """The weather now in a city."""
    return f"Sunny in {city}, 21 C."


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    settings = ServerSettings(
        threads=1, home=tmp_path_factory.mktemp("home"), parallel=2, max_tokens_limit=512
    )
    with running_server(settings) as url:
        yield ChatOpenAI(
            base_url=f"{url}/v1",
            api_key="unused",
            model="smollm2-135m-instruct",
            temperature=0,
            max_tokens=80,
            max_retries=0,
            timeout=180,
        )


def test_with_structured_output_returns_the_pydantic_object(llm):
    extract = llm.with_structured_output(Person)  # method="json_schema", strict
    person = extract.invoke("Alice is 30 years old. Extract the person.")
    assert isinstance(person, Person) and person.name


def test_bind_tools_gives_tool_calls_with_parsed_arguments(llm):
    with_tools = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    reply = with_tools.invoke("What is the weather in Paris?")
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert call["id"].startswith("call_")
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    # The tool's result goes back in a ToolMessage; the conversation is accepted and answered.
    question = HumanMessage("What is the weather in Paris?")
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.bind_tools([get_weather], tool_choice="none").invoke([question, reply, result])
    assert answer.content and not answer.tool_calls


def test_a_streamed_tool_call_is_put_back_together_by_langchain(llm):
    with_tools = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    whole = with_tools.invoke("What is the weather in Paris?")
    merged = None
    for chunk in with_tools.stream("What is the weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        (c["name"], c["args"]) for c in whole.tool_calls
    ]
