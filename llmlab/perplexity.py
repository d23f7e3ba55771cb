"""Perplexity: how surprised a model is by a text, the standard quality check for quantization.

``perplexity = exp(mean over tokens of -log p(token | the tokens before it))``. A model
that always put probability 1 on the right token scores 1; one that guessed uniformly
among V tokens scores V. Lower is better; only figures measured with the same tokenizer,
text and window are comparable::

    from llmlab.perplexity import perplexity, evaluate
    perplexity("smollm2-135m-instruct:q4_k_m", text)            # a catalog name, path or backend
    evaluate(model, text, n_ctx=512, stride=256, max_tokens=1024).perplexity

Long texts are scored with a sliding window of ``n_ctx`` tokens moved by ``stride``:
the first window scores all its tokens, each later one ends ``stride`` tokens further and
scores only those new tokens, so every token after the first is scored exactly once, with
at least ``n_ctx - stride`` tokens of context once the text is that long. Each window is one
forward pass that returns logits for every position.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmlab.settings import get_settings


class Scorer(Protocol):
    """What perplexity needs from an engine: its tokenizer and logits for every position."""

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]: ...

    def logits(self, ids: list[int]) -> np.ndarray:
        """``(len(ids), vocab)`` scores: row ``i`` predicts the token after ``ids[i]``."""
        ...


@dataclass
class PerplexityResult:
    """One evaluation: the perplexity, its mean negative log-likelihood (nats per token),
    how many tokens were scored, in how many windows, how long it took, and, against a
    reference, the mean KL divergence and the top-1 agreement."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seconds: float
    kl: float | None = None
    top1: float | None = None


