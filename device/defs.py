"""Constants of the virtio balloon device, each with where it comes from.

Spec: virtio 1.3 "Traditional Memory Balloon Device" and "Split Virtqueues";
Linux include/uapi/linux/virtio_balloon.h for the stat tags beyond the spec's.
"""

from enum import IntEnum, IntFlag

#: Balloon PFNs and num_pages/actual are in 4 KiB units whatever the page size.
PFN_SHIFT = 12
FRAME_SIZE = 1 << PFN_SHIFT

#: Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX: PFNs in one inflate/deflate buffer.
LINUX_PFNS_PER_BUFFER = 256

#: PFNs handed to the accelerator per call (a longer chain is cut into batches).
PFN_BATCH = 16384

#: Bytes of one inflate/deflate buffer the device reads (Linux sends 1 KiB);
#: the rest of a longer buffer is ignored, which bounds the work per chain:
#: 32768 PFNs, so at most 32768 discard calls, the bound a range report has too
#: (VBALLOON_REPORT_MAX_RUNS).
MAX_PFN_BUFFER_BYTES = 128 * 1024

#: Largest device-readable part of a range report the device reads.
MAX_RANGE_REPORT_BYTES = 256 * 1024

#: The PC's legacy window, 640 KiB to 1 MiB (VGA memory, SMRAM, option ROMs, the BIOS and
#: its shadow copy): never RAM the guest owns. QEMU rounds a vhost-user memory section
#: out to its huge page and merges neighbours, so on hugetlbfs the first region covers
#: 0-2 MiB, this window included. (gpa, bytes)
PC_LEGACY_WINDOW = (0xA0000, 0x60000)

#: Free-page-hint command ids (spec "Free Page Hinting"): 0 and 1 are reserved.
CMD_ID_STOP = 0
CMD_ID_DONE = 1
#: First id the device hands out (QEMU's VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN).
CMD_ID_MIN = 0x80000000


class Feature(IntFlag):
    """Feature bits offered by the device (balloon bits 0-23, generic 24+)."""

    MUST_TELL_HOST = 1 << 0
    STATS_VQ = 1 << 1
    DEFLATE_ON_OOM = 1 << 2
    FREE_PAGE_HINT = 1 << 3
    PAGE_POISON = 1 << 4
    REPORTING = 1 << 5
    #: vballoon's experimental range-report queue (guest_driver_c/vballoon_report_abi.h).
    RANGE_REPORT = 1 << 16
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32


class Queue(IntEnum):
    """Balloon queues in their canonical order; indices are assigned by layout."""

    INFLATE = 0
    DEFLATE = 1
    STATS = 2
    FREE_PAGE = 3
    REPORTING = 4
    RANGE_REPORT = 5


#: Which feature makes each optional queue exist (inflate and deflate always do).
QUEUE_FEATURE: dict[Queue, Feature] = {
    Queue.STATS: Feature.STATS_VQ,
    Queue.FREE_PAGE: Feature.FREE_PAGE_HINT,
    Queue.REPORTING: Feature.REPORTING,
    Queue.RANGE_REPORT: Feature.RANGE_REPORT,
}


class Status(IntFlag):
    """virtio device status bits (spec "Device Status Field")."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DescFlag(IntFlag):
    """Split-ring descriptor flags."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


#: avail.flags bit: the driver asks for no interrupts (ignored with EVENT_IDX).
AVAIL_F_NO_INTERRUPT = 1

#: Largest split queue size the spec allows.
MAX_QUEUE_SIZE = 32768


class StatTag(IntEnum):
    """Memory statistics tags (spec 0-9, Linux/QEMU headers 10-15)."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILLS = 10
    ALLOC_STALLS = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


#: QMP names of the stats, as QEMU's query-balloon-stats / guest-stats uses them.
STAT_NAMES: dict[StatTag, str] = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJFLT: "stat-major-faults",
    StatTag.MINFLT: "stat-minor-faults",
    StatTag.MEMFREE: "stat-free-memory",
    StatTag.MEMTOT: "stat-total-memory",
    StatTag.AVAIL: "stat-available-memory",
    StatTag.CACHES: "stat-disk-caches",
    StatTag.HTLB_PGALLOC: "stat-htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "stat-htlb-pgfail",
    StatTag.OOM_KILLS: "stat-oom-kills",
    StatTag.ALLOC_STALLS: "stat-alloc-stalls",
    StatTag.ASYNC_SCAN: "stat-async-scans",
    StatTag.DIRECT_SCAN: "stat-direct-scans",
    StatTag.ASYNC_RECLAIM: "stat-async-reclaims",
    StatTag.DIRECT_RECLAIM: "stat-direct-reclaims",
}

#: One stat entry: le16 tag, le64 value, packed (10 bytes; the spec's "6" is stale).
STAT_ENTRY_SIZE = 10
