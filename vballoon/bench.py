"""``vballoon bench discard``: the device's data path against raw kernel syscalls.

Every number is a ratio between two runs in this process on the same memory:
the device path (rings, chain walk, handler, C decode and coalescing, the
discard syscalls) and a reference that issues only the syscalls. Guest memory
is a memfd mapped shared, every page touched before each run, so each run
really returns memory (checked: the memfd's allocated bytes fall to the
expected value, or the run is reported as failed).
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from device import (
    BalloonConfig,
    BalloonDevice,
    BalloonMetrics,
    Feature,
    Queue,
)
from device._accel import ffi, lib
from device.defs import FRAME_SIZE, LINUX_PFNS_PER_BUFFER
from device.discard import DiscardEngine
from device.runner import DEFAULT_POLL_LIMIT_US
from device.testing import RING_GPA, DriverRing, GuestRam, guest_memory
from vballoon.units import GiB, MiB

#: Linux's PAGE_REPORTING_CAPACITY: entries in one free-page report.
REPORT_CAPACITY = 32
#: The first frame a PC guest can give: below 1 MiB sits the legacy window the device
#: never discards (device.defs.PC_LEGACY_WINDOW). Every benchmark starts here.
FIRST_FRAME = 0x100000 // FRAME_SIZE


class BenchError(RuntimeError):
    """A run did not return the memory it should have: its timing means nothing."""


@dataclass
class Scenario:
    """One measured comparison: device path against a reference."""

    key: str
    what: str
    device_s: float
    reference_s: float
    goal: float | None

    @property
    def ratio(self) -> float:
        """Reference time over device time: above 1, the device is faster."""
        return self.reference_s / self.device_s


class DiscardBench:
    """A device wired to a memfd of ``size`` bytes with inflate and reporting rings."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.frames = size // FRAME_SIZE
        self.ram = GuestRam(size, name="vballoon-bench")
        self.rings = GuestRam(16 * MiB, gpa=RING_GPA, name="vballoon-bench-rings")
        self.fd = self.ram.fd
        self.mem = guest_memory(self.ram, self.rings)
        self.dev = BalloonDevice(BalloonConfig(stats_interval=0))
        self.dev.set_memory(self.mem)
        self.dev.negotiate(Feature.VERSION_1 | Feature.REPORTING)
        self.inflate_idx = Queue.INFLATE  # inflate 0, deflate 1, reporting 2 (layout rule)
        self.report_idx = 2
        self.inflate = DriverRing(self.mem, 128, RING_GPA, data_size=4 * MiB)
        self.report = DriverRing(self.mem, 32, RING_GPA + 8 * MiB, data_size=MiB)
        self.dev.start_queue(self.inflate_idx, self.inflate.device_queue())
        self.dev.start_queue(self.report_idx, self.report.device_queue())
        self.dev.activate()
        if self.dev.layout.queue_at(self.report_idx) is not Queue.REPORTING:
            raise BenchError(f"unexpected queue layout {self.dev.layout.describe()}")
        # The reference path: only the syscalls, through the same data plane.
        self.reference = DiscardEngine(BalloonMetrics())
        self.reference.set_memory(self.mem)

    def close(self) -> None:
        self.reference.set_memory(None)
        self.dev.set_memory(None)
        del self.dev, self.inflate, self.report
        self.mem.close()
        gc.collect()  # ring views held by queue objects pin the mappings
        self.ram.close()
        self.rings.close()

    def allocated(self) -> int:
        return self.ram.allocated()

    def touch(self) -> None:
        """Allocate every page of guest RAM again, as a running guest's memory is.

        posix_fallocate on the memfd allocates the pages in the kernel without
        faulting them in one by one; the device never maps guest pages in either.
        """
        os.posix_fallocate(self.fd, 0, self.size)
        if self.allocated() < self.size:
            raise BenchError("could not populate the benchmark memory")

    def _check_returned(self, what: str, expected: int) -> None:
        left = self.allocated()
        if left > self.size - expected:
            raise BenchError(f"{what}: {self.size - left} of {expected} bytes came back")

    # -- device paths ----------------------------------------------------------

    def inflate_path(self, pfns: Sequence[int]) -> float:
        """Send ``pfns`` as Linux does (256 per buffer, kick, wait); time the device side.

        The frames stay in the balloon between runs: on 4 KiB-backed memory an inflate
        discards every frame it names whether or not it was ballooned, so every run
        does the same work.
        """
        self.touch()
        spent = 0
        ring = self.inflate
        for i in range(0, len(pfns), LINUX_PFNS_PER_BUFFER):
            chunk = pfns[i : i + LINUX_PFNS_PER_BUFFER]
            ring.add([ring.buffer(struct.pack(f"<{len(chunk)}I", *chunk))])
            t0 = time.perf_counter_ns()
            self.dev.queue_notify(self.inflate_idx)
            spent += time.perf_counter_ns() - t0
            if len(ring.get_used()) != 1:
                raise BenchError("inflate buffer not returned")
        self._check_returned("inflate", len(set(pfns)) * FRAME_SIZE)
        return spent / 1e9

    def report_path(self, blocks: Sequence[int], block_frames: int) -> float:
        """Report ``blocks`` (first frames) as free-page reports of 32 entries; time the device."""
        self.touch()
        spent = 0
        ring = self.report
        size = block_frames * FRAME_SIZE
        for i in range(0, len(blocks), REPORT_CAPACITY):
            entries = [(b * FRAME_SIZE, size) for b in blocks[i : i + REPORT_CAPACITY]]
            ring.add([], entries)
            t0 = time.perf_counter_ns()
            self.dev.queue_notify(self.report_idx)
            spent += time.perf_counter_ns() - t0
            if len(ring.get_used()) != 1:
                raise BenchError("report buffer not returned")
        self._check_returned("report", len(blocks) * size)
        return spent / 1e9

    def raw_path(self, extents: Sequence[tuple[int, int]]) -> float:
        """The reference: only the syscalls, one per given (first frame, frames) run."""
        self.touch()
        arr, n = DiscardEngine.extent_array(extents)
        t0 = time.perf_counter_ns()
        self.reference.raw_discard(arr, n)
        spent = time.perf_counter_ns() - t0
        self._check_returned("raw", sum(c for _, c in extents) * FRAME_SIZE)
        return spent / 1e9


