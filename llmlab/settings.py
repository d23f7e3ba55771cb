"""One settings object for the whole lab, read from ``LLMLAB_*`` environment variables.

Examples::

    LLMLAB_HOME=/tmp/lab LLMLAB_THREADS=4 python part3/simple_chat.py

    from llmlab.settings import get_settings
    settings = get_settings()          # reads the environment each call
    settings.models_dir                # where downloaded and assembled models live
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _all_cores() -> int:
    # llama.cpp defaults to half the cores; decoding is memory-bound but still runs
    # measurably faster with every core, so the lab's default is all of them.
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Lab-wide defaults; each field can be set as ``LLMLAB_<FIELD>`` (e.g. ``LLMLAB_HOME``)."""

    model_config = SettingsConfigDict(env_prefix="LLMLAB_", env_file=None, extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "llmlab",
        description="Where user models, the user catalog, vector stores and transcripts live.",
    )
    default_model: str = Field(
        "smollm2-135m-instruct", description="Chat model used when none is named."
    )
    embedding_model: str = Field("all-minilm-l6-v2", description="Embedding model for document QA.")
    embedding_runtime: str = Field(
        "auto",
        description="auto, onnx (CPU, no torch) or sentence-transformers, for the embedding model.",
    )
    backend: str = Field("auto", description="auto, llama.cpp, transformers or openai.")
    threads: int = Field(default_factory=_all_cores, ge=1, description="CPU threads for decoding.")
    n_ctx: int = Field(2048, ge=128, description="Context window in tokens for local models.")
    device: str = Field("auto", description="auto, cpu, cuda or mps (transformers backend).")
    gpu_layers: int = Field(-1, description="Layers to offload to a GPU with llama.cpp (-1: all).")
    flash_attn: bool = Field(
        True,
        description="llama.cpp's flash-attention kernel (faster here, on CPU too; 0 turns it off).",
    )
    exact_model: bool = Field(
        False,
        description="Batch jobs and the server run the model's file exactly as given, not a "
        "batch-friendly version of it (llmlab.registry.batch_format; --exact-model).",
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible server for the remote backend."
    )
    api_key: str | None = Field(
        None, description="API key for the remote backend or the lab server."
    )
    hf_token: str | None = Field(None, description="Hugging Face token for gated downloads.")

    @property
    def models_dir(self) -> Path:
        """Folder for downloaded, assembled and converted model files."""
        return self.home / "models"

    @property
    def catalog_path(self) -> Path:
        """The user's own catalog entries (``add``, ``pull`` of a URL), merged over the built-in one."""
        return self.home / "models.yaml"


def get_settings(**overrides) -> Settings:
    """Return fresh settings from the environment, with keyword overrides applied on top."""
    return Settings(**overrides)
