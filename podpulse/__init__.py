"""PodPulse: AirPods Pro fleet telemetry, from Kafka to insight.

The domain package: the event contract, Australian geography, the fleet
simulator, the embedded broker, configuration and the ``podpulse`` CLI.
"""

__version__ = "0.1.0"