def coalesce_per_buffer(
    pfns: Sequence[int], per: int = LINUX_PFNS_PER_BUFFER
) -> list[tuple[int, int]]:
    """The runs the device issues: each buffer's PFNs sorted, deduplicated, merged."""
    out: list[tuple[int, int]] = []
    for i in range(0, len(pfns), per):
        runs: list[list[int]] = []
        for p in sorted(set(pfns[i : i + per])):
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        out.extend((s, c) for s, c in runs)
    return out


def _median_pair(
    device: Callable[[], float],
    reference: Callable[[], float],
    repeat: int,
    reduce: Callable[[list[float]], float] = statistics.median,
) -> tuple[float, float]:
    """Alternate the two runs ``repeat`` times; medians (or ``reduce``) of each."""
    d, r = [], []
    for _ in range(repeat):
        d.append(device())
        r.append(reference())
    return reduce(d), reduce(r)


# -- decode throughput (no syscalls) ----------------------------------------------------


def _fragmented_frames(span: int, seed: int = 1) -> list[int]:
    """Half the frames of a span free, in runs of 1 to 16 frames: a fragmented guest."""
    rnd = random.Random(seed)
    out: list[int] = []
    f, free = 0, True
    while f < span:
        n = rnd.randint(1, 16)
        if free:
            out.extend(range(f, min(f + n, span)))
        f += n
        free = not free
    return out


def _runs(frames: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for p in frames:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(s, c) for s, c in runs]


