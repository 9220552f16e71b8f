"""Stateful fuzzing of the vhost-user backend: a frontend and a guest doing anything in any
order, against an oracle of which guest frames may change.

The real daemon serves a real socket with real fds (memory tables, eventfds, the backend
channel). The guest's data sits on 2 MiB hugetlbfs pages (where one stale "ballooned" bit
completes a page and punches live data) and on 4 KiB memfd pages that hold the PC's
legacy window. Rules interleave inflates (halves of huge pages, the window, PFNs beyond
RAM), deflates and the reuse of deflated pages, free page reports and the reuse of
reported pages, pauses in QEMU 11.1's message order (with and without SET_STATUS(0)),
guest reboots, and a frontend that dies or sends garbage and is replaced by a new VM.

After every step: no byte of any frame outside those the guest has in its balloon or has
reported (and not written since) differs from what the guest wrote. At the end: the
process serves a new frontend end to end, and every fd it took was given back.

``VBALLOON_FUZZ_EXAMPLES`` (default 12) and ``VBALLOON_FUZZ_STEPS`` (default 30) set the
budget; ``make test`` runs the default, a longer hunt sets them higher.
"""

from __future__ import annotations

import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from device import Feature, Queue
from device.defs import PC_LEGACY_WINDOW
from device.testing import FRAME_SIZE, GuestRam, MiB, frame_pattern
from tests.conftest import is_root
from tests.protocol.vhost_rig import BackendThread, Guest
from vballoon.waiting import wait_until
from vhost_user.messages import FrontendReq

EXAMPLES = int(os.environ.get("VBALLOON_FUZZ_EXAMPLES", "12"))
STEPS = int(os.environ.get("VBALLOON_FUZZ_STEPS", "30"))

