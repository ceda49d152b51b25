"""Parrot's benchmarks: scripts that print comparable figures (see ../shared/BENCHMARKS.md).

Each module is runnable: ``python -m benchmarks.NAME --help``. Every figure
is a ratio against a baseline run in the same process, on the same device,
alternating with the contender after a warm-up (:mod:`benchmarks.harness`).
They are not run by CI; ``tests/test_benchmarks.py`` smoke-tests them at
their smallest sizes.
"""
