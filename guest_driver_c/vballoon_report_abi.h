/* SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause */
/*
 * vballoon range-report ABI, shared by the guest module (guest_driver_c/)
 * and the device's C accelerator (device/_accel/). All fields little-endian,
 * all frame numbers and lengths in 4 KiB frames whatever the page size.
 *
 * Feature bit: VBALLOON_F_RANGE_REPORT (16), device-specific. The balloon's
 * device-type range is bits 0-23: 0-5 are standard, 6 is claimed by the
 * wait-on-ack hinting proposal (virtio-spec #244) and 8 by crosvm's
 * working-set reporting. 16 sits in the middle of the free range, far from
 * both ends where the spec and other implementations grow.
 *
 * Queue: one range-report queue appended after the standard queues (inflate,
 * deflate, [stats], [free-page], [reporting], range-report), so the queue
 * compaction rule of the standard queues is unchanged.
 *
 * A report is one descriptor chain:
 *   device-readable: struct vballoon_report_hdr, then the records;
 *   device-writable: struct vballoon_report_status.
 * The device validates every record before discarding anything: a report
 * with any bad record discards nothing and gets a non-zero error.
 */
#ifndef VBALLOON_REPORT_ABI_H
#define VBALLOON_REPORT_ABI_H

#include <linux/types.h>

#define VBALLOON_F_RANGE_REPORT		16

#define VBALLOON_REPORT_VERSION		1

/* Encodings (vballoon_report_hdr.encoding). */
#define VBALLOON_ENC_PFN_LEN		1	/* struct vballoon_rec_pfn_len */
#define VBALLOON_ENC_PFN_ORDER		2	/* __le64: pfn | order << 58 */
#define VBALLOON_ENC_BITMAP		3	/* bit i: block base + (i << order) */

/* PFN_ORDER word: pfn in bits 0-51, bits 52-57 must be zero, order 58-63. */
#define VBALLOON_PFN_ORDER_PFN_BITS	52
#define VBALLOON_PFN_ORDER_SHIFT	58
#define VBALLOON_PFN_MASK		((1ULL << VBALLOON_PFN_ORDER_PFN_BITS) - 1)
#define VBALLOON_PFN_ORDER_RSVD_MASK	(0x3fULL << VBALLOON_PFN_ORDER_PFN_BITS)

/* Largest block order any encoding may name (2^30 frames = 4 TiB). */
#define VBALLOON_MAX_ORDER		30

/* Device-written status codes (vballoon_report_status.error). */
#define VBALLOON_REPORT_OK		0
#define VBALLOON_REPORT_E_VERSION	1	/* unknown header version */
#define VBALLOON_REPORT_E_ENCODING	2	/* unknown encoding */
#define VBALLOON_REPORT_E_COUNT		3	/* records do not fit the buffer */
#define VBALLOON_REPORT_E_RECORD	4	/* bad order, alignment, overflow */
#define VBALLOON_REPORT_E_RANGE		5	/* a record outside guest RAM */
#define VBALLOON_REPORT_E_OVERLAP	6	/* two records overlap */
#define VBALLOON_REPORT_E_CHAIN		7	/* chain layout (no header/status) */
#define VBALLOON_REPORT_E_RUNS		8	/* more than VBALLOON_REPORT_MAX_RUNS runs */

/*
 * The most runs of contiguous frames (after adjacent records merge) one
 * report may name: each run costs the device one discard call at least, and a
 * report is handled in one piece, so this bounds the work one report can
 * cause (about 0.1 s of 4 KiB punches). It is about the most PFN_ORDER
 * records a 256 KiB report holds (32765); a BITMAP report of scattered blocks
 * could otherwise name a million runs. A report over it discards nothing.
 */
#define VBALLOON_REPORT_MAX_RUNS	32768

/*
 * Page poison: when the driver negotiated VIRTIO_BALLOON_F_PAGE_POISON with a
 * non-zero poison_val, reported frames must keep the poison value and a
 * discarded frame reads back as zeros, so the device validates the report,
 * discards nothing and answers OK with frames_discarded 0 (as it returns
 * free page reports undiscarded then).
 */

/**
 * struct vballoon_report_hdr - start of the device-readable part of a report
 * @version: VBALLOON_REPORT_VERSION
 * @encoding: one of VBALLOON_ENC_*
 * @nr_records: number of records (BITMAP: number of bits)
 * @order: BITMAP only: order of the block each bit stands for
 * @base_pfn: BITMAP only: frame of bit 0, aligned to 1 << @order
 */
struct vballoon_report_hdr {
	__le16 version;
	__le16 encoding;
	__le32 nr_records;
	__le32 order;
	__le32 reserved;
	__le64 base_pfn;
};

/**
 * struct vballoon_rec_pfn_len - one PFN_LEN record
 * @pfn: first 4 KiB frame
 * @len: number of frames, at least 1
 */
struct vballoon_rec_pfn_len {
	__le64 pfn;
	__le64 len;
};

/**
 * struct vballoon_report_status - device-writable end of a report
 * @error: VBALLOON_REPORT_OK or VBALLOON_REPORT_E_*
 * @bad_record: index of the first bad record when @error names a record
 * @frames_discarded: frames the device returned to the host
 */
struct vballoon_report_status {
	__le32 error;
	__le32 bad_record;
	__le64 frames_discarded;
};

#define VBALLOON_REPORT_HDR_SIZE	24
#define VBALLOON_REPORT_STATUS_SIZE	16

#endif /* VBALLOON_REPORT_ABI_H */
