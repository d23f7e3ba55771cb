"""The task's metric, and a model's greedy replies scored on a split::

    from llmlab.finetune import evaluate
    evaluate.score('{"answer": "30 days", "source": "faq.md"}', gold_reply)
    report = evaluate.run(model, split.examples)        # any Backend: llama.cpp, transformers
    report.summary()    # {"valid_json": 0.1, "source": 0.1, "answer": 0.0, "exact": 0.0, "answer_f1": 0.2}

The gold reply of every example is a JSON object (``{"answer": ..., "source": ...}`` in
the lab's task). A reply scores on:

- ``valid_json``: it is one JSON object with exactly the gold reply's keys, nothing around it;
- one share per key (``answer``, ``source``): that value equals the gold one, compared after
  lower-casing and dropping punctuation and extra spaces;
- ``exact``: valid and every value right, the headline number;
- ``answer_f1``: word overlap (F1) of the ``answer`` value with the gold one (0 if the
  reply is not valid), partial credit for an answer that is nearly right.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llmlab.finetune.data import Example

METRICS = ("valid_json", "exact", "answer_f1")


def normalize(text: Any) -> str:
    """Lower case, accents and punctuation removed, single spaces: how values are compared."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def f1(reply: str, gold: str) -> float:
    """Word-overlap F1 of two normalized strings (SQuAD's answer metric)."""
    a, b = normalize(reply).split(), normalize(gold).split()
    common = sum((Counter(a) & Counter(b)).values())
    if not a or not b or not common:
        return float(a == b)
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def parse(reply: str) -> dict | None:
    """The reply as a JSON object, or None if it is anything else."""
    try:
        value = json.loads(reply.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score(reply: str, gold_reply: str) -> dict[str, float]:
    """The metric of one reply against the gold reply (both JSON text); see the module doc."""
    gold = json.loads(gold_reply)
    got = parse(reply)
    valid = got is not None and set(got) == set(gold)
    scores = {"valid_json": float(valid)}
    for key, value in gold.items():
        scores[key] = float(valid and normalize(got[key]) == normalize(value))
    scores["exact"] = float(valid and all(scores[k] for k in gold))
    if "answer" in gold:
        scores["answer_f1"] = f1(str(got["answer"]), str(gold["answer"])) if valid else 0.0
    return scores


@dataclass
class Row:
    """One held-out example: the question, the gold reply, the model's reply, its scores."""

    line: int
    question: str
    gold: str
    reply: str
    scores: dict[str, float]


@dataclass
class Report:
    """Every row of one model's run over a split."""

    label: str
    rows: list[Row] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """The mean of every score over the rows."""
        keys = list(self.rows[0].scores) if self.rows else []
        return {k: sum(r.scores[k] for r in self.rows) / len(self.rows) for k in keys}

    def replies(self) -> list[str]:
        """The replies in row order."""
        return [r.reply for r in self.rows]


def run(
    model, examples: list[Example], *, label: str = "", max_tokens: int = 48, progress=None
) -> Report:
    """Greedy replies of ``model`` (any backend) to each example's prompt, scored.

    ``progress(i, n)`` is called after each reply if given.
    """
    report = Report(label)
    for i, example in enumerate(examples, 1):
        reply = model.chat(example.prompt, max_tokens=max_tokens, temperature=0).text.strip()
        question = example.prompt[-1]["content"].rsplit("Question:", 1)[-1].strip()
        report.rows.append(
            Row(example.line, question, example.reply, reply, score(reply, example.reply))
        )
        if progress is not None:
            progress(i, len(examples))
    return report


def agreement(a: Report, b: Report) -> float:
    """Share of examples where two models gave exactly the same reply."""
    same = sum(x.reply == y.reply for x, y in zip(a.rows, b.rows, strict=True))
    return same / len(a.rows) if a.rows else 1.0


def table(reports: list[Report]) -> str:
    """The summaries side by side as a plain-text table (one line per model)."""
    keys = [k for k in reports[0].summary()] if reports else []
    head = f"{'model':<28}" + "".join(f"{k:>12}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in reports:
        values = r.summary()
        lines.append(f"{r.label:<28}" + "".join(f"{values[k]:>12.0%}" for k in keys))
    return "\n".join(lines)
