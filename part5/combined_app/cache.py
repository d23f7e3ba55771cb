"""A response cache for requests whose reply cannot change: least recently used, with a
time to live.

A request is deterministic when it is greedy (``temperature`` 0) or names a ``seed``; the
same model then gives the same reply to the same prompt, so the server may answer a repeat
from memory, byte for byte, without a slot. The key holds everything that shapes the reply:
the served model, the route, the prompt as the engine gets it (messages after tool and JSON
preparation, or the raw prompts), every sampling field, the grammar, ``n``, logprobs,
adapters, and whether and how the reply is streamed. A request opts out with
``"cache": false`` in its body or a ``Cache-Control: no-cache`` (or ``no-store``) header.

Off by default (``--cache-entries 0``): the lessons and ``make bench`` measure the model,
and a cache would hide it. ``/metrics`` counts hits, misses and evictions and shows the size::

    cache = ResponseCache(max_entries=256, ttl=600, max_bytes=32_000_000)
    key = cache_key({"route": "chat", "model": "m", "messages": [...], "params": {...}})
    if (hit := cache.get(key)) is None:
        cache.put(key, body)        # bytes, or the list of a stream's event strings
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

Stored = bytes | list[str]


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of the request ``parts`` (JSON-able values, dataclasses included)."""

    def plain(value: Any) -> Any:
        return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)

    text = json.dumps(parts, sort_keys=True, default=plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def deterministic(temperature: float, seed: int | None) -> bool:
    """Whether a request's reply is fixed: greedy, or sampled from a named seed."""
    return temperature == 0 or seed is not None


def _size(value: Stored) -> int:
    return len(value) if isinstance(value, bytes) else sum(len(event) for event in value)


@dataclass
class _Entry:
    value: Stored
    expires: float
    size: int


class ResponseCache:
    """Finished replies by key: at most ``max_entries`` and ``max_bytes``, each for ``ttl``
    seconds. When full, the least recently used entries go first; a reply larger than
    ``max_bytes`` on its own is not stored. ``on_evict`` is called once per entry dropped
    to make room (expired entries are not counted as evictions)."""

    def __init__(
        self,
        max_entries: int,
        ttl: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[], None] | None = None,
    ):
        self.max_entries = max_entries
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.clock = clock
        self.on_evict = on_evict or (lambda: None)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        """False when the server was started with no room for entries."""
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Stored | None:
        """The stored reply for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: Stored) -> bool:
        """Store a finished reply; False when it cannot be (cache off, or the reply alone is
        larger than the whole cache)."""
        size = _size(value)
        if not self.enabled or size > self.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(value, self.clock() + self.ttl, size)
        self.bytes += size
        self._make_room()
        return True

    def _make_room(self) -> None:
        now = self.clock()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._drop(key)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.on_evict()

    def _drop(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size
