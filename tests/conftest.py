"""Shared test set-up: every test gets its own empty LLMLAB_HOME (as simonw/llm does with
LLM_USER_PATH), so no test reads or writes the learner's real catalog, stores or transcripts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run offline: no hub look-ups, even where a library would try one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb


@pytest.fixture(scope="session", autouse=True)
def shared_hf_checkpoints(tmp_path_factory):
    """One transformers checkpoint cache for the whole run (notebook kernels inherit it).

    Each test has its own LLMLAB_HOME, so without this every test that loads the
    transformers backend would convert the GGUF file again (~35 s of CPU each time).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMLAB_HF_CACHE_DIR", str(tmp_path_factory.mktemp("hf-checkpoints")))
        yield


@pytest.fixture(autouse=True)
def lab_home(tmp_path, monkeypatch):
    """A fresh, empty LLMLAB_HOME for each test; returns its path."""
    home = tmp_path / "llmlab-home"
    home.mkdir()
    monkeypatch.setenv("LLMLAB_HOME", str(home))
    for var in ("LLMLAB_DEFAULT_MODEL", "LLMLAB_BACKEND", "LLMLAB_BASE_URL", "LLMLAB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    # batch_process.py and server.py would make and measure a batch-friendly Q8_0 in every
    # fresh home (tens of seconds each): tests run the shipped file, except those of that
    # choice (tests/unit/test_batch_format.py, test_batch_process.py), which unset this.
    monkeypatch.setenv("LLMLAB_EXACT_MODEL", "1")
    return home


HERMES_TEMPLATE = Path(__file__).parent / "data" / "qwen2_5_tools_template.jinja"


@pytest.fixture(scope="session")
def hermes_template() -> str:
    """Qwen2.5-Instruct's chat template: tools in ``<tools>``, calls in ``<tool_call>``."""
    return HERMES_TEMPLATE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def hermes_model(tmp_path_factory, hermes_template):
    """A copy of the default model's GGUF whose chat template is :func:`hermes_template`
    (no model the lab runs here ships a tool-aware template); made once per test run."""
    import gguf

    from llmlab import registry

    source = registry.resolve(None).path
    target = tmp_path_factory.mktemp("hermes-model") / "smollm2-hermes-tools.gguf"
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if field.name == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    writer.add_chat_template(hermes_template)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return target
