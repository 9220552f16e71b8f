"""A real Linux guest under QEMU: vballoon over vhost-user, vballoon over vfio-user and QEMU's
own balloon, same checks.

Every scenario runs against the three balloons (parameter ``balloon``: ``vballoon`` is
vhost-user, ``vfio-user`` is vballoon as a whole virtio-pci function, ``qemu`` is QEMU's
own). Memory is measured from outside QEMU: the guest RAM file's allocated blocks.
"""

from __future__ import annotations

import random
import re
import signal
import time

import pytest

from device import queue_layout
from vm_harness.provision import TestEnv
from vm_harness.vm import VM, VMOptions, wait_for

pytestmark = pytest.mark.vm

MiB = 1 << 20
#: vballoon's two transports
OURS = ["vballoon", "vfio-user"]
BALLOONS = [*OURS, "qemu"]


def options(balloon: str, *, reporting: bool = False, **kw: object) -> VMOptions:
    """The same guest for every balloon; free page reporting on or off on all."""
    if balloon in OURS:
        args = [] if reporting else ["--no-reporting"]
        return VMOptions(balloon=balloon, vballoon_args=args, **kw)  # type: ignore[arg-type]
    props = {"free-page-reporting": "on"} if reporting else {}
    return VMOptions(balloon="qemu", builtin_props=props, **kw)  # type: ignore[arg-type]


def guest_features(vm: VM) -> int:
    """The features the guest's virtio_balloon driver negotiated (from sysfs)."""
    dev = vm.run("ls /sys/bus/virtio/drivers/virtio_balloon/ | grep '^virtio'").strip()
    bits = vm.run(f"cat /sys/bus/virtio/devices/{dev}/features").strip()
    return sum(1 << i for i, c in enumerate(bits) if c == "1")


def make_resident(vm: VM, keep_free_mib: int = 128) -> None:
    """Touch (and free) the guest's free memory so it is allocated on the host."""
    free = vm.meminfo()["MemFree"] // MiB
    vm.run(f"memhog touch {free - keep_free_mib}", timeout=300)


def hold(vm: VM, mib: int, seed: int = 7) -> str:
    out = vm.run(f"memhog hold {mib} /tmp/hold.sock {seed}", timeout=120)
    return re.search(r"sum=([0-9a-f]+)", out).group(1)  # type: ignore[union-attr]


def held_sum(vm: VM) -> tuple[str, int]:
    out = vm.run("memhog ask /tmp/hold.sock sum", timeout=120)
    m = re.search(r"sum=([0-9a-f]+) bad_pages=(\d+)", out)
    assert m, out
    return m.group(1), int(m.group(2))


# -- binding, features, layout ----------------------------------------------------------------


@pytest.mark.parametrize("balloon", BALLOONS)
def test_driver_binds_and_features_agree(env: TestEnv, balloon: str) -> None:
    with VM(env, options(balloon, reporting=True, mem_mib=512)) as vm:
        feats = guest_features(vm)
        assert feats & (1 << 32), "VERSION_1"
        assert feats & (1 << 1), "STATS_VQ"
        assert feats & (1 << 5), "REPORTING"
        if balloon in OURS:
            info = vm.vballoon_info()
            assert int(info["features"]["negotiated"], 16) == feats
            assert info["queues"] == {
                q.replace("_", "-"): i for q, i in queue_layout(feats).describe().items()
            }
            assert info["driver-ok"] is True


# -- inflate, deflate -----------------------------------------------------------------------


