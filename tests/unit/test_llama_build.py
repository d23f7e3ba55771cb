"""llmlab.llama_build: which instruction sets a build gets, how wheels are keyed and reused,
and how a crash is told apart and repaired.

The developers' and CI's CPUs differ (AVX2-only, AVX-512, AVX-512 + AMX), so nothing here
relies on the CPU it runs on: CPU flags are given, a crash is a child that kills itself with
SIGILL, and builds are small zip files standing in for wheels. The real path (this machine's
build generating) is the last test.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

from llmlab import llama_build

ROOT = Path(__file__).resolve().parents[2]

AVX2_CPU = {"sse4_2", "f16c", "fma", "bmi2", "avx", "avx2"}
AVX512_CPU = AVX2_CPU | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni"}
AMX_CPU = AVX512_CPU | {"avx_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16"}

SIGILL_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
FAILING_CHILD = "raise SystemExit('RuntimeError: could not load model /x.gguf')"


def good_child(prompt_tokens: int = 48, completion_tokens: int = 4) -> str:
    reply = {
        "backend": "llama.cpp",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "text": " a loop",
        "tokens_per_second": 90.0,
        "load_seconds": 0.2,
        "seconds": 0.5,
    }
    return f"print({json.dumps(json.dumps(reply))})"


# --------------------------------------------------------------------------- features


def test_amx_is_left_out_unless_asked_for():
    assert "AMX_INT8" not in llama_build.choose_features(AMX_CPU)
    assert {"AMX_TILE", "AMX_INT8", "AMX_BF16"} <= set(
        llama_build.choose_features(AMX_CPU, amx=True)
    )


def test_every_other_feature_the_cpu_has_is_kept():
    # Nothing is lost where there is no AMX: the build gets all of the CPU's sets.
    assert llama_build.choose_features(AVX512_CPU) == llama_build.cpu_features(AVX512_CPU)
    assert "AVX512" in llama_build.choose_features(AMX_CPU)
    assert "AVX512_VNNI" in llama_build.choose_features(AMX_CPU)


def test_avx512_needs_all_five_flags_ggml_compiles_for():
    assert "AVX512" not in llama_build.cpu_features(AVX2_CPU | {"avx512f"})
    assert "AVX512" in llama_build.cpu_features(AVX512_CPU)


def test_sets_without_a_ggml_option_become_compiler_flags_as_native_would_set_them():
    fp16_cpu = AMX_CPU | {"avx512_fp16", "gfni"}
    features = llama_build.choose_features(fp16_cpu)
    assert {"AVX512_FP16", "GFNI"} <= set(features)
    assert llama_build.isa_cflags(features) == "-mavx512fp16 -mgfni"
    assert llama_build.isa_cflags(llama_build.choose_features(AVX2_CPU)) == ""
    # Dropping AVX-512 after a crash drops its FP16 extension too.
    assert "AVX512_FP16" not in llama_build.choose_features(fp16_cpu, excluded=["AVX-512"])


def test_the_wheel_is_built_with_those_flags(fake_pip, lab_home):
    features = llama_build.choose_features(AVX2_CPU | {"gfni"})
    record = llama_build.install(features, say=lambda _: None)
    assert record.cflags == "-mgfni"
    assert "-mgfni" in (fake_pip.lib / "libggml-cpu.so").read_text()


def test_an_excluded_group_is_dropped_whole():
    features = llama_build.choose_features(AMX_CPU, amx=True, excluded=["AVX-512"])
    assert not [f for f in features if f.startswith("AVX512")]
    assert "AVX2" in features and "AMX_INT8" in features


def test_cmake_args_name_every_set_explicitly_and_never_native():
    args = llama_build.cmake_args(llama_build.choose_features(AVX2_CPU), "-DGGML_CUDA=on")
    assert args[:2] == ["-DGGML_OPENMP=OFF", "-DGGML_NATIVE=OFF"]
    assert (
        "-DGGML_AVX2=ON" in args and "-DGGML_AVX512=OFF" in args and "-DGGML_AMX_INT8=OFF" in args
    )
    assert args[-1] == "-DGGML_CUDA=on"
    assert llama_build.cmake_args(None) == ["-DGGML_OPENMP=OFF"]  # Arm / Apple: llama.cpp's choice


def test_wheels_for_different_cpus_have_different_keys():
    avx2 = llama_build.cmake_args(llama_build.choose_features(AVX2_CPU))
    avx512 = llama_build.cmake_args(llama_build.choose_features(AVX512_CPU))
    assert llama_build.build_key("0.3.36", avx2) != llama_build.build_key("0.3.36", avx512)
    assert llama_build.build_key("0.3.36", avx2) == llama_build.build_key("0.3.36", list(avx2))


# --------------------------------------------------------------------------- install and reuse


class FakePip:
    """Stands in for pip: ``wheel`` writes a zip with a library whose bytes name the flags;
    ``install`` copies that library to the fake site-packages."""

    def __init__(self, site: Path):
        self.site = site
        self.calls: list[list[str]] = []
        self.lib = site / "llama_cpp" / "lib"

    def __call__(self, python, *args, env=None):
        self.calls.append(list(args))
        if args[0] == "wheel":
            out = Path(args[args.index("-w") + 1])
            with zipfile.ZipFile(out / "llama_cpp_python-0.3.36-cp311-linux_x86_64.whl", "w") as z:
                z.writestr("llama_cpp/__init__.py", "")
                z.writestr("llama_cpp/lib/libggml-cpu.so", env["CMAKE_ARGS"] + " " + env["CFLAGS"])
        elif args[0] == "install":
            with zipfile.ZipFile(args[-1]) as z:
                self.lib.mkdir(parents=True, exist_ok=True)
                (self.lib / "libggml-cpu.so").write_bytes(z.read("llama_cpp/lib/libggml-cpu.so"))

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    pip = FakePip(tmp_path / "site")
    monkeypatch.setattr(llama_build, "_pip", pip)
    monkeypatch.setattr(
        llama_build, "installed_lib_dir", lambda: pip.lib if pip.lib.is_dir() else None
    )
    return pip


def test_first_install_builds_then_reuses_then_does_nothing(fake_pip, lab_home):
    features = llama_build.choose_features(AVX2_CPU)
    messages: list[str] = []
    record = llama_build.install(features, say=messages.append)
    assert fake_pip.kinds() == ["wheel", "install"]
    assert (
        "Building llama-cpp-python 0.3.36 for this CPU" in messages[0] and "no AMX" in messages[0]
    )
    assert (lab_home / "llama-builds" / record.key / record.wheel).is_file()
    assert llama_build.installed_build_id() == record.lib_sha256

    llama_build.install(features, say=messages.append)  # already the right build
    assert fake_pip.kinds() == ["wheel", "install"]
    assert "is installed" in messages[-1]

    (fake_pip.lib / "libggml-cpu.so").write_bytes(b"a wheel pip cached on another machine")
    llama_build.install(features, say=messages.append)
    assert fake_pip.kinds() == ["wheel", "install", "install"]  # from the lab's cache, no build
    assert llama_build.installed_build_id() == record.lib_sha256


def test_a_wheel_built_for_avx512_is_never_handed_to_an_avx2_cpu(fake_pip, lab_home):
    llama_build.install(llama_build.choose_features(AVX512_CPU), say=lambda _: None)
    record = llama_build.install(llama_build.choose_features(AVX2_CPU), say=lambda _: None)
    assert fake_pip.kinds() == ["wheel", "install", "wheel", "install"]  # built again
    assert "-DGGML_AVX512=OFF" in record.cmake_args
    installed = (fake_pip.lib / "libggml-cpu.so").read_text()
    assert "-DGGML_AVX512=OFF" in installed


def test_the_installed_build_is_found_by_its_libraries(fake_pip, lab_home):
    record = llama_build.install(llama_build.choose_features(AVX2_CPU), say=lambda _: None)
    assert llama_build.find_record(llama_build.installed_build_id()) == record
    (fake_pip.lib / "libggml-cpu.so").write_bytes(b"something pip built")
    assert llama_build.find_record(llama_build.installed_build_id()) is None


# --------------------------------------------------------------------------- the probe


def test_a_child_killed_by_sigill_is_a_crash_that_names_the_signal():
    verdict = llama_build.probe("any", code=SIGILL_CHILD)
    assert verdict.status == "crashed" and verdict.signal == "SIGILL"
    assert "illegal instruction" in verdict.detail


def test_a_child_that_fails_is_a_failure_with_its_last_line():
    verdict = llama_build.probe("any", code=FAILING_CHILD)
    assert verdict.status == "failed"
    assert verdict.detail == "RuntimeError: could not load model /x.gguf"


def test_a_short_prompt_does_not_count_as_proof():
    verdict = llama_build.probe("any", code=good_child(prompt_tokens=5))
    assert verdict.status == "failed" and "5-token prompt" in verdict.detail


def test_a_good_child_is_ok_with_its_speed():
    verdict = llama_build.probe("any", code=good_child())
    assert (
        verdict.ok
        and verdict.detail == "4 tokens after a 48-token prompt at 90.0 tokens/s on llama.cpp"
    )


def test_a_hung_child_is_a_timeout():
    verdict = llama_build.probe("any", code="import time; time.sleep(30)", timeout=0.5)
    assert verdict.status == "timeout"


# --------------------------------------------------------------------------- repair


def amx_xeon(monkeypatch):
    """Pretend this is an AMX Xeon; returns (the feature lists built, in order, and a fake
    installer that records each and names its build ``lib-N``)."""
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: frozenset(AMX_CPU))
    monkeypatch.setattr(llama_build, "is_x86", lambda: True)
    built: list[list[str]] = []

    def installer(features, extra_args, say):
        built.append(features)
        return llama_build.BuildRecord("k", "0.3.36", "w.whl", [], features, f"lib-{len(built)}")

    return built, installer


def test_a_crash_rebuilds_without_amx_says_why_and_is_remembered(lab_home, monkeypatch):
    built, installer = amx_xeon(monkeypatch)

    def prober(model):  # the AMX build dies as on a Sapphire Rapids Xeon; the rest works
        return llama_build.probe(
            model or "m", code=SIGILL_CHILD if "AMX_INT8" in built[-1] else good_child()
        )

    messages: list[str] = []
    verdict = llama_build.repair(amx=True, installer=installer, prober=prober, say=messages.append)
    assert verdict.ok
    assert "AMX_INT8" in built[0] and "AMX_INT8" not in built[1] and "AVX512" in built[1]
    assert messages == [
        "llama.cpp was killed by SIGILL (illegal instruction: the build uses a CPU instruction "
        "this CPU cannot run) on a 32+ token prompt; its build uses AMX, so it is rebuilt without AMX."
    ]
    assert llama_build.excluded_groups() == ["AMX"]
    assert llama_build.cached_verdict("lib-1").status == "crashed"
    assert llama_build.cached_verdict("lib-2").ok

    # The next setup on this CPU type skips AMX from the start, even when asked for it.
    built.clear()
    llama_build.repair(amx=True, installer=installer, prober=prober, say=messages.append)
    assert len(built) == 1 and "AMX_INT8" not in built[0]


def test_crashes_walk_the_fallbacks_then_stop(lab_home, monkeypatch):
    built, installer = amx_xeon(monkeypatch)

    verdict = llama_build.repair(
        amx=True,
        installer=installer,
        prober=lambda model: llama_build.probe("m", code=SIGILL_CHILD),
        say=lambda _: None,
    )
    assert verdict.status == "crashed"
    assert llama_build.excluded_groups() == ["AMX", "AVX-512", "AVX-VNNI"]
    assert "AVX2" in built[-1] and not [f for f in built[-1] if f.startswith(("AVX512", "AMX"))]
    assert len(built) == 4


def test_known_crash_reads_the_cached_verdict_only(lab_home, monkeypatch):
    monkeypatch.setattr(llama_build, "installed_build_id", lambda: "build-a")
    assert llama_build.known_crash() is None
    llama_build.save_verdict(
        "build-a", llama_build.Verdict("crashed", "killed by SIGILL", "SIGILL")
    )
    assert llama_build.known_crash().signal == "SIGILL"
    llama_build.save_verdict("build-a", llama_build.Verdict("ok", "fine"))
    assert llama_build.known_crash() is None


def test_check_command_reports_a_crash_with_the_fix(capsys, monkeypatch):
    real_probe = llama_build.probe
    monkeypatch.setattr(llama_build, "probe", lambda model: real_probe("m", code=SIGILL_CHILD))
    assert llama_build.main(["check"]) == 1
    err = capsys.readouterr().err
    assert "error: llama.cpp was killed by SIGILL" in err
    assert f"fix: {sys.executable} -m llmlab.llama_build repair" in err


# --------------------------------------------------------------------------- the real build


@pytest.mark.slow
def test_the_installed_build_generates_on_this_cpu():
    verdict = llama_build.probe()
    assert verdict.ok, verdict.detail
    assert verdict.prompt_tokens >= llama_build.PROBE_MIN_PROMPT_TOKENS
    assert verdict.completion_tokens >= 1 and verdict.backend == "llama.cpp"


def test_programs_refuse_a_build_known_to_crash_and_say_what_to_run(lab_home, monkeypatch, capsys):
    from llmlab import backends

    monkeypatch.setattr(llama_build, "installed_build_id", lambda: "build-a")
    crash = llama_build.probe("m", code=SIGILL_CHILD)
    llama_build.save_verdict("build-a", crash)
    with pytest.raises(backends.BackendError, match=r"llmlab\.llama_build repair"):
        backends.load(backend="llama.cpp")

    spec = importlib.util.spec_from_file_location("simple_chat", ROOT / "part3" / "simple_chat.py")
    simple_chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simple_chat)
    assert simple_chat.main(["--prompt", "Hi"]) != 0
    err = capsys.readouterr().err
    assert "was killed by SIGILL" in err and "llmlab.llama_build repair" in err
    assert "Traceback" not in err


def test_programs_refuse_a_build_made_for_another_cpu(monkeypatch):
    # A wheel pip cached on an AVX-512 machine, on an AVX2-only laptop: a clear error, no SIGILL.
    from llmlab import backends
    from llmlab.backends import llamacpp

    info = {
        "version": "0.3.36",
        "system_info": "CPU : AVX2 = 1 | AVX512 = 1 |",
        "gpu_offload": False,
    }
    monkeypatch.setattr(llamacpp, "llama_cpp_system_info", lambda: info)
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: frozenset(AVX2_CPU))
    monkeypatch.setattr(llama_build, "is_x86", lambda: True)
    with pytest.raises(backends.BackendError, match="uses AVX512, which this CPU lacks"):
        backends.load(backend="llama.cpp")


def test_build_features_are_read_from_llamas_system_info(monkeypatch):
    monkeypatch.setattr(llama_build, "is_x86", lambda: True)
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 1 | REPACK = 1 |"
    assert llama_build.build_features(info) == ["SSE3", "AVX", "AVX2", "AMX_INT8", "REPACK"]
    assert (
        llama_build.missing_on_cpu(info, flags=AVX2_CPU) == ["AMX_INT8"] or not llama_build.is_x86()
    )


def test_the_engine_refuses_a_build_known_to_crash_too(lab_home, monkeypatch):
    from llmlab import backends
    from llmlab.engine import Engine

    monkeypatch.setattr(llama_build, "installed_build_id", lambda: "build-a")
    llama_build.save_verdict("build-a", llama_build.probe("m", code=SIGILL_CHILD))
    with pytest.raises(
        backends.BackendError, match=r"killed by SIGILL.*llmlab\.llama_build repair"
    ):
        Engine()
