"""The vhost-user socket side of the process: listen (or connect), one frontend at a time.

Runs on an asyncio event loop owned by the caller (the ``vballoon`` process):
the main socket, kick eventfds and the backend channel are plain readers on
that loop. A frontend that breaks the protocol or goes away loses its
connection; the process and the balloon device stay, and the next frontend
is served. (QEMU 11.1's vhost-user-test-device cannot reconnect, so with it a
backend restart means a VM restart; a backend must therefore never exit on
anything a frontend or guest sends.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import vhost_user.connection
from device import BalloonDevice
from device.defs import FRAME_SIZE
from vhost_user.adapter import BalloonVhostUserBackend
from vhost_user.connection import Connection
from vhost_user.dispatcher import Dispatcher
from vhost_user.errors import DisconnectedError, VhostUserError

log = logging.getLogger(__name__)

#: Seconds between connection attempts in client mode.
RECONNECT_INTERVAL = 0.5
#: Bytes of replies a frontend may leave unread before it is disconnected. Replies are
#: a few dozen bytes and QEMU reads each one at once; only a frontend that pipelines
#: requests without reading gets here. Sends never block the process.
SEND_LIMIT = 64 * 1024


class VhostUserDaemon:
    """Serves the balloon to one vhost-user frontend at a time.

    Give it either a listening socket (the caller created and owns its path) or
    a path to connect to (QEMU's chardev in server mode; retried until it works).

    :param device: the balloon device (outlives connections)
    :param listener: a bound, listening ``AF_UNIX`` socket; the daemon closes it
    :param connect_to: connect to a frontend listening here instead
    :param busy_poll_us: see :class:`device.runner.QueueRunner`
    :param on_event: called with a short string on connect/disconnect (for tests/logs)
    """

    def __init__(
        self,
        device: BalloonDevice,
        *,
        listener: socket.socket | None = None,
        connect_to: str | None = None,
        busy_poll_us: int = 0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if (listener is None) == (connect_to is None):
            raise ValueError("give exactly one of listener and connect_to")
        self.device = device
        self.busy_poll_us = busy_poll_us
        self.path = connect_to
        self.client = connect_to is not None
        self.on_event = on_event
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listener = listener
        self.conn: Connection | None = None
        self.dispatcher: Dispatcher | None = None
        self.backend: BalloonVhostUserBackend | None = None
        self.connections = 0
        self._reconnect: asyncio.TimerHandle | None = None
        self._overdue_check: asyncio.TimerHandle | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept frontends on the listener (or start connecting)."""
        self.loop = loop
        if self.listener is None:
            self._try_connect()
            return
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._on_accept)
        log.info("vhost-user: accepting frontends on %s", self.listener.getsockname())

    def close(self) -> None:
        """Drop the frontend (finishing nothing half-done) and stop listening."""
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        self._drop("shutting down")
        if self.listener is not None and self.loop is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None

    # -- connections -----------------------------------------------------------------

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("vhost-user: refusing a second frontend while one is connected")
            sock.close()
            return
        self._attach(sock)

    def _try_connect(self) -> None:
        self._reconnect = None
        if self._closed:
            return
        assert self.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # a full backlog must not block the process: try later
        try:
            sock.connect(self.path)
        except OSError as err:
            sock.close()
            log.debug("vhost-user: connect to %s failed: %s", self.path, err)
            assert self.loop is not None
            self._reconnect = self.loop.call_later(RECONNECT_INTERVAL, self._try_connect)
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        assert self.loop is not None
        # A new frontend is a new VM (QEMU 11.1's frontend cannot reconnect): nothing a
        # previous guest wrote or owned may carry over. Status, the ballooned-frame record,
        # actual and the poison value start afresh; the operator's target and the process
        # counters stay.
        self.device.reset()
        self.connections += 1
        self.conn = Connection(sock, send_limit=SEND_LIMIT)
        self.backend = BalloonVhostUserBackend(self.device, self.loop, self.busy_poll_us)
        self.dispatcher = Dispatcher(self.conn, self.backend)
        self.loop.add_reader(self.conn.fileno(), self._on_readable)
        log.info("vhost-user: frontend connected (connection %d)", self.connections)
        if self.on_event:
            self.on_event("connected")

    def _on_readable(self) -> None:
        assert self.dispatcher is not None and self.conn is not None and self.loop is not None
        self._guarded(self.dispatcher.handle_one)
        conn = self.conn
        if conn is not None and conn.receiving and self._overdue_check is None:
            # Half a message and then silence: no readable event will come to time it out.
            self._overdue_check = self.loop.call_later(
                vhost_user.connection.BODY_TIMEOUT, self._check_overdue
            )

    def _check_overdue(self) -> None:
        self._overdue_check = None
        conn = self.conn
        if conn is None or not conn.receiving:
            return
        if conn.overdue():
            log.error("vhost-user: closing the connection: a message did not arrive whole")
            self._drop("protocol error")
        else:
            assert self.loop is not None
            self._overdue_check = self.loop.call_later(0.1, self._check_overdue)

    def _on_writable(self) -> None:
        assert self.conn is not None
        self._guarded(self.conn.flush)

    def _guarded(self, step: Callable[[], object]) -> None:
        """Run one step of the connection; whatever it raises ends the connection only."""
        try:
            step()
        except DisconnectedError as err:
            self._drop(f"frontend disconnected ({err})")
            return
        except VhostUserError as err:
            log.error("vhost-user: closing the connection: %s", err)
            self._drop("protocol error")
            return
        except Exception:  # a bug of ours must not take the VM's balloon process down
            log.exception("vhost-user: internal error; closing the connection")
            self._drop("internal error")
            return
        # Replies the frontend did not take yet go out when it reads again.
        conn, loop = self.conn, self.loop
        if conn is not None and loop is not None:
            if conn.pending:
                loop.add_writer(conn.fileno(), self._on_writable)
            else:
                loop.remove_writer(conn.fileno())

    def _drop(self, why: str) -> None:
        if self.conn is None:
            return
        assert self.loop is not None
        if self._overdue_check is not None:
            self._overdue_check.cancel()
            self._overdue_check = None
        self.loop.remove_reader(self.conn.fileno())
        self.loop.remove_writer(self.conn.fileno())
        if self.backend is not None:
            self.backend.close()
        self.conn.close()
        self.conn = self.dispatcher = self.backend = None
        log.info(
            "vhost-user: %s; the device is stopped (the guest said it held %d MiB); "
            "a new frontend starts it afresh",
            why,
            self.device.actual * FRAME_SIZE >> 20,
        )
        if self.on_event:
            self.on_event("disconnected")
        if self.client and not self._closed:
            self._reconnect = self.loop.call_later(RECONNECT_INTERVAL, self._try_connect)