@pytest.mark.parametrize("balloon", BALLOONS)
def test_inflate_returns_memory_and_keeps_data(env: TestEnv, balloon: str) -> None:
    with VM(env, options(balloon, mem_mib=1024)) as vm:
        make_resident(vm)
        total = vm.actual()
        assert total == 1024 * MiB
        checksum = hold(vm, 64)
        before = vm.host_ram_bytes()
        assert before >= 800 * MiB, f"only {before >> 20} MiB resident before ballooning"
        target = 384 * MiB
        vm.balloon(target)
        took = vm.wait_actual(target, timeout=180)
        after = vm.host_ram_bytes()
        ballooned = total - target
        not_resident = total - before  # at most this much of the balloon was never on the host
        returned = before - after
        print(f"{balloon}: inflate to 384 MiB took {took:.1f} s, host -{returned >> 20} MiB")
        assert returned >= 0.9 * (ballooned - not_resident), (
            f"{balloon}: {returned >> 20} MiB of {ballooned >> 20} MiB came back"
        )
        assert held_sum(vm) == (checksum, 0), "held data changed while ballooning"
        if balloon in OURS:
            info = vm.vballoon_info()
            assert info["ballooned-bytes"] == ballooned
            assert info["counters"]["refused-ranges"] == 0
            assert info["counters"]["discard-errors"] == 0


@pytest.mark.parametrize("balloon", BALLOONS)
def test_deflate_to_full_lets_the_guest_use_all_memory(env: TestEnv, balloon: str) -> None:
    def fill(vm: VM) -> int:
        out = vm.run("memhog fill 8 16", timeout=300)
        return int(re.search(r"fill done (\d+) MiB", out).group(1))  # type: ignore[union-attr]

    with VM(env, options(balloon, mem_mib=1024)) as vm:
        fresh = fill(vm)  # what this guest can allocate before any ballooning
        vm.balloon(384 * MiB)
        vm.wait_actual(384 * MiB, timeout=180)
        vm.balloon(1024 * MiB)
        vm.wait_actual(1024 * MiB, timeout=180)
        again = fill(vm)
        print(f"{balloon}: {fresh} MiB allocatable before ballooning, {again} MiB after deflate")
        # Within 10% (the kernel keeps some slab from the cycle); far above the 384 MiB left.
        assert again >= 0.9 * fresh, f"{balloon}: {again} MiB allocatable again, {fresh} before"
        if balloon in OURS:
            assert vm.vballoon_info()["ballooned-bytes"] == 0


# -- pause and resume ----------------------------------------------------------------------------


def run_state(vm: VM) -> str:
    assert vm.qmp is not None
    status = vm.qmp.cmd("query-status")
    assert isinstance(status, dict)
    return str(status["status"])


@pytest.mark.parametrize("balloon", BALLOONS)
def test_pause_and_resume_keep_the_balloon(env: TestEnv, balloon: str) -> None:
    """QMP ``stop``/``cont``: vhost-user stops the device exactly as for a guest reset, and
    the balloon the guest still holds must still be reported, during and after."""
    with VM(env, options(balloon, mem_mib=768)) as vm:
        assert vm.qmp is not None and vm.ctl is not None
        held = hold(vm, 32)
        target = 512 * MiB
        vm.balloon(target)
        vm.wait_actual(target, timeout=180)
        vm.qmp.cmd("stop")
        assert run_state(vm) == "paused"
        assert vm.actual() == target, "paused: query-balloon lost the balloon"
        if balloon in OURS:
            paused = vm.vballoon_info()
            assert paused["ballooned-bytes"] == 256 * MiB and paused["actual"] == target
            if balloon == "vballoon":
                # QEMU 11.1 stops every ring and sends no SET_STATUS(0): suspended.
                assert paused["active-queues"] == [] and paused["tracked-bytes"] == 0
                assert paused["driver-ok"] is False
            else:
                # vfio-user-pci tells the device nothing of a pause: it stays as it was.
                assert paused["driver-ok"] is True and paused["active-queues"]
        vm.qmp.cmd("cont")
        wait_for(lambda: run_state(vm) == "running", 30, "the VM running again")
        assert vm.actual() == target, "resumed: query-balloon lost the balloon"
        if balloon in OURS:
            info = vm.vballoon_info()
            assert info["ballooned-bytes"] == 256 * MiB and info["actual"] == target
            assert info["driver-ok"] is True
            wait_for(lambda: vm.vballoon_info()["active-queues"], 30, "the queues running again")
        # The guest goes on from the balloon it holds: BALLOON_CHANGE counts from there.
        vm.ctl.clear_events()
        smaller = 384 * MiB
        vm.balloon(smaller)
        vm.wait_actual(smaller, timeout=180)
        sizes = wait_for(
            lambda: [
                e["data"]["actual"]
                for e in vm.ctl.get_events(wait=False)  # type: ignore[union-attr]
                if e["event"] == "BALLOON_CHANGE"
            ],
            10,
            "BALLOON_CHANGE events",
        )
        assert all(smaller <= size < target for size in sizes), sizes
        assert held_sum(vm) == (held, 0), "held data changed across the pause"
        if balloon in OURS:
            assert vm.vballoon_info()["ballooned-bytes"] == 384 * MiB


