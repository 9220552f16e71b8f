"""Exceptions of the vfio-user server library.

::

    VfioUserError            anything this package raises
     +-- ProtocolError       the client broke the framing: close that connection
     +-- DisconnectedError   the peer went away (EOF, reset)
     +-- CommandError        one command is refused: an error reply with ``errno``,
                             the connection stays

The server never exits on any of them. What the client sent decides which one:
a message the server cannot frame (a header that lies about its size, lost
file descriptors, a reply where a command belongs) leaves no way to find the
next message, so the connection goes; a whole message that is wrong (a bad
payload, a region that does not exist, a map over another) is answered with
an error reply, as the protocol asks.
"""

from __future__ import annotations

import errno as _errno


class VfioUserError(Exception):
    """Base of every vfio-user error."""


class ProtocolError(VfioUserError):
    """The client sent something that cannot be framed; the connection must close."""


class DisconnectedError(VfioUserError):
    """The peer closed the connection."""


class CommandError(VfioUserError):
    """A command is refused; the reply carries ``errno``.

    :param message: what was wrong, for the log
    :param errno: the error number the client receives (EINVAL unless said)
    """

    def __init__(self, message: str, errno: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno
