"""vhost-user backend protocol for the vballoon device (QEMU's vhost-user-test-device)."""

from vhost_user.daemon import VhostUserDaemon
from vhost_user.errors import DisconnectedError, ProtocolError, Unsupported, VhostUserError

__all__ = [
    "DisconnectedError",
    "ProtocolError",
    "Unsupported",
    "VhostUserDaemon",
    "VhostUserError",
]
