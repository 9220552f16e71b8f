// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * balloon_accel.c - per-frame work of the vballoon device.
 *
 * Everything here runs on data the guest wrote, so every count, shift and
 * addition is checked, and every loop is bounded by the caller-given sizes.
 * Callers (device/discard.py) size the scratch buffers; no function keeps
 * state between calls.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "balloon_accel.h"
#include "vballoon_report_abi.h"

_Static_assert(sizeof(struct vballoon_report_hdr) == VBALLOON_REPORT_HDR_SIZE,
	       "report header size is ABI");
_Static_assert(sizeof(struct vballoon_report_status) ==
	       VBALLOON_REPORT_STATUS_SIZE, "report status size is ABI");
_Static_assert(sizeof(struct vballoon_rec_pfn_len) == 16,
	       "PFN_LEN record size is ABI");

#define FRAME_SIZE (1ULL << BALLOON_ACCEL_FRAME_SHIFT)
#define PFN_LIMIT (1ULL << VBALLOON_PFN_ORDER_PFN_BITS)

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- bitmaps (one bit per frame, 64-bit words, host order) ---- */

/* Set bits [start, start + n); return how many were clear before. */
static uint64_t bitmap_set(uint64_t *bm, uint64_t start, uint64_t n)
{
	uint64_t changed = 0;

	while (n) {
		uint64_t w = start / 64, bit = start % 64;
		uint64_t take = 64 - bit < n ? 64 - bit : n;
		uint64_t mask = (take == 64 ? ~0ULL : ((1ULL << take) - 1)) << bit;

		changed += (uint64_t)__builtin_popcountll(~bm[w] & mask);
		bm[w] |= mask;
		start += take;
		n -= take;
	}
	return changed;
}

/* Clear bits [start, start + n); return how many were set before. */
static uint64_t bitmap_clear(uint64_t *bm, uint64_t start, uint64_t n)
{
	uint64_t changed = 0;

	while (n) {
		uint64_t w = start / 64, bit = start % 64;
		uint64_t take = 64 - bit < n ? 64 - bit : n;
		uint64_t mask = (take == 64 ? ~0ULL : ((1ULL << take) - 1)) << bit;

		changed += (uint64_t)__builtin_popcountll(bm[w] & mask);
		bm[w] &= ~mask;
		start += take;
		n -= take;
	}
	return changed;
}

static int bitmap_all_set(const uint64_t *bm, uint64_t start, uint64_t n)
{
	while (n) {
		uint64_t w = start / 64, bit = start % 64;
		uint64_t take = 64 - bit < n ? 64 - bit : n;
		uint64_t mask = (take == 64 ? ~0ULL : ((1ULL << take) - 1)) << bit;

		if ((bm[w] & mask) != mask)
			return 0;
		start += take;
		n -= take;
	}
	return 1;
}

/* ---- PFN arrays ---- */

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static int cmp_extent(const void *a, const void *b)
{
	const struct balloon_accel_extent *x = a, *y = b;

	return (x->start > y->start) - (x->start < y->start);
}

/**
 * balloon_accel_compact_pfns() - decode, sort, dedupe and coalesce PFNs
 * @pfns: @count little-endian 32-bit frame numbers (any alignment)
 * @count: number of PFNs
 * @scratch: room for @count uint32_t
 * @out: room for @count extents
 *
 * Return: number of extents written to @out, sorted, disjoint and
 * non-adjacent (adjacent runs are merged).
 */
size_t balloon_accel_compact_pfns(const uint8_t *pfns, size_t count,
				  uint32_t *scratch,
				  struct balloon_accel_extent *out)
{
	size_t i, n = 0;
	int sorted = 1;

	for (i = 0; i < count; i++) {
		uint32_t v;

		memcpy(&v, pfns + 4 * i, 4);
		scratch[i] = le32toh(v);
		if (i && scratch[i] < scratch[i - 1])
			sorted = 0;
	}
	/* The Linux driver sends ascending runs; only sort when needed. */
	if (!sorted)
		qsort(scratch, count, sizeof(*scratch), cmp_u32);
	for (i = 0; i < count; i++) {
		uint64_t pfn = scratch[i];

		if (n && pfn < out[n - 1].start + out[n - 1].count)
			continue;	/* duplicate */
		if (n && pfn == out[n - 1].start + out[n - 1].count) {
			out[n - 1].count++;
			continue;
		}
		out[n].start = pfn;
		out[n].count = 1;
		n++;
	}
	return n;
}