# -- stats --------------------------------------------------------------------------------------


def balloon_stats(vm: VM, balloon: str) -> dict[str, object]:
    if balloon in OURS:
        return vm.ctl.cmd_raw("query-balloon-stats")["return"]  # type: ignore[union-attr]
    path = "/machine/peripheral/balloon0"
    return vm.qmp.cmd_raw("qom-get", {"path": path, "property": "guest-stats"})["return"]  # type: ignore[union-attr]


@pytest.mark.parametrize("balloon", BALLOONS)
def test_stats_arrive_and_match_meminfo(env: TestEnv, balloon: str) -> None:
    with VM(env, options(balloon, mem_mib=512)) as vm:
        if balloon == "qemu":
            vm.qmp.cmd_raw(
                "qom-set",
                {
                    "path": "/machine/peripheral/balloon0",  # type: ignore[union-attr]
                    "property": "guest-stats-polling-interval",
                    "value": 1,
                },
            )
        first = wait_for(lambda: balloon_stats(vm, balloon).get("last-update"), 30, "stats")
        # A fresh update after this point, then compare with the guest's own view.
        wait_for(lambda: balloon_stats(vm, balloon)["last-update"] > first, 30, "fresh stats")
        stats = balloon_stats(vm, balloon)["stats"]
        memfree = vm.meminfo()["MemFree"]
        assert stats["stat-total-memory"] > 400 * MiB  # type: ignore[operator]
        free = stats["stat-free-memory"]
        assert abs(free - memfree) <= 0.1 * memfree, (free, memfree)  # type: ignore[operator]


# -- free page reporting -----------------------------------------------------------------------


def wait_quiet(vm: VM, settle: float = 3.0, timeout: float = 60.0) -> None:
    """Until the host-side RAM stops moving (earlier reporting finished)."""
    last, since = vm.host_ram_bytes(), time.monotonic()
    end = time.monotonic() + timeout
    while time.monotonic() - since < settle:
        assert time.monotonic() < end, "guest never went quiet"
        time.sleep(0.25)
        now = vm.host_ram_bytes()
        if abs(now - last) > 4 * MiB:
            last, since = now, time.monotonic()


@pytest.mark.parametrize("balloon", BALLOONS)
def test_free_page_reporting_returns_freed_memory(env: TestEnv, balloon: str) -> None:
    with VM(env, options(balloon, reporting=True, mem_mib=1024)) as vm:
        wait_quiet(vm)
        vm.run("memhog touch 512", timeout=300)
        t0 = time.monotonic()
        before = vm.host_ram_bytes()
        goal = before - int(0.85 * 512 * MiB)
        try:
            wait_for(lambda: vm.host_ram_bytes() <= goal, 10, "85% of 512 MiB back", 0.1)
        finally:
            print(
                f"{balloon}: {(before - vm.host_ram_bytes()) >> 20} MiB of 512 MiB back "
                f"after {time.monotonic() - t0:.1f} s"
            )


# -- without the optional features -------------------------------------------------------------


