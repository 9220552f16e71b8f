"""Differential tests: the C decoders against the pure-Python models in tests/reference.py.

Every buffer handed to C ends exactly at a PROT_NONE page, so a read past the
end crashes the run instead of passing silently, and every output array has
sentinel slots after the room the C is told about, so a write past it fails.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from device._accel import ffi, lib
from tests import reference as ref

PAGE = mmap.PAGESIZE
ARENA = 1 << 20  # largest buffer handed to C
SENTINEL = 0xDEADBEEFCAFEF00D
GUARD_SLOTS = 4

settings.register_profile(
    "differential",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DIFF = settings.get_profile("differential")

# -- C side ------------------------------------------------------------------------------


class _GuardedArena:
    """An anonymous mapping whose last page is PROT_NONE: data is placed right before it."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size + PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.base = ctypes.addressof(self._anchor)
        self.end = self.base + size
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(ctypes.c_void_p(self.end), PAGE, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")

    def place(self, data: bytes) -> object:
        """Copy ``data`` to end at the guard page; return a ``uint8_t *`` to it."""
        n = len(data)
        if n > self.end - self.base:
            raise ValueError(f"{n} bytes do not fit the guarded arena")
        start = self.end - self.base - n
        self.map[start : start + n] = data
        return ffi.cast("uint8_t *", self.base + start)


_ARENA = _GuardedArena(ARENA)


def _extents_array(room: int) -> object:
    arr = ffi.new("struct balloon_accel_extent[]", room + GUARD_SLOTS)
    for i in range(room + GUARD_SLOTS):
        arr[i].start = SENTINEL
        arr[i].count = SENTINEL
    return arr


def _assert_guard(arr: object, room: int) -> None:
    for i in range(room, room + GUARD_SLOTS):
        assert (arr[i].start, arr[i].count) == (SENTINEL, SENTINEL), (
            f"C wrote extent slot {i} past the {room} it was given"
        )


def c_compact(pfns: list[int], misalign: int = 0) -> list[tuple[int, int]]:
    """balloon_accel_compact_pfns on le32 ``pfns`` placed ``misalign`` bytes off 4-alignment."""
    n = len(pfns)
    data = b"\xa5" * misalign + struct.pack(f"<{n}I", *pfns)
    ptr = _ARENA.place(data) + misalign
    scratch = ffi.new("uint32_t[]", n + GUARD_SLOTS)
    for i in range(n, n + GUARD_SLOTS):
        scratch[i] = 0xA5A5A5A5
    out = _extents_array(n)
    m = lib.balloon_accel_compact_pfns(ptr, n, scratch, out)
    assert 0 <= m <= n
    assert all(scratch[i] == 0xA5A5A5A5 for i in range(n, n + GUARD_SLOTS)), "scratch overrun"
    _assert_guard(out, n)
    return [(int(out[i].start), int(out[i].count)) for i in range(m)]


def c_decode(buf: bytes, max_out: int | None = None) -> tuple[int, list[tuple[int, int]], int]:
    """balloon_accel_decode_report: (error, extents, bad_record)."""
    room = 4 * len(buf) + 2 if max_out is None else max_out
    ptr = _ARENA.place(buf)
    out = _extents_array(room)
    nout = ffi.new("size_t *", 12345)
    bad = ffi.new("uint32_t *", 777)
    err = lib.balloon_accel_decode_report(ptr, len(buf), out, room, nout, bad)
    _assert_guard(out, room)
    assert nout[0] <= room
    extents = [(int(out[i].start), int(out[i].count)) for i in range(nout[0])] if err == 0 else []
    return int(err), extents, int(bad[0])


def assert_agrees(buf: bytes) -> ref.Decoded:
    """The C decoder and the reference agree on ``buf``; return the reference's verdict."""
    want = ref.decode_report_full(buf)
    err, extents, bad = c_decode(buf)
    assert err == want.error, f"C says error {err}, reference {want.error} for {buf.hex()}"
    assert extents == list(want.extents)
    if want.error == ref.E_RECORD and want.bad_record != ref.NO_RECORD:
        assert bad == want.bad_record, "bad_record must name the first bad record"
    return want


# -- strategies ----------------------------------------------------------------------------

U32 = 2**32
u32 = st.integers(0, U32 - 1)
u64 = st.integers(0, 2**64 - 1)

pfn32 = st.one_of(
    st.integers(0, 300),
    st.integers(U32 - 300, U32 - 1),
    st.integers(2**31 - 150, 2**31 + 150),
    u32,
)


@st.composite
def pfn_arrays(draw: st.DrawFn) -> list[int]:
    """PFN arrays as guests send them and as they should not: runs, repeats, any order."""
    runs = draw(
        st.lists(st.tuples(pfn32, st.integers(1, 70)), max_size=8).map(
            lambda rs: [min(s + k, U32 - 1) for s, n in rs for k in range(n)]
        )
    )
    singles = draw(st.lists(pfn32, max_size=60))
    pfns = runs + singles
    if pfns and draw(st.booleans()):
        pfns += draw(st.lists(st.sampled_from(pfns), max_size=30))  # duplicates
    order = draw(st.sampled_from(["asis", "sorted", "reversed", "shuffled"]))
    if order == "sorted":
        pfns.sort()
    elif order == "reversed":
        pfns.sort(reverse=True)
    elif order == "shuffled":
        pfns = draw(st.permutations(pfns))
    return list(pfns)


PFN_LIMIT = ref.PFN_LIMIT
frame_len = st.one_of(st.integers(1, 8), st.integers(1, 4096), st.integers(1, 2**40))
gap = st.one_of(st.just(0), st.integers(0, 16), st.integers(0, 2**40))


@st.composite
def disjoint_extents(draw: st.DrawFn, max_size: int = 24) -> list[tuple[int, int]]:
    """Disjoint extents below 2^52, some adjacent, some ending exactly at 2^52, shuffled."""
    shape = draw(st.lists(st.tuples(gap, frame_len), max_size=max_size))
    total = sum(g + n for g, n in shape)
    assume(total <= PFN_LIMIT)
    anchor = draw(
        st.one_of(
            st.just(0),
            st.just(PFN_LIMIT - total),  # the last frame is 2^52 - 1
            st.integers(0, PFN_LIMIT - total),
        )
    )
    out, pos = [], anchor
    for g, n in shape:
        pos += g
        out.append((pos, n))
        pos += n
    return list(draw(st.permutations(out)))


@st.composite
def buddy_blocks(draw: st.DrawFn, max_size: int = 24) -> list[tuple[int, int]]:
    """Disjoint naturally aligned (pfn, order) blocks below 2^52, shuffled."""
    raw = draw(
        st.lists(
            st.integers(0, ref.MAX_ORDER).flatmap(
                lambda o: st.tuples(
                    st.one_of(
                        st.integers(0, 64),
                        st.integers((PFN_LIMIT >> o) - 64, (PFN_LIMIT >> o) - 1),
                        st.integers(0, (PFN_LIMIT >> o) - 1),
                    ).map(lambda slot, o=o: slot << o),
                    st.just(o),
                )
            ),
            max_size=max_size,
        )
    )
    kept: list[tuple[int, int]] = []
    for pfn, order in raw:
        if not ref.any_overlap([(p, 1 << o) for p, o in kept] + [(pfn, 1 << order)]):
            kept.append((pfn, order))
    return kept


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[int, int, list[int], int]:
    """(base_pfn, order, set bits, nbits) of a valid BITMAP report."""
    order = draw(st.one_of(st.integers(0, 10), st.integers(0, ref.MAX_ORDER)))
    nbits = draw(st.one_of(st.integers(0, 80), st.integers(0, 600)))
    top = min((PFN_LIMIT - (nbits << order)) >> order, (PFN_LIMIT >> order) - 1)  # last base slot
    assume(top >= 0)
    slot = draw(st.one_of(st.just(0), st.just(top), st.integers(0, top)))
    bits = draw(st.lists(st.integers(0, max(nbits - 1, 0)), max_size=nbits, unique=True))
    return slot << order, order, bits if nbits else [], nbits


@st.composite
def well_formed_reports(draw: st.DrawFn) -> bytes:
    """A valid report of any encoding, sometimes with trailing bytes and junk header fields."""
    enc = draw(st.sampled_from(ref.ENCODINGS))
    junk = {"reserved": draw(st.one_of(st.just(0), u32))}
    if enc == ref.ENC_PFN_LEN:
        junk.update(
            order=draw(st.one_of(st.just(0), u32)), base_pfn=draw(st.one_of(st.just(0), u64))
        )
        buf = ref.encode_pfn_len(draw(disjoint_extents()), **junk)
    elif enc == ref.ENC_PFN_ORDER:
        junk.update(
            order=draw(st.one_of(st.just(0), u32)), base_pfn=draw(st.one_of(st.just(0), u64))
        )
        buf = ref.encode_pfn_order(draw(buddy_blocks()), **junk)
    else:
        base, order, bits, nbits = draw(bitmaps())
        buf = bytearray(ref.encode_bitmap(base, order, bits, nbits, **junk))
        if nbits % 8 and draw(st.booleans()):
            buf[-1] |= draw(st.integers(1, 255)) & ~((1 << (nbits % 8)) - 1) & 0xFF  # past the end
        buf = bytes(buf)
    return buf + draw(st.binary(max_size=draw(st.sampled_from([0, 0, 7, 40]))))


# -- compaction ------------------------------------------------------------------------------


@DIFF
@given(pfns=pfn_arrays(), misalign=st.integers(0, 3))
@example(pfns=[U32 - 1, U32 - 2, 0, 1, U32 - 1], misalign=1)
@example(pfns=[], misalign=0)
def test_compact_matches_reference(pfns: list[int], misalign: int) -> None:
    assert c_compact(pfns, misalign) == ref.compact_pfns(pfns)


@DIFF
@given(pfns=pfn_arrays())
def test_compact_round_trip(pfns: list[int]) -> None:
    """Compacted extents expand back to exactly the input set, as sorted, separated runs."""
    extents = c_compact(pfns)
    covered: list[int] = []
    for i, (start, count) in enumerate(extents):
        assert count >= 1
        assert start + count <= U32
        if i:
            prev_start, prev_count = extents[i - 1]
            assert start > prev_start + prev_count, "runs must be sorted, disjoint, not adjacent"
        covered.extend(range(start, start + count))
    assert len(covered) == len(set(covered))
    assert set(covered) == set(pfns)


def test_compact_reference_examples() -> None:
    """Pin the model itself, so a wrong reference cannot agree with a wrong C."""
    assert ref.compact_pfns([]) == []
    assert ref.compact_pfns([5, 3, 4, 4, 9, U32 - 1, U32 - 2]) == [(3, 3), (9, 1), (U32 - 2, 2)]
    assert ref.compact_pfns([0, 2]) == [(0, 1), (2, 1)]


# -- well-formed reports ----------------------------------------------------------------------


@DIFF
@given(extents=disjoint_extents())
def test_pfn_len_well_formed(extents: list[tuple[int, int]]) -> None:
    want = assert_agrees(ref.encode_pfn_len(extents))
    assert want.error == ref.OK
    assert want.extents == tuple(ref.merge_adjacent(extents))


@DIFF
@given(blocks=buddy_blocks())
def test_pfn_order_well_formed(blocks: list[tuple[int, int]]) -> None:
    want = assert_agrees(ref.encode_pfn_order(blocks))
    assert want.error == ref.OK
    assert want.frames == sum(1 << o for _, o in blocks)


@DIFF
@given(bm=bitmaps())
def test_bitmap_well_formed(bm: tuple[int, int, list[int], int]) -> None:
    base, order, bits, nbits = bm
    want = assert_agrees(ref.encode_bitmap(base, order, bits, nbits))
    assert want.error == ref.OK
    assert want.frames == len(bits) << order


@DIFF
@given(buf=well_formed_reports())
def test_well_formed_any_encoding(buf: bytes) -> None:
    assert assert_agrees(buf).error == ref.OK


# -- malformed reports ------------------------------------------------------------------------


def _set_header(buf: bytes, **fields: int) -> bytes:
    version, encoding, nr, order, reserved, base = ref.HDR.unpack_from(buf)
    vals = {
        "version": version,
        "encoding": encoding,
        "nr_records": nr,
        "order": order,
        "reserved": reserved,
        "base_pfn": base,
    }
    vals.update(fields)
    return (
        ref.HDR.pack(
            vals["version"],
            vals["encoding"],
            vals["nr_records"],
            vals["order"],
            vals["reserved"],
            vals["base_pfn"],
        )
        + buf[ref.HDR_SIZE :]
    )


@DIFF
@given(buf=well_formed_reports(), version=st.integers(0, 0xFFFF).filter(lambda v: v != 1))
def test_bad_version(buf: bytes, version: int) -> None:
    assert assert_agrees(_set_header(buf, version=version)).error == ref.E_VERSION


@DIFF
@given(
    buf=well_formed_reports(), encoding=st.integers(0, 0xFFFF).filter(lambda e: e not in (1, 2, 3))
)
def test_bad_encoding(buf: bytes, encoding: int) -> None:
    assert assert_agrees(_set_header(buf, encoding=encoding)).error == ref.E_ENCODING


def _record_bytes(encoding: int, nr: int) -> int:
    return {ref.ENC_PFN_LEN: 16 * nr, ref.ENC_PFN_ORDER: 8 * nr, ref.ENC_BITMAP: (nr + 7) // 8}[
        encoding
    ]


@DIFF
@given(buf=well_formed_reports(), data=st.data())
def test_count_larger_than_buffer(buf: bytes, data: st.DataObject) -> None:
    _, encoding, *_ = ref.HDR.unpack_from(buf)
    body = len(buf) - ref.HDR_SIZE
    # the smallest count that no longer fits, and anything up to 2^32 - 1
    least = {ref.ENC_PFN_LEN: body // 16 + 1, ref.ENC_PFN_ORDER: body // 8 + 1}.get(
        encoding, 8 * body + 1
    )
    assume(least < U32)
    bigger = data.draw(st.one_of(st.just(least), st.just(U32 - 1), st.integers(least, U32 - 1)))
    assert _record_bytes(encoding, bigger) > body
    assert assert_agrees(_set_header(buf, nr_records=bigger)).error == ref.E_COUNT


@DIFF
@given(buf=well_formed_reports(), data=st.data())
def test_truncated(buf: bytes, data: st.DataObject) -> None:
    """Cut anywhere: E_CHAIN inside the header, else E_COUNT exactly when records were cut off."""
    cut = data.draw(st.integers(0, len(buf)))
    short = buf[:cut]
    _, encoding, nr, *_ = ref.HDR.unpack_from(buf)
    want = assert_agrees(short)
    if cut < ref.HDR_SIZE:
        assert want.error == ref.E_CHAIN
    elif _record_bytes(encoding, nr) > cut - ref.HDR_SIZE:
        assert want.error == ref.E_COUNT
    else:
        assert want.error == ref.OK


@DIFF
@given(
    extents=disjoint_extents(max_size=6).filter(bool),
    data=st.data(),
)
def test_pfn_len_bad_record(extents: list[tuple[int, int]], data: st.DataObject) -> None:
    """Zero length, or pfn + len past 2^52: E_RECORD naming the first bad record."""
    i = data.draw(st.integers(0, len(extents) - 1))
    kind = data.draw(st.sampled_from(["zero", "overflow", "pfn_huge"]))
    pfn, _ = extents[i]
    if kind == "zero":
        bad = (pfn, 0)
    elif kind == "overflow":
        start = data.draw(st.integers(0, PFN_LIMIT - 1))
        bad = (start, PFN_LIMIT - start + data.draw(st.integers(1, 2**63)))
    else:
        bad = (data.draw(st.integers(PFN_LIMIT, 2**64 - 1)), data.draw(st.integers(1, 2**64 - 1)))
    extents[i] = bad
    want = assert_agrees(ref.encode_pfn_len(extents))
    assert want.error == ref.E_RECORD
    assert want.bad_record <= i


@DIFF
@given(blocks=buddy_blocks(max_size=6).filter(bool), data=st.data())
def test_pfn_order_bad_record(blocks: list[tuple[int, int]], data: st.DataObject) -> None:
    """Order > 30, reserved bits 52-57, misaligned pfn, block past 2^52: E_RECORD."""
    words = [ref.pfn_order_word(p, o) for p, o in blocks]
    i = data.draw(st.integers(0, len(words) - 1))
    pfn, order = blocks[i]
    kind = data.draw(st.sampled_from(["order", "reserved", "misaligned", "overflow"]))
    if kind == "order":
        words[i] = (pfn & (PFN_LIMIT - 1)) | (data.draw(st.integers(31, 63)) << 58)
    elif kind == "reserved":
        words[i] |= data.draw(st.integers(1, 0x3F)) << 52
    elif kind == "misaligned":
        order = data.draw(st.integers(1, ref.MAX_ORDER))
        slot = data.draw(st.integers(0, (PFN_LIMIT >> order) - 1))
        words[i] = ref.pfn_order_word(
            (slot << order) + data.draw(st.integers(1, (1 << order) - 1)), order
        )
    else:
        # Aligned blocks cannot pass 2^52 (2^52 is a multiple of every 2^order, order <= 30),
        # so the only overflow left is a pfn needing more than 52 bits: that is a reserved bit.
        words[i] = ref.pfn_order_word(PFN_LIMIT | pfn, order)
    want = assert_agrees(ref.encode_pfn_order_words(words))
    assert want.error == ref.E_RECORD
    assert want.bad_record <= i


@DIFF
@given(bm=bitmaps(), data=st.data())
def test_bitmap_bad_header(bm: tuple[int, int, list[int], int], data: st.DataObject) -> None:
    """Order > 30, base not aligned to 2^order, base past 2^52, bits spanning past 2^52."""
    base, order, bits, nbits = bm
    kind = data.draw(st.sampled_from(["order", "misaligned", "base", "span"]))
    if kind == "order":
        order = data.draw(st.one_of(st.integers(31, 64), st.integers(31, U32 - 1)))
    elif kind == "misaligned":
        order = data.draw(st.integers(1, ref.MAX_ORDER))
        slot = data.draw(st.integers(0, (PFN_LIMIT >> order) - 2))
        base = (slot << order) + data.draw(st.integers(1, (1 << order) - 1))
        nbits = min(nbits, (PFN_LIMIT - base) >> order)
        bits = [b for b in bits if b < nbits]
    elif kind == "base":
        order, base = 0, data.draw(st.integers(PFN_LIMIT, 2**64 - 1))
    else:
        assume(nbits > 0)
        slot = data.draw(st.integers((PFN_LIMIT >> order) - nbits + 1, PFN_LIMIT >> order))
        base = slot << order
        bits = data.draw(st.lists(st.integers(0, nbits - 1), max_size=3, unique=True))
    buf = ref.encode_header(ref.ENC_BITMAP, nbits, order, base) + ref.bitmap_bytes(bits, nbits)
    assert assert_agrees(buf).error == ref.E_RECORD


@DIFF
@given(extents=disjoint_extents(max_size=8).filter(bool), data=st.data())
def test_pfn_len_overlap(extents: list[tuple[int, int]], data: st.DataObject) -> None:
    """A record sharing at least one frame with another: E_OVERLAP, never a merge."""
    s, n = data.draw(st.sampled_from(extents))
    first = data.draw(st.integers(s, s + n - 1))
    length = data.draw(st.integers(1, PFN_LIMIT - first))
    extents.insert(data.draw(st.integers(0, len(extents))), (first, length))
    assert assert_agrees(ref.encode_pfn_len(extents)).error == ref.E_OVERLAP


@DIFF
@given(blocks=buddy_blocks(max_size=8).filter(bool), data=st.data())
def test_pfn_order_overlap(blocks: list[tuple[int, int]], data: st.DataObject) -> None:
    """A duplicate block, or a buddy block containing or inside another."""
    pfn, order = data.draw(st.sampled_from(blocks))
    other = data.draw(st.integers(0, ref.MAX_ORDER))
    if other <= order:
        slot = data.draw(st.integers(0, (1 << (order - other)) - 1))
        new = (pfn + (slot << other), other)
    else:
        new = (pfn >> other << other, other)
    blocks.insert(data.draw(st.integers(0, len(blocks))), new)
    assert assert_agrees(ref.encode_pfn_order(blocks)).error == ref.E_OVERLAP


@DIFF
@given(
    header=st.tuples(
        st.one_of(st.just(1), st.integers(0, 0xFFFF)),
        st.one_of(st.sampled_from([1, 2, 3]), st.integers(0, 0xFFFF)),
        st.one_of(st.integers(0, 40), u32),
        st.one_of(st.integers(0, 32), u32),
        st.one_of(st.just(0), u32),
        st.one_of(st.integers(0, 1 << 20), st.integers(PFN_LIMIT - (1 << 20), PFN_LIMIT + 8), u64),
    ),
    body=st.binary(max_size=600),
)
def test_random_bytes(header: tuple[int, ...], body: bytes) -> None:
    """Arbitrary headers and record bytes: never a crash, always the reference's verdict."""
    assert_agrees(ref.HDR.pack(*header) + body)


@DIFF
@given(buf=well_formed_reports(), data=st.data())
def test_mutated_bytes(buf: bytes, data: st.DataObject) -> None:
    """Flip, overwrite or cut bytes of a valid report."""
    b = bytearray(buf)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "byte", "cut", "append"]))
        if op == "flip" and b:
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "byte" and b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del b[data.draw(st.integers(0, len(b))) :]
        else:
            b += data.draw(st.binary(max_size=24))
    assert_agrees(bytes(b))


