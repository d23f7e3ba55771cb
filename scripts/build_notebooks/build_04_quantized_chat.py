"""python scripts/build_notebooks/build_04_quantized_chat.py

Writes the first version of notebooks/04_Quantized_Chat.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 04_Quantized_Chat.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "04_Quantized_Chat.ipynb"

CELLS = [
    md("""
    # 04 · Quantized chat

    A chat program is a loop around a model that only ever continues text. This notebook

    1. builds a **chat loop by hand** on the llama.cpp engine: the chat template, the
       history, the stop tokens;
    2. shows **`ChatSession`**, which does the same plus streaming, a context budget,
       speed figures and transcripts (it is what `part3/simple_chat.py` runs);
    3. asks **the same question through two engines**: the 4-bit GGUF file run by
       llama.cpp, and the same file loaded into PyTorch as 32-bit floats;
    4. ends with a **chat box** you can use right here in JupyterLab.

    The model is SmolLM2-135M-Instruct in **Q4_1**: each block of 32 weights is stored as
    4-bit integers plus a scale and a minimum, about 5 bits per weight instead of 32. That is
    what "quantized" means here: a ~100 MB file instead of ~540 MB, and less memory to read
    per token, which is what limits decoding speed on a CPU.
    """),
    md(
        "**Parameters.** CI runs this notebook with smaller values (see `ci_parameters` in its metadata)."
    ),
    code(
        """
        MODEL = "smollm2-135m-instruct"  # a chat model from the catalog
        N_CTX = 1024  # context window, in tokens
        HAND_TOKENS = 16  # reply length of the hand-made loop (it recomputes every step)
        MAX_TOKENS = 48  # reply length for ChatSession and the comparison
        COMPARE_BACKEND = "transformers"  # the second engine for section 3 ("" skips it)
        """,
        "parameters",
    ),
    code("""
    import json
    import re
    import tempfile
    from pathlib import Path

    import numpy as np

    from llmlab import backends, registry
    from llmlab.chat import ChatSession

    spec = registry.resolve(MODEL)
    model = backends.load(spec, backend="llama.cpp", n_ctx=N_CTX)
    model.ensure_loaded()
    print(spec.ref, "|", spec.quantization, "|", f"{spec.path.stat().st_size / 1e6:.0f} MB on disk")
    print({k: model.info()[k] for k in ("backend", "context_length", "threads", "device")})
    """),
    md("""
    ## 1. A chat loop by hand

    **The history** is a list of messages. **The template** stored in the GGUF file turns it
    into the one text the model was trained on. For SmolLM2 every message is wrapped in
    `<|im_start|>role` … `<|im_end|>`, and a default system prompt is added when there is
    none. The text ends by opening the assistant's turn, so the most likely continuation is
    the reply.
    """),
    code("""
    history = [{"role": "user", "content": "My name is Ada. Say hello to me."}]
    prompt = model.apply_chat_template(history)
    print(prompt)
    """),
    md("""
    The markers are **control tokens**: one id each. Tokenizing the prompt as plain text
    would cut `<|im_start|>` into several ordinary pieces (that is deliberate: a user who
    types `<|im_end|>` must not be able to end the assistant's turn). So the loop encodes
    the prompt itself: control tokens by their ids, the text in between as plain text.
    In SmolLM2's vocabulary the control tokens are the first few ids.
    """),
    code("""
    CONTROL = {model.token_piece(i): i for i in range(32) if re.fullmatch(r"<\\|\\w+\\|>", model.token_piece(i))}
    print(CONTROL)


    def encode_chat(text):
        \"\"\"Token ids of a rendered template: control tokens as single ids, the rest as text.\"\"\"
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, CONTROL)) + ")", text):
            ids += [CONTROL[part]] if part in CONTROL else model.tokenize(part) if part else []
        return ids


    prompt_ids = encode_chat(prompt)
    print(len(prompt_ids), "tokens as the model sees them;", len(model.tokenize(prompt)), "if read as plain text")
    """),
    md("""
    **The stop tokens** end the reply: the model writes `<|im_end|>` when its turn is over.
    The loop below is greedy decoding (always the most likely token, as in notebook 02):
    predict, append, stop at a stop token or at the length limit.
    """),
    code("""
    STOP = set(model.stop_token_ids)
    print({model.token_piece(t): t for t in STOP})


    def reply_by_hand(history, max_new=HAND_TOKENS):
        ids = encode_chat(model.apply_chat_template(history))
        new = []
        for _ in range(max_new):
            token = int(np.argmax(model.next_token_logits(ids + new)))
            if token in STOP:
                break
            new.append(token)
        return model.detokenize(new)


    answer = reply_by_hand(history)
    print(answer)
    """),
    md("""
    **A second turn**: append the reply to the history, then the new question. The model
    has no memory of its own: everything it "remembers" is in the prompt we rebuild each
    time.
    """),
    code("""
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "What is my name?"}]
    print(reply_by_hand(history))
    print(len(encode_chat(model.apply_chat_template(history))), "prompt tokens now")
    """),
    md("""
    This loop works, but it is slow (each step recomputes the whole prompt: llama.cpp keeps a
    KV cache so that only the new token is computed), it prints nothing until the end, and
    the history grows until it no longer fits in the context window.

    ## 2. `ChatSession`

    `llmlab.chat.ChatSession` keeps the history and the system prompt, counts every
    message's tokens with the model's tokenizer, streams the reply, and records speed
    figures for each reply.
    """),
    code("""
    session = ChatSession(model, params={"temperature": 0, "max_tokens": MAX_TOKENS})
    for chunk in session.stream("My name is Ada. Say hello to me."):
        print(chunk.text, end="", flush=True)
    print()
    for chunk in session.stream("What is my name?"):
        print(chunk.text, end="", flush=True)
    print("\\n\\nfirst reply starts like the hand-made one:", session.messages[1]["content"].startswith(answer))
    """),
    code("""
    last = session.last_result
    print("finish reason:       ", last.finish_reason)
    print("prompt tokens:       ", last.usage.prompt_tokens)
    print("completion tokens:   ", last.usage.completion_tokens)
    print(f"time to first token:  {last.timings.time_to_first_token * 1000:.0f} ms")
    print(f"decode speed:         {last.timings.tokens_per_second:.1f} tokens/s")
    for m in session.messages:
        print(f"{m['role']:>9} {m['tokens']:3d} tokens  {m['content'][:60]!r}")
    """),
    md("""
    **The context budget.** Before each reply the session checks that the prompt plus the
    reply budget (`max_tokens`) fits in the context window. If not, it drops the oldest
    turns (a question and its answer), never the system prompt and never the newest
    question, and says what went in `session.last_dropped`. Asking for a reply budget
    close to the whole window shows it. The reply is then stopped after a few pieces, as
    Ctrl-C does in the chat script: the partial reply is kept, marked `interrupted`.
    """),
    code("""
    print(session.prompt_tokens(), "prompt tokens in the history; context", session.context_length)
    chunks = session.stream("And what is your name?", max_tokens=N_CTX - 100)
    print("dropped:", [(m["role"], m["content"][:40]) for m in session.last_dropped])
    for i, chunk in enumerate(chunks):
        print(chunk.text, end="")
        if i == 4:
            break
    chunks.close()
    print("\\nkept:   ", [(m["role"], m["content"][:40], m.get("interrupted", False)) for m in session.messages])
    """),
    md("""
    **Transcripts.** A session saves to JSON (messages with token counts, model, parameters,
    and each reply's usage and timings) and loads back, so a chat can be resumed later:
    `python part3/simple_chat.py --history chat.json` does exactly that.
    """),
    code("""
    path = session.save(Path(tempfile.mkdtemp()) / "chat.json")
    data = json.loads(path.read_text())
    print({k: data[k] for k in ("format", "model", "backend")}, data["parameters"])
    print(json.dumps(data["messages"][1], indent=1)[:400])
    resumed = ChatSession.from_file(path, model)
    print(len(resumed.messages), "messages resumed; same prompt:", resumed.prompt_tokens() == session.prompt_tokens())
    """),
    md("""
    ## 3. The same question, two engines

    The same GGUF file can also be loaded by Hugging Face transformers, which **dequantizes**
    it: PyTorch runs the model in 32-bit floats. Same weights (up to the 4-bit rounding),
    same template, same greedy decoding, different numbers inside. Compare the replies,
    the speed and the memory.
    """),
    code("""
    from llmlab.bench import peak_memory, timer

    QUESTION = "Explain in two sentences why the sky is blue."
    engines = ["llama.cpp"] + ([COMPARE_BACKEND] if COMPARE_BACKEND else [])
    results = {}
    for engine in engines:
        other = backends.load(spec, backend=engine, n_ctx=N_CTX)  # a fresh copy: load time and memory
        with peak_memory() as mem, timer() as load:
            other.ensure_loaded()
        chat = ChatSession(other, params={"temperature": 0, "max_tokens": MAX_TOKENS})
        reply = chat.send(QUESTION)
        results[engine] = {"reply": reply, "load s": load.seconds, "memory MB": mem.added / 1e6, "dtype": other.info()["dtype"]}
        other.close()
    for engine, r in results.items():
        print(f"--- {engine} ({r['dtype']}): {r['reply'].usage.completion_tokens} tokens")
        print(r["reply"].text, "\\n")
    """),
    code("""
    import matplotlib.pyplot as plt

    names = list(results)
    speeds = [results[n]["reply"].timings.tokens_per_second for n in names]
    ttfts = [results[n]["reply"].timings.time_to_first_token * 1000 for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.bar(names, speeds, color=["tab:blue", "tab:orange"][: len(names)])
    a.set_title("decode speed (tokens/s, higher is better)")
    b.bar(names, ttfts, color=["tab:blue", "tab:orange"][: len(names)])
    b.set_title("time to first token (ms, lower is better)")
    fig.tight_layout()
    for n in names:
        r = results[n]
        print(f"{n:>12}: load {r['load s']:.1f} s, +{r['memory MB']:.0f} MB while loading, "
              f"{r['reply'].timings.tokens_per_second:.1f} tok/s")
    if len(names) == 2:
        same = results[names[0]]["reply"].text == results[names[1]]["reply"].text
        print("identical replies:", same)
    """),
    md("""
    What to look for: the 4-bit file in llama.cpp loads in a fraction of a second and needs
    far less memory than fp32 PyTorch; on an idle machine it also decodes faster. llama.cpp
    uses every core and busy-waits between steps, so when other programs compete for the
    CPU (as when these outputs were recorded, on a busy 2-core machine) it slows down more
    than PyTorch: rerun the cell to see your machine's figures. The replies often start the same and then
    drift apart: greedy decoding follows the single most likely token, and small numeric
    differences (4-bit rounding, different kernels) change which token wins when two are
    close. Quantization error shows up as *different*, not necessarily *worse*, text;
    notebook 07 measures quality properly.

    ## 4. A chat box

    `llmlab.chat_widget.ChatBox` wraps a `ChatSession` in ipywidgets: type a question and
    press Enter (or Send); the reply streams into the box; Reset forgets the conversation.
    It works in JupyterLab with the lab's kernel (`make lab`).
    """),
    code("""
    from llmlab.chat_widget import ChatBox

    box = ChatBox(ChatSession(model, system="You are a friendly cooking assistant.", params={"max_tokens": MAX_TOKENS}))
    box.widget
    """),
    md("The box can also be driven from code; this is what pressing Enter does:"),
    code("""
    print(box.send("What can I make with eggs and rice?"))
    print(box.status.value)
    """),
    md("""
    ## Summary

    | idea | by hand | llmlab |
    | --- | --- | --- |
    | chat format | `apply_chat_template` + control-token ids | `ChatSession.stream(text)` |
    | memory of the chat | re-send the whole history each turn | `session.messages`, `system` |
    | ending a reply | stop at `<|im_end|>` | the engine's stop tokens, `finish_reason` |
    | context limit | (not handled) | `fit_context`, `last_dropped` |
    | speed | (not measured) | `last_result.timings`, `usage` |
    | resume later | (lost) | `save`, `ChatSession.from_file` |

    In a terminal: `python part3/simple_chat.py` (see `part3/README.md`).
    """),
]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    print(write(NAME, CELLS, ci_parameters={"HAND_TOKENS": 8, "MAX_TOKENS": 16}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
