"""python scripts/build_notebooks/build_03_models_and_formats.py

Writes the first version of notebooks/03_Models_and_Formats.ipynb (without outputs).
Execute it afterwards:
  .venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/03_Models_and_Formats.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "03_Models_and_Formats.ipynb"

CELLS = [
    md("""
    # 03 · Models and formats

    A model file holds the **weights** and everything a program needs to use them: the
    architecture and its sizes, the tokenizer, the chat template. The lab's models are
    **GGUF** files, the format of llama.cpp: one file, readable without the original
    training code, with weights stored in compact **quantized** types.

    This notebook opens the default model's file and looks inside:

    1. the header and its metadata (read by hand, then with the `gguf` package)
    2. the tensor table: names, shapes, storage types, bytes
    3. parameters vs bytes vs quantization type: bits per weight, measured from the file
    4. the same file loaded by two engines, llama.cpp and transformers
    5. the registry's memory estimate against the resident memory measured here
    """),
    code(
        """
        MODEL = "smollm2-135m-instruct"  # any GGUF entry of the registry
        N_CTX = 2048  # context length the model is loaded with (the memory estimate depends on it)
        PROMPT = "The capital of France is"  # one greedy completion per engine
        MAX_TOKENS = 8  # length of that completion, in tokens
        SHOW_TENSORS = 11  # rows of the tensor table (the embedding, then layer 0)
        LOAD_TRANSFORMERS = True  # transformers dequantizes the whole file: the slowest cell
        """,
        "parameters",
    ),
    code("""
    import gc
    import re
    import struct
    from collections import Counter

    import gguf
    import matplotlib.pyplot as plt
    import psutil
    from IPython.display import Markdown, display

    from llmlab import backends, bench, registry
    from llmlab.hardware import human_bytes

    MiB = 1 << 20
    spec = registry.resolve(MODEL)  # the catalog entry, with a checked local path
    print(spec.ref, "|", spec.description)
    print("file:", spec.path)
    print("size:", human_bytes(spec.path.stat().st_size))


    def table(headers, rows):
        \"\"\"Show rows as a Markdown table.\"\"\"
        lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
        display(Markdown("\\n".join(lines)))
    """),
    md("""
    ## 1. The header and its metadata

    A GGUF file is laid out in four parts:

    ```
    "GGUF" | version | number of tensors | number of metadata entries     fixed 24 bytes
    metadata: key -> typed value (numbers, strings, arrays)                  architecture, tokenizer, template
    tensor infos: name, shape, storage type, offset of its data              one per tensor
    tensor data, each tensor aligned to 32 bytes                             almost all of the file
    ```

    The first 24 bytes can be read by hand with `struct` (little-endian: a 4-byte magic,
    a 32-bit version, two 64-bit counts):
    """),
    code("""
    with open(spec.path, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
    print(f"magic={magic!r} version={version} tensors={n_tensors} metadata entries={n_kv}")
    """),
    md("""
    Everything after that has variable length, so we let the `gguf` package (maintained
    with llama.cpp) parse it. `GGUFReader` memory-maps the file and builds a NumPy view
    for every value, including each of the ~49,000 vocabulary strings, which is why it
    takes a few seconds.
    """),
    code("""
    with bench.timer() as t:
        reader = gguf.GGUFReader(spec.path)
    print(f"{len(reader.fields)} fields and {len(reader.tensors)} tensors read in {t.seconds:.1f} s")
    """),
    code("""
    def show(field, width=60):
        \"\"\"A field's value, shortened for display (long arrays show their length and first items).\"\"\"
        kinds = [kind.name for kind in field.types]
        if kinds[0] == "ARRAY":
            n = len(field.data)
            first = ", ".join(repr(field.contents(i)) for i in range(min(3, n)))
            value = f"{n} × {kinds[1]}: {first}{', …' if n > 3 else ''}"
        else:
            value = repr(field.contents())
        value = value if len(value) <= width else value[: width - 1] + "…"
        return value.replace("|", "\\\\|")  # a | would end the Markdown table cell


    rows = [(f"`{name}`", field.types[0].name, show(field)) for name, field in reader.fields.items()]
    table(["key", "type", "value"], rows)
    """),
    md("""
    The keys tell a program everything it needs: `general.*` describes the model,
    `llama.*` the architecture's sizes (30 blocks, 576-wide embeddings, 9 query heads
    sharing 3 key/value heads), `tokenizer.*` the whole tokenizer (vocabulary, merges,
    special token ids, chat template). `general.file_type` names the main storage type
    (an enum of llama.cpp's file types).

    The registry reads the same header when you `add` a file; its reader skips over the
    vocabulary strings instead of parsing each one:
    """),
    code("""
    with bench.timer() as t:
        info = registry.read_gguf_info(spec.path)
    print(f"read in {t.seconds:.2f} s")
    info
    """),
    md("""
    ## 2. The tensor table

    Each tensor has a name, a shape, a storage type and the offset of its data. Names
    follow llama.cpp's convention: `token_embd` (one row per vocabulary entry), then
    `blk.N.*` for each transformer block, `output_norm` at the end. GGUF lists a shape
    with the **row length first** (ggml's order); PyTorch writes the same matrix the other
    way round, so `token_embd.weight` is `[576, 49152]` here and `(49152, 576)` in PyTorch.
    """),
    code("""
    rows = [
        (
            t.name,
            " × ".join(str(int(d)) for d in t.shape),
            t.tensor_type.name,
            f"{int(t.n_elements):,}",
            f"{int(t.n_bytes):,}",
            f"{8 * int(t.n_bytes) / int(t.n_elements):.2f}",
        )
        for t in reader.tensors[:SHOW_TENSORS]
    ]
    table(["tensor", "shape", "type", "weights", "bytes", "bits/weight"], rows)
    """),
    md("""
    Every block has the same tensors, so the table repeats. Grouping the names without
    their block number shows the whole model on a few lines:
    """),
    code("""
    roles = Counter()
    role_bytes = Counter()
    for t in reader.tensors:
        role = re.sub(r"^blk\\.\\d+\\.", "blk.*.", t.name)
        roles[role] += 1
        role_bytes[role] += int(t.n_bytes)
    table(
        ["tensor", "count", "bytes (all blocks)"],
        [(name, roles[name], human_bytes(role_bytes[name])) for name in roles],
    )
    print("tensors in total:", sum(roles.values()))
    """),
    md("""
    There is no `output.weight`: this model **ties** its output layer to the token
    embedding, so the same matrix turns ids into vectors at the start and vectors into
    logits at the end.

    Which storage types does the file use, and where do the bytes go?
    """),
    code("""
    by_type = Counter()
    weights_by_type = Counter()
    count_by_type = Counter()
    for t in reader.tensors:
        kind = t.tensor_type.name
        by_type[kind] += int(t.n_bytes)
        weights_by_type[kind] += int(t.n_elements)
        count_by_type[kind] += 1

    kinds = sorted(by_type, key=by_type.get, reverse=True)
    fig, ax = plt.subplots(figsize=(7, 3))
    bars = ax.bar(kinds, [by_type[k] / MiB for k in kinds], color=["tab:blue", "tab:orange", "tab:gray"][: len(kinds)])
    for bar, kind in zip(bars, kinds):
        ax.annotate(
            f"{count_by_type[kind]} tensor{'s' if count_by_type[kind] > 1 else ''}\\n{8 * by_type[kind] / weights_by_type[kind]:.2f} bits/weight",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9,
        )
    ax.set_ylabel("MiB in the file")
    ax.set_title(f"{spec.path.name}: bytes per tensor type")
    ax.set_ylim(0, max(by_type.values()) / MiB * 1.35)
    plt.show()
    """),
    md("""
    Most matrices are **Q4_1**; the embedding (also the output layer here) is kept in
    **Q8_0**, because errors in it touch every token; the small normalisation vectors stay
    in **F32**: they are tiny, and precision matters there.

    ## 3. Parameters vs bytes vs quantization type

    The parameter count is the sum of the tensors' sizes. Dividing the bytes of the tensor
    data by it gives the **bits per weight** the file really spends:
    """),
    code("""
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    file_bytes = spec.path.stat().st_size
    header_bytes = min(int(t.data_offset) for t in reader.tensors)  # everything before the data

    print(f"parameters:      {n_params:,}  (the header says size_label={reader.get_field('general.size_label').contents()!r})")
    print(f"tensor data:     {human_bytes(data_bytes)}")
    print(f"header:          {human_bytes(header_bytes)}  (metadata: mostly the vocabulary and merges)")
    print(f"file:            {human_bytes(file_bytes)}")
    print(f"bits per weight: {8 * data_bytes / n_params:.2f}  over the whole model")
    """),
    md("""
    Why 4.5 to 5 bits for a "4-bit" model? Quantized types store weights in **blocks** that
    carry their own scale. A **Q4_1** block holds 32 weights in 20 bytes: a float16 scale
    `d`, a float16 minimum `m`, and 32 four-bit integers `q` (two per byte); each weight is
    `d * q + m`. So a Q4_1 weight costs 20 × 8 / 32 = **5.0 bits**. ggml's table of block
    layouts gives the same for each type found in the file:
    """),
    code("""
    rows = []
    for kind in kinds:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        measured = 8 * by_type[kind] / weights_by_type[kind]
        rows.append((kind, block, block_bytes, f"{8 * block_bytes / block:.3f}", f"{measured:.3f}", f"{weights_by_type[kind]:,}"))
    table(["type", "weights per block", "bytes per block", "bits/weight (layout)", "bits/weight (file)", "weights"], rows)
    """),
    md("""
    Decoding one block by hand shows the formula at work. The first block of
    `blk.0.ffn_down.weight`: read `d` and `m`, split each byte into its low and high four
    bits (the low halves are weights 0–15, the high halves 16–31), then compare with the
    `gguf` package's own dequantizer:
    """),
    code("""
    import numpy as np

    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    block = np.asarray(tensor.data).reshape(-1)[:20].view(np.uint8)  # the first 20 bytes
    d, m = block[:4].view(np.float16).astype(np.float32)
    q = np.concatenate([block[4:] & 0x0F, block[4:] >> 4])  # 32 integers 0..15
    by_hand = d * q + m

    library = gguf.quants.dequantize(np.asarray(tensor.data)[:1], tensor.tensor_type).reshape(-1)[:32]
    print(f"d={d:.6f} m={m:.6f}")
    print("q:      ", q[:8], "...")
    print("by hand:", np.round(by_hand[:4], 5), "...")
    print("gguf:   ", np.round(library[:4], 5), "...")
    print("identical:", np.array_equal(by_hand, library))
    """),
    md("""
    The same parameters stored in other types: the size follows directly from each
    type's bits per weight. (A real file is a little larger, as here, because some
    tensors keep a more precise type.) `part2/examples/docstring_example.py` is this
    arithmetic as a small documented module.
    """),
    code("""
    others = ["F32", "F16", "Q8_0", "Q6_K", "Q5_K", "Q4_1", "Q4_K", "Q3_K", "Q2_K"]
    sizes = {}
    for kind in others:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        sizes[kind] = n_params / block * block_bytes

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(others, [sizes[k] / MiB for k in others], color="tab:blue", label="all weights in that type")
    ax.bar(["this file"], [data_bytes / MiB], color="tab:orange", label=f"{spec.path.name} (tensor data)")
    ax.set_ylabel("MiB")
    ax.set_title(f"{n_params / 1e6:.0f}M parameters in each storage type")
    ax.legend()
    plt.show()
    """),
    md("""
    ## 4. The same file, two engines

    **llama.cpp** computes directly on the quantized blocks. It memory-maps the file, so
    the weights are read from the page cache and never copied. **transformers** reads the
    same GGUF, dequantizes every tensor to float32 (float16 on a GPU) and builds a PyTorch
    model: about 4 bytes per weight instead of ~5 bits.

    Both go through `llmlab.backends.load(spec, backend=...)`. For each engine we record
    this process's **resident memory** (RSS) before loading, after loading, after one
    greedy completion, and its peak while that happens (`llmlab.bench.peak_memory`
    samples it in a background thread).
    """),
    code("""
    process = psutil.Process()


    def rss() -> int:
        return process.memory_info().rss


    def load_and_measure(engine: str) -> dict:
        \"\"\"Load MODEL with one engine, complete PROMPT greedily, measure memory; then free it.\"\"\"
        gc.collect()
        before = rss()
        with bench.peak_memory() as peak:
            with bench.timer() as load_time:
                model = backends.load(spec, backend=engine, n_ctx=N_CTX)
                model.ensure_loaded()
            loaded = rss()
            reply = model.complete(PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        result = {
            "engine": engine,
            "load_s": load_time.seconds,
            "added_after_load": loaded - before,
            "added_after_generation": rss() - before,
            "added_peak": peak.peak_rss - before,
            "text": reply.text,
            "info": model.info(),
        }
        model.close()
        gc.collect()
        return result


    def report(r: dict) -> None:
        print(f"{r['engine']}: loaded in {r['load_s']:.1f} s")
        for key in ("added_after_load", "added_after_generation", "added_peak"):
            print(f"  {key.replace('_', ' '):<24}{human_bytes(r[key])}")
        print(f"  {PROMPT!r} -> {r['text']!r}")
    """),
    code("""
    llama = load_and_measure("llama.cpp")
    report(llama)
    """),
    md("""
    The transformers engine takes longer: it parses the file, converts the tokenizer, and
    dequantizes 272 tensors. Its progress bar shows the tensors as they are converted.
    """),
    code("""
    transformers_result = load_and_measure("transformers") if LOAD_TRANSFORMERS else None
    if transformers_result:
        report(transformers_result)
        tf_info = transformers_result["info"]
        print(f"  dtype {tf_info['dtype']}, {tf_info['parameters']:,} parameters, "
              f"weights in memory: {human_bytes(tf_info['memory_bytes'])}")
        same = transformers_result["text"] == llama["text"]
        print("same greedy completion as llama.cpp:", same)
    """),
    md("""
    Both engines load the **same weights**: transformers counts the same number of
    parameters as the GGUF tensor table (the tied embedding counted once), each
    dequantized exactly to `d * q + m`. Greedy completions usually agree; where they
    differ after a few tokens, it is arithmetic, not the weights: llama.cpp rounds the
    activations to 8 bits for its quantized dot products, PyTorch multiplies in float32.

    ## 5. The registry's estimate against the measurement

    The registry estimates the memory a GGUF model needs in llama.cpp, so that
    `registry.recommend()` can pick a model that fits this machine:

    `ram = weights (the file) + KV cache + compute buffer + runtime`

    - KV cache: keys and values, float16, for every layer and every position of the context,
    - compute buffer: the float32 logits of one 512-token micro-batch,
    - runtime: a fixed 48 MiB for llama.cpp's context, tokenizer tables and allocator.
    """),
    code("""
    weights = spec.size_bytes
    kv_cache = 2 * spec.n_layers * N_CTX * spec.n_kv_heads * spec.head_dim * 2
    compute = 4 * registry.N_UBATCH * spec.vocab_size
    runtime = registry.RUNTIME_BYTES
    estimate = registry.spec_ram_estimate(spec, n_ctx=N_CTX)
    assert weights + kv_cache + compute + runtime == estimate  # the same formula as the registry

    for name, value in [("weights", weights), ("KV cache", kv_cache), ("compute", compute), ("runtime", runtime)]:
        print(f"{name:<10}{human_bytes(value):>12}")
    print(f"{'estimate':<10}{human_bytes(estimate):>12}   (catalog value ram_bytes: {human_bytes(spec.ram_bytes)})")
    """),
    code("""
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom = 0
    for name, value, color in [("weights", weights, "tab:blue"), ("KV cache", kv_cache, "tab:orange"),
                               ("compute", compute, "tab:green"), ("runtime", runtime, "tab:gray")]:
        ax.bar("llama.cpp\\nestimate", value / MiB, bottom=bottom / MiB, color=color, label=name)
        bottom += value
    measured = {"llama.cpp\\nafter load": llama["added_after_load"],
                "llama.cpp\\nafter generation": llama["added_after_generation"],
                "llama.cpp\\npeak": llama["added_peak"]}
    hatched = dict(color="white", edgecolor="black", hatch="//")
    bars = ax.bar(list(measured), [v / MiB for v in measured.values()], label="measured: RSS added", **hatched)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    if transformers_result:
        fp32 = 4 * transformers_result["info"]["parameters"]
        ax.bar("transformers\\n4 B × parameters", fp32 / MiB, color="tab:purple", label="fp32 weights")
        tf_measured = {"transformers\\nafter load": transformers_result["added_after_load"],
                       "transformers\\npeak": transformers_result["added_peak"]}
        bars = ax.bar(list(tf_measured), [v / MiB for v in tf_measured.values()], **hatched)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"{spec.ref} at n_ctx={N_CTX}: estimated vs measured resident memory")
    ax.legend(fontsize=8, ncols=2)
    plt.xticks(fontsize=8)
    plt.show()

    print(f"llama.cpp: after load {human_bytes(llama['added_after_load'])}; "
          f"weights + KV cache alone: {human_bytes(weights + kv_cache)}")
    print(f"llama.cpp: measured peak / estimate = {llama['added_peak'] / estimate:.2f}")
    if transformers_result:
        print(f"transformers: measured peak / fp32 weights = {transformers_result['added_peak'] / fp32:.2f}")
    """),
    md("""
    How to read the chart:

    - **llama.cpp** stays below its estimate. After loading, the weights (the
      memory-mapped file, read in full) and the KV cache (cleared when the context is
      created, so resident at once for all `N_CTX` positions) are in memory, plus small
      buffers. The estimate's compute buffer is sized for the worst case, float32 logits
      for every token of a 512-token batch; generating text needs the last token's
      logits only, so most of it is never used, and the 48 MiB runtime allowance is
      generous. A safe upper bound is what `registry.recommend()` needs to pick a model
      that fits this machine.
    - **transformers** needs several times more: 4 bytes per weight instead of ~5 bits,
      plus the library, the tokenizer and PyTorch's allocator, and its peak is higher
      still while the tensors are dequantized. This is why the lab runs GGUF models with llama.cpp on a laptop, and
      why transformers' 8-bit and 4-bit options (bitsandbytes, notebook 07) exist.

    ## Summary

    | question | how to answer it |
    | --- | --- |
    | what is in a GGUF file? | `gguf.GGUFReader(path).fields` / `.tensors`; quick: `registry.read_gguf_info(path)` |
    | how many parameters? | sum of `tensor.n_elements` |
    | how many bits per weight? | `8 * tensor bytes / parameters`; per type: ggml's block layout `gguf.GGML_QUANT_SIZES` |
    | how much memory to run it? | `registry.spec_ram_estimate(spec, n_ctx)` (llama.cpp, full context) |
    | how much does it use now? | `psutil.Process().memory_info().rss`, `llmlab.bench.peak_memory()` |
    | which engine? | `backends.load(spec, backend="llama.cpp")` for GGUF on CPU; `"transformers"` for PyTorch |
    """),
]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    print(write(NAME, CELLS, ci_parameters={"MAX_TOKENS": 4, "SHOW_TENSORS": 5}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
