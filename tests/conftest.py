"""Shared fixtures: the real embedded Kafka broker (Tansu), unique topics."""

from __future__ import annotations

import itertools
import os

import pytest

from podpulse.broker import EmbeddedBroker

_topic_ids = itertools.count()


@pytest.fixture(scope="session")
def broker():
    """One memory-only Tansu broker for the whole test session."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def new_topic(broker, request):
    """Create a fresh topic: ``new_topic(partitions) -> name``."""

    def make(partitions: int = 4) -> str:
        name = f"t{os.getpid()}-{next(_topic_ids)}-{request.node.name[:40]}".replace("[", "-").replace("]", "")
        broker.create_topic(name, partitions)
        return name

    return make
