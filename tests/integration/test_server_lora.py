"""The server's LoRA adapters: ``--lora NAME=PATH`` loads them on the served model's engine,
``GET /lora-adapters`` lists them (llama.cpp server's shape), and a bad ``--lora`` stops the
server script before it starts, with exit code 2 and a message saying what to fix."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from lora_adapters import make_adapter

from llmlab import registry
from part5.combined_app import ServerSettings, create_app
from part5.combined_app.scripts.server import main


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return str(make_adapter(tmp_path_factory.mktemp("lora") / "style", 1))


def test_lora_adapters_lists_what_the_server_was_told_to_load(adapter):
    client = TestClient(create_app(ServerSettings(lora={"style": adapter}, api_key="k")))
    assert client.get("/lora-adapters").status_code == 401  # behind the key like the API
    r = client.get("/lora-adapters", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200
    assert r.json() == [{"id": 0, "name": "style", "path": adapter, "scale": 0.0}]
    assert TestClient(create_app(ServerSettings())).get("/lora-adapters").json() == []


@pytest.mark.slow
def test_the_served_engine_loads_the_adapters_and_applies_them_per_request(adapter):
    with TestClient(create_app(ServerSettings(lora={"style": adapter}, n_ctx=512))) as client:
        while client.get("/health").json()["status"] == "loading":
            time.sleep(0.1)
        engine = client.app.state.service.engine
        assert engine.adapters == {"style": adapter}
        messages = [{"role": "user", "content": "Name a colour."}]
        base = engine.chat(messages, max_tokens=12, temperature=0)
        styled = engine.chat(messages, max_tokens=12, temperature=0, lora={"style": 1.0})
    assert base.text != styled.text


@pytest.mark.parametrize("value", ["style", "=a.gguf", "style="])
def test_a_lora_option_without_name_and_path_exits_2(value, capsys):
    assert main(["--lora", value]) == 2
    assert "--lora takes NAME=PATH" in capsys.readouterr().err


def test_a_missing_adapter_file_exits_2_naming_it(tmp_path, capsys):
    assert main(["--lora", f"style={tmp_path / 'none.gguf'}"]) == 2
    assert f"No LoRA adapter at {tmp_path / 'none.gguf'}" in capsys.readouterr().err


def test_an_adapter_for_another_model_exits_2_naming_both(tmp_path, capsys):
    path = make_adapter(tmp_path / "foreign", 3, base="qwen2.5-0.5b-instruct")
    assert main(["--lora", f"foreign={path}"]) == 2
    err = capsys.readouterr().err
    assert "made for qwen2.5-0.5b-instruct, not for " + registry.resolve().ref in err
