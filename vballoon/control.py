"""The control socket: QMP's wire format over a private Unix socket.

QEMU's own ``balloon`` and ``query-balloon`` cannot reach a balloon that lives
in another process (only in-QEMU models register a balloon handler), so this
process answers them itself, in QMP's wire format, so that ``qemu.qmp``,
``qmp-shell`` and scripts written for QEMU work unchanged.

Wire format (QEMU docs/interop/qmp-spec.rst), as a client sees it:

- on connect the server sends a greeting ``{"QMP": {"version": ..., "capabilities": []}}``;
- the client must run ``qmp_capabilities`` first; anything else gets a
  ``CommandNotFound`` error until it has;
- requests are JSON objects ``{"execute": NAME, "arguments": {...}, "id": ANY}``.
  They need not be separated by newlines (``qemu.qmp`` sends none), so input
  is cut into JSON texts by tracking nesting (:class:`JsonFramer`), not by lines;
- each reply is ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``
  on one line, carrying the request's ``id`` when it had one. Input that is not
  JSON, or not an object, gets an error without ``id`` and the connection stays up;
- events ``{"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}``
  go to every client that has negotiated.

Commands (sizes in bytes, pages of 4 KiB; member names are kebab-case as in QMP):

``balloon {"value": int}``
    Ask the guest to shrink or grow to ``value`` bytes of RAM, as QEMU's
    command: ``num_pages = (ram_size - value) >> 12``.
``query-balloon``
    ``{"actual": guest RAM size now}``, as QEMU (the guest's size, not the balloon's).
``query-balloon-stats``
    QEMU's ``guest-stats`` shape: ``{"stats": {"stat-...": value or -1},
    "last-update": epoch seconds or 0}`` plus ``"age-seconds"`` (null if none yet).
``query-vballoon``
    Features, queue layout, sizes, free-page-hint state and every device
    counter. Names from the device (queues, ``BalloonMetrics`` fields) are
    given in kebab-case: ``free_page`` becomes ``free-page``.
``query-commands``
    ``[{"name": ...}]``, which ``qmp-shell`` uses for completion.

Event ``BALLOON_CHANGE {"actual": guest RAM size}`` follows every change of
``actual`` by the guest, throttled like QEMU's: the first at once, then at
most one per ``event_interval`` carrying the latest value.

Errors::

    ControlError     the socket cannot be created (path in use, not a socket, mode)
    QmpError         one command failed; becomes a QMP error reply (never escapes)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from device import BalloonDevice, BalloonError, Feature, GuestMemory
from device.defs import FRAME_SIZE, STAT_NAMES, Status

log = logging.getLogger(__name__)

#: Largest JSON text accepted from a client; commands here are a few dozen bytes.
MAX_INPUT_BYTES = 64 * 1024
#: Deepest nesting accepted (QEMU allows 1024; nothing here nests beyond 3).
MAX_INPUT_DEPTH = 32
#: Bytes read from a client at a time.
READ_CHUNK = 4096
#: Output a client may leave unread (events pile up) before it is disconnected,
#: so a stuck client cannot grow this process without bound.
MAX_PENDING_OUTPUT = 1 << 20
#: QEMU's rate limit for BALLOON_CHANGE (monitor_qapi_event_conf): one per second.
BALLOON_CHANGE_INTERVAL = 1.0

# QMP error classes (QEMU qapi/error.json), the ones this server uses.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"

NO_MEMORY = "guest memory is not known yet: no frontend has sent its memory table"

_WHITESPACE = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
#: Bytes that end a bare top-level scalar such as ``42`` or ``true``.
_SCALAR_END = _WHITESPACE | _OPEN | _CLOSE | frozenset(b'",:')
_QUOTE, _BACKSLASH, _NEWLINE = 0x22, 0x5C, 0x0A


class ControlError(Exception):
    """The control socket cannot be set up (the message says why and what to do)."""


class QmpError(Exception):
    """A command failed: becomes ``{"error": {"class": cls, "desc": desc}}``.

    :param cls: QMP error class (``GenericError``, ``CommandNotFound``, ...)
    :param desc: human-readable reason, one sentence
    """

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


# -- framing ------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A piece of input that cannot be a JSON text (reported, then skipped)."""

    desc: str


