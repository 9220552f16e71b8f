"""Claiming a Unix socket path: the one way this process creates a listening socket.

A path is taken only if it is free or holds a *stale* socket (nobody accepts
on it); a live socket or any other file is refused with a message that says
which. The socket is created with mode 0600 (the umask is narrowed around
bind, so it is never briefly connectable by others), and on release the path is
unlinked only if it is still the very inode this process created: a second
process that took the path over keeps it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)

#: Seconds to wait for a listener to accept a probe connection.
PROBE_TIMEOUT = 1.0


class SocketPathError(Exception):
    """The path cannot be used; the message says why and what to check."""


def _free_path(path: str, what: str) -> None:
    """Make ``path`` free for bind: remove a stale socket, refuse anything else.

    :raise SocketPathError: if something listens there, it is not a socket, or
        its directory is missing or not writable.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise SocketPathError(f"{what} {path}: directory {parent} does not exist") from None
        if not os.access(parent, os.W_OK):
            raise SocketPathError(f"{what} {path}: directory {parent} is not writable") from None
        return
    except OSError as err:
        raise SocketPathError(f"cannot inspect {path}: {err.strerror or err}") from err
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a full backlog: somebody is listening
    except OSError as err:
        raise SocketPathError(
            f"cannot check whether {path} is in use: {err.strerror or err}"
        ) from err
    finally:
        probe.close()
    raise SocketPathError(
        f"{what} {path} is in use: another process listens on it (is vballoon already running?)"
    )


class ClaimedSocket:
    """A listening Unix socket bound at a path this process claimed.

    :param path: where to create it
    :param what: how error messages name it (``control socket``, ``vhost-user socket``)
    :param backlog: listen backlog
    :raise SocketPathError: if the path cannot be claimed or the socket not created 0600
    """

    def __init__(
        self, path: str | os.PathLike[str], what: str = "socket", backlog: int = 8
    ) -> None:
        self.path = os.fspath(path)
        self.what = what
        _free_path(self.path, what)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._inode: tuple[int, int] | None = None
        try:
            # umask is per process: a window where other threads create files 0600 is
            # harmless, a socket born connectable by everyone is not.
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.chmod(self.path, 0o600)
                st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600:
                raise SocketPathError(
                    f"{what} {self.path} has mode {stat.S_IMODE(st.st_mode):o}, not 600"
                )
            sock.listen(backlog)
        except OSError as err:
            sock.close()
            self._unlink()
            raise SocketPathError(
                f"cannot create {what} {self.path}: {err.strerror or err}"
            ) from err
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self.sock = sock

    def is_ours(self) -> bool:
        """Whether the path still names the socket this object created."""
        if self._inode is None:
            return False
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def _unlink(self) -> None:
        """Remove the path if it is still ours; never someone else's."""
        if self._inode is None:
            return
        try:
            if self.is_ours():
                os.unlink(self.path)
        except OSError as err:
            if err.errno != errno.ENOENT:
                log.warning("cannot remove %s %s: %s", self.what, self.path, err)
        self._inode = None

    def release(self) -> None:
        """Close the socket and remove the path if it is still ours (safe to call twice)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        self._unlink()
