"""bitsandbytes 8-bit on the transformers backend, on CPU: a plain checkpoint is written
once from the GGUF file (or found in the cache), then loaded with Linear8bitLt layers."""

from __future__ import annotations

import pytest

from llmlab import backends
from llmlab.backends import hf_checkpoint
from llmlab.settings import get_settings


@pytest.mark.slow
def test_8bit_checkpoint_is_written_once_and_chats():
    model = backends.load(backend="transformers", quantization="8bit", device="cpu")
    result = model.chat(
        [{"role": "user", "content": "What color is the sky?"}], max_tokens=8, temperature=0
    )
    assert "blue" in result.text.lower()
    # In LLMLAB_HOME's models folder, or the shared LLMLAB_HF_CACHE_DIR the suite may set.
    root = hf_checkpoint.cache_root(get_settings())
    checkpoint = root / "smollm2-135m-instruct" / "q4_1" / "hf-checkpoint"
    assert model.checkpoint_dir == checkpoint
    assert model.info()["loaded_from"] in ("gguf", "cache")
    assert (checkpoint / "config.json").exists() and (checkpoint / "model.safetensors").exists()
    assert hf_checkpoint.is_current(checkpoint, model.spec.path, model.spec.sha256)
    assert [p.name for p in checkpoint.parent.iterdir()] == ["hf-checkpoint"]  # no partials
    layer = model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear8bitLt"
    info = model.info()
    assert info["quantization"] == "8bit"
    assert info["memory_bytes"] < info["parameters"] * 4 * 0.6  # well under fp32's 4 bytes/param
    written = (checkpoint / "model.safetensors").stat().st_mtime_ns
    model.close()
    model.chat(
        [{"role": "user", "content": "Hi"}], max_tokens=2
    )  # reload uses the cached checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == written
    assert model.info()["loaded_from"] == "cache"
    model.close()
