"""pytest plugin of athomic (entry point ``pytest11``): the ``athomic_producer`` fixture.

::

    def test_signup_sends_a_welcome_event(athomic_producer):
        signup("ana@example.org", producer=athomic_producer)
        (event,) = athomic_producer.delivered()
        assert event.topic == "user.events.v1" and event.value["email"] == "ana@example.org"

Override ``athomic_settings`` (in a conftest.py or a test module) to test with your
application's settings. ``-p no:athomic`` turns the plugin off.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .settings import MessagingSettings
from .testing import TestProducer

TEST_DELAY_TOPICS: dict[float, str] = {
    1: "athomic.delay.1s", 10: "athomic.delay.10s", 60: "athomic.delay.1m",
    600: "athomic.delay.10m", 3600: "athomic.delay.1h", 86400: "athomic.delay.1d"}
"""Delay buckets of the default ``athomic_settings``, so delayed publishing works."""


@pytest.fixture
def athomic_settings() -> MessagingSettings:
    """The settings ``athomic_producer`` uses: ``MessagingSettings()`` (environment
    included) with delay topics from 1 s to 1 day. Override it to use your own."""
    return MessagingSettings(delay_topics=TEST_DELAY_TOPICS)


@pytest.fixture
def athomic_producer(athomic_settings: MessagingSettings) -> Iterator[TestProducer]:
    """A fresh ``athomic.testing.TestProducer`` per test: no Kafka, no athomic actors."""
    with TestProducer(athomic_settings) as producer:
        yield producer
