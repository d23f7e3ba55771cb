"""python part5/model_registry.py list

The model registry: list, show, verify, pull, add, remove and recommend local models.
Run with --help for every command and examples. The code lives in
``llmlab/registry_cli.py`` (the same program is installed as ``llmlab-models``) and
the registry itself in ``llmlab/registry.py``, which notebooks import directly.
"""

from llmlab.registry_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
