"""The control socket, driven by the real ``qemu.qmp`` client and by raw bytes.

Each test runs its own event loop with ``asyncio.run``; ``run_ctl`` tests put
the server on a loop in a thread so the synchronous entry point can be called
as the command line calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from device import BalloonConfig, BalloonDevice, Feature
from device.defs import STAT_NAMES, StatTag
from device.testing import GuestRam, MiB, RecordingInterrupts
from tests.conftest import ManualClock, Rig
from vballoon import qmp_server
from vballoon.control import NO_MEMORY, ControlServer
from vballoon.ctl import run_ctl
from vballoon.qmp_server import JsonFramer, Malformed
from vballoon.qmp_server import QmpServerError as ControlError
from vballoon.units import format_bytes
from vballoon.waiting import wait_until_async

T = TypeVar("T")
RAM = 64 * MiB
COMMANDS = {
    "balloon",
    "qmp_capabilities",
    "query-balloon",
    "query-balloon-stats",
    "query-commands",
    "query-vballoon",
    "x-vballoon-trim-zero",
}


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run ``coro`` on a fresh loop; a hang fails the test instead of the session."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 107 bytes an AF_UNIX path may have.
    with tempfile.TemporaryDirectory(prefix="vbctl-") as d:
        yield os.path.join(d, "ctl.sock")


def bare_device() -> BalloonDevice:
    """A device no frontend has given memory yet."""
    return BalloonDevice(BalloonConfig(stats_interval=0), RecordingInterrupts())


@contextlib.asynccontextmanager
async def qmp(path: str, negotiate: bool = True) -> AsyncIterator[QMPClient]:
    client = QMPClient("test")
    client.negotiate = negotiate
    await client.connect(path)
    try:
        yield client
    finally:
        await client.disconnect()


class Raw:
    """A client that writes bytes and reads reply lines, for what qemu.qmp never sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str, negotiate: bool = True) -> tuple[Raw, dict[str, Any]]:
        reader, writer = await asyncio.open_unix_connection(path)
        raw = cls(reader, writer)
        greeting = await raw.recv()
        if negotiate:
            assert await raw.cmd({"execute": "qmp_capabilities"}) == {"return": {}}
        return raw, greeting

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line.endswith(b"\n"), f"connection closed: {line!r}"
        return json.loads(line)

    async def cmd(self, obj: object) -> dict[str, Any]:
        await self.send(json.dumps(obj).encode())
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def execute_error(client: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    with pytest.raises(ExecuteError) as info:
        await client.execute(cmd, args)
    return info.value


def post_stats(rig: Rig, values: dict[StatTag, int]) -> None:
    """The guest sends one stats buffer (the device keeps it)."""
    ring = rig.rings["stats"]
    data = b"".join(struct.pack("<HQ", tag, v) for tag, v in values.items())
    ring.add([ring.buffer(data)])
    rig.kick("stats")


def set_actual(dev: BalloonDevice, pages: int) -> None:
    dev.write_config(4, struct.pack("<I", pages))


# -- greeting and negotiation ---------------------------------------------------


def test_greeting_and_negotiation(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev):
            raw, greeting = await Raw.open(path, negotiate=False)
            qemu = greeting["QMP"]["version"]["qemu"]
            assert set(qemu) == {"major", "minor", "micro"}
            assert greeting["QMP"]["version"]["package"].startswith("vballoon ")
            assert greeting["QMP"]["capabilities"] == []
            await raw.close()
            async with qmp(path) as c:
                assert c.greeting is not None
                names = {cmd["name"] for cmd in await c.execute("query-commands")}
                assert names == COMMANDS

    run(body())


def test_commands_wait_for_capabilities(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path, negotiate=False) as c:
            err = await execute_error(c, "query-balloon")
            assert err.error_class == "CommandNotFound"
            assert "Expecting capabilities negotiation" in str(err)
            err = await execute_error(c, "no-such-command")
            assert "Expecting capabilities negotiation" in str(err)
            assert await c.execute("qmp_capabilities") == {}
            err = await execute_error(c, "qmp_capabilities")
            assert err.error_class == "CommandNotFound"
            assert "already complete" in str(err)
            assert await c.execute("query-balloon") == {"actual": RAM}

    run(body())


def test_capabilities_refuses_oob(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path, negotiate=False) as c:
            err = await execute_error(c, "qmp_capabilities", {"enable": ["oob"]})
            assert err.error_class == "GenericError"
            assert "'oob' not available" in str(err)
            err = await execute_error(c, "query-balloon")
            assert "Expecting capabilities negotiation" in str(err)

    run(body())


def test_unknown_command(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            err = await execute_error(c, "query-cpus-fast")
            assert err.error_class == "CommandNotFound"
            assert str(err) == "The command query-cpus-fast has not been found"

    run(body())


# -- balloon and query-balloon ---------------------------------------------------


@pytest.mark.parametrize(
    ("value", "pages"),
    [
        (48 * MiB, 4096),
        (RAM, 0),
        (RAM - 3 * 4096 - 100, 3),  # QEMU's rounding: (ram - value) >> 12
        (1, RAM // 4096 - 1),
    ],
)
def test_balloon_sets_num_pages(rig: Rig, path: str, value: int, pages: int) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            configs = rig.irq.configs
            assert await c.execute("balloon", {"value": value}) == {}
            assert rig.dev.num_pages == pages
            assert rig.irq.configs == configs + (pages != 0)

    run(body())


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({}, "Parameter 'value' is missing"),
        ({"value": "1G"}, "Invalid parameter type for 'value', expected: integer"),
        ({"value": True}, "Invalid parameter type for 'value', expected: integer"),
        ({"value": 1.5e7}, "Invalid parameter type for 'value', expected: integer"),
        ({"value": None}, "Invalid parameter type for 'value', expected: integer"),
        ({"value": 1, "force": True}, "Parameter 'force' is unexpected"),
        ({"value": 0}, "Parameter 'value' expects a size"),
        ({"value": -MiB}, "Parameter 'value' expects a size"),
        ({"value": RAM + 1}, f"guest RAM size ({RAM})"),
    ],
)
def test_balloon_rejects_bad_arguments(
    rig: Rig, path: str, args: dict[str, Any], desc: str
) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            err = await execute_error(c, "balloon", args)
            assert err.error_class == "GenericError"
            assert desc in str(err)
            assert rig.dev.num_pages == 0
            assert await c.execute("query-balloon") == {"actual": RAM}  # still usable

    run(body())


def test_no_memory_yet(path: str) -> None:
    dev = bare_device()

    async def body() -> None:
        async with ControlServer(path, dev), qmp(path) as c:
            for cmd, args in (("balloon", {"value": MiB}), ("query-balloon", None)):
                err = await execute_error(c, cmd, args)
                assert err.error_class == "DeviceNotActive"
                assert str(err) == NO_MEMORY
            info = await c.execute("query-vballoon")
            assert info["ram-size"] is None and info["target"] is None and info["actual"] is None
        assert dev.num_pages == 0

    run(body())


def test_query_balloon_is_the_guest_size(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            await c.execute("balloon", {"value": 60 * MiB})
            rig.pfns("inflate", list(range(100)))
            set_actual(rig.dev, 100)
            assert await c.execute("query-balloon") == {"actual": RAM - 100 * 4096}
            set_actual(rig.dev, RAM // 4096 + 5)  # a guest claiming more than it has
            assert await c.execute("query-balloon") == {"actual": 0}

    run(body())


# -- query-balloon-stats -----------------------------------------------------------


def test_stats_before_any_update(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            res = await c.execute("query-balloon-stats")
            assert res == {
                "stats": {name: -1 for name in STAT_NAMES.values()},
                "last-update": 0,
                "age-seconds": None,
            }

    run(body())


def test_stats_after_guest_update(ram: GuestRam, path: str) -> None:
    clock = ManualClock()
    rig = Rig(ram, clock=clock)

    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            before = time.time()
            post_stats(rig, {StatTag.MEMFREE: 40 * MiB, StatTag.MAJFLT: 7, StatTag.AVAIL: 0})
            clock.now += 3.25  # the device's clock, not the wall clock, gives the age
            res = await c.execute("query-balloon-stats")
            stats = res["stats"]
            assert stats["stat-free-memory"] == 40 * MiB
            assert stats["stat-major-faults"] == 7
            assert stats["stat-available-memory"] == 0
            assert stats["stat-swap-in"] == -1
            assert set(stats) == set(STAT_NAMES.values())
            assert int(before) <= res["last-update"] <= time.time()
            assert isinstance(res["last-update"], int)
            assert res["age-seconds"] == 3.25

    run(body())
    rig.close()


# -- query-vballoon -----------------------------------------------------------------


def test_query_vballoon(ram: GuestRam, path: str) -> None:
    feats = Feature.VERSION_1 | Feature.STATS_VQ | Feature.PAGE_POISON | Feature.REPORTING
    rig = Rig(ram, features=int(feats))
    dev = rig.dev

    async def body() -> None:
        async with ControlServer(path, dev), qmp(path) as c:
            await c.execute("balloon", {"value": 32 * MiB})
            rig.pfns("inflate", list(range(300, 310)))
            set_actual(dev, 12)  # the guest's account need not match the device's record
            dev.write_config(12, struct.pack("<I", 0xAA))
            info = await c.execute("query-vballoon")
        f = info["features"]
        assert f["negotiated"] == hex(feats)
        assert f["negotiated-names"] == ["stats-vq", "page-poison", "reporting", "version-1"]
        assert f["offered"] == hex(dev.offered_features)
        assert "range-report" in f["offered-names"] and "free-page-hint" in f["offered-names"]
        assert info["queues"] == {"inflate": 0, "deflate": 1, "stats": 2, "reporting": 3}
        assert info["active-queues"] == [0, 1, 2, 3] and info["broken-queues"] == []
        assert info["driver-ok"] is True and info["status"] == 0xF
        assert info["ram-size"] == RAM
        assert info["num-pages"] == 8192 and info["target"] == 32 * MiB
        assert info["actual-pages"] == 12 and info["actual"] == RAM - 12 * 4096
        assert info["ballooned-bytes"] == 12 * 4096
        assert info["tracked-bytes"] == 10 * 4096
        assert info["poison-val"] == 0xAA
        assert info["free-page-hint"]["state"] == "idle"
        counters = info["counters"]
        assert set(counters) == {k.replace("_", "-") for k in dev.metrics.as_dict()}
        assert counters["bytes-discarded"] == 10 * 4096
        assert counters["inflated-frames"] == 10
        assert counters["discard-syscalls"] == dev.metrics.discard_syscalls > 0
        assert counters["refused-ranges"] == 0 and counters["discard-errors"] == 0
        rig.close()

    run(body())


def test_query_vballoon_hint_state_and_refusals(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            cmd_id = rig.dev.start_free_page_hint()
            rig.pfns("inflate", [RAM // 4096 + 1000])  # outside guest RAM: refused
            info = await c.execute("query-vballoon")
        assert info["queues"]["free-page"] == 3 and info["queues"]["range-report"] == 5
        assert info["free-page-hint"]["state"] == "requested"
        assert info["free-page-hint"]["cmd-id"] == cmd_id
        assert info["counters"]["refused-ranges"] == 1
        assert info["ballooned-bytes"] == 0

    run(body())


# -- BALLOON_CHANGE -------------------------------------------------------------------


def test_balloon_change_event(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            with c.listener("BALLOON_CHANGE") as events:
                before = time.time()
                set_actual(rig.dev, 256)
                ev = await asyncio.wait_for(events.get(), 2)
        assert ev["data"] == {"actual": RAM - 256 * 4096}
        ts = ev["timestamp"]
        assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
        assert int(before) <= ts["seconds"] <= time.time()

    run(body())


def test_no_event_when_actual_unchanged(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev, event_interval=0), qmp(path) as c:
            with c.listener("BALLOON_CHANGE") as events:
                set_actual(rig.dev, 0)  # same as before: the device sees no change
                rig.dev.write_config(0, struct.pack("<I", 77))  # num_pages is not the guest's
                await asyncio.sleep(0.1)
                assert events.empty()

    run(body())


def test_events_are_throttled_like_qemu(rig: Rig, path: str) -> None:
    interval = 0.5

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with ControlServer(path, rig.dev, event_interval=interval), qmp(path) as c:
            with c.listener("BALLOON_CHANGE") as events:
                t0 = loop.time()
                for pages in (10, 20, 30):
                    set_actual(rig.dev, pages)
                first = await asyncio.wait_for(events.get(), 2)
                t1 = loop.time()
                last = await asyncio.wait_for(events.get(), 2)
                t2 = loop.time()
                await asyncio.sleep(interval + 0.2)
                assert events.empty()
        assert first["data"]["actual"] == RAM - 10 * 4096
        assert last["data"]["actual"] == RAM - 30 * 4096  # 20 was superseded
        assert t1 - t0 < interval * 0.8
        assert t2 - t0 >= interval * 0.9

    run(body())


def test_events_unthrottled(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev, event_interval=0), qmp(path) as c:
            with c.listener("BALLOON_CHANGE") as events:
                for pages in (10, 20, 30):
                    set_actual(rig.dev, pages)
                got = [(await asyncio.wait_for(events.get(), 2))["data"]["actual"] for _ in "abc"]
        assert got == [RAM - p * 4096 for p in (10, 20, 30)]

    run(body())


def test_event_from_another_thread(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            with c.listener("BALLOON_CHANGE") as events:
                await asyncio.to_thread(set_actual, rig.dev, 5)
                ev = await asyncio.wait_for(events.get(), 2)
        assert ev["data"]["actual"] == RAM - 5 * 4096

    run(body())


def test_other_watchers_are_kept_and_the_server_unsubscribes(rig: Rig, path: str) -> None:
    seen: list[int] = []
    rig.dev.watch_actual(seen.append)
    srv = ControlServer(path, rig.dev, event_interval=0)

    async def body() -> None:
        async with srv, qmp(path) as c:
            with c.listener("BALLOON_CHANGE") as events:
                set_actual(rig.dev, 3)
                await asyncio.wait_for(events.get(), 2)
        sent: list[int] = []
        srv._broadcast = sent.append  # type: ignore[method-assign]
        set_actual(rig.dev, 4)
        assert sent == [], "a closed server still follows the device"

    run(body())
    assert seen == [3, 4]


def test_events_only_after_negotiation(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev, event_interval=0), qmp(path) as c:
            raw, _ = await Raw.open(path, negotiate=False)
            with c.listener("BALLOON_CHANGE") as events:
                set_actual(rig.dev, 9)
                await asyncio.wait_for(events.get(), 2)
            # The first line the raw client sees is its reply, not the event.
            assert await raw.cmd({"execute": "qmp_capabilities", "id": 1}) == {
                "return": {},
                "id": 1,
            }
            set_actual(rig.dev, 10)
            ev = await raw.recv()
            assert ev["event"] == "BALLOON_CHANGE" and ev["data"]["actual"] == RAM - 10 * 4096
            await raw.close()

    run(body())


# -- the socket file --------------------------------------------------------------------


def test_socket_is_private_whatever_the_umask(rig: Rig, path: str) -> None:
    async def body() -> int:
        async with ControlServer(path, rig.dev):
            return os.stat(path).st_mode

    old = os.umask(0)
    try:
        mode = run(body())
        assert os.umask(0) == 0  # the server put the umask back
    finally:
        os.umask(old)
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_socket_is_private_by_umask_alone(
    rig: Rig, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)

    async def body() -> int:
        async with ControlServer(path, rig.dev):
            return os.stat(path).st_mode

    old = os.umask(0)
    try:
        assert stat.S_IMODE(run(body())) == 0o600
    finally:
        os.umask(old)


def test_socket_is_private_by_chmod_alone(
    rig: Rig, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = os.umask(0)
    monkeypatch.setattr(os, "umask", lambda mask: 0)

    async def body() -> int:
        async with ControlServer(path, rig.dev):
            return os.stat(path).st_mode

    try:
        assert stat.S_IMODE(run(body())) == 0o600
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_close_removes_the_socket(rig: Rig, path: str) -> None:
    async def body() -> None:
        srv = ControlServer(path, rig.dev)
        await srv.start()
        assert os.path.exists(path)
        with pytest.raises(ControlError, match="may be called once"):
            await srv.start()
        await srv.close()
        await srv.close()

    run(body())
    assert not os.path.exists(path)


def test_close_hangs_up_on_clients(rig: Rig, path: str) -> None:
    async def body() -> None:
        srv = ControlServer(path, rig.dev)
        await srv.start()
        raw, _ = await Raw.open(path)
        idle, _ = await Raw.open(path, negotiate=False)
        await srv.close()
        for client in (raw, idle):
            assert await asyncio.wait_for(client.reader.read(), 2) == b""
            await client.close()
        assert srv.client_count == 0
        set_actual(rig.dev, 8)  # the device outlives the server: no error

    run(body())


def test_close_leaves_a_socket_that_replaced_ours(rig: Rig, path: str) -> None:
    other = socket.socket(socket.AF_UNIX)

    async def body() -> None:
        async with ControlServer(path, rig.dev):
            os.unlink(path)
            other.bind(path)

    try:
        run(body())
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


def test_stale_socket_is_replaced(rig: Rig, path: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crash leaves behind

    async def body() -> None:
        async with ControlServer(path, rig.dev), qmp(path) as c:
            assert await c.execute("query-balloon") == {"actual": RAM}

    run(body())


def test_live_socket_is_refused(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev):
            with pytest.raises(ControlError, match="in use"):
                await ControlServer(path, bare_device()).start()
            async with qmp(path) as c:  # the first server still answers
                assert await c.execute("query-balloon") == {"actual": RAM}

    run(body())


def test_other_file_is_refused(rig: Rig, path: str) -> None:
    Path(path).write_text("precious")

    async def body() -> None:
        with pytest.raises(ControlError, match="not a socket"):
            await ControlServer(path, rig.dev).start()

    run(body())
    assert Path(path).read_text() == "precious"


def test_unusable_directory_is_a_clear_error(rig: Rig, path: str) -> None:
    async def body() -> None:
        with pytest.raises(ControlError, match=r"control socket .*missing.* does not exist"):
            await ControlServer(os.path.join(path, "missing", "ctl.sock"), rig.dev).start()

    run(body())


# -- several clients -----------------------------------------------------------------------


def test_two_clients_and_one_that_vanishes(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev) as srv, qmp(path) as a, qmp(path) as b:
            with a.listener("BALLOON_CHANGE") as ea, b.listener("BALLOON_CHANGE") as eb:
                set_actual(rig.dev, 1)
                for events in (ea, eb):
                    ev = await asyncio.wait_for(events.get(), 2)
                    assert ev["data"]["actual"] == RAM - 4096
            # A third client hangs up in the middle of a request.
            raw, _ = await Raw.open(path)
            await raw.send(b'{"execute": "query-bal')
            raw.writer.transport.abort()
            await wait_until_async(lambda: srv.client_count == 2, 5, "two clients")
            await a.execute("balloon", {"value": 40 * MiB})
            assert await b.execute("query-vballoon") is not None
            assert rig.dev.num_pages == 24 * MiB // 4096

    run(body())


def test_client_that_hangs_up_before_its_replies(
    rig: Rig, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev) as srv, qmp(path) as c:
            for _ in range(5):
                raw, _ = await Raw.open(path)
                await raw.send(b'{"execute": "query-vballoon"}' * 2000)
                raw.writer.transport.abort()
            await wait_until_async(lambda: srv.client_count == 1, 5, "one client")
            assert await c.execute("query-balloon") == {"actual": RAM}

    run(body())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_client_that_reads_nothing_is_dropped(
    rig: Rig, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmp_server, "MAX_PENDING_OUTPUT", 16 * 1024)

    async def body() -> None:
        async with ControlServer(path, rig.dev, event_interval=0) as srv:
            stuck, _ = await Raw.open(path)
            stuck.writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
            )
            for pages in range(1, 100_000):
                set_actual(rig.dev, pages)
                if srv.client_count == 0:
                    break
                if pages % 256 == 0:
                    await asyncio.sleep(0)
            assert srv.client_count == 0
            async with qmp(path) as c:  # newcomers are served
                assert await c.execute("query-balloon") == {"actual": RAM - pages * 4096}
            await stuck.close()

    run(body())


# -- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b"{nonsense}\n", "JSON parse error"),
        (b'{"execute": "query-balloon"]\n', "JSON parse error"),
        (b"}\n", "JSON parse error, unexpected '}'"),
        (b'{"execute": "\xff"}', "JSON parse error, input is not valid UTF-8"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b"true ", "QMP input must be a JSON object"),
        (b'"query-balloon"', "QMP input must be a JSON object"),
        (b'{"execute": "qu\n', "JSON parse error, newline inside a string"),
        (b"[" * 40 + b"]" * 40, "JSON parse error, nesting deeper than 32"),
        (b'{"s": "' + b"x" * 100_000 + b'"}', "JSON parse error, input longer than 65536"),
    ],
)
def test_malformed_input_keeps_the_connection(rig: Rig, path: str, data: bytes, desc: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev):
            raw, _ = await Raw.open(path)
            await raw.send(data)
            reply = await raw.recv()
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith(desc)
            assert "id" not in reply
            ok = await raw.cmd({"execute": "query-balloon", "id": "after"})
            assert ok == {"return": {"actual": RAM}, "id": "after"}
            await raw.close()

    run(body())


@pytest.mark.parametrize(
    ("request_", "desc"),
    [
        ({"id": 5}, "QMP input lacks member 'execute'"),
        ({"execute": 5, "id": 5}, "QMP input member 'execute' must be a string"),
        (
            {"execute": "query-balloon", "arguments": [1], "id": 5},
            "QMP input member 'arguments' must be an object",
        ),
        ({"execute": "query-balloon", "bogus": 1, "id": 5}, "QMP input member 'bogus'"),
        ({"exec-oob": "query-balloon", "id": 5}, "QMP input member 'exec-oob' is unexpected"),
        ({"execute": "query-balloon", "arguments": {"x": 1}, "id": 5}, "Parameter 'x'"),
    ],
)
def test_bad_requests_echo_the_id(rig: Rig, path: str, request_: dict[str, Any], desc: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev):
            raw, _ = await Raw.open(path)
            reply = await raw.cmd(request_)
            assert reply["id"] == 5
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith(desc)
            await raw.close()

    run(body())


def test_ids_of_any_json_type_are_echoed(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev):
            raw, _ = await Raw.open(path)
            for ident in ("s", 7, 1.5, None, [1, "x"], {"k": {"n": 1}}):
                reply = await raw.cmd({"execute": "query-balloon", "id": ident})
                assert reply == {"return": {"actual": RAM}, "id": ident}
                reply = await raw.cmd({"execute": "nope", "id": ident})
                assert reply["id"] == ident and reply["error"]["class"] == "CommandNotFound"
            await raw.close()

    run(body())


def test_requests_without_separators_and_in_pieces(rig: Rig, path: str) -> None:
    async def body() -> None:
        async with ControlServer(path, rig.dev):
            raw, _ = await Raw.open(path)
            await raw.send(
                b'{"execute":"query-balloon","id":1}{"execute":"balloon",'
                b'"arguments":{"value":33554432},"id":2}  \r\n{"execute":"query-balloon","id":3}'
            )
            assert [(await raw.recv())["id"] for _ in range(3)] == [1, 2, 3]
            assert rig.dev.num_pages == 8192
            for b in b'{"execute": "query-balloon", "id": "a\\"}"}':
                await raw.send(bytes([b]))
            assert await raw.recv() == {"return": {"actual": RAM}, "id": 'a"}'}
            await raw.close()

    run(body())


def test_framer_reports_in_order() -> None:
    f = JsonFramer(max_bytes=32, max_depth=4)
    assert f.feed(b'  {"a": "}{"} 12 ') == [b'{"a": "}{"}', b"12"]
    assert f.feed(b'"x\\\\"[[') == [b'"x\\\\"']
    assert f.feed(b"[[[]]]]") == []
    assert f.feed(b"]{}") == [Malformed("nesting deeper than 4"), b"{}"]
    out = f.feed(b'{"k": "' + b"y" * 40 + b'"}{}')
    assert out == [Malformed("input longer than 32 bytes"), b"{}"]
    assert f.feed(b"nul") == []
    assert f.feed(b"l,") == [b"null"]
    assert f.feed(b" ") == [b","]


# -- run_ctl ---------------------------------------------------------------------------------


class ServerThread:
    """A ControlServer on its own loop in a thread, so synchronous code can use it."""

    def __init__(self, path: str, device: BalloonDevice) -> None:
        self.server = ControlServer(path, device)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ControlServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vballoon ctl: ")
    return lines[0]


def test_ctl_target(rig: Rig, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(path, rig.dev):
        assert run_ctl(path, "target", "48M") == 0
        assert rig.dev.num_pages == 4096
        assert (
            capsys.readouterr().out == "target set: guest RAM 48 MiB (the guest has 64 MiB now)\n"
        )
        assert run_ctl(path, "target", "0.03125G", json_output=True) == 0
        assert json.loads(capsys.readouterr().out) == {"target": 32 * MiB, "actual": RAM}
    assert rig.dev.num_pages == 8192


def test_ctl_target_too_big_is_the_servers_error(
    rig: Rig, path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with ServerThread(path, rig.dev):
        capsys.readouterr()
        assert run_ctl(path, "target", "1G") == 1
    line = one_line_error(capsys)
    assert line.startswith("vballoon ctl: balloon: Parameter 'value' expects a size")


def test_ctl_stats(rig: Rig, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    post_stats(rig, {StatTag.MEMFREE: 3 * MiB // 2, StatTag.MAJFLT: 7})
    with ServerThread(path, rig.dev):
        assert run_ctl(path, "stats") == 0
        out = capsys.readouterr().out
        assert out.startswith("guest statistics from ")
        assert "  free-memory          1.5 MiB\n" in out
        assert "  major-faults         7\n" in out
        assert "  swap-in              -\n" in out
        assert run_ctl(path, "stats", json_output=True) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["stats"]["stat-free-memory"] == 3 * MiB // 2 and res["last-update"] > 0


def test_ctl_stats_before_any(rig: Rig, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(path, rig.dev):
        assert run_ctl(path, "stats") == 0
    assert capsys.readouterr().out.startswith("no statistics from the guest yet\n")


def test_ctl_info(rig: Rig, path: str, capsys: pytest.CaptureFixture[str]) -> None:
    rig.pfns("inflate", list(range(300, 556)))
    set_actual(rig.dev, 256)
    with ServerThread(path, rig.dev):
        assert run_ctl(path, "info") == 0
        out = capsys.readouterr().out
        assert "features negotiated: 0x13001003f must-tell-host, stats-vq," in out
        assert "queues:              inflate=0 deflate=1 stats=2 free-page=3" in out
        assert "ballooned:           1 MiB (the guest's account; 1 MiB recorded" in out
        assert "guest RAM:           64 MiB\n" in out
        assert "  bytes-discarded       1048576\n" in out
        assert run_ctl(path, "info", json_output=True) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["ballooned-bytes"] == MiB


def test_ctl_nobody_listening(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    # As the command line: a root handler prints warnings and errors to stderr.
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        assert run_ctl(path, "info") == 1
    finally:
        logging.getLogger().removeHandler(handler)
    assert one_line_error(capsys) == (
        f"vballoon ctl: no control socket at {path} (is vballoon serve running?)"
    )
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    assert run_ctl(path, "target", "1G") == 1
    assert one_line_error(capsys).startswith(f"vballoon ctl: nobody is listening on {path}")


def test_ctl_command_fails(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with ServerThread(path, bare_device()):
        capsys.readouterr()
        assert run_ctl(path, "target", "1G") == 1
    assert one_line_error(capsys) == f"vballoon ctl: balloon: {NO_MEMORY}"


def test_ctl_not_qmp(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        assert run_ctl(path, "info") == 1
    finally:
        t.join(5)
        listener.close()
    assert "hung up before the QMP greeting" in one_line_error(capsys)


def test_ctl_connection_lost_during_command(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def greet_then_vanish() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            conn.recv(4096)  # qmp_capabilities (qemu.qmp sends no newline): answered
            conn.sendall(b'{"return": {}}\r\n')
            conn.recv(4096)  # the command arrives; no answer ever will

    t = threading.Thread(target=greet_then_vanish)
    t.start()
    try:
        assert run_ctl(path, "info") == 1
    finally:
        t.join(5)
        listener.close()
    assert one_line_error(capsys) == (
        "vballoon ctl: query-vballoon: the control socket closed the connection"
    )


def test_ctl_silent_server_times_out(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()  # connections wait in the backlog; no greeting ever comes
    try:
        t0 = time.monotonic()
        assert run_ctl(path, "stats", timeout=0.3) == 1
        assert time.monotonic() - t0 < 5
    finally:
        listener.close()
    assert one_line_error(capsys) == f"vballoon ctl: no answer from {path} within 0.3 s"


@pytest.mark.parametrize(
    ("action", "arg", "msg"),
    [
        ("target", None, "target needs a SIZE"),
        ("target", "12X", "not a size: '12X'"),
        ("stats", "now", "stats takes no argument"),
        ("resize", "1G", "unknown action 'resize'"),
    ],
)
def test_ctl_usage_errors(
    path: str, capsys: pytest.CaptureFixture[str], action: str, arg: str | None, msg: str
) -> None:
    assert run_ctl(path, action, arg) == 2
    assert one_line_error(capsys).startswith(f"vballoon ctl: {msg}")


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (3 * MiB // 2, "1.5 MiB"), (1 << 40, "1 TiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_trim_zero_over_the_control_socket(tmp_path) -> None:
    """``x-vballoon-trim-zero``: the zero pages of guest RAM go back; without memory, an
    error that says so."""
    from device import BalloonConfig, BalloonDevice, GuestMemory
    from device.testing import FRAME_SIZE, GuestRam, MiB

    path = str(tmp_path / "c.sock")
    ram = GuestRam(8 * MiB)
    ram.fill_pattern()
    ram.mapping[0 : 16 * FRAME_SIZE] = bytes(16 * FRAME_SIZE)
    dev = BalloonDevice(BalloonConfig(stats_interval=0))

    async def body() -> None:
        async with ControlServer(path, dev), qmp(path) as c:
            with pytest.raises(ExecuteError, match="no guest memory"):
                await c.execute("x-vballoon-trim-zero")
            mem = GuestMemory([ram.spec()])
            dev.set_memory(mem)
            done = await c.execute("x-vballoon-trim-zero")
            assert done["bytes"] == 16 * FRAME_SIZE
            assert done["scanned-bytes"] == ram.size
            dev.set_memory(None)
            mem.close()

    run(body())
    assert ram.allocated() == ram.size - 16 * FRAME_SIZE
    ram.close()
