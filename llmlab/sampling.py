"""Picking the next token with llama.cpp's own sampler chain, one sampler per sequence::

    from llmlab.sampling import SlotSampler
    with SlotSampler(GenerationParams(temperature=0.7, seed=1)) as sampler:
        token = sampler.sample(ctx, -1)   # from the logits of the last decoded token
        sampler.accept(token)             # the repeat penalty (and a grammar) move on
        sampler.sample_logits(logits)     # or from one row of logits (NumPy), no model needed

The chain is the one llama-cpp-python's ``Llama._init_sampler`` builds (and so the one the
llama.cpp backend samples with), in llama.cpp's order (``common/sampling.cpp``)::

    repeat penalty -> top-k -> top-p -> temperature -> draw (seeded)      temperature > 0
    repeat penalty -> greedy (argmax)                                     temperature = 0

So top-k and top-p cut on the model's own probabilities, before temperature reshapes what
is left. With the same seed and settings a reply is token for token the one
``backends.load(..., backend="llama.cpp")`` samples. The stages ``Llama`` adds that do
nothing at the lab's settings (typical-p 1.0, min-p 0.0, which the backend passes, and
frequency/presence penalties 0) are left out; they change neither the tokens nor the
random draws.

Two differences from ``Llama``, both where llama.cpp's server (``common_sampler``) does
the same:

- A grammar is not a link of the chain. Checking all ~49k tokens against a grammar costs
  about half a decode step of SmolLM2-135M, so the sampler draws from the chain first and
  asks the grammar about that one token; only if the grammar refuses it are the forbidden
  tokens masked and a second draw made. Greedy picks the same token either way; sampled
  replies are only the grammar's tokens but not always ``Llama``'s draws (its grammar
  comes before top-k, so top-k/top-p cut among allowed tokens only, and a refused first
  draw uses up one random number). ``grammar_first=True`` masks every step before the
  chain, exactly as ``Llama`` does, at that cost.
- ``sample`` does not accept the token: the caller checks it first (an end-of-generation
  token ends the sequence) and calls :meth:`accept`, as llama.cpp's server does.
  The repeat penalty counts accepted tokens only, the last :data:`PENALTY_LAST_N` of them
  (``Llama``'s window); ``Llama`` never accepts the prompt's tokens, so neither does the
  engine (llama.cpp's server does; ``accept`` them to get that).

:class:`Grammar` is the grammar part on its own (``allows`` one token, ``constrain`` a
row of logits); the transformers backend masks its logits with it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from llmlab.backends.base import GenerationParams

# llama.cpp's repeat-penalty window: llama-cpp-python's default ``last_n_tokens_size``.
PENALTY_LAST_N = 64

# llama.cpp's ``llama_token_data``: token id, its logit, its probability (12 bytes, packed).
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class TokenArray:
    """llama.cpp's ``llama_token_data_array`` over a NumPy buffer, reused from step to step."""

    def __init__(self, size: int):
        import llama_cpp

        self._ll = llama_cpp
        self.ids = np.arange(size, dtype=np.int32)
        self.candidates = np.zeros(size, dtype=TOKEN_DATA)
        self.array = llama_cpp.llama_token_data_array(
            data=self.candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=size,
            selected=-1,
            sorted=False,
        )

    def fill(self, logits: np.ndarray | float, ids: np.ndarray | int | None = None) -> None:
        """Every token (or ``ids``) with its logit, unsorted, nothing selected."""
        self.candidates["id"] = self.ids if ids is None else ids  # samplers sort in place
        self.candidates["logit"] = logits
        self.candidates["p"] = 0.0
        self.array.size, self.array.selected, self.array.sorted = len(self.ids), -1, False

    def apply(self, sampler: Any) -> None:
        """Run one llama.cpp sampler (or chain) over the array."""
        self._ll.llama_sampler_apply(sampler, ctypes.byref(self.array))

    @property
    def selected(self) -> int:
        """The token the last sampler picked."""
        return int(self.candidates["id"][self.array.selected])


class Grammar:
    """llama.cpp's grammar sampler for one sequence: which tokens a GBNF grammar allows next.

    Checking all ~49k tokens costs about half a decode step of SmolLM2-135M, so a sampler
    asks :meth:`allows` about the one token it drew and masks the vocabulary
    (:meth:`mask`, or :meth:`constrain` on a row of logits) only when it must.

    Raises:
        ValueError: llama.cpp could not parse ``gbnf``.
    """

    def __init__(self, vocab: Any, gbnf: str):
        import llama_cpp

        self._ll = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise ValueError(
                "llama.cpp could not parse the grammar (GBNF with a rule named 'root' is needed)"
            )
        self._one = TokenArray(1)
        self._all: TokenArray | None = None  # for constrain, sized by the first row

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (one candidate checked, not the vocabulary)."""
        self._one.fill(0.0, ids=token)
        self.mask(self._one)
        return bool(np.isfinite(self._one.candidates["logit"][0]))

    def mask(self, tokens: TokenArray) -> None:
        """Set the logit of every token the grammar forbids here to -inf, in place."""
        tokens.apply(self._sampler)

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids here set to -inf (a new array)."""
        if self._all is None or len(self._all.ids) != len(logits):
            self._all = TokenArray(len(logits))
        self._all.fill(logits)
        self.mask(self._all)
        return self._all.candidates["logit"].copy()

    def accept(self, token: int) -> None:
        """Advance the grammar past ``token``."""
        self._ll.llama_sampler_accept(self._sampler, token)

    def reset(self) -> None:
        """Back to the grammar's first rule."""
        self._ll.llama_sampler_reset(self._sampler)

    def free(self) -> None:
        """Release llama.cpp's sampler (safe to call twice)."""
        if self._sampler:
            self._ll.llama_sampler_free(self._sampler)
            self._sampler = None


