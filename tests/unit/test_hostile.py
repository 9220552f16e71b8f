"""A hostile driver against the whole device: rings, chains and payloads it controls.

Guest RAM is a 16 MiB memfd: the first 8 MiB are data frames holding a known
pattern, the last 8 MiB hold the rings (``tests.conftest.Rig``). Whatever the
driver writes, kicking a queue must return without an exception, count what
was wrong, return every buffer it consumed, and change no data frame that no
valid inflate, report or status buffer named.

The exact tests post well-formed chains with hostile payloads and predict
every frame. ``test_random_rings`` writes arbitrary descriptor tables and
avail rings; there an oracle wraps the device's own seams (queue pops, queue
handlers, the discard engine and memory writes), checks each against the
reference walk below and ``tests/reference.py``, and so learns which frames a
valid request really named.
"""

from __future__ import annotations

import contextlib
import mmap
import signal
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from device import ChainError, GuestError, Queue, RingError, Status
from device._accel import ffi
from device.defs import MAX_PFN_BUFFER_BYTES, MAX_RANGE_REPORT_BYTES, PFN_BATCH
from device.testing import DESC, F_INDIRECT, F_NEXT, F_WRITE, GuestRam, MiB, frame_pattern
from tests import reference as ref
from tests.conftest import RING_AREA, Rig

FRAME = 4096
RAM_SIZE = 16 * MiB
RAM_FRAMES = RAM_SIZE // FRAME
DATA_BYTES = RAM_SIZE - RING_AREA
DATA_FRAMES = DATA_BYTES // FRAME
#: The PC's legacy window (640 KiB-1 MiB) is never the guest's RAM: the device refuses it
#: like frames outside RAM (device.defs.PC_LEGACY_WINDOW).
RESERVED = range(0xA0, 0x100)
RAM_EXTENTS = [(0, RESERVED.start), (RESERVED.stop, RAM_FRAMES - RESERVED.stop)]
U16 = struct.Struct("<H")

