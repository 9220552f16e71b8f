"""Per-device counters: one field per event, incremented where the event happens.

Tests assert deltas of these; ``query-vballoon`` reports them as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class BalloonMetrics:
    """Counters of one balloon device since it was created (never reset by the guest)."""

    kicks: int = 0
    """Queue notifications handled."""
    interrupts: int = 0
    """Used-buffer interrupts sent to the guest."""
    config_interrupts: int = 0
    """Configuration-change interrupts sent to the guest."""
    inflate_buffers: int = 0
    """Inflate chains processed."""
    deflate_buffers: int = 0
    """Deflate chains processed."""
    inflated_frames: int = 0
    """4 KiB frames that newly entered the balloon."""
    deflated_frames: int = 0
    """4 KiB frames that left the balloon."""
    stats_updates: int = 0
    """Statistics buffers received."""
    stats_unknown_tags: int = 0
    """Statistics entries with a tag this device does not know (ignored)."""
    hint_buffers: int = 0
    """Free-page-hint buffers received (ids and hinted blocks)."""
    hinted_frames: int = 0
    """Frames hinted free under the current command id."""
    hint_stale: int = 0
    """Hinted blocks ignored because they carried no current id."""
    reports: int = 0
    """Free-page reports (standard reporting queue) processed."""
    reported_bytes: int = 0
    """Bytes named by free-page reports."""
    report_entries: int = 0
    """Entries (descriptors, 16 bytes of ring each) in free-page reports."""
    range_reports: int = 0
    """Range reports (experimental queue) processed."""
    range_report_errors: int = 0
    """Range reports rejected with an error status."""
    poison_skipped: int = 0
    """Reports not discarded because poison_val != 0 forbids zero-filling."""
    bytes_discarded: int = 0
    """Bytes covered by successful discard syscalls."""
    discard_syscalls: int = 0
    """fallocate/madvise calls issued."""
    refused_ranges: int = 0
    """Runs of frames outside guest RAM: refused, never discarded."""
    refused_frames: int = 0
    """Frames in those runs."""
    discard_errors: int = 0
    """Discard syscalls that failed."""
    discard_ns: int = 0
    """Nanoseconds spent in the C data plane (decode + syscalls)."""
    bad_chains: int = 0
    """Malformed descriptor chains returned unprocessed."""
    broken_queues: int = 0
    """Queues stopped because their ring was corrupt."""

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return asdict(self)