/* ---- regions ---- */

static uint64_t region_first(const struct balloon_accel_region *r)
{
	return r->gpa >> BALLOON_ACCEL_FRAME_SHIFT;
}

/* Frames are counted apart so that nothing here can wrap (see region_usable). */
static uint64_t region_end(const struct balloon_accel_region *r)
{
	return region_first(r) + (r->size >> BALLOON_ACCEL_FRAME_SHIFT);
}

/*
 * A region that is empty, wraps, or ends at 2^64 holds no frame at all: its
 * end would compute to a small number, and one report entry could then name
 * every frame of guest RAM. The caller refuses such regions already.
 */
static int region_usable(const struct balloon_accel_region *r)
{
	return r->size && r->gpa + r->size > r->gpa;
}

static uint64_t extent_end(const struct balloon_accel_extent *e)
{
	return e->count > UINT64_MAX - e->start ? UINT64_MAX : e->start + e->count;
}

/*
 * Find the region holding frame @f, as RAM the guest may own. If a region
 * holds it, return the region and set *@limit to the first frame after @f
 * where that stops (the region's end, or the start of a reserved run). If
 * none does (no region, or a reserved run), return NULL and set *@limit to
 * the first frame after @f that might be such RAM (UINT64_MAX if none).
 */
static const struct balloon_accel_region *
find_ram(const struct balloon_accel_map *map, uint64_t f, uint64_t *limit)
{
	const struct balloon_accel_region *found = NULL;
	uint64_t next = UINT64_MAX, reserved_next = UINT64_MAX;
	uint32_t i;

	for (i = 0; i < map->nreserved; i++) {
		const struct balloon_accel_extent *e = &map->reserved[i];

		if (f >= e->start && f < extent_end(e)) {
			*limit = extent_end(e);
			return NULL;
		}
		if (e->start > f && e->start < reserved_next)
			reserved_next = e->start;
	}
	for (i = 0; i < map->nregions; i++) {
		const struct balloon_accel_region *r = &map->regions[i];

		if (!region_usable(r))
			continue;
		if (f >= region_first(r) && f < region_end(r))
			found = r;
		else if (region_first(r) > f && region_first(r) < next)
			next = region_first(r);
	}
	if (!found) {
		*limit = next;
		return NULL;
	}
	*limit = region_end(found) < reserved_next ? region_end(found) : reserved_next;
	return found;
}

typedef void (*piece_fn)(const struct balloon_accel_region *r, uint64_t off,
			 uint64_t n, struct balloon_accel_counters *c);

/*
 * Split the frame run [start, start + count) along region boundaries and
 * call @fn on each piece inside a region (offset in frames from the region
 * start); count the pieces outside guest RAM as refused.
 */
static void for_each_piece(const struct balloon_accel_map *map, uint64_t start,
			   uint64_t count, piece_fn fn,
			   struct balloon_accel_counters *c)
{
	uint64_t f = start, end = start + count;

	if (end < start)	/* cannot happen for 52-bit frames; be safe */
		end = UINT64_MAX;
	while (f < end) {
		uint64_t limit;
		const struct balloon_accel_region *r = find_ram(map, f, &limit);
		uint64_t stop = limit < end ? limit : end;

		if (!r) {
			c->refused_ranges++;
			c->refused_frames += stop - f;
		} else {
			fn(r, f - region_first(r), stop - f, c);
		}
		f = stop;
	}
}

/* ---- discarding ---- */

/* Give back frames [off, off + n) of @r; must be whole backing pages. */
static void discard(const struct balloon_accel_region *r, uint64_t off,
		    uint64_t n, struct balloon_accel_counters *c)
{
	uint64_t boff = off << BALLOON_ACCEL_FRAME_SHIFT;
	uint64_t len = n << BALLOON_ACCEL_FRAME_SHIFT;
	void *addr = (void *)(uintptr_t)(r->hva + boff);
	int ret;

	switch (r->mode) {
	case BALLOON_ACCEL_MODE_PUNCH_HOLE:
		ret = fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				(off_t)(r->fd_offset + boff), (off_t)len);
		break;
	case BALLOON_ACCEL_MODE_REMOVE:
		ret = madvise(addr, len, MADV_REMOVE);
		break;
	case BALLOON_ACCEL_MODE_DONTNEED:
		ret = madvise(addr, len, MADV_DONTNEED);
		break;
	default:
		return;
	}
	c->syscalls++;
	if (ret) {
		c->errors++;
		c->last_errno = errno;
		return;
	}
	c->bytes_discarded += len;
}

