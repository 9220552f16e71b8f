"""A QMP server: QMP's wire format over a private Unix socket, for any set of commands.

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

The server itself answers ``qmp_capabilities`` and ``query-commands`` (which
``qmp-shell`` uses for completion); everything else is registered with
:meth:`QmpServer.register`. ``vballoon.control`` registers the balloon commands.

Errors::

    QmpServerError   the socket cannot be created (path in use, not a socket, mode)
    QmpError         one command failed; becomes a QMP error reply (never escapes)
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from vballoon.unix_socket import ClaimedSocket, SocketPathError

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

# QMP error classes (QEMU qapi/error.json), the ones this server uses.
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"

_WHITESPACE = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
#: Bytes that end a bare top-level scalar such as ``42`` or ``true``.
_SCALAR_END = _WHITESPACE | _OPEN | _CLOSE | frozenset(b'",:')
_QUOTE, _BACKSLASH, _NEWLINE = 0x22, 0x5C, 0x0A


class QmpServerError(Exception):
    """The server's socket cannot be set up (the message says why and what to do)."""


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


# -- commands and sessions -------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
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


#: A command's implementation: its checked arguments in, its return value out.
Handler = Callable[[dict[str, Any]], object]


@dataclass(frozen=True)
class _Command:
    handler: Handler
    params: tuple[Param, ...] = ()


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
            log.warning("QMP client reads nothing back: disconnecting it")
            self.writer.close()


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


class QmpServer:
    """A QMP server on a Unix socket (mode 0600); commands run in its event loop.

    :param path: where to create the socket
    :param what: how messages name the socket (``control socket``)
    """

    def __init__(self, path: str | os.PathLike[str], *, what: str = "QMP socket") -> None:
        self.path = os.fspath(path)
        self.what = what
        self._state = _State.IDLE
        self._claimed: ClaimedSocket | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
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
            "query-commands": _Command(self._cmd_query_commands),
        }

    def register(self, name: str, handler: Handler, params: tuple[Param, ...] = ()) -> None:
        """Answer ``name`` with ``handler(arguments)`` (arguments checked against ``params``).

        ``handler`` raises :class:`QmpError` for a failure the client should see.
        """
        self._commands[name] = _Command(handler, params)

    # -- lifecycle ---------------------------------------------------------------

    @property
    def client_count(self) -> int:
        """Clients connected now (negotiated or not)."""
        return len(self._sessions)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the server runs in, once started."""
        return self._loop

    @property
    def running(self) -> bool:
        """Started and not yet closed."""
        return self._state is _State.RUNNING

    async def start(self) -> None:
        """Create the socket and start accepting clients.

        :raise QmpServerError: if the path is taken by a live socket or a non-socket,
            or the socket cannot be created with mode 0600.
        """
        if self._state is not _State.IDLE:
            raise QmpServerError(f"{self.what} {self.path}: start() may be called once")
        try:
            claimed = ClaimedSocket(self.path, self.what)
        except SocketPathError as err:
            raise QmpServerError(str(err)) from err
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=claimed.sock)
        except BaseException:
            claimed.release()
            raise
        self._claimed = claimed
        self._loop = asyncio.get_running_loop()
        self._state = _State.RUNNING
        log.info("%s listening on %s", self.what, self.path)

    async def close(self) -> None:
        """Stop accepting, drop every client, remove the socket. Safe to call more than once."""
        if self._state is not _State.RUNNING:
            self._state = _State.CLOSED
            return
        self._state = _State.CLOSED
        assert self._server is not None and self._claimed is not None
        self._server.close()
        for session in list(self._sessions):
            session.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._claimed.release()
        log.info("%s %s closed", self.what, self.path)

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
            log.debug("QMP client went away: %s", err)
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
        reply: dict[str, Any]
        try:
            reply = {"return": self._execute(session, request)}
        except QmpError as err:
            reply = _error(err.cls, err.desc)
        except Exception as err:  # a bug must not take the socket down
            log.exception("QMP command %r failed", name)
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
        if name == "qmp_capabilities":
            return self._capabilities(session, args)
        if not session.negotiated:
            raise QmpError(
                COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        cmd = self._commands.get(name)
        if cmd is None:
            raise QmpError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
        _check_arguments(cmd.params, args)
        return cmd.handler(args)

    def _capabilities(self, session: _Session, args: dict[str, Any]) -> object:
        if session.negotiated:
            raise QmpError(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
            )
        _check_arguments(_CAPABILITIES_PARAMS, args)
        unknown = args.get("enable", [])
        if unknown:  # the greeting offers no capability (no out-of-band execution)
            raise QmpError(GENERIC_ERROR, f"Capability '{unknown[0]}' not available")
        session.negotiated = True
        return {}

    def _cmd_query_commands(self, args: dict[str, Any]) -> object:
        return [{"name": name} for name in sorted({*self._commands, "qmp_capabilities"})]

    # -- events ----------------------------------------------------------------------

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to every negotiated client (call from the server's loop)."""
        msg = {"event": event, "data": data, "timestamp": _timestamp()}
        for session in list(self._sessions):
            if session.negotiated:
                session.send(msg)


_CAPABILITIES_PARAMS = (Param("enable", "str-list", required=False),)


def _check_arguments(params: tuple[Param, ...], args: dict[str, Any]) -> None:
    """:raise QmpError: on an unexpected, missing or mistyped argument."""
    known = {p.name for p in params}
    for key in args:
        if key not in known:
            raise QmpError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
    for p in params:
        if p.name not in args:
            if p.required:
                raise QmpError(GENERIC_ERROR, f"Parameter '{p.name}' is missing")
        elif not p.accepts(args[p.name]):
            raise QmpError(
                GENERIC_ERROR, f"Invalid parameter type for '{p.name}', expected: {p.type_name}"
            )


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