def _buddy_blocks(runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Split runs into naturally aligned power-of-two blocks (pfn, order), as a buddy allocator."""
    out = []
    for s, c in runs:
        while c:
            order = (s & -s).bit_length() - 1 if s else 30
            while (1 << order) > c:
                order -= 1
            out.append((s, order))
            s += 1 << order
            c -= 1 << order
    return out


def _header(encoding: int, nr: int, order: int = 0, base: int = 0) -> bytes:
    return struct.pack("<HHIIIQ", 1, encoding, nr, order, 0, base)


def decode_rates(span: int, repeat: int) -> dict[str, float]:
    """Millions of frames decoded per second, per encoding, same fragmented frame set."""
    frames = _fragmented_frames(span)
    runs = _runs(frames)
    blocks = _buddy_blocks(runs)
    bits = bytearray((span + 7) // 8)
    for f in frames:
        bits[f // 8] |= 1 << (f % 8)
    reports = {
        "pfn_len": _header(1, len(runs)) + b"".join(struct.pack("<QQ", s, c) for s, c in runs),
        "pfn_order": _header(2, len(blocks))
        + b"".join(struct.pack("<Q", s | o << 58) for s, o in blocks),
        "bitmap": _header(3, span) + bytes(bits),
    }
    rates: dict[str, float] = {}
    # PFN arrays (inflate buffers) in accelerator batches.
    batch = 16384
    arr = struct.pack(f"<{len(frames)}I", *frames)
    scratch = ffi.new("uint32_t[]", batch)
    out = ffi.new("struct balloon_accel_extent[]", batch)
    src = ffi.from_buffer(arr)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for i in range(0, len(frames), batch):
            lib.balloon_accel_compact_pfns(src + 4 * i, min(batch, len(frames) - i), scratch, out)
        best = min(best, time.perf_counter_ns() - t0)
    rates["pfn_array"] = len(frames) / best * 1e3
    cap = span // 2 + 1
    ext = ffi.new("struct balloon_accel_extent[]", cap)
    nout = ffi.new("size_t *")
    bad = ffi.new("uint32_t *")
    for name, buf in reports.items():
        cbuf = ffi.from_buffer(buf)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            err = lib.balloon_accel_decode_report(cbuf, len(buf), ext, cap, nout, bad)
            best = min(best, time.perf_counter_ns() - t0)
            if err:
                raise BenchError(f"{name} report did not decode: error {err}")
        decoded = sum(ext[i].count for i in range(nout[0]))
        if decoded != len(frames):
            raise BenchError(f"{name} decoded {decoded} frames, expected {len(frames)}")
        rates[name] = len(frames) / best * 1e3
    return rates


# -- the whole benchmark -------------------------------------------------------------


def machine() -> dict[str, str | int]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def run_discard_bench(size: int = GiB, repeat: int = 3, seed: int = 42) -> dict[str, Any]:
    """Run every scenario; return the JSON-able result (ratios plus raw seconds)."""
    b = DiscardBench(size)
    try:
        frames = b.frames
        contig = list(range(FIRST_FRAME, frames))
        shuffled = contig[:]
        random.Random(seed).shuffle(shuffled)
        block = 512  # 2 MiB
        blocks = list(range(block, frames - frames % block, block))
        random.Random(seed + 1).shuffle(blocks)
        contig_runs = coalesce_per_buffer(contig)
        scenarios = []
        d, r = _median_pair(lambda: b.inflate_path(contig), lambda: b.raw_path(contig_runs), repeat)
        scenarios.append(
            Scenario(
                "inflate_contig_vs_raw",
                "inflate contiguous, 256-PFN buffers vs raw punch of the same runs",
                d,
                r,
                0.9,
            )
        )
        per_page = [(p, 1) for p in contig]
        d2, r2 = _median_pair(lambda: b.inflate_path(contig), lambda: b.raw_path(per_page), repeat)
        scenarios.append(
            Scenario(
                "inflate_contig_vs_per_page",
                "inflate contiguous vs one punch per 4 KiB frame (QEMU's way)",
                d2,
                r2,
                3.0,
            )
        )
        shuffled_runs = coalesce_per_buffer(shuffled)
        d3, r3 = _median_pair(
            lambda: b.inflate_path(shuffled), lambda: b.raw_path(shuffled_runs), repeat
        )
        scenarios.append(
            Scenario(
                "inflate_shuffled_vs_raw",
                "inflate shuffled frames vs raw punch of the same runs",
                d3,
                r3,
                0.8,
            )
        )
        d4, r4 = _median_pair(
            lambda: b.report_path(blocks, block),
            lambda: b.raw_path([(x, block) for x in blocks]),
            repeat,
        )
        scenarios.append(
            Scenario(
                "report_2m_vs_raw",
                "free-page reports of 2 MiB blocks (32 a report) vs raw punch",
                d4,
                r4,
                0.9,
            )
        )
        rates = decode_rates(min(frames, 1 << 18), repeat)
    finally:
        b.close()
    result: dict[str, Any] = {s.key: round(s.ratio, 3) for s in scenarios}
    result["decode_mpfn_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    result["seconds"] = {
        s.key: {"device": round(s.device_s, 4), "reference": round(s.reference_s, 4)}
        for s in scenarios
    }
    result["goals"] = {s.key: s.goal for s in scenarios}
    result["descriptions"] = {s.key: s.what for s in scenarios}
    result["memory_bytes"] = size
    result["machine"] = machine()
    return result


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of :func:`run_discard_bench`'s result."""
    lines = []
    m = result["machine"]
    lines.append(
        f"vballoon bench discard: {result['memory_bytes'] >> 20} MiB memfd, "
        f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']} (no VM)"
    )
    lines.append(f"{'scenario':30} {'device s':>9} {'ref s':>9} {'ratio':>7} {'goal':>6}  meaning")
    secs, goals, desc = result["seconds"], result["goals"], result["descriptions"]
    for key, s in secs.items():
        ratio = result[key]
        goal = goals[key]
        mark = "ok" if goal is None or ratio >= goal else "MISS"
        lines.append(
            f"{key:30} {s['device']:9.4f} {s['reference']:9.4f} {ratio:7.2f} "
            f"{'>=' + str(goal):>6}  {mark}: {desc[key]}"
        )
    rates = result["decode_mpfn_per_s"]
    lines.append(
        "decode_mpfn_per_s (fragmented frames, no syscalls): "
        + ", ".join(f"{k} {v}" for k, v in rates.items())
    )
    return "\n".join(lines)


# -- vhost-user: the same inflate through the socket, eventfds and rings ---------------


class RemoteBench:
    """``vballoon serve`` in a child process, driven over one transport's real socket
    (:mod:`vballoon.bench_rig`), one inflate buffer at a time.

    :param transport: ``vhost-user`` (our frontend, kick and call eventfds) or ``vfio-user``
        (our virtio-pci driver: posted notify writes, an MSI-X eventfd)
    """

    def __init__(
        self, transport: str, size: int, workdir: str, busy_poll_us: int, driver_poll_us: int
    ) -> None:
        from vballoon.bench_rig import Frontend, GuestMemfds, PciDriver, RigError, ServeChild

        self.transport = transport
        self.size = size
        self.rig_error = RigError
        try:
            self.child = ServeChild(
                workdir, "--busy-poll-us", str(busy_poll_us), transport=transport
            )
        except RigError as err:
            raise BenchError(str(err)) from None
        self.guest = GuestMemfds(size)
        try:
            if transport == "vfio-user":
                pci = PciDriver(self.child.sock, self.guest, poll_us=driver_poll_us)
                self._post: Callable[[Sequence[int]], None] = pci.post_pfns
                self._close: Callable[[], None] = pci.close
            else:
                fe = Frontend(self.child.sock, self.guest, queues=1, poll_us=driver_poll_us)
                self._post = lambda pfns: fe.post_pfns(0, pfns)
                self._close = fe.close
        except RigError as err:
            self.child.close()
            self.guest.close()
            raise BenchError(f"{transport}: {err}") from None

    def inflate(self, pfns: Sequence[int]) -> float:
        """Wall time to inflate ``pfns`` (driver side included, as in the in-process run)."""
        os.posix_fallocate(self.guest.fd, 0, self.size)
        t0 = time.perf_counter_ns()
        try:
            for i in range(0, len(pfns), LINUX_PFNS_PER_BUFFER):
                self._post(pfns[i : i + LINUX_PFNS_PER_BUFFER])
        except self.rig_error as err:
            raise BenchError(f"{self.transport} inflate: {err}") from None
        spent = time.perf_counter_ns() - t0
        if self.guest.allocated() > self.size - len(set(pfns)) * FRAME_SIZE:
            raise BenchError(f"{self.transport} inflate did not return the memory")
        return spent / 1e9

    def close(self) -> None:
        self._close()
        self.child.close()
        self.guest.close()


def _inprocess_wall(b: DiscardBench, pfns: Sequence[int]) -> float:
    """The in-process run timed like the vhost-user one: posting and reaping included."""
    b.touch()
    ring = b.inflate
    t0 = time.perf_counter_ns()
    for i in range(0, len(pfns), LINUX_PFNS_PER_BUFFER):
        chunk = pfns[i : i + LINUX_PFNS_PER_BUFFER]
        ring.add([ring.buffer(struct.pack(f"<{len(chunk)}I", *chunk))])
        b.dev.queue_notify(b.inflate_idx)
        if len(ring.get_used()) != 1:
            raise BenchError("inflate buffer not returned")
    spent = time.perf_counter_ns() - t0
    b._check_returned("inflate", len(set(pfns)) * FRAME_SIZE)
    return spent / 1e9


def run_transport_bench(
    transport: str,
    size: int = GiB,
    repeat: int = 5,
    busy_poll_us: int = DEFAULT_POLL_LIMIT_US,
    driver_poll_us: int = DEFAULT_POLL_LIMIT_US,
) -> dict[str, Any]:
    """In-process wall time over wall time through ``transport``'s socket, the ratio of
    the medians of ``repeat`` alternating runs, with the spread of the per-run ratios.

    The JSON keys are an interface: ``vhost_user_vs_inprocess`` (goal 0.8) or
    ``vfio_user_vs_inprocess`` (goal 0.7), ``seconds.vhost_user`` / ``seconds.vfio_user``.
    """
    import tempfile

    key = transport.replace("-", "_")
    pfns = list(range(FIRST_FRAME, size // FRAME_SIZE))
    with tempfile.TemporaryDirectory(prefix="vballoon-bench-") as tmp:
        local = DiscardBench(size)
        remote = RemoteBench(transport, size, tmp, busy_poll_us, driver_poll_us)
        through: list[float] = []
        inproc: list[float] = []
        try:
            # The child keeps the frames ballooned across runs; re-inflating them is still a
            # full discard (4 KiB-backed memory), so every run does the same work.
            for _ in range(repeat):
                through.append(remote.inflate(pfns))
                inproc.append(_inprocess_wall(local, pfns))
        finally:
            remote.close()
            local.close()
    per_run = [i / v for i, v in zip(inproc, through, strict=True)]
    return {
        f"{key}_vs_inprocess": round(statistics.median(inproc) / statistics.median(through), 3),
        "spread": {"min": round(min(per_run), 3), "max": round(max(per_run), 3)},
        "seconds": {
            key: round(statistics.median(through), 4),
            "inprocess": round(statistics.median(inproc), 4),
        },
        "goal": TRANSPORT_GOALS[transport],
        "busy_poll_us": busy_poll_us,
        # the driver side's polling (vhost-user: the frontend's, as before)
        ("frontend_poll_us" if transport == "vhost-user" else "driver_poll_us"): driver_poll_us,
        "runs": repeat,
        "memory_bytes": size,
        "machine": machine(),
    }


#: ``<transport>_vs_inprocess`` goals (the issues' numbers).
TRANSPORT_GOALS = {"vhost-user": 0.8, "vfio-user": 0.7}


def run_vhost_user_bench(
    size: int = GiB,
    repeat: int = 5,
    busy_poll_us: int = DEFAULT_POLL_LIMIT_US,
    frontend_poll_us: int = DEFAULT_POLL_LIMIT_US,
) -> dict[str, Any]:
    """``vhost_user_vs_inprocess`` (:func:`run_transport_bench` over vhost-user)."""
    return run_transport_bench("vhost-user", size, repeat, busy_poll_us, frontend_poll_us)
