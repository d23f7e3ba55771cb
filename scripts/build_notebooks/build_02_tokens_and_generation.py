"""python scripts/build_notebooks/build_02_tokens_and_generation.py

Writes the first version of notebooks/02_Tokens_and_Generation.ipynb (without outputs).
Execute it afterwards: python scripts/run_notebooks.py 02_Tokens_and_Generation.ipynb
"""

from __future__ import annotations

import argparse

from nbtools import code, md, write

NAME = "02_Tokens_and_Generation.ipynb"

CELLS = [
    md("""
    # 02 · Tokens and generation

    A language model never sees text. It sees **token ids**, and for the next position it
    returns one score (**logit**) per entry of its vocabulary. Generating text is a loop:
    turn the scores into probabilities, pick a token, append it, repeat.

    This notebook builds each step by hand with NumPy on the real model's numbers, then
    shows the `llmlab` call that does the same:

    1. text → token ids → pieces, counting tokens, special tokens
    2. logits → probabilities for the next token
    3. temperature, top-k and top-p, by hand
    4. a decoding loop by hand (greedy and sampled), then `model.complete`
    5. stop tokens and stop strings
    6. chat templates: the exact prompt a chat model sees
    """),
    code(
        """
        PROMPT = "The capital of France is"  # a prompt with one clear answer
        STORY_PROMPT = "Once upon a time, there was a"  # a prompt with many good answers
        N_STEPS = 20  # tokens to generate in the decoding loops
        SEED = 0  # random seed for sampling
        TOP_N = 10  # bars in the probability plots
        """,
        "parameters",
    ),
    code("""
    import matplotlib.pyplot as plt
    import numpy as np

    from llmlab import backends

    model = backends.load(backend="llama.cpp")  # the default model: SmolLM2-135M-Instruct
    model.ensure_loaded()
    print(model.info()["model"], "| vocabulary:", model.vocab_size, "tokens")
    """),
    md("""
    ## 1. Text → token ids → pieces

    The tokenizer splits text into pieces from a fixed vocabulary (here 49,152 entries)
    and replaces each piece by its id. Common words are one piece; note the leading
    space that belongs to the piece (`' capital'`).
    """),
    code("""
    ids = model.tokenize(PROMPT)
    for token_id in ids:
        print(f"{token_id:>6}  {model.token_piece(token_id)!r}")
    """),
    md("Joining the pieces back (`detokenize`) gives the original text exactly:"),
    code("""
    # NBVAL_CHECK_OUTPUT
    print(model.detokenize(ids) == PROMPT)
    """),
    md("""
    **Counting tokens.** Context windows, prices and speeds are counted in tokens, not
    words or characters. Rare words, numbers, other languages and emoji take more tokens
    per character. `model.count_tokens(text)` is the one-call version of `len(tokenize(text))`.
    Pieces are really byte strings: an emoji is split into byte pieces that are not
    valid text on their own (shown as `�`) until they are joined again.
    """),
    code("""
    samples = [
        "Hello world",
        "hello world",
        "The Eiffel Tower is in Paris.",
        "1234567890",
        "antidisestablishmentarianism",
        "Der Eiffelturm steht in Paris.",
        "🙂🚀",
    ]
    print(f"{'text':34} chars tokens  pieces")
    for text in samples:
        pieces = [model.token_piece(i) for i in model.tokenize(text)]
        assert model.count_tokens(text) == len(pieces)
        print(f"{text!r:34} {len(text):5} {len(pieces):6}  {pieces}")
    """),
    md("""
    **Special tokens.** Some vocabulary entries are control tokens, not text: the
    end-of-sequence / end-of-turn tokens tell the engine to stop. SmolLM2 has two.
    Typing their name as text does *not* produce them: plain text is split into ordinary
    pieces, so a user cannot end the assistant's turn by typing `<|im_end|>`.
    """),
    code("""
    for token_id in model.eos_token_ids:
        print(f"end token {token_id}: {model.token_piece(token_id)!r}")
    typed = model.tokenize("<|im_end|>")
    print("typed as text:", typed, [model.token_piece(i) for i in typed])
    print("does this model add a BOS token at the start?", model.tokenize(PROMPT, add_bos=True) != ids)
    """),
    md("""
    ## 2. Logits → the next token

    `next_token_logits(ids)` runs the model over the ids and returns one float per
    vocabulary entry. The **softmax** turns them into probabilities:
    $p_i = e^{z_i} / \\sum_j e^{z_j}$ (subtracting the maximum first avoids overflow).
    """),
    code("""
    logits = model.next_token_logits(model.tokenize(PROMPT, add_bos=True))
    print(logits.shape, logits.dtype, f"min {logits.min():.1f}, max {logits.max():.1f}")


    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()


    probs = softmax(logits)
    print(f"sum of probabilities: {probs.sum():.4f}")
    """),
    code("""
    def plot_top(probs, title, n=TOP_N, ax=None):
        top = np.argsort(probs)[::-1][:n]
        ax = ax or plt.subplots(figsize=(7, 3))[1]
        ax.bar([repr(model.token_piece(i)) for i in top], probs[top], color="#4a9")
        ax.set_ylabel("probability")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
        return top


    top = plot_top(probs, f"next token after {PROMPT!r}")
    plt.tight_layout()
    plt.show()
    print("most likely:", repr(model.token_piece(top[0])), f"({probs[top[0]]:.1%})")
    """),
    md("""
    ## 3. Temperature, top-k and top-p by hand

    **Temperature** divides the logits before the softmax: $p_i \\propto e^{z_i/T}$.
    $T<1$ sharpens the distribution (safer, more repetitive), $T>1$ flattens it (more
    varied, more mistakes), $T \\to 0$ is greedy. We use the open-ended story prompt,
    where many continuations are reasonable.
    """),
    code("""
    story_logits = model.next_token_logits(model.tokenize(STORY_PROMPT, add_bos=True))
    temperatures = [0.3, 0.7, 1.0, 1.5]
    order = np.argsort(story_logits)[::-1][:TOP_N]  # the same tokens in every group of bars
    labels = [repr(model.token_piece(i)) for i in order]
    width = 0.8 / len(temperatures)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for k, t in enumerate(temperatures):
        p = softmax(story_logits / t)
        entropy = -(p * np.log(p + 1e-12)).sum()
        ax.bar(np.arange(TOP_N) + k * width, p[order], width, label=f"T={t} (entropy {entropy:.1f})")
    ax.set_xticks(np.arange(TOP_N) + 0.4 - width / 2, labels, rotation=60)
    ax.set_ylabel("probability")
    ax.set_title(f"next token after {STORY_PROMPT!r} at several temperatures")
    ax.legend()
    plt.tight_layout()
    plt.show()
    """),
    md("""
    **Top-k** keeps the $k$ most likely tokens and renormalizes. **Top-p** (nucleus)
    keeps the smallest set of most likely tokens whose probabilities add up to at least
    $p$: few tokens when the model is sure, many when it is not.
    """),
    code("""
    def top_k_filter(p, k):
        if k <= 0 or k >= len(p):
            return p
        out = np.zeros_like(p)
        keep = np.argsort(p)[::-1][:k]
        out[keep] = p[keep]
        return out / out.sum()


    def top_p_filter(p, top_p):
        if top_p >= 1.0:
            return p
        order = np.argsort(p)[::-1]
        cumulative = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cumulative, top_p)) + 1  # include the token that crosses top_p
        out = np.zeros_like(p)
        out[order[:n_keep]] = p[order[:n_keep]]
        return out / out.sum()


    p = softmax(story_logits)
    for top_p in (0.5, 0.9, 0.95):
        print(f"top-p {top_p}: keeps {np.count_nonzero(top_p_filter(p, top_p)):5} tokens "
              f"(for {PROMPT!r}: {np.count_nonzero(top_p_filter(probs, top_p))})")
    """),
    code("""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    shown = 50
    sorted_p = np.sort(p)[::-1][:shown]
    left.plot(np.arange(1, shown + 1), np.cumsum(sorted_p), marker=".", label=repr(STORY_PROMPT))
    left.plot(np.arange(1, shown + 1), np.cumsum(np.sort(probs)[::-1][:shown]), marker=".", label=repr(PROMPT))
    for top_p in (0.5, 0.9):
        left.axhline(top_p, color="grey", linestyle="--", linewidth=0.8)
    left.set_xlabel("number of most likely tokens kept")
    left.set_ylabel("cumulative probability")
    left.set_title("top-p: where the dashed line is crossed")
    left.legend(fontsize=8)
    right.bar(labels, p[order], color="#ccc", label="before (T=1)")
    right.bar(labels, top_k_filter(p, 3)[order], width=0.5, color="#4a9", label="after top-k = 3")
    right.set_ylabel("probability")
    right.set_title("top-k = 3: three tokens share all the mass")
    right.tick_params(axis="x", rotation=60)
    right.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    """),
    md("""
    ## 4. A decoding loop by hand

    One function picks the next token from logits: temperature 0 means the argmax
    (greedy), otherwise temperature → top-k → top-p → a random draw. The loop appends
    the chosen id and asks the model again, until an end token or `N_STEPS`.

    (This loop recomputes the whole sequence at every step. Real engines keep a **KV
    cache** of what they already computed, which is why `model.complete` is faster.)
    """),
    code("""
    def pick_next(logits, rng=None, temperature=1.0, top_k=0, top_p=1.0):
        if temperature == 0:
            return int(np.argmax(logits))
        p = top_p_filter(top_k_filter(softmax(logits / temperature), top_k), top_p)
        return int(rng.choice(len(p), p=p))


    def generate_by_hand(prompt, n_steps, **sampling):
        ids = model.tokenize(prompt, add_bos=True)
        new = []
        for _ in range(n_steps):
            token = pick_next(model.next_token_logits(ids + new), **sampling)
            if token in model.eos_token_ids:
                break
            new.append(token)
        return new


    greedy_ids = generate_by_hand(PROMPT, N_STEPS, temperature=0)
    greedy_text = model.detokenize(greedy_ids)
    print(repr(PROMPT + greedy_text))
    """),
    md(
        "Sampling gives a different story for each random seed (temperature 0.8, top-k 40, top-p 0.95):"
    ),
    code("""
    for offset in range(3):
        rng = np.random.default_rng(SEED + offset)
        new = generate_by_hand(STORY_PROMPT, N_STEPS, rng=rng, temperature=0.8, top_k=40, top_p=0.95)
        print(f"seed {SEED + offset}: {STORY_PROMPT + model.detokenize(new)!r}")
    """),
    md("""
    ### The same with `llmlab`

    `model.complete(prompt, temperature=0)` runs the same greedy loop inside llama.cpp,
    with a KV cache. It produces exactly the text our loop produced:
    """),
    code("""
    result = model.complete(PROMPT, max_tokens=N_STEPS, temperature=0)
    print(repr(PROMPT + result.text), "| finish reason:", result.finish_reason)
    print(f"{result.usage.completion_tokens} tokens at {result.timings.tokens_per_second:.1f} tokens/s")
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    print(result.text == greedy_text)
    """),
    md("""
    Sampling goes through llama.cpp's own random number generator, so the words differ
    from our NumPy draws, but a fixed `seed` makes each run repeatable:
    """),
    code("""
    params = dict(max_tokens=N_STEPS, temperature=0.8, top_k=40, top_p=0.95, seed=SEED)
    first = model.complete(STORY_PROMPT, **params).text
    again = model.complete(STORY_PROMPT, **params).text
    print(repr(STORY_PROMPT + first))
    print("same seed, same text:", first == again)
    """),
    md("""
    ## 5. Stop tokens and stop strings

    Generation ends in one of three ways: the model emits an **end token** (finish reason
    `stop`), the **length** limit is reached (`length`), or the text contains a **stop
    string** you asked for, which is cut off (`stop`). By hand, a stop string is just
    "cut the text where it first appears":
    """),
    code("""
    stopped = model.complete(PROMPT, max_tokens=N_STEPS, temperature=0, stop=["\\n"])
    print(repr(stopped.text), "| finish reason:", stopped.finish_reason)
    by_hand = greedy_text.split("\\n")[0]
    print(repr(by_hand))
    """),
    code("""
    # NBVAL_CHECK_OUTPUT
    print(stopped.text == by_hand)
    """),
    md("""
    ## 6. Chat templates

    A chat model was trained on conversations written in one exact format. The **chat
    template** (stored in the GGUF file) turns a list of messages into that text. For
    SmolLM2 each turn is `<|im_start|>role\\n…<|im_end|>`, and `add_generation_prompt`
    appends the opening of the assistant's turn so the model writes the reply. Note
    that this template adds a default system prompt when you give none.
    """),
    code("""
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    chat_prompt = model.apply_chat_template(conversation)
    print(chat_prompt)
    """),
    code("""
    without = model.apply_chat_template(conversation, add_generation_prompt=False)
    print("added by add_generation_prompt:", repr(chat_prompt[len(without):]))
    """),
    md("""
    `model.chat(messages)` applies the template, parses the control tokens in it as
    special tokens, and stops at the end-of-turn token `<|im_end|>`:
    """),
    code("""
    reply = model.chat(conversation, max_tokens=max(N_STEPS, 16), temperature=0)
    print(repr(reply.text), "| finish reason:", reply.finish_reason)
    print("prompt tokens:", reply.usage.prompt_tokens, "| reply tokens:", reply.usage.completion_tokens)
    model.close()
    """),
    md("""
    ## Summary

    | idea | by hand | llmlab |
    | --- | --- | --- |
    | text ↔ ids | pieces from the vocabulary | `model.tokenize`, `model.detokenize`, `model.count_tokens` |
    | next token | softmax of `next_token_logits` | (inside every engine) |
    | sampling | temperature → top-k → top-p → draw | `complete(..., temperature=, top_k=, top_p=, seed=)` |
    | greedy | argmax in a loop | `complete(..., temperature=0)` |
    | stopping | end token ids, cut at a stop string | `eos_token_ids`, `stop=[...]`, `finish_reason` |
    | chat format | the model's template | `apply_chat_template`, `chat` |
    """),
]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    print(write(NAME, CELLS, ci_parameters={"N_STEPS": 6, "TOP_N": 5}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
