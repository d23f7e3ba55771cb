"""llmlab.llama_server: where the serving benchmark's llama-server comes from and how it runs.

Nothing here compiles llama.cpp (that takes minutes): ``cmake`` is a small script on PATH
that prints what CMake prints and makes the binary, and the sdist is a folder made here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmlab import llama_build, llama_server
from llmlab.llama_build import BuildError

AVX2_CPU = {"sse4_2", "f16c", "fma", "bmi2", "avx", "avx2"}
AVX512_CPU = AVX2_CPU | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "amx_tile"}


def executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(autouse=True)
def no_server_override(monkeypatch):
    monkeypatch.delenv(llama_server.ENV, raising=False)
    monkeypatch.delenv("CMAKE_ARGS", raising=False)


def test_the_command_line_gives_llama_server_the_labs_slots_context_threads_and_kernel():
    command = llama_server.command(Path("/bin/llama-server"), Path("/m/model.gguf"), 8123,
                                   slots=8, ctx_per_slot=512, threads=2)  # fmt: skip
    line = " ".join(command)
    assert command[0] == "/bin/llama-server"
    assert "--model /m/model.gguf --host 127.0.0.1 --port 8123" in line
    # 8 slots of 512 tokens each, each slot its own KV stream as in the lab's engine
    assert "--parallel 8 --ctx-size 4096 --no-kv-unified" in line
    assert "--threads 2 --threads-batch 2 --flash-attn on" in line
    off = llama_server.command(Path("s"), Path("m"), 1, 1, 512, 1, flash_attn=False)
    assert off[off.index("--flash-attn") + 1] == "off"


def test_the_build_uses_the_labs_own_cpu_flags_amx_left_out():
    features = llama_build.choose_features(AVX512_CPU)
    args, cflags = llama_server.build_flags(features)
    assert args[: len(llama_build.cmake_args(features))] == llama_build.cmake_args(features)
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AMX_TILE=OFF" in args
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_OPENMP=OFF" in args
    for option in ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"):
        assert option in args
    assert cflags == llama_build.isa_cflags(features)


def test_the_cache_is_keyed_on_the_version_and_the_flags(lab_home):
    avx2, _ = llama_server.build_flags(llama_build.choose_features(AVX2_CPU))
    avx512, _ = llama_server.build_flags(llama_build.choose_features(AVX512_CPU))
    here = llama_server.cache_dir("0.3.36", avx2)
    assert here.parent == lab_home / "llama-server"
    assert here.name.startswith("0.3.36-")
    assert here == llama_server.cache_dir("0.3.36", list(avx2))
    assert here != llama_server.cache_dir("0.3.36", avx512)
    assert here != llama_server.cache_dir("0.3.37", avx2)
    assert here != llama_server.cache_dir("0.3.36", avx2, cflags="-mgfni")


def test_llmlab_llama_server_is_used_as_given_and_nothing_is_built(tmp_path, monkeypatch, capsys):
    binary = executable(tmp_path / "mine" / "llama-server")
    monkeypatch.setenv(llama_server.ENV, str(binary))
    monkeypatch.setattr(llama_server, "build", lambda **_: pytest.fail("must not build"))
    assert llama_server.find_or_build() == binary
    assert llama_server.main(["build"]) == 0
    assert capsys.readouterr().out.strip() == str(binary)


def test_llmlab_llama_server_that_is_no_binary_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(llama_server.ENV, str(tmp_path / "nothing-here"))
    assert llama_server.main(["path"]) == 1
    err = capsys.readouterr().err
    assert f"{llama_server.ENV}={tmp_path / 'nothing-here'} is not an executable file" in err
    assert "python -m llmlab.llama_server build" in err
    assert "Traceback" not in err


def test_not_built_yet_says_where_it_would_be_and_how_to_build_it(capsys):
    assert llama_server.main(["path"]) == 1
    err = capsys.readouterr().err
    assert "llama-server is not built yet" in err
    assert str(llama_server.cached_binary()) in err
    assert "run: python -m llmlab.llama_server build" in err


def test_a_cached_binary_is_found_and_reused_without_cmake(monkeypatch):
    cached = executable(llama_server.cached_binary())
    monkeypatch.setattr(llama_server, "check_tools", lambda: pytest.fail("must not build"))
    assert llama_server.find() == cached
    assert llama_server.build() == cached


def test_missing_cmake_or_compiler_is_a_clear_error(monkeypatch, capsys):
    with pytest.raises(BuildError, match="cmake was not found on PATH") as missing:
        llama_server.check_tools(which=lambda name: None)
    assert "LLMLAB_LLAMA_SERVER=/path/to/llama-server" in str(missing.value)
    monkeypatch.delenv("CXX", raising=False)
    only_cmake = {"cmake": "/usr/bin/cmake"}.get
    with pytest.raises(
        BuildError, match=r"no C\+\+ compiler was found \(c\+\+, g\+\+, clang\+\+\)"
    ):
        llama_server.check_tools(which=only_cmake)
    monkeypatch.setattr(llama_server.shutil, "which", lambda name: None)
    assert llama_server.main(["build"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cmake was not found on PATH") and "Traceback" not in err


FAKE_CMAKE = """#!/bin/sh
if [ "$1" = "--build" ]; then
  echo "[ 10%] Building C object ggml.c.o"
  echo "[ 55%] Building CXX object llama.cpp.o"
  echo "[100%] Linking CXX executable bin/llama-server"
  {make}
else
  echo "-- Configuring done"
fi
"""


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    """A ``cmake`` on PATH that makes (or fails to make) the binary, and an unpacked sdist."""

    def install(make: str) -> None:
        executable(tmp_path / "bin" / "cmake", FAKE_CMAKE.format(make=make))
        executable(tmp_path / "bin" / "c++")
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def sources(version: str, folder: Path, python: str = "") -> Path:
        source = folder / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        source.mkdir(parents=True)
        return source

    monkeypatch.setattr(llama_server, "fetch_sources", sources)
    return install


def test_a_build_says_its_progress_and_caches_the_binary(fake_toolchain, capsys):
    # the build folder is the last argument after -B: cmake --build <out> makes <out>/bin/...
    fake_toolchain('mkdir -p "$2/bin" && echo "#!/bin/sh" > "$2/bin/llama-server"')
    assert llama_server.main(["build"]) == 0
    out = capsys.readouterr().out
    binary = llama_server.cached_binary()
    assert binary.is_file() and out.strip().endswith(str(binary))
    assert "Building llama-server from llama-cpp-python" in out and "no AMX" in out
    assert "  10% Building C object ggml.c.o" in out and "  55% Building CXX object" in out
    assert list(binary.parent.parent.glob("build-*")) == []  # the build tree is gone


def test_a_failed_build_step_shows_its_last_lines_and_what_to_do(fake_toolchain, capsys):
    fake_toolchain('echo "llama.cpp:12: error: no such type" && exit 2')
    assert llama_server.main(["build"]) == 1
    err = capsys.readouterr().err
    assert "this build step failed (exit 2): cmake --build" in err
    assert "llama.cpp:12: error: no such type" in err
    assert "then run: python -m llmlab.llama_server build" in err
    assert not llama_server.cached_binary().exists()