static uint64_t page_frames(const struct balloon_accel_region *r)
{
	uint64_t pf = r->page_size >> BALLOON_ACCEL_FRAME_SHIFT;

	return pf ? pf : 1;
}

/*
 * Frames between the start of the backing page holding the region's first
 * frame and that frame. Backing pages are aligned in the file, and a region
 * need not start on one (vfio-user maps QEMU's sections as they are: guest
 * RAM above 1 MiB starts 1 MiB into its hugetlbfs file). A page that sticks
 * out of the region at either end holds memory the region does not describe:
 * it is never discarded.
 */
static uint64_t page_phase(const struct balloon_accel_region *r)
{
	return (r->fd_offset >> BALLOON_ACCEL_FRAME_SHIFT) % page_frames(r);
}

/* Discard the whole backing pages inside frames [off, off + n): shrink, never grow. */
static void discard_aligned(const struct balloon_accel_region *r, uint64_t off,
			    uint64_t n, struct balloon_accel_counters *c)
{
	uint64_t pf = page_frames(r), ph = page_phase(r);
	uint64_t s = (off + ph + pf - 1) / pf * pf - ph;
	uint64_t e = (off + n + ph) / pf * pf;

	/* e - ph without wrapping: no whole page ends inside the piece */
	if (e < ph)
		return;
	e -= ph;
	if (e > s)
		discard(r, s, e - s, c);
}

static void inflate_piece(const struct balloon_accel_region *r, uint64_t off,
			  uint64_t n, struct balloon_accel_counters *c)
{
	uint64_t pf = page_frames(r), ph, frames, hp, first, last, run = 0;
	uint64_t run_start = 0;

	c->frames_changed += bitmap_set(r->ballooned, off, n);
	if (r->mode == BALLOON_ACCEL_MODE_NONE)
		return;
	if (pf == 1) {
		discard(r, off, n, c);
		return;
	}
	/*
	 * Huge backing pages: a page goes back only once every frame in it is
	 * ballooned, which may have taken several requests (Linux sends at
	 * most 1 MiB per buffer). Merge consecutive complete pages.
	 */
	ph = page_phase(r);
	frames = r->size >> BALLOON_ACCEL_FRAME_SHIFT;
	first = (off + ph) / pf;
	last = (off + n - 1 + ph) / pf;
	for (hp = first; hp <= last; hp++) {
		/* page hp covers region frames [hp * pf - ph, + pf): whole ones only */
		int whole = hp * pf >= ph && hp * pf - ph + pf <= frames;

		if (whole && bitmap_all_set(r->ballooned, hp * pf - ph, pf)) {
			if (!run)
				run_start = hp * pf - ph;
			run++;
			continue;
		}
		if (run)
			discard(r, run_start, run * pf, c);
		run = 0;
	}
	if (run)
		discard(r, run_start, run * pf, c);
}

/*
 * Without BALLOON_ACCEL_MAP_ACROSS_REQUESTS: record the frames, but give back
 * only the backing pages this run covers whole (all of them on 4 KiB memory).
 */
static void inflate_piece_alone(const struct balloon_accel_region *r,
				uint64_t off, uint64_t n,
				struct balloon_accel_counters *c)
{
	c->frames_changed += bitmap_set(r->ballooned, off, n);
	if (r->mode != BALLOON_ACCEL_MODE_NONE)
		discard_aligned(r, off, n, c);
}

static void deflate_piece(const struct balloon_accel_region *r, uint64_t off,
			  uint64_t n, struct balloon_accel_counters *c)
{
	c->frames_changed += bitmap_clear(r->ballooned, off, n);
}

static void pfn_request(const struct balloon_accel_map *map,
			const uint8_t *pfns, size_t count, uint32_t *scratch,
			struct balloon_accel_extent *runs, piece_fn fn,
			struct balloon_accel_counters *c)
{
	uint64_t t0 = now_ns();
	size_t i, n = balloon_accel_compact_pfns(pfns, count, scratch, runs);

