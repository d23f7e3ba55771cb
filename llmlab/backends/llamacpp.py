"""The llama.cpp engine: runs GGUF files directly, on every CPU core, with GPU offload
when this build of llama-cpp-python has it::

    from llmlab.backends.llamacpp import LlamaCppBackend
    from llmlab import registry
    model = LlamaCppBackend(registry.resolve())     # instant; loads on first use
    model.chat([{"role": "user", "content": "Hi"}], max_tokens=16).text

The chat template is the one stored in the GGUF file (``tokenizer.chat_template``),
rendered with llama-cpp-python's Jinja2 formatter, so prompts match what the model was
trained on (for SmolLM2 that includes its default system prompt).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from llmlab.backends.base import BackendError, GenerationParams, Message
from llmlab.backends.local import LocalBackend, Step, wrap_load_error
from llmlab.backends.text_stream import Utf8Decoder
from llmlab.hardware import human_bytes
from llmlab.registry import ModelSpec, RegistryError, read_gguf_info, spec_ram_estimate
from llmlab.settings import Settings


def llama_cpp_system_info() -> dict[str, Any]:
    """Version, llama.cpp's system info line (CPU features, backends) and GPU offload support."""
    import llama_cpp

    return {
        "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }


def gguf_chat_formatter(template: str, eos_text: str, bos_text: str, add_generation_prompt: bool):
    """The GGUF file's own chat template as llama-cpp-python's Jinja2 formatter.

    The backend and the batching engine both render chats with this, so a conversation
    becomes the same prompt text (and the same greedy reply) in either.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(
        template=template,
        eos_token=eos_text,
        bos_token=bos_text,
        add_generation_prompt=add_generation_prompt,
    )


def load_error(spec: ModelSpec, exc: Exception | None = None) -> BackendError:
    """What to say when llama.cpp cannot load ``spec``'s file, and what to do: the backend's
    and the engine's words. ``exc`` is llama-cpp-python's error; ``None`` means llama.cpp
    returned no model (all the engine, which calls it directly, learns)."""
    try:  # say what is wrong with the file when its header shows it
        read_gguf_info(spec.path)
    except RegistryError as bad:
        return BackendError(f"llama.cpp could not load {spec.ref}: {bad}")
    if exc is None:  # what llama-cpp-python raises for that, so both say the same
        exc = ValueError(f"Failed to load model from file: {spec.path}")
    return wrap_load_error(spec, "llama.cpp", exc)


class LlamaCppBackend(LocalBackend):
    """A GGUF model run by llama.cpp (through llama-cpp-python)."""

    name = "llama.cpp"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str | None = None,
        lora: str | None = None,
        settings: Settings | None = None,
    ):
        super().__init__(spec, n_ctx=n_ctx, threads=threads, settings=settings)
        self.device = device or self.settings.device
        self.lora = str(lora) if lora else None  # a GGUF LoRA adapter applied on top
        self._llm = None
        self._formatters: dict[bool, Any] = {}
        self._eog: set[int] = set()

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def _gpu_layers(self) -> int:
        import llama_cpp

        if self.device == "cpu" or not llama_cpp.llama_supports_gpu_offload():
            return 0
        return self.settings.gpu_layers

    def _load(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendError(
                "llama-cpp-python is not installed. Run: pip install -r requirements.txt, "
                "or use --backend transformers."
            ) from exc
        try:
            self._llm = Llama(
                model_path=str(self.spec.path),
                n_ctx=self.n_ctx,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                n_gpu_layers=self._gpu_layers(),
                # The engine uses the same kernel, so both give the same greedy text.
                flash_attn=self.settings.flash_attn,
                chat_format=None,  # None: use the template stored in the GGUF file
                lora_path=self.lora,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            if "llama_context" in str(exc):  # the weights loaded; the context did not fit
                raise self._context_error() from exc
            raise load_error(self.spec, exc) from exc
        if "tokenizer.chat_template" in self._llm.metadata:
            # llama-cpp-python may map a known template to a built-in format (e.g. chatml,
            # which lacks SmolLM2's default system prompt); insist on the file's own.
            self._llm.chat_format = "chat_template.default"
        self._formatters = {}
        self._eog = {t for t in (self._llm.token_eos(), self._llm._model.token_eot()) if t >= 0}

    def _context_error(self) -> BackendError:
        """The file is fine, but llama.cpp could not allocate a context of ``n_ctx`` tokens."""
        ref, trained = self.spec.ref, self.spec.context_length
        need = spec_ram_estimate(self.spec, self.n_ctx)
        size = f" (about {human_bytes(need)} of memory)" if need else ""
        if trained and self.n_ctx > trained:
            fix = (
                f"{ref} was trained on a context of {trained:,} tokens: pass at most that, "
                f"e.g. --ctx {trained} (or set LLMLAB_N_CTX={trained})"
            )
        else:
            fix = "Free some memory, or pass a smaller context with --ctx N (or LLMLAB_N_CTX)"
        return BackendError(
            f"llama.cpp could not allocate a context of {self.n_ctx:,} tokens for {ref}{size}; "
            f"the model file itself is fine. {fix}."
        )

    def _unload(self) -> None:
        self._llm.close()
        self._llm = None
        self._formatters = {}

    # --- tokens -------------------------------------------------------------------

    def _encode(self, text: str, add_bos: bool, special: bool) -> list[int]:
        add_bos = add_bos and self._llm._model.add_bos_token()
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` (control tokens such as ``<|im_end|>`` included)."""
        self.ensure_loaded()
        return self._llm.detokenize(list(ids), special=True).decode("utf-8", "replace")

    def token_piece(self, token_id: int) -> str:
        """The text of one token, with its leading space if it has one."""
        self.ensure_loaded()
        return (
            self._llm._model.token_to_piece(int(token_id), special=True)
            .rstrip(b"\0")
            .decode("utf-8", "replace")
        )

    @property
    def vocab_size(self) -> int:
        self.ensure_loaded()
        return self._llm.n_vocab()

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence / end-of-turn token ids of this model."""
        self.ensure_loaded()
        return sorted(self._eog)

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token that ends a reply (llama.cpp's end-of-generation set)."""
        self.ensure_loaded()
        return sorted(self._eog)

    def _is_eog(self, token: int) -> bool:
        import llama_cpp

        return token in self._eog or bool(
            llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token)
        )

    def _logits(self, ids: list[int]) -> np.ndarray:
        import llama_cpp

        self._llm.reset()  # evaluate from scratch: no state from earlier requests
        self._llm.eval(ids)
        row = llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self._llm.n_vocab(),)).copy()

    # --- chat template ------------------------------------------------------------

    def _render_chat(self, messages: list[Message], add_generation_prompt: bool) -> str:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BackendError(
                f"{self.spec.ref} has no chat template in its GGUF file, so it is not a chat "
                "model. Use complete() (or --raw) instead of chat."
            )
        if add_generation_prompt not in self._formatters:
            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._formatters[add_generation_prompt] = gguf_chat_formatter(
                template,
                model.token_get_text(eos) if eos >= 0 else "",
                model.token_get_text(bos) if bos >= 0 else "",
                add_generation_prompt,
            )
        return self._formatters[add_generation_prompt](messages=messages).prompt

    # --- decoding -----------------------------------------------------------------

    def _steps(
        self, prompt_ids: list[int], params: GenerationParams, grammar: str | None = None
    ) -> Iterator[Step]:
        from llama_cpp import LlamaGrammar

        if params.seed is not None:
            self._llm.set_seed(params.seed)
        decoder = Utf8Decoder()
        tokens = 0
        stream = self._llm.generate(
            prompt_ids,
            temp=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            repeat_penalty=params.repeat_penalty,
            grammar=LlamaGrammar.from_string(grammar) if grammar else None,
        )
        try:
            if params.max_tokens <= 0:
                yield Step("", 0, "length")
                return
            for token in stream:
                if self._is_eog(token):
                    yield Step(decoder.flush(), tokens, "stop")
                    return
                tokens += 1
                # Pieces are bytes; a character split over two tokens waits for the second.
                text = decoder.decode(self._llm.detokenize([token]))
                if tokens >= params.max_tokens:
                    yield Step(text + decoder.flush(), tokens, "length")
                    return
                yield Step(text, tokens)
        finally:
            stream.close()

    def scorer(self, n_ctx: int = 512) -> Any:
        from llmlab.perplexity import LlamaCppScorer

        # Perplexity needs every position's logits, so the file gets a context of its own.
        return LlamaCppScorer(self.spec.path, n_ctx, self.threads)

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "backend": self.name,
            "model": self.spec.ref,
            "path": str(self.spec.path),
            "context_length": self.context_length,
            "threads": self.threads,
            "device": "gpu" if self.loaded and self._gpu_layers() else "cpu",
            "dtype": self.spec.quantization or "gguf",
            "lora": self.lora,
            "loaded": self.loaded,
        }
        if self.loaded:
            data["gpu_layers"] = self._gpu_layers()
            data["chat_template"] = (
                "gguf" if self._llm.metadata.get("tokenizer.chat_template") else None
            )
            data["vocab_size"] = self._llm.n_vocab()
            data["context_length_trained"] = self._llm._model.n_ctx_train()
        return data
