"""Host side of the test guest's command channel (guest side: ``scripts/guest/vbagent.c``).

The guest's second serial port (ttyS1) is a unix socket on the host (QEMU
``-chardev socket,id=agent,path=SOCK,server=on,wait=off -serial chardev:agent``); the
console (ttyS0) is elsewhere, so kernel messages never mix in. One line per message:

    host -> guest   VBC <id> <timeout_ms> <base64 command> [<base64 stdin>]
    guest -> host   VBR <id> <rc> <state> <base64 output>

``state`` is ``exit``, ``signal`` (rc = 128 + signal), ``timeout`` (the guest killed the
command's process group at the deadline) or ``error``. The host ignores every line that is
not a well-formed reply carrying the id it waits for, so boot noise, stale replies and
garbage are harmless; every request starts with a newline to end any partial line the
guest may hold. Readiness is established by pinging (a fresh id per attempt) until one
answers; nothing relies on sleeps.

    agent = GuestAgent(sock, console_log=workdir / "console.log")
    agent.wait_ready(120)
    rc, out = agent.run("cat /proc/meminfo", timeout=30)
"""

from __future__ import annotations

import base64
import binascii
import gzip
import itertools
import re
import secrets
import socket
import time
from pathlib import Path

__all__ = ["GuestAgent", "GuestAgentError", "GuestTimeout"]

_REPLY = re.compile(
    rb"VBR ([A-Za-z0-9_-]{1,32}) (-?\d+) (exit|signal|timeout|error) ([A-Za-z0-9+/=]*)"
)
#: Bytes per second assumed for the serial link when stretching deadlines for big transfers.
_LINK_BYTES_PER_S = 20_000
#: Extra seconds allowed for a reply whose first bytes arrived before the deadline.
_STREAMING_GRACE = 60.0


class GuestAgentError(RuntimeError):
    """The agent could not be reached or the connection broke."""


class GuestTimeout(GuestAgentError):
    """No (complete) answer in time; the message holds the console tail when known."""