	for (i = 0; i < n; i++) {
		c->frames += runs[i].count;
		for_each_piece(map, runs[i].start, runs[i].count, fn, c);
	}
	c->ns += now_ns() - t0;
}

/**
 * balloon_accel_inflate() - balloon the frames of one inflate buffer
 * @map: guest RAM
 * @pfns: @count little-endian 32-bit PFNs, as the guest wrote them
 * @count: number of PFNs
 * @scratch: room for @count uint32_t
 * @runs: room for @count extents
 * @c: counters to add to
 *
 * Marks the frames ballooned and discards them: 4 KiB-backed runs at once,
 * huge backing pages once all their frames are ballooned (with
 * BALLOON_ACCEL_MAP_ACROSS_REQUESTS, by this or earlier requests; without
 * it, by one run of this request). Frames outside guest RAM or reserved are
 * refused and counted.
 */
void balloon_accel_inflate(const struct balloon_accel_map *map,
			   const uint8_t *pfns, size_t count, uint32_t *scratch,
			   struct balloon_accel_extent *runs,
			   struct balloon_accel_counters *c)
{
	piece_fn fn = map->flags & BALLOON_ACCEL_MAP_ACROSS_REQUESTS ?
		inflate_piece : inflate_piece_alone;

	pfn_request(map, pfns, count, scratch, runs, fn, c);
}

/**
 * balloon_accel_deflate() - take the frames of one deflate buffer out of the balloon
 * @map: guest RAM
 * @pfns: @count little-endian 32-bit PFNs
 * @count: number of PFNs
 * @scratch: room for @count uint32_t
 * @runs: room for @count extents
 * @c: counters to add to
 *
 * Discards nothing.
 */
void balloon_accel_deflate(const struct balloon_accel_map *map,
			   const uint8_t *pfns, size_t count, uint32_t *scratch,
			   struct balloon_accel_extent *runs,
			   struct balloon_accel_counters *c)
{
	pfn_request(map, pfns, count, scratch, runs, deflate_piece, c);
}

/* Sort extents, merge overlapping and adjacent ones; return the new count. */
static size_t merge_extents(struct balloon_accel_extent *e, size_t n)
{
	size_t i, m = 0;

	qsort(e, n, sizeof(*e), cmp_extent);
	for (i = 0; i < n; i++) {
		if (m && e[i].start <= e[m - 1].start + e[m - 1].count) {
			uint64_t end = e[i].start + e[i].count;

			if (end > e[m - 1].start + e[m - 1].count)
				e[m - 1].count = end - e[m - 1].start;
			continue;
		}
		e[m++] = e[i];
	}
	return m;
}

/**
 * balloon_accel_discard_gpa_ranges() - discard free-page report entries
 * @map: guest RAM
 * @ranges: @n guest-physical byte ranges
 * @n: number of ranges
 * @scratch: room for @n extents
 * @c: counters to add to
 *
 * Each range shrinks to whole 4 KiB frames, ranges are merged, and each
 * piece inside a region shrinks to whole backing pages before discarding.
 */
void balloon_accel_discard_gpa_ranges(const struct balloon_accel_map *map,
				      const struct balloon_accel_gpa_range *ranges,
				      size_t n,
				      struct balloon_accel_extent *scratch,
				      struct balloon_accel_counters *c)
{
	uint64_t t0 = now_ns();
	size_t i, m = 0;

	for (i = 0; i < n; i++) {
		uint64_t s = ranges[i].gpa, e = s + ranges[i].len;

		if (e < s) {	/* wraps: cannot be guest RAM */
			c->refused_ranges++;
			continue;
		}
		if (s > UINT64_MAX - (FRAME_SIZE - 1)) {	/* rounding up wraps */
			c->refused_ranges++;
			continue;
		}
		s = (s + FRAME_SIZE - 1) >> BALLOON_ACCEL_FRAME_SHIFT;
		e >>= BALLOON_ACCEL_FRAME_SHIFT;
		if (e <= s)
			continue;
		scratch[m].start = s;
		scratch[m].count = e - s;
		m++;
	}
	m = merge_extents(scratch, m);
	for (i = 0; i < m; i++) {
		c->frames += scratch[i].count;
		for_each_piece(map, scratch[i].start, scratch[i].count,
			       discard_aligned, c);
	}
	c->ns += now_ns() - t0;
}

