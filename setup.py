# The only thing pyproject.toml cannot say: build the C accelerator with cffi.
from setuptools import setup

setup(cffi_modules=["device/_accel_build.py:ffibuilder"])
