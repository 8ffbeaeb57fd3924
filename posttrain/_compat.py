"""Everything that depends on a library's version or private API, in one place."""

import sys
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def unshadow_pypi_kernels() -> None:
    """Drop a source checkout's root from sys.path (`python -m ...` and `python -c` from the root put it there).

    Its kernels/ folder is installed as posttrain.kernels, but from the root it would shadow the PyPI package
    `kernels`, which transformers (a dependency since 5.25) imports when it loads a model.
    """
    if not (_SOURCE_ROOT / "kernels").is_dir() or not (_SOURCE_ROOT / "pyproject.toml").is_file():
        return
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _SOURCE_ROOT]