/**
 * balloon_accel_discard_extents() - discard frame runs (reference path)
 * @map: guest RAM
 * @ext: @n runs of frames, any order
 * @n: number of runs
 * @c: counters to add to
 *
 * One syscall per run and region, no merging: what a caller that already
 * coalesced would issue. The benchmarks use it as the raw reference.
 */
void balloon_accel_discard_extents(const struct balloon_accel_map *map,
				   const struct balloon_accel_extent *ext,
				   size_t n, struct balloon_accel_counters *c)
{
	uint64_t t0 = now_ns();
	size_t i;

	for (i = 0; i < n; i++)
		for_each_piece(map, ext[i].start, ext[i].count,
			       discard_aligned, c);
	c->ns += now_ns() - t0;
}

/* ---- range reports ---- */

struct report {
	uint32_t encoding;
	uint32_t nr;
	uint32_t order;
	uint64_t base;
	const uint8_t *rec;
	size_t rec_len;
};

static int parse_header(const uint8_t *buf, size_t len, struct report *rp)
{
	struct vballoon_report_hdr h;

	if (len < sizeof(h))
		return VBALLOON_REPORT_E_CHAIN;	/* no room for a header */
	memcpy(&h, buf, sizeof(h));
	if (le16toh(h.version) != VBALLOON_REPORT_VERSION)
		return VBALLOON_REPORT_E_VERSION;
	rp->encoding = le16toh(h.encoding);
	rp->nr = le32toh(h.nr_records);
	rp->order = le32toh(h.order);
	rp->base = le64toh(h.base_pfn);
	rp->rec = buf + sizeof(h);
	rp->rec_len = len - sizeof(h);
	switch (rp->encoding) {
	case VBALLOON_ENC_PFN_LEN:
		if ((uint64_t)rp->nr * 16 > rp->rec_len)
			return VBALLOON_REPORT_E_COUNT;
		return VBALLOON_REPORT_OK;
	case VBALLOON_ENC_PFN_ORDER:
		if ((uint64_t)rp->nr * 8 > rp->rec_len)
			return VBALLOON_REPORT_E_COUNT;
		return VBALLOON_REPORT_OK;
	case VBALLOON_ENC_BITMAP:
		if (((uint64_t)rp->nr + 7) / 8 > rp->rec_len)
			return VBALLOON_REPORT_E_COUNT;
		if (rp->order > VBALLOON_MAX_ORDER ||
		    rp->base & ((1ULL << rp->order) - 1) ||
		    rp->base >= PFN_LIMIT ||
		    ((uint64_t)rp->nr << rp->order) > PFN_LIMIT - rp->base)
			return VBALLOON_REPORT_E_RECORD;
		return VBALLOON_REPORT_OK;
	default:
		return VBALLOON_REPORT_E_ENCODING;
	}
}

/* Decode record @i of a PFN_LEN or PFN_ORDER report into @e. */
static int decode_record(const struct report *rp, uint32_t i,
			 struct balloon_accel_extent *e)
{
	uint64_t pfn, count;

	if (rp->encoding == VBALLOON_ENC_PFN_LEN) {
		struct vballoon_rec_pfn_len r;

		memcpy(&r, rp->rec + (size_t)i * sizeof(r), sizeof(r));
		pfn = le64toh(r.pfn);
		count = le64toh(r.len);
		if (count == 0 || pfn >= PFN_LIMIT || count > PFN_LIMIT - pfn)
			return VBALLOON_REPORT_E_RECORD;
	} else {
		uint64_t w;
		unsigned int order;

		memcpy(&w, rp->rec + (size_t)i * 8, 8);
		w = le64toh(w);
		order = (unsigned int)(w >> VBALLOON_PFN_ORDER_SHIFT);
		pfn = w & VBALLOON_PFN_MASK;
		if (w & VBALLOON_PFN_ORDER_RSVD_MASK || order > VBALLOON_MAX_ORDER)
			return VBALLOON_REPORT_E_RECORD;
		count = 1ULL << order;
		if (pfn & (count - 1) || count > PFN_LIMIT - pfn)
			return VBALLOON_REPORT_E_RECORD;
	}
	e->start = pfn;
	e->count = count;
	return VBALLOON_REPORT_OK;
}

