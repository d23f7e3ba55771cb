"""The model registry command line (part5/model_registry.py): pull against a local HTTP
server (normal, interrupted and resumed, wrong checksum), list/show JSON, verify, add,
remove, recommend, and unknown-name suggestions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from registry_server import FileServer, start

from llmlab import registry
from llmlab.registry import ModelSpec, Source
from llmlab.registry_cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
PAYLOAD_SIZE = 3 * (1 << 20) + 12345  # a few 1 MiB blocks and a ragged end


@pytest.fixture
def payload() -> bytes:
    return os.urandom(PAYLOAD_SIZE)


@pytest.fixture
def server(payload):
    files = {"/files/tiny.gguf": payload, "/owner/tiny-repo/resolve/main/tiny.gguf": payload}
    srv = FileServer(files)
    httpd = start(srv)
    yield srv
    httpd.shutdown()
    httpd.server_close()


def register_url(
    server: FileServer, payload: bytes, *, sha256: str | None = "real", size=True
) -> ModelSpec:
    """A user catalog entry ``tiny:test`` for the payload on the local server."""
    digest = hashlib.sha256(payload).hexdigest() if sha256 == "real" else sha256
    spec = ModelSpec(
        name="tiny",
        tag="test",
        description="random bytes served locally",
        size_bytes=len(payload) if size else None,
        sha256=digest,
        capabilities=["completion"],
        source=Source(kind="url", url=server.url("/files/tiny.gguf")),
    )
    registry.save_user_entry(spec)
    return registry.find("tiny:test")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def partial_of(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# --------------------------------------------------------------------------- pull


def test_pull_downloads_verifies_and_lists_present(server, payload, capsys):
    spec = register_url(server, payload)
    code, out, err = run(capsys, "pull", "tiny:test", "--no-progress")
    assert code == 0, err
    path = registry.local_path(spec)
    assert path.read_bytes() == payload
    assert not partial_of(path).exists()
    assert f"tiny:test is ready: {path}" in out
    code, out, _ = run(capsys, "list", "--json")
    entry = next(e for e in json.loads(out) if e["ref"] == "tiny:test")
    assert entry["present"] is True and entry["status"] == "present"
    assert server.ranges() == [None]


def test_interrupted_pull_resumes_from_partial_with_range(server, payload, capsys):
    spec = register_url(server, payload)
    path = registry.local_path(spec)
    server.drop_after["/files/tiny.gguf"] = 1_500_000
    code, _, err = run(capsys, "pull", "tiny:test", "--retries", "0", "--no-progress")
    assert code == 1
    assert "interrupted after" in err and "run the same pull again to resume" in err
    assert not path.exists()
    have = partial_of(path).stat().st_size
    assert 0 < have < len(payload)
    _, out, _ = run(capsys, "show", "tiny:test", "--json")
    assert json.loads(out)["status"] == f"partly downloaded ({have} bytes)"

    code, out, err = run(capsys, "pull", "tiny:test", "--no-progress")
    assert code == 0, err
    assert server.ranges() == [None, f"bytes={have}-"]
    assert path.read_bytes() == payload
    assert not partial_of(path).exists()


def test_dropped_connection_is_resumed_within_one_pull(server, payload, capsys):
    register_url(server, payload)
    server.drop_after["/files/tiny.gguf"] = 2_000_000
    code, _, err = run(capsys, "pull", "tiny:test", "--no-progress")
    assert code == 0, err
    assert "resuming (retry 1/2)" in err
    assert server.ranges()[0] is None and server.ranges()[1].startswith("bytes=")


def test_wrong_checksum_leaves_no_file_and_fails(server, payload, capsys):
    spec = register_url(server, payload, sha256="0" * 64)
    code, out, err = run(capsys, "pull", "tiny:test", "--no-progress")
    assert code == 1
    assert "does not match its sha256" in err and "nothing was installed" in err
    path = registry.local_path(spec)
    assert not path.exists() and not partial_of(path).exists()
    assert "ready" not in out


def test_pull_without_recorded_checksum_records_the_computed_one(server, payload, capsys, lab_home):
    register_url(server, payload, sha256=None, size=False)
    code, _, err = run(capsys, "pull", "tiny:test", "--no-progress")
    assert code == 0, err
    assert "No checksum was recorded for tiny:test" in err
    saved = yaml.safe_load((lab_home / "models.yaml").read_text())["models"]
    entry = next(e for e in saved if e["name"] == "tiny")
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest()
    assert entry["size_bytes"] == len(payload)


def test_pull_url_with_a_new_name(server, payload, capsys):
    code, out, err = run(
        capsys, "pull", server.url("/files/tiny.gguf"), "--name", "web-tiny", "--no-progress"
    )
    assert code == 0, err
    assert "Added web-tiny:latest" in out
    _, out, _ = run(capsys, "show", "web-tiny", "--json")
    shown = json.loads(out)
    assert shown["sha256"] == hashlib.sha256(payload).hexdigest()
    assert shown["present"] is True and shown["source"]["kind"] == "url"


def test_pull_url_needs_a_name(server, capsys):
    code, _, err = run(capsys, "pull", server.url("/files/tiny.gguf"))
    assert code == 2
    assert "--name NAME" in err


def test_pull_hf_entry_uses_the_hub_url_and_token(server, payload, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.setenv("LLMLAB_HF_TOKEN", "hf_test_token")
    code, _, err = run(
        capsys, "pull", "hf:owner/tiny-repo/tiny.gguf", "--name", "hub-tiny", "--no-progress"
    )
    assert code == 0, err
    request = server.requests[-1]
    assert request["path"] == "/owner/tiny-repo/resolve/main/tiny.gguf"
    assert request["headers"]["authorization"] == "Bearer hf_test_token"
    assert request["headers"]["user-agent"].startswith("llmlab/0.1.0")
    assert registry.resolve("hub-tiny").path.read_bytes() == payload


def test_pull_gated_hf_file_says_how_to_store_a_token(server, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    server.status["/owner/gated-repo/resolve/main/tiny.gguf"] = 403
    code, _, err = run(
        capsys, "pull", "hf:owner/gated-repo/tiny.gguf", "--name", "gated", "--no-progress"
    )
    assert code == 1
    assert "answered HTTP 403: this file needs a login or accepting its licence" in err
    assert "bash part3/scripts/huggingface_login.sh" in err


def test_pull_hf_entry_offline_says_how_to_enable_downloads(capsys):
    code, _, err = run(capsys, "pull", "qwen2.5-0.5b-instruct")
    assert code == 1
    assert "HF_HUB_OFFLINE is set" in err


def test_pull_missing_http_file_reports_status(server, capsys):
    code, _, err = run(
        capsys, "pull", server.url("/files/missing.gguf"), "--name", "gone", "--no-progress"
    )
    assert code == 1
    assert "answered HTTP 404" in err


def test_pull_package_entries(capsys):
    code, out, _ = run(capsys, "pull", "smollm2-135m-instruct")
    assert code == 0
    assert "smollm2-135m-instruct:q4_1 is ready" in out
    registry.save_user_entry(
        ModelSpec(
            name="not-here",
            source=Source(
                kind="package", package="no_such_pkg_xyz", pip="no-such-pkg-xyz", file="m.gguf"
            ),
        )
    )
    code, _, err = run(capsys, "pull", "not-here")
    assert code == 2
    assert "pip install no-such-pkg-xyz" in err


# --------------------------------------------------------------------------- list / show


def test_list_json_shape(capsys):
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    entries = {e["ref"]: e for e in json.loads(out)}
    expected_keys = {"ref", "name", "tag", "path", "present", "status", "size_bytes", "sha256", "ram_bytes",
                     "source", "capabilities", "parameters", "quantization", "context_length", "license", "family"}  # fmt: skip
    for entry in entries.values():
        assert expected_keys <= entry.keys()
    default = entries["smollm2-135m-instruct:q4_1"]
    assert default["default"] is True and default["present"] is True
    assert default["source"]["kind"] == "package"
    qwen = entries["qwen2.5-0.5b-instruct:q4_k_m"]
    assert qwen["present"] is False and qwen["status"] == "not downloaded"
    assert qwen["source"] == {
        "kind": "hf",
        "assemble": False,
        "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        "repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        "revision": "9217f5db79a29953eb74d5343926648285ec7e67",
    }


def test_list_table_marks_the_default(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["REF", "PARAMS", "QUANT"]
    assert any(
        line.startswith("smollm2-135m-instruct:q4_1 *") and "present" in line for line in lines
    )
    assert any(
        line.startswith("llama-3.2-3b-instruct:q4_k_m") and "not downloaded" in line
        for line in lines
    )


def test_show_json_and_text(capsys):
    code, out, _ = run(capsys, "show", "smollm2-135m-instruct", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["ref"] == "smollm2-135m-instruct:q4_1"
    assert shown["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert shown["ram_bytes"] == registry.spec_ram_estimate(registry.find("smollm2-135m-instruct"))
    code, out, _ = run(capsys, "show", "llama-3.2-1b-instruct")
    assert "sha256          6f85a640a97cf2bf5b8e764087b1e83da0fdb51d7c9fab7d0fece9385611df83" in out
    assert "807,694,464 bytes" in out
    assert "hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf" in out


def test_unknown_name_suggests_close_matches(capsys):
    code, out, err = run(capsys, "show", "smolm2")
    assert code == 2
    assert out == ""
    assert "Unknown model 'smolm2'. Did you mean: smollm2-135m-instruct?" in err
    assert "python part5/model_registry.py list" in err


# --------------------------------------------------------------------------- verify


def test_verify_reports_a_truncated_copy_and_missing_downloads(tmp_path, capsys):
    original = registry.resolve()
    broken = tmp_path / "smol-truncated.gguf"
    with original.path.open("rb") as src, broken.open("wb") as dst:
        dst.write(src.read(original.size_bytes // 2))
    registry.save_user_entry(
        original.model_copy(
            update={
                "name": "smol-copy",
                "tag": "broken",
                "default": False,
                "source": Source(kind="path", path=str(broken)),
            }
        )  # fmt: skip
    )
    code, out, err = run(capsys, "verify", "smol-copy")
    assert code == 1
    assert "CORRUPT" in out and "truncated" in out
    code, out, err = run(capsys, "verify")
    assert code == 1
    assert "smollm2-135m-instruct:q4_1: sha256 OK" in out
    assert "smol-copy:broken: CORRUPT" in out
    assert "qwen2.5-0.5b-instruct:q4_k_m: not downloaded" in out
    assert "1 file(s) failed verification" in err
    with pytest.raises(registry.ChecksumError):
        registry.resolve("smol-copy:broken")  # never handed to a backend


def test_verify_detects_a_changed_byte_after_pull(server, payload, capsys):
    spec = register_url(server, payload)
    assert run(capsys, "pull", "tiny:test", "--no-progress")[0] == 0
    assert run(capsys, "verify", "tiny:test")[0] == 0
    path = registry.local_path(spec)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", "tiny:test")
    assert code == 1
    assert "does not match its sha256" in out


def test_verify_named_missing_download(capsys):
    code, _, err = run(capsys, "verify", "llama-3.2-1b-instruct")
    assert code == 2
    assert (
        "not downloaded yet. Run: python part5/model_registry.py pull llama-3.2-1b-instruct:q4_k_m"
        in err
    )


# --------------------------------------------------------------------------- add / remove


def test_add_reads_the_gguf_header(capsys):
    smol = registry.resolve()
    code, out, err = run(capsys, "add", str(smol.path), "--name", "my-smol", "--tag", "q4_1")
    assert code == 0, err
    assert "Added my-smol:q4_1: llama" in out
    _, out, _ = run(capsys, "show", "my-smol", "--json")
    shown = json.loads(out)
    assert shown["family"] == "llama"
    assert shown["context_length"] == 8192
    assert shown["quantization"] == "Q4_1"
    assert shown["parameters"] == 134515008
    assert shown["capabilities"] == ["chat", "completion"]  # it has a chat template
    assert shown["sha256"] == smol.sha256 and shown["size_bytes"] == smol.size_bytes
    assert shown["ram_bytes"] == smol.ram_bytes  # same formula, same header numbers
    assert shown["user"] is True and shown["source"] == {
        "kind": "path",
        "assemble": False,
        "path": str(smol.path),
    }


def test_add_refuses_files_that_are_not_gguf(tmp_path, capsys):
    junk = tmp_path / "notes.gguf"
    junk.write_bytes(b"this is not a model" * 10)
    code, _, err = run(capsys, "add", str(junk), "--name", "junk")
    assert code == 1
    assert "is not a GGUF model file" in err
    code, _, err = run(capsys, "add", str(tmp_path / "absent.gguf"), "--name", "absent")
    assert code == 2
    assert "does not exist" in err


def test_add_refuses_a_built_in_name(capsys):
    code, _, err = run(
        capsys,
        "add",
        str(registry.resolve().path),
        "--name",
        "smollm2-135m-instruct",
        "--tag",
        "q4_1",
    )
    assert code == 1
    assert "is a built-in entry" in err


def test_remove_deletes_the_download_of_a_user_entry(server, payload, capsys):
    spec = register_url(server, payload)
    assert run(capsys, "pull", "tiny:test", "--no-progress")[0] == 0
    path = registry.local_path(spec)
    code, out, _ = run(capsys, "remove", "tiny:test")
    assert code == 0
    assert f"Deleted {path}" in out
    assert not path.exists()
    _, out, _ = run(capsys, "list", "--json")
    assert "tiny:test" not in {e["ref"] for e in json.loads(out)}


def test_remove_an_added_file_keeps_the_file(tmp_path, capsys):
    copy = tmp_path / "mine.gguf"
    shutil.copyfile(registry.resolve().path, copy)
    assert run(capsys, "add", str(copy), "--name", "mine")[0] == 0
    code, out, _ = run(capsys, "remove", "mine")
    assert code == 0
    assert f"Kept your file {copy}" in out
    assert copy.exists()
    assert run(capsys, "show", "mine")[0] == 2


def test_remove_refuses_built_in_entries(capsys):
    code, _, err = run(capsys, "remove", "smollm2-135m-instruct")
    assert code == 1
    assert "smollm2-135m-instruct:q4_1 is a built-in entry and cannot be removed" in err
    assert registry.find("smollm2-135m-instruct")


# --------------------------------------------------------------------------- recommend


def test_recommend_picks_the_largest_chat_model_that_fits(capsys):
    code, out, _ = run(capsys, "recommend", "--available-ram", "0.5")
    assert code == 0
    assert out.splitlines()[0] == "smollm2-135m-instruct:q4_1"
    assert "It is ready to use." in out
    code, out, _ = run(capsys, "recommend", "--available-ram", "64")
    assert out.splitlines()[0] == "llama-3.2-3b-instruct:q4_k_m"
    assert "30% kept as headroom" in out and "pull llama-3.2-3b-instruct:q4_k_m" in out
    code, out, _ = run(capsys, "recommend", "--available-ram", "64", "--present", "--json")
    assert json.loads(out)["ref"] == "smollm2-135m-instruct:q4_1"


def test_recommend_explains_the_batch_trade(capsys):
    from llmlab.registry import kernels

    code, out, _ = run(capsys, "recommend", "--available-ram", "0.5")
    batches = out.splitlines()[-1]
    assert code == 0 and batches.startswith("Batches: Q4_1 ")
    if "Q4_1" not in kernels.batched_formats(kernels.build_features()):  # x86 without AMX
        assert "Q4_1 has no batched kernel in this llama.cpp build" in batches
        assert "make a Q8_0 from it the first time" in batches and "0.02 nats/token" in batches
        assert "KL 0.19-0.26" in batches and "--exact-model" in batches
    code, out, _ = run(capsys, "recommend", "--available-ram", "0.5", "--json")
    assert json.loads(out)["batches"] == batches


def test_recommend_when_nothing_fits(capsys):
    code, _, err = run(capsys, "recommend", "--available-ram", "0.1")
    assert code == 1
    assert "No chat model fits" in err and "smollm2-135m-instruct:q4_1" in err


# --------------------------------------------------------------------------- the script


def test_help_lists_examples():
    text = build_parser().format_help()
    assert "examples:" in text and "recommend --available-ram 8" in text


def test_script_runs_from_the_command_line():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "part5" / "model_registry.py"),
            "show",
            "smollm2-135m-instruct",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("smollm2-135m-instruct:q4_1  (default)")
