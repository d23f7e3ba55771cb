"""python scripts/build_notebooks/build_06_batch_processing.py

Writes the first version of notebooks/06_Batch_Processing.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 06_Batch_Processing.ipynb
"""

from __future__ import annotations

from nbtools import code, md, write

NAME = "06_Batch_Processing.ipynb"

CELLS = [
    md("""
    # 06 · Batch processing

    You have a file of prompts (tickets to classify, texts to summarise, questions to
    answer) and want every answer, as fast as this machine allows, without losing work if
    the run is stopped. This notebook

    1. explains **why decoding several sequences at once can be nearly free**, and what
       limits it on a small CPU;
    2. runs the prompts **one after another** through the llama.cpp backend (the baseline);
    3. builds **one batched decoding step by hand** with llama.cpp's `llama_batch`;
    4. runs the same prompts through **`llmlab.engine.Engine`** (continuous batching) and
       checks the answers are identical;
    5. measures **aggregate tokens/s against the number of parallel sequences** and plots it;
    6. runs a prompt file through **`part3/batch_process.py`**, kills nothing and resumes.
    """),
    md(
        "**Parameters.** CI runs this notebook with smaller values (see `ci_parameters` in its metadata)."
    ),
    code(
        """
        MODEL = "smollm2-135m-instruct"  # a chat model from the catalog
        N_PROMPTS = 16  # prompts in the comparison
        MAX_TOKENS = 32  # new tokens per prompt (greedy)
        PARALLEL_LEVELS = [1, 2, 4, 8]  # sequences decoded together, for the plot
        N_CTX = 512  # context window of each sequence
        """,
        "parameters",
    ),
    code("""
    import ctypes
    import json
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import llama_cpp
    import matplotlib.pyplot as plt
    import numpy as np

    from llmlab import backends, registry
    from llmlab.engine import Engine, Request
    from llmlab.settings import get_settings

    spec = registry.resolve(MODEL)
    threads = get_settings().threads
    topics = ["the sea", "bread", "bicycles", "winter", "bees", "a library", "volcanoes", "the moon",
              "trains", "gardening", "rain", "chess", "owls", "coffee", "mountains", "clocks"]
    chats = [[{"role": "user", "content": f"Write a short paragraph about {topics[i % len(topics)]}."}]
             for i in range(N_PROMPTS)]
    print(f"{spec.ref}: {spec.path.stat().st_size / 1e6:.0f} MB file, {threads} threads, {len(chats)} prompts")
    """),
    md("""
    ## 1. Why batching helps a memory-bound decoder, and where it stops

    To produce one token the model multiplies its input by **every weight matrix once**. For
    one sequence that is a matrix × *vector* product: each weight is read from memory,
    used for one multiply-add, and thrown away. The CPU spends its time waiting for memory,
    not computing.

    With *B* sequences the same step becomes a matrix × *matrix* product: each weight read
    from memory is used *B* times. Reading costs the same, arithmetic grows *B*-fold, and
    as long as the arithmetic is still cheaper than the reading, *B* tokens cost about as
    much time as one. The arithmetic intensity (FLOPs per byte read) tells where we are:
    """),
    code("""
    weight_bytes = spec.path.stat().st_size  # ~ what one decoding step reads
    flops_per_token = 2 * (spec.parameters or 135_000_000)  # one multiply-add per weight
    for batch in [1, 2, 4, 8, 16, 32]:
        print(f"{batch:3d} sequences: {batch * flops_per_token / weight_bytes:6.1f} FLOPs per byte of weights")
    """),
    md("""
    A laptop core does tens of FLOPs in the time it reads one byte from RAM, so at one
    sequence (about 2.5 FLOPs/byte) decoding *should* be far from compute-bound. Two things
    pull the other way on a small machine. The weights of this model are stored in 4-bit
    blocks, and every weight has to be unpacked and scaled before it is multiplied (several
    instructions per multiply-add); and a 135M-parameter model is small enough that much of
    it stays in the CPU's caches between steps. On a 2-core CPU a step of 8 sequences then
    costs several times a step of one, not the same: batching still wins, by less. The plot
    in section 5 shows what this machine does. Each extra sequence also costs its own
    **KV cache** (keys and values of its past tokens) and its own attention work.

    ## 2. The baseline: one prompt after another
    """),
    code("""
    model = backends.load(spec, backend="llama.cpp", n_ctx=N_CTX)
    model.chat(chats[0], max_tokens=2, temperature=0)  # load and warm up

    start = time.perf_counter()
    sequential = [model.chat(m, max_tokens=MAX_TOKENS, temperature=0) for m in chats]
    seconds = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r in sequential)
    loop_tps = tokens / seconds
    print(f"{tokens} tokens in {seconds:.1f} s = {loop_tps:.1f} tokens/s (one sequence at a time)")
    print(repr(sequential[0].text))
    """),
    md("""
    ## 3. One batched step, by hand

    llama.cpp's `llama_batch` is a list of tokens, each with a **sequence id** and a
    **position** in its own sequence. The KV cache keeps every sequence apart, so one
    `llama_decode` call can carry the next token of several unrelated conversations. Below:
    three prompts are prefilled (each on its own), then every step puts one token per
    sequence into a single batch and reads one row of logits per sequence.
    """),
    code("""
    lmodel = llama_cpp.llama_model_load_from_file(str(spec.path).encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(lmodel)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 3 * N_CTX, 3, False  # one KV stream per sequence
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = (  # the backend's attention kernel, so the numbers are the same
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if get_settings().flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = llama_cpp.llama_init_from_model(lmodel, params)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def decode(entries):
        # One llama_decode of (token, position, sequence id, want logits) entries.
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        assert llama_cpp.llama_decode(ctx, batch) == 0

    def logits_row(i):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))

    def tokenize(text):
        # Token ids of a rendered chat prompt (special tokens such as <|im_start|> parsed).
        data = text.encode()
        ids = (llama_cpp.llama_token * (len(data) + 8))()
        return list(ids[: llama_cpp.llama_tokenize(vocab, data, len(data), ids, len(ids), False, True)])

    prompts = [tokenize(model.apply_chat_template(m)) for m in chats[:3]]
    outputs = []
    for seq, ids in enumerate(prompts):  # prefill: a whole prompt per call
        decode([(t, pos, seq, pos == len(ids) - 1) for pos, t in enumerate(ids)])
        outputs.append([int(logits_row(len(ids) - 1).argmax())])
    for step in range(11):  # decode: one token of each sequence per call
        decode([(out[-1], len(ids) + len(out) - 1, seq, True) for seq, (ids, out) in enumerate(zip(prompts, outputs))])
        for seq, out in enumerate(outputs):
            out.append(int(logits_row(seq).argmax()))
    for out in outputs:
        print(repr(model.detokenize(out)))
    """),
    md("""
    Each line matches the first 12 tokens the backend produced one at a time (the attention
    kernel is the backend's, flash attention unless `LLMLAB_FLASH_ATTN=0`: a different
    kernel rounds differently and can flip a greedy choice):
    """),
    code("""
    hand = [model.detokenize(out) for out in outputs]
    print([s.text.startswith(h) or h.startswith(s.text) for s, h in zip(sequential, hand)])
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(lmodel)
    """),
    md("""
    ## 4. The engine: continuous batching

    `Engine` does this in a background thread, for any number of requests: up to `parallel`
    sequences decode together, a finished sequence's KV cells are cleared and the next
    waiting request takes its place at once (that is the "continuous" part), and each
    request has its own sampling settings, stop strings and token stream.

    Each sequence has its own KV stream, and prompts are prefilled one per call, so a
    prompt's numbers never depend on what runs beside it: greedy answers at 8 sequences
    are identical to the engine's answers one at a time, and to the backend's loop (same
    attention kernel).

    A finished sequence's KV cells stay behind as its slot's **prompt cache**: the next
    request placed in that slot keeps the prefix it shares with them and prefills only the
    rest. Every prompt here starts with the chat template's system prompt, so most of each
    prefill is skipped (llama-cpp-python's `Llama` does the same between consecutive calls,
    which is why the baseline loop was not paying for it either).
    """),
    code("""
    with Engine(spec, parallel=max(PARALLEL_LEVELS), n_ctx=N_CTX) as engine:
        engine.chat(chats[0], max_tokens=2, temperature=0)  # warm up
        start = time.perf_counter()
        handles = [engine.submit(Request.chat(m, max_tokens=MAX_TOKENS, temperature=0)) for m in chats]
        batched = [h.result() for h in handles]
        seconds = time.perf_counter() - start
        alone = [engine.chat(m, max_tokens=MAX_TOKENS, temperature=0) for m in chats]  # one at a time
    batched_tps = sum(r.usage.completion_tokens for r in batched) / seconds
    print(f"{batched_tps:.1f} tokens/s with {max(PARALLEL_LEVELS)} sequences per step "
          f"({batched_tps / loop_tps:.1f}x the loop)")
    print("same answers batched as alone:", [r.text for r in batched] == [r.text for r in alone])
    print("same answers as the backend's loop:", [r.text for r in batched] == [r.text for r in sequential])
    prompt_tokens = sum(r.usage.prompt_tokens for r in batched + alone)
    print(f"prompt tokens taken from the prefix cache: {engine.reused_prompt_tokens} of {prompt_tokens}")
    """),
    md("""
    Each handle can also be streamed while the others keep decoding (a server does this for
    every connected client), and cancelled, which frees its slot at the next step:
    """),
    code("""
    with Engine(spec, parallel=2, n_ctx=N_CTX) as engine:
        background = engine.submit(Request.chat(chats[1], max_tokens=MAX_TOKENS, temperature=0))
        streamed = engine.submit(Request.chat(chats[2], max_tokens=MAX_TOKENS, temperature=0))
        print("|".join(chunk.text for chunk in streamed.stream()))
        background.cancel()
        print("background:", background.result().finish_reason)
    """),
    md("## 5. Tokens per second against the number of parallel sequences"),
    code("""
    sweep = {}
    for parallel in PARALLEL_LEVELS:
        with Engine(spec, parallel=parallel, n_ctx=N_CTX) as engine:
            engine.chat(chats[0], max_tokens=2, temperature=0)
            start = time.perf_counter()
            results = engine.generate([Request.chat(m, max_tokens=MAX_TOKENS, temperature=0) for m in chats])
            sweep[parallel] = sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start)
        print(f"parallel={parallel}: {sweep[parallel]:6.1f} tokens/s")
    """),
    code("""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(list(sweep), list(sweep.values()), "o-", label="engine")
    ax.axhline(loop_tps, color="grey", ls="--", label="one-at-a-time loop")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sweep), [str(p) for p in sweep])
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"{spec.name}, {threads} threads, {N_PROMPTS} prompts x {MAX_TOKENS} tokens")
    ax.legend()
    plt.tight_layout()
    plt.show()
    """),
    md("""
    Aggregate throughput rises with the number of sequences as long as a step's cost is
    mostly reading the weights, which the sequences share; it flattens once the arithmetic
    per sequence (unpacking 4-bit weights, attention) is what the cores spend their time
    on, early on a 2-core CPU, much later on a GPU. Each *single* request gets slower as
    more run beside it; batching trades latency for throughput, which is the right trade
    for a file of prompts or a busy server.
    `make bench` measures the same thing on 32 prompts × 64 tokens (suite `batch`).

    ## 6. A prompt file, written as rows finish, resumable

    `part3/batch_process.py` reads `.jsonl`, `.csv` or `.txt`, runs the rows through the
    engine, writes one JSON line per row as soon as it finishes, and with `--resume` skips
    rows already written, so a run that was stopped continues where it was.
    """),
    code("""
    work = Path(tempfile.mkdtemp())
    (work / "tickets.jsonl").write_text(
        '{"id": "t1", "prompt": "My printer is out of ink."}\\n'
        '{"id": "t2", "prompt": "I cannot log in to my account."}\\n'
        '{"id": "t3", "prompt": oops}\\n'
        '{"id": "t4", "prompt": "The app crashes when I open settings."}\\n'
    )
    script = Path.cwd().parent / "part3" / "batch_process.py"
    cmd = [sys.executable, str(script), str(work / "tickets.jsonl"), "-o", str(work / "answers.jsonl"),
           "--system", "Reply with one short sentence.", "--template", "Support ticket: {prompt}",
           "--max-tokens", str(MAX_TOKENS), "--parallel", "4", "--n-ctx", str(N_CTX)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    print(run.stdout, run.stderr, "exit status", run.returncode)
    for line in (work / "answers.jsonl").read_text().splitlines():
        row = json.loads(line)
        print(row["id"], row["finish_reason"], repr(row["output"] or row["error"]))
    """),
    md("""
    The malformed line was reported with its line number and written as an error row; the
    run went on. Running again with `--resume` finds nothing left to do:
    """),
    code("""
    print(subprocess.run(cmd + ["--resume"], capture_output=True, text=True).stdout)
    """),
    md("""
    ## Where next

    - `python part3/batch_process.py --help` lists every option (`--column`, `--engine
      sequential`, `--temperature`, `--seed`...).
    - A server can share one `Engine` among all its clients: submitting is thread-safe,
      a full queue raises `QueueFullError`, and a client that disconnects cancels its handle.
    """),
]

if __name__ == "__main__":
    print(
        write(
            NAME, CELLS, ci_parameters={"N_PROMPTS": 4, "MAX_TOKENS": 8, "PARALLEL_LEVELS": [1, 2]}
        )
    )
