"""``vballoon serve`` as a process: startup errors, a frontend, SIGTERM, clean exit."""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys

from device import Queue
from device.testing import DriverRing, GuestRam, MiB, guest_memory
from tests.protocol.vhost_rig import Guest
from vballoon.waiting import wait_until


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vballoon.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_path(path: str, proc: subprocess.Popen[str]) -> None:
    wait_until(lambda: os.path.exists(path) or proc.poll() is not None, 10, path, 0.01)
    assert proc.poll() is None, proc.communicate()


def test_serve_runs_a_frontend_and_exits_cleanly_on_sigterm(tmp_path) -> None:
    sock, ctl = str(tmp_path / "v.sock"), str(tmp_path / "c.sock")
    proc = _serve("--socket", sock, "--control", ctl)
    _wait_path(ctl, proc)
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    ram = GuestRam(16 * MiB)
    ram.fill_pattern()
    g = Guest(sock, ram)
    g.start()
    before = ram.allocated()
    g.inflate(Queue.INFLATE, list(range(300, 556)))
    assert before - ram.allocated() == 256 * 4096
    # A buffer posted and kicked right before SIGTERM is finished and returned.
    ring = g.rings[Queue.INFLATE]
    ring.add([ring.buffer(struct.pack("<I", 300))])
    g.notify(Queue.INFLATE)
    assert g.wait_call(Queue.INFLATE)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert ring.get_used()
    assert not os.path.exists(sock) and not os.path.exists(ctl)
    assert "frontend connected" in err and "shutting down" in err
    assert "negotiated" in err and "queue 0 (inflate) started" in err
    g.close()
    ram.close()


def test_serve_startup_errors_are_one_line(tmp_path) -> None:
    ctl = str(tmp_path / "c.sock")
    proc = _serve("--socket", "/nonexistent-dir/v.sock", "--control", ctl)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        "vballoon serve: vhost-user socket /nonexistent-dir/v.sock: "
        "directory /nonexistent-dir does not exist"
    ]
    regular = tmp_path / "file"
    regular.write_text("x")
    proc = _serve("--socket", str(regular), "--control", ctl)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "exists and is not a socket" in err
    assert regular.read_text() == "x"


def test_serve_over_vfio_user_inflates_and_exits_cleanly(tmp_path) -> None:
    """The same process as a virtio-pci function: the driver double inflates through it,
    ``ctl`` sees the device, SIGTERM leaves no socket behind."""
    from virtio_pci.testing import VirtioPciDriver

    sock, ctl = str(tmp_path / "pci.sock"), str(tmp_path / "c.sock")
    proc = _serve("--vfio-user", sock, "--control", ctl)
    _wait_path(ctl, proc)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    ram = GuestRam(32 * MiB)
    ram.fill_pattern()
    drv = VirtioPciDriver(sock, ram)
    drv.attach()
    drv.negotiate(1 << 32)  # VERSION_1: inflate and deflate only
    ring = DriverRing(guest_memory(ram), 64, 24 * MiB)
    drv.setup_queue(Queue.INFLATE, ring)
    drv.enable_queue(Queue.INFLATE)
    drv.driver_ok()
    before = ram.allocated()
    ring.add([ring.buffer(struct.pack("<256I", *range(1024, 1280)))])
    drv.notify(Queue.INFLATE)
    assert drv.wait_queue_interrupt(Queue.INFLATE)
    assert ring.get_used()
    assert before - ram.allocated() == 256 * 4096
    assert all(ram.frame_zero(f) for f in range(1024, 1280))
    assert ram.frame_intact(1023) and ram.frame_intact(1280)
    info = subprocess.run(
        [sys.executable, "-m", "vballoon.cli", "ctl", "--control", ctl, "info", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert info.returncode == 0, info.stderr
    assert '"driver-ok": true' in info.stdout
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert not os.path.exists(sock) and not os.path.exists(ctl)
    assert "no --qemu-qmp" in err and "client connected" in err
    drv.close()
    ram.close()


def test_serve_transport_options_are_checked(tmp_path) -> None:
    sock, ctl = str(tmp_path / "s.sock"), str(tmp_path / "c.sock")
    proc = _serve("--vfio-user", sock, "--client", "--control", ctl)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "--client is for --socket" in err
    proc = _serve("--vfio-user", sock, "--socket", sock, "--control", ctl)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "not allowed with argument" in err
    proc = _serve("--control", ctl)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "--socket" in err and "--vfio-user" in err
    proc = _serve("--socket", sock, "--qemu-qmp", str(tmp_path / "q.sock"), "--control", ctl)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "--qemu-qmp is for --vfio-user only" in err
