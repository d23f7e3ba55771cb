"""A PEFT adapter written as a GGUF LoRA adapter: llama.cpp's tensor names and shapes, the
query/key row permutation, the base model recorded, and adapters for another model refused.
The adapters here are made by hand with the default model's shapes (no training)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from llmlab import backends, registry
from llmlab.backends.base import BackendError
from llmlab.finetune import adapters, export_gguf

RANK, ALPHA = 4, 8.0
# SmolLM2-135M: 576 wide, 9 query heads and 3 key/value heads of 64, MLP 1536.
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "mlp.down_proj": (576, 1536),
}


def peft_folder(path, shapes=SHAPES, base="smollm2-135m-instruct", layers=(0, 29)):
    """A PEFT LoRA folder as ``save_pretrained`` writes it, with random A and B."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in layers:
        for module, (out, inp) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = rng.standard_normal((RANK, inp), dtype=np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.standard_normal((out, RANK), dtype=np.float32)
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    if base:
        (path / adapters.META_FILE).write_text(json.dumps({"base_model": base}))
    return path, tensors


@pytest.fixture
def base_path():
    return registry.resolve().path


def test_the_gguf_adapter_has_llama_cpp_names_shapes_and_metadata(tmp_path, base_path):
    folder, tensors = peft_folder(tmp_path / "adapter")
    out = export_gguf.write_adapter(folder, base_path, tmp_path / "a.lora.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == ALPHA
    assert reader.get_field(adapters.GGUF_BASE_KEY).contents() == "smollm2-135m-instruct"
    got = {
        t.name: np.array(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors
    }
    assert set(got) == {
        f"blk.{i}.{n}.weight.lora_{p}"
        for i in (0, 29)
        for n in ("attn_q", "attn_k", "ffn_down")
        for p in "ab"
    }
    prefix = "base_model.model.model.layers.29"
    a, b = (
        tensors[f"{prefix}.self_attn.k_proj.lora_A.weight"],
        tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"],
    )
    np.testing.assert_array_equal(got["blk.29.attn_k.weight.lora_a"], a)  # rank x inputs, as is
    np.testing.assert_array_equal(got["blk.29.attn_k.weight.lora_b"], export_gguf.permute(b, 9, 3))
    b_down = tensors[f"{prefix}.mlp.down_proj.lora_B.weight"]
    np.testing.assert_array_equal(got["blk.29.ffn_down.weight.lora_b"], b_down)  # not permuted


def test_the_permutation_is_the_one_transformers_undoes_when_it_reads_a_gguf():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    k, q = np.random.default_rng(1).standard_normal((2, 576, 8))
    k = k[:192]
    np.testing.assert_array_equal(undo(export_gguf.permute(k, 9, 3), 9, 3), k)
    np.testing.assert_array_equal(undo(export_gguf.permute(q, 9, 9), 9, 9), q)
    assert not np.array_equal(export_gguf.permute(k, 9, 3), k)


def test_merged_updates_are_the_permuted_full_rank_update_scaled_by_alpha_over_rank(
    tmp_path, base_path
):
    folder, tensors = peft_folder(tmp_path / "adapter", layers=(3,))
    updates = export_gguf.merged_updates(folder, base_path)
    prefix = "base_model.model.model.layers.3.self_attn.q_proj"
    full = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
    np.testing.assert_allclose(
        updates["blk.3.attn_q.weight"],
        ALPHA / RANK * export_gguf.permute(full, 9, 9),
        rtol=1e-5,
        atol=1e-5,
    )


def test_an_adapter_with_other_shapes_is_refused_as_made_for_another_model(tmp_path, base_path):
    folder, _ = peft_folder(tmp_path / "adapter", shapes={"self_attn.q_proj": (64, 64)}, base=None)
    with pytest.raises(export_gguf.ExportError, match="made for another model"):
        export_gguf.write_adapter(folder, base_path, tmp_path / "a.lora.gguf")


def test_a_folder_that_is_not_a_lora_adapter_says_so(tmp_path, base_path):
    with pytest.raises(export_gguf.ExportError, match="is not a PEFT LoRA adapter folder"):
        export_gguf.write_adapter(tmp_path, base_path, tmp_path / "a.lora.gguf")


def test_an_adapter_for_another_base_model_is_refused_naming_both(tmp_path, base_path):
    folder, _ = peft_folder(tmp_path / "adapter")
    lora = export_gguf.write_adapter(folder, base_path, tmp_path / "a.lora.gguf")
    other = tmp_path / "other.gguf"
    other.symlink_to(base_path)
    spec = registry.add(other, name="other-model")
    for path in (folder, lora):
        with pytest.raises(adapters.AdapterMismatchError) as err:
            adapters.check_adapter(path, spec)
        message = str(err.value)
        assert "made for smollm2-135m-instruct, not for other-model:latest" in message
        assert "--model smollm2-135m-instruct" in message
    with pytest.raises(adapters.AdapterMismatchError, match="made for smollm2-135m-instruct"):
        backends.load("other-model", backend="llama.cpp", lora=str(lora))
    adapters.check_adapter(lora, registry.resolve())  # its own base: accepted


def test_a_missing_adapter_or_a_model_file_given_as_adapter_is_an_error(tmp_path, base_path):
    with pytest.raises(BackendError, match="No LoRA adapter at"):
        backends.load(backend="llama.cpp", lora=str(tmp_path / "none.gguf"))
    with pytest.raises(BackendError, match="is a GGUF model, not a LoRA adapter"):
        backends.load(backend="llama.cpp", lora=str(base_path))
