"""Tests for part2/scripts/setup_env.sh without reinstalling the world.

A stand-in ``python`` (a small shell script) logs each call it gets and only runs the
``-c`` snippets the script uses to read versions; ``-m venv`` makes a folder with a copy
of itself, ``-m pip`` and ``-m ipykernel`` succeed at once. So a full run takes a second
and the log shows exactly which steps ran. Missing tools are simulated with a PATH made
of links to every system program except the ones a test hides.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "part2" / "scripts" / "setup_env.sh"
BASH = shutil.which("bash")
COMPILERS = re.compile(
    r"^(cc|c\+\+|gcc|g\+\+|clang|clang\+\+)(-[\d.]+)?$|^(x86_64|aarch64)-.*-(gcc|g\+\+)"
)
PYTHONS = re.compile(r"^python[\d.]*(-config)?$")

FAKE_PYTHON = """#!{bash}
# A stand-in for python used by tests: log the call, do the least that keeps the script going.
echo "python $*" >> "$FAKE_LOG"
case "$1" in
  -c) exec {real} "$@" ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
      if [ "$2" = pip ]; then exit "${{FAKE_PIP_STATUS:-0}}"; fi
      exit 0 ;;
  scripts/check_env.py) echo "doctor ran"; exit "${{FAKE_DOCTOR_STATUS:-0}}" ;;
esac
exit 0
"""
OLD_PYTHON = """#!{bash}
# A stand-in for an old python: reports 3.9.18 to every -c snippet.
echo "3 9 18"
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """The logging stand-in python (see FAKE_PYTHON)."""
    folder = tmp_path / "fakepy"
    folder.mkdir()
    return _write_exe(folder / "python", FAKE_PYTHON.format(bash=BASH, real=sys.executable))


def _system_bin(tmp_path: Path, hide: re.Pattern[str]) -> Path:
    """A folder of links to every program in the system folders except names matching ``hide``."""
    farm = tmp_path / "sysbin"
    farm.mkdir(exist_ok=True)
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            link = farm / name
            if hide.search(name) or link.exists() or link.is_symlink():
                continue
            link.symlink_to(os.path.join(folder, name))
    return farm


