"""PodPulse: AirPods Pro fleet telemetry, from Kafka to insight.

The core every floor stands on: the event contract, Australian geography and clocks, pseudonyms,
the privacy floor, the fleet simulator, the embedded broker, Kafka clients, Ray setup, metrics and
the one error root. It imports nothing of PodPulse's other packages.
"""

__version__ = "0.1.0"
