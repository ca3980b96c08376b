"""The FedMT edge agent: device profile, MQTT session, co-located task processes, update upload."""

__version__ = "0.1.0"
