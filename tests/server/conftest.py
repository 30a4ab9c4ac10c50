"""Fixtures of the server tests: one torch thread (tiny models only contend), the tiny model loaded once."""

from __future__ import annotations

import pytest

from tests.engine.conftest import one_torch_thread  # noqa: F401  (autouse, session scope)


@pytest.fixture(scope="session")
def tiny():
    import engine

    return engine.load(engine.hub.resolve("tiny"), dtype="float32", device="cpu")
