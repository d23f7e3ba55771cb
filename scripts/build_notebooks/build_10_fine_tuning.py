"""python scripts/build_notebooks/build_10_fine_tuning.py

Writes the first version of notebooks/10_Fine_Tuning.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 10_Fine_Tuning.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "10_Fine_Tuning.ipynb"

CELLS = [
    md("""
    # 10 · Fine-tuning with LoRA: change the model, prove it changed

    Every lesson so far used the model as it ships. Here you change it. The task is small
    and checkable: given two short passages from the makerspace documents (`part3/data`),
    each labelled with its file name, answer a question with **one JSON object** that
    holds the answer copied from a passage and the file it came from:

        {"answer": "in the kitchen, above the sink", "source": "safety_rules.txt"}

    SmolLM2-135M-Instruct is told exactly that in its system prompt, and still answers in
    prose. A few minutes of LoRA training on 88 examples fix that on a laptop CPU. Steps:

    1. LoRA by hand: a low-rank update to one weight matrix, and what it costs in parameters
    2. the data, and what happens to a bad line
    3. the base model measured on the held-out split
    4. training the adapter (PEFT), with its loss curve
    5. the tuned model measured, plotted beside the base, replies side by side
    6. back to llama.cpp: a GGUF adapter on the unchanged base file, and a merged,
       quantized model registered as `smollm2-135m-instruct:json-qa`
    7. exercises with checks

    The command line does all of it in one go: `python part4/fine_tune.py`.
    """),
    code(
        """
        EPOCHS = 2  # passes over the 88 training examples
        MAX_STEPS = None  # stop after this many steps (None: every epoch)
        BATCH_SIZE = 4
        LEARNING_RATE = 1e-3
        RANK = 8  # LoRA rank r
        ALPHA = 16  # the update is scaled by ALPHA / RANK
        EVAL_LIMIT = None  # score only the first N held-out examples (None: all 22)
        MAX_TOKENS = 48  # reply length when scoring
        NAME = "json-qa"  # registered as smollm2-135m-instruct:<NAME>
        """,
        "parameters",
    ),
    code("""
    import json
    import tempfile
    import time
    from pathlib import Path

    import matplotlib.pyplot as plt
    import torch

    from llmlab import backends, registry
    from llmlab.finetune import data, evaluate, export_gguf, train
    from llmlab.settings import get_settings

    DATA = Path.cwd().parent / "part4" / "data"
    work = Path(tempfile.mkdtemp(prefix="finetune-"))  # checkpoints and the adapter go here
    torch.manual_seed(0)
    print("threads:", get_settings().threads, "| run folder:", work)
    """),
    md("""
    ## 1. LoRA by hand

    Fine-tuning all 135 million weights needs their gradients and two optimizer values
    for each: several times the model's memory, and slow on a CPU. LoRA (Hu et al., 2021)
    freezes every weight matrix `W` (`out × in`) and learns a *low-rank* change instead:

    `W' = W + (alpha / r) · B · A`, with `A` of shape `r × in` and `B` of shape `out × r`.

    `B` starts at zero, so at first the model is exactly the original; training moves only
    `A` and `B`. Take one real matrix, the query projection of the first layer:
    """),
    code("""
    base = train.load_base()  # the default GGUF in PyTorch, via the lab's cached checkpoint
    W = base.model.model.layers[0].self_attn.q_proj.weight.detach()
    out_dim, in_dim = W.shape
    A = torch.randn(RANK, in_dim) / in_dim**0.5  # random, as PEFT initializes it
    B = torch.zeros(out_dim, RANK)  # zero: no change yet
    print(f"W: {out_dim} x {in_dim} = {W.numel():,} weights, frozen")
    print(f"A: {RANK} x {in_dim}, B: {out_dim} x {RANK} = {A.numel() + B.numel():,} trainable "
          f"({(A.numel() + B.numel()) / W.numel():.1%} of W)")
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    x = torch.randn(3, in_dim)  # three token vectors going into the layer

    def lora_layer(x):
        return x @ W.T + (ALPHA / RANK) * (x @ A.T) @ B.T  # never builds the full-size update

    print("at the start the layer is unchanged:", torch.allclose(lora_layer(x), x @ W.T))
    B = torch.randn(out_dim, RANK) * 0.01  # what training would do: B moves away from zero
    update = (ALPHA / RANK) * B @ A
    print("rank of the update:", int(torch.linalg.matrix_rank(update)), "of", min(W.shape))
    print("same as merging it into W:", torch.allclose(lora_layer(x), x @ (W + update).T, atol=1e-5))
    """),
    md("""
    The update has rank `r` however big `W` is, and it can be merged into `W` after
    training, so the merged model is exactly as fast as the original. PEFT puts such a
    pair beside every chosen projection of every layer; all seven projections of the 30
    layers at rank 8:
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    model = train.add_lora(base.model, train.LoraSettings(rank=RANK, alpha=ALPHA))
    trainable, total = train.trainable_parameters(model)
    print(f"trainable: {trainable:,} of {total:,} ({trainable / total:.2%})")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    print(type(layer).__name__, "A:", tuple(layer.lora_A["default"].weight.shape),
          "B:", tuple(layer.lora_B["default"].weight.shape))
    """),
    md("""
    `add_lora` changed `base.model` in place: the backend's `chat` now runs through the
    LoRA layers, and `with model.disable_adapter():` switches them off, which is how the
    base model is measured below.

    ## 2. The data

    `part4/data/make_dataset.py` wrote both splits from facts copied out of the documents
    (see `part4/data/README.md`). Each line is a chat in the usual `messages` format; the
    assistant turn is what the model learns.
    """),
    code("""
    train_split = data.read_split(DATA / "train.jsonl")
    heldout_split = data.read_split(DATA / "heldout.jsonl")
    example = heldout_split.examples[0]
    print(len(train_split.examples), "training and", len(heldout_split.examples), "held-out examples\\n")
    for message in example.messages:
        print(f"[{message['role']}] {message['content']}\\n")
    """),
    md("""
    A line that is not such a chat is skipped and reported with its number (`strict=True`
    refuses the whole file instead); an example longer than the token limit is left out,
    since a cut-off reply would teach the model to stop mid-sentence:
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    bad = work / "bad.jsonl"
    bad.write_text((DATA / "train.jsonl").read_text().splitlines()[0] + "\\n{oops\\n"
                   + '{"messages": [{"role": "user", "content": "hi"}]}\\n')
    split = data.read_split(bad)
    print(len(split.examples), "usable;", "skipped:")
    print(data.describe_problems(split.problems))
    tokens, too_long = data.tokenize(train_split.examples, base.tokenizer, max_length=256)
    print(f"{len(tokens)} training examples fit in 256 tokens, {len(too_long)} do not;",
          "the longest has", max(len(t.input_ids) for t in tokens), "tokens")
    """),
    md("""
    ## 3. The base model on the held-out split

    The metric (`llmlab.finetune.evaluate`): a reply is **valid** if it is one JSON object
    with exactly the keys `answer` and `source`; it is **exact** if it is valid, names the
    right file, and its answer equals the gold one after lower-casing and dropping
    punctuation. `answer_f1` gives partial credit for overlapping words.
    """),
    code("""
    examples = heldout_split.examples[:EVAL_LIMIT]
    start = time.perf_counter()
    with model.disable_adapter():
        before = evaluate.run(base, examples, label="base", max_tokens=MAX_TOKENS)
    print(f"{len(examples)} replies in {time.perf_counter() - start:.0f} s")
    print(evaluate.table([before]))
    for row in before.rows[:3]:
        print(f"\\nQ: {row.question}\\ngold: {row.gold}\\nbase: {row.reply}")
    """),
    md("""
    ## 4. Training

    `train.train` runs the loop: batches in an order fixed by the seed, AdamW on the LoRA
    weights only, the loss on the reply tokens only, a checkpoint at the end of every epoch
    in `work/checkpoints`. Interrupt the kernel (or press Ctrl-C in the terminal version)
    and the running step finishes, a checkpoint is saved, and running the cell again
    continues from it with nothing lost.
    """),
    code("""
    config = train.TrainConfig(epochs=EPOCHS, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                               seed=0, max_steps=MAX_STEPS)
    start = time.perf_counter()
    result = train.train(model, tokens, work, config, pad_id=base.tokenizer.pad_token_id)
    train_seconds = time.perf_counter() - start
    print(f"{result.steps} steps in {train_seconds:.0f} s; checkpoints:",
          [p.name for p in result.checkpoints])
    """),
    code("""
    per_epoch = train.steps_per_epoch(len(tokens), BATCH_SIZE)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, len(result.losses) + 1), result.losses, ".-")
    for epoch in range(1, EPOCHS):
        if epoch * per_epoch < len(result.losses):
            ax.axvline(epoch * per_epoch + 0.5, color="grey", ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the reply tokens")
    ax.set_title(f"LoRA rank {RANK}, {len(tokens)} examples, batch {BATCH_SIZE}")
    plt.tight_layout()
    plt.show()
    """),
    md("""
    ## 5. The tuned model, measured
    """),
    code("""
    after = evaluate.run(base, examples, label="tuned", max_tokens=MAX_TOKENS)
    print(evaluate.table([before, after]))
    metrics = list(before.summary())
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.38
    for i, report in enumerate((before, after)):
        values = [report.summary()[m] for m in metrics]
        ax.bar([j + (i - 0.5) * width for j in range(len(metrics))], values, width, label=report.label)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of {len(examples)} held-out examples")
    ax.legend()
    plt.tight_layout()
    plt.show()
    """),
    code("""
    for b, a in list(zip(before.rows, after.rows))[:4]:
        print(f"Q: {b.question}\\n  gold:  {b.gold}\\n  base:  {b.reply[:110]}\\n  tuned: {a.reply}\\n")
    """),
    md("""
    Most of the gain is the format: the tuned model always answers with the JSON object
    and names a file. Which span it copies is harder for a 135M model; the wrong ones
    are usually near misses (`answer_f1` counts them partly).

    Save the adapter: the PEFT folder (`adapter_model.safetensors`, `adapter_config.json`)
    plus `llmlab-adapter.json`, which records the base model so that the lab refuses the
    adapter on any other.
    """),
    code("""
    adapter = train.save_adapter(model, work / "adapter", base=base.spec, losses=result.losses,
                                 scores={"base": before.summary(), "tuned": after.summary()})
    print(sorted(p.name for p in adapter.iterdir()))
    base.close()
    """),
    md("""
    ## 6. Back to llama.cpp, two ways

    **A GGUF adapter** keeps the base file as it is; llama.cpp adds `B·A` at run time.
    The tensor names are llama.cpp's (`blk.0.attn_q.weight.lora_a`), and the rows of `B`
    for the query and key projections are reordered the way `convert_hf_to_gguf.py`
    reorders those weights (llama.cpp's RoPE pairs neighbouring values, Hugging Face's
    pairs the two halves of each head).

    **A merged model** adds the update to the base file's dequantized weights, keeps its
    metadata, tokenizer and chat template, and is quantized with `llmlab.quantize` to Q8_0
    (nearly lossless, see notebook 07) and registered, so every program can use it.
    """),
    code("""
    spec = registry.resolve()
    lora_file = export_gguf.write_adapter(adapter, spec.path, work / f"{NAME}.lora.gguf")
    merged = export_gguf.export_merged(adapter, NAME, quant="q8_0")
    print("adapter:", lora_file.name, f"{lora_file.stat().st_size / 2**20:.1f} MiB")
    print("merged: ", merged.ref, merged.quantization, f"{merged.size_bytes / 2**20:.1f} MiB",
          "sha256", merged.sha256[:16], "...")
    """),
    code("""
    reports = [before, after]
    for label, model_cpp in [
        ("llama.cpp + adapter", backends.load(spec.ref, backend="llama.cpp", lora=str(lora_file))),
        (f"llama.cpp {merged.ref}", backends.load(merged.ref, backend="llama.cpp")),
    ]:
        reports.append(evaluate.run(model_cpp, examples, label=label, max_tokens=MAX_TOKENS))
        model_cpp.close()
    print(evaluate.table(reports))
    for report in reports[2:]:
        print(f"{report.label}: the same reply as the tuned transformers model "
              f"on {evaluate.agreement(report, after):.0%} of the prompts")
    """),
    code("""
    differ = [(a, r) for a, r in zip(after.rows, reports[3].rows) if a.reply != r.reply]
    for a, r in differ[:3]:
        print(f"Q: {a.question}\\n  transformers: {a.reply}\\n  merged Q8_0:  {r.reply}\\n")
    print(len(differ), "of", len(after.rows), "replies differ")
    """),
    md("""
    Where replies differ, the three are not the same arithmetic: transformers runs fp32
    weights dequantized from Q4_1; llama.cpp runs the Q4_1 file itself (its kernels round
    each activation row to 8 bits first) with the fp32 adapter on top; the merged file adds
    the update in fp32, stores it as F16 and then rounds it to Q8_0. Greedy decoding turns a
    tiny difference in the scores of two close candidates into a different token, and from
    there a different reply; the metrics above show how much that matters (the integration
    test `tests/integration/test_fine_tune.py` checks that the next-token scores of all
    three agree closely, and that they would not without the row reordering).

    The merged model is an ordinary catalog entry now:

        python part3/simple_chat.py --model smollm2-135m-instruct:json-qa
        python part3/batch_process.py prompts.txt -o answers.jsonl --model smollm2-135m-instruct:json-qa
        python part5/model_registry.py list
    """),
    md("""
    ## 7. Exercises

    Each cell holds a worked solution followed by checks; change the solution and rerun.

    **Exercise 1.** LoRA's cost grows linearly with the rank. Compute, without PEFT, how
    many trainable parameters rank 16 on all seven projections of all 30 layers gives
    (each projection `out × in` adds `r · (in + out)`), and compare with rank 8 above.
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    hidden, inter, kv = 576, 1536, 3 * 64  # hidden size, MLP width, key/value width
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q k v o
              (inter, hidden), (inter, hidden), (hidden, inter)]  # gate up down
    rank16 = 30 * sum(16 * (i + o) for o, i in shapes)
    print(f"rank 16: {rank16:,} trainable parameters")
    assert rank16 == 2 * trainable, "twice the rank, twice the parameters"
    """),
    md("""
    **Exercise 2.** Check the merge by hand: read the query projection of the last layer
    from the base GGUF and from the merged F16 file, and show that their difference is
    `alpha / r · B · A` with `B`'s rows in llama.cpp's order.
    """),
    code("""
    import gguf
    import numpy as np

    def weight(path, name):
        reader = registry._header_reader_class()(str(path), "r")
        tensor = next(t for t in reader.tensors if t.name == name)
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)

    name = "blk.29.attn_q.weight"
    f16 = next(Path(merged.path).parent.glob("*-F16.gguf"))
    difference = weight(f16, name) - weight(spec.path, name)
    expected = export_gguf.merged_updates(adapter, spec.path)[name]
    print(f"largest update {np.abs(expected).max():.4f}, largest mismatch {np.abs(difference - expected).max():.5f}")
    assert np.abs(difference - expected).max() < 0.01 * np.abs(expected).max() + 1e-3  # F16 rounding
    """),
    md("""
    **Exercise 3.** An adapter belongs to one base model. Register the base file under
    another name and try to load the adapter on it: the lab refuses it and names both.
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    from llmlab.finetune.adapters import AdapterMismatchError

    other = work / "other.gguf"
    other.symlink_to(spec.path)
    registry.add(other, name="some-other-model")
    try:
        backends.load("some-other-model", backend="llama.cpp", lora=str(lora_file))
        refused = None
    except AdapterMismatchError as exc:
        refused = str(exc)
    print(refused.replace(str(work), "<work>"))
    registry.remove("some-other-model")
    assert refused and "smollm2-135m-instruct" in refused and "some-other-model" in refused
    """),
    md("""
    ## What to remember

    - LoRA learns a rank-`r` change beside each frozen matrix: under 2% of the parameters
      here, fast enough for a CPU, and mergeable afterwards at no cost at run time.
    - Measure before and after on examples the model never trained on, with a metric the
      task defines. Here the format went from never right to almost always right.
    - Getting back to llama.cpp is bookkeeping that has to be exact: tensor names, the
      query/key row order, the scale `alpha / r`, the base file's tokenizer and template.
    - Next: `python part4/fine_tune.py --help` (resume after Ctrl-C, `--last-layers` for a
      cheaper backward pass, `--fresh`), and `part4/README.md`.
    """),
]

CI_PARAMETERS = {"MAX_STEPS": 2, "EVAL_LIMIT": 3, "MAX_TOKENS": 24, "NAME": "json-qa-ci"}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[2]).parse_args(argv)
    print(write(NAME, CELLS, CI_PARAMETERS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
