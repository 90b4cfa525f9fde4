"""Only here to name the cffi extension; everything else lives in pyproject.toml."""

from setuptools import setup

setup()
