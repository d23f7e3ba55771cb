"""From generated tokens to the text a user may see, written once for every engine::

    stream = TextStream(stops=["\\nUser:"])
    for data in token_bytes:                  # each token's bytes, as llama.cpp gives them
        text, hit = stream.feed(data)
        show(text)
        if hit:                               # a stop string came: it and what follows are dropped
            break
    else:
        show(stream.flush())                  # the end: what was held back

Two steps, usable on their own: :class:`Utf8Decoder` turns token bytes into text (a
character split over two tokens waits for the second; bytes that are not UTF-8 become
U+FFFD), and :class:`StopMatcher` cuts text at the first stop string, holding back text
that could be the start of one, so a stop string split over two tokens is never shown.
"""

from __future__ import annotations

import codecs


class Utf8Decoder:
    """Incremental UTF-8: bytes in, the characters they complete out."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, data: bytes) -> str:
        """The text ``data`` completes; an unfinished character waits for the next bytes."""
        return self._decoder.decode(data)

    def flush(self) -> str:
        """The end: an unfinished character left over becomes U+FFFD (``""`` if none)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back text that could be the
    start of one so a stop string split over two tokens is never shown."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return what is safe to show and whether a stop string was hit
        (then the text is what came before it, and the rest is dropped)."""
        self.buffer += text
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        """Text still held back when generation ends without a stop string."""
        out, self.buffer = self.buffer, ""
        return out


class TextStream:
    """Token bytes in, text safe to show out: :class:`Utf8Decoder` then :class:`StopMatcher`.

    ``piece`` is the text the last :meth:`feed` decoded, before any was held back (what
    that token's bytes completed; a caller that maps tokens to text offsets needs it).
    """

    def __init__(self, stops: list[str] | None = None):
        self.decoder = Utf8Decoder()
        self.matcher = StopMatcher(stops or [])
        self.piece = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Add one token's bytes; return the text now safe to show and whether a stop
        string was hit (then nothing after it is ever shown: stop feeding)."""
        self.piece = self.decoder.decode(data)
        return self.matcher.feed(self.piece)

    def flush(self) -> tuple[str, bool]:
        """The end: the text still held back, an unfinished character as U+FFFD. The
        ``bool`` says whether that character completed a stop string (then the text is
        what came before it)."""
        self.piece = self.decoder.flush()
        text, hit = self.matcher.feed(self.piece)
        return (text, True) if hit else (text + self.matcher.flush(), False)
