# The package metadata is in pyproject.toml; setuptools takes cffi's
# extension modules only through setup().
from setuptools import setup

setup(cffi_modules=["wsd/_pages_build.py:ffi", "wsd/kernel/_uapi_build.py:ffi"])
