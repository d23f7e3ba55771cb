"""python scripts/build_notebooks/build_08_framework_comparison.py

Writes the first version of notebooks/08_Framework_Comparison.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 08_Framework_Comparison.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "08_Framework_Comparison.ipynb"

CELLS = [
    md("""
    # 08 · Framework comparison: llama.cpp, transformers, bitsandbytes

    The same model (SmolLM2-135M-Instruct) and the same prompts, run by different engines
    through the lab's one `Backend` interface:

    - **llama.cpp** reads the GGUF file as it is (Q4_1) and runs hand-tuned CPU kernels;
    - **transformers** dequantizes the same file into PyTorch, fp32 on a CPU (fp16 on a GPU);
    - **transformers + bitsandbytes 8-bit** re-quantizes those weights to int8.

    For each: load time, **time to first token** (what a chat user waits before text
    appears), **decode tokens/s** (how fast the reply then streams), peak memory, and how
    decode speed scales with CPU threads. Then: what changes on a GPU, and the code that
    uses one when present.

    `make bench` measures all of this (`llmlab/benchmarks/frameworks.py`) and writes
    `bench-results/bench.json`. This notebook shows that file's figures when it exists,
    and otherwise measures live with the parameters below.
    """),
    code(
        """
        USE_BENCH_FILE = True  # show bench-results/bench.json from `make bench` when present
        ENGINES = ["llama.cpp", "transformers", "transformers 8bit"]  # engines to measure live
        PROMPTS = [
            "Explain in two sentences why the sky is blue.",
            "Write a short list of three tips for learning to cook.",
        ]
        MAX_TOKENS = 32  # tokens generated per prompt
        THREADS = None  # thread counts for the scaling plot (None: 1 .. all cores)
        """,
        "parameters",
    ),
    code("""
    import json
    import warnings
    from pathlib import Path

    import matplotlib.pyplot as plt

    import llmlab
    from llmlab.benchmarks import frameworks
    from llmlab.hardware import cpu_cores, human_bytes, memory_info, pick_device
    from llmlab.settings import get_settings

    warnings.filterwarnings("ignore", category=UserWarning)  # bitsandbytes casting notices
    mem = memory_info()
    print(f"{cpu_cores()} cores, {human_bytes(mem.total_ram)} RAM, device: {pick_device()}")
    print("threads per engine (LLMLAB_THREADS):", get_settings().threads)
    """),
    md("""
    ## 1. The figures

    A file from `make bench` is used only when it has the full-size frameworks suite (not
    a `--quick` run); otherwise the engines are measured now. Every figure comes from one
    run on this machine, and ratios compare engines measured side by side, so they hold
    up better than absolute numbers on a busy machine.
    """),
    code("""
    bench_file = Path(llmlab.__file__).resolve().parents[1] / "bench-results" / "bench.json"
    saved = json.loads(bench_file.read_text()) if bench_file.exists() else {}
    rows = [r for r in saved.get("rows", []) if r["suite"] == frameworks.SUITE]
    if USE_BENCH_FILE and rows and not saved.get("quick"):
        print(f"figures from {bench_file} (make bench, {saved['when']}, {saved['machine']['processor']})")
    else:
        engines = [e for e in ENGINES if "8bit" not in e or frameworks.bitsandbytes_available()]
        threads = THREADS or list(range(1, cpu_cores() + 1))
        print(f"measuring now: {', '.join(engines)}; threads {threads}")
        rows = [r.to_dict() for r in frameworks.measure(
            engines=engines, prompts=PROMPTS, max_tokens=MAX_TOKENS, threads=threads,
        )]
    """),
    code("""
    print(f"{'case':<24}{'metric':<8}{'value':>10}  {'unit':<6}{'vs llama.cpp':>13}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        print(f"{r['case']:<24}{r['metric']:<8}{r['value']:>10.2f}  {r['unit']:<6}{ratio:>13}")
    """),
    md("""
    ## 2. Side by side

    Lower is better for load time, time to first token and memory; higher for tokens/s.
    """),
    code("""
    engine_rows = [r for r in rows if "thread" not in r["case"]]
    names = list(dict.fromkeys(r["case"] for r in engine_rows))
    metrics = [("load", "load time (s)"), ("ttft", "time to first token (s)"),
               ("decode", "decode tokens/s"), ("memory", "peak memory added (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (metric, label) in zip(axes, metrics):
        values = {r["case"]: r["value"] for r in engine_rows if r["metric"] == metric}
        ax.bar(range(len(names)), [values.get(n, 0) for n in names], color=["C0", "C1", "C2", "C3"][: len(names)])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    plt.show()
    """),
    md("""
    **Reading it.** llama.cpp runs the 4-bit file directly, with kernels written for this
    CPU's vector instructions, and needs little memory beyond the file. transformers first
    dequantizes the whole file into fp32 tensors (slow to load, 4 bytes per weight) and
    then runs general-purpose PyTorch kernels, with Python overhead on every generated
    token, which matters a lot for a model this small. The 8-bit model loads from a plain
    checkpoint that the backend writes once and caches, so its load time is not the cost of
    a first load. bitsandbytes saves memory on the weights, but its CPU kernels are a
    fallback: its int8 matrix products are slower than PyTorch's fp32 ones. Time to first
    token is close for all three here because the prompts are short; a long prompt (a
    document to summarise) widens the gap. On a CUDA GPU the picture changes (section 4).

    ## 3. Thread scaling

    Generating one token reads every weight once, so decoding is mostly limited by memory
    bandwidth, not arithmetic: more threads help until the memory bus is saturated, and
    only if the cores are free. llama.cpp's threads wait for each other at every step, so
    when another program takes a core away they stall: on a busy machine one thread can be
    much faster than two. The saved outputs of this notebook come from such a machine
    (other jobs kept both cores busy), which is why the engines above ran with one thread
    (`LLMLAB_THREADS=1`). On an idle laptop, run it again to see the usual picture.
    """),
    code("""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for backend in ("llama.cpp", "transformers"):
        points = [(int(r["case"].split()[-2]), r["value"]) for r in rows
                  if r["case"].startswith(backend + " ") and "thread" in r["case"]]
        if points:
            ax.plot(*zip(*sorted(points)), "o-", label=backend)
    ax.set(xlabel="threads", ylabel="decode tokens/s", title="decode speed vs threads")
    ax.legend()
    plt.show()
    """),
    md("""
    ## 4. On a GPU

    Nothing in the notebooks changes when a GPU is present; the backends pick it up:

    - `llmlab.hardware.pick_device()` returns `cuda`, then `mps` (Apple), then `cpu`;
      `LLMLAB_DEVICE=cpu` forces the CPU.
    - **llama.cpp** offloads `n_gpu_layers` layers to the GPU when this build of
      llama-cpp-python was compiled with CUDA or Metal (`LLMLAB_GPU_LAYERS`, default -1 =
      all). The backend decides in `_gpu_layers()`, shown below.
    - **transformers** moves the model to the device and uses fp16 there (`_dtype()`);
      **bitsandbytes** was built for CUDA and is fast there.

    What to expect on a GPU: decoding becomes much faster for every engine (GPU memory
    bandwidth is 10–50× a laptop's RAM), time to first token drops most (prompt processing
    is arithmetic-bound, which GPUs are built for), and the gap between llama.cpp and
    transformers narrows, since both then run vendor kernels. Memory moves to the GPU: the
    budget becomes VRAM, which is where 8-bit and 4-bit weights pay off.
    """),
    code("""
    import inspect

    import llama_cpp

    from llmlab.backends.llamacpp import LlamaCppBackend
    from llmlab.backends.transformers_backend import TransformersBackend
    from llmlab.settings import get_settings

    settings = get_settings()
    print("device setting:", settings.device, "-> pick_device():", pick_device())
    print("llama.cpp GPU offload in this build:", bool(llama_cpp.llama_supports_gpu_offload()))
    print("LLMLAB_GPU_LAYERS:", settings.gpu_layers, "\\n")
    print(inspect.getsource(LlamaCppBackend._gpu_layers))
    print(inspect.getsource(TransformersBackend._dtype))
    """),
    md("""
    ## What to take away

    - For small and medium models on a CPU, llama.cpp with a quantized GGUF file is the
      fastest and leanest way to run them; transformers is the flexible one (training,
      any architecture on the Hub, research code) and pays for it on a CPU.
    - Time to first token and decode speed are different figures: a long prompt hurts the
      first, a large model the second.
    - Threads help up to the memory bandwidth, and only if the cores are free.
    - Measure on your own machine: `make bench` writes this machine's figures to
      `bench-results/`, and this notebook reads them.
    """),
]

CI_PARAMETERS = {
    "USE_BENCH_FILE": False,
    "ENGINES": ["llama.cpp", "transformers"],
    "PROMPTS": ["Explain in two sentences why the sky is blue."],
    "MAX_TOKENS": 8,
    "THREADS": [1],
}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[2]).parse_args(argv)
    print(write(NAME, CELLS, CI_PARAMETERS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