class JsonFramer:
    """Cuts a byte stream into top-level JSON texts without parsing them.

    QMP clients may send objects back to back with no separator, so a text
    ends where its outermost brace closes, not at a newline. Only strings,
    escapes and nesting are tracked; ``json.loads`` judges the rest. Input is
    bounded: an over-long or over-deep text is dropped (its end still found)
    and reported as :class:`Malformed`. A raw newline inside a string is never
    valid JSON, so it ends the text at once: a client that forgot a quote gets
    an error and its next line is read afresh.

    :param max_bytes: longest text kept
    :param max_depth: deepest nesting kept
    """

    def __init__(self, max_bytes: int = MAX_INPUT_BYTES, max_depth: int = MAX_INPUT_DEPTH) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False
        self._problem: str | None = None

    def _keep(self, b: int) -> None:
        if self._problem is not None:
            return
        if len(self._buf) >= self.max_bytes:
            self._problem = f"input longer than {self.max_bytes} bytes"
            self._buf.clear()
        else:
            self._buf.append(b)

    def _finish(self) -> bytes | Malformed:
        text: bytes | Malformed = (
            bytes(self._buf) if self._problem is None else Malformed(self._problem)
        )
        self._reset()
        return text

    def _fail(self, desc: str) -> Malformed:
        self._reset()
        return Malformed(desc)

    def feed(self, data: bytes) -> list[bytes | Malformed]:
        """Take the next bytes; return the texts (or problems) they complete, in order."""
        out: list[bytes | Malformed] = []
        for b in data:
            if self._scalar:
                if b not in _SCALAR_END:
                    self._keep(b)
                    continue
                out.append(self._finish())  # b belongs to what follows
            if self._depth == 0 and not self._in_string:
                if b in _WHITESPACE:
                    continue
                self._keep(b)
                if b in _OPEN:
                    self._depth = 1
                elif b == _QUOTE:
                    self._in_string = True
                elif b in _CLOSE:
                    out.append(self._fail(f"unexpected {chr(b)!r} outside any object"))
                else:
                    self._scalar = True
                continue
            self._keep(b)
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif b == _BACKSLASH:
                    self._escape = True
                elif b == _QUOTE:
                    self._in_string = False
                    if self._depth == 0:
                        out.append(self._finish())
                elif b == _NEWLINE:
                    out.append(self._fail("newline inside a string (missing quote?)"))
            elif b == _QUOTE:
                self._in_string = True
            elif b in _OPEN:
                self._depth += 1
                if self._depth > self.max_depth and self._problem is None:
                    self._problem = f"nesting deeper than {self.max_depth}"
                    self._buf.clear()
            elif b in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    out.append(self._finish())
        return out


# -- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    """One command argument: name, accepted JSON type, whether it must be given."""

    name: str
    kind: str  # "int" or "str-list"
    required: bool = True

    def accepts(self, value: object) -> bool:
        if self.kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    @property
    def type_name(self) -> str:
        return {"int": "integer", "str-list": "array of strings"}[self.kind]


@dataclass(frozen=True)
class _Command:
    handler: Callable[[_Session, dict[str, Any]], object]
    params: tuple[_Param, ...] = ()


class _Session:
    """One connected client: its stream and whether it has negotiated capabilities."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one message; drop the client if it leaves too much unread."""
        if self.writer.is_closing():
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")
        if self.writer.transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.warning("control client reads nothing back: disconnecting it")
            self.writer.close()


def _feature_names(bits: int) -> list[str]:
    """Names such as ``stats-vq`` for each set bit (``bit-N`` for unknown ones)."""
    known = {int(f): f.name for f in Feature if f.name is not None}
    out = []
    for bit in range(64):
        if bits >> bit & 1:
            name = known.get(1 << bit)
            out.append(name.lower().replace("_", "-") if name else f"bit-{bit}")
    return out


def _version() -> tuple[str, list[int]]:
    try:
        text = metadata.version("vballoon")
    except metadata.PackageNotFoundError:
        text = "0.0.0"
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    return text, parts + [0] * (3 - len(parts))


