"""Fixtures the server test modules share: one lab server per module on the real default
model (1 thread, 2 slots), and the official ``openai`` client and a plain ``httpx`` client
pointed at it. A module that needs other settings defines its own ``base_url``."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    settings = ServerSettings(
        threads=1, home=tmp_path_factory.mktemp("home"), parallel=2, max_tokens_limit=512
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture
def http(base_url):
    """Raw HTTP to the module's server, for headers and exact bytes."""
    with httpx.Client(base_url=base_url, timeout=180) as client:
        yield client
