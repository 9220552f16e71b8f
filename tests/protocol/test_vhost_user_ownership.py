"""State derived from a guest ends with the guest's ownership: the data-loss regressions.

Each test drives the message order QEMU 11.1 really sends (``../shared/spec/vhost-user.md``
§12) against the real daemon, with guest RAM on 2 MiB hugetlbfs, where one stale
"ballooned" bit completes a huge page and punches live data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from device import Feature, Queue
from device.testing import FRAME_SIZE, GuestRam, MiB
from tests.conftest import is_root
from tests.protocol.vhost_rig import BackendThread, Guest
from vhost_user.messages import ProtocolFeature

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root for nr_hugepages")

HUGE_GPA = 1 << 30
HUGE_FRAMES = 2 * MiB // FRAME_SIZE
FIRST = HUGE_GPA // FRAME_SIZE


class Vm:
    """One VM's memory: a memfd for rings and a 4 MiB hugetlbfs region holding its data."""

    def __init__(self) -> None:
        self.ram = GuestRam(16 * MiB)
        self.huge = GuestRam(4 * MiB, gpa=HUGE_GPA, hugetlb=True)
        self.huge.fill_pattern()  # this guest's live data

    def first_half_intact(self) -> bool:
        return all(self.huge.frame_intact(f) for f in range(FIRST, FIRST + HUGE_FRAMES // 2))

    def close(self) -> None:
        self.ram.close()
        self.huge.close()


@pytest.fixture
def vms(hugepages: int) -> Iterator[list[Vm]]:
    made: list[Vm] = []
    yield made
    for vm in made:
        vm.close()


def boot(sock_path: str, vm: Vm, **kw: object) -> Guest:
    g = Guest(sock_path, vm.ram, extra=(vm.huge,), **kw)  # type: ignore[arg-type]
    g.start()
    return g


def half(g: Guest, which: int) -> None:
    """Balloon one half of the first huge page (Linux sends 1 MiB per buffer)."""
    start = FIRST + which * HUGE_FRAMES // 2
    g.inflate(Queue.INFLATE, list(range(start, start + HUGE_FRAMES // 2)))


def test_both_halves_in_one_boot_free_the_page(
    backend: BackendThread, sock_path: str, vms: list[Vm]
) -> None:
    vms.append(Vm())
    g = boot(sock_path, vms[0])
    before = vms[0].huge.allocated()
    half(g, 0)
    half(g, 1)
    assert before - vms[0].huge.allocated() == 2 * MiB, "the design: halves complete a page"
    g.close()


def test_a_new_vm_on_the_same_process_starts_fresh(
    backend: BackendThread, sock_path: str, vms: list[Vm]
) -> None:
    """QEMU killed with half a page ballooned; a new VM with the same layout connects."""
    dev = backend.device
    backend.call(lambda: dev.set_num_pages(1234))
    vms.append(Vm())
    old = boot(sock_path, vms[0])
    half(old, 0)
    old.fe.set_config(4, struct.pack("<I", HUGE_FRAMES // 2))
    old.fe.set_config(12, struct.pack("<I", 0xAA))  # poison_val
    old.fe.conn.close()  # QEMU dies: no goodbye
    vms.append(Vm())
    new = Guest(sock_path, vms[1].ram, extra=(vms[1].huge,))
    assert new.fe.get_status() == 0, "a stale status makes QEMU skip SET_STATUS"
    fresh = backend.call(lambda: (dev.actual, dev.poison_val, dev.tracked_frames))
    assert fresh == (0, 0, 0)
    assert backend.call(lambda: dev.num_pages) == 1234, "the operator's target stays"
    new.start()
    half(new, 1)
    assert vms[1].first_half_intact(), "the new guest's live data was punched"
    assert vms[1].huge.allocated() == 4 * MiB
    new.close()


@pytest.mark.parametrize("must_tell_host", [True, False])
@pytest.mark.parametrize("status", [True, False])
def test_a_guest_reset_in_qemus_order_forgets_the_half_page(
    backend: BackendThread, sock_path: str, vms: list[Vm], must_tell_host: bool, status: bool
) -> None:
    """``system_reset``: SET_VRING_ENABLE(0) on every ring, then GET_VRING_BASE, and no
    SET_STATUS(0) whatever STATUS says; the new boot starts the rings again."""
    vms.append(Vm())
    vm = vms[0]
    without = 0 if status else ProtocolFeature.STATUS
    g = Guest(sock_path, vm.ram, extra=(vm.huge,), without_protocol=without)
    assert bool(g.fe.protocol_features & ProtocolFeature.STATUS) is status
    if not must_tell_host:
        g.features &= ~Feature.MUST_TELL_HOST
    g.start()
    half(g, 0)
    g.pause()  # the reset: the device is stopped exactly as for a pause
    vm.huge.fill_pattern()  # the new boot uses the first half as ordinary memory
    g.start()  # fresh rings, as a rebooted driver sets them up
    half(g, 1)
    assert vm.first_half_intact(), "the new boot's live data was punched"
    g.close()
