"""The engine's scheduler driven by a fake model, in milliseconds and without a model file:
queue order and a full queue, cancelling, the prefix-cache choice, mixed prefill and a
failed decode (as karpathy/nanochat tests its engine with a mock model).

The fake is a byte-level model whose logits always make byte ``t + 1`` follow byte ``t``,
so the reply to a prompt is the bytes after its last one ("abc" -> "def..."). It records
every decode and checks that each sequence's positions follow on from its cached cells.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from llmlab.backends.base import GenerationParams
from llmlab.engine import Engine, EngineError, Handle, QueueFullError, Request, Scheduler
from llmlab.sampling import SlotSampler

EOG = 0  # the fake's end-of-generation token (byte 0, never reached from printable text)


class FakeContext:
    """A tiny deterministic model behind the engine's context interface."""

    spec = None
    n_vocab = 256
    add_bos = False

    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[tuple[int, int, int, bool]]] = []  # every decode's entries
        self.kv: dict[int, list[int]] = collections.defaultdict(list)  # seq_id -> its cells
        self.fail_at = fail_at  # the decode (0-based) that fails, as llama.cpp returns -1
        self.closed = 0

    def decode(self, entries, adapters) -> None:
        if self.fail_at == len(self.calls):
            raise RuntimeError("llama_decode returned -1")
        for token, pos, seq_id, _ in entries:
            assert pos == len(self.kv[seq_id]), f"sequence {seq_id} skipped to position {pos}"
            self.kv[seq_id].append(token)
        self.calls.append(list(entries))

    def logits(self, index: int) -> np.ndarray:
        token, _, _, wanted = self.calls[-1][index]
        assert wanted, "logits read for an entry that did not ask for them"
        row = np.zeros(self.n_vocab, dtype=np.float32)
        row[(token + 1) % self.n_vocab] = 10.0
        return row

    def seq_rm(self, seq_id: int, start: int, end: int) -> None:
        assert end == -1
        del self.kv[seq_id][max(start, 0) :]

    def seq_cp(self, source: int, target: int) -> None:
        self.kv[target] = list(self.kv[source])

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        return list(text.encode())

    def apply_chat_template(self, messages, tools=None) -> str:
        return "".join(m["content"] for m in messages)

    def sampler(self, params: GenerationParams, gbnf: str | None = None) -> SlotSampler:
        if gbnf is not None:
            raise ValueError("the fake model has no grammars")
        return SlotSampler(params)  # llama.cpp's chain samples any row of logits

    def close(self) -> None:
        self.closed += 1


_ids = itertools.count(1)


def handle(prompt: str, max_tokens: int = 3, on_chunk=None, **params) -> Handle:
    settings = GenerationParams.from_kwargs(max_tokens=max_tokens, temperature=0, **params)
    return Handle(next(_ids), list(prompt.encode()), settings, on_chunk, SlotSampler(settings))


def scheduler(ctx: FakeContext, **options) -> Scheduler:
    options = {"parallel": 2, "n_batch": 64, "prefill_chunk": 8, **options}
    return Scheduler(ctx, **options)


def run(sched: Scheduler, limit: int = 200) -> None:
    """Step until nothing is running or waiting."""
    for _ in range(limit):
        if not (sched.active or sched.queued):
            return
        sched.run_once()
    raise AssertionError(f"still busy after {limit} rounds")


def seqs_in(call) -> set[int]:
    return {seq_id for _, _, seq_id, _ in call}


def text(h: Handle) -> str:
    return h.result(0).text


def test_a_reply_is_what_the_fake_model_predicts_and_ends_at_max_tokens():
    sched = scheduler(FakeContext())
    h = handle("abc", max_tokens=3)
    sched.enqueue([h])
    run(sched)
    result = h.result(0)
    assert (result.text, result.finish_reason) == ("def", "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 3)


def test_requests_are_admitted_first_come_first_served_and_a_full_queue_refuses():
    finished: list[str] = []
    sched = scheduler(FakeContext(), parallel=1, max_queue=2)

    def note(name):
        return lambda chunk: chunk.finish_reason and finished.append(name)

    first, second, third = (handle(p, on_chunk=note(p)) for p in ("x", "y", "z"))
    sched.enqueue([first])
    sched.enqueue([second])
    with pytest.raises(QueueFullError, match="2 requests are already waiting .max_queue=2.; retry"):
        sched.enqueue([handle("refused")])
    sched.run_once()  # the first is admitted: one place is free again
    sched.enqueue([third])
    run(sched)
    assert finished == ["x", "y", "z"]
    assert [text(h) for h in (first, second, third)] == ["yz{", "z{|", "{|}"]


def test_a_cancelled_waiting_request_ends_interrupted_without_being_decoded():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=1)
    running, waiting = handle("ab", max_tokens=5), handle("QRS", max_tokens=5)
    sched.enqueue([running])
    sched.enqueue([waiting])
    sched.run_once()
    waiting.cancel()
    run(sched)
    assert waiting.result(0).finish_reason == "interrupted"
    assert waiting.result(0).usage.completion_tokens == 0
    assert not any(token in b"QRS" for call in ctx.calls for token, *_ in call)
    assert text(running) == "cdefg"


