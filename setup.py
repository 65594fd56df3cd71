"""Only what pyproject.toml cannot say: the compiled vendor-file scanner (cffi)."""

from setuptools import setup

setup(cffi_modules=["k2_assets/core/vendor_scan_build.py:ffibuilder"])
