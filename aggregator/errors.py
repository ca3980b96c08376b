"""Why the aggregator refuses an update, as metrics count it."""

from __future__ import annotations

from protocol.errors import ProtocolError


class Rejected(ProtocolError):
    """An update refused for a `reason` that metrics count: a short fixed label, unlike the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
