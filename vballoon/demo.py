"""``vballoon demo``: a simulated Linux driver drives the device in this process.

The guest's RAM is a memfd mapped shared (what QEMU's memory-backend-memfd
gives a backend); the driver posts buffers on real split rings in that RAM,
exactly as Linux's virtio_balloon does. Every step prints what the host got
back, read from the memfd's allocated blocks, and checks that memory the
guest did not give away kept its contents.
"""

from __future__ import annotations

import gc
import struct
import time

from device import BalloonConfig, BalloonDevice, Queue
from device.defs import FRAME_SIZE, LINUX_PFNS_PER_BUFFER
from device.testing import RING_GPA, DriverRing, GuestRam, RecordingInterrupts, guest_memory
from vballoon.units import MiB


class _Guest:
    """Guest RAM (what is discarded and measured) and a ring region beside it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ram = GuestRam(size, name="vballoon-demo")
        self.rings = GuestRam(16 * MiB, gpa=RING_GPA, name="vballoon-demo-rings")
        self.mem = guest_memory(self.ram, self.rings)

    def resident_mib(self) -> float:
        return self.ram.allocated() / MiB

    def intact(self, frames: range) -> bool:
        return all(self.ram.frame_intact(f) for f in frames)

    def close(self) -> None:
        self.mem.close()
        gc.collect()  # ring views held by queue objects pin the mappings
        self.ram.close()
        self.rings.close()


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
    try:
        return _run_demo(g, size)
    finally:
        g.close()


def _run_demo(g: _Guest, size: int) -> int:
    irq = RecordingInterrupts()
    dev = BalloonDevice(BalloonConfig(stats_interval=0), irq)
    dev.set_memory(g.mem)
    dev.negotiate(dev.offered_features)
    rings: dict[Queue, DriverRing] = {}
    index: dict[Queue, int] = {}
    for i, q in enumerate(dev.layout.queues):
        rings[q] = DriverRing(g.mem, 64, RING_GPA + i * 2 * MiB, data_size=MiB)
        index[q] = i
        dev.start_queue(i, rings[q].device_queue())
    dev.activate()
    frames = size // FRAME_SIZE
    step = Checklist()

    print(
        f"vballoon demo: {size // MiB} MiB guest on a memfd, simulated Linux driver, "
        f"queues {dev.layout.describe()}"
    )
    g.ram.fill_pattern()
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
        dev.queue_notify(index[Queue.INFLATE])
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
        dev.queue_notify(index[Queue.DEFLATE])
        deflate.get_used()
    step(
        f"deflate of {len(back) * FRAME_SIZE // MiB} MiB discarded nothing, balloon now "
        f"{dev.tracked_frames * FRAME_SIZE // MiB} MiB",
        dev.tracked_frames == len(ballooned) - len(back),
    )

    # 3. Free-page reporting: 32 free 2 MiB blocks of the guest's low half in one report.
    before = g.resident_mib()
    report = rings[Queue.REPORTING]
    blocks = [(2 * MiB * (4 + 2 * k), 2 * MiB) for k in range(32)]
    report.add([], blocks)
    dev.queue_notify(index[Queue.REPORTING])
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
        dev.queue_notify(index[Queue.RANGE_REPORT])
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
