"""A llama.cpp build that runs on this CPU: build it, prove it, repair it.

Run by ``make setup`` and ``part2/scripts/setup_env.sh``::

    python -m llmlab.llama_build install    # the wheel for this CPU (cached, or built: ~10 min)
    python -m llmlab.llama_build repair     # prove it generates; on a crash rebuild without
                                            # the feature that crashed, then prove it again
    python -m llmlab.llama_build check      # only prove it (exit 1 if it crashes)

Why not pip's own build: llama-cpp-python compiles llama.cpp with ``-march=native``, so the
build holds whatever the building CPU has (AVX-512, AMX), and pip's wheel cache hands that
build to any later install, on any CPU. Two things go wrong: a wheel built on an AVX-512
machine dies with "Illegal instruction" on an AVX2 one, and on some Xeons ggml's AMX kernel
itself dies on the first multi-token prompt. So this module

* builds with explicit instruction sets read from this CPU, AMX left out unless asked for
  (``--amx`` or ``LLMLAB_LLAMA_AMX=1``); every other set the CPU has and ggml uses is kept
  (also those without a GGML_* option, as compiler flags), so nothing is lost where there
  is no AMX;
* keeps each wheel in ``LLMLAB_HOME/llama-builds/<key>/``, the key being a hash of the
  version, the CMake flags (and so the CPU features) and the Python tag: a wheel is only
  ever reused where the same flags were chosen;
* proves a build by generating from a prompt of at least 32 tokens in a child process
  (a crash kills the child, not setup), and caches the verdict per build and CPU so programs
  can ask :func:`known_crash` without paying for the probe.

Nothing here imports more than the standard library at module level: ``install`` runs
before the requirements are.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements.txt"
PACKAGE = "llama-cpp-python"

# CPU flag (as Linux names it) -> the ggml CMake option that compiles code for it. A feature
# is "the ggml option"; it is on when the CPU has every flag listed for it.
X86_FEATURES: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "BMI2": ("bmi2",),
    "AVX": ("avx",),
    "AVX2": ("avx2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
    "AMX_BF16": ("amx_bf16",),
}
# Instruction sets ggml's code uses (``#ifdef __AVX512FP16__``, ``__GFNI__``) that have no
# GGML_* option: -march=native would switch them on, so they go in as compiler flags.
EXTRA_ISA: dict[str, tuple[str, str]] = {
    "AVX512_FP16": ("avx512_fp16", "-mavx512fp16"),
    "GFNI": ("gfni", "-mgfni"),
}
# What to drop, in order, when a build crashes: the newest, least tested kernels first.
FALLBACK_GROUPS: dict[str, tuple[str, ...]] = {
    "AMX": ("AMX_TILE", "AMX_INT8", "AMX_BF16"),
    "AVX-512": ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX512_FP16"),
    "AVX-VNNI": ("AVX_VNNI",),
}
BASE_CMAKE_ARGS = ("-DGGML_OPENMP=OFF",)  # why: LLAMA_CPP_CMAKE_ARGS in llmlab/envcheck.py
PROBE_MIN_PROMPT_TOKENS = 32
PROBE_TIMEOUT = 180.0
PROBE_ENV = "LLMLAB_BUILD_PROBE"  # set in the probe's child process
NO_FALLBACK_LEFT = (
    "every fallback was tried (no AMX, no AVX-512, no AVX-VNNI); try a build with fewer sets, "
    'e.g. CMAKE_ARGS="-DGGML_AVX2=OFF" python -m llmlab.llama_build install --rebuild, '
    "and report the CPU (python -m llmlab.llama_build features)"
)
# Long enough to reach PROBE_MIN_PROMPT_TOKENS with any tokenizer the lab ships.
PROBE_PROMPT = (
    "A short note on the water cycle. The sun warms lakes, rivers and the sea, and water "
    "rises into the air as vapour. High up, the air is cold, so the vapour turns into tiny "
    "drops that gather as clouds. When the drops grow heavy they fall as rain or snow, and "
    "the water flows back to the sea. In one sentence, the water cycle is"
)


class BuildError(RuntimeError):
    """A build or install step failed; the message says what to do."""


# --------------------------------------------------------------------------- the CPU


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags in Linux's spelling (``avx2``, ``avx512f``, ``amx_tile``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if sys.platform == "darwin":
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        # macOS spells them AVX2, AVX512F, SSE4.2: map to Linux's names.
        return frozenset(f.lower().replace(".", "_") for f in out.split())
    return frozenset()


def is_x86() -> bool:
    """True on x86-64, where the lab chooses the instruction sets itself."""
    return platform.machine().lower() in {"x86_64", "amd64", "x64"}


def cpu_features(flags: Iterable[str] | None = None) -> list[str]:
    """The ggml features this CPU supports, in :data:`X86_FEATURES` order."""
    have = set(cpu_flags() if flags is None else flags)
    options = [name for name, needs in X86_FEATURES.items() if all(f in have for f in needs)]
    extras = [name for name, (flag, _) in EXTRA_ISA.items() if flag in have]
    if "AVX512" not in options:
        extras = [name for name in extras if not name.startswith("AVX512")]
    return options + extras


def choose_features(
    flags: Iterable[str] | None = None, amx: bool = False, excluded: Iterable[str] = ()
) -> list[str]:
    """The features to build with: all this CPU has, less AMX (unless ``amx``) and less the
    fallback groups in ``excluded`` (names from :data:`FALLBACK_GROUPS`)."""
    drop = {name for group in excluded for name in FALLBACK_GROUPS.get(group, ())}
    if not amx:
        drop |= set(FALLBACK_GROUPS["AMX"])
    return [name for name in cpu_features(flags) if name not in drop]


def isa_cflags(features: list[str] | None) -> str:
    """Compiler flags for the :data:`EXTRA_ISA` sets in ``features`` (CFLAGS / CXXFLAGS)."""
    return " ".join(flag for name, (_, flag) in EXTRA_ISA.items() if name in (features or []))


def cmake_args(features: list[str] | None, extra: str = "") -> list[str]:
    """CMake flags for llama-cpp-python. ``features=None`` keeps llama.cpp's own choice
    (native on Arm and Apple, where one build serves the machine it is made on)."""
    args = list(BASE_CMAKE_ARGS)
    if features is not None:
        args.append("-DGGML_NATIVE=OFF")
        args += [f"-DGGML_{name}={'ON' if name in features else 'OFF'}" for name in X86_FEATURES]
    return args + extra.split()


# llama.cpp's system-info names -> the CPU flag each needs (Linux spelling).
SYSTEM_INFO_FLAGS = {
    "AVX": "avx",
    "AVX2": "avx2",
    "AVX_VNNI": "avx_vnni",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}


def build_features(system_info: str) -> list[str]:
    """The features a llama.cpp build has switched on, from its system info, which reads
    like ``CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | ... |``."""
    parts = [part.rsplit(":", 1)[-1] for part in system_info.split("|")]
    return [part.split("=")[0].strip() for part in parts if part.strip().endswith("= 1")]


def missing_on_cpu(system_info: str, flags: Iterable[str] | None = None) -> list[str]:
    """Features the build was compiled with that this CPU does not have (x86 only): such a
    build dies with SIGILL as soon as it reaches one of them."""
    have = set(cpu_flags() if flags is None else flags)
    if not have or not is_x86():
        return []
    return [
        f
        for f in build_features(system_info)
        if f in SYSTEM_INFO_FLAGS and SYSTEM_INFO_FLAGS[f] not in have
    ]


# --------------------------------------------------------------------------- wheels


def lab_home() -> Path:
    """``LLMLAB_HOME`` as :mod:`llmlab.settings` reads it (without importing pydantic)."""
    return Path(os.environ.get("LLMLAB_HOME") or Path.home() / ".cache" / "llmlab").expanduser()


def builds_dir() -> Path:
    """Where wheels, their records, crash records and verdicts live."""
    return lab_home() / "llama-builds"


def pinned_version(requirements: Path = REQUIREMENTS) -> str:
    """The llama-cpp-python version pinned in requirements.txt."""
    match = re.search(r"(?im)^llama[-_.]cpp[-_.]python==(\S+)", requirements.read_text())
    if not match:
        raise BuildError(f"{requirements} pins no {PACKAGE}==VERSION; restore that line.")
    return match.group(1)


def build_key(version: str, args: list[str]) -> str:
    """One directory per (version, CMake flags, Python tag, platform)."""
    tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
    text = "\n".join([version, tag, *args])
    return f"{version}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass
class BuildRecord:
    """What one cached wheel is: its flags, the CPU features they select, and a hash of the
    native libraries inside it (the same hash, taken from an installed copy, names it)."""

    key: str
    version: str
    wheel: str
    cmake_args: list[str]
    features: list[str] | None
    lib_sha256: str
    cflags: str = ""
    built_on: str = field(default_factory=lambda: platform.processor() or platform.machine())

    def save(self, folder: Path) -> None:
        (folder / "build.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> BuildRecord | None:
        try:
            record = cls(**json.loads((folder / "build.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return record if (folder / record.wheel).is_file() else None


def _libs_hash(files: Iterable[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, data in sorted(files):
        digest.update(Path(name).name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _is_native_lib(name: str) -> bool:
    return "/lib/" in f"/{name}" and re.search(r"\.(so(\.\d+)*|dylib|dll)$", name) is not None


def wheel_libs_hash(wheel: Path) -> str:
    """Hash of the native libraries under ``llama_cpp/lib`` inside a wheel file."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith("llama_cpp/") and _is_native_lib(n)]
        return _libs_hash((n, archive.read(n)) for n in names)


