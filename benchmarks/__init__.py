"""posttrain's benchmark suite: `python -m benchmarks` (see benchmarks/README.md)."""

import posttrain  # noqa: F401  (first: it keeps the checkout's kernels/ from shadowing the PyPI package `kernels`)
