"""Pick an engine for a model and return it behind the one :class:`Backend` interface::

    from llmlab import backends
    model = backends.load()                                   # default model, best engine
    model = backends.load("smollm2-135m-instruct", backend="transformers", quantization="8bit")
    model = backends.load("llama3", backend="openai", base_url="http://127.0.0.1:11434/v1")

Models load lazily: ``load`` returns at once and the first request loads the weights.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from llmlab import llama_build
from llmlab.backends.base import (
    Backend,
    BackendError,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
    Result,
    Timings,
    Usage,
)
from llmlab.backends.local import LocalBackend
from llmlab.registry import ModelSpec, resolve
from llmlab.settings import get_settings

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "Chunk",
    "ContextOverflowError",
    "GenerationParams",
    "LocalBackend",
    "Message",
    "Result",
    "Timings",
    "Usage",
    "canonical_backend",
    "load",
]

# Accepted spellings of each engine's name.
BACKENDS = {
    "llama.cpp": "llama.cpp",
    "llamacpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "transformers": "transformers",
    "hf": "transformers",
    "openai": "openai",
    "remote": "openai",
}


def canonical_backend(name: str | None) -> str:
    """``llama.cpp``, ``transformers``, ``openai`` or ``auto`` for any accepted spelling.

    Raises:
        ValueError: the name is not a known engine (the message lists the valid names).
    """
    key = (name or "auto").strip().lower()
    if key == "auto":
        return "auto"
    if key not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}. Use one of: auto, {', '.join(BACKENDS)}.")
    return BACKENDS[key]


def load(
    name_or_spec: str | ModelSpec | None = None, backend: str | None = "auto", **options: Any
) -> Backend:
    """Return a backend for a model name (or ``name:tag``), a ModelSpec, or None (the default model).

    ``backend="auto"`` uses ``LLMLAB_BACKEND`` if set, else the remote server if a
    ``base_url`` is given (option or ``LLMLAB_BASE_URL``), else llama.cpp for a GGUF file
    when llama-cpp-python is installed, else transformers.

    Options: ``n_ctx``, ``threads``, ``device``, ``quantization`` (transformers: 8bit, 4bit),
    ``lora`` (llama.cpp: a GGUF LoRA adapter applied on top of the model, see
    ``part4/fine_tune.py``), ``base_url``, ``api_key``, ``timeout`` (remote).

    Raises:
        ValueError: unknown backend name or an option the chosen engine does not take.
        registry.RegistryError: the model is unknown, missing or fails its checksum.
        BackendError: ``lora`` is missing, not an adapter, or made for another model.
    """
    settings = get_settings()
    kind = canonical_backend(backend)
    if kind == "auto":
        kind = canonical_backend(settings.backend)
    base_url = options.pop("base_url", None) or settings.base_url
    if kind == "auto" and base_url:
        kind = "openai"
    if kind == "openai":
        from llmlab.backends.remote import RemoteBackend

        _only(options, {"api_key", "n_ctx", "timeout"}, "openai")
        model = name_or_spec.name if isinstance(name_or_spec, ModelSpec) else name_or_spec
        return RemoteBackend(model, base_url=base_url, settings=settings, **options)

    options.pop("api_key", None)  # only servers take a key; scripts may pass it regardless
    spec = resolve(name_or_spec, settings)
    if kind == "auto":
        has_llama = importlib.util.find_spec("llama_cpp") is not None
        kind = "llama.cpp" if spec.format == "gguf" and has_llama else "transformers"
    if kind == "llama.cpp":
        from llmlab.backends.llamacpp import LlamaCppBackend

        refuse_a_build_known_to_crash()
        if spec.format != "gguf":
            raise ValueError(f"{spec.ref} is {spec.format}, not GGUF: use --backend transformers.")
        if options.get("quantization") not in (None, "none"):
            raise ValueError(
                f"{spec.ref} is already quantized ({spec.quantization}) in its GGUF file; "
                "bitsandbytes quantization needs --backend transformers."
            )
        options.pop("quantization", None)
        _only(options, {"n_ctx", "threads", "device", "lora"}, "llama.cpp")
        if options.get("lora"):
            from llmlab.finetune.adapters import check_adapter

            options["lora"] = os.path.expanduser(str(options["lora"]))
            check_adapter(options["lora"], spec)  # refuses an adapter made for another model
        return LlamaCppBackend(spec, settings=settings, **options)
    from llmlab.backends.transformers_backend import TransformersBackend

    _only(options, {"n_ctx", "threads", "device", "quantization"}, "transformers")
    return TransformersBackend(spec, settings=settings, **options)


def refuse_a_build_known_to_crash() -> None:
    """Raise BackendError, with the fix, when the installed llama.cpp build was made for
    another CPU (it uses instruction sets this one lacks) or crashed on this CPU when it last
    generated (a cached verdict of :mod:`llmlab.llama_build`; no probe is run)."""
    from llmlab.backends.llamacpp import llama_cpp_system_info

    missing = llama_build.missing_on_cpu(llama_cpp_system_info()["system_info"])
    if missing:
        raise BackendError(
            f"The installed llama.cpp build uses {' '.join(missing)}, which this CPU lacks "
            "(a build made on another machine), and would die with 'Illegal instruction'. "
            f"Rebuild it for this CPU. Run: {llama_build.repair_command()}"
        )
    crash = llama_build.known_crash()
    if crash is not None:
        raise BackendError(
            f"The installed llama.cpp build was {crash.detail} the last time it generated on "
            f"this CPU, so it is not loaded again. Rebuild it for this CPU. "
            f"Run: {llama_build.repair_command()}"
        )


def _only(options: dict[str, Any], allowed: set[str], engine: str) -> None:
    extra = {k for k, v in options.items() if v is not None} - allowed
    if extra:
        raise ValueError(
            f"The {engine} backend does not take {', '.join(sorted(extra))}; it takes {', '.join(sorted(allowed))}."
        )
    for key in [k for k, v in options.items() if v is None]:
        del options[key]