def installed_lib_dir() -> Path | None:
    """``llama_cpp/lib`` of the installed package, found without importing (loading) it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if lib.is_dir() else None


def installed_build_id() -> str | None:
    """Hash of the installed native libraries (None when llama-cpp-python is missing)."""
    lib = installed_lib_dir()
    if lib is None:
        return None
    files = [p for p in lib.iterdir() if p.is_file() and _is_native_lib(f"lib/{p.name}")]
    return _libs_hash((p.name, p.read_bytes()) for p in files) if files else None


def find_record(build_id: str | None) -> BuildRecord | None:
    """The cached build whose libraries are the installed ones, if any."""
    if build_id is None or not builds_dir().is_dir():
        return None
    for folder in sorted(builds_dir().iterdir()):
        record = BuildRecord.load(folder)
        if record and record.lib_sha256 == build_id:
            return record
    return None


def _pip(python: str, *args: str, env: dict[str, str] | None = None) -> None:
    command = [python, "-m", "pip", *args]
    if subprocess.run(command, env=env, check=False).returncode != 0:
        raise BuildError(
            f"this step failed: {' '.join(command)}. Fix what pip printed above, then run it again."
        )


def build_wheel(
    version: str, args: list[str], folder: Path, python: str = sys.executable, cflags: str = ""
) -> Path:
    """Compile llama-cpp-python from source with CMake ``args`` (and ``cflags`` added to
    CFLAGS / CXXFLAGS) into ``folder``; returns the wheel."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        env = {**os.environ, "CMAKE_ARGS": " ".join(args)}
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = f"{env.get(var, '')} {cflags}".strip()
        # --no-cache-dir: pip must neither hand back nor keep a wheel keyed on the sdist alone.
        _pip(python, "wheel", "--quiet", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
             "-w", tmp, f"{PACKAGE}=={version}", env=env)  # fmt: skip
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError(f"pip wheel made no {PACKAGE} wheel in {tmp}.")
        target = folder / built[0].name
        shutil.move(built[0], target)
    return target


