"""One root for PodPulse's own errors; the CLI prints them as one line."""

__all__ = ["PodPulseError", "ConfigError", "BrokerError", "StorageError"]


class PodPulseError(Exception):
    """Base of every error PodPulse raises on purpose."""


class ConfigError(PodPulseError):
    """A setting, argument or configuration file is invalid."""


class BrokerError(PodPulseError):
    """The Kafka broker could not be started, reached or used."""


class StorageError(PodPulseError):
    """A store could not be set up, read or written."""