/* Little-endian bitmap word @w of @nbits bits; bits past the end read 0. */
static uint64_t bitmap_word(const uint8_t *bits, uint64_t nbits, uint64_t w)
{
	uint64_t v = 0, nbytes = (nbits + 7) / 8 - w * 8;

	memcpy(&v, bits + w * 8, nbytes < 8 ? nbytes : 8);
	v = le64toh(v);
	if ((w + 1) * 64 > nbits)
		v &= (1ULL << (nbits % 64)) - 1;
	return v;
}

/* First bit at or after @from that is set (@want) or clear; @nbits if none. */
static uint64_t bitmap_find(const uint8_t *bits, uint64_t nbits, uint64_t from,
			    int want)
{
	uint64_t w = from / 64, v;

	if (from >= nbits)
		return nbits;
	v = bitmap_word(bits, nbits, w);
	if (!want)
		v = ~v;
	v &= ~0ULL << (from % 64);
	while (!v) {
		w++;
		if (w * 64 >= nbits)
			return nbits;
		v = bitmap_word(bits, nbits, w);
		if (!want)
			v = ~v;
	}
	w = w * 64 + (uint64_t)__builtin_ctzll(v);
	return w < nbits ? w : nbits;
}

/*
 * Next run of a BITMAP report at or after bit *@pos; 0 when there is none.
 * Every loop iteration advances *@pos, so the walk ends after at most
 * nbits / 2 runs.
 */
static int bitmap_next_run(const struct report *rp, uint64_t *pos,
			   struct balloon_accel_extent *e)
{
	uint64_t b0 = bitmap_find(rp->rec, rp->nr, *pos, 1), b1;

	if (b0 >= rp->nr)
		return 0;
	b1 = bitmap_find(rp->rec, rp->nr, b0, 0);
	e->start = rp->base + (b0 << rp->order);
	e->count = (b1 - b0) << rp->order;
	*pos = b1;
	return 1;
}

/*
 * Decode the records of a PFN_LEN / PFN_ORDER report into @out, sorted and
 * merged where adjacent; overlapping records are an error.
 */
static int decode_records(const struct report *rp,
			  struct balloon_accel_extent *out, size_t max_out,
			  size_t *nout, uint32_t *bad)
{
	size_t i, m = 0;
	int err, sorted = 1;

	if (rp->nr > max_out)
		return VBALLOON_REPORT_E_COUNT;
	for (i = 0; i < rp->nr; i++) {
		err = decode_record(rp, (uint32_t)i, &out[i]);
		if (err) {
			*bad = (uint32_t)i;
			return err;
		}
		if (i && out[i].start < out[i - 1].start)
			sorted = 0;
	}
	/* A guest walking its free lists in address order needs no sort. */
	if (!sorted)
		qsort(out, rp->nr, sizeof(*out), cmp_extent);
	for (i = 0; i < rp->nr; i++) {
		if (m && out[i].start < out[m - 1].start + out[m - 1].count) {
			*bad = UINT32_MAX;
			return VBALLOON_REPORT_E_OVERLAP;
		}
		if (m && out[i].start == out[m - 1].start + out[m - 1].count) {
			out[m - 1].count += out[i].count;
			continue;
		}
		out[m++] = out[i];
	}
	*nout = m;
	return VBALLOON_REPORT_OK;
}

/**
 * balloon_accel_decode_report() - decode a range report without discarding
 * @buf: the device-readable part of the report: header, then records
 * @len: bytes in @buf
 * @out: receives the extents, sorted, disjoint, adjacent ones merged
 * @max_out: room in @out
 * @nout: receives the number of extents
 * @bad_record: receives the index of a bad record (UINT32_MAX: none/overlap)
 *
 * Return: VBALLOON_REPORT_OK or a VBALLOON_REPORT_E_* code.
 */
int balloon_accel_decode_report(const uint8_t *buf, size_t len,
				struct balloon_accel_extent *out,
				size_t max_out, size_t *nout,
				uint32_t *bad_record)
{
	struct report rp;
	uint64_t pos = 0;
	size_t m = 0;
	int err;

	*nout = 0;
	*bad_record = UINT32_MAX;
	err = parse_header(buf, len, &rp);
	if (err)
		return err;
	if (rp.encoding != VBALLOON_ENC_BITMAP)
		return decode_records(&rp, out, max_out, nout, bad_record);
	while (m < max_out && bitmap_next_run(&rp, &pos, &out[m]))
		m++;
	if (m == max_out && bitmap_find(rp.rec, rp.nr, pos, 1) < rp.nr)
		return VBALLOON_REPORT_E_COUNT;
	*nout = m;
	return VBALLOON_REPORT_OK;
}

