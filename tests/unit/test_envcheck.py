"""The environment doctor: scripts/check_env.py lines, fixes and exit codes, with failures
simulated by bad requirements files, a broken default model and monkeypatched probes."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmlab import envcheck, llama_build

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_env", ROOT / "scripts" / "check_env.py")
check_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_env)


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run the doctor's main() and return its exit code and printed lines."""
    code = check_env.main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def line_of(lines: list[str], name: str) -> tuple[str, str | None]:
    """The status line of check ``name`` and the ``fix:`` line under it, if any."""
    for i, line in enumerate(lines):
        if line.startswith("[") and line.split("]", 1)[1].split()[0] == name:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return line, nxt if nxt.startswith("fix:") else None
    raise AssertionError(f"no line for check {name!r} in:\n" + "\n".join(lines))


def pins(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


RICH = f"rich=={importlib.metadata.version('rich')}"


def add_user_model(home: Path, name: str, file: Path, sha256: str | None = None) -> None:
    """Put a model whose file is ``file`` into the user catalog and make it the default."""
    entry = {"name": name, "tag": "v1", "source": {"kind": "path", "path": str(file)}}
    if sha256:
        entry["sha256"] = sha256
    (home / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))


def test_healthy_machine_prints_ok_lines_and_exits_0(capsys, tmp_path):
    code, lines = run(capsys, "--skip-generation", "--requirements", str(pins(tmp_path, RICH)))
    assert code == 0, "\n".join(lines)
    for name in ("python", "packages", "cpu", "memory", "disk", "gpu", "llama.cpp", "model"):
        status, _ = line_of(lines, name)
        assert status.startswith("[OK]"), status
    assert "all 1 pinned packages installed" in line_of(lines, "packages")[0]
    assert "generation" not in "\n".join(lines)
    assert lines[-1].endswith("0 FAIL")


def test_missing_package_is_a_fail_with_the_pip_fix(capsys, tmp_path):
    req = pins(tmp_path, "# pins", RICH, "no-such-package-llmlab==1.0")
    code, lines = run(capsys, "--skip-generation", "--requirements", str(req))
    status, fix = line_of(lines, "packages")
    assert status.startswith("[FAIL]")
    assert "missing: no-such-package-llmlab" in status
    assert fix == f"fix: pip install -r {req}"
    assert code == 1
    assert "1 FAIL" in lines[-2] and lines[-1].startswith("Run the fix")


def test_drifted_pin_is_a_warning_and_exits_0(capsys, tmp_path):
    installed = importlib.metadata.version("rich")
    code, lines = run(
        capsys, "--skip-generation", "--requirements", str(pins(tmp_path, "rich==0.0.1"))
    )
    status, fix = line_of(lines, "packages")
    assert status.startswith("[WARN]")
    assert f"rich {installed} (pinned ==0.0.1)" in status
    assert fix.startswith("fix: pip install -r")
    assert code == 0


def test_missing_optional_package_is_only_a_warning(tmp_path):
    req = pins(tmp_path, "no-such-optional-llmlab==2.0")
    check = envcheck.check_packages(req, optional=frozenset({"no-such-optional-llmlab"}))
    assert check.status == envcheck.WARN
    assert "missing (optional): no-such-optional-llmlab" in check.detail


def test_missing_bitsandbytes_pin_is_only_a_warning_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(envcheck, "_installed_version", lambda name: None)
    check = envcheck.check_packages(pins(tmp_path, "bitsandbytes==0.50.2"))
    assert check.status == envcheck.WARN
    assert check.detail == "missing (optional): bitsandbytes"


def test_requirements_parsing_skips_options_comments_and_other_platforms(tmp_path):
    req = pins(
        tmp_path,
        "-r base.txt",
        "--extra-index-url https://example.invalid/simple",
        "# a comment",
        "",
        "Rich==13.0  # trailing comment",
        'never-here==1.0 ; sys_platform == "no-such-os"',
    )
    assert [r.name for r in envcheck.read_pins(req)] == ["Rich"]