HOSTILE = settings(
    max_examples=120,
    deadline=timedelta(seconds=20),  # generous: a runaway loop still fails, a slow CI does not
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_golden: bytes | None = None


def golden() -> bytes:
    """The pattern of every data frame, computed once."""
    global _golden
    if _golden is None:
        _golden = b"".join(frame_pattern(f) for f in range(DATA_FRAMES))
    return _golden


@contextlib.contextmanager
def rig_on_fresh_ram(queue_size: int = 16) -> Iterator[Rig]:
    """A Rig on a new 16 MiB memfd whose data frames hold their pattern."""
    ram = GuestRam(RAM_SIZE)
    rig = None
    try:
        ram.mapping[:DATA_BYTES] = golden()
        ram.mapping[DATA_BYTES:] = bytes(RING_AREA)  # allocate every page: writes free nothing
        rig = Rig(ram, queue_size=queue_size)
        yield rig
    finally:
        # Give the pages back now: a failing example's traceback keeps the mapping alive,
        # and Hypothesis replays hundreds of examples while it shrinks.
        with contextlib.suppress(ValueError, OSError):
            ram.mapping.madvise(mmap.MADV_REMOVE)
        if rig is not None:
            rig.dev.set_memory(None)  # the queues drop their views of the mapping
            close = getattr(rig, "close", None)
            if close is not None:
                close()
        ram.close()


@contextlib.contextmanager
def watchdog(seconds: int = 60) -> Iterator[None]:
    """Turn a kick that never returns into a failure instead of a hung run."""

    def fire(signum: int, frame: object) -> None:
        raise TimeoutError(f"queue_notify still running after {seconds}s: unbounded loop")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def kick(rig: Rig, name: str, times: int = 1) -> None:
    with watchdog():
        for _ in range(times):
            rig.kick(name)


def changed_data_frames(ram: GuestRam) -> set[int]:
    """Data frames whose contents are no longer their pattern."""
    if ram.mapping[:DATA_BYTES] == golden():
        return set()
    return {f for f in range(DATA_FRAMES) if not ram.frame_intact(f)}


def assert_only(ram: GuestRam, allowed: set[int], before: int) -> None:
    """Only ``allowed`` frames changed; the memfd shrank by no more than them."""
    freed = before - ram.allocated()  # first: reading a punched shmem page allocates it again
    stray = sorted(changed_data_frames(ram) - allowed)
    assert not stray, f"data frames changed that nothing valid named: {stray[:20]}"
    in_ram = {f for f in allowed if is_ram(f)}
    assert freed <= FRAME * len(in_ram), f"{freed} bytes freed, only {len(in_ram)} frames named"


def whole_frames(gpa: int, length: int) -> range:
    """Frames wholly inside [gpa, gpa + length)."""
    return range(-(-gpa // FRAME), (gpa + length) // FRAME)


def touched_frames(gpa: int, length: int) -> range:
    """Frames holding any byte of [gpa, gpa + length)."""
    return range(gpa // FRAME, (gpa + length + FRAME - 1) // FRAME) if length else range(0)


def is_ram(frame: int) -> bool:
    """Whether the device may discard ``frame``: in guest RAM, not in the legacy window."""
    return 0 <= frame < RAM_FRAMES and frame not in RESERVED


def refused_pieces(extents: list[tuple[int, int]]) -> int:
    """Maximal pieces of these frame runs outside the guest's RAM: the device refuses each."""
    return sum(ref.split_by_ram(e, RAM_EXTENTS)[1] for e in extents)


def report_frames(entries: list[tuple[int, int]]) -> tuple[set[int], int]:
    """The frames a free-page report's entries name whole, and its refused pieces."""
    named = set().union(*(whole_frames(g, n) for g, n in entries))
    return named, refused_pieces(ref.compact_pfns(sorted(named)))


def refused_runs(pfns: list[int]) -> int:
    """Refused pieces of a compacted PFN batch."""
    return refused_pieces(ref.compact_pfns(pfns))


# =========================================================================================
# Well-formed chains, hostile payloads: every frame predicted
# =========================================================================================

pfn_in_data = st.integers(0, DATA_FRAMES - 1)
pfn_outside = st.one_of(
    st.integers(RAM_FRAMES, RAM_FRAMES + 64),
    st.integers(2**32 - 64, 2**32 - 1),
    st.integers(RAM_FRAMES, 2**32 - 1),
)
pfn_runs = st.tuples(pfn_in_data, st.integers(1, 40)).map(
    lambda t: [min(t[0] + k, DATA_FRAMES - 1) for k in range(t[1])]
)
pfn_lists = st.lists(
    st.one_of(pfn_in_data.map(lambda p: [p]), pfn_outside.map(lambda p: [p]), pfn_runs),
    max_size=30,
).map(lambda parts: [p for part in parts for p in part])


@st.composite
def pfn_buffers(draw: st.DrawFn) -> tuple[str, list[int], int, int, bool]:
    """(queue, PFNs, descriptors to split into, trailing junk bytes, indirect)."""
    return (
        draw(st.sampled_from(["inflate", "inflate", "deflate"])),
        draw(pfn_lists),
        draw(st.integers(1, 3)),
        draw(st.integers(0, 3)),
        draw(st.booleans()),
    )


def split(data: bytes, parts: int) -> list[bytes]:
    """``data`` cut into ``parts`` non-empty pieces at arbitrary (not 4-aligned) points."""
    if len(data) < parts:
        return [data]  # an empty PFN array is one empty buffer
    step = -(-len(data) // parts)
    return [data[i : i + step] for i in range(0, len(data), step)]


@HOSTILE
@given(buffers=st.lists(pfn_buffers(), min_size=1, max_size=6))
def test_pfn_arrays(buffers: list[tuple[str, list[int], int, int, bool]]) -> None:
    """PFNs beyond RAM, near 2^32, repeated, unsorted, split oddly: exactly the named frames go."""
    with rig_on_fresh_ram() as rig:
        ram, m = rig.ram, rig.dev.metrics
        before = ram.allocated()
        ballooned: set[int] = set()
        discarded: set[int] = set()
        inflated = deflated = refused = refused_frames = 0
        for queue, pfns, parts, junk, indirect in buffers:
            data = struct.pack(f"<{len(pfns)}I", *pfns) + b"\x77" * junk
            ring = rig.rings[queue]
            head = ring.add([ring.buffer(p) for p in split(data, parts)], indirect=indirect)
            kick(rig, queue)
            assert ring.get_used() == [(head, 0)]
            in_ram = {p for p in pfns if is_ram(p)}
            refused += refused_runs(pfns)
            refused_frames += len({p for p in pfns if not is_ram(p)})
            if queue == "inflate":
                inflated += len(in_ram - ballooned)
                ballooned |= in_ram
                discarded |= in_ram
            else:
                deflated += len(in_ram & ballooned)
                ballooned -= in_ram
        freed = before - ram.allocated()  # before reading: a read refills a hole
        for f in range(DATA_FRAMES):
            if f in discarded:
                assert ram.frame_zero(f), f"frame {f} was named by an inflate but not discarded"
            else:
                assert ram.frame_intact(f), f"frame {f} changed but no inflate named it"
        assert freed == FRAME * len(discarded)
        assert (m.inflated_frames, m.deflated_frames) == (inflated, deflated)
        assert (m.refused_ranges, m.refused_frames) == (refused, refused_frames)
        assert m.bad_chains == 0
        assert rig.dev.tracked_frames == len(ballooned)
        for f in list(ballooned)[:50]:
            assert rig.dev.is_ballooned(f * FRAME)


report_entry = st.one_of(
    # inside the data frames, any alignment
    st.tuples(
        st.integers(0, DATA_BYTES - 1),
        st.one_of(st.integers(0, 3 * FRAME), st.sampled_from([FRAME, 2 * FRAME, 64 * FRAME])),
    ).map(lambda t: (t[0], min(t[1], DATA_BYTES - t[0]))),
    # frame-aligned blocks, as Linux reports them
    st.tuples(st.integers(0, DATA_FRAMES - 1), st.integers(1, 64)).map(
        lambda t: (t[0] * FRAME, min(t[1], DATA_FRAMES - t[0]) * FRAME)
    ),
    # outside guest RAM, crossing its end, wrapping the address space
    st.tuples(
        st.one_of(
            st.integers(RAM_SIZE - 2 * FRAME, RAM_SIZE + FRAME),
            st.integers(RAM_SIZE, 2**64 - 1),
            st.integers(2**64 - 2 * FRAME, 2**64 - 1),
        ),
        st.integers(1, 2**32 - 1),
    ),
)


def entry_in_ram(gpa: int, length: int) -> bool:
    return length == 0 or gpa + length <= RAM_SIZE


@HOSTILE
@given(
    chains=st.lists(
        st.tuples(st.lists(report_entry, min_size=1, max_size=4), st.booleans(), st.booleans()),
        min_size=1,
        max_size=5,
    )
)
def test_free_page_reports(chains: list[tuple[list[tuple[int, int]], bool, bool]]) -> None:
    """Free-page reports: unaligned entries shrink to whole frames; bad chains discard nothing."""
    with rig_on_fresh_ram() as rig:
        ram, m, ring = rig.ram, rig.dev.metrics, rig.rings["reporting"]
        before = ram.allocated()
        discarded: set[int] = set()
        bad = good = refused = 0
        for entries, readable_first, indirect in chains:
            out = [ring.buffer(b"\x11" * 8)] if readable_first else []
            head = ring.add(out, entries, indirect=indirect)
            kick(rig, "reporting")
            assert ring.get_used() == [(head, 0)]
            if all(entry_in_ram(g, n) for g, n in entries) and sum(n for _, n in entries) <= 2**32:
                good += 1
                named, pieces = report_frames(entries)
                discarded.update(f for f in named if is_ram(f))
                refused += pieces
            else:
                bad += 1
        freed = before - ram.allocated()  # before reading: a read refills a hole
        for f in range(DATA_FRAMES):
            if f in discarded:
                assert ram.frame_zero(f), f"reported frame {f} was not discarded"
            else:
                assert ram.frame_intact(f), (
                    f"frame {f} changed but no valid report covered it whole"
                )
        assert freed == FRAME * len(discarded)
        assert (m.reports, m.bad_chains, m.refused_ranges) == (good, bad, refused)


# -- range reports ------------------------------------------------------------------------


in_data_extent = pfn_in_data.flatmap(
    lambda s: st.tuples(st.just(s), st.integers(1, min(16, DATA_FRAMES - s)))
)


@st.composite
def range_report_bytes(draw: st.DrawFn, *, spare_rings: bool = True) -> bytes:
    """A range report that names data frames, frames beyond RAM, or is malformed.

    With ``spare_rings`` a report that is valid never names a frame of the ring area.
    """
    enc = draw(st.sampled_from(["pfn_len", "pfn_order", "bitmap", "junk"]))
    outside = st.one_of(
        st.integers(RAM_FRAMES, RAM_FRAMES + 8), st.integers(RAM_FRAMES, ref.PFN_LIMIT - 1)
    )
    if enc == "pfn_len":
        recs = draw(
            st.lists(
                st.one_of(
                    in_data_extent,
                    st.tuples(outside, st.integers(1, 4)),
                    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                    st.tuples(pfn_in_data, st.just(0)),
                ),
                max_size=8,
            )
        )
        buf = ref.encode_pfn_len(recs)
    elif enc == "pfn_order":
        blocks = draw(
            st.lists(
                st.one_of(
                    st.integers(0, 4).flatmap(
                        lambda o: st.tuples(
                            st.integers(0, (DATA_FRAMES >> o) - 1).map(lambda s, o=o: s << o),
                            st.just(o),
                        )
                    ),
                    st.tuples(outside, st.integers(0, 2)),
                    st.tuples(st.integers(0, 2**58 - 1), st.integers(0, 63)),
                ),
                max_size=8,
            )
        )
        buf = ref.encode_pfn_order(blocks)
    elif enc == "bitmap":
        order = draw(st.integers(0, 3))
        nbits = draw(st.integers(0, 64))
        room = DATA_FRAMES - (nbits << order)
        if draw(st.integers(0, 3)):
            base = draw(st.integers(0, room >> order)) << order
        else:  # beyond RAM, or not aligned to the order
            base = draw(st.one_of(outside, st.integers(0, room)))
        bits = draw(st.lists(st.integers(0, max(nbits - 1, 0)), max_size=nbits, unique=True))
        buf = ref.encode_bitmap(base, order, bits if nbits else [], nbits)
    else:
        buf = ref.HDR.pack(
            draw(st.sampled_from([1, 1, 0, 2])),
            draw(st.sampled_from([1, 2, 3, 0, 9])),
            draw(st.integers(0, 40)),
            draw(st.integers(0, 40)),
            0,
            draw(st.integers(0, DATA_FRAMES)),
        ) + draw(st.binary(max_size=120))
    if draw(st.integers(0, 9)) == 0:
        version, encoding, nr, order, reserved, base = ref.HDR.unpack_from(buf)
        nr = draw(st.one_of(st.just(nr + 1), st.integers(0, 2**32 - 1)))
        buf = ref.HDR.pack(version, encoding, nr, order, reserved, base) + buf[ref.HDR_SIZE :]
    if spare_rings:
        verdict = ref.check_report(buf, RAM_EXTENTS)
        assume(verdict.error or all(s + n <= DATA_FRAMES for s, n in verdict.extents))
    return buf


@st.composite
def range_chains(draw: st.DrawFn) -> tuple[str, bytes, int, int]:
    """(layout, report, split point, status length)."""
    layout = draw(
        st.sampled_from(["normal"] * 6 + ["no_status", "short_status", "no_report", "huge"])
    )
    report = draw(range_report_bytes())
    return (
        layout,
        report,
        draw(st.integers(1, max(len(report) - 1, 1))),
        draw(st.sampled_from([16, 16, 64])),
    )


@HOSTILE
@given(chains=st.lists(range_chains(), min_size=1, max_size=5))
def test_range_reports(chains: list[tuple[str, bytes, int, int]]) -> None:
    """Range reports with bad records discard nothing; good ones discard exactly their frames."""
    with rig_on_fresh_ram() as rig:
        ram, m, ring = rig.ram, rig.dev.metrics, rig.rings["range_report"]
        before = ram.allocated()
        discarded: set[int] = set()
        errors = bad_chains = 0
        for layout, report, cut, status_len in chains:
            status = ring.buffer(b"\xee" * status_len)
            if layout == "huge":
                out = [
                    ring.buffer(report),
                    (ring.alloc(MAX_RANGE_REPORT_BYTES), 1 + MAX_RANGE_REPORT_BYTES - len(report)),
                ]
            elif layout == "no_report":
                out = []
            else:
                out = (
                    [ring.buffer(report[:cut]), ring.buffer(report[cut:])]
                    if cut < len(report)
                    else [ring.buffer(report)]
                )
            inn = {"no_status": [], "short_status": [(status[0], 15)]}.get(layout, [status])
            head = ring.add(out, inn)
            kick(rig, "range_report")
            used = ring.get_used()
            if layout in ("no_status", "short_status"):
                assert used == [(head, 0)]
                errors += 1
                bad_chains += 1
                continue
            assert used == [(head, ref.STATUS_SIZE)]
            err, bad, frames = ref.STATUS.unpack(
                ram.mapping[status[0] : status[0] + ref.STATUS_SIZE]
            )
            if layout == "huge":
                want = ref.Decoded(ref.E_COUNT)
            elif layout == "no_report":
                want = ref.Decoded(ref.E_CHAIN)
            else:
                want = ref.check_report(report, RAM_EXTENTS)
            assert err == want.error, f"status {err}, the ABI says {want.error} for {report.hex()}"
            if want.error == ref.OK:
                assert (bad, frames) == (ref.NO_RECORD, want.frames)
                discarded |= ref.expand(want.extents)
            else:
                assert frames == 0
                errors += 1
                if want.error == ref.E_RECORD and want.bad_record != ref.NO_RECORD:
                    assert bad == want.bad_record
        assert discarded <= set(range(DATA_FRAMES)), "generator named frames outside the data area"
        freed = before - ram.allocated()  # before reading: a read refills a hole
        for f in range(DATA_FRAMES):
            if f in discarded:
                assert ram.frame_zero(f), f"frame {f} of a valid report was not discarded"
            else:
                assert ram.frame_intact(f), f"frame {f} changed but no valid report named it"
        assert freed == FRAME * len(discarded)
        assert (m.range_report_errors, m.bad_chains) == (errors, bad_chains)


# =========================================================================================
# Explicit hostile rings
# =========================================================================================


@dataclass
class Case:
    """One hostile ring: the queue it targets, and whether a chain is refused or the ring broken."""

    build: Callable[[Rig], None]
    outcome: str  # "bad_chain": chain `head` comes back with len 0; "broken": the queue stops
    queue: str = "inflate"
    head: int = 0
    queue_size: int = 16
    may_free: int = 0  # frames the setup itself legitimately discards


def _bait(rig: Rig, pfn: int = 5) -> tuple[int, int]:
    """A valid PFN buffer naming data frame 5: if a bad chain is acted on, frame 5 goes."""
    return rig.rings["inflate"].buffer(struct.pack("<I", pfn))


def _loop(rig: Rig) -> None:
    r = rig.rings["inflate"]
    r.raw_desc(0, *_bait(rig), F_NEXT, 1)
    r.raw_desc(1, *_bait(rig), F_NEXT, 0)
    r.raw_avail(0)


def _self_loop(rig: Rig) -> None:
    r = rig.rings["inflate"]
    r.raw_desc(3, *_bait(rig), F_NEXT, 3)
    r.raw_avail(3)


def _next_out_of_range(rig: Rig) -> None:
    r = rig.rings["inflate"]
    r.raw_desc(0, *_bait(rig), F_NEXT, r.size)
    r.raw_avail(0)


def _longer_than_queue(rig: Rig) -> None:
    """An indirect table of queue size + 1 linked descriptors."""
    r = rig.rings["inflate"]
    a, n = _bait(rig)
    table = r.alloc(16 * (r.size + 1))
    for i in range(r.size + 1):
        flags = F_NEXT if i < r.size else 0
        rig.mem.write(table + 16 * i, DESC.pack(a, n, flags, i + 1 if flags else 0))
    r.raw_desc(0, table, 16 * (r.size + 1), F_INDIRECT, 0)
    r.raw_avail(0)


def _desc(addr: int, length: int, flags: int = 0) -> Callable[[Rig], None]:
    def build(rig: Rig) -> None:
        r = rig.rings["inflate"]
        r.raw_desc(0, addr, length, flags, 0)
        r.raw_avail(0)

    return build


def _readable_after_writable(rig: Rig) -> None:
    r = rig.rings["inflate"]
    r.raw_desc(0, *_bait(rig), F_NEXT | F_WRITE, 1)
    r.raw_desc(1, *_bait(rig), 0, 0)
    r.raw_avail(0)


def _chain_over_4g(rig: Rig) -> None:
    """257 writable 16 MiB buffers (each inside RAM) on the reporting queue: 4 GiB + 16 MiB."""
    r = rig.rings["reporting"]
    for i in range(257):
        r.raw_desc(i, 0, RAM_SIZE, F_WRITE | (F_NEXT if i < 256 else 0), i + 1)
    r.raw_avail(0)


def _indirect(
    flags: int, addr_delta: int = 0, length: int = 16, nested: bool = False
) -> Callable[[Rig], None]:
    def build(rig: Rig) -> None:
        r = rig.rings["inflate"]
        a, n = _bait(rig)
        table = r.alloc(64, align=16)
        inner = r.alloc(16, align=16)
        rig.mem.write(inner, DESC.pack(a, n, 0, 0))
        rig.mem.write(
            table, DESC.pack(inner, 16, F_INDIRECT, 0) if nested else DESC.pack(a, n, 0, 0)
        )
        r.raw_desc(0, table + addr_delta, length, flags, 0)
        r.raw_avail(0)

    return build


def _head_out_of_range(rig: Rig) -> None:
    _bait(rig)
    rig.rings["inflate"].raw_avail(rig.rings["inflate"].size)


def _avail_far_ahead(rig: Rig) -> None:
    r = rig.rings["inflate"]
    r.raw_desc(0, *_bait(rig), 0, 0)
    r.set_avail_idx(r.size + 1)


def _avail_behind(rig: Rig) -> None:
    r = rig.rings["inflate"]
    r.raw_desc(0, *_bait(rig), 0, 0)
    r.set_avail_idx(0xFFFF)


def _ring_discarded_under_it(rig: Rig) -> None:
    """A valid free-page report naming the inflate ring's frames: they read as zeros after,
    so avail.idx drops back to 0 behind the device's 1 and the ring lies."""
    rep, inf = rig.rings["reporting"], rig.rings["inflate"]
    head = inf.add([_bait(rig, RAM_FRAMES + 1)])  # a PFN beyond RAM: nothing to discard
    rig.kick("inflate")
    assert inf.get_used() == [(head, 0)]
    rep.add([], [(inf.desc, inf.data - inf.desc)])
    rig.kick("reporting")
    assert len(rep.get_used()) == 1
    _bait(rig)


CASES = {
    "loop": Case(_loop, "bad_chain"),
    "self_loop": Case(_self_loop, "bad_chain", head=3),
    "next_out_of_range": Case(_next_out_of_range, "bad_chain"),
    "chain_longer_than_queue": Case(_longer_than_queue, "bad_chain"),
    "addr_near_2^64": Case(_desc(2**64 - 8, 16), "bad_chain"),
    "addr_plus_len_wraps": Case(_desc(2**64 - 4096, 8192), "bad_chain"),
    "addr_past_ram": Case(_desc(RAM_SIZE, 4), "bad_chain"),
    "len_2^32-1": Case(_desc(5 * FRAME, 2**32 - 1), "bad_chain"),
    "crosses_ram_end": Case(_desc(RAM_SIZE - 4, 8), "bad_chain"),
    "readable_after_writable": Case(_readable_after_writable, "bad_chain"),
    "chain_over_4GiB": Case(_chain_over_4g, "bad_chain", queue="reporting", queue_size=512),
    "indirect_len_0": Case(_indirect(F_INDIRECT, length=0), "bad_chain"),
    "indirect_len_not_x16": Case(_indirect(F_INDIRECT, length=24), "bad_chain"),
    "indirect_misaligned": Case(_indirect(F_INDIRECT, addr_delta=8), "bad_chain"),
    "indirect_nested": Case(_indirect(F_INDIRECT, nested=True), "bad_chain"),
    "indirect_with_next": Case(_indirect(F_INDIRECT | F_NEXT), "bad_chain"),
    "indirect_past_ram": Case(_indirect(F_INDIRECT, length=RAM_SIZE), "bad_chain"),
    "head_out_of_range": Case(_head_out_of_range, "broken"),
    "avail_far_ahead": Case(_avail_far_ahead, "broken"),
    "avail_behind": Case(_avail_behind, "broken"),
    "ring_discarded_under_it": Case(_ring_discarded_under_it, "broken", may_free=2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_ring(case: Case) -> None:
    with rig_on_fresh_ram(queue_size=case.queue_size) as rig:
        m, ring, index = rig.dev.metrics, rig.rings[case.queue], rig.index(case.queue)
        before = rig.ram.allocated()
        case.build(rig)
        with watchdog():
            for name in rig.rings:
                for _ in range(2):
                    rig.kick(name)
        freed = before - rig.ram.allocated()
        if case.outcome == "bad_chain":
            assert (m.bad_chains, m.broken_queues) == (1, 0)
            assert ring.get_used() == [(case.head, 0)], "the bad chain must come back, len 0"
            q = rig.dev.queue(index)
            assert q.next_used == q.next_avail == 1
        else:
            assert m.broken_queues == 1 and rig.dev.snapshot().broken_queues == (index,)
            assert rig.dev.read_status() & Status.DEVICE_NEEDS_RESET
            assert rig.irq.configs >= 1
            assert not rig.kick(case.queue)  # a broken queue is left alone until reset
            assert m.inflate_buffers == (1 if case.may_free else 0)
        assert freed <= FRAME * case.may_free
        assert changed_data_frames(rig.ram) == set(), "a refused chain's PFNs were acted on"


# =========================================================================================
# Random rings, checked against a reference walk and an oracle at the device's seams
# =========================================================================================


def ref_walk(
    ram: GuestRam, table: int, size: int, head: int, indirect_ok: bool
) -> tuple[list, list] | None:
    """Chain ``head`` as (readable, writable) buffer lists, or None if it breaks a rule.

    Rules (virtio 1.x split ring; see pitfalls 14-15): a chain visits at most
    ``size`` descriptors (which catches loops); ``next`` must lie inside the
    current table; one hop into an indirect table, allowed only with the feature,
    never with NEXT, never nested, with a 16-aligned table of whole descriptors
    inside RAM; every non-empty buffer inside RAM and no readable buffer after a
    writable one; at most 2^32 bytes in all. Empty buffers carry nothing and are
    skipped.
    """
    mem = ram.mapping

    def inside(addr: int, length: int) -> bool:
        return addr + length <= ram.size

    entries, i, hops, visited, total = size, head, 0, 0, 0
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    while True:
        if visited == size:
            return None
        visited += 1
        addr, length, flags, nxt = DESC.unpack(mem[table + 16 * i : table + 16 * i + 16])
        if flags & F_INDIRECT:
            if hops or not indirect_ok or flags & F_NEXT:
                return None
            if length == 0 or length % 16 or addr % 16 or not inside(addr, length):
                return None
            table, entries, i, hops = addr, length // 16, 0, 1
            continue
        if length:
            if not inside(addr, length):
                return None
            total += length
            if total > 2**32:
                return None
            if flags & F_WRITE:
                writable.append((addr, length))
            elif writable:
                return None
            else:
                readable.append((addr, length))
        if not flags & F_NEXT:
            return readable, writable
        if nxt >= entries:
            return None
        i = nxt


def read_chain(ram: GuestRam, bufs: list[tuple[int, int]], limit: int) -> bytes:
    out = bytearray()
    for a, n in bufs:
        take = min(n, limit - len(out))
        out += ram.mapping[a : a + take]
        if len(out) >= limit:
            break
    return bytes(out)


@dataclass
class Oracle:
    """Wraps the device's seams and keeps the tally the metrics must match."""

    rig: Rig
    named: set[int] = field(default_factory=set)
    bad_chains: int = 0
    range_errors: int = 0
    refused: int = 0
    broken: set[int] = field(default_factory=set)
    calls: list[tuple[str, object]] = field(default_factory=list)
    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def install(self) -> None:
        dev = self.rig.dev
        for index, q in dev._queues.items():
            q.pending = self._pending(q, index)  # type: ignore[method-assign]
            q.pop = self._pop(q, index)  # type: ignore[method-assign]
        for role, h in dev._handlers.items():
            h.handle = self._handle(role, h.handle)
        eng = dev._engine
        eng.inflate = self._record("inflate", eng.inflate)  # type: ignore[method-assign]
        eng.deflate = self._record("deflate", eng.deflate)  # type: ignore[method-assign]
        eng.discard_gpa_ranges = self._record("ranges", eng.discard_gpa_ranges)  # type: ignore[method-assign]
        eng.range_report = self._record("report", eng.range_report)  # type: ignore[method-assign]
        write = self.rig.mem.write

        def mem_write(gpa: int, data: bytes) -> None:
            self.writes.append((gpa, bytes(data)))
            self.named.update(touched_frames(gpa, len(data)))
            write(gpa, data)

        self.rig.mem.write = mem_write  # type: ignore[method-assign]

    # -- the ring -----------------------------------------------------------------------

    def _avail_idx(self, q: object) -> int:
        a = q.avail_gpa  # type: ignore[attr-defined]
        return U16.unpack(self.rig.ram.mapping[a + 2 : a + 4])[0]

    def _pending(self, q: object, index: int) -> Callable[[object], int]:
        orig = q.pending  # type: ignore[attr-defined]

        def pending(mem: object) -> int:
            n = (self._avail_idx(q) - q.next_avail) & 0xFFFF  # type: ignore[attr-defined]
            try:
                got = orig(mem)
            except RingError:
                assert n > q.size, f"queue {index}: RingError with only {n} pending"  # type: ignore[attr-defined]
                self.broken.add(index)
                raise
            assert n <= q.size and got == n, f"queue {index}: {n} pending, device says {got}"  # type: ignore[attr-defined]
            return got

        return pending

    def _pop(self, q: object, index: int) -> Callable[[object], object]:
        orig = q.pop  # type: ignore[attr-defined]
        ram = self.rig.ram

        def pop(mem: object) -> object:
            size, nxt = q.size, q.next_avail  # type: ignore[attr-defined]
            n = (self._avail_idx(q) - nxt) & 0xFFFF
            expect: tuple = ("ring",) if n > size else ("none",) if n == 0 else ()
            if not expect:
                slot = q.avail_gpa + 4 + 2 * (nxt % size)  # type: ignore[attr-defined]
                head = U16.unpack(ram.mapping[slot : slot + 2])[0]
                if head >= size:
                    expect = ("ring",)
                else:
                    chain = ref_walk(ram, q.desc_gpa, size, head, q.indirect)  # type: ignore[attr-defined]
                    expect = ("chain", head, chain)
            try:
                got = orig(mem)
            except RingError:
                assert expect == ("ring",), f"queue {index}: RingError, reference says {expect}"
                self.broken.add(index)
                raise
            except ChainError as err:
                assert expect[0] == "chain" and expect[2] is None and err.head == expect[1], (
                    f"queue {index}: ChainError({err}), reference says {expect}"
                )
                self.bad_chains += 1
                raise
            if got is None:
                assert expect == ("none",), (
                    f"queue {index}: nothing popped, reference says {expect}"
                )
            else:
                assert expect[0] == "chain" and expect[2] is not None, (
                    f"queue {index}: popped {got}, reference says {expect}"
                )
                assert (got.head, got.readable, got.writable) == (expect[1], *expect[2])
            return got

        return pop

    # -- the handlers --------------------------------------------------------------------

    def _record(self, kind: str, fn: Callable) -> Callable:
        def call(*args: object, **kw: object) -> object:
            if kind in ("inflate", "deflate"):
                ptr, count = args
                self.calls.append((kind, bytes(ffi.buffer(ptr, 4 * count))))  # type: ignore[arg-type]
            elif kind == "ranges":
                self.calls.append((kind, [tuple(r) for r in args[0]]))  # type: ignore[attr-defined]
            else:
                self.calls.append((kind, bytes(args[0])))  # type: ignore[arg-type]
            return fn(*args, **kw)

        return call

    def _handle(self, role: Queue, orig: Callable) -> Callable:
        ram = self.rig.ram

        def handle(mem: object, chain: object) -> int | None:
            readable, writable = chain.readable, chain.writable  # type: ignore[attr-defined]
            rlen = sum(n for _, n in readable)
            limit = MAX_RANGE_REPORT_BYTES if role is Queue.RANGE_REPORT else MAX_PFN_BUFFER_BYTES
            content = read_chain(ram, readable, limit)  # before the device acts on it
            self.calls = []
            self.writes = []
            expect_error = (role is Queue.FREE_PAGE and readable and rlen < 4) or (
                role is Queue.RANGE_REPORT and (not writable or writable[0][1] < ref.STATUS_SIZE)
            )
            try:
                used = orig(mem, chain)
            except GuestError as err:
                assert expect_error, f"{role.name}: unexpected GuestError {err}"
                self.bad_chains += 1
                if role is Queue.RANGE_REPORT:
                    self.range_errors += 1
                raise
            assert not expect_error, f"{role.name}: chain {chain} should have been refused"
            self._check(role, chain, content, rlen, used)
            return used

        return handle

    def _check(
        self, role: Queue, chain: object, content: bytes, rlen: int, used: int | None
    ) -> None:
        calls = self.calls
        if role in (Queue.INFLATE, Queue.DEFLATE):
            assert used == 0
            kind = role.name.lower()
            assert all(k == kind for k, _ in calls), calls
            fed = b"".join(b for _, b in calls)
            assert fed == content[: len(content) // 4 * 4], (
                "PFNs fed to C are not the chain's bytes"
            )
            for _, batch in calls:
                pfns = ref.pfns_from_le32(batch)  # type: ignore[arg-type]
                assert len(pfns) <= PFN_BATCH
                self.refused += refused_runs(pfns)
                if role is Queue.INFLATE:
                    self.named.update(p for p in pfns if is_ram(p))
        elif role is Queue.REPORTING:
            assert used == 0
            writable = chain.writable  # type: ignore[attr-defined]
            fed = [b for _, b in calls]
            if writable:
                assert fed == [writable], f"discarded {fed}, the chain's free blocks are {writable}"
            else:
                assert fed in ([], [[]]), f"discarded {fed} for a report without free blocks"
            named, pieces = report_frames(writable)
            self.named.update(named)
            self.refused += pieces
        elif role is Queue.RANGE_REPORT:
            assert used == ref.STATUS_SIZE
            status_gpa = chain.writable[0][0]  # type: ignore[attr-defined]
            assert [g for g, _ in self.writes] == [status_gpa], self.writes
            err, _bad, frames = ref.STATUS.unpack(self.writes[-1][1])
            if rlen > MAX_RANGE_REPORT_BYTES:
                assert calls == [] and err == ref.E_COUNT
            elif rlen == 0:
                assert calls == [] and err == ref.E_CHAIN
            else:
                assert calls == [("report", content)], "report bytes fed to C differ"
                verdict = ref.check_report(content, RAM_EXTENTS)
                assert err == verdict.error, f"status {err}, ABI says {verdict.error}"
                if err == ref.OK:
                    assert frames <= verdict.frames
                    for s, n in verdict.extents:
                        self.named.update(range(s, s + n))
            if err != ref.OK:
                assert frames == 0
                self.range_errors += 1
        else:
            assert calls == [], f"{role.name} must not discard: {calls}"
            assert used == (None if role is Queue.STATS else 0)


# -- random programs -------------------------------------------------------------------------

PFN_ARRAY_BAIT = st.one_of(
    st.lists(st.one_of(pfn_in_data, pfn_outside), max_size=64),
    st.lists(st.one_of(pfn_in_data, pfn_outside), max_size=64),
    # frames of the ring area: legal, and it wrecks the rings
    st.lists(st.integers(DATA_FRAMES, RAM_FRAMES - 1), max_size=4),
).map(lambda ps: struct.pack(f"<{len(ps)}I", *ps))

BAITS = {
    "inflate": PFN_ARRAY_BAIT,
    "deflate": PFN_ARRAY_BAIT,
    "stats": st.binary(max_size=64),
    "free_page": st.one_of(
        st.sampled_from([0, 1, 0x80000000]).map(lambda v: struct.pack("<I", v)),
        st.binary(max_size=6),
    ),
    "reporting": st.binary(max_size=32),
    "range_report": st.one_of(range_report_bytes(spare_rings=False), st.just(bytes(16))),
}
FLAGS = st.one_of(
    st.sampled_from(
        [
            0,
            F_NEXT,
            F_WRITE,
            F_NEXT | F_WRITE,
            F_INDIRECT,
            F_INDIRECT | F_NEXT,
            F_INDIRECT | F_WRITE,
        ]
    ),
    st.integers(0, 0xFFFF),
)
FAR = [RAM_SIZE - 16, RAM_SIZE - 1, RAM_SIZE, RAM_SIZE + FRAME, 2**32, 2**63, 2**64 - 16, 2**64 - 1]
HUGE_LEN = [2**31, 2**32 - 16, 2**32 - 1, RAM_SIZE, RAM_SIZE + 1]


def desc_strategy(rig: Rig, name: str, targets: list[tuple[int, int]]) -> st.SearchStrategy:
    """One hostile descriptor: (addr, len, flags, next)."""
    size = rig.rings[name].size
    rings = [a for r in rig.rings.values() for a in (r.desc, r.avail, r.used, r.data)]
    any_len = st.integers(0, 64 * FRAME) | st.integers(0, RAM_SIZE)
    target = st.sampled_from(targets) if targets else st.nothing()
    addr_len = st.one_of(
        target,
        target.flatmap(lambda t: st.tuples(st.just(t[0] + 8), st.just(t[1]))),
        st.tuples(st.sampled_from(rings), st.sampled_from([16, 64, 4 * FRAME]) | any_len),
        st.tuples(st.integers(0, DATA_BYTES - 1), st.sampled_from([4, 16, FRAME]) | any_len),
        st.tuples(
            st.sampled_from(FAR) | st.integers(0, 2**64 - 1), st.sampled_from([1, 16, *HUGE_LEN])
        ),
        st.tuples(st.integers(0, RAM_SIZE - 1), st.sampled_from([0, *HUGE_LEN])),
    )
    nxt = st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))
    return st.tuples(addr_len, FLAGS, nxt).map(lambda t: (t[0][0], t[0][1], t[1], t[2]))


#: (readable buffers, writable buffers) of a well-formed chain on each queue, as Linux posts them
SHAPES = {
    "inflate": ((1, 2), (0, 0)),
    "deflate": ((1, 2), (0, 0)),
    "stats": ((1, 1), (0, 0)),
    "free_page": ((0, 1), (0, 2)),
    "reporting": ((0, 1), (1, 3)),
    "range_report": ((1, 1), (1, 1)),
}


def program_queue(data: st.DataObject, rig: Rig, name: str) -> None:
    """Draw and write one queue's hostile state: payloads, tables, descriptors, avail ring."""
    ring, mem = rig.rings[name], rig.mem
    size = ring.size
    pos = ring.data

    def place(blob: bytes, misalign: int = 0) -> int:
        nonlocal pos
        pos = ((pos + 15) & ~15) + misalign
        assert pos + len(blob) <= ring.data_end
        if blob:
            mem.write(pos, blob)
        at, pos = pos, pos + len(blob)
        return at

    baits = [
        (place(blob, data.draw(st.sampled_from([0, 0, 0, 1, 8]))), len(blob))
        for blob in data.draw(st.lists(BAITS[name], max_size=4), label=f"{name} payloads")
    ]
    writes = [  # status / hint buffers in the ring area, free blocks in the data frames
        (place(bytes(16)), data.draw(st.sampled_from([16, 16, 16, 8])))
        for _ in range(data.draw(st.integers(0, 2)))
    ] + data.draw(
        st.lists(
            st.tuples(st.integers(0, DATA_BYTES - 1), st.integers(0, 64 * FRAME)).map(
                lambda t: (t[0], min(t[1], DATA_BYTES - t[0]))
            ),
            max_size=3 if name in ("reporting", "free_page") else 0,
        ),
        label=f"{name} free blocks",
    )

    descs = desc_strategy(rig, name, baits + writes)
    tables = []  # indirect tables full of hostile descriptors
    for _ in range(data.draw(st.integers(0, 2))):
        entries = data.draw(st.lists(descs, max_size=size + 2), label=f"{name} indirect")
        at = place(b"".join(DESC.pack(*e) for e in entries), data.draw(st.sampled_from([0, 0, 8])))
        tables.append((at, 16 * len(entries)))
    descs = desc_strategy(rig, name, baits + writes + tables)

    # well-formed chains first (heads published), then raw overwrites on top
    (rmin, rmax), (wmin, wmax) = SHAPES[name]
    free = list(range(size))
    heads: list[int] = []
    written: dict[int, tuple[int, int, int, int]] = {}
    for _ in range(data.draw(st.integers(0, 3) | st.just(2))):
        r_bufs = (
            data.draw(st.lists(st.sampled_from(baits), min_size=rmin, max_size=rmax))
            if baits
            else []
        )
        w_bufs = (
            data.draw(st.lists(st.sampled_from(writes), min_size=wmin, max_size=wmax))
            if writes
            else []
        )
        bufs = [(a, n, 0) for a, n in r_bufs] + [(a, n, F_WRITE) for a, n in w_bufs]
        if not bufs or len(bufs) > len(free):
            continue
        if data.draw(st.booleans()):
            table = place(
                b"".join(
                    DESC.pack(a, n, f | (F_NEXT if k + 1 < len(bufs) else 0), k + 1)
                    for k, (a, n, f) in enumerate(bufs)
                )
            )
            head = free.pop(0)
            ring.raw_desc(head, table, 16 * len(bufs), F_INDIRECT, 0)
        else:
            ids = [free.pop(0) for _ in bufs]
            for k, (i, (a, n, f)) in enumerate(zip(ids, bufs, strict=True)):
                last = k + 1 == len(ids)
                written[i] = (a, n, f | (0 if last else F_NEXT), 0 if last else ids[k + 1])
                ring.raw_desc(i, *written[i])
            head = ids[0]
        heads.append(head)
    # near misses: one field of a good descriptor changed
    for i, what, bit, delta in data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(written)) if written else st.nothing(),
                st.sampled_from(["flags", "len", "next", "addr"]),
                st.sampled_from([F_NEXT, F_WRITE, F_INDIRECT]),
                st.sampled_from([-1, 1, -16, 16, FRAME, 2**32 - 1, RAM_SIZE]),
            ),
            max_size=2 if written else 0,
        ),
        label=f"{name} near misses",
    ):
        a, n, f, nx = written[i]
        if what == "flags":
            f ^= bit
        elif what == "len":
            n = (n + delta) % 2**32
        elif what == "next":
            nx = (nx + delta) % 2**16
        else:
            a = (a + delta) % 2**64
        ring.raw_desc(i, a, n, f, nx)
    # raw descriptors: in the unused slots (the random chains), sometimes over the good ones
    clobber = data.draw(st.integers(0, 2), label=f"{name} clobber") == 0
    slots = st.integers(0, size - 1) if clobber or not free else st.sampled_from(free)
    for i, d in data.draw(st.lists(st.tuples(slots, descs), max_size=size), label=f"{name} descs"):
        ring.raw_desc(i, *d)
    # A ring that lies (head out of range, more heads than slots, any avail.idx) only
    # sometimes: it stops the queue, and a stopped queue tests nothing else.
    lies = data.draw(st.integers(0, 5), label=f"{name} ring lies") == 0
    head = (
        st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF))
        if lies
        else st.integers(0, size - 1)
    )
    heads += data.draw(
        st.lists(head, max_size=max(size - len(heads), 0) + (size if lies else 0)),
        label=f"{name} heads",
    )
    for h in heads:
        ring.raw_avail(h)
    if lies and data.draw(st.booleans()):
        ring.set_avail_idx(data.draw(st.integers(0, 0xFFFF), label=f"{name} avail.idx"))