def _describe(features: list[str] | None) -> str:
    if features is None:
        return "llama.cpp's native choice"
    shown = " ".join(features) or "no SIMD"
    return shown + ("" if any(f.startswith("AMX") for f in features) else ", no AMX")


def install(
    features: list[str] | None,
    extra_args: str = "",
    rebuild: bool = False,
    python: str = sys.executable,
    say: Callable[[str], None] = print,
) -> BuildRecord:
    """Make the installed llama-cpp-python the build for ``features``: already there, from
    the lab's cache, or compiled now (then cached)."""
    version = pinned_version()
    args = cmake_args(features, extra_args)
    cflags = isa_cflags(features)
    key = build_key(version, [*args, f"CFLAGS={cflags}"] if cflags else args)
    folder = builds_dir() / key
    record = None if rebuild else BuildRecord.load(folder)
    if record and record.lib_sha256 == installed_build_id():
        say(f"{PACKAGE} {version} for this CPU is installed ({_describe(features)}).")
        return record
    if record is None:
        say(f"Building {PACKAGE} {version} for this CPU ({_describe(features)}); "
            "about 10 minutes on 2 cores, once per CPU type...")  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        wheel = build_wheel(version, args, folder, python, cflags)
        record = BuildRecord(
            key, version, wheel.name, args, features, wheel_libs_hash(wheel), cflags
        )
        record.save(folder)
    else:
        say(f"Installing {PACKAGE} {version} for this CPU from {folder} ({_describe(features)}).")
    _pip(python, "install", "--quiet", "--no-deps", "--force-reinstall", str(folder / record.wheel))
    return record


# --------------------------------------------------------------------------- the probe