def test_missing_requirements_file_is_a_warning(tmp_path):
    check = envcheck.check_packages(tmp_path / "nope.txt")
    assert check.status == envcheck.WARN and "not found" in check.detail


def test_default_model_file_missing_fails_with_fix(capsys, lab_home, monkeypatch, tmp_path):
    add_user_model(lab_home, "gone", tmp_path / "deleted.gguf")
    monkeypatch.setenv("LLMLAB_DEFAULT_MODEL", "gone")
    code, lines = run(capsys, "--requirements", str(pins(tmp_path, RICH)))
    status, fix = line_of(lines, "model")
    assert status.startswith("[FAIL]") and "deleted.gguf, which does not exist" in status
    assert fix == "fix: Re-add it with the right path"
    gen_status, gen_fix = line_of(lines, "generation")
    assert gen_status.startswith("[FAIL]") and "not run" in gen_status
    assert gen_fix == fix
    assert code == 1


def test_default_model_corrupt_fails_with_pull_fix(capsys, lab_home, monkeypatch, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really")
    add_user_model(lab_home, "broken", broken, sha256="0" * 64)
    monkeypatch.setenv("LLMLAB_DEFAULT_MODEL", "broken")
    code, lines = run(capsys, "--skip-generation", "--requirements", str(pins(tmp_path, RICH)))
    status, fix = line_of(lines, "model")
    assert status.startswith("[FAIL]") and "does not match its sha256" in status
    assert fix.startswith("fix: ") and "model_registry.py" in fix and "broken:v1" in fix
    assert code == 1


def test_fix_is_the_sentence_that_says_what_to_run():
    assert (
        envcheck._fix_from("Model x is not installed. Run: pip install llm-x")
        == "pip install llm-x"
    )
    assert (
        envcheck._fix_from(
            "File is corrupt. Replace the file, or run: lab remove x and add it again."
        )
        == "Replace the file, or run: lab remove x and add it again"
    )
    assert (
        envcheck._fix_from("It broke. Reinstall it: pip install -U x")
        == "Reinstall it: pip install -U x"
    )


def test_json_lists_every_check(capsys, tmp_path):
    code, lines = run(
        capsys, "--skip-generation", "--json", "--requirements", str(pins(tmp_path, "rich==0.0.1"))
    )
    checks = json.loads("\n".join(lines))
    assert [c["name"] for c in checks] == [
        "python",
        "packages",
        "cpu",
        "memory",
        "disk",
        "gpu",
        "llama.cpp",
        "bitsandbytes",
        "model",
    ]
    assert {tuple(c) for c in checks} == {("name", "status", "detail", "fix")}
    assert checks[1]["status"] == "WARN" and code == 0


def test_old_python_fails():
    check = envcheck.check_python((3, 10, 12))
    assert check.status == envcheck.FAIL
    assert "3.10.12 is too old" in check.detail and "make setup" in check.fix


def test_cpu_without_avx2_warns_and_arm_neon_is_ok():
    old = envcheck.check_cpu({"brand_raw": "Old x86", "arch": "X86_64", "flags": ["sse4_2", "avx"]})
    assert old.status == envcheck.WARN and "features: avx" in old.detail and old.fix
    arm = envcheck.check_cpu({"brand_raw": "Graviton", "arch": "ARM_8", "flags": ["asimd", "fp"]})
    assert arm.status == envcheck.OK and "features: neon" in arm.detail
    assert envcheck.cpu_features(["avx512f", "avx2", "fma", "f16c"]) == {
        "avx": False,
        "avx2": True,
        "avx512": True,
        "fma": True,
        "f16c": True,
        "neon": False,
    }


def test_broken_llama_cpp_fails_with_fix(capsys, monkeypatch, tmp_path):
    import llmlab.backends.llamacpp as llamacpp

    def broken():
        raise ImportError("libllama.so: cannot open shared object file")

    monkeypatch.setattr(llamacpp, "llama_cpp_system_info", broken)
    code, lines = run(capsys, "--skip-generation", "--requirements", str(pins(tmp_path, RICH)))
    status, fix = line_of(lines, "llama.cpp")
    assert status.startswith("[FAIL]") and "libllama.so" in status
    assert fix.startswith("fix: pip install -r")
    assert code == 1


def test_llama_cpp_line_shows_version_and_build():
    check = envcheck.check_llamacpp()
    # make setup builds llama.cpp without OpenMP; an OpenMP build would be a warning here.
    assert check.status == envcheck.OK, check
    assert f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}" in check.detail


