"""The one compiled part of manytask: the loops of `shards write` in data_pipeline/encode_kernels.c
(loaded with ctypes by data_pipeline/compiled_kernels.py). Optional: without a C compiler the
install goes on, and `shards write` runs its numpy code, which gives the same values.

The library records the sha256 of the source it was built from (SOURCE_SHA256): a library left
from an older source (a `git pull` without reinstalling) is not used, rather than called with
arguments it does not take."""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "data_pipeline/encode_kernels.c"
digest = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(ext_modules=[Extension("manytask.data_pipeline._encode_kernels", [SOURCE], optional=True,
                             define_macros=[("SOURCE_SHA256", f'"{digest}"')])])
