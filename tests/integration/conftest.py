"""The broker tier: tests against the real Kafka broker and a local Ray."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test: a Kafka future failed and dropped (a fenced producer's)
    logs when collected, and collected inside pytest's own parsing of a module that logging
    crashes Python 3.11's parser ("AST constructor recursion depth mismatch"). For the same
    reason tests/conftest.py imports the modules pytest would otherwise import late."""
    yield
    gc.collect()