class GuestAgent:
    """Runs shell commands in the test guest over its agent serial port.

    ``path``: the unix socket QEMU serves ttyS1 on. ``console_log``: the guest console
    file, quoted (last lines) in error messages. Not thread-safe: one command at a time.
    """

    def __init__(self, path: Path | str, *, console_log: Path | str | None = None) -> None:
        self.path = str(path)
        self.console_log = Path(console_log) if console_log is not None else None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._prefix = secrets.token_hex(3)
        self._ids = itertools.count(1)
        #: The last lines received that were not the awaited reply (for debugging).
        self.ignored: list[bytes] = []

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def console_tail(self, lines: int = 25) -> str:
        """The last lines of the console log ('' if unknown)."""
        if self.console_log is None:
            return ""
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _with_console(self, msg: str) -> str:
        tail = self.console_tail()
        if self.console_log is None:
            return msg
        return f"{msg}\n--- last lines of {self.console_log} ---\n{tail}"

    def _connect(self, deadline: float) -> socket.socket:
        """Connect to the agent socket, retrying while QEMU has not created it yet."""
        if self._sock is not None:
            return self._sock
        last: OSError | None = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as err:
                s.close()
                last = err
                if time.monotonic() >= deadline:
                    raise GuestTimeout(
                        self._with_console(
                            f"cannot connect to the guest agent at {self.path}: {last}"
                        )
                    ) from None
                time.sleep(0.05)
                continue
            self._sock = s
            self._buf = b""
            return s

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _send(self, req_id: str, cmd: str, timeout: float, data: bytes | None) -> None:
        assert self._sock is not None
        fields = [b"VBC", req_id.encode(), str(max(1, int(timeout * 1000))).encode()]
        fields.append(base64.b64encode(cmd.encode()))
        if data is not None:
            fields.append(base64.b64encode(data))
        try:
            self._sock.sendall(b"\n" + b" ".join(fields) + b"\n")
        except OSError as err:
            self.close()
            raise GuestAgentError(
                self._with_console(f"guest agent connection lost: {err}")
            ) from err

    def _await(self, req_id: str, deadline: float) -> tuple[int, str, bytes] | None:
        """The reply to req_id, or None at the deadline. Ignores everything else."""
        assert self._sock is not None
        want = req_id.encode()
        extended = False
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                m = _REPLY.search(line.rstrip(b"\r"))
                if m and m.group(1) == want and m.end() == len(line.rstrip(b"\r")):
                    try:
                        out = base64.b64decode(m.group(4), validate=True)
                    except (binascii.Error, ValueError):
                        self._ignore(line)
                        continue
                    return int(m.group(2)), m.group(3).decode(), out
                self._ignore(line)
            left = deadline - time.monotonic()
            if left <= 0 and not extended and b"VBR " + want + b" " in self._buf:
                # The command is done and its (big) reply is on the way: let it arrive.
                extended = True
                deadline += _STREAMING_GRACE
                left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                self.close()
                raise GuestAgentError(
                    self._with_console(f"guest agent connection lost: {err}")
                ) from err
            if not chunk:
                self.close()
                raise GuestAgentError(
                    self._with_console("guest agent connection closed (did QEMU exit?)")
                )
            self._buf += chunk

    def _ignore(self, line: bytes) -> None:
        if line.strip():
            self.ignored = [*self.ignored[-49:], line[:200]]

    # ------------------------------------------------------------ API

    def wait_ready(self, timeout: float) -> None:
        """Block until the agent answers a ping; :class:`GuestTimeout` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        self._connect(deadline)
        attempt = 1.0
        while True:
            req_id = self._new_id()
            self._send(req_id, "echo vbagent-ready", 10.0, None)
            reply = self._await(req_id, min(deadline, time.monotonic() + attempt))
            if reply is not None and reply[2].strip() == b"vbagent-ready":
                return
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    self._with_console(f"guest agent not ready after {timeout:.0f} s")
                )
            attempt = min(attempt * 1.5, 5.0)

    def run_bytes(
        self, cmd: str, timeout: float = 60.0, *, input: bytes | None = None
    ) -> tuple[int, bytes]:
        """Like :meth:`run` but returns the raw output bytes."""
        deadline_guest = timeout
        transfer = (len(input or b"") * 4 // 3 + len(cmd)) / _LINK_BYTES_PER_S
        deadline = time.monotonic() + timeout + 5.0 + 2 * transfer
        self._connect(deadline)
        req_id = self._new_id()
        self._send(req_id, cmd, deadline_guest, input)
        reply = self._await(req_id, deadline)
        if reply is None:
            raise GuestTimeout(
                self._with_console(
                    f"no reply from the guest agent within {timeout:.0f} s to {cmd!r}"
                )
            )
        rc, state, out = reply
        if state == "timeout":
            raise GuestTimeout(
                self._with_console(
                    f"guest command timed out after {timeout:.0f} s: {cmd!r}; output: "
                    f"{out[-2000:].decode(errors='replace')!r}"
                )
            )
        if state == "error":
            raise GuestAgentError(
                f"guest agent could not run {cmd!r}: {out.decode(errors='replace')}"
            )
        return rc, out

    def run(
        self, cmd: str, timeout: float = 60.0, *, input: bytes | None = None
    ) -> tuple[int, str]:
        """Run ``cmd`` with ``/bin/sh -c`` in the guest; return (exit code, stdout+stderr).

        The guest kills the command's process group after ``timeout`` s and this raises
        :class:`GuestTimeout` (also when no reply comes at all). A command killed by a
        signal returns 128 + the signal number, as a shell would. ``input`` is its stdin.
        """
        rc, out = self.run_bytes(cmd, timeout, input=input)
        return rc, out.decode(errors="replace")

    def check(self, cmd: str, timeout: float = 60.0, *, input: bytes | None = None) -> str:
        """:meth:`run` that raises :class:`GuestAgentError` unless the exit code is 0."""
        rc, out = self.run(cmd, timeout, input=input)
        if rc != 0:
            raise GuestAgentError(f"guest command {cmd!r} failed with {rc}: {out[-2000:]}")
        return out

    def put_file(
        self, guest_path: str, data: bytes, *, mode: int = 0o644, timeout: float = 60.0
    ) -> None:
        """Write ``data`` to ``guest_path`` in the guest (parent directories are created).

        The serial link carries only about 20 KB/s towards the guest under TCG (the data
        goes gzip'ed); add big files (modules) to the boot instead
        (:func:`vm_harness.provision.write_cpio`, :func:`vm_harness.provision.concat_initramfs`).
        """
        q = "'" + guest_path.replace("'", "'\\''") + "'"
        self.check(
            f'mkdir -p "$(dirname {q})" && gunzip -c > {q} && chmod {mode:o} {q}',
            timeout,
            input=gzip.compress(data, mtime=0),
        )
