"""The test environment itself: provisioning, a real guest boot, the guest agent, memhog.

The guest runs QEMU's built-in virtio-balloon (the reference the vballoon VM tests compare
against). Provisioning failures FAIL these tests (CI is root with registry access).
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vm_harness.guest_agent import GuestAgent, GuestAgentError, GuestTimeout
from vm_harness.provision import READY_MARKER, TestEnv
from vm_harness.vm import VM, VMOptions

pytestmark = pytest.mark.vm

MiB = 1 << 20
GUEST_MIB = 512
BOOT_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def balloon_guest(env: TestEnv) -> Iterator[VM]:
    """A booted guest with QEMU's balloon, its agent and a QMP connection."""
    vm = VM(env, VMOptions(balloon="qemu", mem_mib=GUEST_MIB, boot_timeout=BOOT_TIMEOUT))
    with vm:
        yield vm
    assert vm.qemu is not None and vm.qemu.poll() is not None, "QEMU still running after teardown"


def _agent(vm: VM) -> GuestAgent:
    assert vm.agent is not None
    return vm.agent


def test_provisioned_versions(env: TestEnv) -> None:
    assert tuple(int(x) for x in env.qemu_version.split(".")[:2]) >= (10, 2)
    assert env.kernel_version.startswith("6.12.")
    assert env.kernel.is_file()
    assert env.initramfs is not None and env.initramfs.is_file()
    assert env.host_path(env.headers_dir).is_dir()
    assert env.accel in ("kvm", "tcg")
    assert env.root is not None


def test_ready_marker_and_driver_bound(balloon_guest: VM) -> None:
    assert READY_MARKER in balloon_guest.console()
    agent = _agent(balloon_guest)
    rc, out = agent.run("ls /sys/bus/virtio/drivers/virtio_balloon/", 30)
    assert rc == 0
    assert re.search(r"^virtio\d+$", out, re.M), out
    assert "virtio_balloon" in agent.check("lsmod", 30)


def test_agent_exit_codes_stdin_and_output(balloon_guest: VM) -> None:
    agent = _agent(balloon_guest)
    assert agent.run("exit 7", 30) == (7, "")
    assert agent.run("echo out; echo err >&2", 30) == (0, "out\nerr\n")
    assert agent.run("kill -9 $$", 30)[0] == 128 + 9
    assert agent.run("tr a-z A-Z", 30, input=b"hello\n") == (0, "HELLO\n")
    blob = bytes(range(256)) * 64
    agent.put_file("/tmp/blob", blob)
    rc, data = agent.run_bytes("cat /tmp/blob", 30)
    assert rc == 0 and data == blob


def test_agent_guest_timeout_then_still_usable(balloon_guest: VM) -> None:
    agent = _agent(balloon_guest)
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as info:
        agent.run("sleep 60", timeout=1.0)
    assert time.monotonic() - t0 < 20
    assert "timed out" in str(info.value)
    assert "console.log ---" in str(info.value)  # the console tail is quoted
    assert agent.run("echo alive", 30) == (0, "alive\n")


def test_agent_ignores_garbage_on_the_real_port(balloon_guest: VM) -> None:
    agent = _agent(balloon_guest)
    assert agent._sock is not None
    agent._sock.sendall(b"\x00\xff garbage VBC\nVBC x\nVBC bad! 10 aGk=\nVBC ok 10 !!!\n")
    agent._sock.sendall(b"half a line without end")
    assert agent.run("echo fine", 30) == (0, "fine\n")