#: memfd RAM at gpa 0: data frames below, rings in the top 8 MiB (see vhost_rig).
LOW_FRAMES = (16 * MiB - 8 * MiB) // FRAME_SIZE
WINDOW = range(PC_LEGACY_WINDOW[0] // FRAME_SIZE, sum(PC_LEGACY_WINDOW) // FRAME_SIZE)
HUGE_GPA = 1 << 30
HUGE_PAGES = 4
HUGE = 2 * MiB // FRAME_SIZE
HUGE_FIRST = HUGE_GPA // FRAME_SIZE
HUGE_FRAMES = range(HUGE_FIRST, HUGE_FIRST + HUGE_PAGES * HUGE)

#: Every half of every huge page, as frame sets.
HALVES = [
    frozenset(
        range(HUGE_FIRST + p * HUGE + h * HUGE // 2, HUGE_FIRST + p * HUGE + (h + 1) * HUGE // 2)
    )
    for p in range(HUGE_PAGES)
    for h in (0, 1)
]
half_page = st.tuples(st.integers(0, HUGE_PAGES - 1), st.integers(0, 1)).map(
    lambda t: list(
        range(
            HUGE_FIRST + t[0] * HUGE + t[1] * HUGE // 2,
            HUGE_FIRST + t[0] * HUGE + (t[1] + 1) * HUGE // 2,
        )
    )
)
some_frames = st.lists(
    st.one_of(
        st.sampled_from(HUGE_FRAMES),
        st.integers(0, LOW_FRAMES - 1),
        st.sampled_from(WINDOW),
        st.integers(2**31, 2**32 - 1),  # beyond RAM
    ),
    min_size=1,
    max_size=64,
)
pfn_buffer = st.one_of(half_page, some_frames)
report_blocks = st.lists(
    st.one_of(
        st.integers(0, HUGE_PAGES - 1).map(lambda p: (HUGE_GPA + p * 2 * MiB, 2 * MiB)),
        st.tuples(st.integers(0, LOW_FRAMES - 8), st.integers(1, 8)).map(
            lambda t: (t[0] * FRAME_SIZE, t[1] * FRAME_SIZE)
        ),
    ),
    min_size=1,
    max_size=8,
)


class BackendStateMachine(RuleBasedStateMachine):
    """One ``vballoon`` process, the VMs that come and go on it, and their guests."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory(prefix="vbfuzz-")
        self.path = os.path.join(self.dir.name, "v.sock")
        self.low = GuestRam(16 * MiB)
        self.huge = GuestRam(HUGE_PAGES * 2 * MiB, gpa=HUGE_GPA, hugetlb=is_root())
        self.low.fill_pattern(0, LOW_FRAMES)
        self.huge.fill_pattern()
        self.backend = BackendThread(self.path)
        self.fds_before = len(os.listdir("/proc/self/fd"))
        self.guest: Guest | None = None
        #: what the guest gave and has not taken back, and what it reported and not reused
        self.balloon: set[int] = set()
        self.reported: set[int] = set()
        self.touched: set[int] = set()  # huge pages the guest gave frames of
        self.must_tell_host = True

    @initialize(must_tell_host=st.booleans())
    def first_vm(self, must_tell_host: bool) -> None:
        """Without MUST_TELL_HOST a driver may reuse a page once its deflate is queued."""
        self.must_tell_host = must_tell_host
        self.boot()

    # -- the guest's side ------------------------------------------------------------

    def boot(self) -> None:
        """A new VM connects (QEMU's realize and start sequence, fresh rings)."""
        self.guest = Guest(self.path, self.low, extra=(self.huge,))
        if not self.must_tell_host:
            self.guest.features &= ~Feature.MUST_TELL_HOST
        self.guest.start()

    def post_and_wait(self, q: Queue, pfns: list[int]) -> None:
        """One PFN buffer, kicked; wait until the device returned it (buffers queued
        earlier without waiting may come back meanwhile)."""
        assert self.guest is not None
        ring = self.guest.rings[q]
        head = ring.add([ring.buffer(struct.pack(f"<{len(pfns)}I", *pfns))])
        self.guest.notify(q)
        seen: list[int] = []
        wait_until(
            lambda: seen.extend(h for h, _ in ring.get_used()) or head in seen,
            5,
            f"the device to return the {q.name.lower()} buffer",
        )

    def rewrite(self, frames: set[int]) -> None:
        """The guest uses these frames again: its data goes back into them."""
        for f in frames:
            ram = self.huge if f in HUGE_FRAMES else self.low
            ram.fill_pattern(f - ram.gpa // FRAME_SIZE, 1)

    def everything_live(self) -> None:
        """A new boot, or a new VM: every frame is live data again."""
        self.rewrite(self.balloon | self.reported)
        self.balloon.clear()
        self.reported.clear()

    @staticmethod
    def is_ram(f: int) -> bool:
        return f in HUGE_FRAMES or (0 <= f < LOW_FRAMES and f not in WINDOW)

    # -- rules ------------------------------------------------------------------------

    @precondition(lambda self: self.guest is not None)
    @rule(pfns=pfn_buffer)
    def inflate(self, pfns: list[int]) -> None:
        self.post_and_wait(Queue.INFLATE, pfns)
        self.balloon |= {f for f in pfns if self.is_ram(f)}
        self.touched |= {(f - HUGE_FIRST) // HUGE for f in pfns if f in HUGE_FRAMES}

    @precondition(lambda self: self.guest is not None and self.touched)
    @rule(data=st.data())
    def inflate_a_half_of_a_touched_page(self, data: st.DataObject) -> None:
        """Halves of pages the guest gave before (and maybe took back): what a stale
        record would complete."""
        page = data.draw(st.sampled_from(sorted(self.touched)))
        half = data.draw(st.sampled_from([0, 1]))
        self.inflate(sorted(HALVES[2 * page + half]))

    @precondition(lambda self: self.guest is not None and self.balloon)
    @rule(data=st.data())
    def deflate_and_reuse(self, data: st.DataObject) -> None:
        assert self.guest is not None
        pool = sorted(self.balloon)
        pfns = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=256))
        self.post_and_wait(Queue.DEFLATE, pfns)  # as MUST_TELL_HOST has it
        self.balloon -= set(pfns)
        self.rewrite(set(pfns))

    @precondition(lambda self: self.guest is not None and self.balloon and not self.must_tell_host)
    @rule(data=st.data())
    def deflate_queued_then_reuse_at_once(self, data: st.DataObject) -> None:
        """Without MUST_TELL_HOST: queue the deflate, kick, and write the pages at once;
        the device may serve the next inflate before this deflate."""
        assert self.guest is not None
        halves = [h for h in HALVES if h <= self.balloon]
        if halves and data.draw(st.booleans()):
            # A whole ballooned half: the next inflate of the other half is the hazard.
            pfns = sorted(data.draw(st.sampled_from(halves)))
        else:
            pfns = data.draw(
                st.lists(st.sampled_from(sorted(self.balloon)), min_size=1, max_size=256)
            )
        ring = self.guest.rings[Queue.DEFLATE]
        ring.add([ring.buffer(struct.pack(f"<{len(pfns)}I", *pfns))])
        if data.draw(st.booleans()):
            self.guest.notify(Queue.DEFLATE)
        self.balloon -= set(pfns)
        self.rewrite(set(pfns))

    @precondition(lambda self: self.guest is not None)
    @rule(blocks=report_blocks)
    def report(self, blocks: list[tuple[int, int]]) -> None:
        assert self.guest is not None
        used = self.guest.post(Queue.REPORTING, [], blocks)
        assert len(used) == 1
        for gpa, n in blocks:
            first = gpa // FRAME_SIZE
            self.reported |= {f for f in range(first, first + n // FRAME_SIZE) if self.is_ram(f)}

    @precondition(lambda self: self.reported)
    @rule()
    def reuse_reported(self) -> None:
        self.rewrite(self.reported)
        self.reported.clear()

    @precondition(lambda self: self.guest is not None)
    @rule(status_zero=st.booleans())
    def pause_and_resume(self, status_zero: bool) -> None:
        assert self.guest is not None
        bases = self.guest.pause(status_zero)
        self.guest.resume(bases)

    @precondition(lambda self: self.guest is not None)
    @rule()
    def guest_reboots(self) -> None:
        """``system_reset``: stopped as for a pause; the new boot's driver sets up new rings
        and uses all of its memory."""
        assert self.guest is not None
        self.guest.pause()
        self.everything_live()
        self.guest.start()

    @precondition(lambda self: self.guest is not None)
    @rule(how=st.sampled_from(["killed", "garbage", "half a header"]))
    def frontend_dies(self, how: str) -> None:
        """QEMU dies (or breaks the protocol and is dropped); a new VM takes over."""
        assert self.guest is not None
        drops = self.backend.events.count("disconnected")
        sock = self.guest.fe.conn.sock
        if how == "garbage":
            sock.sendall(struct.pack("<III", 999, 1, 0))
        elif how == "half a header":
            sock.sendall(struct.pack("<I", FrontendReq.GET_FEATURES))
        self.guest.close()
        self.guest = None
        wait_until(
            lambda: self.backend.events.count("disconnected") > drops, 10, "the backend's drop"
        )
        self.everything_live()
        self.boot()

    # -- the oracle -------------------------------------------------------------------

    @invariant()
    def no_live_byte_changed(self) -> None:
        allowed = self.balloon | self.reported
        for ram, frames in ((self.low, range(LOW_FRAMES)), (self.huge, HUGE_FRAMES)):
            base = ram.gpa // FRAME_SIZE
            size = len(frames) * FRAME_SIZE
            golden = b"".join(frame_pattern(f) for f in frames)
            if ram.mapping[:size] == golden:
                continue
            changed = {f for f in frames if not ram.frame_intact(f)}
            stray = sorted(changed - allowed)
            assert not stray, f"live guest frames changed: {stray[:16]} (base {base:#x})"

    def teardown(self) -> None:
        try:
            if self.guest is not None:
                self.guest.close()
                self.guest = None
            # The process serves the next VM end to end.
            g = Guest(self.path, self.low, extra=(self.huge,))
            g.start()
            g.inflate(Queue.INFLATE, [HUGE_FIRST + 3 * HUGE + 7])
            g.close()
            wait_until(lambda: self.backend.events[-1] == "disconnected", 10, "the last disconnect")
            self.backend.call(lambda: None)
            assert len(os.listdir("/proc/self/fd")) == self.fds_before, "fds leaked"
        finally:
            self.backend.stop()
            self.low.close()
            self.huge.close()
            self.dir.cleanup()


@pytest.fixture
def hugepage_pool(request: pytest.FixtureRequest) -> None:
    if is_root():
        request.getfixturevalue("hugepages")


def test_backend_state_machine(hugepage_pool: None) -> None:
    BackendStateMachine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    BackendStateMachine.TestCase().runTest()