_PROBE_CODE = """
import json, sys, time
from llmlab import backends
name, prompt, max_tokens, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
with backends.load(name, backend=backend) as model:
    loaded = time.perf_counter() - start
    prompt_tokens = model.count_tokens(prompt)
    result = model.complete(prompt, max_tokens=max_tokens, temperature=0)
    backend = model.info().get("backend", backend)
print(json.dumps({
    "backend": backend,
    "prompt_tokens": prompt_tokens,
    "completion_tokens": result.usage.completion_tokens,
    "text": result.text,
    "tokens_per_second": result.timings.tokens_per_second,
    "load_seconds": loaded,
    "seconds": time.perf_counter() - start,
}))
"""


@dataclass
class Verdict:
    """What happened when a build generated: ``ok``, ``crashed`` (killed by a signal),
    ``failed`` (an error it reported) or ``timeout``."""

    status: str
    detail: str
    signal: str = ""
    backend: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    tokens_per_second: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


SIGNAL_MEANING = {
    "SIGILL": "illegal instruction: the build uses a CPU instruction this CPU cannot run",
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error",
    "SIGABRT": "aborted",
    "SIGFPE": "arithmetic fault",
}


def probe(
    model: str = "",
    max_tokens: int = 4,
    backend: str = "llama.cpp",
    code: str = _PROBE_CODE,
    timeout: float = PROBE_TIMEOUT,
    python: str = sys.executable,
) -> Verdict:
    """Generate ``max_tokens`` greedy tokens after a prompt of at least 32 tokens, in a child
    process, and say how it went. ``model`` defaults to the lab's default model."""
    command = [
        python,
        "-c",
        code,
        model or _default_model(),
        PROBE_PROMPT,
        str(max_tokens),
        backend,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, PROBE_ENV: "1"}, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Verdict("timeout", f"no reply within {timeout:.0f} s")
    seconds = time.perf_counter() - start
    if done.returncode < 0:
        name = _signal_name(-done.returncode)
        meaning = SIGNAL_MEANING.get(name, "killed")
        return Verdict("crashed", f"killed by {name} ({meaning})", signal=name, seconds=seconds)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return Verdict(
            "failed", lines[-1] if lines else f"exit status {done.returncode}", seconds=seconds
        )
    try:
        reply = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Verdict(
            "failed", f"unreadable probe output: {done.stdout[-200:]!r}", seconds=seconds
        )
    if reply["prompt_tokens"] < PROBE_MIN_PROMPT_TOKENS or reply["completion_tokens"] < 1:
        return Verdict("failed", f"generated {reply['completion_tokens']} tokens from a "
                       f"{reply['prompt_tokens']}-token prompt", seconds=seconds)  # fmt: skip
    detail = (f"{reply['completion_tokens']} tokens after a {reply['prompt_tokens']}-token prompt "
              f"at {reply['tokens_per_second']:.1f} tokens/s on {reply['backend']}")  # fmt: skip
    return Verdict("ok", detail, backend=reply["backend"], prompt_tokens=reply["prompt_tokens"],
                   completion_tokens=reply["completion_tokens"], text=reply["text"],
                   tokens_per_second=reply["tokens_per_second"], seconds=reply["seconds"])  # fmt: skip


def _default_model() -> str:
    from llmlab.settings import get_settings  # needs the requirements, so not at module level

    return get_settings().default_model


# --------------------------------------------------------------------------- verdicts and repair


