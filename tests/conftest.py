"""Fixtures every suite shares: the model files, a zmq context, two fake backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.procs import ensure_models
from tests.shimproc import Fake, start_fake


@pytest.fixture(scope="session", autouse=True)
def model_files() -> Path:
    """``models/*.ngram`` exist (built like ``make models`` if missing)."""
    return ensure_models()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A context of the test's own, allowed more sockets than libzmq's default 1023."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.setsockopt(zmq.MAX_SOCKETS, 4096)
    yield context
    context.destroy(linger=0)


@pytest.fixture
def fakes() -> Iterator[dict[str, Fake]]:
    """Fake MMA and MMS backends (tests/fakes.py), each answering with its own name."""
    started = {"mma": start_fake("mma", "mma"), "mms": start_fake("mms", "mms")}
    yield started
    for fake in started.values():
        fake.kill()
