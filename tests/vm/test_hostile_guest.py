"""A hostile guest in a real VM: ``tests/guest_hostile/vballoon_hostile.ko`` writes malformed
rings and hostile requests straight into the balloon's inflate queue. One fresh VM each.

What must hold for vballoon, whatever the guest writes: the guest's canaries are intact
(a 2 MiB range it reserved with ``memmap=``, page 0, the BIOS shadow), the guest and the
host processes (QEMU, ``vballoon serve``) live on, over either transport. QEMU's own
balloon runs the same cases beside it; its outcomes are measured and printed
(``pytest -s``), and README has them in a table: vballoon must do better, not the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vm_harness.guest_module import build_module, guest_path, initramfs_with_module
from vm_harness.provision import TestEnv
from vm_harness.vm import VM, VMOptions

pytestmark = pytest.mark.vm

MODULE = "vballoon_hostile"
SOURCES = Path(__file__).resolve().parents[1] / "guest_hostile"
DEBUGFS = f"/sys/kernel/debug/{MODULE}"
#: The guest reserves 2 MiB here (2 MiB aligned, inside a 512 MiB guest).
CANARY = 0x10000000
CASES = ["loop", "wrap", "unmapped", "avail_jump", "pfns_beyond_ram", "pfns_legacy_window"]
#: vballoon over vhost-user, vballoon over vfio-user, QEMU's own
BALLOONS = ["vballoon", "vfio-user", "qemu"]
OURS = ("vballoon", "vfio-user")
#: What each balloon showed, for the table printed at the end.
OUTCOMES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def image(env: TestEnv) -> str:
    ko = build_module(env, SOURCES, MODULE)
    return str(initramfs_with_module(env, ko, MODULE))


def options(image: str, balloon: str, **kw: object) -> VMOptions:
    return VMOptions(
        balloon=balloon,  # type: ignore[arg-type]
        mem_mib=512,
        load_balloon=False,  # the hostile module binds instead of virtio_balloon
        initramfs=image,
        append=f"memmap=2M${CANARY:#x}",
        **kw,  # type: ignore[arg-type]
    )


def bind(vm: VM) -> None:
    vm.run(f"insmod {guest_path(MODULE)} canary_phys={CANARY:#x}")
    vm.run(f"echo fill > {DEBUGFS}/canary")


def run_case(vm: VM, case: str) -> str:
    rc, out = vm.run_rc(f"echo {case} > {DEBUGFS}/case", timeout=60)
    return "" if rc == 0 else out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"


def canaries(vm: VM) -> dict[str, bool]:
    words = vm.run(f"cat {DEBUGFS}/canary").split()
    return {"canary": words[1] == "ok", "page0": words[3] == "ok", "bios": words[5] == "ok"}


def hosts_alive(vm: VM) -> bool:
    alive = vm.qemu is not None and vm.qemu.poll() is None
    if vm.is_vballoon:
        alive = alive and vm.backend is not None and vm.backend.poll() is None
    return alive


def record(balloon: str, case: str, seen: dict[str, bool], note: str = "") -> None:
    bad = [k for k, ok in seen.items() if not ok]
    OUTCOMES[(case, balloon)] = ("ok" if not bad else "LOST " + ", ".join(bad)) + (
        f" ({note})" if note else ""
    )


@pytest.mark.parametrize("balloon", BALLOONS)
@pytest.mark.parametrize("case", CASES)
def test_hostile_request(env: TestEnv, image: str, case: str, balloon: str) -> None:
    with VM(env, options(image, balloon)) as vm:
        bind(vm)
        error = run_case(vm, case)
        seen = canaries(vm)
        seen["guest alive"] = vm.run("echo alive").strip() == "alive"
        seen["host processes alive"] = hosts_alive(vm)
        record(balloon, case, seen, error)
        if balloon in OURS:
            assert all(seen.values()), seen
            counters = vm.vballoon_info()["counters"]
            assert counters["discard-errors"] == 0


@pytest.fixture
def huge_options(image: str, hugetlbfs: str) -> Iterator[dict[str, object]]:
    yield {"memory": "hugetlbfs", "hugetlbfs": hugetlbfs, "reboot": True}


@pytest.mark.parametrize("balloon", BALLOONS)
def test_half_a_huge_page_then_a_reboot(
    env: TestEnv, image: str, huge_options: dict[str, object], balloon: str
) -> None:
    """The measured data loss: half of a 2 MiB page, ``system_reset``, the other half from
    the new boot. The new boot's data in the first half must survive."""
    with VM(env, options(image, balloon, **huge_options)) as vm:
        assert vm.qmp is not None and vm.agent is not None
        bind(vm)
        assert run_case(vm, "half_page_first") == ""
        vm.qmp.cmd("system_reset")
        vm.agent.wait_ready(180)
        bind(vm)  # the new boot writes its data into the whole range
        assert run_case(vm, "half_page_second") == ""
        seen = canaries(vm)
        seen["host processes alive"] = hosts_alive(vm)
        record(balloon, "half a 2 MiB page, reboot, other half", seen)
        if balloon in OURS:
            assert all(seen.values()), seen


@pytest.mark.parametrize("balloon", BALLOONS)
def test_the_whole_first_huge_page(
    env: TestEnv, image: str, huge_options: dict[str, object], balloon: str
) -> None:
    """On hugetlbfs QEMU's first region is 0-2 MiB, the legacy window in it: a guest that
    gives all 512 frames of that page must not get the BIOS shadow punched."""
    with VM(env, options(image, balloon, **huge_options)) as vm:
        bind(vm)
        error = run_case(vm, "first_2m_page")
        seen = canaries(vm)
        del seen["canary"]  # not in that page
        seen["host processes alive"] = hosts_alive(vm)
        record(balloon, "all 512 frames of the first 2 MiB page (hugetlbfs)", seen, error)
        if balloon in OURS:
            assert all(seen.values()), seen


@pytest.mark.parametrize("balloon", BALLOONS)
def test_both_halves_in_one_boot(
    env: TestEnv, image: str, huge_options: dict[str, object], balloon: str
) -> None:
    """The control: in one boot the guest gives the whole page, and vballoon frees it (the
    canary there goes, as the guest asked); QEMU's balloon frees nothing there."""
    with VM(env, options(image, balloon, **huge_options)) as vm:
        bind(vm)
        before = vm.host_ram_bytes()
        assert run_case(vm, "half_page_first") == ""
        assert run_case(vm, "half_page_second") == ""
        freed = before - vm.host_ram_bytes()
        seen = canaries(vm)
        OUTCOMES[("both halves in one boot", balloon)] = (
            f"page {'freed' if freed >= 2 << 20 else 'kept'}, canary "
            f"{'gone (given)' if not seen['canary'] else 'kept'}"
        )
        if balloon in OURS:
            assert freed >= 2 << 20 and not seen["canary"]
            assert seen["page0"] and seen["bios"]


def test_print_the_table() -> None:
    """The side-by-side table (README has it): run with ``-s`` to see it."""
    if not OUTCOMES:
        pytest.skip("no hostile case ran in this session")
    cases = sorted({c for c, _ in OUTCOMES}, key=lambda c: (c not in CASES, c))
    print("\n| case | vballoon (vhost-user) | vballoon (vfio-user) | QEMU's balloon |")
    print("|---|---|---|---|")
    for c in cases:
        print("| " + " | ".join([c, *(OUTCOMES.get((c, b), "-") for b in BALLOONS)]) + " |")
