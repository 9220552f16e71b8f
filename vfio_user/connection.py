"""Messages and file descriptors over a Unix stream socket; no protocol state.

A message is a 16-byte header whose ``size`` counts the whole message. QEMU
pipelines commands (posted BAR writes most of all), so the reader takes what
the socket holds in one ``recvmsg`` and frames messages out of it, instead of
two system calls per message.

File descriptors ride on the first byte of the message that carries them: the
client sends each message with one ``sendmsg``, the kernel starts a new
buffer for it, and a read that meets a buffer with descriptors stops at its
end. So the descriptors of one read belong to the message holding the read's
last byte, and that message must start inside the read; anything else
(descriptors in mid-message, more than :attr:`Connection.max_fds`, which the
kernel reports as a truncated control buffer) is a protocol error, as is a
message not whole :data:`BODY_TIMEOUT` seconds after its first byte.

Nothing blocks in the server's direction: replies that the peer does not take
at once wait in a bounded queue (:meth:`Connection.flush`).
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import time
from dataclasses import dataclass

from vfio_user.errors import DisconnectedError, ProtocolError
from vfio_user.messages import HEADER_SIZE, Header

#: Seconds to wait for the rest of a message once its first byte arrived.
BODY_TIMEOUT = 5.0
#: Bytes asked of the socket per read.
READ_SIZE = 64 * 1024
#: Bytes of one descriptor in a control message.
FD_SIZE = array.array("i").itemsize


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of a ``recvmsg``'s control messages."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD_SIZE])
    return list(fds)


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (ignoring ones already closed)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class Message:
    """One whole message as received; the receiver owns ``fds``."""

    header: Header
    body: bytes
    fds: list[int]


@dataclass
class _FdBatch:
    """Descriptors of one read, by stream position of the read's first and last byte."""

    first: int
    last: int
    fds: list[int]


class Connection:
    """One end of a vfio-user socket.

    :param sock: a connected ``AF_UNIX`` stream socket; the connection owns it
    :param max_message: largest message accepted, header included
    :param max_fds: most descriptors one message may carry
    :param send_limit: if given, sends never block and more than this many unsent
        bytes mean the peer does not read (:class:`ProtocolError`); without it sends
        block until done (the test client's way)
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_message: int,
        max_fds: int,
        send_limit: int | None = None,
    ) -> None:
        self.sock = sock
        self.max_message = max_message
        self.max_fds = max_fds
        self.send_limit = send_limit
        self._pending = bytearray()
        self._rx = bytearray()
        #: stream position of ``_rx[0]``
        self._rx_pos = 0
        self._rx_since = 0.0
        self._fd_batches: list[_FdBatch] = []
        sock.setblocking(True)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> int:
        """Bytes queued for the peer, not yet sent."""
        return len(self._pending)

    # -- receiving ---------------------------------------------------------------------

    @property
    def receiving(self) -> bool:
        """Whether part of a message has arrived and the rest has not."""
        return bool(self._rx) and not self.buffered

    @property
    def buffered(self) -> bool:
        """Whether a whole message waits in the buffer (no read needed to take it)."""
        if len(self._rx) < HEADER_SIZE:
            return False
        size = int.from_bytes(self._rx[4:8], "little")
        return size >= HEADER_SIZE and len(self._rx) >= size

    def overdue(self, now: float | None = None) -> bool:
        """Whether a message being assembled is older than :data:`BODY_TIMEOUT`."""
        t = time.monotonic() if now is None else now
        return self.receiving and t - self._rx_since > BODY_TIMEOUT

    def poll_message(self) -> Message | None:
        """The next whole message, reading the socket (without blocking) only when none
        is buffered; None if none is whole yet. The caller owns its fds.

        :raise DisconnectedError: on EOF.
        :raise ProtocolError: on a bad header, lost or misplaced fds, or a message not
            whole :data:`BODY_TIMEOUT` seconds after its first byte.
        """
        msg = self._take()
        if msg is not None:
            return msg
        if self.overdue():
            raise ProtocolError(f"message not whole {BODY_TIMEOUT:g} s after its first byte")
        self._read()
        return self._take()

    def _read(self) -> None:
        """One non-blocking read of what the socket holds."""
        try:
            # Not socket.recv_fds: before Python 3.12 it drops its flags argument, and
            # a blocking read here would freeze the server's event loop.
            data, ancdata, flags, _ = self.sock.recvmsg(
                READ_SIZE,
                socket.CMSG_SPACE(self.max_fds * FD_SIZE),
                socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
            )
        except BlockingIOError:
            return
        except (ConnectionResetError, BrokenPipeError) as err:
            raise DisconnectedError(str(err)) from err
        fds = _fds_of(ancdata)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise ProtocolError(f"more than {self.max_fds} file descriptors in one message")
        if not data:
            close_fds(fds)
            raise DisconnectedError(
                "peer closed the connection" + (" mid-message" if self._rx else "")
            )
        if not self._rx:
            self._rx_since = time.monotonic()
        first = self._rx_pos + len(self._rx)
        if fds:
            self._fd_batches.append(_FdBatch(first, first + len(data) - 1, fds))
        self._rx += data

    def _take(self) -> Message | None:
        """Frame one message out of the buffer, with the fds that belong to it."""
        if len(self._rx) < HEADER_SIZE:
            return None
        header = Header.unpack(bytes(self._rx[:HEADER_SIZE]), self.max_message)
        if len(self._rx) < header.size:
            return None
        start, end = self._rx_pos, self._rx_pos + header.size
        fds: list[int] = []
        while self._fd_batches and self._fd_batches[0].last < end:
            batch = self._fd_batches.pop(0)
            if batch.first > start or batch.last < start:
                # Not the message that started inside that read: the fds were sent in
                # mid-message, or belong to no message we can name.
                close_fds(batch.fds + fds)
                raise ProtocolError("file descriptors arrived in the middle of a message")
            fds += batch.fds
        body = bytes(self._rx[HEADER_SIZE : header.size])
        del self._rx[: header.size]
        self._rx_pos = end
        if self._rx:
            self._rx_since = time.monotonic()
        return Message(header, body, fds)

    def wait_message(self, timeout: float) -> Message:
        """Block up to ``timeout`` seconds for the next whole message (the client's way).

        :raise TimeoutError: if none is whole by then.
        """
        deadline = time.monotonic() + timeout
        while True:
            msg = self.poll_message()
            if msg is not None:
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from the peer")
            select.select([self.sock], [], [], left)

    # -- sending ---------------------------------------------------------------------

    def send_message(self, header: Header, body: bytes = b"", fds: list[int] | None = None) -> None:
        """Send one message; its fds ride on its first byte.

        :raise DisconnectedError: if the peer is gone.
        """
        data = header.pack() + body
        if self.send_limit is not None:
            if fds:
                raise ValueError("a non-blocking connection sends no fds")
            self.send_bytes(data)
            return
        try:
            sent = socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as err:
            raise DisconnectedError(str(err)) from err

    def send_bytes(self, data: bytes) -> None:
        """Queue one whole message (header included) and send what the peer takes now.

        :raise ProtocolError: if more than ``send_limit`` bytes stay queued.
        :raise DisconnectedError: if the peer is gone.
        """
        self._pending += data
        self.flush()

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

    def close(self) -> None:
        for batch in self._fd_batches:
            close_fds(batch.fds)
        self._fd_batches = []
        with contextlib.suppress(OSError):
            self.sock.close()
