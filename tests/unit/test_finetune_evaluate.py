"""The task's metric: a reply is right only as one JSON object with the answer and its source."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llmlab.finetune import evaluate
from llmlab.finetune.data import Example

GOLD = json.dumps({"answer": "in the kitchen, above the sink", "source": "safety_rules.txt"})


@pytest.mark.parametrize(
    ("reply", "valid", "exact"),
    [
        ('{"answer": "in the kitchen, above the sink", "source": "safety_rules.txt"}', 1, 1),
        ('{"answer": "In the kitchen above the sink.", "source": "safety_rules.txt"}', 1, 1),
        ('{"answer": "in the kitchen, above the sink", "source": "faq.md"}', 1, 0),
        ('{"answer": "in the kitchen, above the sink"}', 0, 0),
        ('{"answer": "x", "source": "safety_rules.txt", "why": "y"}', 0, 0),
        ('Sure! {"answer": "in the kitchen, above the sink", "source": "safety_rules.txt"}', 0, 0),
        ("The first aid kit is in the kitchen, above the sink.", 0, 0),
        ('["in the kitchen"]', 0, 0),
    ],
    ids=[
        "exact",
        "case-and-punctuation",
        "wrong-source",
        "missing-key",
        "extra-key",
        "text-around",
        "prose",
        "list",
    ],
)
def test_score(reply, valid, exact):
    scores = evaluate.score(reply, GOLD)
    assert (scores["valid_json"], scores["exact"]) == (valid, exact)


def test_answer_f1_gives_partial_credit_only_to_valid_replies():
    near = evaluate.score('{"answer": "in the kitchen", "source": "safety_rules.txt"}', GOLD)
    assert near["answer"] == 0 and 0.5 < near["answer_f1"] < 1
    assert evaluate.score("in the kitchen, above the sink", GOLD)["answer_f1"] == 0
    assert evaluate.normalize("Café, 13:00!") == "cafe 13 00"


class Replies:
    """A backend stand-in that answers from a list."""

    def __init__(self, replies):
        self.replies = iter(replies)

    def chat(self, messages, **params):
        assert params["temperature"] == 0
        return SimpleNamespace(text=next(self.replies))


def test_run_scores_each_example_and_agreement_compares_two_models():
    example = Example(
        4,
        [
            {"role": "user", "content": "[safety_rules.txt] ...\nQuestion: Where is the kit?"},
            {"role": "assistant", "content": GOLD},
        ],
    )
    good = evaluate.run(Replies([GOLD, GOLD]), [example, example], label="tuned")
    bad = evaluate.run(Replies(["no idea", GOLD]), [example, example], label="base")
    assert good.rows[0].question == "Where is the kit?" and good.rows[0].line == 4
    assert good.summary()["exact"] == 1 and bad.summary()["exact"] == 0.5
    assert evaluate.agreement(good, bad) == 0.5
    text = evaluate.table([bad, good])
    assert "base" in text.splitlines()[2] and "50%" in text and "100%" in text
