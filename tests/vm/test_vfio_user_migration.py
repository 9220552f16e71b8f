"""The migration guard on real QEMU: a VM whose balloon is vballoon over vfio-user must not
migrate (QEMU 11.1 would move it and leave the balloon dead on the destination).

``vballoon serve --qemu-qmp`` holds QEMU's ``events`` and ``pause-before-switchover``
migration capabilities on and cancels every migration it sees. Proven here with a real
outgoing migration (to a file): it ends ``cancelled``, the log says why and what to do,
the guest runs on, and its balloon still works.
"""

from __future__ import annotations

from typing import Any

import pytest

from vm_harness.provision import TestEnv
from vm_harness.vm import VM, VMOptions, wait_for

pytestmark = pytest.mark.vm

MiB = 1 << 20


def qmp(vm: VM, cmd: str, **args: Any) -> Any:
    assert vm.qmp is not None
    return vm.qmp.cmd_raw(cmd, args or None)["return"]


def capabilities(vm: VM) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in qmp(vm, "query-migrate-capabilities")}


def guard_ready(vm: VM) -> bool:
    caps = capabilities(vm)
    return bool(caps.get("events") and caps.get("pause-before-switchover"))


def test_a_migration_is_refused_and_the_vm_keeps_its_balloon(env: TestEnv, tmp_path) -> None:
    with VM(env, VMOptions(balloon="vfio-user", mem_mib=512)) as vm:
        wait_for(lambda: guard_ready(vm), 30, "the migration guard's capabilities")
        vm.balloon(384 * MiB)
        vm.wait_actual(384 * MiB, timeout=120)
        # An operator turns a capability off between migrations: the guard puts it back.
        qmp(
            vm,
            "migrate-set-capabilities",
            capabilities=[{"capability": "pause-before-switchover", "state": False}],
        )
        wait_for(lambda: guard_ready(vm), 10, "pause-before-switchover on again")

        target = tmp_path / "migration.img"
        qmp(vm, "migrate", uri=f"file:{target}")
        status = wait_for(
            lambda: (
                (s := qmp(vm, "query-migrate").get("status"))
                in ("cancelled", "completed", "failed")
                and s
            ),
            60,
            "the migration to end",
        )
        assert status == "cancelled", f"the migration ended {status!r}"
        log = vm.vballoon_log.read_text()
        assert "refused a live migration" in log and "device_del" in log, log[-2000:]
        # The source runs on with its balloon: the guest answers and the device still works.
        wait_for(lambda: qmp(vm, "query-status")["status"] == "running", 30, "the VM running")
        assert vm.run("echo alive").strip() == "alive"
        vm.balloon(448 * MiB)
        vm.wait_actual(448 * MiB, timeout=120)
        info = vm.vballoon_info()
        assert info["ballooned-bytes"] == 64 * MiB and info["driver-ok"] is True

        # A second attempt is refused too (one log line per migration).
        qmp(vm, "migrate", uri=f"file:{target}")
        wait_for(
            lambda: vm.vballoon_log.read_text().count("refused a live migration") == 2,
            30,
            "the second refusal",
        )
        wait_for(lambda: qmp(vm, "query-migrate").get("status") == "cancelled", 60, "cancelled")
        assert vm.run("echo alive").strip() == "alive"


def test_device_del_is_refused_on_the_root_bus(env: TestEnv) -> None:
    """QEMU 11.1.3 aborts when it unplugs a vfio-user-pci device (an assertion in
    memory_region_del_subregion, measured behind a pcie-root-port), so the argument set
    puts the device on pcie.0, where an unplug is refused cleanly."""
    with VM(env, VMOptions(balloon="vfio-user", mem_mib=512)) as vm:
        assert vm.qmp is not None
        reply = vm.qmp.cmd_raw("device_del", {"id": "vballoon0"})
        assert "does not support hotplugging" in reply["error"]["desc"], reply
        assert vm.run("echo alive").strip() == "alive"
        vm.balloon(384 * MiB)
        vm.wait_actual(384 * MiB, timeout=120)