def test_memhog_checksum_survives_ballooning(balloon_guest: VM) -> None:
    agent = _agent(balloon_guest)
    out = agent.check("memhog touch 64", 60)
    assert out.startswith("touched 64 MiB")

    out = agent.check("memhog hold 96 /run/hog.sock 42", 60)
    m = re.match(r"held 96 MiB sum=([0-9a-f]{16}) pid=\d+", out)
    assert m, out
    held_sum = m.group(1)
    assert agent.check("memhog ask /run/hog.sock sum", 60).split() == [
        f"sum={held_sum}",
        "bad_pages=0",
        "mib=96",
    ]

    total_before = _mem_total_kib(agent)
    balloon_guest.balloon((GUEST_MIB - 192) * MiB)
    balloon_guest.wait_actual((GUEST_MIB - 192) * MiB, timeout=60)
    total_inflated = _mem_total_kib(agent)
    assert total_before - total_inflated >= 190 * 1024, (total_before, total_inflated)
    # The held data is intact while 192 MiB sit in the balloon ...
    assert agent.check("memhog ask /run/hog.sock sum", 60).startswith(f"sum={held_sum} bad_pages=0")
    balloon_guest.balloon(GUEST_MIB * MiB)
    balloon_guest.wait_actual(GUEST_MIB * MiB, timeout=60)
    # ... and after they came back; then the guest can use all its memory again.
    assert agent.check("memhog ask /run/hog.sock sum", 60).startswith(f"sum={held_sum} bad_pages=0")
    assert agent.check("memhog ask /run/hog.sock release", 60).strip() == "released 96 MiB"
    assert _mem_total_kib(agent) == total_before
    out = agent.check("memhog fill 8 24", 120)
    filled = int(re.search(r"fill done (\d+) MiB", out).group(1))  # type: ignore[union-attr]
    assert filled * 1024 >= total_before * 0.6, (filled, total_before)


def _mem_total_kib(agent: GuestAgent) -> int:
    out = agent.check("cat /proc/meminfo", 30)
    return int(re.search(r"^MemTotal:\s+(\d+) kB", out, re.M).group(1))  # type: ignore[union-attr]


# ---------------------------------------------------------------- GuestAgent against a fake guest


class FakeGuest:
    """A unix socket server that answers agent requests through ``respond(id, line)``."""

    def __init__(self, path: Path, respond) -> None:  # type: ignore[no-untyped-def]
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.respond = respond
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"VBC "):
                        conn.sendall(self.respond(line.split()[1], line))

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


def test_agent_ignores_garbage_and_wrong_ids(tmp_path: Path) -> None:
    def respond(req_id: bytes, line: bytes) -> bytes:
        cmd = base64.b64decode(line.split()[3])
        good = base64.b64encode(b"ran " + cmd)
        return b"".join(
            [
                b"\x00\xff\xfe random bytes \r\n",
                b"[   12.345] kernel: VBR " + req_id + b" 0 exit\n",  # truncated reply
                b"VBR other-1 0 exit " + good + b"\n",  # another id
                b"VBR " + req_id + b" 0 exit !!notbase64!!\n",  # bad payload
                b"VBR " + req_id + b" 0 weird " + good + b"\n",  # bad state
                b"VBR " + req_id + b" 0 exit " + good + b" trailing\n",  # extra field
                b"noise VBR " + req_id + b" 3 exit " + good + b"\r\n",  # the real one
            ]
        )

    fake = FakeGuest(tmp_path / "agent.sock", respond)
    try:
        with GuestAgent(tmp_path / "agent.sock") as agent:
            assert agent.run("echo hi", 5) == (3, "ran echo hi")
            assert len(agent.ignored) >= 5
    finally:
        fake.close()


def test_agent_times_out_clearly(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("boot line\nlast words of the guest\n")
    fake = FakeGuest(tmp_path / "agent.sock", lambda req_id, line: b"VBR nope 0 exit \n")
    try:
        with GuestAgent(tmp_path / "agent.sock", console_log=console) as agent:
            t0 = time.monotonic()
            with pytest.raises(GuestTimeout) as info:
                agent.run("true", timeout=0.2)
            assert time.monotonic() - t0 < 10
            msg = str(info.value)
            assert "no reply" in msg and "last words of the guest" in msg
    finally:
        fake.close()


def test_agent_missing_socket_times_out(tmp_path: Path) -> None:
    agent = GuestAgent(tmp_path / "nothing.sock")
    with pytest.raises(GuestTimeout, match="cannot connect"):
        agent.wait_ready(0.3)


def test_agent_connection_closed_is_an_error(tmp_path: Path) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "agent.sock"))
    srv.listen(1)

    def close_on_request() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=close_on_request, daemon=True)
    t.start()
    try:
        with (
            GuestAgent(tmp_path / "agent.sock") as agent,
            pytest.raises(GuestAgentError, match="closed"),
        ):
            agent.run("true", 5)
    finally:
        t.join(5)
        srv.close()
