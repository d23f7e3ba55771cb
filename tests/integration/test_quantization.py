"""The quantization lab end to end: the full-precision file, llama.cpp's variants, their
registration as ``name:tag``, and a quality regression check.

The perplexity and the KL divergence from the ``f16`` reference of every variant must stay
within the bounds recorded in ``quantization_perplexity.json`` (measured once with
``python tests/integration/test_quantization.py`` and committed), and more bits must score
better, in the order of the recorded ``groups``: versions in one group are a measured tie
(see the file's ``why``), and perplexity may swap adjacent groups by at most
``perplexity_noise``. The variant files are kept in pytest's cache folder between runs,
since making them is the slow part (the first run makes them, once).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmlab import backends, quantize, registry
from llmlab.perplexity import evaluate, reference
from llmlab.settings import get_settings

BOUNDS = Path(__file__).with_name("quantization_perplexity.json")

pytestmark = pytest.mark.slow


def recorded() -> dict:
    return json.loads(BOUNDS.read_text())


def measure_all(paths: dict[str, Path], config: dict) -> dict[str, dict[str, float]]:
    """Perplexity and KL divergence from f16 of every variant, on the recorded slice."""
    text = quantize.heldout_text()
    ref = reference(paths["f16"], text, n_ctx=config["n_ctx"], max_tokens=config["max_tokens"])
    out = {"perplexity": {"f16": ref.perplexity}, "kl": {"f16": 0.0}}
    for tag, path in paths.items():
        if tag != "f16":
            result = evaluate(path, text, n_ctx=config["n_ctx"], reference=ref)
            out["perplexity"][tag], out["kl"][tag] = result.perplexity, result.kl
    return out


@pytest.fixture(scope="module")
def variants(request, tmp_path_factory) -> dict[str, Path]:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    home = cache.mkdir("llmlab-quantized") if cache else tmp_path_factory.mktemp("quantized")
    return quantize.build(quantize.TAGS, settings=get_settings(home=home))


@pytest.fixture(scope="module")
def measured(variants) -> dict[str, float]:
    return measure_all(variants, recorded())


def test_the_full_precision_file_keeps_the_metadata_and_the_weights(variants):
    import gguf
    import numpy as np

    reader = registry._header_reader_class()
    original = reader(str(registry.resolve().path), "r")
    full = reader(str(variants["f16"]), "r")
    assert set(full.fields) == set(original.fields)
    for key in ("tokenizer.chat_template", "llama.block_count", "tokenizer.ggml.eos_token_id"):
        assert full.get_field(key).contents() == original.get_field(key).contents()
    assert full.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_F16
    assert [t.name for t in full.tensors] == [t.name for t in original.tensors]
    source = next(t for t in original.tensors if t.name == "blk.0.attn_q.weight")
    copy = next(t for t in full.tensors if t.name == "blk.0.attn_q.weight")
    assert copy.tensor_type == gguf.GGMLQuantizationType.F16
    expected = gguf.quants.dequantize(source.data, source.tensor_type)
    np.testing.assert_allclose(
        np.asarray(copy.data, dtype=np.float32), expected, rtol=1e-3, atol=1e-6
    )


def test_each_variant_uses_its_quantization_type(variants):
    assert quantize.tensor_types(variants["q8_0"])["Q8_0"] >= 180
    assert quantize.tensor_types(variants["q6_k"])["Q6_K"] >= 1
    assert quantize.tensor_types(variants["q4_k_m"])["Q4_K"] >= 1
    # Rows of 576 values are not a multiple of the 256-value k-quant block: llama.cpp falls
    # back to a legacy type for those tensors, so q2_k is mostly not Q2_K.
    assert quantize.tensor_types(variants["q2_k"])["Q2_K"] < 100
    assert quantize.tensor_types(variants["q4_0"])["Q4_0"] >= 180
    assert quantize.tensor_types(variants["iq4_nl"])["IQ4_NL"] >= 180
    sizes = [variants[tag].stat().st_size for tag in quantize.TAGS]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("tag", quantize.TAGS)
def test_quality_stays_within_the_recorded_bounds(measured, tag):
    config = recorded()
    ppl, kl = measured["perplexity"][tag], measured["kl"][tag]
    expected_ppl, expected_kl = config["perplexity"][tag], config["kl"][tag]
    assert ppl == pytest.approx(expected_ppl, rel=config["tolerance"]), (
        f"{tag}: perplexity {ppl:.3f}, recorded {expected_ppl:.3f}"
    )
    assert kl == pytest.approx(expected_kl, rel=config["kl_tolerance"], abs=1e-4), (
        f"{tag}: KL divergence {kl:.5f}, recorded {expected_kl:.5f}"
    )


def test_more_bits_score_better(measured):
    config = recorded()
    groups = config["groups"]
    assert [tag for group in groups for tag in group] == list(quantize.TAGS)
    kl, ppl = measured["kl"], measured["perplexity"]
    slack = 1 + config["perplexity_noise"]
    for more, fewer in zip(groups, groups[1:], strict=False):
        assert max(kl[t] for t in more) < min(kl[t] for t in fewer), (more, fewer, kl)
        assert max(ppl[t] for t in more) <= min(ppl[t] for t in fewer) * slack, (more, fewer, ppl)
    assert ppl["q2_k"] > ppl["f16"] * slack  # two bits visibly cost quality


def test_registered_variants_resolve_and_chat(variants):
    specs = quantize.register({"q4_k_m": variants["q4_k_m"]})
    spec = registry.resolve("smollm2-135m-instruct:q4_k_m")
    assert spec.path == variants["q4_k_m"].resolve()
    assert spec.quantization == "Q4_K_M"
    assert spec.sha256 == specs["q4_k_m"].sha256
    assert registry.find("smollm2-135m-instruct").tag == "q4_1"  # the default is unchanged
    model = backends.load("smollm2-135m-instruct:q4_k_m", backend="llama.cpp", n_ctx=512)
    try:
        reply = model.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    finally:
        model.close()
    assert reply.text.strip()


@pytest.mark.parametrize("tag", ["q4_0", "iq4_nl"])
def test_the_batch_friendly_4_bit_variants_are_made_and_load(variants, tag):
    assert quantize.NOMINAL_BITS[tag] == 4.5
    quantize.register({tag: variants[tag]})
    assert registry.resolve(f"smollm2-135m-instruct:{tag}").quantization == tag.upper()
    model = backends.load(f"smollm2-135m-instruct:{tag}", backend="llama.cpp", n_ctx=256)
    try:
        reply = model.chat([{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0)
    finally:
        model.close()
    assert reply.text.strip()


def test_an_unknown_type_is_a_usage_error(capsys):
    assert quantize.main(["q9_z"]) == 2
    assert "Unknown quantization q9_z. Use: f16, q8_0" in capsys.readouterr().err


if __name__ == "__main__":  # record the bounds: python tests/integration/test_quantization.py
    import llama_cpp

    config = recorded()
    paths = quantize.build(quantize.TAGS, progress=print)
    values = measure_all(paths, config)
    config["perplexity"] = {tag: round(v, 4) for tag, v in values["perplexity"].items()}
    config["kl"] = {tag: round(v, 6) for tag, v in values["kl"].items()}
    config["measured_with"] = f"llama-cpp-python {llama_cpp.__version__}"
    BOUNDS.write_text(json.dumps(config, indent=2) + "\n")
    print(json.dumps(config, indent=2))
    sys.exit(0)
