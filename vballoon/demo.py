"""``vballoon demo``: a simulated Linux driver drives the device in this process.

The guest's RAM is a memfd mapped shared (what QEMU's memory-backend-memfd
gives a backend); the driver posts buffers on real split rings in that RAM,
exactly as Linux's virtio_balloon does. Every step prints what the host got
back, read from the memfd's allocated blocks, and checks that memory the
guest did not give away kept its contents.
"""

from __future__ import annotations

import struct
import time

from device import BalloonConfig, BalloonDevice, Queue
from device.defs import FRAME_SIZE, LINUX_PFNS_PER_BUFFER
from device.testing import RING_GPA, DriverRing, MemfdGuest, RecordingInterrupts

MiB = 1 << 20


def _pattern(frame: int) -> bytes:
    return struct.pack("<Q", frame * 0x9E3779B97F4A7C15 % (1 << 64)) * (FRAME_SIZE // 8)


class _Guest(MemfdGuest):
    def __init__(self, size: int) -> None:
        super().__init__(size, name="vballoon-demo")
        self.ram = self.data

    def resident_mib(self) -> float:
        return self.allocated() / MiB

    def write_pattern(self) -> None:
        for f in range(self.size // FRAME_SIZE):
            self.ram[f * FRAME_SIZE : (f + 1) * FRAME_SIZE] = _pattern(f)

    def intact(self, frames: range) -> bool:
        return all(self.ram[f * FRAME_SIZE : (f + 1) * FRAME_SIZE] == _pattern(f) for f in frames)


class Checklist:
    """Prints each checked step; ``finish`` prints the verdict and gives the exit code."""

    def __init__(self) -> None:
        self.ok = True

    def __call__(self, title: str, cond: bool) -> None:
        self.ok &= cond
        print(f"  [{'ok' if cond else 'FAILED'}] {title}")

    def finish(self) -> int:
        print("demo " + ("passed" if self.ok else "FAILED"))
        return 0 if self.ok else 1


def _report_header(encoding: int, nr: int, order: int = 0, base: int = 0) -> bytes:
    return struct.pack("<HHIIIQ", 1, encoding, nr, order, 0, base)


def run_demo(size: int = 512 * MiB) -> int:
    """Run the demo; 0 if every check held."""
    if size < 512 * MiB or size % (2 * MiB):
        print("vballoon demo: --size must be a multiple of 2M and at least 512M")
        return 2
    g = _Guest(size)
    irq = RecordingInterrupts()
    dev = BalloonDevice(BalloonConfig(stats_interval=0), irq)
    dev.set_memory(g.mem)
    dev.set_features(dev.offered_features)
    rings: dict[Queue, DriverRing] = {}
    for i, q in enumerate(dev.layout.queues):
        rings[q] = DriverRing(g.mem, 64, RING_GPA + i * 2 * MiB, data_size=MiB)
        dev.set_queue(i, rings[q].device_queue())
    frames = size // FRAME_SIZE
    step = Checklist()

    print(
        f"vballoon demo: {size // MiB} MiB guest on a memfd, simulated Linux driver, "
        f"queues {dev.layout.describe()}"
    )
    g.write_pattern()
    print(f"guest wrote its memory: host holds {g.resident_mib():.0f} MiB")

    # 1. The host sets a target; the driver inflates 256 PFNs per buffer until it is reached.
    target = frames // 2
    dev.set_num_pages(target)
    t0 = time.perf_counter()
    inflate = rings[Queue.INFLATE]
    ballooned = list(range(frames - target, frames))  # the guest gives its top half
    for i in range(0, len(ballooned), LINUX_PFNS_PER_BUFFER):
        chunk = ballooned[i : i + LINUX_PFNS_PER_BUFFER]
        inflate.add([inflate.buffer(struct.pack(f"<{len(chunk)}I", *chunk))])
        dev.queue_notify(dev.layout.index(Queue.INFLATE))
        inflate.get_used()
    dev.write_config(4, struct.pack("<I", len(ballooned)))
    dt = time.perf_counter() - t0
    print(
        f"inflate to {target * FRAME_SIZE // MiB} MiB: {dt * 1000:.0f} ms, "
        f"host holds {g.resident_mib():.0f} MiB "
        f"({dev.metrics.discard_syscalls} punch-hole calls for {len(ballooned)} frames)"
    )
    step("host got the ballooned half back", g.resident_mib() <= size / MiB / 2 + 1)
    step("the guest's other half is intact", g.intact(range(0, frames - target, 97)))

    # 2. Deflate a quarter: nothing is discarded, the guest may use the pages again.
    deflate = rings[Queue.DEFLATE]
    back = ballooned[: len(ballooned) // 2]
    for i in range(0, len(back), LINUX_PFNS_PER_BUFFER):
        chunk = back[i : i + LINUX_PFNS_PER_BUFFER]
        deflate.add([deflate.buffer(struct.pack(f"<{len(chunk)}I", *chunk))])
        dev.queue_notify(dev.layout.index(Queue.DEFLATE))
        deflate.get_used()
    step(
        f"deflate of {len(back) * FRAME_SIZE // MiB} MiB discarded nothing, balloon now "
        f"{dev.engine.ballooned_frames * FRAME_SIZE // MiB} MiB",
        dev.engine.ballooned_frames == len(ballooned) - len(back),
    )

    # 3. Free-page reporting: 32 free 2 MiB blocks of the guest's low half in one report.
    before = g.resident_mib()
    report = rings[Queue.REPORTING]
    blocks = [(2 * MiB * (4 + 2 * k), 2 * MiB) for k in range(32)]
    report.add([], blocks)
    dev.queue_notify(dev.layout.index(Queue.REPORTING))
    report.get_used()
    step(
        f"free-page report of 32 x 2 MiB returned {before - g.resident_mib():.0f} MiB",
        before - g.resident_mib() == 64,
    )

    # 4. vballoon range reports, one per encoding, each 8 MiB of the low half.
    rr = rings[Queue.RANGE_REPORT]
    base = 160 * MiB // FRAME_SIZE  # above the reported blocks, below the balloon
    encodings = {
        "pfn_len": _report_header(1, 1) + struct.pack("<QQ", base, 2048),
        "pfn_order": _report_header(2, 4)
        + b"".join(struct.pack("<Q", (base + 2048 + 512 * k) | 9 << 58) for k in range(4)),
        "bitmap": _report_header(3, 4, order=9, base=base + 4096) + bytes([0x0F]),
    }
    for name, buf in encodings.items():
        before = g.resident_mib()
        status = rr.alloc(16)
        rr.add([rr.buffer(buf)], [(status, 16)])
        dev.queue_notify(dev.layout.index(Queue.RANGE_REPORT))
        rr.get_used()
        err, _, got = struct.unpack("<IIQ", g.mem.read(status, 16))
        step(
            f"range report ({name}, {len(buf)} bytes): status {err}, "
            f"{got * FRAME_SIZE // MiB} MiB discarded, host -{before - g.resident_mib():.0f} MiB",
            err == 0 and got == 2048 and before - g.resident_mib() == 8,
        )
    step("memory nobody reported is intact", g.intact(range(base + 6144, frames - target, 53)))

    m = dev.metrics
    print(
        f"counters: {m.bytes_discarded // MiB} MiB discarded in {m.discard_syscalls} syscalls, "
        f"{m.discard_ns / 1e6:.1f} ms in the data plane, {m.refused_ranges} refused, "
        f"{m.discard_errors} errors, {m.interrupts} interrupts"
    )
    print(f"host now holds {g.resident_mib():.0f} of {size // MiB} MiB")
    return step.finish()


def run_vm_demo(mem_mib: int = 1024) -> int:
    """Boot a real Linux guest under QEMU with vballoon attached; show memory coming back.

    Provisions the test environment first if needed (root, Debian mirror).
    """
    import re

    from vballoon.testenv import ProvisionError, ensure_testenv
    from vballoon.vm import VM, VMError, VMOptions

    try:
        env = ensure_testenv()
    except ProvisionError as err:
        print(f"vballoon demo: cannot provision QEMU and a guest kernel: {err}")
        print("  (vballoon demo --in-process runs the device without a VM)")
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
