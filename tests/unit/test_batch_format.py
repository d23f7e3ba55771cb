"""Which formats batch here (llmlab.registry.kernels) and which file batch jobs and the server
run (llmlab.registry.batch_format), with fake make and measure steps: milliseconds each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmlab import registry
from llmlab.registry import batch_format, kernels
from llmlab.settings import get_settings

AVX2 = ("SSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE", "REPACK")
AVX512 = (*AVX2, "AVX512", "AVX512_VNNI", "AVX512_BF16")
AMX = (*AVX512, "AMX_INT8")
ARM = ("NEON", "ARM_FMA", "FP16_VA", "DOTPROD", "MATMUL_INT8", "LLAMAFILE", "REPACK")


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("features", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_on_x86_without_amx_q4_1_and_q5_1_have_no_batched_kernel(features):
    formats = kernels.batched_formats(features)
    assert {"Q8_0", "Q4_0", "IQ4_NL", "F16"} <= formats
    assert not {"Q4_1", "Q5_1"} & formats


def test_amx_in_the_build_gives_q4_1_a_batched_kernel():
    assert "Q4_1" in kernels.batched_formats(AMX)
    assert "Q5_1" not in kernels.batched_formats(AMX)


def test_a_build_without_llamafile_and_repack_batches_nothing_on_x86():
    assert kernels.batched_formats(("AVX", "AVX2", "F16C", "FMA")) == frozenset()
    # llamafile alone still covers Q8_0 (sgemm); repack alone the 8x8 tiles of Q4_0 / IQ4_NL
    assert "Q8_0" in kernels.batched_formats(("AVX2", "LLAMAFILE"))
    assert "Q8_0" not in kernels.batched_formats(("AVX2", "REPACK"))
    assert {"Q4_0", "IQ4_NL"} <= kernels.batched_formats(("AVX2", "REPACK"))


def test_arm_with_dot_product_batches_q4_0_and_q8_0_not_q4_1():
    formats = kernels.batched_formats(ARM)
    assert {"Q4_0", "Q8_0", "IQ4_NL"} <= formats and "Q4_1" not in formats


def test_file_types_are_read_as_their_main_tensor_type():
    assert kernels.format_name("Q4_K_M") == "Q4_K" and kernels.format_name("q8_0") == "Q8_0"
    assert kernels.has_batched_kernel("q4_k_m", AVX2)
    assert not kernels.has_batched_kernel("Q4_1", AVX2)


def test_the_installed_build_and_the_shipped_file():
    features = kernels.build_features()
    assert features and all(isinstance(f, str) for f in features)
    assert kernels.main_type(registry.local_path(registry.find("smollm2-135m-instruct"))) == "Q4_1"
    if "AMX_INT8" not in features and {"AVX2", "LLAMAFILE"} <= set(features):
        assert not kernels.has_batched_kernel("Q4_1") and kernels.has_batched_kernel("Q8_0")


# --------------------------------------------------------------------------- the choice


class Steps:
    """Fake make / measure steps that count their calls."""

    def __init__(self, kl: float = 0.005):
        self.kl, self.made, self.measured = kl, 0, 0

    def make(self, tag, spec, dst: Path, settings) -> Path:
        self.made += 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f"{tag} made from {spec.path.name}".encode())
        return dst

    def measure(self, source: Path, variant: Path):
        self.measured += 1
        return self.kl, 0.95


@pytest.fixture
def spec(tmp_path, monkeypatch):
    path = tmp_path / "Model.Q4_1.gguf"
    path.write_bytes(b"shipped weights")
    monkeypatch.setattr(batch_format, "source_format", lambda s: s.quantization)
    return registry.ModelSpec(
        name="tiny",
        tag="q4_1",
        default=True,
        quantization="Q4_1",
        sha256="ab" * 32,
        source=registry.Source(kind="package", package="tiny", file="Model.Q4_1.gguf"),
        path=path,
    )


def choose(spec, steps, lines=None, **kw):
    kw.setdefault("features", AVX2)
    kw.setdefault("exact", False)
    say = lines.append if lines is not None else lambda line: None
    return batch_format.choose(spec, say=say, make=steps.make, measure=steps.measure, **kw)


def test_without_a_batched_kernel_q8_0_is_made_once_and_used_when_its_kl_is_small(spec):
    steps, lines = Steps(kl=0.005), []
    choice = choose(spec, steps, lines)
    variant = get_settings().models_dir / "tiny" / "q8_0" / "Model.Q8_0.gguf"
    assert choice.changed and choice.tag == "q8_0" and choice.spec.path == variant
    assert (choice.spec.name, choice.spec.tag) == ("tiny", "q4_1")  # clients keep its name
    assert choice.spec.quantization == "Q8_0" and choice.requested is spec
    assert choice.message == (
        "using tiny Q8_0 (made from the shipped Q4_1: batched kernels here, KL 0.005 < 0.02); "
        "--exact-model keeps the file as given"
    )
    assert "Making tiny Q8_0 from the Q4_1 file" in lines[0]
    record = json.loads(batch_format.record_path(variant).read_text())
    assert record["kl"] == 0.005 and record["source_sha256"] == spec.sha256
    assert record["sha256"] == registry.sha256_file(variant)
    again = choose(spec, steps, lines := [])
    assert again.spec.path == variant and again.message == choice.message
    assert (steps.made, steps.measured, lines) == (1, 1, [])  # the second run pays nothing


def test_a_variant_that_changes_the_model_is_not_used_and_not_measured_again(spec):
    steps = Steps(kl=0.26)
    choice = choose(spec, steps)
    assert not choice.changed and choice.spec is spec and choice.kl == 0.26
    assert choice.message == (
        "using tiny Q4_1 as given: Q8_0, whose kernels batch here, changes the model "
        "(KL 0.260 > 0.02 nats/token on held-out text)"
    )
    assert choose(spec, steps).message == choice.message
    assert (steps.made, steps.measured) == (1, 1)


def test_a_format_that_batches_already_changes_nothing(spec):
    steps = Steps()
    spec = spec.model_copy(update={"quantization": "Q8_0"})
    choice = choose(spec, steps)
    assert choice.spec is spec and choice.message == "" and steps.made == 0
    assert (
        choose(spec.model_copy(update={"quantization": "Q4_1"}), steps, features=AMX).message == ""
    )


def test_exact_model_keeps_the_file_by_flag_or_by_setting(spec, monkeypatch):
    steps = Steps()
    choice = choose(spec, steps, exact=True)
    assert choice.spec is spec and steps.made == 0
    assert choice.message.startswith("using tiny Q4_1 as given (--exact-model); Q4_1 has no")
    monkeypatch.setenv("LLMLAB_EXACT_MODEL", "1")
    assert choose(spec, steps, exact=None).spec is spec and steps.made == 0
    monkeypatch.setenv("LLMLAB_EXACT_MODEL", "0")
    assert choose(spec, steps, exact=None).changed


def test_a_damaged_cached_variant_is_made_again_with_a_message(spec):
    steps = Steps()
    variant = choose(spec, steps).spec.path
    variant.write_bytes(b"q8_0 made from Model.Q4_1.ggu!")  # same size, other bytes
    os.utime(variant, ns=(1, 1))  # and another mtime: the verified cache does not vouch for it
    lines = []
    choice = choose(spec, steps, lines)
    assert "is damaged (sha256 mismatch); making it again" in lines[0]
    assert choice.spec.path == variant and steps.made == 2
    assert registry.sha256_file(variant) == choice.spec.sha256


def test_a_variant_of_another_source_file_is_made_again(spec):
    steps = Steps()
    choose(spec, steps)
    choose(spec.model_copy(update={"sha256": "cd" * 32}), steps)
    assert steps.made == 2


def test_another_version_of_a_name_gets_its_own_folder(spec):
    other = spec.model_copy(update={"default": False, "tag": "mine"})
    path = choose(other, Steps()).spec.path
    assert path == get_settings().models_dir / "tiny" / "q8_0-from-mine" / "Model.Q8_0.gguf"


def test_no_candidate_format_batches_here(spec):
    choice = choose(spec, Steps(), features=("AVX2",))
    assert choice.spec is spec and "no format the lab makes has a batched kernel" in choice.message


def test_a_quantizer_failure_says_how_to_go_on(spec):
    def fail(*args):
        raise RuntimeError("llama.cpp could not quantize Model.Q4_1.gguf to q8_0 (code 1).")

    with pytest.raises(registry.RegistryError, match="Run with --exact-model"):
        batch_format.choose(spec, exact=False, features=AVX2, make=fail, say=lambda m: None)


def test_explain_tells_the_trade_before_and_after_measuring(spec, monkeypatch):
    before = batch_format.explain(spec, features=AVX2)
    assert "Q4_1 has no batched kernel" in before and "the first time" in before
    assert "--exact-model" in before and "KL 0.19-0.26" in before
    choose(spec, Steps(kl=0.005))
    after = batch_format.explain(spec, features=AVX2)
    assert "KL 0.005 nats/token" in after and "the same model, with batched kernels" in after
    assert "as given" in batch_format.explain(spec, features=AMX)
