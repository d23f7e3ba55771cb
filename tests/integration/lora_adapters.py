"""A GGUF LoRA adapter for the default model, made in milliseconds for the engine and server
tests: a PEFT adapter folder with random matrices, written to GGUF by the fine-tuning code's
own exporter (``llmlab.finetune.export_gguf.write_adapter``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmlab import registry
from llmlab.finetune import export_gguf
from llmlab.finetune.adapters import META_FILE


def make_adapter(folder: Path, seed: int, base: str | None = None) -> Path:
    """A GGUF LoRA adapter written by the fine-tuning code's exporter from a PEFT folder
    with random B matrices (a fresh adapter has B = 0 and changes nothing), on the last
    layers' query and value projections: it changes the greedy reply, in milliseconds."""
    from safetensors.numpy import save_file

    spec = registry.resolve()
    layout = export_gguf._BaseLayout(spec.path)
    rank, rng, tensors = 4, np.random.default_rng(seed), {}
    for layer in range(24, 30):
        for proj, short in (("q_proj", "attn_q"), ("v_proj", "attn_v")):
            rows, cols = layout.shapes[f"blk.{layer}.{short}.weight"]
            module = f"{export_gguf.PREFIX}model.layers.{layer}.self_attn.{proj}"
            tensors[f"{module}.lora_A.weight"] = rng.normal(0, 0.05, (rank, cols)).astype("f4")
            tensors[f"{module}.lora_B.weight"] = rng.normal(0, 0.3, (rows, rank)).astype("f4")
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank})
    )
    (folder / META_FILE).write_text(json.dumps({"base_model": base or spec.name}))
    return export_gguf.write_adapter(folder, spec.path, folder.with_suffix(".lora.gguf"))
