"""Pure-Python reference models of the C decoders, for differential tests only.

Each function here says what the ABI (``guest_driver_c/vballoon_report_abi.h``)
and the balloon protocol mean, in the plainest Python that can say it; it is
written from that meaning, not from ``device/_accel/balloon_accel.c``. Speed is
no goal. Python integers never overflow, so every "does it fit in 2^52" check
is a plain comparison.

Reading of the ABI where its text leaves a choice (each is marked ``CHOICE``
below):

- A buffer too short to hold the 24-byte header has no header, which is what
  ``E_CHAIN`` ("chain layout (no header/status)") names; ``E_COUNT`` is about
  *records* that do not fit.
- Checks run in header order, then record by record: version, encoding, record
  count against the buffer, then each record (for BITMAP the header's order,
  base alignment and the span of all ``nr_records`` blocks are the record
  checks), and only when every record is valid, overlaps.
- For PFN_LEN and PFN_ORDER the header's ``order`` and ``base_pfn`` are
  "BITMAP only" and ignored; the header's ``reserved`` word is ignored (the ABI
  does not say it must be zero). Bytes after the last record are ignored, as
  are the bits after bit ``nr_records - 1`` in the last bitmap byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

FRAME_SHIFT = 12

# -- the ABI, restated --------------------------------------------------------------

VERSION = 1
ENC_PFN_LEN = 1
ENC_PFN_ORDER = 2
ENC_BITMAP = 3
ENCODINGS = (ENC_PFN_LEN, ENC_PFN_ORDER, ENC_BITMAP)

OK = 0
E_VERSION = 1
E_ENCODING = 2
E_COUNT = 3
E_RECORD = 4
E_RANGE = 5
E_OVERLAP = 6
E_CHAIN = 7
E_RUNS = 8

#: Most runs (after adjacent blocks merge) one report may name.
MAX_RUNS = 32768

#: Frames are below 2^52 (a PFN_ORDER word has 52 pfn bits).
PFN_LIMIT = 1 << 52
#: Largest block order: 2^30 frames.
MAX_ORDER = 30
#: bad_record when no single record is to blame.
NO_RECORD = 0xFFFFFFFF

#: struct vballoon_report_hdr: version, encoding, nr_records, order, reserved, base_pfn.
HDR = struct.Struct("<HHIIIQ")
HDR_SIZE = 24
#: struct vballoon_rec_pfn_len
PFN_LEN_REC = struct.Struct("<QQ")
#: one PFN_ORDER word
PFN_ORDER_REC = struct.Struct("<Q")
#: struct vballoon_report_status: error, bad_record, frames_discarded.
STATUS = struct.Struct("<IIQ")
STATUS_SIZE = 16

assert HDR.size == HDR_SIZE and STATUS.size == STATUS_SIZE

Extent = tuple[int, int]  # (first frame, number of frames)


# -- PFN arrays ------------------------------------------------------------------------


def compact_pfns(pfns: Iterable[int]) -> list[Extent]:
    """The set of frames in ``pfns`` as runs: sorted, disjoint, never adjacent."""
    runs: list[list[int]] = []
    for f in sorted(set(pfns)):
        if runs and runs[-1][0] + runs[-1][1] == f:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    return [(s, n) for s, n in runs]


def pfns_from_le32(data: bytes) -> list[int]:
    """The le32 frame numbers of an inflate/deflate buffer (a trailing partial one dropped)."""
    n = len(data) // 4
    return list(struct.unpack_from(f"<{n}I", data)) if n else []


def expand(extents: Iterable[Extent]) -> set[int]:
    """Every frame of ``extents`` (only for small extents: tests)."""
    return {f for s, n in extents for f in range(s, s + n)}


def merge_adjacent(extents: Iterable[Extent]) -> list[Extent]:
    """Sort disjoint extents and join those that touch."""
    out: list[list[int]] = []
    for s, n in sorted(extents):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += n
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]


def any_overlap(extents: Iterable[Extent]) -> bool:
    """Whether any two of ``extents`` share a frame."""
    end = -1
    for s, n in sorted(extents):
        if s < end:
            return True
        end = max(end, s + n)
    return False


# -- range reports ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """What a range report says: an error code, the extents, the first bad record."""

    error: int
    extents: tuple[Extent, ...] = ()
    bad_record: int = NO_RECORD

    @property
    def frames(self) -> int:
        return sum(n for _, n in self.extents)


def pfn_len_record(pfn: int, length: int) -> Extent | None:
    """A PFN_LEN record's block, or None if it is bad (empty, or past frame 2^52 - 1)."""
    if length < 1 or pfn + length > PFN_LIMIT:
        return None
    return pfn, length


