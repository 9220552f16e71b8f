"""Bytes and file descriptors over a Unix stream socket; no protocol state.

A message is a 12-byte header and ``size`` payload bytes. File descriptors
arrive as SCM_RIGHTS with the first ``recvmsg`` of a message (the one that
reads the header); a control buffer too small for them (MSG_CTRUNC) would
silently lose fds, so that is a protocol error.

The backend reads with :meth:`Connection.poll_message`, which never blocks: a
message that arrives in pieces is assembled across calls, and one that is not
whole :data:`BODY_TIMEOUT` seconds after its first byte is a protocol error
(:meth:`Connection.overdue` tells when to look). A frontend that sends half a
message and stalls therefore holds nothing but its own connection. The test
frontend reads replies with the blocking :meth:`Connection.recv_message`.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import time

from vhost_user.errors import DisconnectedError, ProtocolError
from vhost_user.messages import HEADER_SIZE, MAX_FDS, Header

#: Bytes of one descriptor in a control message.
_FD_SIZE = array.array("i").itemsize

#: Seconds to wait for the rest of a message once its header arrived.
BODY_TIMEOUT = 5.0


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of a ``recvmsg``'s control messages."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    return list(fds)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Connection:
    """One end of a vhost-user socket (main channel or backend-request channel).

    :param sock: a connected ``AF_UNIX`` stream socket; the connection owns it.
    :param send_limit: if given, sends never block: what the peer does not take at once
        waits in a queue (:meth:`flush` sends more of it), and a queue longer than this
        many bytes means the peer does not read: :class:`ProtocolError`. The backend uses
        it, so that a frontend that stops reading cannot stall the process. Without it
        sends block until done (the test frontend's way).
    """

    def __init__(self, sock: socket.socket, *, send_limit: int | None = None) -> None:
        self.sock = sock
        self.send_limit = send_limit
        self._pending = bytearray()
        # A message being assembled by poll_message: its bytes, fds, header, first byte's time.
        self._rx = bytearray()
        self._rx_fds: list[int] = []
        self._rx_header: Header | None = None
        self._rx_since = 0.0
        sock.setblocking(True)

    @property
    def pending(self) -> int:
        """Bytes queued for the peer, not yet sent."""
        return len(self._pending)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        """``n`` bytes, all of them before ``deadline`` (a frontend trickling bytes
        must not hold the event loop: the timeout covers the message, not each recv)."""
        chunks = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("message body did not arrive in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(n)
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
            except (ConnectionResetError, BrokenPipeError) as err:
                raise DisconnectedError(str(err)) from err
            except TimeoutError as err:
                raise ProtocolError("message body did not arrive") from err
            if not data:
                raise DisconnectedError("peer closed the connection mid-message")
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    @property
    def receiving(self) -> bool:
        """Whether part of a message has arrived and the rest has not."""
        return bool(self._rx)

    def overdue(self, now: float | None = None) -> bool:
        """Whether a message being assembled is older than :data:`BODY_TIMEOUT`."""
        t = time.monotonic() if now is None else now
        return bool(self._rx) and t - self._rx_since > BODY_TIMEOUT

    def poll_message(self) -> tuple[Header, bytes, list[int]] | None:
        """Take what the peer sent so far, without blocking; a whole message once one is
        complete (the caller owns its fds), else None.

        :raise DisconnectedError: on EOF.
        :raise ProtocolError: on a malformed header, lost fds, or a message not whole
            :data:`BODY_TIMEOUT` seconds after its first byte.
        """
        try:
            return self._poll_message()
        except BaseException:
            _close_fds(self._rx_fds)
            self._rx_fds = []
            raise

    def _poll_message(self) -> tuple[Header, bytes, list[int]] | None:
        if self.overdue():
            raise ProtocolError(f"message not whole {BODY_TIMEOUT:g} s after its first byte")
        if self._rx_header is None:
            try:
                # Not socket.recv_fds: before Python 3.12 it drops its flags argument
                # and would block the event loop on a spurious wakeup.
                data, ancdata, flags, _ = self.sock.recvmsg(
                    HEADER_SIZE - len(self._rx),
                    socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                )
                fds = _fds_of(ancdata)
            except BlockingIOError:
                return None
            except (ConnectionResetError, BrokenPipeError) as err:
                raise DisconnectedError(str(err)) from err
            self._rx_fds += fds  # they ride on the first byte of the message
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            if not data:
                raise DisconnectedError(
                    "peer closed the connection" + (" mid-message" if self._rx else "")
                )
            if not self._rx:
                self._rx_since = time.monotonic()
            self._rx += data
            if len(self._rx) < HEADER_SIZE:
                return None
            self._rx_header = Header.unpack(bytes(self._rx))
        need = HEADER_SIZE + self._rx_header.size
        while len(self._rx) < need:
            try:
                data = self.sock.recv(need - len(self._rx), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except (ConnectionResetError, BrokenPipeError) as err:
                raise DisconnectedError(str(err)) from err
            if not data:
                raise DisconnectedError("peer closed the connection mid-message")
            self._rx += data
        msg = (self._rx_header, bytes(self._rx[HEADER_SIZE:]), self._rx_fds)
        self._rx = bytearray()
        self._rx_fds = []
        self._rx_header = None
        return msg

    def recv_message(self) -> tuple[Header, bytes, list[int]]:
        """Read one whole message; the caller owns the returned fds.

        :raise DisconnectedError: on EOF before a header.
        :raise ProtocolError: on a malformed header, lost fds or a truncated body.
        """
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, HEADER_SIZE, MAX_FDS)
        except (ConnectionResetError, BrokenPipeError) as err:
            raise DisconnectedError(str(err)) from err
        if not data:
            _close_fds(fds)
            raise DisconnectedError("peer closed the connection")
        deadline = time.monotonic() + BODY_TIMEOUT
        try:
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            try:
                if len(data) < HEADER_SIZE:
                    data += self._recv_exact(HEADER_SIZE - len(data), deadline)
                header = Header.unpack(data)
                body = self._recv_exact(header.size, deadline) if header.size else b""
            finally:
                self.sock.settimeout(None)
        except BaseException:
            _close_fds(fds)
            raise
        return header, body, fds

    def send_message(self, header: Header, body: bytes = b"", fds: list[int] | None = None) -> None:
        """Send one message (fds ride on its first byte).

        :raise DisconnectedError: if the peer is gone.
        """
        data = header.pack() + body
        if self.send_limit is not None:
            if fds:
                raise ValueError("a non-blocking connection sends no fds")
            self._pending += data
            self.flush()
            return
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], fds)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as err:
            raise DisconnectedError(str(err)) from err

    def flush(self) -> None:
        """Send as much of the queue as the peer takes now, without blocking.

        :raise ProtocolError: if more than ``send_limit`` bytes stay queued.
        :raise DisconnectedError: if the peer is gone.
        """
        while self._pending:
            try:
                sent = self.sock.send(self._pending, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionResetError) as err:
                raise DisconnectedError(str(err)) from err
            del self._pending[:sent]
        if self.send_limit is not None and len(self._pending) > self.send_limit:
            raise ProtocolError(
                f"the peer does not read: {len(self._pending)} bytes of replies unsent"
            )

    def try_send(self, header: Header, body: bytes = b"") -> bool:
        """Send one message without blocking; False if the socket is full (nothing was sent).

        A message the peer takes only part of is queued whole for :meth:`flush`.

        :raise DisconnectedError: if the peer is gone.
        """
        if self._pending:
            self.flush()
            if self._pending:
                return False
        data = header.pack() + body
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (BrokenPipeError, ConnectionResetError) as err:
            raise DisconnectedError(str(err)) from err
        self._pending += data[sent:]
        return True

    def close(self) -> None:
        _close_fds(self._rx_fds)
        self._rx_fds = []
        with contextlib.suppress(OSError):
            self.sock.close()
