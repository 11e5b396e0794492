"""Build hook: compiles the native O_DIRECT core through cffi (API mode, out of line)."""

from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
