"""Package discovery for the kernels/ -> posttrain.kernels mapping declared in pyproject.toml."""

from setuptools import find_packages, setup

packages = find_packages(include=["posttrain", "posttrain.*"])
packages += ["posttrain.kernels"] + [f"posttrain.kernels.{name}" for name in find_packages("kernels")]

setup(packages=packages)
