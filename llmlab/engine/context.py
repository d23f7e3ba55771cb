"""A thin wrapper of one llama.cpp model and context: everything the engine asks of llama.cpp.

Loading (model, LoRA adapters, a context with one KV stream per sequence), tokenizing and
token bytes, the GGUF chat template, one ``llama_decode`` of a batch of entries, logits
rows and the KV-memory operations of a sequence. The scheduler uses only :meth:`decode`,
:meth:`logits`, :meth:`seq_rm`, :meth:`seq_cp`, :meth:`is_eog`, :meth:`token_bytes` and
``n_vocab`` (see :class:`llmlab.engine.scheduler.Context`), so a fake can stand in for it.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from llmlab import registry
from llmlab.backends.base import GenerationParams, Message
from llmlab.backends.llamacpp import gguf_chat_formatter, load_error
from llmlab.engine.requests import AdapterSet, EngineError
from llmlab.engine.threadpool import ThreadPool
from llmlab.sampling import SlotSampler

Entry = tuple[int, int, int, bool]  # (token, position, seq_id, wants_logits)


def check_adapters(adapters: dict[str, str], spec: registry.ModelSpec) -> dict[str, str]:
    """Adapter paths, expanded, each checked to exist and to be made for ``spec``'s model."""
    from llmlab.finetune.adapters import check_adapter

    checked = {}
    for name, path in adapters.items():
        if not name or not isinstance(name, str):
            raise ValueError(f"an adapter needs a name (got {name!r} for {path})")
        path = os.path.expanduser(str(path))
        check_adapter(path, spec)  # names both models if it was made for another
        checked[name] = path
    return checked


