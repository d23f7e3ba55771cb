"""Chat datasets for fine-tuning: read and check a JSONL split, then turn it into tokens::

    from llmlab.finetune import data
    split = data.read_split("part4/data/train.jsonl")      # malformed lines are skipped
    print(data.describe_problems(split.problems))           # "line 3: not JSON (...)"
    tokens, too_long = data.tokenize(split.examples, tokenizer, max_length=256)

One line is one example in the usual chat format::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "the reply to learn"}]}

Lines that are not such an object are **skipped** and reported with their line numbers
(``strict=True`` refuses the file instead); blank lines are ignored. Examples longer than
``max_length`` tokens are skipped and reported too: cutting one short would teach the model
a reply without its end. A split left with no usable example is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of the tokens the loss skips (the prompt and the padding)


class DatasetError(ValueError):
    """A split that cannot be used (missing, empty, or refused); the message says why."""


@dataclass
class Problem:
    """Why one line of a split was not used."""

    line: int
    reason: str


@dataclass
class Example:
    """One conversation; the last message is the assistant reply the model learns."""

    line: int
    messages: list[dict[str, str]]

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The messages before the reply (what the model is given)."""
        return self.messages[:-1]

    @property
    def reply(self) -> str:
        """The reply the model should give."""
        return self.messages[-1]["content"]


@dataclass
class Split:
    """The usable examples of one file and the lines that were skipped."""

    path: Path
    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Tokens:
    """One example as token ids; ``labels`` is ``IGNORE`` except on the reply tokens."""

    line: int
    input_ids: list[int]
    labels: list[int]


def check_line(value: Any) -> str | None:
    """Why a parsed line is not a chat example, or None if it is one."""
    if not isinstance(value, dict) or "messages" not in value:
        return 'not an object with a "messages" list'
    messages = value["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        return '"messages" must be a list of at least two messages'
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f'message {i} needs a "content" string'
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; use one of {', '.join(ROLES)}"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's reply"
    if not messages[-1]["content"].strip():
        return "the assistant's reply is empty"
    return None


def read_split(path: str | Path, *, strict: bool = False) -> Split:
    """Read a JSONL split; malformed lines are skipped and listed in ``Split.problems``.

    Raises:
        DatasetError: the file is missing, holds no usable example, or (``strict``) has a
            malformed line. The message names the file and the lines.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist. Check the path (see part4/data/).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read {path}: {exc}") from exc
    examples, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            problems.append(Problem(number, f"not JSON ({exc.msg})"))
            continue
        reason = check_line(value)
        if reason:
            problems.append(Problem(number, reason))
        else:
            examples.append(Example(number, value["messages"]))
    if problems and strict:
        raise DatasetError(f"{path} has malformed lines, refused:\n{describe_problems(problems)}")
    if not examples:
        detail = f"\n{describe_problems(problems)}" if problems else ""
        raise DatasetError(
            f"{path} has no usable examples (the split is empty). Each line must be "
            f'{{"messages": [..., {{"role": "assistant", "content": "..."}}]}}.{detail}'
        )
    return Split(path, examples, problems)


def describe_problems(problems: list[Problem], limit: int = 10) -> str:
    """One line per problem (``line 3: not JSON ...``), at most ``limit`` of them."""
    lines = [f"  line {p.line}: {p.reason}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def render(tokenizer, example: Example) -> tuple[str, str]:
    """The prompt text (chat template, ready for the reply) and the reply text the model
    must produce after it, its end-of-turn token included."""
    prompt = tokenizer.apply_chat_template(
        example.prompt, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(example.messages, tokenize=False)
    if not full.startswith(prompt):
        raise DatasetError(
            f"line {example.line}: the chat template renders the reply differently from the "
            "prompt it gives at inference; this model cannot be tuned with this format."
        )
    return prompt, full[len(prompt) :].rstrip("\n")


def tokenize(
    examples: list[Example], tokenizer, max_length: int
) -> tuple[list[Tokens], list[Problem]]:
    """Token ids and labels of each example; those over ``max_length`` tokens are left out
    and returned as problems (with their length).

    Raises:
        DatasetError: every example is longer than ``max_length``.
    """
    kept, too_long = [], []
    for example in examples:
        prompt, reply = render(tokenizer, example)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids) + len(reply_ids)
        if n > max_length:
            too_long.append(
                Problem(example.line, f"{n} tokens, longer than the limit of {max_length}")
            )
            continue
        kept.append(
            Tokens(example.line, prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids)
        )
    if not kept:
        raise DatasetError(
            f"Every example is longer than {max_length} tokens, so none can be used. Raise "
            f"--max-length or shorten them:\n{describe_problems(too_long)}"
        )
    return kept, too_long
