"""ChatSession: history, context budget, interruptions, figures and transcripts.

Budget and bookkeeping logic runs against a small fake backend (one token per word, a
visible template), so the expected drops can be worked out by hand; the last tests use
the real default model through llama.cpp.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from llmlab.backends.base import (
    Backend,
    BackendError,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
    Result,
    Timings,
    Usage,
    collect,
)
from llmlab.chat import ChatError, ChatSession, parse_param


class FakeBackend(Backend):
    """One token per word; template ``<role> content`` per message plus ``<assistant>``.

    Replies are ``"w1 w2 ... wN"`` (N = ``reply_words``, capped by max_tokens).
    ``raise_after`` makes the stream raise KeyboardInterrupt after that many chunks, the
    way a Ctrl-C lands in a remote backend that does not catch it.
    """

    name = "fake"

    def __init__(self, context: int = 1000, reply_words: int = 5, raise_after: int | None = None):
        self.context = context
        self.reply_words = reply_words
        self.raise_after = raise_after
        self.fail: Exception | None = None
        self.requests: list[tuple[list[Message], dict[str, Any]]] = []
        self.closed_streams = 0

    def prompt_tokens(self, messages: list[Message]) -> int:
        return self.count_tokens(self._render(messages))

    def _render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        text = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return text + (" <assistant>" if add_generation_prompt else "")

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream_chat(self, messages: list[Message], **params: Any) -> Iterator[Chunk]:
        gen = GenerationParams.from_kwargs(**params)
        self.requests.append((messages, params))
        prompt = self.count_tokens(self._render(messages))
        if prompt + gen.max_tokens > self.context:
            raise ContextOverflowError(prompt, gen.max_tokens, self.context)
        return self._stream(prompt, min(self.reply_words, gen.max_tokens), gen.max_tokens)

    def _stream(self, prompt: int, n: int, max_tokens: int) -> Iterator[Chunk]:
        try:
            if self.fail is not None:
                raise self.fail
            for i in range(n):
                if self.raise_after is not None and i == self.raise_after:
                    raise KeyboardInterrupt
                yield Chunk(f"w{i + 1}" if i == 0 else f" w{i + 1}")
            reason = "length" if n == max_tokens else "stop"
            yield Chunk("", reason, Usage(prompt, n), Timings(0.01, 0.05, n))
        finally:
            self.closed_streams += 1

    def chat(self, messages: list[Message], **params: Any) -> Result:
        return collect(self.stream_chat(messages, **params))

    def complete(self, prompt: str, **params: Any) -> Result:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"backend": "fake", "model": "fake-model:1"}

    def close(self) -> None:
        pass

    @property
    def context_length(self) -> int:
        return self.context


class RemoteLikeBackend(FakeBackend):
    """Like a remote server: no chat template the session can render."""

    def prompt_tokens(self, messages: list[Message]) -> None:
        return None


def test_send_records_the_exchange_with_token_counts_and_figures():
    session = ChatSession(FakeBackend(), system="Be brief.", params={"max_tokens": 10})
    result = session.send("name three colours")
    assert result.text == "w1 w2 w3 w4 w5"
    assert result.finish_reason == "stop"
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["tokens"] == 3
    reply = session.messages[1]
    assert reply["content"] == "w1 w2 w3 w4 w5" and reply["tokens"] == 5
    assert reply["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "cached_tokens": 0}
    assert reply["timings"]["tokens_per_second"] == pytest.approx(4 / 0.04)
    assert "interrupted" not in reply
    sent, params = session.backend.requests[0]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert sent[1] == {"role": "user", "content": "name three colours"}  # no bookkeeping keys
    assert params["max_tokens"] == 10


def test_stream_yields_pieces_and_the_last_chunk_carries_totals():
    session = ChatSession(FakeBackend())
    chunks = list(session.stream("hello"))
    assert "".join(c.text for c in chunks) == "w1 w2 w3 w4 w5"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 5
    assert session.last_result.text == "w1 w2 w3 w4 w5"


def test_empty_message_is_refused_and_not_added():
    session = ChatSession(FakeBackend())
    with pytest.raises(ChatError, match="Empty message"):
        session.stream("   ")
    assert session.messages == []


def test_oldest_turns_are_dropped_never_the_system_prompt_or_newest_message():
    # Each turn: user "q i x x" (4 tokens + 1 role marker) + reply 5 words (+1) = 11 tokens.
    backend = FakeBackend(context=60, reply_words=5)
    session = ChatSession(backend, system="sys prompt", params={"max_tokens": 10})
    for i in range(3):
        session.send(f"q{i} x x x")
        assert session.last_dropped == []
    # prompt now: 3 (system) + 3 * 11 + 5 (new user) + 1 (<assistant>) = 42; + 10 budget = 52 <= 60
    session.send("q3 x x x")
    assert session.last_dropped == []
    # next: 3 + 4 * 11 + 5 + 1 = 53, + 10 = 63 > 60: the oldest turn (q0 and its reply) goes.
    session.send("q4 x x x")
    assert [m["content"] for m in session.last_dropped] == ["q0 x x x", "w1 w2 w3 w4 w5"]
    sent, _ = backend.requests[-1]
    assert sent[0] == {"role": "system", "content": "sys prompt"}
    assert sent[-1]["content"] == "q4 x x x"
    assert [m["content"] for m in sent if m["role"] == "user"] == [
        "q1 x x x",
        "q2 x x x",
        "q3 x x x",
        "q4 x x x",
    ]
    assert session.prompt_tokens() + 10 <= 60 + 6  # the new reply is now history too


def test_a_long_message_drops_every_older_turn_and_shrinks_the_reply_budget():
    backend = FakeBackend(context=40, reply_words=50)
    session = ChatSession(backend, params={"max_tokens": 20})
    session.send("short question")
    long_message = " ".join(["word"] * 20)
    result = session.send(long_message)
    assert [m["role"] for m in session.last_dropped] == ["user", "assistant"]
    # 21 (message + marker) + 1 (<assistant>) = 22 prompt tokens: 18 left for the reply.
    assert backend.requests[-1][1]["max_tokens"] == 18
    assert result.finish_reason == "length" and result.usage.completion_tokens == 18


def test_a_message_that_cannot_fit_raises_and_leaves_history_untouched():
    session = ChatSession(FakeBackend(context=30))
    session.send("hi")
    before = [dict(m) for m in session.messages]
    with pytest.raises(ContextOverflowError, match="larger --ctx"):
        session.stream(" ".join(["word"] * 40))
    assert session.messages == before


def test_ctrl_c_inside_generation_keeps_the_partial_reply_marked():
    backend = FakeBackend(reply_words=5, raise_after=2)
    session = ChatSession(backend)
    chunks = list(session.stream("tell me a story"))
    assert "".join(c.text for c in chunks) == "w1 w2"
    assert chunks[-1].finish_reason == "interrupted"
    reply = session.messages[-1]
    assert reply == {**reply, "role": "assistant", "content": "w1 w2", "interrupted": True}
    assert reply["usage"]["completion_tokens"] == 2
    assert backend.closed_streams == 1
    backend.raise_after = None
    assert session.send("go on").text == "w1 w2 w3 w4 w5"  # the chat continues
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert "interrupted" not in session.messages[-1]


def test_caller_closing_the_stream_keeps_the_partial_reply_marked():
    backend = FakeBackend()
    session = ChatSession(backend)
    chunks = session.stream("hello")
    assert next(chunks).text == "w1"
    assert next(chunks).text == " w2"
    chunks.close()  # what the chat script does when Ctrl-C lands in its own loop
    assert session.messages[-1]["content"] == "w1 w2"
    assert session.messages[-1]["interrupted"] is True
    assert session.last_result.finish_reason == "interrupted"
    assert backend.closed_streams == 1


def test_a_request_that_fails_before_any_text_is_not_kept():
    backend = FakeBackend()
    session = ChatSession(backend)
    session.send("first")
    backend.fail = BackendError("server unreachable")
    with pytest.raises(BackendError, match="unreachable"):
        session.send("second")
    assert [m["content"] for m in session.messages] == ["first", "w1 w2 w3 w4 w5"]


def test_reset_system_and_params():
    session = ChatSession(FakeBackend(), system="old")
    session.send("hello")
    session.set_system("new")
    assert session.prompt_messages()[0] == {"role": "system", "content": "new"}
    session.set_params(temperature=0.2, top_p=0.9)
    assert (session.params.temperature, session.params.top_p) == (0.2, 0.9)
    with pytest.raises(TypeError, match="Unknown generation parameter"):
        session.set_params(temprature=1)
    session.reset()
    assert session.messages == [] and session.system == "new" and session.params.temperature == 0.2


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("temperature", "0.2", 0.2),
        ("max_tokens", "64", 64),
        ("seed", "none", None),
        ("stop", "a,b", ["a", "b"]),
    ],
)
def test_parse_param_converts_typed_text(name, text, value):
    assert parse_param(name, text) == value


def test_parse_param_rejects_bad_input():
    with pytest.raises(ChatError, match="Unknown parameter 'temp'"):
        parse_param("temp", "1")
    with pytest.raises(ChatError, match="max_tokens must be an integer"):
        parse_param("max_tokens", "lots")


def test_transcript_round_trip(tmp_path):
    session = ChatSession(
        FakeBackend(), system="Be brief.", params={"temperature": 0.0, "max_tokens": 12}
    )
    session.send("first question")
    backend = FakeBackend(raise_after=1)
    session.use_backend(backend)
    list(session.stream("second"))
    path = session.save(tmp_path / "chats" / "t.json")
    data = json.loads(path.read_text())
    assert data["model"] == "fake-model:1" and data["backend"] == "fake"
    assert data["parameters"]["temperature"] == 0.0 and data["parameters"]["max_tokens"] == 12
    assert [m["role"] for m in data["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert data["messages"][2]["timings"]["time_to_first_token"] == 0.01
    assert data["messages"][4]["interrupted"] is True

    resumed = ChatSession.from_file(path, FakeBackend())
    assert resumed.system == "Be brief."
    assert resumed.params == session.params
    assert resumed.messages == session.messages
    assert resumed.save(tmp_path / "again.json").read_text().count('"role"') == 5


def test_loading_bad_transcripts_says_what_is_wrong(tmp_path):
    session = ChatSession(FakeBackend())
    with pytest.raises(FileNotFoundError):
        session.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ChatError, match="not valid JSON"):
        session.load(bad)
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(ChatError, match="valid role"):
        session.load(bad)


def test_stats_report_history_and_last_reply():
    session = ChatSession(FakeBackend(context=100))
    session.send("one two")
    stats = session.stats()
    assert stats["model"] == "fake-model:1"
    assert stats["messages"] == 2 and stats["replies"] == 1
    assert stats["history_tokens"] == 7
    assert stats["context_length"] == 100
    assert stats["last_completion_tokens"] == 5 and stats["last_finish_reason"] == "stop"


def test_remote_backends_get_an_estimated_budget():
    backend = RemoteLikeBackend(context=40)
    session = ChatSession(backend, params={"max_tokens": 10})
    session.send("a b c")
    # system none: 3 + 5 (reply) + overhead 5 * (2 messages + 1) = 23
    assert session.prompt_tokens() == 23
    session.send("d e f")
    assert [m["content"] for m in session.last_dropped] == ["a b c", "w1 w2 w3 w4 w5"]


# ----- the real default model ---------------------------------------------------------


@pytest.fixture(scope="module")
def real_model():
    from llmlab import backends

    model = backends.load(backend="llama.cpp", n_ctx=512)
    yield model
    model.close()


@pytest.mark.slow
def test_real_model_prompt_count_matches_what_the_engine_saw(real_model, tmp_path):
    session = ChatSession(
        real_model,
        system="You answer in one short sentence.",
        params={"temperature": 0, "max_tokens": 12},
    )
    assert session.send("What is the capital of France?").text.strip()
    assert session.messages[0]["tokens"] == real_model.count_tokens(
        "What is the capital of France?"
    )
    session.send("And of Italy?")
    engine_saw = session.last_result.usage.prompt_tokens
    reply = session.messages.pop()  # back to the prompt the engine was given
    assert session.prompt_tokens() == engine_saw
    session.messages.append(reply)
    path = session.save(tmp_path / "real.json")
    resumed = ChatSession.from_file(path, real_model)
    assert resumed.prompt_tokens() == session.prompt_tokens()
    assert resumed.send("And of Spain?").text.strip()


# ----- the notebook's chat box ---------------------------------------------------------


def test_chat_box_streams_replies_into_the_html_and_resets():
    from llmlab.chat_widget import ChatBox

    box = ChatBox(ChatSession(FakeBackend()))
    assert box.send("is <b> bold?") == "w1 w2 w3 w4 w5"
    assert "<b>you:</b> is &lt;b&gt; bold?" in box.log.value
    assert "<b>model:</b> w1 w2 w3 w4 w5</div>" in box.log.value
    assert "5 tokens" in box.status.value and "tok/s" in box.status.value
    box.text.value = "typed and Enter pressed"  # what the Text widget does on Enter
    assert box.text.value == ""
    assert [m["content"] for m in box.session.messages][2:] == [
        "typed and Enter pressed",
        "w1 w2 w3 w4 w5",
    ]
    box.reset_button.click()
    assert box.session.messages == [] and "you:" not in box.log.value


def test_chat_box_shows_errors_and_interrupted_replies():
    from llmlab.chat_widget import ChatBox

    backend = FakeBackend(raise_after=2)
    box = ChatBox(ChatSession(backend))
    box.send("hello")
    assert "w1 w2 <span class='note'>(interrupted)</span>" in box.log.value
    backend.raise_after, backend.fail = None, BackendError("Cannot reach the model server")
    assert box.send("again") == ""
    assert "Cannot reach the model server" in box.status.value
    assert not box.text.disabled
