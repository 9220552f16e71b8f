"""``vballoon demo``: a real Linux guest under QEMU with vballoon attached; memory coming back.

Each step is measured on the host (the guest RAM file's allocated blocks) and
checked; the guest's held data is checksummed before and after the balloon.
"""

from __future__ import annotations

import re
import time

from vballoon.demo import Checklist
from vballoon.units import MiB
from vm_harness.testenv import ProvisionError, ensure_testenv
from vm_harness.vm import VM, VMError, VMOptions


def run_vm_demo(mem_mib: int = 1024) -> int:
    """Boot a real Linux guest under QEMU with vballoon attached; show memory coming back.

    Provisions the test environment first if needed (root, Debian mirror).
    """
    try:
        env = ensure_testenv()
    except ProvisionError as err:
        print(
            f"vballoon demo: needs QEMU >= 10.2 and a Linux guest, provisioning them failed: "
            f"{err} (vballoon demo --in-process runs without a VM)"
        )
        return 1
    step = Checklist()

    print(
        f"vballoon demo: Linux {env.kernel_version} guest, {mem_mib} MiB, QEMU "
        f"{env.qemu_version} ({env.accel}), vballoon attached over vhost-user"
    )
    try:
        with VM(env, VMOptions(balloon="vballoon", mem_mib=mem_mib)) as vm:
            total = mem_mib * MiB
            info = vm.vballoon_info()
            print(f"guest booted; negotiated {', '.join(info['features']['negotiated-names'])}")
            print(f"queues {info['queues']}")
            free = vm.meminfo()["MemFree"] // MiB
            vm.run(f"memhog touch {free - 128}", timeout=300)
            out = vm.run("memhog hold 64 /tmp/demo.sock 5", timeout=120)
            checksum = re.search(r"sum=([0-9a-f]+)", out).group(1)  # type: ignore[union-attr]
            resident = vm.host_ram_bytes()
            print(
                f"guest touched its free memory and holds 64 MiB (checksum {checksum}): "
                f"host holds {resident >> 20} MiB of guest RAM"
            )

            target = total * 3 // 8
            vm.balloon(target)
            took = vm.wait_actual(target, timeout=300)
            after = vm.host_ram_bytes()
            step(
                f"balloon to {target >> 20} MiB in {took:.1f} s: host holds {after >> 20} MiB "
                f"({(resident - after) >> 20} MiB returned)",
                resident - after >= 0.9 * (total - target - (total - resident)),
            )
            got = vm.run("memhog ask /tmp/demo.sock sum", timeout=120)
            step(f"guest data intact: {got.strip()}", f"sum={checksum} bad_pages=0" in got)

            vm.balloon(total)
            vm.wait_actual(total, timeout=300)
            step("deflated: the guest has all its memory again", vm.actual() == total)

            before = vm.host_ram_bytes()
            vm.run("memhog touch 256", timeout=300)
            peak = vm.host_ram_bytes()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15 and peak - vm.host_ram_bytes() < 0.85 * 256 * MiB:
                time.sleep(0.2)
            back = peak - vm.host_ram_bytes()
            step(
                f"free page reporting: the guest touched and freed 256 MiB, "
                f"{back >> 20} MiB back on the host after {time.monotonic() - t0:.1f} s "
                f"(host held {before >> 20} MiB before)",
                back >= 0.85 * 256 * MiB,
            )
            c = vm.vballoon_info()["counters"]
            print(
                f"vballoon counters: {c['bytes-discarded'] >> 20} MiB discarded in "
                f"{c['discard-syscalls']} syscalls ({c['discard-ns'] / 1e6:.0f} ms), "
                f"{c['inflate-buffers']} inflate buffers, {c['reports']} reports, "
                f"{c['refused-ranges']} refused, {c['discard-errors']} errors"
            )
    except VMError as err:
        print(f"vballoon demo: {err}")
        return 1
    return step.finish()