@settings(HOSTILE, max_examples=150)
@given(queue_size=st.sampled_from([1, 4, 8, 16]), data=st.data())
def test_random_rings(queue_size: int, data: st.DataObject) -> None:
    """Random descriptor tables, avail rings, indirect tables and payloads on every queue."""
    with rig_on_fresh_ram(queue_size) as rig:
        dev, m, ram = rig.dev, rig.dev.metrics, rig.ram
        names = list(rig.rings)
        every = st.just(set(names))
        for name in data.draw(every | st.sets(st.sampled_from(names), min_size=1), label="queues"):
            program_queue(data, rig, name)
        before = ram.allocated()
        oracle = Oracle(rig)
        oracle.install()
        order = data.draw(st.lists(st.sampled_from(names), max_size=8), label="kicks") + names
        with watchdog():
            for name in order:
                rig.kick(name)
            if data.draw(st.booleans(), label="second wave"):
                for name in data.draw(st.sets(st.sampled_from(names)), label="reprogram"):
                    program_queue(data, rig, name)
                for name in names:
                    rig.kick(name)

        for what, n in (
            ("bad chains", m.bad_chains),
            ("broken queues", m.broken_queues),
            ("inflates", m.inflate_buffers),
            ("reports", m.reports),
            ("range reports", m.range_reports - m.range_report_errors),
            ("discards", m.discard_syscalls),
        ):
            event(f"{what}: {'none' if n == 0 else 'some'}")
        assert m.bad_chains == oracle.bad_chains
        assert set(dev.snapshot().broken_queues) == oracle.broken
        assert m.broken_queues == len(oracle.broken)
        if oracle.broken:
            assert dev.read_status() & Status.DEVICE_NEEDS_RESET
        assert m.range_report_errors == oracle.range_errors
        assert m.refused_ranges == oracle.refused
        held = dev._stats.held
        for index, q in dev._queues.items():
            outstanding = (q.next_avail - q.next_used) & 0xFFFF
            if dev.layout.queue_at(index) is Queue.STATS and held is not None:
                assert outstanding == 1, f"stats queue holds {outstanding} buffers, one at most"
            else:
                assert outstanding == 0, f"queue {index} dropped {outstanding} consumed buffer(s)"
        assert_only(ram, oracle.named, before)