def run_setup(
    *args: str, env: dict[str, str] | None = None, path: str | None = None, log: Path | None = None
):
    """Run the script; returns the CompletedProcess (text output)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "CONDA_EXE")}
    if path is not None:
        full_env["PATH"] = path
    if log is not None:
        full_env["FAKE_LOG"] = str(log)
    full_env.update(env or {})
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def _log_lines(log: Path) -> list[str]:
    return (
        [line for line in log.read_text().splitlines() if not line.startswith("python -c")]
        if log.exists()
        else []
    )


def test_help_lists_the_options():
    result = run_setup("--help")
    assert result.returncode == 0
    for option in ("--venv DIR", "--python PYTHON", "--conda", "--skip-check", "--dry-run"):
        assert option in result.stdout


def test_unknown_option_is_a_usage_error():
    result = run_setup("--venvv", "x")
    assert result.returncode == 2
    assert "error: unknown option '--venvv'." in result.stderr
    assert "--help" in result.stderr


def test_old_python_gets_a_clear_message(tmp_path):
    old = _write_exe(tmp_path / "python", OLD_PYTHON.format(bash=BASH))
    result = run_setup("--python", str(old), "--venv", str(tmp_path / "env"), "--dry-run")
    assert result.returncode == 1
    assert f"Python 3.11 or newer is needed; found {old} 3.9.18, which is too old." in result.stderr
    assert "fix: then run: bash part2/scripts/setup_env.sh --python python3.11" in result.stderr
    assert "--conda" in result.stderr
    assert not (tmp_path / "env").exists()


def test_old_python3_on_path_is_reported_when_none_is_new_enough(tmp_path):
    sysbin = _system_bin(tmp_path, PYTHONS)
    fakes = tmp_path / "old"
    fakes.mkdir()
    _write_exe(fakes / "python3", OLD_PYTHON.format(bash=BASH))
    result = run_setup("--venv", str(tmp_path / "env"), "--dry-run", path=f"{fakes}:{sysbin}")
    assert result.returncode == 1
    assert "found python3 3.9.18, which is too old." in result.stderr


def test_no_python_at_all(tmp_path):
    sysbin = _system_bin(tmp_path, PYTHONS)
    result = run_setup("--venv", str(tmp_path / "env"), path=str(sysbin))
    assert result.returncode == 1
    assert (
        "no Python found (looked for: python3.11 python3.12 python3.13 python3 python)."
        in result.stderr
    )


def _install_hint() -> str:
    os_release = Path("/etc/os-release")
    text = os_release.read_text() if os_release.exists() else ""
    if sys.platform == "linux" and re.search(r"^(ID|ID_LIKE)=.*\b(debian|ubuntu)\b", text, re.M):
        return "fix: sudo apt-get install build-essential"
    return "fix: "


@pytest.mark.parametrize(
    ("hide", "missing"),
    [
        (COMPILERS, "no C/C++ compiler (cc, gcc or clang; c++, g++ or clang++) found"),
        (
            re.compile(r"^(c\+\+|g\+\+|clang\+\+)(-[\d.]+)?$|-g\+\+"),
            "no C++ compiler (c++, g++ or clang++) found",
        ),
    ],
)
def test_missing_compiler_says_what_to_install(tmp_path, fake_python, hide, missing):
    sysbin = _system_bin(tmp_path, hide)
    log = tmp_path / "calls.log"
    result = run_setup(
        "--python", str(fake_python), "--venv", str(tmp_path / "env"), path=str(sysbin), log=log
    )
    assert result.returncode == 1
    assert (
        f"error: {missing}; llama-cpp-python is built from source and needs one." in result.stderr
    )
    assert _install_hint() in result.stderr
    assert _log_lines(log) == []  # nothing was installed
    assert not (tmp_path / "env").exists()


def test_full_run_then_second_run_is_up_to_date(tmp_path, fake_python):
    env_dir, log = tmp_path / "env", tmp_path / "calls.log"
    first = run_setup("--python", str(fake_python), "--venv", str(env_dir), log=log)
    assert first.returncode == 0, first.stderr
    venv_py = f"{env_dir}/bin/python"
    assert _log_lines(log) == [
        "python -m venv " + str(env_dir),
        "python -m pip install --quiet --upgrade pip==26.3",
        "python -m llmlab.llama_build install",
        "python -m pip install --quiet -r requirements.txt",
        "python -m pip install --quiet --no-deps -e .",
        "python -m ipykernel install --sys-prefix --name python3 --display-name Python 3 (llmlab)",
        "python -m llmlab.llama_build repair",
        "python scripts/check_env.py",
    ]
    assert f"+ {venv_py} -m pip install --quiet -r requirements.txt" in first.stdout
    assert "doctor ran" in first.stdout
    assert "Ready. Activate the environment with: source" in first.stdout
    stamp = env_dir / ".llmlab-setup-stamp"
    assert re.fullmatch(r"[0-9a-f]{64}", stamp.read_text().splitlines()[0])

    log.unlink()
    second = run_setup("--python", str(fake_python), "--venv", str(env_dir), log=log)
    assert second.returncode == 0, second.stderr
    assert f"Environment {env_dir} is already up to date" in second.stdout
    assert _log_lines(log) == ["python scripts/check_env.py"]  # the doctor still runs


def test_changed_requirements_reinstall(tmp_path, fake_python):
    env_dir, log = tmp_path / "env", tmp_path / "calls.log"
    assert (
        run_setup(
            "--python", str(fake_python), "--venv", str(env_dir), "--skip-check", log=log
        ).returncode
        == 0
    )
    stamp = env_dir / ".llmlab-setup-stamp"
    stamp.write_text("0" * 64 + "\n")  # as if requirements.txt had changed since
    log.unlink()
    result = run_setup(
        "--python", str(fake_python), "--venv", str(env_dir), "--skip-check", log=log
    )
    assert result.returncode == 0
    assert "already up to date" not in result.stdout
    calls = _log_lines(log)
    assert "python -m pip install --quiet -r requirements.txt" in calls
    assert not any("venv" in call for call in calls)  # the existing venv is reused
    assert "Skipping the doctor (--skip-check)." in result.stdout
    assert stamp.read_text() != "0" * 64 + "\n"


def test_force_reinstalls_even_when_up_to_date(tmp_path, fake_python):
    env_dir, log = tmp_path / "env", tmp_path / "calls.log"
    args = ("--python", str(fake_python), "--venv", str(env_dir), "--skip-check")
    assert run_setup(*args, log=log).returncode == 0
    log.unlink()
    result = run_setup(*args, "--force", log=log)
    assert result.returncode == 0
    assert "python -m pip install --quiet -r requirements.txt" in _log_lines(log)


def test_failed_install_is_reported_and_not_stamped(tmp_path, fake_python):
    env_dir = tmp_path / "env"
    result = run_setup(
        "--python",
        str(fake_python),
        "--venv",
        str(env_dir),
        env={"FAKE_PIP_STATUS": "1"},
        log=tmp_path / "calls.log",
    )
    assert result.returncode == 1
    assert (
        "error: the step above failed. Fix what it reports, then run this script again."
        in result.stderr
    )
    assert not (env_dir / ".llmlab-setup-stamp").exists()  # the next run installs again
    assert "doctor ran" not in result.stdout


def test_doctor_status_is_passed_on(tmp_path, fake_python):
    result = run_setup(
        "--python",
        str(fake_python),
        "--venv",
        str(tmp_path / "env"),
        env={"FAKE_DOCTOR_STATUS": "1"},
        log=tmp_path / "calls.log",
    )
    assert result.returncode == 1
    assert "The doctor found problems (exit status 1)" in result.stderr
    assert "Ready." not in result.stdout


def test_dry_run_prints_the_steps_and_changes_nothing(tmp_path, fake_python):
    env_dir, log = tmp_path / "env", tmp_path / "calls.log"
    result = run_setup("--python", str(fake_python), "--venv", str(env_dir), "--dry-run", log=log)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Dry run: printing the steps; nothing is changed.")
    for step in (
        f"+ {fake_python} -m venv {env_dir}",
        f"+ {env_dir}/bin/python -m llmlab.llama_build install",
        f"+ {env_dir}/bin/python -m pip install --quiet -r requirements.txt",
        f"+ {env_dir}/bin/python -m pip install --quiet --no-deps -e .",
        f"+ {env_dir}/bin/python -m ipykernel install --sys-prefix --name python3",
        f"+ {env_dir}/bin/python -m llmlab.llama_build repair",
        f"+ {env_dir}/bin/python scripts/check_env.py",
    ):
        assert step in out
    assert not env_dir.exists()
    assert _log_lines(log) == []


def test_dry_run_with_stamp_present_says_up_to_date(tmp_path, fake_python):
    env_dir = tmp_path / "env"
    assert (
        run_setup(
            "--python",
            str(fake_python),
            "--venv",
            str(env_dir),
            "--skip-check",
            log=tmp_path / "calls.log",
        ).returncode
        == 0
    )
    result = run_setup("--python", str(fake_python), "--venv", str(env_dir), "--dry-run")
    assert result.returncode == 0
    assert "already up to date" in result.stdout
    assert "pip install" not in result.stdout
    assert f"+ {env_dir}/bin/python scripts/check_env.py" in result.stdout


def test_relative_venv_is_relative_to_the_callers_folder(tmp_path, fake_python):
    result = subprocess.run(
        [BASH, str(SCRIPT), "--python", str(fake_python), "--venv", "myenv", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert f"+ {fake_python} -m venv {tmp_path}/myenv" in result.stdout


def test_venv_made_with_an_old_python_is_reported(tmp_path, fake_python):
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    _write_exe(env_dir / "bin" / "python", OLD_PYTHON.format(bash=BASH))
    result = run_setup("--python", str(fake_python), "--venv", str(env_dir), "--dry-run")
    assert result.returncode == 1
    assert f"{env_dir} was made with Python 3.9.18, which is too old." in result.stderr
    assert f"rm -rf '{env_dir}'" in result.stderr


def test_conda_requested_but_missing(tmp_path):
    sysbin = _system_bin(tmp_path, re.compile(r"^(conda|mamba)$"))
    result = run_setup("--conda", "--venv", str(tmp_path / "env"), path=str(sysbin))
    assert result.returncode == 1
    assert "--conda was given but conda is not installed" in result.stderr
    assert "https://conda-forge.org/download/" in result.stderr


def test_conda_dry_run_creates_from_environment_yml(tmp_path):
    fakes = tmp_path / "fakeconda"
    fakes.mkdir()
    conda = _write_exe(fakes / "conda", f"#!{BASH}\nexit 0\n")
    env_dir = tmp_path / "env"
    result = run_setup(
        "--conda", "--venv", str(env_dir), "--dry-run", path=f"{fakes}:{os.environ['PATH']}"
    )
    assert result.returncode == 0, result.stderr
    assert f"+ {conda} env create --prefix {env_dir} --file environment.yml" in result.stdout
    assert f"+ {env_dir}/bin/python -m pip install --quiet --no-deps -e ." in result.stdout
    assert "requirements.txt" not in result.stdout  # conda installs the pins from environment.yml
    # conda's pip may take a cached build for another CPU: repair puts this CPU's build in
    assert f"+ {env_dir}/bin/python -m llmlab.llama_build repair" in result.stdout


def test_conda_refuses_to_reuse_a_venv_folder(tmp_path, fake_python):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    result = run_setup("--conda", "--venv", str(env_dir), env={"CONDA_EXE": str(fake_python)})
    assert result.returncode == 1
    assert f"{env_dir} exists and is not a conda environment." in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    result = subprocess.run(
        ["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout
