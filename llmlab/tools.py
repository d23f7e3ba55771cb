"""A small tool loop: plain Python functions become tools the model can call::

    from llmlab import backends, tools

    def add(a: float, b: float) -> float:
        '''Add two numbers.

        Args:
            a: the first number.
            b: the second number.
        '''
        return a + b

    run = tools.run_tools(backends.load(), [{"role": "user", "content": "2 + 3?"}], [add])
    run.answer, [(s.name, s.arguments, s.result, s.error) for s in run.steps]

Each function's JSON schema comes from its type hints (through pydantic) and its docstring
(the first paragraph describes the tool; ``Args:`` or ``:param x:`` lines describe the
parameters). The loop asks the model for a reply in the generic tool-call format of
:mod:`llmlab.structured` (held by a grammar, so every call is well formed), calls each chosen
function with validated arguments, feeds the results back as tool messages, and stops at a
plain answer. After ``max_steps`` rounds of calls it asks once more with tools switched off,
so there is always an answer. A tool that raises, or arguments that do not validate, become an
error result the model sees, not a crash.

Two safe built-ins: :func:`calculator` (arithmetic by walking the ``ast``, never ``eval``) and
:func:`document_search` (a search over a :class:`llmlab.rag.DocumentStore` collection).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, ValidationError, create_model

from llmlab import structured
from llmlab.backends.base import Backend, Message, collect, complete_reply


@dataclass
class FunctionTool:
    """A Python function as a tool: its :class:`~llmlab.structured.Tool` description and
    the pydantic model that validates its arguments."""

    function: Callable[..., Any]
    spec: structured.Tool
    arguments_model: type

    @property
    def name(self) -> str:
        return self.spec.name

    def call(self, arguments: dict[str, Any]) -> Any:
        """Validate ``arguments`` and call the function (raises ValidationError or what it raises)."""
        validated = self.arguments_model.model_validate(arguments)
        return self.function(
            **{name: getattr(validated, name) for name in type(validated).model_fields}
        )


def function_tool(function: Callable[..., Any], name: str | None = None) -> FunctionTool:
    """Describe ``function`` as a tool: JSON schema from its type hints and docstring.

    Raises:
        TypeError: a parameter without a type hint, or ``*args`` / ``**kwargs``.
    """
    description, param_docs = parse_docstring(inspect.getdoc(function) or "")
    hints = inspect.get_annotations(function, eval_str=True)
    fields: dict[str, Any] = {}
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{function.__name__}: *args and **kwargs cannot be tool parameters")
        if param.name not in hints:
            raise TypeError(
                f"{function.__name__}: parameter {param.name!r} needs a type hint to become "
                "a tool parameter"
            )
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (
            hints[param.name],
            Field(default, description=param_docs.get(param.name)),
        )
    tool_name = name or function.__name__
    model = create_model(f"{tool_name}_arguments", **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    return FunctionTool(function, structured.Tool(tool_name, description, schema), model)


_PARAM_LINE = re.compile(r"^\s*(?::param\s+)?(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (first paragraph) and parameter descriptions of a docstring.

    Understands Google style (``Args:`` then ``name: text`` or ``name (type): text``, with
    indented continuation lines) and reST (``:param name: text``).
    """
    first: list[str] = []
    for line in doc.strip().splitlines():  # the first paragraph, up to any field list
        if not line.strip() or line.strip().startswith(":") or line.strip() == "Args:":
            break
        first.append(line.strip())
    description = " ".join(first)
    params: dict[str, str] = {}
    in_args, current, indent, param_indent = False, None, 0, 0
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(":param "):
            match = _PARAM_LINE.match(stripped)
            if match:
                current, in_args = match.group(1), False
                params[current] = match.group(2).strip()
            continue
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args, current, indent = True, None, len(line) - len(line.lstrip())
            continue
        if not in_args:
            if current and stripped and not stripped.startswith(":"):
                params[current] += " " + stripped  # reST continuation
            elif not stripped or stripped.startswith(":"):
                current = None
            continue
        depth = len(line) - len(line.lstrip())
        if stripped and depth <= indent:  # the next section (Returns:, Raises:) ends Args
            in_args, current = False, None
            continue
        match = _PARAM_LINE.match(line)
        if match and (current is None or depth <= param_indent):
            current, param_indent = match.group(1), depth
            params[current] = match.group(2).strip()
        elif current and stripped:
            params[current] += " " + stripped
    return description, params


