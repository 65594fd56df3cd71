"""Only what pyproject.toml cannot say: the compiled parts (cffi), the vendor-file scanner and the Kafka batch reader."""

from setuptools import setup

setup(cffi_modules=["k2_assets/core/vendor_scan_build.py:ffibuilder", "k2_assets/core/kafka_batch_build.py:ffibuilder"])
