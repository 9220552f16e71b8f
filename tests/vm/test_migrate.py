"""``vballoon migrate`` on real QEMU: two QEMUs on this host, a Unix-socket migration, the
balloon unplugged before and plugged again after (vhost-user; QEMU 11.1 refuses to migrate
with the device attached, and cannot unplug a vfio-user device without aborting)."""

from __future__ import annotations

import re
import subprocess
import threading

import pytest

from vm_harness.provision import TestEnv
from vm_harness.trial_migrate import migrate_command
from vm_harness.vm import VM, VMOptions, wait_for

pytestmark = pytest.mark.vm

MiB = 1 << 20
TARGET = 768 * MiB


def hold(vm: VM) -> str:
    out = vm.run("memhog hold 64 /tmp/h.sock 5", timeout=120)
    return re.search(r"sum=([0-9a-f]+)", out).group(1)  # type: ignore[union-attr]


def held(vm: VM) -> tuple[str, int]:
    out = vm.run("memhog ask /tmp/h.sock sum", timeout=120)
    m = re.search(r"sum=([0-9a-f]+) bad_pages=(\d+)", out)
    assert m, out
    return m.group(1), int(m.group(2))


def migrate_cmd(src: VM, dst: VM) -> list[str]:
    uri = f"unix:{dst.workdir}/migration.sock"
    return [*migrate_command(src, dst, uri), "--timeout", "90"]


def source_and_destination(env: TestEnv) -> tuple[VM, VM]:
    return (
        VM(env, VMOptions(balloon="vballoon", mem_mib=1024)),
        VM(env, VMOptions(balloon="vballoon", mem_mib=1024, incoming=True)),
    )


def test_migrate_moves_the_guest_and_its_balloon(env: TestEnv) -> None:
    src, dst = source_and_destination(env)
    with src, dst:
        checksum = hold(src)
        src.balloon(TARGET)
        src.wait_actual(TARGET, timeout=120)
        source_ram = src.host_ram_bytes()
        res = subprocess.run(
            [*migrate_cmd(src, dst), "--trim"], capture_output=True, text=True, timeout=600
        )
        print(res.stderr)
        assert res.returncode == 0, res.stderr
        assert "balloon plugged into the destination, guest at 768 MiB" in res.stderr
        # The destination wrote every page it received; the trim gave the zero ones back.
        assert "trimmed" in res.stderr
        dest_ram = dst.host_ram_bytes()
        print(f"source held {source_ram >> 20} MiB, destination {dest_ram >> 20} MiB")
        assert dest_ram <= source_ram + 64 * MiB
        # The guest runs on the destination with its data and its balloon.
        dst.attach_agent(60)
        assert held(dst) == (checksum, 0)
        assert dst.actual() == TARGET
        info = dst.vballoon_info()
        assert info["driver-ok"] is True and info["ballooned-bytes"] == 1024 * MiB - TARGET
        assert dst.qmp is not None
        assert dst.qmp.cmd("query-status")["status"] == "running"  # type: ignore[index]
        # The balloon works there: a new target is reached.
        dst.balloon(640 * MiB)
        dst.wait_actual(640 * MiB, timeout=120)


def test_a_failed_migration_leaves_the_source_running_with_its_balloon(env: TestEnv) -> None:
    src, dst = source_and_destination(env)
    with src, dst:
        assert src.qmp is not None and dst.qemu is not None
        checksum = hold(src)
        src.balloon(TARGET)
        src.wait_actual(TARGET, timeout=120)
        # Slow enough that the destination can be killed in the middle of it.
        src.qmp.cmd_raw("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
        proc = subprocess.Popen(
            migrate_cmd(src, dst), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        out: dict[str, str] = {}
        reader = threading.Thread(
            target=lambda: out.update(
                zip(("stdout", "stderr"), proc.communicate(timeout=600), strict=True)
            )
        )
        reader.start()

        def sending() -> bool:
            info = src.qmp.cmd("query-migrate")  # type: ignore[union-attr]
            return bool(
                isinstance(info, dict)
                and info.get("status") == "active"
                and info["ram"]["transferred"] > 16 * MiB
            )

        wait_for(sending, 120, "the migration to be under way")
        dst.qemu.kill()
        reader.join(timeout=300)
        print(out.get("stderr", ""))
        assert proc.returncode == 1, out
        assert "the migration failed" in out["stderr"]
        assert "the source runs on with its balloon back" in out["stderr"]
        # The source runs, its data intact, its balloon back at the target and working.
        wait_for(
            lambda: src.qmp.cmd("query-status")["status"] == "running",  # type: ignore[index,union-attr]
            30,
            "the source running",
        )
        assert held(src) == (checksum, 0)
        assert src.actual() == TARGET
        assert src.vballoon_info()["driver-ok"] is True
        src.balloon(640 * MiB)
        src.wait_actual(640 * MiB, timeout=120)
