"""Only here because setuptools reads `cffi_modules` from setup(); metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_fastpath.py:ffibuilder"])
