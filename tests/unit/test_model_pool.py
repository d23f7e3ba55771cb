"""The multi-model pool with fake services: choosing by name, alias and rules, loading on
first use, keep_alive, and the memory budget (least recently used out; 503 when it cannot fit)."""

from __future__ import annotations

import asyncio

import pytest

from llmlab import registry
from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import APIError
from part5.combined_app.metrics import Metrics
from part5.combined_app.models import (
    Hints,
    ModelPool,
    ModelsFile,
    keep_alive_seconds,
    read_models_file,
)

DEFAULT, BASE = "smollm2-135m-instruct", "gemma3-270m"


class FakeService:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.spec = registry.resolve(settings.model)
        self.loaded = self.closed = False
        self.busy = 0
        self.require_chat = True
        self.on_rejected = self.on_engine_failure = None

    @property
    def model_id(self) -> str:
        return self.spec.name

    def load(self) -> None:
        self.loaded = True

    def close(self) -> None:
        self.closed = True

    def busy_slots(self) -> int:
        return self.busy

    def queue_depth(self) -> int:
        return 0


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(file: ModelsFile | None = None, **settings):
    settings = ServerSettings(model=DEFAULT, models=[BASE], parallel=1, n_ctx=512, **settings)
    clock = Clock()
    made: list[FakeService] = []

    def make(s):
        made.append(FakeService(s))
        return made[-1]

    metrics = Metrics(queue_depth=lambda: 0, busy_slots=lambda: 0)
    pool = ModelPool(settings, FakeService(settings), metrics, file, clock, make)
    pool.check()
    return pool, clock, made, metrics


def sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def use(pool: ModelPool, name: str, keep_alive=None):
    async with pool.use(name, keep_alive) as service:
        return service


RULES = ModelsFile.model_validate(
    {
        "aliases": {"fast": DEFAULT, "base": BASE},
        "auto": {
            "rules": [
                {"when": {"tools": True}, "model": "fast"},
                {"when": {"min_prompt_chars": 100}, "model": BASE},
                {"when": {"keywords": ["Poem"]}, "model": BASE},
            ],
            "default": "fast",
        },
    }
)


def test_a_request_is_routed_by_name_alias_or_rules():
    pool, *_ = make_pool(RULES)
    assert pool.choose(None, Hints()) == (DEFAULT, "default")
    assert pool.choose(BASE, Hints()) == (BASE, "name")
    assert pool.choose(f"{BASE}:q4_k_m", Hints()) == (BASE, "name")
    assert pool.choose("base", Hints()) == (BASE, "alias")
    assert pool.choose("auto", Hints(tools=True, prompt_chars=500)) == (DEFAULT, "auto")
    assert pool.choose("auto", Hints(prompt_chars=500)) == (BASE, "auto")
    assert pool.choose("auto", Hints(text="write a poem")) == (BASE, "auto")
    assert pool.choose("auto", Hints(text="hello")) == (DEFAULT, "auto")


def test_an_unknown_model_or_alias_is_a_404_naming_what_is_served():
    pool, *_ = make_pool(RULES)
    with pytest.raises(APIError) as err:
        pool.choose("quality", Hints())
    assert err.value.status == 404
    assert DEFAULT in err.value.message and "fast" in err.value.message
    assert "auto" in err.value.message


def test_an_alias_or_rule_naming_a_model_not_served_stops_the_server_at_start():
    with pytest.raises(ValueError, match="alias 'quality' names 'qwen'.*--model qwen"):
        make_pool(ModelsFile(aliases={"quality": "qwen"}))
    bad = ModelsFile.model_validate({"auto": {"rules": [], "default": "nope"}})
    with pytest.raises(ValueError, match="auto rule names 'nope'"):
        make_pool(bad)


def test_a_base_model_cannot_answer_chat():
    pool, *_ = make_pool()
    with pytest.raises(APIError, match="completion model.*v1/completions"):
        pool.require_chat(BASE)
    pool.require_chat(DEFAULT)


def test_a_model_loads_on_first_use_once_and_unloads_after_keep_alive():
    pool, clock, made, metrics = make_pool(keep_alive=60)
    assert not pool.is_loaded(BASE)
    first = asyncio.run(use(pool, BASE))
    second = asyncio.run(use(pool, BASE))
    assert first is second and first.loaded and len(made) == 1
    assert first.require_chat is False and first.settings.model == BASE
    assert pool.is_loaded(BASE)
    assert sample(metrics, "llmlab_model_loads_total", model=BASE) == 1
    clock.now = 59
    asyncio.run(pool.reap())
    assert pool.is_loaded(BASE)
    clock.now = 60
    asyncio.run(pool.reap())
    assert not pool.is_loaded(BASE) and first.closed
    assert sample(metrics, "llmlab_model_unloads_total", model=BASE, reason="idle") == 1


