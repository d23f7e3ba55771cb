"""The response cache on its own: least recently used first, a time to live, a byte budget."""

from __future__ import annotations

from dataclasses import dataclass

from part5.combined_app.cache import ResponseCache, cache_key, deterministic


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(entries=3, ttl=10.0, max_bytes=1000):
    clock = Clock()
    evicted = []
    cache = ResponseCache(entries, ttl, max_bytes, clock, on_evict=lambda: evicted.append(1))
    return cache, clock, evicted


def test_a_stored_reply_comes_back_exactly():
    cache, _, _ = make()
    assert cache.get("k") is None
    assert cache.put("k", b'{"a":1}')
    assert cache.get("k") == b'{"a":1}'
    assert cache.put("s", ["event 1", "[DONE]"])
    assert cache.get("s") == ["event 1", "[DONE]"]
    assert len(cache) == 2 and cache.bytes == 7 + 13


def test_when_full_the_least_recently_used_reply_goes_first():
    cache, _, evicted = make(entries=2)
    cache.put("a", b"1")
    cache.put("b", b"2")
    cache.get("a")  # now b is the least recently used
    cache.put("c", b"3")
    assert cache.get("b") is None
    assert cache.get("a") == b"1" and cache.get("c") == b"3"
    assert len(evicted) == 1


def test_the_byte_budget_evicts_and_a_reply_larger_than_the_cache_is_not_kept():
    cache, _, evicted = make(entries=10, max_bytes=10)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    cache.put("c", b"123")
    assert cache.get("a") is None and cache.bytes == 8
    assert len(evicted) == 1
    assert not cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None and cache.get("b") == b"12345"


def test_a_reply_expires_after_its_time_to_live():
    cache, clock, evicted = make(ttl=10)
    cache.put("a", b"1")
    clock.now = 9.9
    assert cache.get("a") == b"1"
    clock.now = 10.0
    assert cache.get("a") is None
    assert len(cache) == 0 and cache.bytes == 0
    assert evicted == []  # expiry is not an eviction


def test_storing_a_key_again_replaces_its_reply():
    cache, _, _ = make()
    cache.put("a", b"old")
    cache.put("a", b"newer")
    assert cache.get("a") == b"newer" and len(cache) == 1 and cache.bytes == 5


def test_a_cache_with_no_room_stores_nothing():
    cache, _, _ = make(entries=0)
    assert not cache.enabled
    assert not cache.put("a", b"1")
    assert cache.get("a") is None


@dataclass
class Params:
    temperature: float
    max_tokens: int


def test_the_key_is_stable_and_changes_with_every_part():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "p": Params(0, 8)}
    same = {"p": Params(0, 8), "messages": [{"role": "user", "content": "hi"}], "model": "m"}
    assert cache_key(base) == cache_key(same)
    assert cache_key(base) != cache_key({**base, "p": Params(0, 9)})
    assert cache_key(base) != cache_key({**base, "model": "other"})
    assert cache_key(base) != cache_key({**base, "messages": [{"role": "user", "content": "ho"}]})


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert deterministic(0, None)
    assert deterministic(0.8, 42)
    assert not deterministic(0.8, None)
