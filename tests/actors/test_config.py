"""IngestConfig: the event-time window it carries to the consumers."""

import pytest

from actors.config import IngestConfig
from podpulse.contract import DEFAULT_WINDOW, EventWindow
from podpulse.errors import ConfigError


def test_the_window_defaults_to_the_decoders():
    config = IngestConfig(bootstrap="127.0.0.1:9092", topic="t")
    assert (config.max_event_age_s, config.max_future_skew_s) == (60 * 86400, 86400)
    assert config.window == DEFAULT_WINDOW


def test_the_window_follows_the_settings():
    config = IngestConfig(bootstrap="127.0.0.1:9092", topic="t", max_event_age_s=3600, max_future_skew_s=30.5)
    assert config.window == EventWindow(max_age_s=3600, max_future_skew_s=30.5)
    assert (config.window.max_age_ms, config.window.max_future_skew_ms) == (3_600_000, 30_500)


@pytest.mark.parametrize("kw, words", [
    (dict(max_event_age_s=0), "max event age must be a positive number of seconds, got 0"),
    (dict(max_event_age_s=-86400), "max event age must be a positive number of seconds, got -86400"),
    (dict(max_event_age_s=float("nan")), "max event age"),
    (dict(max_future_skew_s=0), "max future skew must be a positive number of seconds, got 0"),
    (dict(max_future_skew_s="1d"), "max future skew must be a positive number of seconds, got '1d'"),
])
def test_a_window_that_is_not_positive_is_refused(kw, words):
    with pytest.raises(ConfigError) as e:
        IngestConfig(bootstrap="127.0.0.1:9092", topic="t", **kw)
    assert words in str(e.value)
