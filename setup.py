# The package metadata is in pyproject.toml; setuptools takes cffi's
# extension modules and plain C extensions only through setup().
from setuptools import Extension, setup

setup(
    cffi_modules=["wsd/_pages_build.py:ffi", "wsd/kernel/_uapi_build.py:ffi"],
    ext_modules=[
        # xxh3 comes from libxxhash (Debian: libxxhash-dev to build, libxxhash0 to run),
        # AES-GCM from OpenSSL's libcrypto (libssl-dev to build, libssl3 to run).
        Extension(
            "wsd._batch",
            ["wsd/_batch.c"],
            libraries=["xxhash", "crypto"],
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ],
)
