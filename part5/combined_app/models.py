"""Several models on one server: loaded on first use, unloaded when idle, within a memory
budget, and chosen by name, alias or rules.

The first model (``--model``) is loaded at start and stays: the web page, documents, batch
jobs and ``/tokenize`` use it. Each further one (``--model`` again, or ``models:`` in a
models file) is loaded by the first request that names it and unloaded after it has been idle
for its ``keep_alive``, as Ollama does: a request may send ``keep_alive`` (seconds, or
``"5m"``, ``"1h"``; ``0`` unloads as soon as the reply is done, ``-1`` keeps the model).
Before a load, the least recently used idle models are unloaded until the registry's memory
estimate of the new one fits the budget; if it cannot fit, the request gets a 503 saying
what holds the memory.

A models file (``--models-file``, YAML) names the models, aliases, and the rules behind
``model: "auto"``, tried in order, the first whose every condition holds wins::

    models: [gemma3-270m]
    aliases: {fast: smollm2-135m-instruct, base: gemma3-270m}
    auto:
      rules:
        - {when: {tools: true}, model: fast}
        - {when: {min_prompt_chars: 2000}, model: fast}
        - {when: {keywords: [poem, story]}, model: fast}
      default: fast
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmlab import registry
from llmlab.hardware import human_bytes
from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import APIError
from part5.combined_app.metrics import Metrics
from part5.combined_app.service import ModelService

REAP_SECONDS = 0.5
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def keep_alive_seconds(value: float | str | None, default: float) -> float:
    """Ollama's ``keep_alive``: seconds, or a duration such as ``"5m"``; a negative value
    keeps the model loaded (``inf``). ``ValueError`` for anything else."""
    if value is None:
        return default
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"keep_alive {value!r} is not a duration such as 300, '5m' or '1h'")
        seconds = float(match[1]) * _UNITS[match[2]]
    return float("inf") if seconds < 0 else seconds


class Conditions(BaseModel):
    """What a request must have for a rule to choose its model (all must hold)."""

    model_config = ConfigDict(extra="forbid")
    min_prompt_chars: int | None = Field(None, ge=0)
    max_prompt_chars: int | None = Field(None, ge=0)
    json_output: bool | None = Field(None, alias="json")
    tools: bool | None = None
    keywords: list[str] = Field(default_factory=list)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    when: Conditions = Field(default_factory=Conditions)
    model: str


class AutoRoute(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[Rule] = Field(default_factory=list)
    default: str


class ModelsFile(BaseModel):
    """The models file: more models, aliases, and the ``auto`` rules."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=list)
    aliases: dict[str, str] = Field(default_factory=dict)
    auto: AutoRoute | None = None


