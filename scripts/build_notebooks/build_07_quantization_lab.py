"""python scripts/build_notebooks/build_07_quantization_lab.py

Writes the first version of notebooks/07_Quantization_Lab.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 07_Quantization_Lab.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "07_Quantization_Lab.ipynb"

CELLS = [
    md("""
    # 07 · Quantization lab: size, speed and quality

    A model's weights are numbers. Stored as 16-bit floats, SmolLM2-135M takes 258 MiB;
    stored with 4 bits each it takes about a quarter of that, loads faster, and decodes
    faster because every generated token has to read all the weights from memory. The
    price is precision. This lab measures that trade-off on the real model:

    1. quantization by hand: blocks, scales and rounding, and what each bit buys
    2. a full-precision GGUF file from the model that ships with the lab
    3. Q8_0 … Q2_K versions made with llama.cpp's own quantizer
    4. registering them, so every program can use `smollm2-135m-instruct:q4_k_m`
    5. size, load time, speed, memory and quality of each, in a table and plots
    6. the same questions for PyTorch: fp32, dynamic int8, bitsandbytes int8 and nf4

    Quality is measured on `llmlab/data/heldout.txt`, prose written for this lab so that
    no model has seen it in training.
    """),
    code(
        """
        VARIANTS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]  # llama.cpp versions
        PPL_TOKENS = 256  # held-out tokens scored for perplexity
        N_CTX = 256  # perplexity window (tokens)
        DECODE_TOKENS = 32  # tokens generated per answer (speed and quality by eye)
        PROMPT = "What is the capital of France? Answer in one sentence."
        TORCH_VARIANTS = ["fp32", "dynamic int8", "bnb int8", "bnb nf4"]  # the PyTorch side
        """,
        "parameters",
    ),
    code("""
    import warnings

    import matplotlib.pyplot as plt
    import numpy as np

    from llmlab import backends, quantize, registry
    from llmlab.bench import timer
    from llmlab.hardware import human_bytes
    from llmlab.perplexity import reference
    from llmlab.settings import get_settings

    base = registry.resolve()  # the default model: SmolLM2-135M-Instruct, Q4_1
    text = quantize.heldout_text()
    print(base.ref, base.quantization, human_bytes(base.size_bytes), "|", base.path.name)
    print("threads:", get_settings().threads)
    print(f"held-out text: {len(text.split())} words")
    """),
    md("""
    ## 1. Quantization by hand

    llama.cpp's formats cut each row of a weight matrix into **blocks** (32 values for the
    classic types, 256 for the "k-quants"). Each block stores one scale `d` (and for some
    types an offset) plus one small integer per weight: `w ≈ d · q`. With `b` bits the
    integers run from `-(2^(b-1)-1)` to `2^(b-1)-1`, and the scale is chosen so the block's
    largest weight just fits. Here is that scheme on one real weight matrix, for 8 down to
    2 bits:
    """),
    code("""
    import gguf

    reader = registry._header_reader_class()(str(base.path), "r")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    print(tensor.name, weights.shape, "stored as", tensor.tensor_type.name)


    def quantize_blocks(w, bits, block=32):
        \"\"\"Symmetric absmax quantization: one 16-bit scale per block, b-bit integers.\"\"\"
        blocks = w.reshape(-1, block)
        top = 2 ** (bits - 1) - 1
        scale = np.abs(blocks).max(axis=1, keepdims=True) / top
        q = np.round(blocks / np.where(scale == 0, 1, scale)).clip(-top, top)
        return (q * scale.astype(np.float16).astype(np.float32)).reshape(w.shape)


    bits = [8, 6, 5, 4, 3, 2]
    errors = [np.sqrt(np.mean((quantize_blocks(weights, b) - weights) ** 2)) for b in bits]
    for b, e in zip(bits, errors):
        print(f"{b} bits: RMS error {e:.2e}  ({e / weights.std():.1%} of the weights' spread)")
    """),
    md("""
    Each bit removed roughly doubles the error. 8-bit blocks with a 16-bit scale are
    exactly llama.cpp's **Q8_0** type, so the `gguf` package's reference implementation
    gives the same numbers (a handful differ by one step, where a value falls exactly
    halfway and the two round differently):
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    q8 = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    roundtrip = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    same = np.mean(roundtrip == quantize_blocks(weights, 8))
    print("same as by hand for more than 99.9% of the weights:", same > 0.999)
    print(f"bytes per weight: {q8.nbytes / weights.size:.4f} (32 int8 + one f16 scale per block)")
    """),
    code("""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(bits, errors, "o-")
    ax.set(xlabel="bits per weight", ylabel="RMS error", title=f"{tensor.name}, blocks of 32")
    ax.invert_xaxis()
    plt.show()
    """),
    md("""
    ## 2. A full-precision file

    Published GGUF files are quantized from a 16-bit (or 32-bit) file. The lab ships only a
    Q4_1 file, so `quantize.build` first **dequantizes** every tensor with the `gguf`
    package and writes it back with `gguf.GGUFWriter` (matrices as F16, norms as F32),
    copying every metadata key: architecture, tokenizer vocabulary and merges, chat
    template. This `f16` file holds exactly the Q4_1 weights, so it is the *reference*
    here: no variant can be better than the original Q4_1 model, only closer to it or
    further away. Files are cached under `$LLMLAB_HOME/models/`, so a re-run is instant.
    """),
    code("""
    with timer() as took:
        paths = quantize.build(["f16"])
    full = paths["f16"]
    print(f"{full.name}: {human_bytes(full.stat().st_size)} ({took.seconds:.1f} s)")
    print(f"{base.path.name}: {human_bytes(base.size_bytes)}")
    """),
    md("""
    ## 3. llama.cpp's quantizer

    `quantize.build` calls `llama_model_quantize` (the library behind the `llama-quantize`
    tool) once per type. The `_M` "mixes" keep a few sensitive tensors (attention values,
    half of the feed-forward down projections) at higher precision.
    """),
    code("""
    with timer() as took:
        paths = quantize.build(VARIANTS)
    print(f"{len(paths)} files in {took.seconds:.1f} s")
    for tag, path in paths.items():
        print(f"{tag:<8}{human_bytes(path.stat().st_size):>10}  {path.name}")
    """),
    md("""
    **What llama.cpp actually did.** The k-quants (Q6_K … Q2_K) work on super-blocks of
    256 values, but SmolLM2's hidden size is 576 = 2.25 × 256. Every matrix whose rows
    are 576 long cannot use them, and llama.cpp falls back to a classic 32-value type
    (the `llama-quantize` tool warns for each tensor and ends with "N of 272 tensor(s)
    required fallback quantization"; the lab silences that log). Counting the tensor types
    in each file shows the real recipe:
    """),
    code("""
    for tag, path in paths.items():
        kinds = quantize.tensor_types(path)
        print(f"{tag:<8}", ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
    """),
    md("""
    Only the feed-forward down projections (rows of 1536 = 6 × 256) get real k-quants; the
    rest become Q8_0, Q5_1, Q5_0 or Q4_0. So on this model Q4_K_M and Q5_K_M differ in
    little more than Q5_0 vs Q5_1, and "Q2_K" is mostly Q4_0: file sizes shrink much less
    than the names promise. Larger models (hidden sizes 2048, 4096 …) do not have this
    problem.

    ## 4. Registering the versions

    `quantize.register` adds each file to your catalog (`$LLMLAB_HOME/models.yaml`) as
    `smollm2-135m-instruct:<tag>`, with its size and sha256. From then on every program
    can use them by name (the same as `python -m llmlab.quantize` on the command line).
    """),
    code("""
    specs = quantize.register(paths)
    for tag, spec in specs.items():
        print(f"{spec.ref:<30} {spec.quantization:<8} sha256 {spec.sha256[:12]}…")
    print("\\ntry:  python part3/simple_chat.py --model smollm2-135m-instruct:q4_k_m")
    """),
    md("""
    ## 5. Size, speed, memory and quality

    For each version: file size, load time, decode speed and peak memory while answering
    `PROMPT` greedily, and two quality figures on the held-out text:

    - **perplexity** (lower is better): `exp` of the average surprise per token;
    - **KL divergence** from the `f16` reference: how far each next-token distribution
      moved (0 = identical), with **top-1**, how often the most likely token is unchanged.

    Perplexity on a few hundred tokens is noisy: a small weight change can make the model
    luckier on this particular text. KL divergence compares the two models on the same
    positions, so it sees small damage that perplexity hides.
    """),
    code("""
    ref = reference(paths["f16"], text, n_ctx=N_CTX, max_tokens=PPL_TOKENS)
    rows = quantize.measure_variants(
        paths, text=text, prompt=PROMPT, max_tokens=DECODE_TOKENS,
        n_ctx=N_CTX, ppl_tokens=PPL_TOKENS, reference=ref,
    )
    print(f"{len(ref.tokens) - 1} tokens scored, window {N_CTX}\\n")
    print(quantize.table(rows))
    """),
    code("""
    size = [r.size_bytes / 2**20 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, values, label in [
        (axes[0], [r.perplexity for r in rows], "perplexity (lower is better)"),
        (axes[1], [max(r.kl, 1e-6) for r in rows], "KL divergence from f16"),
        (axes[2], [r.tokens_per_second for r in rows], "decode tokens/s"),
    ]:
        ax.plot(size, values, "o")
        for r, x, y in zip(rows, size, values):
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="file size (MiB)", ylabel=label)
    axes[1].set_yscale("log")
    fig.suptitle("llama.cpp versions of SmolLM2-135M")
    fig.tight_layout()
    plt.show()
    """),
    md("""
    **More bits, better quality?** Mostly, and KL divergence shows it clearly. But on this
    model Q4_K_M comes out *closer* to the reference than Q5_K_M. The difference between
    them is mostly Q5_0 vs Q5_1 for the 576-wide matrices, and these weights are not
    arbitrary numbers: they already sit on the Q4_1 grid the model shipped with.
    Re-quantizing them, the symmetric Q5_0 grid happens to fit better than Q5_1's:
    """),
    code("""
    for kind in ("Q5_0", "Q5_1"):
        qtype = gguf.GGMLQuantizationType[kind]
        back = gguf.quants.dequantize(gguf.quants.quantize(weights, qtype), qtype)
        print(f"{kind}: RMS error {np.sqrt(np.mean((back - weights) ** 2)):.3e}")
    """),
    md("""
    The lesson is general: quantize from the best weights you have (the original 16-bit
    model, when you can get it), and measure, because a format's name is only a promise
    about bits, not about error on *your* weights.
    """),
    md("""
    ## 6. The PyTorch side

    transformers can load the same GGUF file (it dequantizes it to fp32). Three ways to
    make it smaller:

    - **dynamic int8** (`torch.ao.quantization.quantize_dynamic`): every `nn.Linear` gets
      int8 weights with one scale per matrix; activations are quantized on the fly. CPU
      only, no extra package. (PyTorch is moving this API to the `torchao` package; it
      still works and warns.)
    - **bitsandbytes int8** (LLM.int8): int8 weights, with outlier features kept in 16 bits.
    - **bitsandbytes nf4**: 4-bit "normal float" blocks of 64 with one scale each, the
      format behind QLoRA.

    bitsandbytes was written for CUDA GPUs; recent versions also run on CPU, slowly. The
    *size* column here is the bytes of the weights in memory (tied tensors counted once),
    and *peak* includes the fp32 model that dynamic int8 and bitsandbytes start from.
    """),
    code("""
    import logging

    import torch

    warnings.filterwarnings("ignore", category=UserWarning)  # torch.ao deprecation notices
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a casting notice per layer call


    def dynamic_int8():
        model = backends.load(backend="transformers")
        model.ensure_loaded()
        model.model = torch.ao.quantization.quantize_dynamic(
            model.model, {torch.nn.Linear}, dtype=torch.qint8
        )
        return model


    LOADERS = {
        "fp32": lambda: backends.load(backend="transformers"),
        "dynamic int8": dynamic_int8,
        "bnb int8": lambda: backends.load(backend="transformers", quantization="8bit"),
        "bnb nf4": lambda: backends.load(backend="transformers", quantization="4bit"),
    }


    def weight_bytes(module) -> int:
        \"\"\"Bytes of a module's weights as stored (int8 and packed 4-bit included, shared once).\"\"\"
        seen, total = set(), 0
        stack = list(module.state_dict().values())
        while stack:
            value = stack.pop()
            if isinstance(value, (tuple, list)):
                stack.extend(value)
            elif isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        return total
    """),
    code("""
    torch_rows, sizes = [], {}
    for label in TORCH_VARIANTS:

        def load(label=label):
            model = LOADERS[label]()
            model.ensure_loaded()
            sizes[label] = weight_bytes(model.model)
            return model

        try:
            row = quantize.measure(
                label, load, size_bytes=0, text=text, prompt=PROMPT, max_tokens=DECODE_TOKENS,
                n_ctx=N_CTX, ppl_tokens=PPL_TOKENS, reference=ref,
            )
        except Exception as exc:  # e.g. bitsandbytes without a usable CPU or GPU kernel
            print(f"{label}: could not run here ({type(exc).__name__}: {exc})")
            continue
        row.size_bytes = sizes[label]
        torch_rows.append(row)
    print(quantize.table(torch_rows))
    """),
    md("""
    Two checks and two lessons in this table:

    - transformers **fp32** runs the very weights of the llama.cpp `f16` file, so their
      perplexities agree and the KL divergence between them is about zero: the two
      engines, and the perplexity code, agree with each other.
    - **8 bits are not all alike.** Dynamic int8 has one scale for a whole matrix and
      also rounds the activations to 8 bits; a few large values then squeeze every other
      weight onto a handful of levels. bitsandbytes int8 keeps those outlier features in
      16 bits and stays close to fp32, like llama.cpp's Q8_0 with a scale per 32 weights.
    - nf4 (4 bits, blocks of 64) loses more than llama.cpp's 4- and 5-bit files, which
      keep sensitive tensors at higher precision.

    ## Where quality breaks

    The same question, answered greedily (always the most likely token) by every version.
    Greedy decoding makes the answers repeatable, so any difference comes from the weights.
    """),
    code("""
    print(f"Q: {PROMPT}\\n")
    for r in rows + torch_rows:
        print(f"{r.label:>13}: {r.answer}")
    """),
    md("""
    ## What to take away

    - Quantization is rounding in blocks: each bit removed roughly doubles the error of a
      weight, and how much of that reaches the output depends on which tensors lose bits.
    - **Measure on your model.** This model's 576-wide matrices forced llama.cpp onto
      fallback types, so the names overstate the savings: Q2_K is only about a sixth
      smaller than Q4_K_M here, while on a 7B model it is about a third smaller.
    - Perplexity on a short text has noise of a few percent: adjacent versions can swap
      places (Q8_0 and Q6_K did). KL divergence against the reference measures how far
      each version moved, and it exposed the one real inversion (Q5_K_M vs Q4_K_M).
    - Simple factual answers survive heavy quantization; the first to break are longer,
      looser answers (the 2-bit file rambles, nf4 drifts into another language). Test
      the tasks you care about, not just one question.
    - llama.cpp's formats come with fast kernels for every CPU; PyTorch's dynamic int8 and
      bitsandbytes save memory but, on a CPU, not necessarily time. Notebook 08 compares
      the engines head to head.

    The registered versions stay in your catalog:
    `python part5/model_registry.py list` shows them, and
    `python part3/simple_chat.py --model smollm2-135m-instruct:q2_k` lets you chat with
    the smallest one.
    """),
]

CI_PARAMETERS = {
    "VARIANTS": ["f16", "q8_0", "q4_k_m", "q2_k"],
    "PPL_TOKENS": 96,
    "N_CTX": 96,
    "DECODE_TOKENS": 12,
    "TORCH_VARIANTS": ["dynamic int8"],
}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[2]).parse_args(argv)
    print(write(NAME, CELLS, CI_PARAMETERS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
