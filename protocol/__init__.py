"""The FedMT wire protocol v1: topics, message schemas, tensor codec and chunked transfers.

Everything here is pure Python + msgspec + numpy, so both ends (and the GPU benchmark image) can import it;
`protocol.transport` is the only module that needs paho-mqtt.
"""

from protocol.errors import ProtocolError

__all__ = ["ProtocolError"]
