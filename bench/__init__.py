"""Benchmarks of cersa_kernels (pytest-benchmark), the memory benchmark and the report.

Run ``pytest bench/`` (see bench/README.md).  This folder is a package only so that
``tests/test_bench_tools.py`` can import its helpers; it is not installed.
"""
