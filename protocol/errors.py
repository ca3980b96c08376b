"""The one error type for input that breaks the protocol."""


class ProtocolError(ValueError):
    """A message, payload or topic that does not follow protocol v1.

    Raised before anything is applied: a handler that sees it drops the input and changes no state.
    """