# -- output room ---------------------------------------------------------------------------------


@DIFF
@given(buf=well_formed_reports())
def test_out_room(buf: bytes) -> None:
    """The C never writes past ``max_out`` and says E_COUNT when the room is too small.

    PFN encodings need one slot per record (before merging); BITMAP one per run.
    """
    _, encoding, nr, *_ = ref.HDR.unpack_from(buf)
    want = ref.decode_report_full(buf)
    need = len(want.extents) if encoding == ref.ENC_BITMAP else nr
    err, extents, _ = c_decode(buf, max_out=need)
    assert (err, extents) == (ref.OK, list(want.extents))
    if need:
        err, extents, _ = c_decode(buf, max_out=need - 1)
        assert (err, extents) == (ref.E_COUNT, [])


# -- boundaries, pinned -----------------------------------------------------------------------

L = PFN_LIMIT
BOUNDARIES = [
    # (name, buffer, error, extents)
    ("pfn_len last frame", ref.encode_pfn_len([(L - 1, 1)]), ref.OK, [(L - 1, 1)]),
    ("pfn_len ends at 2^52", ref.encode_pfn_len([(L - 5, 5)]), ref.OK, [(L - 5, 5)]),
    ("pfn_len ends past 2^52", ref.encode_pfn_len([(L - 5, 6)]), ref.E_RECORD, []),
    ("pfn_len pfn = 2^52", ref.encode_pfn_len([(L, 1)]), ref.E_RECORD, []),
    ("pfn_len len wraps u64", ref.encode_pfn_len([(8, 2**64 - 4)]), ref.E_RECORD, []),
    ("pfn_len len 0", ref.encode_pfn_len([(7, 0)]), ref.E_RECORD, []),
    ("pfn_len adjacent merge", ref.encode_pfn_len([(10, 2), (8, 2)]), ref.OK, [(8, 4)]),
    ("pfn_len overlap 1 frame", ref.encode_pfn_len([(10, 2), (8, 3)]), ref.E_OVERLAP, []),
    ("pfn_len same start", ref.encode_pfn_len([(8, 1), (8, 1)]), ref.E_OVERLAP, []),
    ("pfn_len empty", ref.encode_pfn_len([]), ref.OK, []),
    ("order 30 aligned", ref.encode_pfn_order([(1 << 30, 30)]), ref.OK, [(1 << 30, 1 << 30)]),
    (
        "order 30 at top",
        ref.encode_pfn_order([(L - (1 << 30), 30)]),
        ref.OK,
        [(L - (1 << 30), 1 << 30)],
    ),
    ("order 31", ref.encode_pfn_order([(0, 31)]), ref.E_RECORD, []),
    ("order 63", ref.encode_pfn_order([(0, 63)]), ref.E_RECORD, []),
    ("reserved bit 52", ref.encode_pfn_order_words([1 << 52]), ref.E_RECORD, []),
    ("reserved bit 57", ref.encode_pfn_order_words([1 << 57]), ref.E_RECORD, []),
    ("order misaligned", ref.encode_pfn_order([(2, 2)]), ref.E_RECORD, []),
    ("order buddies merge", ref.encode_pfn_order([(4, 2), (0, 2)]), ref.OK, [(0, 8)]),
    ("order nested", ref.encode_pfn_order([(0, 3), (4, 2)]), ref.E_OVERLAP, []),
    ("bitmap base misaligned", ref.encode_bitmap(2, 2, [0], 1), ref.E_RECORD, []),
    ("bitmap order 31", ref.encode_bitmap(0, 31, [0], 1), ref.E_RECORD, []),
    ("bitmap span = 2^52", ref.encode_bitmap(L - 8, 3, [0], 1), ref.OK, [(L - 8, 8)]),
    ("bitmap span > 2^52", ref.encode_bitmap(L - 8, 3, [0], 2), ref.E_RECORD, []),
    (
        "bitmap runs",
        ref.encode_bitmap(64, 1, [0, 1, 3, 9], 10),
        ref.OK,
        [(64, 4), (70, 2), (82, 2)],
    ),
    ("bitmap no bits", ref.encode_bitmap(0, 0, [], 0), ref.OK, []),
    ("bitmap 9 bits 1 byte", ref.encode_header(3, 9) + b"\xff", ref.E_COUNT, []),
    ("bitmap garbage past nbits", ref.encode_header(3, 3) + b"\xfc", ref.OK, [(2, 1)]),
    ("pfn_len 1 byte short", ref.encode_pfn_len([(1, 1)])[:-1], ref.E_COUNT, []),
    ("pfn_order count 2^32-1", ref.encode_pfn_order([(0, 0)], nr_records=U32 - 1), ref.E_COUNT, []),
    ("version 0", ref.encode_pfn_len([], version=0), ref.E_VERSION, []),
    ("version before encoding", ref.encode_header(9, 0, version=2), ref.E_VERSION, []),
    ("encoding 0", ref.encode_header(0, 0), ref.E_ENCODING, []),
    ("encoding 4", ref.encode_header(4, 0), ref.E_ENCODING, []),
    ("header only", ref.encode_header(1, 0), ref.OK, []),
]


@pytest.mark.parametrize(
    ("buf", "error", "extents"),
    [pytest.param(b, e, x, id=name) for name, b, e, x in BOUNDARIES],
)
def test_boundaries(buf: bytes, error: int, extents: list[tuple[int, int]]) -> None:
    assert ref.decode_report(buf) == (error, extents)  # the model says what the ABI says
    err, got, _ = c_decode(buf)
    assert (err, got) == (error, extents)


def test_short_header_is_chain_error() -> None:
    """No room for the header is a chain-layout error (found here; fixed in e4b35d0)."""
    full = ref.encode_pfn_len([(1, 1)])
    got = {n: c_decode(full[:n])[0] for n in range(ref.HDR_SIZE)}
    assert all(ref.decode_report(full[:n])[0] == ref.E_CHAIN for n in got)
    assert got == dict.fromkeys(got, ref.E_CHAIN)
