"""Fixtures of the reliability suite; the machinery is in tests/reliability/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from tests.reliability.helpers import Ctx


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    """A context of the test's own, allowed more sockets than libzmq's default 1023."""
    context: Ctx = zmq.Context()
    context.setsockopt(zmq.MAX_SOCKETS, 4096)
    yield context
    context.destroy(linger=0)
