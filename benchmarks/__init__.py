"""posttrain's benchmark suite: `python -m benchmarks` (__main__.py) and the first GPU run (gpu_check.sh, NOTES.md)."""

import posttrain  # noqa: F401  (first: it keeps the checkout's kernels/ from shadowing the PyPI package `kernels`)