def cpu_signature() -> str:
    """A short hash of this CPU's flags: verdicts and exclusions hold per CPU type."""
    text = platform.machine() + " " + " ".join(sorted(cpu_flags()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _verdict_path(build_id: str) -> Path:
    return builds_dir() / "verdicts" / f"{build_id[:24]}-{cpu_signature()}.json"


def save_verdict(build_id: str, verdict: Verdict) -> None:
    """Remember how this build did on this CPU."""
    path = _verdict_path(build_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(verdict)) + "\n")


def cached_verdict(build_id: str | None = None) -> Verdict | None:
    """The last verdict for the installed build (or ``build_id``) on this CPU, if any."""
    build_id = build_id or installed_build_id()
    if not build_id:
        return None
    try:
        return Verdict(**json.loads(_verdict_path(build_id).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def known_crash() -> Verdict | None:
    """The cached crash verdict of the installed build on this CPU, else None (cheap: no probe).
    Always None inside the probe's own child, which is there to find out afresh."""
    if os.environ.get(PROBE_ENV) == "1":
        return None
    verdict = cached_verdict()
    return verdict if verdict is not None and verdict.status == "crashed" else None


def repair_command(python: str = sys.executable) -> str:
    """The command that gets this machine a build that works."""
    return f"{python} -m llmlab.llama_build repair"


def _exclusions_path() -> Path:
    return builds_dir() / f"excluded-{cpu_signature()}.json"


def excluded_groups() -> list[str]:
    """Fallback groups that crashed on this CPU type before (so new installs skip them)."""
    try:
        return list(json.loads(_exclusions_path().read_text()))
    except (OSError, ValueError):
        return []


def _exclude(group: str) -> None:
    groups = [*excluded_groups(), group]
    _exclusions_path().parent.mkdir(parents=True, exist_ok=True)
    _exclusions_path().write_text(json.dumps(groups) + "\n")


def next_fallback(features: list[str]) -> str | None:
    """The first fallback group the build still has (the one to drop after a crash)."""
    return next(
        (group for group, names in FALLBACK_GROUPS.items() if set(names) & set(features)), None
    )


def repair(
    amx: bool = False,
    extra_args: str = "",
    model: str = "",
    installer: Callable[..., BuildRecord] = install,
    prober: Callable[..., Verdict] = probe,
    say: Callable[[str], None] = print,
) -> Verdict:
    """Install the build for this CPU, prove it, and after each crash rebuild without the
    next fallback group (AMX, then AVX-512, then AVX-VNNI) until one generates."""
    native = not is_x86()
    while True:
        features = None if native else choose_features(amx=amx, excluded=excluded_groups())
        record = installer(features, extra_args, say=say)
        verdict = prober(model)
        save_verdict(record.lib_sha256, verdict)
        if verdict.status != "crashed":
            return verdict
        group = None if native else next_fallback(record.features or [])
        if group is None:
            return verdict
        say(f"llama.cpp was {verdict.detail} on a {PROBE_MIN_PROMPT_TOKENS}+ token prompt; "
            f"its build uses {group}, so it is rebuilt without {group}.")  # fmt: skip
        _exclude(group)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmlab.llama_build",
        description="Build, prove and repair llama-cpp-python for this CPU.",
        epilog="examples:\n  python -m llmlab.llama_build install\n"
        "  python -m llmlab.llama_build repair\n"
        "  LLMLAB_LLAMA_AMX=1 python -m llmlab.llama_build repair   # try ggml's AMX kernels\n"
        "  python -m llmlab.llama_build features",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["install", "repair", "check", "features"])
    parser.add_argument("--amx", action="store_true", default=os.environ.get("LLMLAB_LLAMA_AMX") == "1",
                        help="build ggml's AMX kernels too (default: off; LLMLAB_LLAMA_AMX=1)")  # fmt: skip
    parser.add_argument(
        "--rebuild", action="store_true", help="compile again even if a wheel is cached"
    )
    parser.add_argument(
        "--model", default="", help="model for the probe (default: the lab's default)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: ``install``, ``repair``, ``check`` or ``features``."""
    args = _parser().parse_args(argv)
    extra = os.environ.get("CMAKE_ARGS", "")
    features = None if not is_x86() else choose_features(amx=args.amx, excluded=excluded_groups())
    try:
        if args.command == "features":
            cflags = isa_cflags(features)
            print(f'CMAKE_ARGS="{" ".join(cmake_args(features, extra))}"')
            if cflags:
                print(f'CFLAGS="{cflags}" CXXFLAGS="{cflags}"')
            return 0
        if args.command == "install":
            install(features, extra, rebuild=args.rebuild)
            return 0
        if args.command == "repair":
            if args.rebuild:
                install(features, extra, rebuild=True)
            verdict = repair(amx=args.amx, extra_args=extra, model=args.model)
        else:
            verdict = probe(args.model)
            build_id = installed_build_id()
            if build_id:
                save_verdict(build_id, verdict)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if verdict.ok:
        print(f"llama.cpp works on this CPU: {verdict.detail}.")
        return 0
    if verdict.status == "crashed":
        print(f"error: llama.cpp was {verdict.detail} on a {PROBE_MIN_PROMPT_TOKENS}+ token prompt.",
              file=sys.stderr)  # fmt: skip
        fix = repair_command() if args.command == "check" else NO_FALLBACK_LEFT
    else:
        print(f"error: the probe generation did not work: {verdict.detail}.", file=sys.stderr)
        fix = "fix what the line above says, then run: " + repair_command()
    print(f"  fix: {fix}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