def test_a_cancelled_running_request_frees_its_slot_for_the_next():
    sched = scheduler(FakeContext(), parallel=1)
    running, waiting = handle("ab", max_tokens=50), handle("k", max_tokens=2)
    sched.enqueue([running])
    sched.enqueue([waiting])
    for _ in range(3):
        sched.run_once()
    running.cancel()
    sched.run_once()  # reaped at the next round, before its step
    result = running.result(0)
    assert result.finish_reason == "interrupted" and result.text == "cde"
    assert sched.active == 0 and sched.queued == 1  # the waiting one goes in at the next
    run(sched)
    assert text(waiting) == "lm"


def test_a_follow_up_prompt_goes_to_the_slot_sharing_its_longest_prefix():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=2)
    other, first = handle("goodbye moon", max_tokens=2), handle("hello world", max_tokens=2)
    sched.enqueue([other])  # slot 0
    sched.enqueue([first])  # slot 1
    run(sched)
    follow_up = handle("hello world, again", max_tokens=2)
    sched.enqueue([follow_up])
    calls_before = len(ctx.calls)
    run(sched)
    # Slot 1 holds "hello world" (and the first reply token): 11 tokens are reused.
    assert follow_up.result(0).usage.cached_tokens == 11
    first_call = ctx.calls[calls_before]
    assert seqs_in(first_call) == {1}
    assert first_call[0][1] == 11  # prefill starts after the shared prefix
    assert text(follow_up) == "op"
    # The same prompt again reuses all but its last token (whose logits pick the reply).
    again = handle("hello world, again", max_tokens=2)
    sched.enqueue([again])
    run(sched)
    assert again.result(0).usage.cached_tokens == len("hello world, again") - 1
    assert sched.reused_prompt_tokens == 11 + len("hello world, again") - 1


def test_without_the_prefix_cache_a_finished_sequence_leaves_no_cells():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=1, prefix_cache=False)
    h = handle("hello", max_tokens=2)
    sched.enqueue([h])
    run(sched)
    assert ctx.kv[0] == []
    again = handle("hello", max_tokens=2)
    sched.enqueue([again])
    run(sched)
    assert again.result(0).usage.cached_tokens == 0


def start_streaming(sched: Scheduler, prompt: str = "ab") -> Handle:
    running = handle(prompt, max_tokens=20)
    sched.enqueue([running])
    sched.run_once()  # its prompt, and its first token sampled
    return running


def test_mixed_prefill_takes_a_long_prompt_over_several_steps_while_others_advance():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=2, n_batch=64, prefill_chunk=8)
    running = start_streaming(sched)
    long_prompt = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123"  # 30 tokens: 8 + 8 + 8 + 6
    arriving = handle(long_prompt, max_tokens=3)
    sched.enqueue([arriving])
    start = len(ctx.calls)
    for _ in range(4):
        sched.run_once()
    steps = ctx.calls[start:]
    assert [sum(1 for *_, seq, _ in call if seq == 1) for call in steps] == [8, 8, 8, 6]
    # Every one of those steps also carried the running sequence's next token.
    assert [sum(1 for *_, seq, _ in call if seq == 0) for call in steps] == [1, 1, 1, 1]
    assert len(ctx.kv[0]) == 2 + 4  # its prompt and one new token per step
    run(sched)
    assert text(arriving) == "456"
    assert text(running) == "cdefghijklmnopqrstuv"  # 20 tokens, none lost or repeated


def test_mixed_prefill_shares_one_steps_budget_among_waiting_prompts_in_order():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=3, n_batch=64, prefill_chunk=8)
    start_streaming(sched)
    first, second = handle("ABCDE"), handle("VWXYZ")
    sched.enqueue([first])
    sched.enqueue([second])
    start = len(ctx.calls)
    sched.run_once()
    sched.run_once()
    one, two = ctx.calls[start:]
    assert [len(one), len(two)] == [1 + 8, 1 + 1 + 2]  # 5 + 3 of 8; then the rest beside them
    run(sched)
    assert (text(first), text(second)) == ("FGH", "[\\]")