def pfn_order_record(word: int) -> Extent | None:
    """A PFN_ORDER word's block, or None if it is bad.

    Bits 0-51 the frame, 52-57 reserved (zero), 58-63 the order; the block is
    naturally aligned (a buddy block) and ends at or below frame 2^52.
    """
    pfn = word & (PFN_LIMIT - 1)
    reserved = (word >> 52) & 0x3F
    order = word >> 58
    if reserved or order > MAX_ORDER:
        return None
    size = 1 << order
    if pfn % size or pfn + size > PFN_LIMIT:
        return None
    return pfn, size


def bitmap_blocks(bits: bytes, nbits: int, base: int, order: int) -> list[Extent]:
    """The blocks whose bit is set: bit i (LSB first in byte i // 8) is block base + i * 2^order."""
    data = bytes(bits[: (nbits + 7) // 8])
    blocks = []
    for i in range(nbits):
        if data[i >> 3] >> (i & 7) & 1:
            blocks.append((base + (i << order), 1 << order))
    return blocks


def decode_report_full(buf: bytes) -> Decoded:
    """Decode the device-readable part of a range report (header, then records)."""
    buf = bytes(buf)
    if len(buf) < HDR_SIZE:
        return Decoded(E_CHAIN)  # CHOICE: no header at all is a chain-layout error
    version, encoding, nr, order, _reserved, base = HDR.unpack_from(buf)
    if version != VERSION:
        return Decoded(E_VERSION)
    if encoding not in ENCODINGS:
        return Decoded(E_ENCODING)
    body = buf[HDR_SIZE:]

    if encoding == ENC_BITMAP:
        if (nr + 7) // 8 > len(body):
            return Decoded(E_COUNT)
        if order > MAX_ORDER or base % (1 << order) or base >= PFN_LIMIT:
            return Decoded(E_RECORD)  # base_pfn is a frame: below 2^52 even with no bits
        if base + (nr << order) > PFN_LIMIT:
            return Decoded(E_RECORD)  # CHOICE: every declared block, set or not, is a frame range
        blocks = bitmap_blocks(body, nr, base, order)
        return Decoded(OK, tuple(merge_adjacent(blocks)))

    rec = PFN_LEN_REC if encoding == ENC_PFN_LEN else PFN_ORDER_REC
    if nr * rec.size > len(body):
        return Decoded(E_COUNT)
    blocks = []
    for i in range(nr):
        if encoding == ENC_PFN_LEN:
            block = pfn_len_record(*rec.unpack_from(body, i * rec.size))
        else:
            block = pfn_order_record(rec.unpack_from(body, i * rec.size)[0])
        if block is None:
            return Decoded(E_RECORD, bad_record=i)
        blocks.append(block)
    if any_overlap(blocks):
        return Decoded(E_OVERLAP)
    return Decoded(OK, tuple(merge_adjacent(blocks)))


def decode_report(buf: bytes) -> tuple[int, list[Extent]]:
    """(error code, extents): extents sorted, disjoint, adjacent ones merged; [] on error."""
    d = decode_report_full(buf)
    return d.error, list(d.extents)


def inside(extent: Extent, ram: Iterable[Extent]) -> bool:
    """Whether every frame of ``extent`` lies in the union of the ``ram`` frame ranges."""
    s, n = extent
    end = s + n
    for rs, rn in merge_adjacent(sorted(ram)):
        if rs <= s < rs + rn:
            s = rs + rn
            if s >= end:
                return True
    return s >= end


def split_by_ram(extent: Extent, ram: Iterable[Extent]) -> tuple[list[Extent], int]:
    """The pieces of ``extent`` inside the ``ram`` frame ranges, and how many maximal
    pieces lie outside them (each one a refused range to the device)."""
    s, n = extent
    end = s + n
    inside_: list[Extent] = []
    outside = 0
    f = s
    for rs, rn in merge_adjacent(sorted(ram)):
        re_ = rs + rn
        if re_ <= f:
            continue
        if rs >= end:
            break
        if rs > f:
            outside += 1
        lo, hi = max(f, rs), min(end, re_)
        inside_.append((lo, hi - lo))
        f = hi
    if f < end:
        outside += 1
    return inside_, outside


def check_report(buf: bytes, ram: Iterable[Extent]) -> Decoded:
    """A report as the device must judge it: decoded, at most ``MAX_RUNS`` runs (CHOICE:
    counted before the RAM check), then every block inside guest RAM."""
    ram = list(ram)
    d = decode_report_full(buf)
    if d.error == OK and len(d.extents) > MAX_RUNS:
        return Decoded(E_RUNS)
    if d.error == OK and not all(inside(e, ram) for e in d.extents):
        return Decoded(E_RANGE)
    return d


# -- encoders for tests ------------------------------------------------------------------


def encode_header(
    encoding: int,
    nr_records: int,
    order: int = 0,
    base_pfn: int = 0,
    *,
    version: int = VERSION,
    reserved: int = 0,
) -> bytes:
    """A struct vballoon_report_hdr."""
    return HDR.pack(version, encoding, nr_records, order, reserved, base_pfn)


def encode_pfn_len(
    records: Iterable[Extent], *, nr_records: int | None = None, **hdr: int
) -> bytes:
    """Header + PFN_LEN records ``(pfn, len)``; ``nr_records`` overrides the true count."""
    records = list(records)
    nr = len(records) if nr_records is None else nr_records
    return encode_header(ENC_PFN_LEN, nr, **hdr) + b"".join(
        PFN_LEN_REC.pack(p, n) for p, n in records
    )


def pfn_order_word(pfn: int, order: int) -> int:
    """``pfn | order << 58`` unmasked, so that tests can set reserved bits through ``pfn``."""
    return pfn | (order << 58)


def encode_pfn_order(
    blocks: Iterable[tuple[int, int]], *, nr_records: int | None = None, **hdr: int
) -> bytes:
    """Header + PFN_ORDER words for ``(pfn, order)`` blocks."""
    words = [pfn_order_word(p, o) for p, o in blocks]
    return encode_pfn_order_words(words, nr_records=nr_records, **hdr)


def encode_pfn_order_words(
    words: Iterable[int], *, nr_records: int | None = None, **hdr: int
) -> bytes:
    """Header + raw PFN_ORDER words."""
    words = list(words)
    nr = len(words) if nr_records is None else nr_records
    return encode_header(ENC_PFN_ORDER, nr, **hdr) + b"".join(PFN_ORDER_REC.pack(w) for w in words)


def bitmap_bytes(set_bits: Iterable[int], nbits: int) -> bytes:
    """``ceil(nbits / 8)`` bytes with bit i (LSB first) set for each i in ``set_bits``."""
    value = 0
    for i in set_bits:
        if not 0 <= i < nbits:
            raise ValueError(f"bit {i} outside a bitmap of {nbits} bits")
        value |= 1 << i
    return value.to_bytes((nbits + 7) // 8, "little")


def encode_bitmap(
    base_pfn: int,
    order: int,
    set_bits: Iterable[int],
    nbits: int,
    *,
    nr_records: int | None = None,
    **hdr: int,
) -> bytes:
    """Header + a BITMAP of ``nbits`` bits with ``set_bits`` set."""
    nr = nbits if nr_records is None else nr_records
    return encode_header(ENC_BITMAP, nr, order, base_pfn, **hdr) + bitmap_bytes(set_bits, nbits)


def encode_status(error: int, bad_record: int, frames: int) -> bytes:
    """A struct vballoon_report_status."""
    return STATUS.pack(error, bad_record, frames)
