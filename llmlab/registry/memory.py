"""Memory a model needs (:func:`estimate_ram`) and the chat model that fits (:func:`recommend`)."""

from __future__ import annotations

from dataclasses import dataclass

from llmlab import hardware
from llmlab.registry.catalogs import catalog
from llmlab.registry.files import status
from llmlab.registry.spec import CLI, MiB, ModelSpec, RegistryError
from llmlab.settings import Settings, get_settings

DEFAULT_N_CTX = 2048  # the lab's default context (Settings.n_ctx), not the model's maximum
N_UBATCH = 512  # llama.cpp's default micro-batch: sizes its compute buffer
RUNTIME_BYTES = 48 * MiB  # llama.cpp context, tokenizer tables, allocator slack


def estimate_ram(
    size_bytes: int,
    *,
    n_layers: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    kv_bytes: int = 2,
) -> int:
    """Estimate the resident memory (bytes) to load a GGUF model and run it at ``n_ctx``.

    ``ram = weights + kv_cache + compute_buffer + runtime`` where

    - ``weights = size_bytes`` (the file is memory-mapped and read in full),
    - ``kv_cache = 2 (K and V) * n_layers * n_ctx * n_kv_heads * head_dim * kv_bytes``
      (f16 cache, 2 bytes per value, as llama.cpp uses by default),
    - ``compute_buffer = 4 bytes * N_UBATCH * vocab_size`` (the largest scratch tensor
      is the float32 logits of one micro-batch of 512 tokens),
    - ``runtime = 48 MiB``.

    These are the buffers llama.cpp allocates: for SmolLM2 135M it reports a 45.0 MiB KV
    cache and a 99.4 MiB compute buffer (formula: 45.0 and 96.0), for Gemma 3 270M 36.0
    and 514.5 MiB (formula: 36.0 and 512.0). Resident memory can stay below the estimate
    until every page is touched, so it is an upper bound to plan with.
    Unknown shape fields count as zero, so the estimate then covers the weights only.

    >>> estimate_ram(100 * MiB) == 148 * MiB
    True
    """
    kv = 2 * (n_layers or 0) * n_ctx * (n_kv_heads or 0) * (head_dim or 0) * kv_bytes
    compute = 4 * N_UBATCH * (vocab_size or 0)
    return int(size_bytes + kv + compute + RUNTIME_BYTES)


def spec_ram_estimate(spec: ModelSpec, n_ctx: int = DEFAULT_N_CTX) -> int | None:
    """:func:`estimate_ram` for a catalog entry, or None when its size is unknown."""
    if spec.size_bytes is None:
        return None
    return estimate_ram(
        spec.size_bytes,
        n_layers=spec.n_layers,
        n_kv_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        n_ctx=n_ctx,
    )


@dataclass(frozen=True)
class Recommendation:
    """The chat model :func:`recommend` picked, and why."""

    spec: ModelSpec
    reason: str
    budget_bytes: int
    device: str


def recommend(
    settings: Settings | None = None,
    *,
    memory: hardware.MemoryInfo | None = None,
    headroom: float = 0.3,
    present_only: bool = False,
) -> Recommendation:
    """Pick the largest chat model whose estimated RAM fits this machine with headroom.

    The budget is ``(1 - headroom)`` of the available RAM (or of free GPU memory when a
    CUDA device has more), so the system and other programs keep the rest.

    Raises:
        RegistryError: no chat entry fits.
    """
    settings = settings or get_settings()
    memory = memory or hardware.memory_info()
    ram_budget = int(memory.available_ram * (1 - headroom))
    vram_budget = int(memory.free_vram * (1 - headroom))
    device, budget, pool = "cpu", ram_budget, memory.available_ram
    if memory.gpu_name and vram_budget > ram_budget:
        device, budget, pool = memory.gpu_name, vram_budget, memory.free_vram
    chat = [s for s in catalog(settings) if "chat" in s.capabilities and s.ram_bytes]
    if present_only:
        chat = [s for s in chat if status(s, settings)[0]]
    fits = [s for s in chat if s.ram_bytes <= budget]
    if not fits:
        smallest = min(chat, key=lambda s: s.ram_bytes, default=None)
        need = (
            f" The smallest, {smallest.ref}, needs ~{hardware.human_bytes(smallest.ram_bytes)}."
            if smallest
            else ""
        )
        raise RegistryError(
            f"No chat model fits in {hardware.human_bytes(budget)} ({hardware.human_bytes(pool)} "
            f"free, {headroom:.0%} kept as headroom).{need} Close other programs and try again."
        )
    best = max(fits, key=lambda s: (s.parameters or 0, s.ram_bytes))
    kind = "GPU memory" if device != "cpu" else "RAM"
    present, what = status(best, settings)
    next_step = "It is ready to use." if present else f"It is {what}: run {CLI} pull {best.ref}"
    reason = (
        f"{best.ref} is the largest chat model that fits: it needs ~{hardware.human_bytes(best.ram_bytes)} "
        f"(weights + cache at {DEFAULT_N_CTX} tokens) and this machine has "
        f"{hardware.human_bytes(pool)} of {kind} free, of which {hardware.human_bytes(budget)} "
        f"is used as the budget ({headroom:.0%} kept as headroom). {next_step}"
    )
    return Recommendation(best, reason, budget, device)