def windows(n_tokens: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """Plan the sliding windows as ``(begin, end, first_target)`` triples.

    The window ``tokens[begin:end]`` is evaluated and the targets ``first_target .. end-1``
    are scored (target ``t`` by the logits at position ``t - 1``). Every target from 1 to
    ``n_tokens - 1`` is scored exactly once.

    >>> windows(10, n_ctx=4, stride=2)
    [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    """
    if not 0 < stride < n_ctx:
        raise ValueError(f"need 0 < stride < n_ctx (got stride {stride}, n_ctx {n_ctx})")
    end = min(n_ctx, n_tokens)
    plan = [(0, end, 1)] if n_tokens >= 2 else []
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        plan.append((max(0, end - n_ctx), end, first))
    return plan


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities from scores, row by row, computed stably in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-probability of each target under softmax(logits row), in nats.

    >>> float(token_nll(np.zeros((1, 4)), np.array([2]))[0]) == math.log(4)
    True
    """
    return -log_softmax(logits)[np.arange(len(targets)), targets]


@dataclass
class Reference:
    """A reference model's log-probabilities on a text, to compare other versions with."""

    tokens: list[int]
    plan: list[tuple[int, int, int]]
    logprobs: list[np.ndarray]  # per window, the rows that score its targets (float32)

    @property
    def perplexity(self) -> float:
        """The reference model's own perplexity on these tokens."""
        nll = -sum(
            float(rows[np.arange(end - first), self.tokens[first:end]].sum())
            for rows, (_, end, first) in zip(self.logprobs, self.plan, strict=True)
        )
        return math.exp(nll / (len(self.tokens) - 1))


def reference(
    model: Any,
    text: str,
    n_ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> Reference:
    """Score ``text`` once with the reference ``model`` (e.g. the full-precision file) and
    keep its distributions, for :func:`evaluate`'s ``reference`` argument."""
    scorer = as_scorer(model, n_ctx)
    tokens = _tokens(scorer, text, max_tokens)
    plan = windows(len(tokens), n_ctx, stride or n_ctx // 2)
    logprobs = [
        log_softmax(scorer.logits(tokens[b:e])[f - 1 - b : e - 1 - b]).astype(np.float32)
        for b, e, f in plan
    ]
    _close(scorer, model)
    return Reference(tokens, plan, logprobs)


def _tokens(scorer: Scorer, text: str, max_tokens: int | None) -> list[int]:
    tokens = scorer.tokenize(text, add_bos=True)[: max_tokens or None]
    if len(tokens) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    return tokens


def _close(scorer: Any, model: Any) -> None:
    if scorer is not model and hasattr(scorer, "close"):
        scorer.close()  # a scorer made here for a path or backend: free its context now


def evaluate(
    model: Any,
    text: str,
    n_ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    reference: Reference | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with the full details (see :func:`perplexity`).

    With a ``reference`` (from :func:`reference`) the same tokens and windows are scored,
    and the result also has ``kl``: the mean KL divergence from the reference's next-token
    distribution to this model's (nats per token; 0 = identical), and ``top1``: how often
    both pick the same most likely token. These see small quantization damage that
    perplexity on a short text hides in its noise.
    """
    scorer = as_scorer(model, n_ctx)
    if reference is not None:
        tokens, plan = reference.tokens, reference.plan
    else:
        tokens = _tokens(scorer, text, max_tokens)
        plan = windows(len(tokens), n_ctx, stride or n_ctx // 2)
    start = time.perf_counter()
    total = kl = agree = 0.0
    for index, (begin, end, first) in enumerate(plan):
        rows = log_softmax(scorer.logits(tokens[begin:end])[first - 1 - begin : end - 1 - begin])
        total -= float(rows[np.arange(end - first), tokens[first:end]].sum())
        if reference is not None:
            ref = reference.logprobs[index].astype(np.float64)
            kl += float((np.exp(ref) * (ref - rows)).sum())
            agree += float((ref.argmax(axis=1) == rows.argmax(axis=1)).sum())
    _close(scorer, model)
    scored = len(tokens) - 1
    nll = total / scored
    return PerplexityResult(
        math.exp(nll),
        nll,
        scored,
        len(plan),
        time.perf_counter() - start,
        max(kl / scored, 0.0) if reference is not None else None,  # rounding can give -0.0
        agree / scored if reference is not None else None,
    )


def compare(
    reference_model: Any,
    model: Any,
    text: str,
    n_ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """:func:`evaluate` ``model`` against ``reference_model`` without keeping the reference's
    distributions: both score each window in turn, so memory holds one window of each
    (:func:`reference` keeps every scored row, 200 KB per token with a 49k vocabulary).
    ``kl`` and ``top1`` are those of ``model`` from ``reference_model``."""
    ref = as_scorer(reference_model, n_ctx)
    scorer = as_scorer(model, n_ctx)
    tokens = _tokens(ref, text, max_tokens)
    plan = windows(len(tokens), n_ctx, stride or n_ctx // 2)
    start = time.perf_counter()
    total = kl = agree = 0.0
    for begin, end, first in plan:
        window = tokens[begin:end]
        expected = log_softmax(ref.logits(window)[first - 1 - begin : end - 1 - begin])
        rows = log_softmax(scorer.logits(window)[first - 1 - begin : end - 1 - begin])
        total -= float(rows[np.arange(end - first), tokens[first:end]].sum())
        kl += float((np.exp(expected) * (expected - rows)).sum())
        agree += float((expected.argmax(axis=1) == rows.argmax(axis=1)).sum())
    _close(ref, reference_model)
    _close(scorer, model)
    scored = len(tokens) - 1
    return PerplexityResult(
        math.exp(total / scored),
        total / scored,
        scored,
        len(plan),
        time.perf_counter() - start,
        max(kl / scored, 0.0),
        agree / scored,
    )


def perplexity(
    model: Any,
    text: str,
    n_ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
) -> float:
    """Perplexity of ``model`` on ``text`` (lower is better).

    Args:
        model: a GGUF path, a catalog name (``name:tag``), a ModelSpec, a llama.cpp or
            transformers backend from ``llmlab.backends.load``, or any :class:`Scorer`.
        text: the text to score; ``max_tokens`` keeps only its first tokens.
        n_ctx: window length in tokens.
        stride: new tokens scored per window after the first (default ``n_ctx // 2``;
            at most ``n_ctx - 1``). Smaller strides give every token more context and
            cost more windows.
    """
    return evaluate(model, text, n_ctx, stride, max_tokens).perplexity


# --------------------------------------------------------------------------- engines


class LlamaCppScorer:
    """A GGUF file in its own llama.cpp context that keeps the logits of every position."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        import llama_cpp

        settings = get_settings()
        offload = settings.device != "cpu" and llama_cpp.llama_supports_gpu_offload()
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,  # the whole window in one decode call
            n_ubatch=n_ctx,
            n_threads=threads or settings.threads,
            n_threads_batch=threads or settings.threads,
            n_gpu_layers=settings.gpu_layers if offload else 0,
            logits_all=True,
            verbose=False,
        )

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        add_bos = add_bos and self.llm._model.add_bos_token()
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()  # each window starts from an empty cache
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)]

    def close(self) -> None:
        """Free the context and weights now."""
        self.llm.close()


class TransformersScorer:
    """A loaded transformers backend (fp32, fp16, or bitsandbytes), one forward pass per window."""

    def __init__(self, backend: Any):
        backend.ensure_loaded()
        self.backend = backend

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return self.backend.tokenize(text, add_bos=add_bos)

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        model = self.backend.model
        with torch.inference_mode():
            out = model(torch.tensor([ids], device=model.device))
        return out.logits[0].float().cpu().numpy()


def as_scorer(model: Any, n_ctx: int = 512) -> Scorer:
    """The :class:`Scorer` for any of the things :func:`perplexity` accepts."""
    from llmlab import registry
    from llmlab.backends import Backend

    if hasattr(model, "logits") and hasattr(model, "tokenize"):
        return model
    if isinstance(model, Backend):
        return model.scorer(n_ctx)
    if isinstance(model, registry.ModelSpec):
        model = model.path or registry.resolve(model).path
    elif isinstance(model, str) and not Path(model).is_file():
        model = registry.resolve(model).path  # a catalog name such as name:tag
    return LlamaCppScorer(model, n_ctx)
