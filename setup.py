"""The one compiled part of chatloop (the project's metadata is in pyproject.toml): the eval callback that
non-final stages read their hidden states with, in C so that llama_decode never needs the GIL."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("chatloop.engine._capture", sources=["chatloop/engine/_capture.c"])])