# =========================================================================================
# Bugs this file found (fixed in e4b35d0; kept as regression tests), and one still open
# =========================================================================================


def test_second_stats_buffer_is_not_dropped() -> None:
    """A driver that sends a second stats buffer gets the first one back (QEMU does too)."""
    with rig_on_fresh_ram() as rig:
        ring = rig.rings["stats"]
        h1 = ring.add([ring.buffer(struct.pack("<HQ", 4, 1 << 20))])
        h2 = ring.add([ring.buffer(struct.pack("<HQ", 4, 2 << 20))])
        kick(rig, "stats")
        assert ring.get_used() == [(h1, 0)]
        assert rig.dev.stats.values["stat-free-memory"] == 2 << 20
        assert rig.dev.request_stats()
        assert ring.get_used() == [(h2, 0)]
        q = rig.dev.queue(rig.index("stats"))
        assert q.next_avail == q.next_used == 2


def test_stop_with_held_stats_after_a_bad_chain() -> None:
    """vhost-user GET_VRING_BASE then restart, with a bad chain after the held stats buffer."""
    with rig_on_fresh_ram() as rig:
        ring, index = rig.rings["stats"], rig.index("stats")
        held = ring.add([ring.buffer(struct.pack("<HQ", 4, 1 << 20))])
        ring.raw_desc(7, ring.data, 10, F_NEXT, ring.size)  # next out of range: refused
        ring.raw_avail(7)
        kick(rig, "stats")
        assert ring.get_used() == [(7, 0)]
        base = rig.dev.stop_queue(index)
        q = ring.device_queue(next_avail=base)
        q.resume_used_from_ring(rig.mem)
        rig.dev.start_queue(index, q)
        kick(rig, "stats")
        rig.dev.request_stats()
        returned = [h for h, _ in ring.get_used()]
        assert 7 not in returned, "the refused chain came back a second time"
        assert held in returned, "the held stats buffer was never returned"