/* Whether every frame of @e lies in guest RAM (possibly across regions). */
static int extent_in_ram(const struct balloon_accel_map *map,
			 const struct balloon_accel_extent *e)
{
	uint64_t f = e->start, end = extent_end(e), limit;

	while (f < end) {
		if (!find_ram(map, f, &limit))
			return 0;
		f = limit;
	}
	return 1;
}

/**
 * balloon_accel_report_scratch_extents() - scratch a range report of @len bytes needs
 * @len: bytes in the device-readable part of the report
 *
 * Return: the number of extents to pass as @max_scratch.
 */
size_t balloon_accel_report_scratch_extents(size_t len)
{
	return len / 8 + 1;
}

/**
 * balloon_accel_range_report() - validate a range report, then discard it
 * @map: guest RAM
 * @buf: header and records
 * @len: bytes in @buf
 * @scratch: balloon_accel_report_scratch_extents(@len) extents
 * @max_scratch: room in @scratch
 * @c: counters to add to
 * @frames_discarded: receives the frames returned to the host
 * @bad_record: receives the index of a bad record (UINT32_MAX: none)
 * @flags: BALLOON_ACCEL_REPORT_VALIDATE_ONLY, or 0
 *
 * The whole report is checked first (format, records, no more than
 * VBALLOON_REPORT_MAX_RUNS runs, every block inside guest RAM); a report
 * with any error discards nothing.
 *
 * Return: VBALLOON_REPORT_OK or a VBALLOON_REPORT_E_* code.
 */
int balloon_accel_range_report(const struct balloon_accel_map *map,
			       const uint8_t *buf, size_t len,
			       struct balloon_accel_extent *scratch,
			       size_t max_scratch,
			       struct balloon_accel_counters *c,
			       uint64_t *frames_discarded,
			       uint32_t *bad_record, uint32_t flags)
{
	uint64_t t0 = now_ns(), before, pos = 0, runs = 0;
	struct balloon_accel_extent e;
	struct report rp;
	size_t i, n = 0;
	int err;

	*frames_discarded = 0;
	*bad_record = UINT32_MAX;
	err = parse_header(buf, len, &rp);
	if (err)
		goto out;
	if (rp.encoding != VBALLOON_ENC_BITMAP) {
		err = decode_records(&rp, scratch, max_scratch, &n, bad_record);
		if (err)
			goto out;
		if (n > VBALLOON_REPORT_MAX_RUNS) {
			err = VBALLOON_REPORT_E_RUNS;
			goto out;
		}
		for (i = 0; i < n; i++) {
			if (!extent_in_ram(map, &scratch[i])) {
				err = VBALLOON_REPORT_E_RANGE;
				goto out;
			}
		}
	} else {
		/* Count first (bounded), so that no walk below is longer than the limit. */
		while (bitmap_next_run(&rp, &pos, &e)) {
			if (++runs > VBALLOON_REPORT_MAX_RUNS) {
				err = VBALLOON_REPORT_E_RUNS;
				goto out;
			}
		}
		pos = 0;
		while (bitmap_next_run(&rp, &pos, &e)) {
			if (!extent_in_ram(map, &e)) {
				err = VBALLOON_REPORT_E_RANGE;
				goto out;
			}
		}
		pos = 0;
	}
	if (flags & BALLOON_ACCEL_REPORT_VALIDATE_ONLY)
		goto out;
	before = c->bytes_discarded;
	if (rp.encoding != VBALLOON_ENC_BITMAP) {
		for (i = 0; i < n; i++) {
			c->frames += scratch[i].count;
			for_each_piece(map, scratch[i].start, scratch[i].count,
				       discard_aligned, c);
		}
	} else {
		while (bitmap_next_run(&rp, &pos, &e)) {
			c->frames += e.count;
			for_each_piece(map, e.start, e.count, discard_aligned, c);
		}
	}
	*frames_discarded = (c->bytes_discarded - before) >> BALLOON_ACCEL_FRAME_SHIFT;
out:
	c->ns += now_ns() - t0;
	return err;
}

