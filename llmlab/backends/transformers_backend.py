"""The transformers engine: loads the same GGUF file into PyTorch (dequantized), fp32 on
CPU and fp16 on a GPU, optionally re-quantized with bitsandbytes to 8-bit or 4-bit::

    from llmlab.backends.transformers_backend import TransformersBackend
    from llmlab import registry
    model = TransformersBackend(registry.resolve(), quantization="8bit")
    model.chat([{"role": "user", "content": "Hi"}], max_tokens=16).text

Reading a GGUF file with transformers dequantizes every tensor (about 35 s of CPU for the
default model), so the first load also saves the result as a plain fp32 safetensors
checkpoint in ``$LLMLAB_HOME/models/<name>/<tag>/hf-checkpoint`` (or under
``$LLMLAB_HF_CACHE_DIR``), and later loads, plain or bitsandbytes, read that in a few
seconds; see :mod:`llmlab.backends.hf_checkpoint`. ``info()`` still names the GGUF file
(``path``) and says where the weights came from (``loaded_from``: ``gguf`` or ``cache``).
Replies stream through a ``TextIteratorStreamer`` fed by ``generate`` in a thread; text
arrives word by word, so time to first token includes the rest of the first word.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.backends import hf_checkpoint
from llmlab.backends.base import BackendError, GenerationParams, Message
from llmlab.backends.local import LocalBackend, Step, wrap_load_error
from llmlab.hardware import pick_device
from llmlab.registry import ModelSpec
from llmlab.settings import Settings

QUANTIZATIONS = ("8bit", "4bit")
# Control tokens that end a turn in common chat formats; those present in a vocabulary are
# stop tokens (llama.cpp applies the same rule, so both engines stop at the same place).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", "</s>")


class TransformersBackend(LocalBackend):
    """A model run by Hugging Face transformers on PyTorch."""

    name = "transformers"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str | None = None,
        quantization: str | None = None,
        settings: Settings | None = None,
    ):
        super().__init__(spec, n_ctx=n_ctx, threads=threads, settings=settings)
        if quantization not in (None, "none", *QUANTIZATIONS):
            raise ValueError(
                f"Unknown quantization {quantization!r}. Use one of: none, 8bit, 4bit."
            )
        self.quantization = None if quantization == "none" else quantization
        self.device = pick_device(device or self.settings.device)
        self.model = None
        self.tokenizer = None
        self.loaded_from: str | None = None  # "gguf", "cache" or "folder" once loaded
        # Where the plain checkpoint converted from a GGUF file is cached (fixed here, so
        # info() names the folder this object really uses).
        self.checkpoint_dir: Path = hf_checkpoint.checkpoint_dir(spec, self.settings)
        self._stop_ids: list[int] = []
        self._vocab: _LlamaVocab | None = None  # llama.cpp's tokenizer, for grammars

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def _dtype(self):
        import torch

        return torch.float32 if self.device == "cpu" else torch.float16

    def _load(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        path = Path(self.spec.path)
        try:
            if self.quantization:
                self._load_quantized(path)
            elif path.suffix == ".gguf":
                self._load_gguf(path)
            else:  # a folder of plain weights already
                self.tokenizer, self.model = self._from_folder(path)
                self.loaded_from = "folder"
        except ImportError as exc:
            raise BackendError(f"{exc}. Run: pip install -r requirements.txt") from exc
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            self.model = self.tokenizer = None
            raise wrap_load_error(self.spec, "transformers", exc) from exc
        self._stop_ids = self._find_stop_ids()

    def _from_folder(self, folder: Path, **kwargs: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self._dtype(), **kwargs)
        if "device_map" not in kwargs:
            model = model.to(self.device)
        return tokenizer, model.eval()

    def _load_gguf(self, path: Path) -> None:
        """From the cached checkpoint if it is current, else convert the GGUF and cache it."""
        if self._load_cached(path):
            return
        tokenizer, model = self._convert(path)
        try:
            self._save_checkpoint(path, tokenizer, model)
        except (OSError, BackendError) as exc:
            # The converted model is in memory and works; only the next load stays slow.
            warnings.warn(f"Could not cache the converted checkpoint: {exc}", stacklevel=2)
        self.tokenizer, self.model = tokenizer, model.to(self._dtype()).to(self.device).eval()
        self.loaded_from = "gguf"

    def _load_quantized(self, path: Path) -> None:
        from transformers import BitsAndBytesConfig

        # bitsandbytes warns on every 8-bit matmul that fp32 inputs are cast to fp16.
        warnings.filterwarnings(
            "ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning
        )
        if self.quantization == "8bit":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self._dtype()
            )
        options = {"quantization_config": config, "device_map": {"": self.device}}
        if path.suffix != ".gguf":
            self.tokenizer, self.model = self._from_folder(path, **options)
            self.loaded_from = "folder"
            return
        # bitsandbytes cannot quantize while reading a GGUF file: it needs the plain checkpoint.
        if self._load_cached(path, **options):
            return
        tokenizer, model = self._convert(path)
        self._save_checkpoint(path, tokenizer, model)
        del model
        self.tokenizer, self.model = self._from_folder(self.checkpoint_dir, **options)
        self.loaded_from = "gguf"

    def _load_cached(self, path: Path, **options: Any) -> bool:
        """Load the cached checkpoint of ``path`` if it is current and intact; say if it was."""
        if not hf_checkpoint.is_current(self.checkpoint_dir, path, self.spec.sha256):
            return False
        try:
            self.tokenizer, self.model = self._from_folder(self.checkpoint_dir, **options)
        except Exception as exc:  # noqa: BLE001 - whatever broke in a cache, rebuilding fixes it
            warnings.warn(
                f"Rebuilding the damaged checkpoint cache {self.checkpoint_dir} ({exc})",
                stacklevel=3,
            )
            return False
        self.loaded_from = "cache"
        return True

    def _convert(self, path: Path):
        """Tokenizer and fp32 model read from the GGUF file (the slow step the cache saves)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # fp32 holds the dequantized values exactly, so the cache gives the same model a
        # direct GGUF read would, whatever dtype a later load asks for.
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        return tokenizer, model

    def _save_checkpoint(self, path: Path, tokenizer, model) -> None:
        import transformers

        _drop_gguf_marker(model)

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        hf_checkpoint.write(
            self.checkpoint_dir,
            path,
            self.spec.sha256,
            save,
            dtype="float32",
            transformers=transformers.__version__,
        )

    def _find_stop_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, list) else [source])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
        return sorted(ids)

    def _unload(self) -> None:
        self.model = None
        self.tokenizer = None
        self.loaded_from = None
        if self._vocab is not None:
            self._vocab.free()
            self._vocab = None

    def _grammar_processor(self, grammar: str, prompt_length: int, params: GenerationParams):
        """A logits processor that holds the reply to ``grammar`` with llama.cpp's sampler.

        llama.cpp's grammar works on llama.cpp's token ids; the checkpoint was converted from
        the GGUF file, so its tokenizer has the same ids (checked: the same vocabulary size).
        """
        if Path(str(self.spec.path)).suffix != ".gguf":
            raise BackendError(
                f"schema= on the transformers backend needs a GGUF model (its grammar runs on "
                f"llama.cpp's tokenizer of the same file); {self.spec.ref} is a folder of "
                "weights. Use --backend llama.cpp with its GGUF file."
            )
        if self._vocab is None:
            self._vocab = _LlamaVocab(Path(str(self.spec.path)))
        if self._vocab.n_vocab != len(self.tokenizer):
            raise BackendError(
                f"the tokenizer of {self.spec.ref} has {len(self.tokenizer)} tokens and its "
                f"GGUF file {self._vocab.n_vocab}: a grammar cannot be applied. Use --backend llama.cpp."
            )
        return _grammar_logits(self._vocab, grammar, prompt_length, params)

    # --- tokens -------------------------------------------------------------------

    def _encode(self, text: str, add_bos: bool, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_bos, split_special_tokens=not special)[
            "input_ids"
        ]

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` (control tokens such as ``<|im_end|>`` included)."""
        self.ensure_loaded()
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_piece(self, token_id: int) -> str:
        """The text of one token, with its leading space if it has one."""
        self.ensure_loaded()
        return self.tokenizer.decode([int(token_id)], clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        self.ensure_loaded()
        return int(self.model.config.vocab_size)

    @property
    def eos_token_ids(self) -> list[int]:
        """The model's end-of-sequence token id(s), as its config states them."""
        self.ensure_loaded()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return sorted(eos if isinstance(eos, list) else [eos]) if eos is not None else []

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token that ends a reply: the end-of-sequence ids plus end-of-turn tokens."""
        self.ensure_loaded()
        return list(self._stop_ids)

    def _logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ids], device=self.model.device))
        return out.logits[0, -1].float().cpu().numpy()

    # --- chat template ------------------------------------------------------------

    def _render_chat(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise BackendError(
                f"{self.spec.ref} has no chat template, so it is not a chat model. Use "
                "complete() (or --raw) instead of chat."
            )
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # --- decoding -----------------------------------------------------------------

    def _steps(
        self, prompt_ids: list[int], params: GenerationParams, grammar: str | None = None
    ) -> Iterator[Step]:
        import torch
        from transformers import (
            LogitsProcessorList,
            StoppingCriteria,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        if params.max_tokens <= 0:
            yield Step("", 0, "length")
            return
        stop_ids = set(self._stop_ids)
        cancel = threading.Event()

        class CountingStreamer(TextIteratorStreamer):
            """Also counts generated tokens (text arrives per word, tokens one at a time)."""

            tokens = 0
            hit_stop = False

            def put(self, value):
                if not self.next_tokens_are_prompt:
                    for token in value.reshape(-1).tolist():
                        if token in stop_ids:
                            self.hit_stop = True
                        else:
                            self.tokens += 1
                super().put(value)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        streamer = CountingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        greedy = params.temperature <= 0
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor([prompt_ids], device=self.model.device),
            "attention_mask": torch.ones(
                (1, len(prompt_ids)), dtype=torch.long, device=self.model.device
            ),
            "max_new_tokens": params.max_tokens,
            "do_sample": not greedy,
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._stop_ids[0] if self._stop_ids else None,
            "repetition_penalty": params.repeat_penalty,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
        }
        if greedy or grammar:
            # With a grammar its processor also samples' warps (after the mask; see _grammar_logits).
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if grammar:
            processor = self._grammar_processor(grammar, len(prompt_ids), params)
            kwargs["logits_processor"] = LogitsProcessorList([processor])
        if not greedy and params.seed is not None:
            torch.manual_seed(params.seed)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # reported in the caller's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name="llmlab-generate", daemon=True)
        thread.start()
        try:
            for text in streamer:
                yield Step(text, streamer.tokens)
            if errors:
                raise BackendError(f"transformers generation failed: {errors[0]}") from errors[0]
            finish = (
                "stop" if streamer.hit_stop or streamer.tokens < params.max_tokens else "length"
            )
            yield Step("", streamer.tokens, finish)
        finally:
            cancel.set()  # a consumer that stops early ends generate() at the next token
            thread.join()
            if grammar:
                processor.free()

    def scorer(self, n_ctx: int = 512) -> Any:
        from llmlab.perplexity import TransformersScorer

        return TransformersScorer(self)

    def info(self) -> dict[str, Any]:
        """The usual keys, plus ``checkpoint`` (the cache folder for a GGUF file) and
        ``loaded_from``: ``gguf`` (converted on this load), ``cache`` or ``folder``."""
        gguf = Path(str(self.spec.path)).suffix == ".gguf"
        data: dict[str, Any] = {
            "backend": self.name,
            "model": self.spec.ref,
            "path": str(self.spec.path),
            "checkpoint": str(self.checkpoint_dir) if gguf else None,
            "loaded_from": self.loaded_from,
            "context_length": self.context_length,
            "threads": self.threads,
            "device": self.device,
            "dtype": str(self._dtype()).removeprefix("torch."),
            "quantization": self.quantization or "none",
            "loaded": self.loaded,
        }
        if self.loaded:
            data["vocab_size"] = self.vocab_size
            data["parameters"] = sum(p.numel() for p in self.model.parameters())
            data["memory_bytes"] = self.model.get_memory_footprint()
        return data


def _drop_gguf_marker(model) -> None:
    """Mark a model read from GGUF as a plain one so ``save_pretrained`` accepts it.

    transformers keeps a GGUF "quantizer" on the model even after unpacking every weight to
    plain tensors, and refuses to save such a model; the weights themselves are ordinary.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    # Packed blocks only when the new GGUF loader handles the architecture without dequantizing.
    packed = getattr(quantizer, "supported", False) and not quantizer.quantization_config.dequantize
    if packed:
        raise BackendError(
            "transformers kept this GGUF model's weights in their packed blocks (GGUF kernels "
            "are installed), so no plain checkpoint can be written for bitsandbytes. Uninstall "
            "the 'kernels' package or use the model without --quantization."
        )
    quantizer.remove_quantization_config(model)


class _LlamaVocab:
    """llama.cpp's tokenizer of a GGUF file (vocabulary only: no weights are read)."""

    def __init__(self, path: Path):
        import llama_cpp

        self._ll = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise BackendError(f"llama.cpp could not read the vocabulary of {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def free(self) -> None:
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None


def _grammar_logits(vocab: _LlamaVocab, grammar: str, prompt_length: int, params: GenerationParams):
    """A transformers logits processor: llama.cpp's grammar mask, then the sampling warps.

    transformers runs its own temperature / top-k / top-p before any custom processor; a
    top-k cut first could leave no token the grammar allows, so with a grammar those warps
    run here, after the mask (llama.cpp's sampler chain has the same order).
    """
    import torch
    from transformers import (
        LogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from llmlab.sampling import Grammar  # llama.cpp's grammar sampler, as the engine uses it

    warps = []
    if params.temperature > 0:
        warps.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            warps.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warps.append(TopPLogitsWarper(params.top_p))

    class GrammarLogits(LogitsProcessor):
        def __init__(self):
            self.grammar = Grammar(vocab.vocab, grammar)

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] > prompt_length:  # the grammar moves past the last token
                self.grammar.accept(int(input_ids[0, -1]))
            n = vocab.n_vocab
            masked = self.grammar.constrain(scores[0, :n].float().cpu().numpy())
            out = torch.full_like(scores, float("-inf"))
            out[0, :n] = torch.from_numpy(masked).to(scores.dtype)
            for warp in warps:
                out = warp(input_ids, out)
            return out

        def free(self) -> None:
            self.grammar.free()

    return GrammarLogits()
