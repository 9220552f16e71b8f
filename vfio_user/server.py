"""The vfio-user socket side: listen, serve one client at a time, on the caller's event loop.

The client is QEMU's ``vfio-user-pci`` (or the test client). A client that
breaks the framing or goes away loses its connection; the process and the
device stay, and the next client is served. QEMU cannot reconnect (its proxy
goes to an error state when the socket closes), so for QEMU a lost connection
means a device gone until the VM restarts: the server closes a connection only
when the stream cannot be read any more.

Commands run in arrival order, as the protocol requires. A burst of pipelined
messages (QEMU posts BAR writes without waiting) is taken in batches of
:data:`BATCH` so that kicks, timers and other sockets get their turn; what is
left waits in the connection's buffer for the next turn of the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import vfio_user.connection
from vfio_user.connection import Connection
from vfio_user.dispatcher import MAX_MESSAGE, MAX_MSG_FDS, Session
from vfio_user.errors import DisconnectedError, VfioUserError
from vfio_user.function import Function
from vfio_user.irqs import IrqTable

log = logging.getLogger(__name__)

#: Messages handled per turn of the event loop.
BATCH = 64
#: Replies a client may leave unread before it is disconnected (the largest reply is
#: one REGION_READ of up to 1 MiB; a client that stops reading must not grow us).
SEND_LIMIT = 2 << 20


class VfioUserServer:
    """Serves ``function`` to one vfio-user client at a time.

    :param function: the device (outlives connections)
    :param listener: a bound, listening ``AF_UNIX`` socket; the server closes it
    :param on_event: called with "connected" / "disconnected" (for tests and logs)
    """

    def __init__(
        self,
        function: Function,
        listener: socket.socket,
        *,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.function = function
        self.listener: socket.socket | None = listener
        self.on_event = on_event
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: Connection | None = None
        self.session: Session | None = None
        self.irqs: IrqTable | None = None
        self.connections = 0
        self._continue: asyncio.Handle | None = None
        self._overdue_check: asyncio.TimerHandle | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept clients on the listener."""
        assert self.listener is not None
        self.loop = loop
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._on_accept)
        log.info("vfio-user: accepting clients on %s", self.listener.getsockname())

    def close(self) -> None:
        """Drop the client and stop listening."""
        self._drop("shutting down")
        if self.listener is not None and self.loop is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
        self.listener = None

    # -- connections -----------------------------------------------------------------

    def _on_accept(self) -> None:
        assert self.listener is not None and self.loop is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("vfio-user: refusing a second client while one is connected")
            sock.close()
            return
        self.connections += 1
        self.conn = Connection(
            sock, max_message=MAX_MESSAGE, max_fds=MAX_MSG_FDS, send_limit=SEND_LIMIT
        )
        self.irqs = IrqTable(self.function.irqs(), self._watch_fd, self._unwatch_fd)
        self.session = Session(self.function, self.irqs)
        self.function.connected(self.irqs)
        self.loop.add_reader(self.conn.fileno(), self._on_readable)
        log.info("vfio-user: client connected (connection %d)", self.connections)
        if self.on_event:
            self.on_event("connected")

    def _watch_fd(self, fd: int, callback: Callable[[], None]) -> None:
        assert self.loop is not None
        self.loop.add_reader(fd, callback)

    def _unwatch_fd(self, fd: int) -> None:
        assert self.loop is not None
        self.loop.remove_reader(fd)

    def _on_readable(self) -> None:
        self._guarded(self._serve_batch)

    def _serve_batch(self) -> None:
        """Handle up to :data:`BATCH` whole messages; come back soon if more are buffered."""
        self._continue = None
        conn, session = self.conn, self.session
        if conn is None or session is None:
            return
        for _ in range(BATCH):
            msg = conn.poll_message()
            if msg is None:
                break
            reply = session.handle(msg)
            if reply is not None:
                conn.send_bytes(reply)
            if self.conn is not conn:
                return  # a handler's effect ended the connection
        assert self.loop is not None
        if conn.buffered:
            self._continue = self.loop.call_soon(self._on_readable)
        elif conn.receiving and self._overdue_check is None:
            # Half a message and then silence: no readable event will come to time it out.
            self._overdue_check = self.loop.call_later(
                vfio_user.connection.BODY_TIMEOUT, self._check_overdue
            )

    def _check_overdue(self) -> None:
        self._overdue_check = None
        conn = self.conn
        if conn is None or not conn.receiving:
            return
        if conn.overdue():
            log.error("vfio-user: closing the connection: a message did not arrive whole")
            self._drop("protocol error")
        else:
            assert self.loop is not None
            self._overdue_check = self.loop.call_later(0.1, self._check_overdue)

    def _on_writable(self) -> None:
        assert self.conn is not None
        self._guarded(self.conn.flush)

    def _guarded(self, step: Callable[[], object]) -> None:
        """Run one step; whatever it raises ends the connection only."""
        try:
            step()
        except DisconnectedError as err:
            self._drop(f"client disconnected ({err})")
            return
        except VfioUserError as err:
            log.error("vfio-user: closing the connection: %s", err)
            self._drop("protocol error")
            return
        except Exception:  # a bug of ours must not take the device process down
            log.exception("vfio-user: internal error; closing the connection")
            self._drop("internal error")
            return
        conn, loop = self.conn, self.loop
        if conn is not None and loop is not None:
            if conn.pending:
                loop.add_writer(conn.fileno(), self._on_writable)
            else:
                loop.remove_writer(conn.fileno())

    def _drop(self, why: str) -> None:
        conn = self.conn
        if conn is None:
            return
        assert self.loop is not None
        for handle in (self._continue, self._overdue_check):
            if handle is not None:
                handle.cancel()
        self._continue = self._overdue_check = None
        self.loop.remove_reader(conn.fileno())
        self.loop.remove_writer(conn.fileno())
        self.function.disconnected()
        if self.session is not None:
            self.session.close()
        if self.irqs is not None:
            self.irqs.close()
        conn.close()
        self.conn = self.session = self.irqs = None
        log.info("vfio-user: %s; waiting for the next client", why)
        if self.on_event:
            self.on_event("disconnected")
