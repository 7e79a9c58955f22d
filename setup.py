"""Build script: the package is pure Python; the C++/CUDA extension from csrc/ is added here.

Install with torch already present: ``pip install -e . --no-build-isolation``.
"""
from setuptools import setup

setup()