def as_tools(tools: list[Callable[..., Any] | FunctionTool]) -> list[FunctionTool]:
    """Functions described as tools (FunctionTools are kept); ValueError on a repeated name."""
    out = [t if isinstance(t, FunctionTool) else function_tool(t) for t in tools]
    names = [t.name for t in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tool name(s) used twice: {', '.join(repeated)}")
    return out


@dataclass
class ToolStep:
    """One tool call of a run: what the model asked for and what came back."""

    name: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None
    call_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a result JSON cannot hold is given as its text."""
        try:
            result = json.loads(json.dumps(self.result))
        except (TypeError, ValueError):
            result = str(self.result)
        return {
            "name": self.name,
            "arguments": self.arguments,
            "result": result,
            "error": self.error,
        }


@dataclass
class ToolRun:
    """Everything a :func:`run_tools` run did: each call, the final answer, the conversation
    (OpenAI shape: assistant ``tool_calls`` and ``role: "tool"`` results), and whether the
    step limit ended the calls."""

    answer: str
    steps: list[ToolStep] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    hit_max_steps: bool = False


def run_tools(
    backend: Backend,
    messages: list[Message],
    tools: list[Callable[..., Any] | FunctionTool],
    max_steps: int = 4,
    on_step: Callable[[ToolStep], None] | None = None,
    **params: Any,
) -> ToolRun:
    """Let the model call ``tools`` until it answers in text; see the module docstring.

    ``max_steps`` bounds the rounds of calls (a round may hold several calls); ``on_step`` is
    called after each call (a chat prints it); ``params`` are sampling settings.

    Raises:
        ReplyCutShortError: ``max_tokens`` ended a reply before its JSON was complete.
        SchemaError: a tool's parameters cannot be held by a grammar.
    """
    if max_steps < 0:
        raise ValueError("max_steps must be 0 or more")
    function_tools = as_tools(tools)
    by_name = {t.name: t for t in function_tools}
    specs = [t.spec for t in function_tools]
    conversation: list[dict[str, Any]] = [dict(m) for m in messages]
    run = ToolRun(answer="", messages=conversation)
    for round_ in range(max_steps + 1):
        choice = "auto" if round_ < max_steps else "none"
        # Not chat(schema=...): a server that ignores the schema still gets its reply read
        # (plain text is an answer, a call of an unknown tool an error result).
        reply = complete_reply(
            collect(
                backend.stream_chat(
                    structured.prepare_messages(conversation, specs),
                    json_schema=structured.tool_reply_schema(specs, choice),
                    **params,
                )
            )
        )
        content, calls = structured.parse_tool_reply(reply.text)
        if not calls:
            run.answer = content or ""
            conversation.append({"role": "assistant", "content": run.answer})
            run.hit_max_steps = round_ == max_steps and max_steps > 0
            return run
        conversation.append(
            {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]}
        )
        for call in calls:
            step = _invoke(by_name.get(call.name), call, by_name)
            run.steps.append(step)
            conversation.append(
                {"role": "tool", "tool_call_id": call.id, "content": _result_text(step)}
            )
            if on_step is not None:
                on_step(step)
    raise AssertionError("unreachable: the last round allows only an answer")


def _invoke(
    tool: FunctionTool | None, call: structured.ToolCall, tools: dict[str, FunctionTool]
) -> ToolStep:
    arguments = json.loads(call.arguments)
    step = ToolStep(call.name, arguments if isinstance(arguments, dict) else {}, call_id=call.id)
    if tool is None:
        step.error = f"no tool named {call.name!r}; the tools are: {', '.join(tools)}"
        return step
    try:
        step.result = tool.call(step.arguments)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5]
        )
        step.error = f"invalid arguments: {problems}"
    except Exception as err:  # noqa: BLE001 - the model sees the error and may try again
        step.error = f"{type(err).__name__}: {err}"
    return step


def _result_text(step: ToolStep) -> str:
    if step.error is not None:
        return f"error: {step.error}"
    if isinstance(step.result, str):
        return step.result
    try:
        return json.dumps(step.result, ensure_ascii=False)
    except TypeError:
        return str(step.result)


# --- built-ins ---------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000  # 9 ** 9 ** 9 would run for minutes; nothing a chat needs is that big


def calculator(expression: str) -> float | int:
    """Evaluate an arithmetic expression, e.g. "(2 + 3) * 4" or "sqrt(2) ** 2".

    Args:
        expression: numbers with + - * / // % ** and parentheses; the functions sqrt, abs,
            round, log, exp, sin, cos, tan; the constants pi and e.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        return _FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
    raise ValueError(f"not allowed in a calculation: {ast.unparse(node)!r}")


def document_search(store: Any, top_k: int = 3) -> FunctionTool:
    """A ``search_documents(query)`` tool over ``store`` (a :class:`llmlab.rag.DocumentStore`):
    the best passages with their source, as :func:`llmlab.rag.DocumentStore.search` finds them."""

    def search_documents(query: str) -> list[dict[str, Any]]:
        """Search the document collection for passages about a topic.

        Args:
            query: what to look for, in a few words.
        """
        return [
            {"source": h.to_dict()["source"], "location": h.location, "text": h.text.strip()}
            for h in store.search(query, top_k)
        ]

    return function_tool(search_documents)


BUILTIN_TOOLS = (calculator,)  # document_search needs a collection, so it is made on demand