/* ---- misc ---- */

/* Whether the @len bytes at @p (a multiple of 64, 8-byte aligned) are all zero. */
static int all_zero(const uint8_t *p, uint64_t len)
{
	const uint64_t *w = (const uint64_t *)(const void *)p;
	uint64_t i, n = len / 8;

	for (i = 0; i < n; i += 8) {
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] |
		    w[i + 6] | w[i + 7])
			return 0;
	}
	return 1;
}

/* Punch the all-zero whole backing pages among region frames [f, e). */
static void trim_extent(const struct balloon_accel_region *r, uint64_t f,
			uint64_t e, struct balloon_accel_counters *c)
{
	uint64_t pf = page_frames(r), ph = page_phase(r);
	uint64_t x = (f + ph + pf - 1) / pf * pf - ph, run = 0, run_start = 0;
	const uint8_t *base = (const uint8_t *)(uintptr_t)r->hva;

	for (; x + pf <= e; x += pf) {
		c->frames += pf;
		if (all_zero(base + (x << BALLOON_ACCEL_FRAME_SHIFT),
			     pf << BALLOON_ACCEL_FRAME_SHIFT)) {
			if (!run)
				run_start = x;
			run += pf;
			continue;
		}
		if (run)
			discard(r, run_start, run, c);
		run = 0;
	}
	if (run)
		discard(r, run_start, run, c);
}

/**
 * balloon_accel_trim_zero() - give back every all-zero page of guest RAM
 * @map: guest RAM
 * @c: counters to add to (frames: frames looked at)
 *
 * For a migration destination, which writes every page it receives, zero
 * pages included. A punched page reads back as zeros, so the guest sees no
 * change, but only while nothing writes guest RAM: call it with the VM
 * paused (a page found zero and written before its punch would lose the
 * write). Only file-backed regions (PUNCH_HOLE) are trimmed, and only their
 * allocated extents are read (SEEK_DATA/SEEK_HOLE: reading a hole of a shared
 * mapping would allocate it). Reserved frames need no care: a zero page
 * stays a zero page.
 */
void balloon_accel_trim_zero(const struct balloon_accel_map *map,
			     struct balloon_accel_counters *c)
{
	uint64_t t0 = now_ns();
	uint32_t i;

	for (i = 0; i < map->nregions; i++) {
		const struct balloon_accel_region *r = &map->regions[i];
		off_t start = (off_t)r->fd_offset, end = start + (off_t)r->size;
		off_t pos = start, data, hole;

		if (r->mode != BALLOON_ACCEL_MODE_PUNCH_HOLE)
			continue;
		while (pos < end) {
			data = lseek(r->fd, pos, SEEK_DATA);
			if (data < 0 || data >= end)
				break;	/* ENXIO: no data after pos */
			hole = lseek(r->fd, data, SEEK_HOLE);
			if (hole < 0 || hole > end)
				hole = end;
			trim_extent(r, (uint64_t)(data - start) >> BALLOON_ACCEL_FRAME_SHIFT,
				    (uint64_t)(hole - start) >> BALLOON_ACCEL_FRAME_SHIFT, c);
			pos = hole;
		}
	}
	c->ns += now_ns() - t0;
}

/**
 * balloon_accel_fs_info() - what kind of file backs @fd
 * @fd: file descriptor
 * @fs_magic: receives statfs f_type (BALLOON_ACCEL_HUGETLBFS_MAGIC for hugetlbfs)
 * @block_size: receives f_bsize: the huge page size on hugetlbfs
 *
 * Return: 0, or -errno.
 */
int balloon_accel_fs_info(int fd, uint64_t *fs_magic, uint64_t *block_size)
{
	struct statfs st;

	if (fstatfs(fd, &st))
		return -errno;
	*fs_magic = (uint64_t)st.f_type;
	*block_size = (uint64_t)st.f_bsize;
	return 0;
}

/* Barriers for the ring walk (which the device does in Python). */
void balloon_accel_mb(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void balloon_accel_rmb(void)
{
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
}

void balloon_accel_wmb(void)
{
	__atomic_thread_fence(__ATOMIC_RELEASE);
}