@pytest.mark.parametrize("balloon", BALLOONS)
def test_without_optional_features(env: TestEnv, balloon: str) -> None:
    opts = options(balloon, mem_mib=512)
    if balloon in OURS:
        opts.vballoon_args = [
            "--no-stats",
            "--no-reporting",
            "--no-free-page-hint",
            "--no-range-report",
        ]
        opts.num_vqs = 2
    with VM(env, opts) as vm:
        feats = guest_features(vm)
        if balloon in OURS:
            assert not feats & ((1 << 1) | (1 << 3) | (1 << 5))
            assert vm.vballoon_info()["queues"] == {"inflate": 0, "deflate": 1}
        make_resident(vm)
        before = vm.host_ram_bytes()
        vm.balloon(256 * MiB)
        vm.wait_actual(256 * MiB, timeout=120)
        assert before - vm.host_ram_bytes() >= 0.8 * 256 * MiB
        vm.balloon(512 * MiB)
        vm.wait_actual(512 * MiB, timeout=120)


# -- hugetlbfs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("balloon", BALLOONS)
def test_hugetlbfs_inflate(env: TestEnv, hugetlbfs: str, balloon: str) -> None:
    opts = options(balloon, mem_mib=1024, memory="hugetlbfs", hugetlbfs=hugetlbfs)
    with VM(env, opts) as vm:
        make_resident(vm)
        checksum = hold(vm, 64)
        before = vm.host_ram_bytes()
        vm.balloon(384 * MiB)
        vm.wait_actual(384 * MiB, timeout=180)
        returned = before - vm.host_ram_bytes()
        print(f"{balloon} on 2 MiB hugetlbfs: inflating 640 MiB returned {returned >> 20} MiB")
        assert held_sum(vm) == (checksum, 0)
        if balloon in OURS:
            # Linux sends 1 MiB per buffer; vballoon completes huge pages across buffers.
            not_resident = 1024 * MiB - before
            assert returned >= 0.9 * (640 * MiB - not_resident)
        else:
            # QEMU tracks a partial huge page only within one request: nothing comes back.
            assert returned < 0.1 * 640 * MiB


# -- the backend dies ----------------------------------------------------------------------------


@pytest.mark.parametrize("balloon", OURS)
def test_vm_survives_a_killed_vballoon(env: TestEnv, balloon: str) -> None:
    with VM(env, options(balloon, mem_mib=512)) as vm:
        assert vm.backend is not None
        vm.backend.send_signal(signal.SIGKILL)
        vm.backend.wait(timeout=10)
        # The guest lives on with a dead balloon: usable, and QEMU still answers QMP.
        assert vm.run("echo alive").strip() == "alive"
        vm.run("memhog touch 64", timeout=120)
        status = vm.qmp.cmd_raw("query-status")["return"]  # type: ignore[union-attr]
        assert status["status"] == "running"
        assert vm.qemu is not None and vm.qemu.poll() is None


# -- hammering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("balloon", BALLOONS)
def test_hammer_targets_for_a_minute(env: TestEnv, balloon: str) -> None:
    with VM(env, options(balloon, mem_mib=1024)) as vm:
        rnd = random.Random(1)
        end = time.monotonic() + 60
        worst_stall = 0.0
        changes = 0
        while time.monotonic() < end:
            target = rnd.randrange(384, 1025, 32) * MiB
            vm.balloon(target)
            changes += 1
            # Change the target again while the guest is still moving towards this one.
            deadline = time.monotonic() + rnd.uniform(0.05, 1.5)
            last, last_change = vm.actual(), time.monotonic()
            while time.monotonic() < deadline:
                now = vm.actual()
                if now != last:
                    last, last_change = now, time.monotonic()
                elif now != target:
                    worst_stall = max(worst_stall, time.monotonic() - last_change)
                time.sleep(0.02)
        final = 640 * MiB
        vm.balloon(final)
        vm.wait_actual(final, timeout=120)  # a lost interrupt would hang here
        print(f"{balloon}: {changes} target changes, worst stall {worst_stall:.2f} s")
        assert worst_stall <= 1.0, f"{balloon}: the balloon stalled for {worst_stall:.2f} s"
        assert vm.run("echo ok").strip() == "ok"
        if balloon in OURS:
            info = vm.vballoon_info()
            assert info["ballooned-bytes"] == 1024 * MiB - final