def read_models_file(path: Path) -> ModelsFile:
    """The parsed models file; ``ValueError`` saying what is wrong and where."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return ModelsFile.model_validate(data)
    except OSError as exc:
        raise ValueError(f"Cannot read the models file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"The models file {path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"The models file {path}: {where}: {first['msg']}") from exc


@dataclass
class Hints:
    """What the ``auto`` rules may look at in a request."""

    prompt_chars: int = 0
    json_output: bool = False
    tools: bool = False
    text: str = ""


def _matches(when: Conditions, hints: Hints) -> bool:
    text = hints.text.lower()
    return (
        (when.min_prompt_chars is None or hints.prompt_chars >= when.min_prompt_chars)
        and (when.max_prompt_chars is None or hints.prompt_chars <= when.max_prompt_chars)
        and (when.json_output is None or hints.json_output == when.json_output)
        and (when.tools is None or hints.tools == when.tools)
        and all(word.lower() in text for word in when.keywords)
    )


@dataclass
class _Loaded:
    service: ModelService
    estimate: int
    keep_alive: float
    last_used: float
    users: int = 0


class ModelPool:
    """The served chat models by name: the default one (always loaded) and the others,
    loaded and unloaded on demand. Routes call :meth:`choose` then :meth:`use`."""

    def __init__(
        self,
        settings: ServerSettings,
        default: ModelService,
        metrics: Metrics,
        file: ModelsFile | None = None,
        clock: Callable[[], float] = time.monotonic,
        make_service: Callable[[ServerSettings], ModelService] = ModelService,
    ):
        self.settings = settings
        self.default = default
        self.metrics = metrics
        self.clock = clock
        self.make_service = make_service
        file = file or ModelsFile()
        self.extra = list(dict.fromkeys([*settings.models, *file.models]))
        self.aliases = {**file.aliases, **settings.aliases}
        self.auto = file.auto
        self._specs: dict[str, registry.ModelSpec] = {}
        self._loaded: dict[str, _Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Without a budget given, three quarters of the RAM: the rest is the system's.
        self.budget = settings.memory_budget or int(0.75 * psutil.virtual_memory().total)

    @classmethod
    def validate(cls, settings: ServerSettings) -> None:
        """Check the models, aliases, rules and models file of ``settings`` before anything
        loads (``RegistryError`` or ``ValueError`` saying what is wrong)."""
        file = read_models_file(settings.models_file) if settings.models_file else None
        metrics = Metrics(queue_depth=lambda: 0, busy_slots=lambda: 0)
        cls(settings, ModelService(settings), metrics, file).check()

    # --- names ------------------------------------------------------------------------

    def check(self) -> None:
        """Resolve every model, alias and rule now (``RegistryError``/``ValueError``), so a
        typo stops the server at start rather than failing a request later."""
        for name in self.extra:
            self._specs[name] = registry.resolve(name)
        for alias, target in self.aliases.items():
            if self._canonical(target) is None:
                raise ValueError(
                    f"The alias {alias!r} names {target!r}, which this server does not serve. "
                    f"Serve it too (--model {target}) or point the alias at one of: "
                    f"{', '.join(self.served_names())}."
                )
        if self.auto is not None:
            for target in [self.auto.default, *(rule.model for rule in self.auto.rules)]:
                if self._canonical(target) is None:
                    raise ValueError(
                        f"An auto rule names {target!r}, which is neither a served model nor "
                        f"an alias. Use one of: {', '.join(self.served_names() + sorted(self.aliases))}."
                    )

    def served_names(self) -> list[str]:
        """The served models' names, the default first."""
        return [self.default.model_id, *self.extra]

    def _is_default(self, name: str) -> bool:
        spec = self.default.spec
        return name in (self.default.model_id, self.default.settings.model) or bool(
            spec and name in (spec.ref, spec.name)
        )

    def _canonical(self, name: str) -> str | None:
        """The served model ``name`` means (an alias followed), or None."""
        name = self.aliases.get(name, name)
        if self._is_default(name):
            return self.default.model_id
        for extra in self.extra:
            spec = self._specs.get(extra)
            if name == extra or (spec and name in (spec.ref, spec.name)):
                return extra
        return None

    def choose(self, requested: str | None, hints: Hints) -> tuple[str, str]:
        """``(model, how)`` for a request's ``model`` field: ``default`` (none named),
        ``name``, ``alias`` or ``auto``; a 404 naming what is served otherwise."""
        if not requested:
            return self.default.model_id, "default"
        if requested == "auto" and self.auto is not None:
            target = next(
                (rule.model for rule in self.auto.rules if _matches(rule.when, hints)),
                self.auto.default,
            )
            return self._canonical(target) or self.default.model_id, "auto"
        chosen = self._canonical(requested)
        if chosen is None:
            names = self.served_names() + sorted(self.aliases) + (["auto"] if self.auto else [])
            raise APIError(
                404,
                f"Unknown model {requested!r}: this server serves {', '.join(names)}. "
                "GET /v1/models lists them; start it with --model NAME for another.",
                param="model",
                code="model_not_found",
            )
        return chosen, "alias" if requested in self.aliases else "name"

    def capabilities(self, name: str) -> list[str]:
        """What the served model ``name`` can do (from the registry; nothing is loaded)."""
        if name == self.default.model_id:
            return list(self.default.spec.capabilities) if self.default.spec else ["chat"]
        return list(self._specs[name].capabilities)

    def require_chat(self, name: str) -> None:
        """A 400 when the served model ``name`` cannot chat (a base model)."""
        if "chat" not in self.capabilities(name):
            raise APIError(
                400,
                f"{name} is a completion model (it has no chat template). Send it to "
                "/v1/completions, or name a chat model.",
                param="model",
            )

    # --- loading --------------------------------------------------------------------------

    def is_loaded(self, name: str) -> bool:
        """Whether ``name`` has an engine in memory now."""
        return name == self.default.model_id or name in self._loaded

    def estimate(self, name: str) -> int:
        """Bytes the registry expects ``name`` to take with this server's slots and context."""
        spec = self.default.spec if name == self.default.model_id else self._specs[name]
        n_ctx = (self.settings.n_ctx or registry.DEFAULT_N_CTX) * self.settings.parallel
        return (spec and registry.spec_ram_estimate(spec, n_ctx)) or 0

    @contextlib.asynccontextmanager
    async def use(self, name: str, keep_alive: float | str | None) -> AsyncIterator[ModelService]:
        """The service for ``name``, loaded if need be, held while the body submits its work
        (a model is only unloaded when nobody holds it and its engine is idle)."""
        if name == self.default.model_id:
            yield self.default
            return
        try:
            seconds = keep_alive_seconds(keep_alive, self.settings.keep_alive)
        except ValueError as exc:
            raise APIError(400, f"{exc}.", param="keep_alive") from exc
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._loaded:
                await self._load(name)
        entry = self._loaded[name]
        entry.keep_alive, entry.users = seconds, entry.users + 1
        try:
            yield entry.service
        finally:
            entry.users -= 1
            entry.last_used = self.clock()

    async def _load(self, name: str) -> None:
        need = self.estimate(name)
        await self._make_room(name, need)
        service = self.make_service(self.settings.model_copy(update={"model": name, "lora": {}}))
        service.require_chat = False
        service.on_rejected = self.metrics.rejected.inc
        service.on_engine_failure = self.metrics.engine_failures.inc
        started = time.perf_counter()
        try:
            await run_in_threadpool(service.load)
        except Exception as exc:
            raise APIError(
                500, f"The model {name} could not be loaded: {exc}", code="model_load_failed"
            ) from exc
        self.metrics.model_load_seconds.labels(model=name).inc(time.perf_counter() - started)
        self.metrics.model_loads.labels(model=name).inc()
        self._loaded[name] = _Loaded(service, need, self.settings.keep_alive, self.clock())

    def _in_memory(self) -> int:
        return self.estimate(self.default.model_id) + sum(e.estimate for e in self._loaded.values())

    async def _make_room(self, name: str, need: int) -> None:
        budget = self.budget
        while self._in_memory() + need > budget:
            idle = [n for n, e in self._loaded.items() if not self._busy(e)]
            if not idle:
                break
            oldest = min(idle, key=lambda n: self._loaded[n].last_used)
            await self._unload(oldest, "memory")
        if self._in_memory() + need > budget:
            default = self.default.model_id
            held = [f"{default} ({human_bytes(self.estimate(default))}, always loaded)"]
            held += [f"{n} ({human_bytes(e.estimate)}, busy)" for n, e in self._loaded.items()]
            raise APIError(
                503,
                f"{name} needs about {human_bytes(need)}, which does not fit the memory budget "
                f"of {human_bytes(budget)}: {', '.join(held)} hold the rest. Retry when a "
                "model is idle, or start the server with a larger --memory-budget.",
                code="model_over_budget",
                headers={"Retry-After": str(self.settings.retry_after)},
            )

    @staticmethod
    def _busy(entry: _Loaded) -> bool:
        return entry.users > 0 or entry.service.busy_slots() > 0 or entry.service.queue_depth() > 0

    async def _unload(self, name: str, reason: str) -> None:
        entry = self._loaded.pop(name)  # first: no new request finds it while it closes
        self.metrics.model_unloads.labels(model=name, reason=reason).inc()
        await run_in_threadpool(entry.service.close)

    async def reap(self) -> None:
        """Unload every model idle for longer than its ``keep_alive`` (one pass)."""
        now = self.clock()
        for name, entry in list(self._loaded.items()):
            if self._busy(entry):
                entry.last_used = now
            elif now - entry.last_used >= entry.keep_alive:
                await self._unload(name, "idle")

    async def reap_forever(self) -> None:
        """:meth:`reap` every half second until cancelled (the app's lifespan runs it)."""
        while True:
            await asyncio.sleep(REAP_SECONDS)
            await self.reap()

    async def close(self) -> None:
        """Unload every model but the default (the app closes that one itself)."""
        for name in list(self._loaded):
            await self._unload(name, "shutdown")

    def describe(self) -> list[dict[str, Any]]:
        """One entry per served model for ``/v1/models``: loaded or not, estimate, aliases."""
        now = self.clock()
        out = []
        for name in self.served_names():
            entry = self._loaded.get(name)
            left = None
            if entry is not None and entry.keep_alive != float("inf"):
                left = max(0.0, entry.keep_alive - (now - entry.last_used))
            spec = self.default.spec if name == self.default.model_id else self._specs.get(name)
            service = self.default if name == self.default.model_id else entry and entry.service
            out.append(
                {
                    "id": name,
                    "ref": spec.ref if spec else None,
                    "loaded": self.is_loaded(name),
                    "capabilities": self.capabilities(name),
                    "estimated_memory_bytes": self.estimate(name),
                    "aliases": sorted(a for a in self.aliases if self._canonical(a) == name),
                    "unloads_in_seconds": left,
                    # How tools reach it (llmlab.tool_formats), known once it is loaded.
                    "tool_format": service.tool_format.name
                    if service and service.status == "ok"
                    else None,
                }
            )
        return out