def _long_pfn_chain(rig: Rig) -> int:
    """An inflate chain of four readable 2 MiB buffers covering all data frames."""
    ring = rig.rings["inflate"]
    quarter = DATA_BYTES // 4
    return ring.add([(i * quarter, quarter) for i in range(4)])


def test_long_chain_reads_only_the_limit() -> None:
    """Only the first MAX_PFN_BUFFER_BYTES of a long inflate chain count as PFNs."""
    with rig_on_fresh_ram() as rig:
        head = _long_pfn_chain(rig)
        kick(rig, "inflate")
        assert rig.rings["inflate"].get_used() == [(head, 0)]
        # frame f's pattern, read as le32 PFNs: f, 0, f ^ 0x5a5a5a5a, 0x5a5a5a5a
        named = {f for f in range(MAX_PFN_BUFFER_BYTES // FRAME) if is_ram(f)} | {0}
        assert changed_data_frames(rig.ram) == named
        assert all(rig.ram.frame_zero(f) for f in named)


def test_long_chain_copies_only_what_it_reads() -> None:
    """An 8 MiB inflate chain is not copied whole to use its first MiB."""
    with rig_on_fresh_ram() as rig:
        copied = 0
        read = rig.mem.read

        def counting_read(gpa: int, length: int) -> bytes:
            nonlocal copied
            copied += length
            return read(gpa, length)

        rig.mem.read = counting_read  # type: ignore[method-assign]
        _long_pfn_chain(rig)
        kick(rig, "inflate")
        assert copied <= MAX_PFN_BUFFER_BYTES, f"copied {copied} bytes of guest memory to use 1 MiB"
