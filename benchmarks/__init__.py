"""Benchmarks: scripts that write reports under ``results/``, run from the repository root as modules.

    python -m benchmarks.run_benchmark ...   side-by-side rows on one dataset (results/<dataset>.md)
    python -m benchmarks.table2 ...          the cross-dataset summary (results/table2.md)

``bench_report`` is the shared report library (tables, plots, CSV); see ``benchmarks/README.md`` for
every script and the report it writes.
"""