class LlamaContext:
    """One llama.cpp model and a context of ``parallel`` sequences of ``n_ctx`` tokens each.

    Raises:
        BackendError: the model or an adapter cannot be loaded, or the context not created.
    """

    def __init__(
        self,
        spec: registry.ModelSpec,
        *,
        parallel: int,
        n_ctx: int,
        n_batch: int,
        threads: int,
        gpu_layers: int,
        flash_attn: bool,
        adapters: dict[str, str],
    ):
        import llama_cpp

        from llmlab.backends import refuse_a_build_known_to_crash

        refuse_a_build_known_to_crash()  # a clear error, not SIGILL, for a build that crashes here
        self._ll = ll = llama_cpp
        self.spec = spec
        self.n_batch = n_batch
        self._loras: dict[str, Any] = {}  # name -> llama.cpp adapter
        self._active: AdapterSet = ()  # the adapters set on the context now
        self._formatter = None
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        self._model = ll.llama_model_load_from_file(str(spec.path).encode(), mparams)
        if not self._model:
            raise load_error(spec)  # worded as the llama.cpp backend words it
        try:
            self._load_adapters(adapters)
        except EngineError:
            self._free_model()
            raise
        self._ctx = ll.llama_init_from_model(
            self._model, self._context_params(parallel, n_ctx, threads, flash_attn)
        )
        if not self._ctx:
            self._free_model()
            raise EngineError(
                f"llama.cpp could not create a context of {n_ctx} x {parallel} tokens; "
                "lower --parallel or LLMLAB_N_CTX."
            )
        # Worker threads kept for the context's life, as llama.cpp's server keeps them,
        # instead of ggml starting and joining them in every decode (None: not in this build).
        self._pool = ThreadPool.attach(self._ctx, threads)
        self._memory = ll.llama_get_memory(self._ctx)
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._batch = ll.llama_batch_init(n_batch, 0, 1)

    def _context_params(self, parallel: int, n_ctx: int, threads: int, flash_attn: bool) -> Any:
        ll = self._ll
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx * parallel
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = parallel
        cparams.n_threads = cparams.n_threads_batch = threads
        # One KV stream per sequence: a sequence's attention never sees (or is shaped by)
        # another's cells, which keeps results independent of what else is running.
        cparams.kv_unified = False
        cparams.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        return cparams

    def _load_adapters(self, adapters: dict[str, str]) -> None:
        for name, path in adapters.items():
            adapter = self._ll.llama_adapter_lora_init(self._model, path.encode())
            if not adapter:
                raise EngineError(
                    f"llama.cpp could not load the LoRA adapter {name!r} ({path}) on "
                    f"{self.spec.ref}: its tensors do not fit this model. Use an adapter "
                    f"made for {self.spec.name} (part4/fine_tune.py writes one)."
                )
            self._loras[name] = adapter

    def _free_model(self) -> None:
        for adapter in self._loras.values():
            self._ll.llama_adapter_lora_free(adapter)
        self._loras = {}
        self._ll.llama_model_free(self._model)

    def close(self) -> None:
        """Free the batch, the context, its thread pool, the adapters and the model (call once)."""
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)
        if self._pool is not None:
            self._pool.free()
        self._free_model()

    # --- text ------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8")

    @property
    def add_bos(self) -> bool:
        """Whether a raw prompt starts with BOS for this model."""
        return bool(self._ll.llama_vocab_get_add_bos(self._vocab))

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (self._ll.llama_token * size)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            size = -n
            buf = (self._ll.llama_token * size)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's text (control tokens rendered)."""
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (end of turn, end of text)."""
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    @property
    def chat_template(self) -> str | None:
        """The GGUF file's chat template (Jinja2 text), or None."""
        return self._meta("tokenizer.chat_template")

    def apply_chat_template(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        """The prompt text for ``messages`` (and ``tools``, OpenAI entries the template may
        render): the GGUF file's own template, rendered with llama-cpp-python's Jinja2
        formatter exactly as the llama.cpp backend renders it."""
        if self._formatter is None:
            template = self.chat_template
            if not template:
                raise EngineError(
                    f"{self.spec.ref} has no chat template; submit Request.completion(...)."
                )
            ll, vocab = self._ll, self._vocab
            eos, bos = ll.llama_vocab_eos(vocab), ll.llama_vocab_bos(vocab)
            self._formatter = gguf_chat_formatter(
                template,
                ll.llama_vocab_get_text(vocab, eos).decode() if eos >= 0 else "",
                ll.llama_vocab_get_text(vocab, bos).decode() if bos >= 0 else "",
                add_generation_prompt=True,
            )
        return self._formatter(messages=messages, tools=tools).prompt

    def sampler(self, params: GenerationParams, gbnf: str | None = None) -> SlotSampler:
        """A new llama.cpp sampler chain for one sequence (ValueError if ``gbnf`` does not parse)."""
        return SlotSampler(params, gbnf, vocab=self._vocab)

    # --- decoding --------------------------------------------------------------------

    def _set_adapters(self, adapters: AdapterSet) -> None:
        """Put ``adapters`` on the context (llama.cpp applies adapters per context, not per
        sequence, so one decode carries sequences of one adapter set only)."""
        if adapters == self._active:
            return
        ll, n = self._ll, len(adapters)
        loras = (ll.llama_adapter_lora_p_ctypes * n)(*(self._loras[a] for a, _ in adapters))
        scales = (ctypes.c_float * n)(*(scale for _, scale in adapters))
        if ll.llama_set_adapters_lora(self._ctx, loras if n else None, n, scales if n else None):
            raise RuntimeError(f"llama_set_adapters_lora failed for {adapters}")
        self._active = adapters

    def decode(self, entries: list[Entry], adapters: AdapterSet) -> None:
        """One ``llama_decode`` of (token, position, seq_id, wants_logits) entries, all of
        sequences that run under ``adapters`` (at most ``n_batch`` entries).

        Raises:
            RuntimeError: llama.cpp returned an error.
        """
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        self._set_adapters(adapters)
        status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def logits(self, index: int) -> np.ndarray:
        """The logits row of entry ``index`` of the last decode (a view, valid until the next)."""
        row = self._ll.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,))

    def seq_rm(self, seq_id: int, start: int, end: int) -> None:
        """Clear sequence ``seq_id``'s KV cells at positions ``start..end`` (-1: open end)."""
        self._ll.llama_memory_seq_rm(self._memory, seq_id, start, end)

    def seq_cp(self, source: int, target: int) -> None:
        """Make sequence ``target``'s KV cells a copy of ``source``'s."""
        self._ll.llama_memory_seq_rm(self._memory, target, -1, -1)
        self._ll.llama_memory_seq_cp(self._memory, source, target, -1, -1)
