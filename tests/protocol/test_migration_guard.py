"""The migration guard's rules against a QEMU double on a real Unix socket.

The double answers the QMP commands the guard uses the way QEMU 11.1 does and moves a
migration through QEMU's states (setup, active, pre-switchover when
``pause-before-switchover`` is on, completed, cancelled), with MIGRATION events. The
real-QEMU proof is ``tests/vm/test_vfio_user_migration.py``; this covers what QEMU 11.1
cannot show (an unplugged device: its ``device_del`` of ``vfio-user-pci`` aborts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from vballoon import migration_guard
from vballoon.migration_guard import MigrationGuard
from vballoon.waiting import wait_until_async

RUNNING = ("setup", "active", "pre-switchover", "device")


class FakeQemu:
    """QEMU's monitor, reduced to migration: one client at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.caps = {"events": False, "pause-before-switchover": False, "zero-blocks": False}
        self.status = "none"
        self.commands: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        #: answer query-migrate-capabilities with garbage this many times
        self.garbage = 0

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _send(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        w.write(json.dumps(msg).encode() + b"\r\n")

    def _event(self) -> None:
        if self.caps["events"]:
            for w in self.writers:
                self._send(
                    w,
                    {
                        "event": "MIGRATION",
                        "data": {"status": self.status},
                        "timestamp": {"seconds": 0, "microseconds": 0},
                    },
                )

    def set_status(self, status: str) -> None:
        self.status = status
        self._event()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        self._send(
            w,
            {
                "QMP": {
                    "version": {"qemu": {"major": 11, "minor": 1, "micro": 3}, "package": ""},
                    "capabilities": [],
                }
            },
        )
        decoder = json.JSONDecoder()
        buf = ""
        try:
            # QMP is a stream of JSON objects; qemu.qmp ends them with no newline.
            while chunk := await r.read(4096):
                buf += chunk.decode()
                while buf.strip():
                    try:
                        req, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break
                    buf = buf.lstrip()[end:]
                    name, args = req["execute"], req.get("arguments", {})
                    self.commands.append(name)
                    reply = self._handle(name, args)
                    if "id" in req:
                        reply["id"] = req["id"]
                    self._send(w, reply)
                await w.drain()
        finally:
            self.writers.remove(w)

    def _handle(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name == "qmp_capabilities":
            return {"return": {}}
        if name == "query-migrate":
            return {"return": {} if self.status == "none" else {"status": self.status}}
        if name == "query-migrate-capabilities":
            if self.garbage:
                self.garbage -= 1
                return {"return": [{"state": True}]}
            return {"return": [{"capability": k, "state": v} for k, v in self.caps.items()]}
        if name == "migrate-set-capabilities":
            if self.status in RUNNING:
                return {
                    "error": {
                        "class": "GenericError",
                        "desc": "There's a migration process in progress",
                    }
                }
            for c in args["capabilities"]:
                self.caps[c["capability"]] = c["state"]
            return {"return": {}}
        if name == "migrate_cancel":
            if self.status in RUNNING:
                self.set_status("cancelling")
                self.set_status("cancelled")
            return {"return": {}}
        if name == "migrate-continue":
            if self.status != args["state"]:
                return {"error": {"class": "GenericError", "desc": "wrong state"}}
            self.set_status("device")
            self.set_status("completed")
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": name}}

    def migrate(self) -> None:
        """What ``migrate`` does: setup, active, then pre-switchover or completed."""
        self.set_status("setup")
        self.set_status("active")

    def finish_iteration(self) -> None:
        """The RAM is sent: pause before switchover if asked to, else complete."""
        if self.status != "active":
            return
        self.set_status("pre-switchover" if self.caps["pause-before-switchover"] else "completed")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    await wait_until_async(predicate, timeout, what)


class Rig:
    def __init__(self, qemu: FakeQemu, guard: MigrationGuard, device: dict[str, bool]) -> None:
        self.qemu, self.guard, self.device = qemu, guard, device

    def detach(self) -> None:
        self.device["attached"] = False
        self.guard.device_changed()

    def attach(self) -> None:
        self.device["attached"] = True
        self.guard.device_changed()


@contextlib.asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    qemu = FakeQemu(str(tmp_path / "qmp.sock"))
    await qemu.start()
    device = {"attached": True}
    guard = MigrationGuard(qemu.path, attached=lambda: device["attached"])
    guard.start()
    try:
        yield Rig(qemu, guard, device)
    finally:
        await guard.close()
        await qemu.close()


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration_guard, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(migration_guard, "RETRY_INTERVAL", 0.05)


def armed(q: FakeQemu) -> bool:
    return q.caps["events"] and q.caps["pause-before-switchover"]


def test_attached_every_migration_is_cancelled(tmp_path: Path, caplog) -> None:
    async def run() -> None:
        async with rig(tmp_path) as r:
            await until(lambda: armed(r.qemu), "the capabilities on")
            r.qemu.migrate()
            await until(lambda: r.qemu.status == "cancelled", "the migration cancelled")
            assert r.guard.refused == 1
            # Even a migration that got to its end cannot complete: it waits to switch over.
            r.qemu.caps["events"] = False  # an operator turned the events off
            r.qemu.migrate()
            r.qemu.finish_iteration()
            assert r.qemu.status == "pre-switchover"
            await until(lambda: r.qemu.status == "cancelled", "the paused migration cancelled")
            assert r.guard.refused == 2
            await until(lambda: armed(r.qemu), "events back on")
            assert "migrate-continue" not in r.qemu.commands

    with caplog.at_level(logging.ERROR, logger="vballoon.migration_guard"):
        asyncio.run(run())
    refusals = [m for m in caplog.messages if "refused a live migration" in m]
    assert len(refusals) == 2 and all("device_del" in m for m in refusals)


def test_capabilities_turned_off_come_back_on(tmp_path: Path) -> None:
    async def run() -> None:
        async with rig(tmp_path) as r:
            await until(lambda: armed(r.qemu), "the capabilities on")
            r.qemu.caps["pause-before-switchover"] = False
            await until(lambda: armed(r.qemu), "pause-before-switchover on again")

    asyncio.run(run())


def test_detached_the_guard_stands_aside_and_comes_back(tmp_path: Path) -> None:
    async def run() -> None:
        async with rig(tmp_path) as r:
            await until(lambda: armed(r.qemu), "the capabilities on")
            r.qemu.caps["zero-blocks"] = True  # not the guard's: left alone
            r.detach()
            await until(lambda: not r.qemu.caps["pause-before-switchover"], "capabilities off")
            assert not r.qemu.caps["events"] and r.qemu.caps["zero-blocks"]
            r.qemu.migrate()
            r.qemu.finish_iteration()
            assert r.qemu.status == "completed" and r.guard.refused == 0
            r.qemu.status = "none"
            r.attach()
            await until(lambda: armed(r.qemu), "the capabilities on again")
            r.qemu.migrate()
            await until(lambda: r.qemu.status == "cancelled", "cancelled again")

    asyncio.run(run())


def test_a_migration_paused_by_the_guard_goes_on_once_the_device_is_gone(tmp_path: Path) -> None:
    """Unplugged while a migration ran (before the guard saw it): it stops before
    switchover because of the guard's capability, and the guard lets it finish."""

    async def run() -> None:
        async with rig(tmp_path) as r:
            await until(lambda: armed(r.qemu), "the capabilities on")
            r.device["attached"] = False  # no wake-up: the guard learns it from the event
            r.qemu.migrate()
            r.qemu.finish_iteration()
            await until(lambda: r.qemu.status == "completed", "the migration completed")
            assert "migrate-continue" in r.qemu.commands and r.guard.refused == 0

    asyncio.run(run())


def test_close_puts_back_what_the_guard_turned_on(tmp_path: Path) -> None:
    async def run() -> None:
        qemu = FakeQemu(str(tmp_path / "qmp.sock"))
        await qemu.start()
        qemu.caps["events"] = True  # the operator's: stays on
        guard = MigrationGuard(qemu.path)
        guard.start()
        await until(lambda: armed(qemu), "the capabilities on")
        await guard.close()
        assert qemu.caps == {"events": True, "pause-before-switchover": False, "zero-blocks": False}
        await qemu.close()

    asyncio.run(run())


def test_an_unexpected_reply_is_logged_and_the_guard_goes_on(tmp_path: Path, caplog) -> None:
    async def run() -> None:
        qemu = FakeQemu(str(tmp_path / "qmp.sock"))
        qemu.garbage = 1
        await qemu.start()
        guard = MigrationGuard(qemu.path)
        guard.start()
        await until(lambda: armed(qemu), "the capabilities on after a reconnect")
        qemu.migrate()
        await until(lambda: qemu.status == "cancelled", "the migration cancelled")
        await guard.close()
        await qemu.close()

    with caplog.at_level(logging.ERROR, logger="vballoon.migration_guard"):
        asyncio.run(run())
    assert any("unexpected error" in m for m in caplog.messages)


def test_waits_for_qemu_and_says_so_once(tmp_path: Path, caplog) -> None:
    async def run() -> None:
        path = str(tmp_path / "qmp.sock")
        guard = MigrationGuard(path)
        guard.start()
        await asyncio.sleep(0.3)  # several attempts at a socket that is not there
        qemu = FakeQemu(path)
        await qemu.start()
        await until(lambda: armed(qemu), "the capabilities on once QEMU is there")
        await guard.close()
        await qemu.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    waiting = [m for m in caplog.messages if "waiting for QEMU's QMP" in m]
    assert len(waiting) == 1
    assert not [
        r for r in caplog.records if r.name.startswith("qemu.qmp") and r.levelno >= logging.ERROR
    ]