def test_mixed_prefill_with_no_stream_running_takes_prompts_in_n_batch_steps():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=2, n_batch=16, prefill_chunk=4)
    first, second = handle("ABCDEFGHIJ"), handle("KLMNOPQRSTUVWXYZ")  # 10 + 16 tokens
    sched.enqueue([first])
    sched.enqueue([second])
    sched.run_once()
    # Nobody streams yet, so nobody waits: the first step is filled to n_batch, not to 4.
    assert [len(ctx.calls[0]), seqs_in(ctx.calls[0])] == [16, {0, 1}]
    sched.run_once()
    # Now the first one streams: its next token, and the rest of the second prompt in 4s.
    assert [sum(1 for *_, seq, _ in ctx.calls[1] if seq == s) for s in (0, 1)] == [1, 4]
    run(sched)
    assert (text(first), text(second)) == ("KLM", "[\\]")


def test_deterministic_mode_prefills_a_prompt_alone_while_the_others_wait():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=2, n_batch=16, prefill_chunk=8, deterministic=True)
    running = start_streaming(sched)
    arriving = handle("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123", max_tokens=3)
    sched.enqueue([arriving])
    start = len(ctx.calls)
    sched.run_once()
    sched.run_once()
    alone = ctx.calls[start:]
    assert [len(call) for call in alone] == [16, 14]  # n_batch chunks ...
    assert all(seqs_in(call) == {1} for call in alone)  # ... with no running token beside
    run(sched)
    assert text(arriving) == "456" and text(running) == "cdefghijklmnopqrstuv"


def test_stop_strings_and_end_of_generation_finish_with_stop():
    sched = scheduler(FakeContext())
    stopped = handle("abc", max_tokens=10, stop=["gh"])
    to_the_end = handle("\xfd", max_tokens=100)  # bytes c3 bd: then be, bf, ..., ff, then EOG
    sched.enqueue([stopped])
    sched.enqueue([to_the_end])
    run(sched)
    assert (text(stopped), stopped.result(0).finish_reason) == ("def", "stop")
    assert to_the_end.result(0).finish_reason == "stop"
    assert to_the_end.result(0).usage.completion_tokens == 0xFF - 0xBD


def test_choices_of_one_prompt_prefill_once_and_copy_the_cells():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=3)
    choices = [handle("mno", max_tokens=2) for _ in range(3)]
    sched.enqueue(choices)
    run(sched)
    prompt_entries = [e for call in ctx.calls for e in call if e[0] in b"mno" and e[1] < 3]
    assert len(prompt_entries) == 3  # one prefill, not three
    assert [text(h) for h in choices] == ["pq"] * 3


def test_the_sampler_is_one_object_per_slot_that_can_be_swapped():
    made = []

    class AlwaysZ:
        def __init__(self, handle):
            self.accepted: list[int] = []
            self.freed = False
            made.append(self)

        def sample_logits(self, logits):
            return ord("z") if len(self.accepted) < 2 else EOG

        def accept(self, token):
            self.accepted.append(token)

        def free(self):
            self.freed = True

    sched = scheduler(FakeContext(), new_sampler=AlwaysZ)
    h = handle("abc", max_tokens=10)
    sched.enqueue([h])
    run(sched)
    assert (text(h), h.result(0).finish_reason) == ("zz", "stop")
    assert [(s.accepted, s.freed) for s in made] == [([122, 122], True)]


def test_a_failed_decode_fails_every_request_and_refuses_new_ones_with_the_reason():
    told: list[EngineError] = []
    ctx = FakeContext(fail_at=2)
    sched = scheduler(ctx, parallel=2, on_failure=told.append)
    handles = [handle("ab", max_tokens=20), handle("cd", max_tokens=20), handle("ef")]
    for h in handles:
        sched.enqueue([h])
    sched.loop()  # returns when the decode fails
    for h in handles:  # running and waiting alike
        with pytest.raises(EngineError, match="llama_decode returned -1"):
            h.result(0)
    assert len(told) == 1 and told[0] is sched.failure
    assert sched.active == 0 and sched.queued == 0
    with pytest.raises(EngineError, match="stopped after a failure .*llama_decode returned -1"):
        sched.enqueue([handle("gh")])


def test_the_engine_runs_on_the_fake_context_and_closes_it_once():
    ctx = FakeContext()
    with Engine(context=ctx, parallel=2, n_ctx=64) as engine:
        chunks = list(
            engine.submit(Request.completion("abc", max_tokens=4, temperature=0)).stream()
        )
        assert "".join(c.text for c in chunks) == "defg"
        assert chunks[-1].finish_reason == "length"
        reply = engine.chat([{"role": "user", "content": "xy"}], max_tokens=2, temperature=0)
        assert reply.text == "z{"
        assert engine.detokenize(engine.tokenize("hi")) == "hi"
    assert ctx.closed == 1
    engine.close()
    assert ctx.closed == 1
    with pytest.raises(EngineError, match="closed"):
        engine.submit(Request.completion("abc", max_tokens=1))


