"""Server options, read from ``LLMLAB_SERVER_*`` environment variables or given directly::

    from part5.combined_app.config import ServerSettings
    settings = ServerSettings(port=8001, parallel=2, api_key="secret")

``scripts/server.py`` turns its command-line flags into one of these.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llmlab.settings import get_settings


class ServerSettings(BaseSettings):
    """Everything the served app can be told; each field is ``LLMLAB_SERVER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="LLMLAB_SERVER_", env_file=None, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0: every one).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free one).")
    model: str | None = Field(None, description="Chat model served (default: the lab's default).")
    models: list[str] = Field(
        default_factory=list,
        description="More chat models served besides model, each loaded on first use.",
    )
    models_file: Path | None = Field(
        None, description="YAML file with more models, aliases and the rules of model 'auto'."
    )
    aliases: dict[str, str] = Field(
        default_factory=dict, description="Other names for served models, e.g. fast -> a model."
    )
    keep_alive: float = Field(
        300.0, description="Seconds an extra model stays loaded when idle (negative: always)."
    )
    memory_budget: int | None = Field(
        None, ge=1, description="Bytes the loaded models may take (default: 3/4 of the RAM)."
    )
    embedding_model: str | None = Field(None, description="Embedding model (default: the lab's).")
    parallel: int = Field(4, ge=1, le=64, description="Sequences decoded together (engine slots).")
    n_ctx: int | None = Field(None, ge=128, description="Context window per sequence in tokens.")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: every core).")
    api_key: str | None = Field(
        None,
        validation_alias=AliasChoices("LLMLAB_SERVER_API_KEY", "LLMLAB_API_KEY", "api_key"),
        description="If set, every route except /health and the page needs 'Bearer <key>'.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call the API ('*': any)."
    )
    stream_interval: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Seconds between two events of a stream (the tokens decoded meanwhile go "
        "as one); 0: an event per token.",
    )
    queue_size: int = Field(16, ge=1, description="Requests that may wait for a free slot.")
    retry_after: int = Field(2, ge=1, description="Seconds a client is told to wait when full.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest JSON request body.")
    max_upload_bytes: int = Field(20_000_000, ge=1024, description="Largest document upload.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (default: context minus max_tokens)."
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request names none.")
    max_batch_prompts: int = Field(1000, ge=1, description="Most prompts in one batch job.")
    lora: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters loaded on the model, NAME -> GGUF path (JSON in the variable); "
        "a request applies some by name.",
    )
    cache_entries: int = Field(
        0, ge=0, description="Deterministic replies kept to answer repeats (0: no cache)."
    )
    cache_ttl: float = Field(600.0, gt=0, description="Seconds a cached reply stays valid.")
    cache_bytes: int = Field(32_000_000, ge=1, description="Most bytes of cached replies.")
    home: Path | None = Field(None, description="Lab home for uploads and batches (LLMLAB_HOME).")
    exact_model: bool = Field(
        default_factory=lambda: get_settings().exact_model,
        validation_alias=AliasChoices(
            "LLMLAB_SERVER_EXACT_MODEL", "LLMLAB_EXACT_MODEL", "exact_model"
        ),
        description="server.py serves the model's file exactly as given, not a batch-friendly "
        "version of it (llmlab.registry.batch_format).",
    )

    @property
    def lab_home(self) -> Path:
        """The lab folder: this setting, else ``LLMLAB_HOME``."""
        return self.home or get_settings().home

    @property
    def uploads_dir(self) -> Path:
        """Uploaded documents, one folder per collection."""
        return self.lab_home / "uploads"

    @property
    def batches_dir(self) -> Path:
        """Batch jobs: one folder per job with its input and output JSON lines."""
        return self.lab_home / "server-batches"
