"""llama.cpp's own ``llama-server``, built from the same sources as the lab's llama.cpp.

The serving benchmark (``llmlab/benchmarks/serving.py``) runs the same load against it and
the lab's server, so the bar is llama.cpp itself on the same file, flags and CPU::

    python -m llmlab.llama_server build     # find it, or build it once (~8 min on 2 cores)
    python -m llmlab.llama_server path      # print where it is (exit 1 if not built yet)
    LLMLAB_LLAMA_SERVER=/opt/llama.cpp/build/bin/llama-server python scripts/bench.py

Where it comes from, in order: ``LLMLAB_LLAMA_SERVER`` (a binary you built), else the lab's
cache ``LLMLAB_HOME/llama-server/<key>/llama-server``, else a build: the llama-cpp-python
sdist pinned in requirements.txt (``pip download``, so pip's cache is used), its
``vendor/llama.cpp`` compiled with CMake with the *same* instruction sets the lab's own
llama.cpp build chooses (:func:`llmlab.llama_build.choose_features`: explicit sets, AMX left
out), no OpenMP, no TLS, no curl, linked statically so the one file is the whole server.
The key is a hash of the version and those flags, so a cached binary is only reused where
the same flags are chosen.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

from llmlab import llama_build
from llmlab.llama_build import BuildError

ENV = "LLMLAB_LLAMA_SERVER"
BINARY = "llama-server"
SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
COMPILERS = ("c++", "g++", "clang++")
NOT_FOUND_HINT = f"or build llama-server yourself and set {ENV}=/path/to/llama-server"


def server_features() -> list[str] | None:
    """The instruction sets the lab's own llama.cpp build uses on this CPU (None: native)."""
    if not llama_build.is_x86():
        return None
    amx = os.environ.get("LLMLAB_LLAMA_AMX") == "1"
    return llama_build.choose_features(amx=amx, excluded=llama_build.excluded_groups())


def build_flags(features: list[str] | None) -> tuple[list[str], str]:
    """CMake flags and extra compiler flags for a llama-server with ``features``."""
    args = llama_build.cmake_args(features, os.environ.get("CMAKE_ARGS", ""))
    return [*args, *SERVER_CMAKE_ARGS], llama_build.isa_cflags(features)


def cache_dir(version: str, args: list[str], cflags: str = "") -> Path:
    """Where the binary for this version and these flags is kept."""
    key = llama_build.build_key(version, [*args, f"CFLAGS={cflags}"] if cflags else args)
    return llama_build.lab_home() / "llama-server" / key


def cached_binary(features: list[str] | None = None) -> Path:
    """Where the binary for this CPU's flags is (or will be) cached."""
    args, cflags = build_flags(server_features() if features is None else features)
    return cache_dir(llama_build.pinned_version(), args, cflags) / BINARY


def from_env() -> Path | None:
    """``LLMLAB_LLAMA_SERVER`` as a checked path, None when unset."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise BuildError(
            f"{ENV}={value} is not an executable file. Point it at a llama-server binary "
            f"(e.g. llama.cpp/build/bin/llama-server), or unset it to let the lab build one: "
            f"python -m llmlab.llama_server build"
        )
    return path


def find() -> Path | None:
    """The llama-server to use without building: ``LLMLAB_LLAMA_SERVER``, else the cache."""
    path = from_env()
    if path is not None:
        return path
    cached = cached_binary()
    return cached if cached.is_file() else None


def check_tools(which: Callable[[str], str | None] | None = None) -> None:
    """Raise a :class:`BuildError` saying what to install when cmake or a C++ compiler is
    missing (``which`` finds a program; default: :func:`shutil.which`)."""
    which = which or shutil.which
    if which("cmake") is None:
        raise BuildError(
            "cmake was not found on PATH, and building llama-server needs it. Install it "
            "(apt install cmake, brew install cmake, conda install cmake or pip install cmake), "
            f"then run: python -m llmlab.llama_server build; {NOT_FOUND_HINT}"
        )
    compiler = os.environ.get("CXX")
    if not any(which(c) for c in ([compiler] if compiler else COMPILERS)):
        raise BuildError(
            f"no C++ compiler was found ({compiler or ', '.join(COMPILERS)}), and building "
            "llama-server needs one. Install it (apt install build-essential, xcode-select "
            "--install, or conda install cxx-compiler), then run: "
            f"python -m llmlab.llama_server build; {NOT_FOUND_HINT}"
        )


def fetch_sources(version: str, folder: Path, python: str = sys.executable) -> Path:
    """The llama-cpp-python ``version`` sdist from pip, its ``vendor/llama.cpp`` unpacked
    into ``folder``; returns that llama.cpp source folder."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                   ":all:", "-d", tmp, f"{llama_build.PACKAGE}=={version}"]  # fmt: skip
        if subprocess.run(command, check=False).returncode != 0:
            raise BuildError(
                f"could not download the {llama_build.PACKAGE} {version} sdist "
                f"({' '.join(command)}); check the network or pip's settings, {NOT_FOUND_HINT}"
            )
        sdist = next(Path(tmp).glob("*.tar.gz"), None)
        if sdist is None:
            raise BuildError(f"pip downloaded no .tar.gz sdist of {llama_build.PACKAGE} {version}")
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in f"/{m.name}"]
            archive.extractall(folder, members=members, filter="data")
    found = sorted(folder.glob("*/vendor/llama.cpp"))
    if not found:
        raise BuildError(f"the {llama_build.PACKAGE} {version} sdist holds no vendor/llama.cpp")
    return found[0]


_PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


def _run_logged(command: list[str], env: dict[str, str], say: Callable[[str], None]) -> None:
    """Run a build step, saying each new tenth of its progress; its tail goes in the error."""
    tail: deque[str] = deque(maxlen=30)
    shown = -10
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:  # fmt: skip
        for line in process.stdout:
            tail.append(line.rstrip())
            match = _PROGRESS.match(line)
            if match and int(match.group(1)) >= shown + 10:
                shown = int(match.group(1)) // 10 * 10
                say(f"  {match.group(1)}% {line[match.end() :].strip()[:90]}")
    if process.returncode != 0:
        raise BuildError(
            f"this build step failed (exit {process.returncode}): {' '.join(command)}\n"
            + "\n".join(tail)
            + f"\nFix what it says above, then run: python -m llmlab.llama_server build; "
            f"{NOT_FOUND_HINT}"
        )


def build(
    features: list[str] | None = None,
    jobs: int = 2,
    rebuild: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Build ``llama-server`` for this CPU (or ``features``) once and cache it; returns the
    binary. Takes about 8 minutes with 2 jobs on a 2-core machine."""
    features = server_features() if features is None else features
    version = llama_build.pinned_version()
    args, cflags = build_flags(features)
    folder = cache_dir(version, args, cflags)
    binary = folder / BINARY
    if binary.is_file() and not rebuild:
        return binary
    check_tools()
    folder.parent.mkdir(parents=True, exist_ok=True)
    say(f"Building {BINARY} from {llama_build.PACKAGE} {version}'s llama.cpp "
        f"({llama_build._describe(features)}) into {folder}; about 8 minutes.")  # fmt: skip
    env = {**os.environ}
    for var in ("CFLAGS", "CXXFLAGS"):
        env[var] = f"{env.get(var, '')} {cflags}".strip()
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix="build-") as tmp:
        say("  fetching the sdist (pip download)")
        source = fetch_sources(version, Path(tmp))
        out = Path(tmp) / "build"
        say("  configuring (cmake)")
        _run_logged(["cmake", "-S", str(source), "-B", str(out), *args], env, say)
        say(f"  compiling (cmake --build, {jobs} jobs)")
        _run_logged(["cmake", "--build", str(out), "--target", BINARY, f"-j{jobs}"], env, say)
        built = out / "bin" / BINARY
        if not built.is_file():
            raise BuildError(f"the build finished but made no {built}")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, binary)
    say(f"Built {binary}")
    return binary


def find_or_build(say: Callable[[str], None] = print) -> Path:
    """``LLMLAB_LLAMA_SERVER``, else the cached binary, else a new build (cached)."""
    return find() or build(say=say)


def command(
    binary: Path,
    model: Path,
    port: int,
    slots: int,
    ctx_per_slot: int,
    threads: int,
    flash_attn: bool = True,
    host: str = "127.0.0.1",
) -> list[str]:
    """The llama-server command line for ``slots`` slots of ``ctx_per_slot`` tokens each,
    the way the lab's server runs a model (one KV cell range per slot, no web page)."""
    return [
        str(binary),
        "--model", str(model),
        "--host", host,
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(slots * ctx_per_slot),
        "--no-kv-unified",
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--flash-attn", "on" if flash_attn else "off",
        "--no-webui",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line: ``build`` (find or build) or ``path`` (print it, exit 1 if none)."""
    parser = argparse.ArgumentParser(
        prog="python -m llmlab.llama_server",
        description="Find or build llama.cpp's llama-server for the serving benchmark.",
        epilog="examples:\n  python -m llmlab.llama_server build\n"
        "  python -m llmlab.llama_server path\n"
        f"  {ENV}=/path/to/llama-server python scripts/bench.py --suite serving",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["build", "path"])
    parser.add_argument("--rebuild", action="store_true", help="compile again even if cached")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    args = parser.parse_args(argv)
    try:
        if args.command == "path":
            path = find()
            if path is None:
                print(f"llama-server is not built yet (it would be {cached_binary()}); run: "
                      "python -m llmlab.llama_server build", file=sys.stderr)  # fmt: skip
                return 1
        elif args.rebuild:
            path = build(jobs=args.jobs, rebuild=True)
        else:
            path = find() or build(jobs=args.jobs)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
