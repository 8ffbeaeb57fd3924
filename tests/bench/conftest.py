"""The benchmark suite's tests. benchmarks/ is imported by path: the repository root stays off sys.path, where its
kernels/ folder would shadow the PyPI package `kernels` (see posttrain._compat.unshadow_pypi_kernels)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_benchmarks():
    if "benchmarks" in sys.modules or not (ROOT / "benchmarks" / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "benchmarks", ROOT / "benchmarks" / "__init__.py", submodule_search_locations=[str(ROOT / "benchmarks")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)


_import_benchmarks()
