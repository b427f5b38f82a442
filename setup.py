"""The one compiled part of manytask: the loops of `shards write` in data_pipeline/encode_kernels.c
(loaded with ctypes by data_pipeline/compiled_kernels.py). Optional: without a C compiler the
install goes on, and `shards write` runs its numpy code, which gives the same values."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("manytask.data_pipeline._encode_kernels", ["data_pipeline/encode_kernels.c"],
                             optional=True)])
