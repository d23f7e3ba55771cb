"""llmlab.finetune.data and the shipped part4 splits: what a learner's bad file looks like
(line numbers, skipped or refused), empty splits, examples too long for the limit."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from llmlab.finetune import data

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "part4" / "data"
DOCS = ROOT / "part3" / "data" / "docs"


class CharTokenizer:
    """A ChatML template and one token per character: enough to test lengths and labels."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def line(reply="ok", role="assistant"):
    return json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": role, "content": reply}]}
    )


def write(tmp_path, *lines) -> Path:
    path = tmp_path / "split.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_are_skipped_and_reported_with_their_line_numbers(tmp_path):
    path = write(
        tmp_path,
        line("first"),
        "{not json",
        "",
        json.dumps({"prompt": "no messages"}),
        line("x", role="robot"),
        json.dumps(
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
        ),
        line("last"),
    )
    split = data.read_split(path)
    assert [e.line for e in split.examples] == [1, 7]
    assert [p.line for p in split.problems] == [2, 4, 5, 6]
    report = data.describe_problems(split.problems)
    assert "line 2: not JSON" in report
    assert 'line 4: not an object with a "messages" list' in report
    assert "line 5: message 2 has role 'robot'" in report
    assert "line 6: the last message must be the assistant's reply" in report


def test_strict_refuses_a_file_with_a_malformed_line(tmp_path):
    path = write(tmp_path, line(), "{not json")
    with pytest.raises(data.DatasetError, match=r"malformed lines, refused:\n  line 2: not JSON"):
        data.read_split(path, strict=True)


@pytest.mark.parametrize(
    "lines", [[], ["", "  "], ["{bad", "[1, 2]"]], ids=["empty", "blank", "all-bad"]
)
def test_an_empty_split_is_an_error_that_says_what_a_line_must_be(tmp_path, lines):
    path = tmp_path / "split.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(data.DatasetError, match="no usable examples.*the split is empty") as err:
        data.read_split(path)
    if lines and lines[0] == "{bad":
        assert "line 1: not JSON" in str(err.value) and "line 2:" in str(err.value)


def test_a_missing_split_names_the_path(tmp_path):
    with pytest.raises(data.DatasetError, match=r"nope\.jsonl does not exist"):
        data.read_split(tmp_path / "nope.jsonl")


def test_examples_longer_than_the_limit_are_left_out_and_reported():
    tok = CharTokenizer()
    short, long = (
        data.Example(1, json.loads(line("ok"))["messages"]),
        data.Example(2, json.loads(line("x" * 200))["messages"]),
    )
    kept, too_long = data.tokenize([short, long], tok, max_length=100)
    assert [t.line for t in kept] == [1]
    assert [p.line for p in too_long] == [2]
    assert re.fullmatch(r"\d+ tokens, longer than the limit of 100", too_long[0].reason)
    with pytest.raises(data.DatasetError, match="Every example is longer than 10 tokens"):
        data.tokenize([short], tok, max_length=10)


def test_only_the_reply_and_its_end_of_turn_are_learned():
    (tokens,), _ = data.tokenize(
        [data.Example(1, json.loads(line("ok"))["messages"])], CharTokenizer(), 500
    )
    learned = "".join(
        chr(t) for t, lab in zip(tokens.input_ids, tokens.labels, strict=True) if lab != data.IGNORE
    )
    assert learned == "ok<|im_end|>"


# --------------------------------------------------------------------------- the shipped splits


def _doc_text(name: str) -> str:
    text = (DOCS / name).read_text()
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


@pytest.mark.parametrize("name", ["train.jsonl", "heldout.jsonl"])
def test_shipped_examples_answer_from_a_passage_copied_from_the_cited_document(name):
    split = data.read_split(DATA / name, strict=True)
    assert len(split.examples) >= 20
    for example in split.examples:
        gold = json.loads(example.reply)
        assert set(gold) == {"answer", "source"}
        passages = dict(re.findall(r"^\[([\w.]+)\] (.+)$", example.prompt[-1]["content"], re.M))
        assert len(passages) == 2 and gold["source"] in passages
        assert gold["answer"] in passages[gold["source"]], example.line
        for source, passage in passages.items():
            assert " ".join(passage.split()) in _doc_text(source), (name, example.line, source)


def test_held_out_questions_are_never_seen_in_training():
    def questions(name):
        return {
            e.prompt[-1]["content"].rsplit("Question:", 1)[1]
            for e in data.read_split(DATA / name).examples
        }

    assert not questions("train.jsonl") & questions("heldout.jsonl")


def test_the_committed_splits_are_what_the_script_makes():
    spec = importlib.util.spec_from_file_location("make_dataset", DATA / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train, heldout = module.build()
    for rows, name in ((train, "train.jsonl"), (heldout, "heldout.jsonl")):
        assert [json.loads(x) for x in (DATA / name).read_text().splitlines()] == rows
