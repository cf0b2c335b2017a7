"""Benchmarks of convgru_triton against the ConvGRUs users run.

``pytest bench --benchmark-only`` runs them; ``python -m bench.report`` turns the
JSON into a table and a chart; ``bench/gpu_check.sh`` is the GPU run.
"""
