"""Tests for part2/examples/docstring_example.py: its doctests run and pass, every public
name is documented, its block table matches ggml's, and its sizes match a real GGUF file."""

from __future__ import annotations

import doctest
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "part2" / "examples" / "docstring_example.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("docstring_example", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


ex = _load_module()


def test_doctests_run_and_pass():
    result = doctest.testmod(ex, verbose=False, report=True)
    assert result.failed == 0
    assert result.attempted >= 15  # examples in the module, class and each function


def test_every_public_name_has_a_docstring_with_sections():
    public = [
        obj
        for name, obj in vars(ex).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == ex.__name__
    ]
    assert {f.__name__ for f in public} >= {"QuantFormat", "get_format", "weights_bytes", "main"}
    for obj in public:
        assert inspect.getdoc(obj), f"{obj.__name__} has no docstring"
    for func in (ex.get_format, ex.weights_bytes, ex.parse_count, ex.QuantFormat.tensor_bytes):
        doc = inspect.getdoc(func)
        for section in ("Args:", "Returns:", "Raises:", "Examples:"):
            assert section in doc, f"{func.__qualname__} lacks {section}"
    assert ex.__doc__.startswith("python part2/examples/docstring_example.py")


def test_block_table_matches_ggml():
    gguf = pytest.importorskip("gguf")
    for name, fmt in ex.FORMATS.items():
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert (fmt.block_size, fmt.block_bytes) == (block_size, block_bytes), name


@pytest.mark.slow  # GGUFReader parses all 49,152 vocabulary strings: about 10 s
def test_tensor_bytes_match_the_default_models_file():
    gguf = pytest.importorskip("gguf")
    from llmlab import registry

    reader = gguf.GGUFReader(registry.resolve().path)
    checked = 0
    for tensor in reader.tensors:
        fmt = ex.FORMATS.get(tensor.tensor_type.name)
        if fmt is not None:
            assert fmt.tensor_bytes(int(tensor.n_elements)) == int(tensor.n_bytes), tensor.name
            checked += 1
    assert checked == len(reader.tensors)


def test_get_format_accepts_any_case_and_size_suffix():
    assert ex.get_format(" q6_k ").name == "Q6_K"
    assert ex.get_format("Q3_K_S") is ex.FORMATS["Q3_K"]
    with pytest.raises(ValueError, match="Unknown format 'int3'. Known: F32"):
        ex.get_format("int3")


def test_sizes_and_errors():
    assert ex.weights_bytes(0, "Q4_0") == 0
    assert ex.weights_bytes(33, "Q4_0") == 2 * 18  # a partial block still takes a whole one
    assert ex.weights_bytes(256, ex.FORMATS["Q2_K"]) == 84
    with pytest.raises(ValueError, match="parameters must be >= 0"):
        ex.weights_bytes(-1, "F16")
    with pytest.raises(ValueError, match="n_elements must be >= 0"):
        ex.FORMATS["F32"].tensor_bytes(-4)
    assert ex.kv_cache_bytes(1, 1, 1, 1, bytes_per_value=4) == 8
    assert ex.format_bytes(1023) == "1023 B"
    assert ex.format_bytes(5 * 1024**4) == "5.0 TiB"
    assert ex.parse_count("2k") == 2000
    with pytest.raises(ValueError, match="Not a parameter count: 'lots'"):
        ex.parse_count("lots")


def test_main_prints_a_line_per_format_with_the_cache(capsys):
    argv = ["--params", "135M", "--formats", "Q8_0", "q4_k_m"]
    assert ex.main([*argv, "--layers", "30", "--kv-heads", "3", "--head-dim", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "KV cache at 2048 tokens: 45.0 MiB"
    assert lines[2].split() == ["Q8_0", "8.5", "136.8", "MiB", "181.8", "MiB"]
    assert lines[3].split() == ["Q4_K", "4.5", "72.4", "MiB", "117.4", "MiB"]
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--params", "135M", "--formats", "Q7"], "Unknown format 'Q7'"),
        (["--params", "many"], "Not a parameter count: 'many'"),
        (["--params", "1M", "--layers", "2"], "give all of --layers, --kv-heads and --head-dim"),
    ],
)
def test_main_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ex.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
