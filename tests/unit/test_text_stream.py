"""Token bytes to shown text, written once (llmlab/backends/text_stream.py): UTF-8 split
over tokens, bytes that are not UTF-8, stop strings split over pieces, the end of a reply."""

from __future__ import annotations

from llmlab.backends.text_stream import StopMatcher, TextStream, Utf8Decoder

CAFE = "café ☕".encode()  # é is 2 bytes, ☕ is 3


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    shown = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        shown.append(text)
        if hit:
            return "".join(shown), True
    return "".join(shown) + matcher.flush(), False


def stream_all(stops: list[str], tokens: list[bytes]) -> tuple[list[str], bool]:
    """What a user sees, chunk by chunk, when ``tokens`` arrive one at a time."""
    stream = TextStream(stops)
    shown = []
    for data in tokens:
        text, hit = stream.feed(data)
        shown.append(text)
        if hit:
            return shown, True
    text, hit = stream.flush()
    return [*shown, text], hit


def test_a_character_split_over_two_tokens_waits_for_the_second():
    decoder = Utf8Decoder()
    assert decoder.decode(CAFE[:4]) == "caf"  # the first byte of é alone shows nothing
    assert decoder.decode(CAFE[4:7]) == "é "  # and the first byte of the 3-byte ☕
    assert decoder.decode(CAFE[7:8]) == ""
    assert decoder.decode(CAFE[8:]) == "☕"
    assert decoder.flush() == ""


def test_bytes_that_are_not_utf8_become_the_replacement_character():
    decoder = Utf8Decoder()
    assert decoder.decode(b"a\xffb") == "a\ufffdb"
    assert decoder.decode(b"\xe2\x98") == ""  # the start of a 3-byte character...
    assert decoder.flush() == "\ufffd"  # ...that never ends


def test_stop_string_split_over_pieces_is_never_shown():
    assert feed_all(["\nUser:"], ["Hello", " there\n", "Us", "er: more"]) == ("Hello there", True)


def test_text_that_only_looks_like_a_stop_start_is_released():
    assert feed_all(["STOP"], ["a S", "T", "x b"]) == ("a STx b", False)


def test_no_stop_strings_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)


def test_earliest_of_several_stop_strings_wins():
    assert feed_all(["world", "lo"], ["hello world"]) == ("hel", True)


def test_a_stop_string_across_tokens_and_inside_a_character_is_never_shown():
    tokens = [b"Order: caf", "é".encode()[:1], "é".encode()[1:] + b"!", b" and more"]
    shown, hit = stream_all(["é!"], tokens)
    assert hit and "".join(shown) == "Order: caf"
    assert all("é" not in text for text in shown)


def test_text_after_the_stop_string_is_dropped():
    shown, hit = stream_all(["\n\n"], [b"One.", b"\n\nTwo", b" three"])
    assert hit and shown == ["One.", ""]  # the stream stops at the hit: "Two" never comes


def test_flush_at_the_end_releases_held_back_text_and_an_unfinished_character():
    stream = TextStream(["STOP"])
    assert stream.feed(b"go ST") == ("go ", False)  # "ST" might start STOP: held back
    assert stream.feed(b"\xe2\x98") == ("", False)  # half of a character
    assert stream.piece == ""
    assert stream.flush() == ("ST\ufffd", False)


def test_piece_is_what_the_last_token_decoded_before_any_holding_back():
    stream = TextStream(["!"])
    assert stream.feed(b"hi") == ("hi", False) and stream.piece == "hi"
    assert stream.feed(b" there!") == (" there", True) and stream.piece == " there!"
