"""part5.combined_app.service.Generation: how the engine's chunks reach the event loop.

The engine thread hands over every token's chunk; the loop must be woken once for all
that arrive before it runs, not once per chunk (each wake-up takes the GIL from the
decode thread), and nothing may be lost or reordered on the way.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmlab.backends.base import Chunk, TokenLogprob, Usage
from llmlab.engine import EngineError
from part5.combined_app.errors import APIError
from part5.combined_app.service import Generation, Mailbox, merge_chunks


class FailedHandle:
    def result(self, timeout=None):
        raise EngineError("llama_decode returned -1")


def read_all(chunks_from_engine, spy_wakeups=None, handle=None):
    """Put the chunks from another thread while the loop is busy, then read the generation."""

    async def main():
        generation = Generation()
        generation.handle = handle
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe

        def counted(*args):
            calls.append(args)
            return real(*args)

        loop.call_soon_threadsafe = counted
        engine = threading.Thread(target=lambda: [generation._put(c) for c in chunks_from_engine])
        engine.start()
        engine.join()  # all of them arrive before the loop runs again
        got = []
        try:
            async for chunk in generation:
                got.append(chunk)
        finally:
            if spy_wakeups is not None:
                spy_wakeups.append(len(calls))
        return got

    return asyncio.run(main())


def logprob(token: int) -> TokenLogprob:
    return TokenLogprob(token=f"t{token}", logprob=-1.0, bytes=[], top_logprobs=[])


def test_chunks_that_arrive_together_wake_the_loop_once_and_come_as_one():
    usage = Usage(5, 3)
    chunks = [Chunk("Hel"), Chunk("lo"), Chunk(" you"), Chunk("", "length", usage)]
    wakeups = []
    got = read_all(chunks, wakeups)
    assert wakeups == [1]
    assert [(c.text, c.finish_reason, c.usage) for c in got] == [("Hello you", "length", usage)]


def test_a_decode_step_of_several_streams_wakes_the_loop_once():
    async def main():
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop)
        streams = [Generation(mailbox) for _ in range(8)]
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (calls.append(args), real(*args))[1]

        def step(text: str, finish: str | None = None) -> None:  # one token of every stream
            for index, stream in enumerate(streams):
                stream._put(Chunk(f"{text}{index}", finish))

        for args in (("a",), ("b", "stop")):
            engine = threading.Thread(target=step, args=args)
            engine.start()
            engine.join()
            await asyncio.sleep(0)  # the loop runs the wake-up: every stream has its chunk
        texts = []
        for stream in streams:
            texts.append([chunk.text async for chunk in stream])
        return calls, texts

    calls, texts = asyncio.run(main())
    assert len(calls) == 2  # two steps, eight streams
    assert texts == [[f"a{i}b{i}"] for i in range(8)]  # each read at the end: one chunk


def test_merged_chunks_keep_their_logprobs_in_order_and_their_choice():
    a = Chunk("a", logprobs=[logprob(1)], index=2)
    b = Chunk("b", logprobs=[logprob(2), logprob(3)], index=2)
    merged = merge_chunks([a, b, Chunk("", "stop", index=2)])
    assert merged.text == "ab" and merged.index == 2 and merged.finish_reason == "stop"
    assert [entry.token for entry in merged.logprobs] == ["t1", "t2", "t3"]
    assert merge_chunks([Chunk("x"), Chunk("y")]).logprobs is None


def test_text_before_an_engine_failure_is_still_read_then_the_failure_raised():
    got = []

    async def main():
        generation = Generation()
        generation.handle = FailedHandle()
        for chunk in (Chunk("partial "), Chunk("text"), Chunk("", "error")):
            generation._put(chunk)
        async for chunk in generation:
            got.append(chunk.text)

    with pytest.raises(APIError, match="The model failed: llama_decode returned -1"):
        asyncio.run(main())
    assert got == ["partial text"]


def test_chunks_that_arrive_one_by_one_are_read_one_by_one():
    async def main():
        generation = Generation()
        got = []

        async def read():
            async for chunk in generation:
                got.append(chunk.text)

        reader = asyncio.ensure_future(read())
        for text in ("a", "b", "c"):
            await asyncio.to_thread(generation._put, Chunk(text))
            await asyncio.sleep(0.01)  # the reader takes it before the next one comes
        await asyncio.to_thread(generation._put, Chunk("", "stop"))
        await reader
        return got

    got = asyncio.run(main())
    assert "".join(got) == "abc" and len(got) >= 3


def test_with_a_stream_interval_tokens_of_one_interval_go_as_one_event_and_a_first_at_once():
    interval = 0.5

    async def main():
        loop = asyncio.get_running_loop()
        generation = Generation(Mailbox(loop, interval))
        events: list[tuple[float, str]] = []

        async def read():
            async for chunk in generation:
                events.append((loop.time(), chunk.text))

        async def put(text: str, finish: str | None = None) -> float:
            await asyncio.to_thread(generation._put, Chunk(text, finish))
            return loop.time()

        reader = asyncio.ensure_future(read())
        first_put = await put("a")
        while not events:
            await asyncio.sleep(0.005)
        await put("b")  # within the interval of "a": held back ...
        await asyncio.sleep(0.05)
        await put("c")  # ... together with this one
        while len(events) < 2:
            await asyncio.sleep(0.005)
        await asyncio.sleep(interval * 1.5)  # a quiet interval
        quiet_put = await put("d")
        while len(events) < 3:
            await asyncio.sleep(0.005)
        await put("", "stop")
        await reader
        return first_put, quiet_put, events

    first_put, quiet_put, events = asyncio.run(main())
    assert [text for _, text in events][:3] == ["a", "bc", "d"]
    assert events[0][0] - first_put < interval / 2  # the first token is not held back
    assert events[1][0] - events[0][0] >= interval * 0.9  # the next event waits its interval
    assert events[2][0] - quiet_put < interval / 2  # after a quiet interval, at once
