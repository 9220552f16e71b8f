"""Exceptions of the vhost-user transport.

::

    VhostUserError           anything this package raises
     +-- ProtocolError       the frontend broke the protocol: close that connection
     +-- DisconnectedError   the peer went away (EOF, reset)
     +-- Unsupported         a request this backend does not implement

The process never exits on any of them: the connection is closed with a log
line and the next frontend is served.
"""


class VhostUserError(Exception):
    """Base of every vhost-user error."""


class ProtocolError(VhostUserError):
    """The frontend sent something malformed or out of order."""


class DisconnectedError(VhostUserError):
    """The peer closed the connection."""


class Unsupported(VhostUserError):
    """The backend does not implement this request."""
