"""Backend selection, errors and the shared streaming helpers, without loading a model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmlab import backends
from llmlab.backends import hf_checkpoint
from llmlab.backends.base import Chunk, ContextOverflowError, Timings, Usage, collect
from llmlab.registry import ModelSpec, Source, sha256_file


@pytest.mark.parametrize(
    "alias, expected",
    [
        ("llama.cpp", "llama.cpp"),
        ("llamacpp", "llama.cpp"),
        ("llama_cpp", "llama.cpp"),
        ("transformers", "transformers"),
        ("HF", "transformers"),
        ("openai", "openai"),
        ("remote", "openai"),
        ("auto", "auto"),
        (None, "auto"),
    ],
)
def test_backend_aliases(alias, expected):
    assert backends.canonical_backend(alias) == expected


def test_unknown_backend_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"Unknown backend 'vllm'.*llama\.cpp.*transformers.*openai"
    ):
        backends.load(backend="vllm")


def test_auto_picks_remote_when_a_base_url_is_given():
    model = backends.load("some-model", base_url="http://127.0.0.1:9/v1")
    assert model.name == "openai"
    assert model.base_url == "http://127.0.0.1:9/v1"
    assert model.model == "some-model"


def test_auto_picks_remote_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLMLAB_BASE_URL", "http://127.0.0.1:9/v1")
    assert backends.load().name == "openai"


def test_auto_picks_llama_cpp_for_the_default_gguf_without_loading_it():
    model = backends.load()
    assert model.name == "llama.cpp"
    assert model.loaded is False  # constructing is instant; the first request loads
    assert model.info()["model"] == "smollm2-135m-instruct:q4_1"


def test_llmlab_backend_setting_is_used_for_auto(monkeypatch):
    monkeypatch.setenv("LLMLAB_BACKEND", "hf")
    model = backends.load()
    assert model.name == "transformers"
    assert model.loaded is False


def test_bitsandbytes_quantization_is_refused_for_llama_cpp():
    with pytest.raises(ValueError, match="already quantized.*--backend transformers"):
        backends.load(backend="llama.cpp", quantization="8bit")


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="Use one of: none, 8bit, 4bit"):
        backends.load(backend="transformers", quantization="3bit")


def test_option_an_engine_does_not_take_is_named():
    with pytest.raises(ValueError, match="llama.cpp backend does not take timeout"):
        backends.load(backend="llama.cpp", timeout=3)


def test_context_overflow_message_has_the_numbers_and_the_fixes():
    err = ContextOverflowError(prompt_tokens=2000, max_tokens=256, context_length=2048)
    assert err.over == 208
    assert isinstance(err, backends.BackendError)
    text = str(err)
    assert "208 over" in text and "2048" in text
    assert "--max-tokens" in text and "--ctx" in text


def test_collect_joins_chunks_and_keeps_the_totals():
    usage, timings = Usage(5, 2), Timings(0.1, 0.3, 2)
    result = collect(iter([Chunk("Hel"), Chunk("lo"), Chunk("", "length", usage, timings)]))
    assert (result.text, result.finish_reason) == ("Hello", "length")
    assert result.usage.total_tokens == 7
    assert result.to_dict()["timings"]["tokens_per_second"] == pytest.approx(5.0)


def test_corrupt_user_model_file_gives_a_backend_error_saying_what_to_do(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    spec = ModelSpec(
        name="broken", tag="local", user=True, source=Source(kind="path", path=str(bad))
    )
    model = backends.load(spec, backend="llama.cpp")
    with pytest.raises(
        backends.BackendError,
        match=r"could not load broken:local.*truncated or damaged.*copy or download it again",
    ):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert model.loaded is False


@pytest.mark.slow
def test_tokenize_parses_control_tokens_only_when_asked():
    model = backends.load(backend="llama.cpp")
    try:
        as_text = model.tokenize("<|im_start|>user")
        as_control = model.tokenize("<|im_start|>user", special=True)
        assert len(as_control) < len(as_text)
        assert model.detokenize(as_control[:1]) == "<|im_start|>"
    finally:
        model.close()


# --- the transformers backend's checkpoint cache (no model loaded) -----------------


def write_fake_checkpoint(folder: Path, source: Path, sha256: str | None = None) -> None:
    def save(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"w" * 100)
        (tmp / "tokenizer.json").write_text("{}")

    hf_checkpoint.write(folder, source, sha256, save, dtype="float32")


@pytest.fixture
def source_and_cache(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF version one")
    folder = tmp_path / "cache" / "model" / "tag" / "hf-checkpoint"
    write_fake_checkpoint(folder, source)
    return source, folder


def test_transformers_cache_is_in_the_home_unless_a_shared_dir_is_set(
    lab_home, monkeypatch, tmp_path
):
    monkeypatch.delenv(hf_checkpoint.CACHE_ENV, raising=False)
    model = backends.load(backend="transformers")
    expected = Path("smollm2-135m-instruct", "q4_1", "hf-checkpoint")
    assert model.checkpoint_dir == lab_home / "models" / expected
    info = model.info()
    assert info["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (info["checkpoint"], info["loaded_from"]) == (str(model.checkpoint_dir), None)
    monkeypatch.setenv(hf_checkpoint.CACHE_ENV, str(tmp_path / "shared"))
    assert backends.load(backend="transformers").checkpoint_dir == tmp_path / "shared" / expected


def test_transformers_cache_is_written_whole_with_a_marker_naming_its_gguf(source_and_cache):
    source, folder = source_and_cache
    assert hf_checkpoint.is_current(folder, source)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["hf-checkpoint"]  # no leftovers
    marker = hf_checkpoint.read_marker(folder)
    assert marker["source"] == str(source) and marker["sha256"] == sha256_file(source)
    assert marker["files"] == {"model.safetensors": 100, "tokenizer.json": 2}
    assert hf_checkpoint.is_current(folder, source, sha256_file(source))
    assert not hf_checkpoint.is_current(folder, source, "0" * 64)  # catalog says another file


def test_transformers_cache_is_stale_once_the_gguf_changes(source_and_cache):
    source, folder = source_and_cache
    os.utime(source, ns=(1, 1))  # touched, same bytes: still the same file
    assert hf_checkpoint.is_current(folder, source)
    source.write_bytes(b"GGUF version two")  # same size, other bytes
    assert not hf_checkpoint.is_current(folder, source)
    source.write_bytes(b"GGUF version three")
    assert not hf_checkpoint.is_current(folder, source)
    write_fake_checkpoint(folder, source)  # rebuilt in place of the stale one
    assert hf_checkpoint.is_current(folder, source)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["hf-checkpoint"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / hf_checkpoint.MARKER).unlink(),
        lambda f: (f / hf_checkpoint.MARKER).write_text("{not json"),
        lambda f: (f / hf_checkpoint.MARKER).write_text('{"format": 0}'),
        lambda f: (f / "model.safetensors").write_bytes(b"w" * 10),
        lambda f: (f / "tokenizer.json").unlink(),
    ],
    ids=["no-marker", "garbled-marker", "old-format", "truncated-weights", "missing-file"],
)
def test_transformers_cache_damaged_folders_are_not_current(source_and_cache, damage):
    source, folder = source_and_cache
    damage(folder)
    assert not hf_checkpoint.is_current(folder, source)


def test_transformers_cache_failed_write_leaves_the_old_folder_and_no_partial(source_and_cache):
    source, folder = source_and_cache

    def broken(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        hf_checkpoint.write(folder, source, None, broken)
    assert hf_checkpoint.is_current(folder, source)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["hf-checkpoint"]


def test_a_backend_without_every_positions_logits_says_it_cannot_score_text():
    from llmlab.backends.remote import RemoteBackend
    from llmlab.perplexity import as_scorer

    with pytest.raises(backends.BackendError, match="cannot score text.*Use a local model"):
        as_scorer(RemoteBackend(base_url="http://127.0.0.1:9/v1", model="m"))