def _timestamp() -> dict[str, int]:
    """QMP event time: wall clock split into seconds and microseconds."""
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


class _State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"


class ControlServer:
    """QMP-compatible control socket for one :class:`BalloonDevice`.

    Commands run in this server's event loop. If the device is serviced from
    another thread, pass that thread's lock as ``lock``: every command holds
    it while it touches the device. The ``actual`` hook may be called from
    any thread; the event is handed to this loop.

    :param path: where to create the Unix socket (mode 0600)
    :param device: the balloon this socket controls
    :param event_interval: least seconds between two BALLOON_CHANGE events (0: no limit)
    :param lock: held around each command's device access
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: BalloonDevice,
        *,
        event_interval: float = BALLOON_CHANGE_INTERVAL,
        lock: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.device = device
        self.event_interval = event_interval
        self._lock: contextlib.AbstractContextManager[Any] = lock or contextlib.nullcontext()
        self._state = _State.IDLE
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._inode: tuple[int, int] | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._chained: Callable[[int], None] | None = None
        self._throttle: asyncio.TimerHandle | None = None
        self._pending_actual: int | None = None
        text, (major, minor, micro) = _version()
        self._greeting = {
            "QMP": {
                "version": {
                    "qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": f"vballoon {text}",
                },
                "capabilities": [],
            }
        }
        self._commands: dict[str, _Command] = {
            "qmp_capabilities": _Command(
                self._cmd_capabilities, (_Param("enable", "str-list", required=False),)
            ),
            "query-commands": _Command(self._cmd_query_commands),
            "balloon": _Command(self._cmd_balloon, (_Param("value", "int"),)),
            "query-balloon": _Command(self._cmd_query_balloon),
            "query-balloon-stats": _Command(self._cmd_query_balloon_stats),
            "query-vballoon": _Command(self._cmd_query_vballoon),
        }

    # -- lifecycle ---------------------------------------------------------------

    @property
    def client_count(self) -> int:
        """Clients connected now (negotiated or not)."""
        return len(self._sessions)

    async def start(self) -> None:
        """Create the socket and start accepting clients; hook the device's ``actual``.

        :raise ControlError: if the path is taken by a live socket or a non-socket,
            or the socket cannot be created with mode 0600.
        """
        if self._state is not _State.IDLE:
            raise ControlError(f"control socket {self.path}: start() may be called once")
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._chained = self.device.on_actual_change
        self.device.on_actual_change = self._actual_changed
        self._state = _State.RUNNING
        log.info("control socket listening on %s", self.path)

    async def close(self) -> None:
        """Stop accepting, drop every client, remove the socket; the hook is unchained.

        Safe to call more than once.
        """
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        if self.device.on_actual_change == self._actual_changed:
            self.device.on_actual_change = self._chained
        if self._throttle is not None:
            self._throttle.cancel()
            self._throttle = None
        assert self._server is not None
        self._server.close()
        for session in list(self._sessions):
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._unlink()
        log.info("control socket %s closed", self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _bind(self) -> socket.socket:
        """A socket bound at ``path`` with mode 0600, after clearing a stale one."""
        self._clear_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask is per process: a window where other threads create
            # files 0600 is harmless, a socket born world-connectable is not.
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
                raise ControlError(
                    f"control socket {self.path} has mode {stat.S_IMODE(st.st_mode):o}, not 600"
                )
        except OSError as err:
            sock.close()
            self._unlink()
            raise ControlError(
                f"cannot create control socket {self.path}: {err.strerror or err}"
            ) from err
        except BaseException:
            sock.close()
            self._unlink()
            raise
        return sock

    def _clear_path(self) -> None:
        """Remove a stale socket at ``path``; refuse a live one or any other file."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise ControlError(f"cannot inspect {self.path}: {err.strerror or err}") from err
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            pass  # a full backlog: somebody is listening
        except OSError as err:
            raise ControlError(
                f"cannot check whether {self.path} is in use: {err.strerror or err}"
            ) from err
        finally:
            probe.close()
        raise ControlError(
            f"control socket {self.path} is in use: another process listens on it "
            "(is vballoon already running?)"
        )

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one this server created."""
        if self._inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError as err:
            if err.errno != errno.ENOENT:
                log.warning("cannot remove control socket %s: %s", self.path, err)
        self._inode = None

    # -- clients (run in the event loop) ----------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client from greeting to hang-up; its failures stay its own."""
        task = asyncio.current_task()
        assert task is not None
        session = _Session(writer)
        self._sessions.add(session)
        self._tasks.add(task)
        framer = JsonFramer()
        try:
            session.send(self._greeting)
            await writer.drain()
            while not writer.is_closing():
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                for text in framer.feed(data):
                    session.send(self._handle(session, text))
                await writer.drain()
        except (ConnectionError, OSError) as err:
            log.debug("control client went away: %s", err)
        finally:
            self._sessions.discard(session)
            self._tasks.discard(task)
            writer.close()

    def _handle(self, session: _Session, text: bytes | Malformed) -> dict[str, Any]:
        """The reply to one JSON text from ``session``."""
        if isinstance(text, Malformed):
            return _error(GENERIC_ERROR, f"JSON parse error, {text.desc}")
        try:
            request = json.loads(text)
        except UnicodeDecodeError:
            return _error(GENERIC_ERROR, "JSON parse error, input is not valid UTF-8")
        except ValueError as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            return _error(GENERIC_ERROR, f"JSON parse error, {reason.lower()}")
        if not isinstance(request, dict):
            return _error(GENERIC_ERROR, "QMP input must be a JSON object")
        name = request.get("execute")
        try:
            reply = {"return": self._execute(session, request)}
        except QmpError as err:
            reply = _error(err.cls, err.desc)
        except Exception as err:  # a bug must not take the socket down
            log.exception("control command %r failed", name)
            reply = _error(GENERIC_ERROR, f"internal error in {name!r}: {err}")
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _execute(self, session: _Session, request: dict[str, Any]) -> object:
        """Check the request's shape, negotiation and arguments; run the command.

        :raise QmpError: for every failure a client should see.
        """
        for key in request:
            if key not in ("execute", "arguments", "id"):
                raise QmpError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpError(GENERIC_ERROR, "QMP input lacks member 'execute'")
        name = request["execute"]
        if not isinstance(name, str):
            raise QmpError(GENERIC_ERROR, "QMP input member 'execute' must be a string")
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        if not session.negotiated and name != "qmp_capabilities":
            raise QmpError(
                COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        if session.negotiated and name == "qmp_capabilities":
            raise QmpError(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
            )
        cmd = self._commands.get(name)
        if cmd is None:
            raise QmpError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
        known = {p.name for p in cmd.params}
        for key in args:
            if key not in known:
                raise QmpError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
        for p in cmd.params:
            if p.name not in args:
                if p.required:
                    raise QmpError(GENERIC_ERROR, f"Parameter '{p.name}' is missing")
            elif not p.accepts(args[p.name]):
                raise QmpError(
                    GENERIC_ERROR,
                    f"Invalid parameter type for '{p.name}', expected: {p.type_name}",
                )
        with self._lock:
            return cmd.handler(session, args)

    # -- command handlers (hold the device lock) ------------------------------

    def _memory(self) -> GuestMemory:
        mem = self.device.memory
        if mem is None:
            raise QmpError(DEVICE_NOT_ACTIVE, NO_MEMORY)
        return mem

    def _guest_size(self, ram: int, pages: int) -> int:
        # A guest may claim more pages than it has; never report a negative size.
        return max(0, ram - pages * FRAME_SIZE)

    def _cmd_capabilities(self, session: _Session, args: dict[str, Any]) -> object:
        unknown = args.get("enable", [])
        if unknown:  # the greeting offers no capability (no out-of-band execution)
            raise QmpError(GENERIC_ERROR, f"Capability '{unknown[0]}' not available")
        session.negotiated = True
        return {}

    def _cmd_query_commands(self, session: _Session, args: dict[str, Any]) -> object:
        return [{"name": name} for name in sorted(self._commands)]

    def _cmd_balloon(self, session: _Session, args: dict[str, Any]) -> object:
        ram = self._memory().total_size
        value: int = args["value"]
        if not 0 < value <= ram:
            raise QmpError(
                GENERIC_ERROR,
                f"Parameter 'value' expects a size in bytes from 1 to the guest RAM size "
                f"({ram}), got {value}",
            )
        try:
            self.device.set_num_pages((ram - value) >> 12)
        except BalloonError as err:
            raise QmpError(GENERIC_ERROR, str(err)) from err
        return {}

    def _cmd_query_balloon(self, session: _Session, args: dict[str, Any]) -> object:
        return {"actual": self._guest_size(self._memory().total_size, self.device.actual)}

    def _cmd_query_balloon_stats(self, session: _Session, args: dict[str, Any]) -> object:
        st = self.device.stats
        never = st.last_update == 0.0
        age = None if never else round(max(0.0, self.device.clock() - st.last_update_monotonic), 3)
        return {
            "stats": {name: st.values.get(name, -1) for name in STAT_NAMES.values()},
            "last-update": int(st.last_update),
            "age-seconds": age,
        }

    def _cmd_query_vballoon(self, session: _Session, args: dict[str, Any]) -> object:
        dev = self.device
        mem = dev.memory
        ram = mem.total_size if mem is not None else None
        hints = dev.hints
        return {
            "features": {
                "offered": f"{dev.offered_features:#x}",
                "offered-names": _feature_names(dev.offered_features),
                "negotiated": f"{dev.driver_features:#x}",
                "negotiated-names": _feature_names(dev.driver_features),
            },
            "driver-ok": bool(dev.status & Status.DRIVER_OK),
            "queues": {k.replace("_", "-"): i for k, i in dev.layout.describe().items()},
            "active-queues": sorted(dev.queues),
            "broken-queues": sorted(dev.broken),
            "ram-size": ram,
            "num-pages": dev.num_pages,
            "actual-pages": dev.actual,
            "target": None if ram is None else self._guest_size(ram, dev.num_pages),
            "actual": None if ram is None else self._guest_size(ram, dev.actual),
            "ballooned-bytes": dev.engine.ballooned_frames * FRAME_SIZE,
            "poison-val": dev.poison_val,
            "stats-interval": dev.config.stats_interval,
            "free-page-hint": {
                "state": hints.state.value,
                "cmd-id": hints.cmd_id,
                "hinted-frames": hints.frames,
                "ranges": len(hints.ranges),
                "ranges-dropped": hints.ranges_dropped,
            },
            "counters": {k.replace("_", "-"): v for k, v in dev.metrics.as_dict().items()},
        }

    # -- BALLOON_CHANGE ----------------------------------------------------------

    def _actual_changed(self, actual: int) -> None:
        """Device hook, on any thread: queue the event, then call the earlier hook."""
        try:
            mem = self.device.memory
            loop = self._loop
            if self._state is _State.RUNNING and mem is not None and loop is not None:
                size = self._guest_size(mem.total_size, actual)
                if threading.get_ident() == self._loop_thread:
                    self._balloon_changed(size)
                else:
                    with contextlib.suppress(RuntimeError):  # the loop is gone
                        loop.call_soon_threadsafe(self._balloon_changed, size)
        finally:
            if self._chained is not None:
                self._chained(actual)

    def _balloon_changed(self, size: int) -> None:
        """Send now, or keep the latest value for the end of the quiet period."""
        if self._state is not _State.RUNNING:
            return
        if self.event_interval <= 0:
            self._broadcast(size)
        elif self._throttle is None:
            self._broadcast(size)
            self._start_quiet_period()
        else:
            self._pending_actual = size

    def _start_quiet_period(self) -> None:
        assert self._loop is not None
        self._throttle = self._loop.call_later(self.event_interval, self._quiet_period_over)

    def _quiet_period_over(self) -> None:
        size, self._pending_actual = self._pending_actual, None
        if size is None:
            self._throttle = None
            return
        self._broadcast(size)
        self._start_quiet_period()

    def _broadcast(self, size: int) -> None:
        msg = {"event": "BALLOON_CHANGE", "data": {"actual": size}, "timestamp": _timestamp()}
        for session in list(self._sessions):
            if session.negotiated:
                session.send(msg)


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