class SlotSampler:
    """llama.cpp's sampler chain for one sequence: see the module docstring.

    Args:
        params: temperature, top_k, top_p, repeat_penalty and seed (``None``: a random seed).
        grammar: GBNF text with a rule ``root``; only tokens it allows are sampled.
        vocab: the model's ``llama_vocab`` pointer (``llama_model_get_vocab``); a grammar
            needs it to know each token's text.
        grammar_first: mask the vocabulary with the grammar before every draw, as
            llama-cpp-python's ``Llama`` does (the same draws, slower), instead of only
            when the grammar refuses the first draw.

    Raises:
        ValueError: llama.cpp could not parse ``grammar``, or it came without ``vocab``.
    """

    def __init__(
        self,
        params: GenerationParams,
        grammar: str | None = None,
        *,
        vocab: Any = None,
        grammar_first: bool = False,
    ):
        import llama_cpp

        self._ll = ll = llama_cpp
        self.params = params
        self.grammar_first = grammar_first
        self._grammar: Grammar | None = None
        if grammar is not None:
            if vocab is None:
                raise ValueError("a grammar needs the model's vocab: SlotSampler(..., vocab=...)")
            self._grammar = Grammar(vocab, grammar)
        # Plain greedy (no penalty, no grammar) is the first largest logit, which is what
        # llama.cpp's greedy sampler picks; argmax skips copying 49k logits into its array.
        self._argmax = params.temperature <= 0 and params.repeat_penalty == 1.0 and not grammar
        self._chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        for stage in self._stages(params):
            ll.llama_sampler_chain_add(self._chain, stage)  # the chain owns and frees it
        self._tokens: TokenArray | None = None  # sized by the first row of logits

    def _stages(self, params: GenerationParams) -> list[Any]:
        """The chain's samplers in llama.cpp's order (``Llama._init_sampler``'s)."""
        ll = self._ll
        stages = []
        if params.repeat_penalty != 1.0:
            stages.append(
                # n_vocab (0 here) is read only when llama.cpp samples inside the graph;
                # this chain always runs on the CPU (llama_sampler_apply).
                ll.llama_sampler_init_penalties(0, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0)
            )
        if params.temperature <= 0:
            return [*stages, ll.llama_sampler_init_greedy()]
        seed = ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
        return [
            *stages,
            ll.llama_sampler_init_top_k(params.top_k),  # 0 keeps every token
            ll.llama_sampler_init_top_p(params.top_p, 1),  # 1.0 keeps every token
            ll.llama_sampler_init_temp(params.temperature),
            ll.llama_sampler_init_dist(seed),
        ]

    # --- drawing -------------------------------------------------------------------

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits of output ``index`` of the last ``llama_decode``
        on ``ctx`` (``-1``: the last one). Call :meth:`accept` with it if the sequence goes on."""
        self._check_open()
        ll = self._ll
        n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(ll.llama_get_model(ctx)))
        row = ll.llama_get_logits_ith(ctx, index)
        return self.sample_logits(np.ctypeslib.as_array(row, shape=(n_vocab,)))

    def sample_logits(self, logits: np.ndarray) -> int:
        """The next token from one row of logits (the model's raw scores, one per token)."""
        self._check_open()
        if self._argmax:
            return int(np.argmax(logits))
        grammar = self._grammar
        token = self._draw(logits, grammar if self.grammar_first else None)
        if grammar is not None and not self.grammar_first and not grammar.allows(token):
            token = self._draw(logits, grammar)  # llama.cpp's server resamples the same way
        return token

    def _draw(self, logits: np.ndarray, grammar: Grammar | None) -> int:
        """Run the chain over the whole vocabulary (masked by ``grammar`` first, if given)."""
        if self._tokens is None or len(self._tokens.ids) != len(logits):
            self._tokens = TokenArray(len(logits))  # reused: 49k tokens every step
        tokens = self._tokens
        tokens.fill(logits)
        if grammar is not None:
            grammar.mask(tokens)
        tokens.apply(self._chain)
        return tokens.selected

    # --- state ---------------------------------------------------------------------

    def accept(self, token: int) -> None:
        """Record ``token`` as the sequence's next one: the grammar moves past it and the
        repeat penalty counts it."""
        self._check_open()
        if self._grammar is not None:
            self._grammar.accept(token)
        self._ll.llama_sampler_accept(self._chain, token)

    def reset(self) -> None:
        """Start over: the grammar at its first rule, no penalized tokens, the random draws
        from the seed again (a seeded sampler then repeats its tokens)."""
        self._check_open()
        if self._grammar is not None:
            self._grammar.reset()
        self._ll.llama_sampler_reset(self._chain)

    def free(self) -> None:
        """Release llama.cpp's samplers (safe to call twice)."""
        if self._grammar is not None:
            self._grammar.free()
        if self._chain:
            self._ll.llama_sampler_free(self._chain)
        self._grammar = self._chain = None

    def _check_open(self) -> None:
        if not self._chain:
            raise RuntimeError("this sampler was freed; make a new SlotSampler")

    def __enter__(self) -> SlotSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()
