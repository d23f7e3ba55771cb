"""Benchmark suites for ``make bench``: one module per area, each with ``run(quick) -> list[Row]``."""