def test_an_openmp_build_of_llama_cpp_is_a_warning_with_the_rebuild_command(monkeypatch):
    from llmlab.backends import llamacpp

    info = {"version": "0.3.36", "system_info": "CPU : AVX2 = 1 | OPENMP = 1 |"}
    monkeypatch.setattr(llamacpp, "llama_cpp_system_info", lambda: info)
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: frozenset({"avx", "avx2"}))
    check = envcheck.check_llamacpp()
    assert check.status == "WARN" and "OpenMP" in check.detail
    assert check.fix == f"{sys.executable} -m llmlab.llama_build repair"


def test_a_build_for_another_cpu_is_a_fail_that_names_the_missing_set(monkeypatch):
    # A wheel pip cached on an AVX-512 machine, installed on an AVX2-only one.
    from llmlab.backends import llamacpp

    info = {"version": "0.3.36", "system_info": "CPU : AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 |"}
    monkeypatch.setattr(llamacpp, "llama_cpp_system_info", lambda: info)
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    monkeypatch.setattr(llama_build, "is_x86", lambda: True)
    check = envcheck.check_llamacpp()
    assert check.status == "FAIL"
    assert "built for another CPU: this one has no AVX512 AVX512_VNNI" in check.detail
    assert check.fix == f"{sys.executable} -m llmlab.llama_build repair"


SIGILL_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


def test_a_generation_that_crashes_is_a_fail_row_with_signal_cause_and_fix(
    capsys, monkeypatch, tmp_path
):
    from llmlab.backends import llamacpp

    real_probe = llama_build.probe
    monkeypatch.setattr(
        llama_build, "probe", lambda name, **kw: real_probe(name, code=SIGILL_CHILD)
    )
    info = {"version": "0.3.36", "system_info": "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 |"}
    monkeypatch.setattr(llamacpp, "llama_cpp_system_info", lambda: info)
    # A Sapphire Rapids Xeon: it has every set the build uses, and AMX still crashes.
    amx_cpu = frozenset({"avx", "avx2", "avx512f", "amx_tile", "amx_int8"})
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: amx_cpu)
    code, lines = run(capsys, "--requirements", str(pins(tmp_path, RICH)))
    status, fix = line_of(lines, "generation")
    assert status.startswith("[FAIL]")
    assert "killed by SIGILL (illegal instruction" in status and "32+ token prompt" in status
    assert "AMX kernels (AMX_INT8)" in status
    assert fix == f"fix: {sys.executable} -m llmlab.llama_build repair"
    assert code == 1


def test_unusable_bitsandbytes_is_a_warning_not_a_fail(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes the import raise ImportError
    check = envcheck.check_bitsandbytes()
    assert check.status == envcheck.WARN and "not usable" in check.detail
    assert "pip install bitsandbytes" in check.fix


def test_low_disk_fails(monkeypatch):
    monkeypatch.setattr(
        envcheck.shutil, "disk_usage", lambda path: SimpleNamespace(free=100 * 1024**2)
    )
    check = envcheck.check_disk()
    assert check.status == envcheck.FAIL and "100.0 MiB free" in check.detail


def test_markdown_table_escapes_pipes():
    table = envcheck.as_markdown([envcheck.Check("llama.cpp", "OK", "AVX = 1 | AVX2 = 1")])
    assert table.splitlines()[2] == "| OK | llama.cpp | AVX = 1 \\| AVX2 = 1 |  |"


@pytest.mark.slow
def test_real_generation_reports_tokens_per_second(capsys, tmp_path):
    code, lines = run(capsys, "--requirements", str(pins(tmp_path, RICH)))
    status, _ = line_of(lines, "generation")
    assert status.startswith("[OK]"), status
    assert "tokens/s on llama.cpp" in status and "-token prompt" in status
    assert code == 0