def test_keep_alive_zero_unloads_once_idle_and_minus_one_keeps_it():
    pool, clock, made, _ = make_pool()
    service = asyncio.run(use(pool, BASE, keep_alive=0))
    service.busy = 1  # still decoding: stays
    asyncio.run(pool.reap())
    assert pool.is_loaded(BASE)
    service.busy = 0
    asyncio.run(pool.reap())
    assert not pool.is_loaded(BASE)
    asyncio.run(use(pool, BASE, keep_alive=-1))
    clock.now = 10**9
    asyncio.run(pool.reap())
    assert pool.is_loaded(BASE)


def test_the_default_model_is_never_unloaded():
    pool, clock, *_ = make_pool(keep_alive=0)
    assert asyncio.run(use(pool, DEFAULT)) is pool.default
    clock.now = 1000
    asyncio.run(pool.reap())
    assert pool.is_loaded(DEFAULT)


def test_keep_alive_values_are_read_as_ollama_does():
    assert keep_alive_seconds(None, 300) == 300
    assert keep_alive_seconds("5m", 300) == 300
    assert keep_alive_seconds("1h", 300) == 3600
    assert keep_alive_seconds("30s", 0) == 30
    assert keep_alive_seconds(0, 300) == 0
    assert keep_alive_seconds(-1, 300) == float("inf")
    with pytest.raises(ValueError, match="not a duration"):
        keep_alive_seconds("soon", 300)


def test_a_bad_keep_alive_is_a_400():
    pool, *_ = make_pool()
    with pytest.raises(APIError) as err:
        asyncio.run(use(pool, BASE, keep_alive="soon"))
    assert err.value.status == 400 and err.value.param == "keep_alive"


# A third catalog model, not downloaded here: these tests look it up without its file.
THIRD = "qwen2.5-0.5b-instruct"


@pytest.fixture
def catalog_only(monkeypatch):
    monkeypatch.setattr(registry, "resolve", registry.find)


def test_the_least_recently_used_idle_model_makes_room(catalog_only):
    third = THIRD
    pool, clock, made, metrics = make_pool()
    pool.extra.append(third)
    pool.check()
    need = pool.estimate(DEFAULT) + pool.estimate(BASE)
    pool.budget = need + pool.estimate(third) - 1  # room for two of the three
    asyncio.run(use(pool, BASE))
    clock.now = 5
    asyncio.run(use(pool, third))  # BASE must go: it was used longest ago
    assert not pool.is_loaded(BASE) and pool.is_loaded(third)
    assert sample(metrics, "llmlab_model_unloads_total", model=BASE, reason="memory") == 1


def test_a_model_that_cannot_fit_is_a_503_with_the_reason():
    pool, *_ = make_pool()
    pool.budget = pool.estimate(DEFAULT) + pool.estimate(BASE) // 2
    with pytest.raises(APIError) as err:
        asyncio.run(use(pool, BASE))
    assert err.value.status == 503 and err.value.code == "model_over_budget"
    assert BASE in err.value.message and "--memory-budget" in err.value.message
    assert "Retry-After" in err.value.headers


def test_a_busy_model_is_not_unloaded_to_make_room(catalog_only):
    third = THIRD
    pool, *_ = make_pool()
    pool.extra.append(third)
    pool.check()
    pool.budget = pool.estimate(DEFAULT) + pool.estimate(BASE) + 1
    asyncio.run(use(pool, BASE)).busy = 1
    with pytest.raises(APIError, match="busy"):
        asyncio.run(use(pool, third))
    assert pool.is_loaded(BASE)


def test_the_models_file_is_checked_with_clear_messages(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: [gemma3-270m]\naliases: {base: gemma3-270m}\n")
    assert read_models_file(path).aliases == {"base": BASE}
    path.write_text("models: [a\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_models_file(path)
    path.write_text("auto: {rules: [{when: {colour: red}, model: x}], default: x}\n")
    with pytest.raises(ValueError, match="auto.rules.0.when.colour"):
        read_models_file(path)
    with pytest.raises(ValueError, match="Cannot read the models file"):
        read_models_file(tmp_path / "missing.yaml")
