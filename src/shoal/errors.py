"""One exception tree for all of Shoal.

Protocol errors are split the way h11 splits them: a *remote* error means the peer sent
something we cannot accept (answer it with a protocol-correct error); a *local* error means
we were asked to send something invalid (a bug or a bad config on our side).
"""


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""


class ConfigError(ShoalError):
    """Invalid or unsupported configuration; carries where it came from and why."""

    def __init__(self, reason: str, *, field: str = "", source: str = "") -> None:
        self.reason = reason
        self.field = field
        self.source = source
        where = ": ".join(part for part in (source, field) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class ProtocolError(ShoalError):
    """A protocol rule was broken."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol."""