def test_check_prompt_sees_the_token_ids_once_and_can_refuse_the_request():
    ctx = FakeContext()
    seen: list[list[int]] = []

    def at_most_three(ids: list[int]) -> None:
        seen.append(ids)
        if len(ids) > 3:
            raise OverflowError(f"{len(ids)} tokens")

    with Engine(context=ctx, parallel=2, n_ctx=64) as engine:
        ok = engine.submit_choices(
            Request.completion("abc", max_tokens=2, temperature=0), 2, check_prompt=at_most_three
        )
        assert [h.result(10).text for h in ok] == ["de", "de"]
        assert seen == [engine.tokenize("abc")]
        with pytest.raises(OverflowError, match="4 tokens"):
            engine.submit(Request.completion("abcd", max_tokens=2), check_prompt=at_most_three)
        assert len(seen) == 2 and engine.queued == 0 and engine.active == 0


def test_an_engine_whose_decode_failed_says_why_and_still_closes():
    ctx = FakeContext(fail_at=0)
    told: list[EngineError] = []
    engine = Engine(context=ctx, parallel=1, n_ctx=64, on_failure=told.append)
    with pytest.raises(EngineError, match="llama_decode returned -1"):
        engine.submit(Request.completion("abc", max_tokens=2)).result(10)
    assert told == [engine.failure]
    with pytest.raises(EngineError, match="stopped after a failure"):
        engine.submit(Request.completion("abc", max_tokens=2))
    engine.close()
    assert ctx.closed == 1


def test_request_constructors_validate_parameter_names():
    request = Request.chat([{"role": "user", "content": "hi"}], max_tokens=3, stop="END")
    assert request.params.max_tokens == 3 and request.params.stop == ["END"]
    assert Request.completion("Once", temperature=0).prompt == "Once"
    try:
        Request.chat([], max_new_tokens=3)
    except TypeError as exc:
        assert "max_new_tokens" in str(exc)
    else:
        raise AssertionError("an unknown parameter name was accepted")


SYSTEM = "You are a helpful bot. "  # 23 bytes every prompt below starts with


def prefilled(ctx: FakeContext, seq_id: int, prompt: str) -> int:
    """Prompt tokens decoded for ``seq_id`` (entries at a prompt position)."""
    n = len(prompt.encode())
    return sum(1 for call in ctx.calls for _, pos, s, _ in call if s == seq_id and pos < n)


def test_prompts_admitted_together_prefill_their_common_start_once():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=3, deterministic=True)
    handles = [handle(SYSTEM + q, max_tokens=2) for q in ("ab", "xy", "mn")]
    sched.enqueue(handles[:1])
    sched.enqueue(handles[1:2])
    sched.enqueue(handles[2:])
    run(sched)
    assert [text(h) for h in handles] == ["cd", "z{", "op"]  # the byte after the last, twice
    assert prefilled(ctx, 0, SYSTEM + "ab") == len(SYSTEM) + 2  # the first prompt: all of it
    # The others copied the first one's cells for the shared start and prefilled the rest.
    assert prefilled(ctx, 1, SYSTEM + "xy") == prefilled(ctx, 2, SYSTEM + "mn") == 2
    assert sched.copied_prompt_tokens == 2 * len(SYSTEM)
    assert [h.result(0).usage.cached_tokens for h in handles] == [0, len(SYSTEM), len(SYSTEM)]


def test_a_short_common_start_or_other_adapters_are_not_worth_a_copy():
    ctx = FakeContext()
    sched = scheduler(ctx, parallel=3, deterministic=True)
    short = [handle("Hi! " + q, max_tokens=2) for q in ("ab", "xy")]  # 4 bytes in common
    sched.enqueue(short[:1])
    sched.enqueue(short[1:])
    settings = GenerationParams.from_kwargs(max_tokens=2, temperature=0)
    other = Handle(
        next(_ids), list((SYSTEM + "cd").encode()), settings, None, SlotSampler(settings),
        adapters=(("style", 1.0),),
    )  # fmt: skip
    sched.enqueue([other])
    run(sched)
    assert sched.copied_prompt_tokens == 0
    assert prefilled(ctx, 1, "Hi! xy") == len("Hi! xy")
    assert text(other) == "ef"
