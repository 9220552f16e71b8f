// SPDX-License-Identifier: GPL-2.0
/*
 * vballoon_report - batched free-memory range reports for the vballoon
 * virtio-balloon device.
 *
 * The module binds to the virtio balloon device (in place of virtio_balloon)
 * and negotiates only VBALLOON_F_RANGE_REPORT (vballoon_report_abi.h). With
 * that feature alone the device's queues are inflate (0), deflate (1) and
 * range-report (2); the transport numbers only named queues, so the unused
 * inflate and deflate queues are named too.
 *
 * On request (debugfs "trigger") it runs one pass:
 *  1. take free blocks from the buddy allocator, highest order first, down to
 *     min_order, with flags that never reclaim, warn or dip into reserves,
 *     within a budget (budget_mb, and budget_pct of the free memory);
 *  2. sort them and encode them as PFN_LEN, PFN_ORDER or BITMAP reports;
 *  3. add as many reports as the queue holds, notify the device once, wait
 *     until all come back, read their status; repeat until all are sent;
 *  4. free the blocks.
 * The blocks are held until the whole pass ends: freeing them earlier would
 * let the next batch allocate, and report, the same memory again.
 *
 * A report is one chain: a device-readable buffer with the header and the
 * records, then a device-writable 16-byte status. Indirect descriptors are
 * turned off, so a report takes two ring entries and a batch holds
 * (queue size / 2) reports.
 *
 * BITMAP and mixed orders: a bitmap report starts at its first block (frames
 * are sorted) and uses the smallest order among its blocks, so a block of a
 * larger order sets a run of bits; blocks are natural-aligned, so every block
 * is exactly a whole number of bits. It grows while the bitmap fits the
 * buffer. With bitmap_mode "per_order" each report holds blocks of one order
 * only (one bitmap per order instead).
 *
 * With init_on_alloc (the default of many distribution kernels) the page
 * allocator zeroes every block a pass takes: most of a pass's guest time,
 * and it makes untouched blocks resident on the host just before they are
 * discarded. Boot with init_on_alloc=0 to measure the reports alone.
 *
 * If the wait is interrupted or times out, the pass is abandoned, not freed:
 * the device still owns the buffers of the batch in flight and may still
 * discard its blocks, so those stay allocated until the device returns the
 * last report (a work item then frees them) or until the device is reset on
 * remove. Blocks of earlier batches and blocks never sent go back at once.
 * If the device never answers, what stays taken is that batch: at most one
 * pass's budget, by default half the free memory and at most 1 GiB
 * (budget_pct 50, budget_mb 1024). The blocks were taken __GFP_MOVABLE but
 * cannot move while a report names them.
 *
 * debugfs (/sys/kernel/debug/vballoon/): see vbr_debugfs_init().
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bitops.h>
#include <linux/debugfs.h>
#include <linux/gfp.h>
#include <linux/kernel.h>
#include <linux/ktime.h>
#include <linux/list.h>
#include <linux/list_sort.h>
#include <linux/minmax.h>
#include <linux/mm.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/nodemask.h>
#include <linux/pageblock-flags.h>
#include <linux/scatterlist.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_ring.h>
#include <linux/vmstat.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "vballoon_report_abi.h"

/* ABI frames are 4 KiB whatever PAGE_SIZE is. */
#define VBR_FRAME_SHIFT		12
#define VBR_PAGE_FRAME_SHIFT	(PAGE_SHIFT - VBR_FRAME_SHIFT)

#define VBR_HDR			VBALLOON_REPORT_HDR_SIZE
/* The device reads at most this much of a report's readable part. */
#define VBR_REPORT_MAX_BYTES	(256 * 1024)
#define VBR_REPORT_MIN_BYTES	64

/*
 * Free blocks for a pass: no direct reclaim, no kswapd wake-up, no retries,
 * no warnings, no emergency reserves (so no OOM either). Movable, so the
 * blocks come from the movable free lists where most free memory sits and
 * no pageblock is converted to unmovable; they are held only for the pass.
 */
#define VBR_GFP	(__GFP_MOVABLE | __GFP_NORETRY | __GFP_NOWARN | __GFP_NOMEMALLOC)

/* Status value meaning "the device did not write one". */
#define VBR_NO_STATUS		U32_MAX

enum vbr_vq {
	VBR_VQ_INFLATE,
	VBR_VQ_DEFLATE,
	VBR_VQ_REPORT,
	VBR_NR_VQS,
};

enum vbr_bitmap_mode {
	VBR_BITMAP_MIN,		/* one bitmap per span, smallest order in it */
	VBR_BITMAP_PER_ORDER,	/* one bitmap per order */
};

static const char * const vbr_encoding_names[] = {
	"pfn_len", "pfn_order", "bitmap",	/* VBALLOON_ENC_* - 1 */
};

static const char * const vbr_bitmap_mode_names[] = {
	[VBR_BITMAP_MIN] = "min_order",
	[VBR_BITMAP_PER_ORDER] = "per_order",
};

/* Deliberately malformed reports (debugfs "malformed"). */
enum vbr_bad {
	VBR_BAD_VERSION,
	VBR_BAD_ENCODING,
	VBR_BAD_COUNT,
	VBR_BAD_PAST_END,
	VBR_BAD_OVERLAP,
	VBR_BAD_MISALIGNED,
	VBR_BAD_BITMAP_PAST_END,
	VBR_BAD_SHORT_HEADER,
	VBR_NR_BAD,
};

static const char * const vbr_bad_names[] = {
	[VBR_BAD_VERSION] = "version",
	[VBR_BAD_ENCODING] = "encoding",
	[VBR_BAD_COUNT] = "count",
	[VBR_BAD_PAST_END] = "past_end",
	[VBR_BAD_OVERLAP] = "overlap",
	[VBR_BAD_MISALIGNED] = "misaligned",
	[VBR_BAD_BITMAP_PAST_END] = "bitmap_past_end",
	[VBR_BAD_SHORT_HEADER] = "short_header",
};

static const u32 vbr_bad_expect[] = {
	[VBR_BAD_VERSION] = VBALLOON_REPORT_E_VERSION,
	[VBR_BAD_ENCODING] = VBALLOON_REPORT_E_ENCODING,
	[VBR_BAD_COUNT] = VBALLOON_REPORT_E_COUNT,
	[VBR_BAD_PAST_END] = VBALLOON_REPORT_E_RANGE,
	[VBR_BAD_OVERLAP] = VBALLOON_REPORT_E_OVERLAP,
	[VBR_BAD_MISALIGNED] = VBALLOON_REPORT_E_RECORD,
	[VBR_BAD_BITMAP_PAST_END] = VBALLOON_REPORT_E_RANGE,
	[VBR_BAD_SHORT_HEADER] = VBALLOON_REPORT_E_CHAIN,
};

static unsigned int timeout_ms = 60000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "How long a pass waits for the device (ms)");

/* Counters of one pass, or summed over all passes. */
struct vbr_counters {
	u64 passes;
	u64 blocks;		/* blocks reported */
	u64 frames;		/* 4 KiB frames reported */
	u64 records;		/* records sent (BITMAP: bits) */
	u64 reports;		/* chains sent */
	u64 report_bytes;	/* readable bytes sent (headers + records) */
	u64 batches;		/* groups of reports sent together */
	u64 notifications;	/* notifications the device really got */
	u64 device_errors;	/* reports with a non-zero or missing status */
	u64 frames_discarded;	/* as the device's status says */
	u64 budget_frames;	/* last pass: what it was allowed to take */
	u64 free_frames;	/* last pass: free memory when it started */
	u64 buffers;		/* last pass: report buffers allocated */
	u64 buffer_bytes;	/* last pass: bytes in them */
	u64 alloc_ns;		/* taking and sorting the blocks */
	u64 encode_ns;		/* writing the reports */
	u64 wait_ns;		/* from notification to the last status */
	u64 free_ns;		/* giving the blocks back */
	u64 ns;			/* the whole pass */
	u64 blocks_by_order[NR_PAGE_ORDERS];	/* by page order */
};

struct vbr_slot {
	void *buf;		/* header + records */
	size_t cap;		/* bytes allocated at buf */
	size_t len;		/* bytes in this report */
	unsigned int used_len;	/* what the device said it wrote */
};

/* Everything a pass (or a malformed report) keeps until the device is done. */
struct vbr_pass {
	struct list_head blocks;	/* pages linked through page->lru */
	struct list_head *pos;		/* next block to encode */
	struct vbr_slot *slots;
	struct vballoon_report_status *status;	/* one per slot */
	unsigned int nslots;
	u16 encoding;
	enum vbr_bitmap_mode bitmap_mode;
	struct vbr_counters c;
};

struct vbr_bad_result {
	int valid;
	enum vbr_bad id;
	u32 error;
	u32 bad_record;
	u64 frames_discarded;
	unsigned int used_len;
	unsigned int block_order;	/* in 4 KiB frames */
	bool intact;
};

struct vbr_dev {
	struct virtio_device *vdev;
	struct virtqueue *report_vq;
	unsigned int capacity;		/* reports per batch */

	/* Serialises passes and malformed reports; protects @pass. */
	struct mutex lock;
	struct vbr_pass *pass;		/* in flight or abandoned */

	/* Protects the report queue, @inflight and @abandoned. */
	spinlock_t vq_lock;
	unsigned int inflight;
	bool abandoned;
	wait_queue_head_t wq;
	struct work_struct reap_work;
	bool removing;

	/* Parameters, set through debugfs. */
	u16 encoding;
	enum vbr_bitmap_mode bitmap_mode;
	u32 min_order;
	u64 budget_mb;
	u32 budget_pct;
	u32 report_bytes;
	u32 batch_reports;		/* reports per notification (0: a queue's worth) */

	/* Protects the counters and the last malformed result. */
	spinlock_t stats_lock;
	struct vbr_counters total;
	struct vbr_counters last;
	u64 abandoned_passes;
	u64 bad_sent;
	struct vbr_bad_result bad;

	struct dentry *dir;
};

/* ---- blocks ---- */

static struct page *vbr_page(const struct list_head *pos)
{
	return list_entry(pos, struct page, lru);
}

/* First 4 KiB frame of a block. */
static u64 vbr_frame(struct list_head *pos)
{
	return (u64)page_to_pfn(vbr_page(pos)) << VBR_PAGE_FRAME_SHIFT;
}

/* Order of a block in 4 KiB frames. */
static unsigned int vbr_order(struct list_head *pos)
{
	return page_private(vbr_page(pos)) + VBR_PAGE_FRAME_SHIFT;
}

static u64 vbr_frames(struct list_head *pos)
{
	return 1ULL << vbr_order(pos);
}

static int vbr_cmp_pfn(void *priv, const struct list_head *a,
		       const struct list_head *b)
{
	return page_to_pfn(vbr_page(a)) > page_to_pfn(vbr_page(b));
}

/* Larger orders first, then by frame. */
static int vbr_cmp_order_pfn(void *priv, const struct list_head *a,
			     const struct list_head *b)
{
	unsigned long oa = page_private(vbr_page(a));
	unsigned long ob = page_private(vbr_page(b));

	if (oa != ob)
		return oa < ob;
	return vbr_cmp_pfn(priv, a, b);
}

static void vbr_add_block(struct vbr_pass *pass, struct page *page,
			  unsigned int order)
{
	set_page_private(page, order);
	list_add_tail(&page->lru, &pass->blocks);
}

/* Give every block back; the device must be done with all of them. */
static void vbr_free_blocks(struct vbr_pass *pass)
{
	struct page *page, *next;
	unsigned int n = 0;

	list_for_each_entry_safe(page, next, &pass->blocks, lru) {
		unsigned int order = page_private(page);

		list_del(&page->lru);
		set_page_private(page, 0);
		__free_pages(page, order);
		if (!(++n % 256))
			cond_resched();
	}
}

/*
 * An abandoned pass keeps only the blocks of the reports still with the
 * device, [@first, pass->pos): earlier batches came back, later blocks were
 * never sent. Both go back to the allocator now.
 */
static void vbr_keep_in_flight(struct vbr_pass *pass, struct list_head *first)
{
	struct list_head *p = pass->blocks.next, *next;
	unsigned int n = 0;
	bool in_flight = false;

	for (; p != &pass->blocks; p = next) {
		struct page *page = vbr_page(p);
		unsigned int order = page_private(page);

		next = p->next;
		if (p == first)
			in_flight = true;
		if (p == pass->pos)
			in_flight = false;
		if (in_flight)
			continue;
		list_del(p);
		set_page_private(page, 0);
		__free_pages(page, order);
		if (!(++n % 256))
			cond_resched();
	}
	pass->pos = &pass->blocks;
}

/* Frames below the end of the highest node: where guest RAM ends. */
static u64 vbr_ram_end_frame(void)
{
	unsigned long end = 0;
	int nid;

	for_each_online_node(nid)
		end = max(end, pgdat_end_pfn(NODE_DATA(nid)));
	return (u64)end << VBR_PAGE_FRAME_SHIFT;
}

/*
 * Take free blocks, highest order first, until the budget is spent or the
 * allocator has no block of min_order left without reclaim.
 */
static void vbr_take_blocks(struct vbr_pass *pass, unsigned int min_order)
{
	u64 left = pass->c.budget_frames;
	unsigned int order, n = 0;

	for (order = MAX_PAGE_ORDER + 1; order-- > min_order;) {
		u64 frames = 1ULL << (order + VBR_PAGE_FRAME_SHIFT);

		while (left >= frames) {
			struct page *page = alloc_pages(VBR_GFP, order);

			if (!page)
				break;
			vbr_add_block(pass, page, order);
			pass->c.blocks_by_order[order]++;
			left -= frames;
			if (!(++n % 256)) {
				cond_resched();
				if (fatal_signal_pending(current))
					return;
			}
		}
	}
}

/* ---- encodings ---- */

static void vbr_count_block(struct vbr_pass *pass)
{
	pass->c.blocks++;
	pass->c.frames += vbr_frames(pass->pos);
	pass->pos = pass->pos->next;
}

/* One record per run of adjacent blocks, whatever their orders. */
static u32 vbr_encode_pfn_len(struct vbr_pass *pass, struct vbr_slot *s)
{
	struct vballoon_rec_pfn_len *rec = s->buf + VBR_HDR;
	u32 max = (s->cap - VBR_HDR) / sizeof(*rec), n = 0;
	struct list_head *head = &pass->blocks;

	max = min_t(u32, max, VBALLOON_REPORT_MAX_RUNS);
	while (n < max && pass->pos != head) {
		u64 start = vbr_frame(pass->pos), len = 0;

		do {
			len += vbr_frames(pass->pos);
			vbr_count_block(pass);
		} while (pass->pos != head && vbr_frame(pass->pos) == start + len);
		rec[n].pfn = cpu_to_le64(start);
		rec[n].len = cpu_to_le64(len);
		n++;
	}
	s->len = VBR_HDR + n * sizeof(*rec);
	return n;
}

/* One word per block. */
static u32 vbr_encode_pfn_order(struct vbr_pass *pass, struct vbr_slot *s)
{
	__le64 *rec = s->buf + VBR_HDR;
	u32 max = (s->cap - VBR_HDR) / sizeof(*rec), n = 0;

	max = min_t(u32, max, VBALLOON_REPORT_MAX_RUNS);
	while (n < max && pass->pos != &pass->blocks) {
		u64 w = vbr_frame(pass->pos) |
			(u64)vbr_order(pass->pos) << VBALLOON_PFN_ORDER_SHIFT;

		rec[n++] = cpu_to_le64(w);
		vbr_count_block(pass);
	}
	s->len = VBR_HDR + n * sizeof(*rec);
	return n;
}

/* Set @n bits from bit @start; bit i is bit (i % 8) of byte (i / 8). */
static void vbr_set_bits(u8 *map, u64 start, u64 n)
{
	for (; n && (start & 7); n--, start++)
		map[start >> 3] |= BIT(start & 7);
	if (n >= 8) {
		memset(map + (start >> 3), 0xff, n >> 3);
		start += n & ~7ULL;
		n &= 7;
	}
	for (; n; n--, start++)
		map[start >> 3] |= BIT(start & 7);
}

/*
 * A bitmap from the next block on: base = that block's frame (aligned to its
 * order, hence to every smaller one), order = the smallest order among the
 * blocks taken; take blocks while the bits up to the end of the last one fit.
 */
static u32 vbr_encode_bitmap(struct vbr_pass *pass, struct vbr_slot *s)
{
	struct vballoon_report_hdr *h = s->buf;
	u64 max_bits = (u64)(s->cap - VBR_HDR) * BITS_PER_BYTE;
	struct list_head *head = &pass->blocks, *p;
	u64 base = vbr_frame(pass->pos);
	u64 end = base + vbr_frames(pass->pos);
	unsigned int order = vbr_order(pass->pos);
	u8 *map = s->buf + VBR_HDR;
	u32 taken = 1;	/* blocks, hence at most as many runs: the ABI's limit */
	u64 nbits;

	for (p = pass->pos->next; p != head; p = p->next) {
		unsigned int o = min(order, vbr_order(p));
		u64 e = vbr_frame(p) + vbr_frames(p);

		if (taken++ >= VBALLOON_REPORT_MAX_RUNS)
			break;
		if (pass->bitmap_mode == VBR_BITMAP_PER_ORDER &&
		    vbr_order(p) != order)
			break;
		if ((e - base) >> o > max_bits)
			break;
		order = o;
		end = e;
	}
	nbits = (end - base) >> order;
	memset(map, 0, DIV_ROUND_UP(nbits, BITS_PER_BYTE));
	while (pass->pos != p) {
		vbr_set_bits(map, (vbr_frame(pass->pos) - base) >> order,
			     vbr_frames(pass->pos) >> order);
		vbr_count_block(pass);
	}
	h->order = cpu_to_le32(order);
	h->base_pfn = cpu_to_le64(base);
	s->len = VBR_HDR + DIV_ROUND_UP(nbits, BITS_PER_BYTE);
	return nbits;
}

/* Fill @s from the next unreported block on. */
static void vbr_encode(struct vbr_pass *pass, struct vbr_slot *s)
{
	struct vballoon_report_hdr *h = s->buf;
	u32 n;

	memset(h, 0, sizeof(*h));
	h->version = cpu_to_le16(VBALLOON_REPORT_VERSION);
	h->encoding = cpu_to_le16(pass->encoding);
	switch (pass->encoding) {
	case VBALLOON_ENC_PFN_LEN:
		n = vbr_encode_pfn_len(pass, s);
		break;
	case VBALLOON_ENC_PFN_ORDER:
		n = vbr_encode_pfn_order(pass, s);
		break;
	default:
		n = vbr_encode_bitmap(pass, s);
		break;
	}
	h->nr_records = cpu_to_le32(n);
	pass->c.records += n;
	pass->c.reports++;
	pass->c.report_bytes += s->len;
}

/*
 * How many blocks of @min_order or more a pass could take now: the free
 * blocks on the buddy lists plus the pages on the per-CPU lists. A racy
 * snapshot; a pass that finds more just needs more batches.
 */
static u64 vbr_free_blocks_bound(unsigned int min_order)
{
	unsigned int order;
	u64 n = NR_PAGE_ORDERS;	/* what the allocator may split meanwhile */
	int nid, z, cpu;

	for_each_online_node(nid) {
		for (z = 0; z < MAX_NR_ZONES; z++) {
			struct zone *zone = &NODE_DATA(nid)->node_zones[z];

			if (!populated_zone(zone))
				continue;
			/* Unlocked reads: an estimate is all it needs. */
			for (order = min_order; order < NR_PAGE_ORDERS; order++)
				n += READ_ONCE(zone->free_area[order].nr_free);
			for_each_online_cpu(cpu)
				n += READ_ONCE(per_cpu_ptr(zone->per_cpu_pageset,
							   cpu)->count);
		}
	}
	return n;
}

/*
 * Size the report buffers of a pass before it takes any memory. A PFN_LEN or
 * PFN_ORDER pass has at most one record per block it can take; a bitmap has
 * at most one bit per min_order block of RAM, and one report per order at
 * least in per_order mode. Every buffer holds at least one record.
 * Return: how many buffers are worth having (at most a batch); *@bytes: the
 * size of each.
 */
static unsigned int vbr_size_slots(struct vbr_dev *vb, u16 encoding,
				   enum vbr_bitmap_mode mode, u64 budget,
				   unsigned int min_order, u32 report_bytes,
				   size_t *bytes)
{
	unsigned int fo = min_order + VBR_PAGE_FRAME_SHIFT;
	u64 total, one, reports, extra = 0, blocks;

	blocks = min(budget >> fo, vbr_free_blocks_bound(min_order));
	switch (encoding) {
	case VBALLOON_ENC_PFN_LEN:
		total = blocks * sizeof(struct vballoon_rec_pfn_len);
		one = total;
		break;
	case VBALLOON_ENC_PFN_ORDER:
		total = blocks * sizeof(__le64);
		one = total;
		break;
	default:
		one = DIV_ROUND_UP(vbr_ram_end_frame() >> fo, BITS_PER_BYTE);
		total = mode == VBR_BITMAP_PER_ORDER ? 2 * one : one;
		extra = mode == VBR_BITMAP_PER_ORDER ?
			MAX_PAGE_ORDER + 1 - min_order : 1;
		break;
	}
	*bytes = clamp_t(u64, VBR_HDR + ALIGN(max_t(u64, one, 1), 8),
			 VBR_REPORT_MIN_BYTES, report_bytes);
	reports = DIV_ROUND_UP_ULL(max_t(u64, total, 1), *bytes - VBR_HDR);
	return min_t(u64, vb->capacity, reports + extra);
}

/* ---- passes ---- */

static void vbr_pass_free(struct vbr_pass *pass)
{
	unsigned int i;

	if (!pass)
		return;
	vbr_free_blocks(pass);
	if (pass->slots)
		for (i = 0; i < pass->nslots; i++)
			kfree(pass->slots[i].buf);
	kfree(pass->slots);
	kfree(pass->status);
	kfree(pass);
}

static struct vbr_pass *vbr_pass_alloc(unsigned int nslots, size_t slot_bytes)
{
	struct vbr_pass *pass;
	unsigned int i;

	pass = kzalloc(sizeof(*pass), GFP_KERNEL);
	if (!pass)
		return NULL;
	INIT_LIST_HEAD(&pass->blocks);
	pass->pos = &pass->blocks;
	pass->nslots = nslots;
	pass->slots = kcalloc(nslots, sizeof(*pass->slots), GFP_KERNEL);
	pass->status = kcalloc(nslots, sizeof(*pass->status), GFP_KERNEL);
	if (!pass->slots || !pass->status)
		goto err;
	for (i = 0; i < nslots; i++) {
		pass->slots[i].buf = kmalloc(slot_bytes, GFP_KERNEL | __GFP_NOWARN);
		if (!pass->slots[i].buf)
			goto err;
		pass->slots[i].cap = slot_bytes;
	}
	return pass;
err:
	vbr_pass_free(pass);
	return NULL;
}

/*
 * Add the first @n slots of @pass as reports and notify the device once.
 * Return: the number added (all unless the queue refused one).
 */
static unsigned int vbr_submit(struct vbr_dev *vb, struct vbr_pass *pass,
			       unsigned int n)
{
	struct scatterlist hdr_sg, status_sg, *sgs[2] = { &hdr_sg, &status_sg };
	unsigned int i;
	bool notify = false;
	int err = 0;

	spin_lock_irq(&vb->vq_lock);
	for (i = 0; i < n; i++) {
		struct vbr_slot *s = &pass->slots[i];

		pass->status[i].error = cpu_to_le32(VBR_NO_STATUS);
		pass->status[i].bad_record = 0;
		pass->status[i].frames_discarded = 0;
		s->used_len = 0;
		sg_init_one(&hdr_sg, s->buf, s->len);
		sg_init_one(&status_sg, &pass->status[i],
			    sizeof(pass->status[i]));
		err = virtqueue_add_sgs(vb->report_vq, sgs, 1, 1, s, GFP_ATOMIC);
		if (err)
			break;
		vb->inflight++;
	}
	if (i)
		notify = virtqueue_kick_prepare(vb->report_vq);
	spin_unlock_irq(&vb->vq_lock);
	if (err)
		dev_warn(&vb->vdev->dev, "queue refused a report: %d\n", err);
	if (i)
		pass->c.batches++;
	if (notify && virtqueue_notify(vb->report_vq))
		pass->c.notifications++;
	return i;
}

/* Used-buffer callback of the report queue (interrupt context). */
static void vbr_report_done(struct virtqueue *vq)
{
	struct vbr_dev *vb = vq->vdev->priv;
	struct vbr_slot *s;
	unsigned long flags;
	unsigned int len;
	bool reap;

	spin_lock_irqsave(&vb->vq_lock, flags);
	while ((s = virtqueue_get_buf(vq, &len))) {
		s->used_len = len;
		if (!WARN_ON_ONCE(!vb->inflight))
			vb->inflight--;
	}
	reap = vb->abandoned && !vb->inflight;
	spin_unlock_irqrestore(&vb->vq_lock, flags);
	if (reap)
		schedule_work(&vb->reap_work);
	wake_up(&vb->wq);
}

/*
 * Wait until the device returned every report in flight. On a signal, a
 * timeout or removal the pass is marked abandoned and stays in vb->pass.
 */
static int vbr_wait(struct vbr_dev *vb)
{
	unsigned int pending;
	long left;
	int err;

	left = wait_event_interruptible_timeout(vb->wq,
						!READ_ONCE(vb->inflight) ||
						READ_ONCE(vb->removing),
						msecs_to_jiffies(timeout_ms));
	spin_lock_irq(&vb->vq_lock);
	pending = vb->inflight;
	if (pending)
		vb->abandoned = true;
	spin_unlock_irq(&vb->vq_lock);
	if (!pending)
		return 0;
	if (left < 0)
		err = -EINTR;
	else if (READ_ONCE(vb->removing))
		err = -ENODEV;
	else
		err = -ETIMEDOUT;
	dev_warn(&vb->vdev->dev,
		 "%u reports still with the device (%d); their blocks stay allocated until they come back\n",
		 pending, err);
	spin_lock(&vb->stats_lock);
	vb->abandoned_passes++;
	spin_unlock(&vb->stats_lock);
	return err;
}

/* Frees an abandoned pass once the device has returned all of it. */
static void vbr_reap_work(struct work_struct *work)
{
	struct vbr_dev *vb = container_of(work, struct vbr_dev, reap_work);
	bool done;

	mutex_lock(&vb->lock);
	spin_lock_irq(&vb->vq_lock);
	done = vb->abandoned && !vb->inflight;
	if (done)
		vb->abandoned = false;
	spin_unlock_irq(&vb->vq_lock);
	if (done) {
		vbr_pass_free(vb->pass);
		vb->pass = NULL;
	}
	mutex_unlock(&vb->lock);
}

static void vbr_collect(struct vbr_pass *pass, unsigned int n)
{
	unsigned int i;

	for (i = 0; i < n; i++) {
		struct vballoon_report_status *st = &pass->status[i];

		if (pass->slots[i].used_len < sizeof(*st) ||
		    le32_to_cpu(st->error) != VBALLOON_REPORT_OK)
			pass->c.device_errors++;
		else
			pass->c.frames_discarded +=
				le64_to_cpu(st->frames_discarded);
	}
}

static void vbr_account(struct vbr_dev *vb, struct vbr_counters *c)
{
	unsigned int i;

	spin_lock(&vb->stats_lock);
	vb->last = *c;
	vb->total.passes += c->passes;
	vb->total.blocks += c->blocks;
	vb->total.frames += c->frames;
	vb->total.records += c->records;
	vb->total.reports += c->reports;
	vb->total.report_bytes += c->report_bytes;
	vb->total.batches += c->batches;
	vb->total.notifications += c->notifications;
	vb->total.device_errors += c->device_errors;
	vb->total.frames_discarded += c->frames_discarded;
	vb->total.alloc_ns += c->alloc_ns;
	vb->total.encode_ns += c->encode_ns;
	vb->total.wait_ns += c->wait_ns;
	vb->total.free_ns += c->free_ns;
	vb->total.ns += c->ns;
	for (i = 0; i < NR_PAGE_ORDERS; i++)
		vb->total.blocks_by_order[i] += c->blocks_by_order[i];
	spin_unlock(&vb->stats_lock);
}

/* One pass; called with vb->lock held. */
static int vbr_run_pass(struct vbr_dev *vb)
{
	u32 report_bytes = READ_ONCE(vb->report_bytes);
	u32 min_order = READ_ONCE(vb->min_order);
	u64 budget_mb = READ_ONCE(vb->budget_mb);
	u16 encoding = READ_ONCE(vb->encoding);
	enum vbr_bitmap_mode mode = READ_ONCE(vb->bitmap_mode);
	u64 t0 = ktime_get_ns(), t, free, budget;
	struct vbr_pass *pass;
	unsigned int nslots, n, sent;
	size_t slot_bytes;
	int err = 0;

	if (vb->pass)
		return -EBUSY;		/* an abandoned pass is still out */

	free = global_zone_page_state(NR_FREE_PAGES) << VBR_PAGE_FRAME_SHIFT;
	budget = div_u64(free * READ_ONCE(vb->budget_pct), 100);
	if (budget_mb)
		budget = min(budget, budget_mb << (20 - VBR_FRAME_SHIFT));

	/*
	 * Buffers first, while memory is plentiful (at most a batch of
	 * report_bytes each); every batch reuses them.
	 */
	nslots = vbr_size_slots(vb, encoding, mode, budget, min_order,
				report_bytes, &slot_bytes);
	if (READ_ONCE(vb->batch_reports))
		nslots = min(nslots, READ_ONCE(vb->batch_reports));
	pass = vbr_pass_alloc(nslots, slot_bytes);
	if (!pass)
		return -ENOMEM;
	pass->encoding = encoding;
	pass->bitmap_mode = mode;
	pass->c.passes = 1;
	pass->c.free_frames = free;
	pass->c.budget_frames = budget;
	pass->c.buffers = nslots;
	pass->c.buffer_bytes = (u64)nslots * slot_bytes;
	vb->pass = pass;

	t = ktime_get_ns();
	vbr_take_blocks(pass, min_order);
	list_sort(NULL, &pass->blocks,
		  pass->encoding == VBALLOON_ENC_BITMAP &&
		  pass->bitmap_mode == VBR_BITMAP_PER_ORDER ?
		  vbr_cmp_order_pfn : vbr_cmp_pfn);
	pass->pos = pass->blocks.next;
	pass->c.alloc_ns = ktime_get_ns() - t;

	while (pass->pos != &pass->blocks) {
		struct list_head *batch = pass->pos;

		t = ktime_get_ns();
		for (n = 0; n < pass->nslots && pass->pos != &pass->blocks; n++)
			vbr_encode(pass, &pass->slots[n]);
		pass->c.encode_ns += ktime_get_ns() - t;

		t = ktime_get_ns();
		sent = vbr_submit(vb, pass, n);
		err = vbr_wait(vb);
		if (err) {
			/* abandoned: vb->pass keeps what the device still has */
			vbr_keep_in_flight(pass, batch);
			return err;
		}
		pass->c.wait_ns += ktime_get_ns() - t;
		vbr_collect(pass, sent);
		if (sent < n) {
			err = -EIO;
			break;
		}
	}

	t = ktime_get_ns();
	vbr_free_blocks(pass);
	pass->c.free_ns = ktime_get_ns() - t;
	pass->c.ns = ktime_get_ns() - t0;
	vbr_account(vb, &pass->c);
	if (!err && pass->c.device_errors)
		err = -EIO;
	vb->pass = NULL;
	vbr_pass_free(pass);
	return err;
}

/* ---- malformed reports (test mode) ---- */

static void vbr_hdr(void *buf, u16 version, u16 encoding, u32 nr)
{
	struct vballoon_report_hdr *h = buf;

	memset(h, 0, sizeof(*h));
	h->version = cpu_to_le16(version);
	h->encoding = cpu_to_le16(encoding);
	h->nr_records = cpu_to_le32(nr);
}

static void vbr_pfn_len(void *buf, unsigned int i, u64 pfn, u64 len)
{
	struct vballoon_rec_pfn_len *rec = buf + VBR_HDR;

	rec[i].pfn = cpu_to_le64(pfn);
	rec[i].len = cpu_to_le64(len);
}

/*
 * Bytes a malformed report needs: 64, except for a bitmap from the block to
 * just past the end of RAM.
 */
static size_t vbr_bad_bytes(enum vbr_bad id, u64 blk, unsigned int order,
			    u64 ram_end)
{
	u64 bits;

	if (id != VBR_BAD_BITMAP_PAST_END)
		return 64;
	bits = DIV_ROUND_UP_ULL(ram_end - blk, 1ULL << order) + 1;
	if (bits > (VBR_REPORT_MAX_BYTES - VBR_HDR) * BITS_PER_BYTE)
		return 64;	/* only the bit past the end then */
	return VBR_HDR + DIV_ROUND_UP_ULL(bits, BITS_PER_BYTE);
}

/*
 * Write malformed report @id into @s. Valid records name only the block at
 * frame @blk (2^@order frames), which the caller owns.
 */
static void vbr_bad_build(enum vbr_bad id, struct vbr_slot *s, u64 blk,
			  unsigned int order, u64 ram_end)
{
	u64 n = 1ULL << order;
	u64 bit, base;

	memset(s->buf, 0, s->cap);
	s->len = VBR_HDR + sizeof(struct vballoon_rec_pfn_len);
	switch (id) {
	case VBR_BAD_VERSION:
		vbr_hdr(s->buf, 0x7f7f, VBALLOON_ENC_PFN_LEN, 1);
		vbr_pfn_len(s->buf, 0, blk, n);
		break;
	case VBR_BAD_ENCODING:
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, 0x7f, 1);
		vbr_pfn_len(s->buf, 0, blk, n);
		break;
	case VBR_BAD_COUNT:
		/* 1000 records said, one there. */
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, VBALLOON_ENC_PFN_LEN,
			1000);
		vbr_pfn_len(s->buf, 0, blk, n);
		break;
	case VBR_BAD_PAST_END:
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, VBALLOON_ENC_PFN_LEN, 2);
		vbr_pfn_len(s->buf, 0, blk, n);
		vbr_pfn_len(s->buf, 1, ram_end, 512);
		s->len += sizeof(struct vballoon_rec_pfn_len);
		break;
	case VBR_BAD_OVERLAP:
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, VBALLOON_ENC_PFN_LEN, 2);
		vbr_pfn_len(s->buf, 0, blk, n);
		vbr_pfn_len(s->buf, 1, blk + n / 2, n / 2);
		s->len += sizeof(struct vballoon_rec_pfn_len);
		break;
	case VBR_BAD_MISALIGNED:
		/* Order 1 at an odd frame: inside the block, not aligned. */
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, VBALLOON_ENC_PFN_ORDER, 1);
		*(__le64 *)(s->buf + VBR_HDR) =
			cpu_to_le64((blk + 1) | 1ULL << VBALLOON_PFN_ORDER_SHIFT);
		s->len = VBR_HDR + sizeof(__le64);
		break;
	case VBR_BAD_BITMAP_PAST_END:
		/* Bit 0: the block; the last bit: the first block past RAM. */
		bit = DIV_ROUND_UP_ULL(ram_end - blk, n);
		base = blk;
		if (VBR_HDR + DIV_ROUND_UP_ULL(bit + 1, BITS_PER_BYTE) > s->cap) {
			base = round_up(ram_end, n);
			bit = 0;
		}
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, VBALLOON_ENC_BITMAP,
			bit + 1);
		((struct vballoon_report_hdr *)s->buf)->order = cpu_to_le32(order);
		((struct vballoon_report_hdr *)s->buf)->base_pfn = cpu_to_le64(base);
		vbr_set_bits(s->buf + VBR_HDR, 0, 1);
		vbr_set_bits(s->buf + VBR_HDR, bit, 1);
		s->len = VBR_HDR + DIV_ROUND_UP_ULL(bit + 1, BITS_PER_BYTE);
		break;
	default:	/* VBR_BAD_SHORT_HEADER: 8 of the 24 header bytes */
		vbr_hdr(s->buf, VBALLOON_REPORT_VERSION, VBALLOON_ENC_PFN_LEN, 1);
		s->len = 8;
		break;
	}
}

static u8 vbr_pattern(unsigned long i)
{
	return 0xa0 | (i & 0x0f);	/* never 0, what a discarded page reads */
}

static void vbr_fill_block(struct page *page, unsigned int order)
{
	unsigned long i;

	for (i = 0; i < 1UL << order; i++)
		memset(page_address(page + i), vbr_pattern(i), PAGE_SIZE);
}

static bool vbr_block_intact(struct page *page, unsigned int order)
{
	unsigned long i;

	for (i = 0; i < 1UL << order; i++)
		if (memchr_inv(page_address(page + i), vbr_pattern(i), PAGE_SIZE))
			return false;
	return true;
}

/*
 * Send malformed report @id naming a block the module owns and filled with a
 * pattern; record the device's status and whether the block kept its data.
 * Called with vb->lock held.
 */
static int vbr_run_bad(struct vbr_dev *vb, enum vbr_bad id)
{
	u64 ram_end = vbr_ram_end_frame(), blk;
	struct vbr_bad_result r = { .valid = 1, .id = id };
	struct vbr_pass *pass;
	struct page *page = NULL;
	unsigned int order, sent;
	int err;

	if (vb->pass)
		return -EBUSY;
	/* At least 4 pages: "misaligned" names frames 1-2 of the block. */
	for (order = min(9, MAX_PAGE_ORDER); ; order--) {
		page = alloc_pages(GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN,
				   order);
		if (page || order == 2)
			break;
	}
	if (!page)
		return -ENOMEM;
	blk = (u64)page_to_pfn(page) << VBR_PAGE_FRAME_SHIFT;
	r.block_order = order + VBR_PAGE_FRAME_SHIFT;
	pass = vbr_pass_alloc(1, vbr_bad_bytes(id, blk, r.block_order, ram_end));
	if (!pass) {
		__free_pages(page, order);
		return -ENOMEM;
	}
	vbr_fill_block(page, order);
	vbr_add_block(pass, page, order);
	vbr_bad_build(id, &pass->slots[0], blk, r.block_order, ram_end);
	vb->pass = pass;

	sent = vbr_submit(vb, pass, 1);
	err = vbr_wait(vb);
	if (err)
		return err;	/* abandoned: vb->pass keeps it */
	r.error = le32_to_cpu(pass->status[0].error);
	r.bad_record = le32_to_cpu(pass->status[0].bad_record);
	r.frames_discarded = le64_to_cpu(pass->status[0].frames_discarded);
	r.used_len = pass->slots[0].used_len;
	r.intact = vbr_block_intact(page, order);

	spin_lock(&vb->stats_lock);
	vb->bad = r;
	vb->bad_sent += sent;
	spin_unlock(&vb->stats_lock);
	vb->pass = NULL;
	vbr_pass_free(pass);
	return sent ? 0 : -EIO;
}

/* ---- debugfs ---- */

static int vbr_min_order_get(void *data, u64 *val)
{
	*val = READ_ONCE(((struct vbr_dev *)data)->min_order);
	return 0;
}

static int vbr_min_order_set(void *data, u64 val)
{
	if (val > MAX_PAGE_ORDER)
		return -EINVAL;
	WRITE_ONCE(((struct vbr_dev *)data)->min_order, val);
	return 0;
}

DEFINE_DEBUGFS_ATTRIBUTE(vbr_min_order_fops, vbr_min_order_get,
			 vbr_min_order_set, "%llu\n");

static int vbr_budget_mb_get(void *data, u64 *val)
{
	*val = READ_ONCE(((struct vbr_dev *)data)->budget_mb);
	return 0;
}

static int vbr_budget_mb_set(void *data, u64 val)
{
	if (val > U32_MAX)
		return -EINVAL;
	WRITE_ONCE(((struct vbr_dev *)data)->budget_mb, val);
	return 0;
}

DEFINE_DEBUGFS_ATTRIBUTE(vbr_budget_mb_fops, vbr_budget_mb_get,
			 vbr_budget_mb_set, "%llu\n");

static int vbr_budget_pct_get(void *data, u64 *val)
{
	*val = READ_ONCE(((struct vbr_dev *)data)->budget_pct);
	return 0;
}

static int vbr_budget_pct_set(void *data, u64 val)
{
	if (!val || val > 100)
		return -EINVAL;
	WRITE_ONCE(((struct vbr_dev *)data)->budget_pct, val);
	return 0;
}

DEFINE_DEBUGFS_ATTRIBUTE(vbr_budget_pct_fops, vbr_budget_pct_get,
			 vbr_budget_pct_set, "%llu\n");

static int vbr_report_bytes_get(void *data, u64 *val)
{
	*val = READ_ONCE(((struct vbr_dev *)data)->report_bytes);
	return 0;
}

static int vbr_report_bytes_set(void *data, u64 val)
{
	if (val < VBR_REPORT_MIN_BYTES || val > VBR_REPORT_MAX_BYTES)
		return -EINVAL;
	WRITE_ONCE(((struct vbr_dev *)data)->report_bytes, val);
	return 0;
}

DEFINE_DEBUGFS_ATTRIBUTE(vbr_report_bytes_fops, vbr_report_bytes_get,
			 vbr_report_bytes_set, "%llu\n");

static int vbr_batch_reports_get(void *data, u64 *val)
{
	*val = READ_ONCE(((struct vbr_dev *)data)->batch_reports);
	return 0;
}

static int vbr_batch_reports_set(void *data, u64 val)
{
	struct vbr_dev *vb = data;

	if (val > vb->capacity)
		return -EINVAL;
	WRITE_ONCE(vb->batch_reports, val);
	return 0;
}

DEFINE_DEBUGFS_ATTRIBUTE(vbr_batch_reports_fops, vbr_batch_reports_get,
			 vbr_batch_reports_set, "%llu\n");

/* Copy a short word written to a debugfs file, NUL-terminated. */
static int vbr_get_word(const char __user *ubuf, size_t count, char *buf,
			size_t size)
{
	if (!count || count >= size)
		return -EINVAL;
	if (copy_from_user(buf, ubuf, count))
		return -EFAULT;
	buf[count] = '\0';
	return 0;
}

static ssize_t vbr_encoding_read(struct file *file, char __user *ubuf,
				 size_t count, loff_t *ppos)
{
	struct vbr_dev *vb = file->private_data;
	const char *name = vbr_encoding_names[READ_ONCE(vb->encoding) -
					      VBALLOON_ENC_PFN_LEN];
	char buf[16];
	int len = scnprintf(buf, sizeof(buf), "%s\n", name);

	return simple_read_from_buffer(ubuf, count, ppos, buf, len);
}

static ssize_t vbr_encoding_write(struct file *file, const char __user *ubuf,
				  size_t count, loff_t *ppos)
{
	struct vbr_dev *vb = file->private_data;
	char buf[16];
	int i, err;

	err = vbr_get_word(ubuf, count, buf, sizeof(buf));
	if (err)
		return err;
	i = sysfs_match_string(vbr_encoding_names, buf);
	if (i < 0)
		return i;
	WRITE_ONCE(vb->encoding, VBALLOON_ENC_PFN_LEN + i);
	return count;
}

static const struct file_operations vbr_encoding_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.read = vbr_encoding_read,
	.write = vbr_encoding_write,
	.llseek = default_llseek,
};

static ssize_t vbr_bitmap_mode_read(struct file *file, char __user *ubuf,
				    size_t count, loff_t *ppos)
{
	struct vbr_dev *vb = file->private_data;
	char buf[16];
	int len = scnprintf(buf, sizeof(buf), "%s\n",
			    vbr_bitmap_mode_names[READ_ONCE(vb->bitmap_mode)]);

	return simple_read_from_buffer(ubuf, count, ppos, buf, len);
}

static ssize_t vbr_bitmap_mode_write(struct file *file,
				     const char __user *ubuf, size_t count,
				     loff_t *ppos)
{
	struct vbr_dev *vb = file->private_data;
	char buf[16];
	int i, err;

	err = vbr_get_word(ubuf, count, buf, sizeof(buf));
	if (err)
		return err;
	i = sysfs_match_string(vbr_bitmap_mode_names, buf);
	if (i < 0)
		return i;
	WRITE_ONCE(vb->bitmap_mode, i);
	return count;
}

static const struct file_operations vbr_bitmap_mode_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.read = vbr_bitmap_mode_read,
	.write = vbr_bitmap_mode_write,
	.llseek = default_llseek,
};

static ssize_t vbr_trigger_write(struct file *file, const char __user *ubuf,
				 size_t count, loff_t *ppos)
{
	struct vbr_dev *vb = file->private_data;
	int err;

	if (mutex_lock_interruptible(&vb->lock))
		return -EINTR;
	err = READ_ONCE(vb->removing) ? -ENODEV : vbr_run_pass(vb);
	mutex_unlock(&vb->lock);
	return err ? err : count;
}

static const struct file_operations vbr_trigger_fops = {
	.owner = THIS_MODULE,
	.open = simple_open,
	.write = vbr_trigger_write,
	.llseek = noop_llseek,
};

static void vbr_show_counters(struct seq_file *m, const struct vbr_counters *c,
			      bool last)
{
	unsigned int i;

	seq_printf(m, "passes %llu\n", c->passes);
	seq_printf(m, "blocks %llu\n", c->blocks);
	seq_printf(m, "frames %llu\n", c->frames);
	seq_printf(m, "records %llu\n", c->records);
	seq_printf(m, "reports %llu\n", c->reports);
	seq_printf(m, "report_bytes %llu\n", c->report_bytes);
	seq_printf(m, "batches %llu\n", c->batches);
	seq_printf(m, "notifications %llu\n", c->notifications);
	seq_printf(m, "device_errors %llu\n", c->device_errors);
	seq_printf(m, "frames_discarded %llu\n", c->frames_discarded);
	if (last) {
		seq_printf(m, "free_frames %llu\n", c->free_frames);
		seq_printf(m, "budget_frames %llu\n", c->budget_frames);
		seq_printf(m, "buffers %llu\n", c->buffers);
		seq_printf(m, "buffer_bytes %llu\n", c->buffer_bytes);
	}
	seq_printf(m, "alloc_ns %llu\n", c->alloc_ns);
	seq_printf(m, "encode_ns %llu\n", c->encode_ns);
	seq_printf(m, "wait_ns %llu\n", c->wait_ns);
	seq_printf(m, "free_ns %llu\n", c->free_ns);
	seq_printf(m, "ns %llu\n", c->ns);
	for (i = 0; i < NR_PAGE_ORDERS; i++)
		seq_printf(m, "blocks_order_%u %llu\n",
			   i + VBR_PAGE_FRAME_SHIFT, c->blocks_by_order[i]);
}

static int vbr_counters_show(struct seq_file *m, void *unused)
{
	struct vbr_dev *vb = m->private;
	struct vbr_counters c;
	u64 abandoned, bad_sent;

	spin_lock(&vb->stats_lock);
	c = vb->total;
	abandoned = vb->abandoned_passes;
	bad_sent = vb->bad_sent;
	spin_unlock(&vb->stats_lock);
	vbr_show_counters(m, &c, false);
	seq_printf(m, "abandoned %llu\n", abandoned);
	seq_printf(m, "malformed_sent %llu\n", bad_sent);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vbr_counters);

static int vbr_last_pass_show(struct seq_file *m, void *unused)
{
	struct vbr_dev *vb = m->private;
	struct vbr_counters c;

	spin_lock(&vb->stats_lock);
	c = vb->last;
	spin_unlock(&vb->stats_lock);
	vbr_show_counters(m, &c, true);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vbr_last_pass);

static int vbr_info_show(struct seq_file *m, void *unused)
{
	struct vbr_dev *vb = m->private;

	seq_printf(m, "queue_index %u\n", vb->report_vq->index);
	seq_printf(m, "queue_size %u\n",
		   virtqueue_get_vring_size(vb->report_vq));
	seq_printf(m, "reports_per_batch %u\n", vb->capacity);
	seq_printf(m, "max_report_bytes %u\n", VBR_REPORT_MAX_BYTES);
	seq_printf(m, "ram_end_frame %llu\n", vbr_ram_end_frame());
	seq_printf(m, "page_frame_shift %u\n", VBR_PAGE_FRAME_SHIFT);
	seq_printf(m, "max_order %u\n", MAX_PAGE_ORDER + VBR_PAGE_FRAME_SHIFT);
	seq_printf(m, "features 0x%llx\n", vb->vdev->features);
	seq_printf(m, "init_on_alloc %d\n", want_init_on_alloc(0));
	seq_printf(m, "pending %u\n", READ_ONCE(vb->inflight));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vbr_info);

static int vbr_malformed_show(struct seq_file *m, void *unused)
{
	struct vbr_dev *vb = m->private;
	struct vbr_bad_result r;

	spin_lock(&vb->stats_lock);
	r = vb->bad;
	spin_unlock(&vb->stats_lock);
	if (!r.valid) {
		seq_puts(m, "case=none\n");
		return 0;
	}
	seq_printf(m,
		   "case=%s expected=%u error=%u bad_record=%u frames_discarded=%llu used_len=%u block_order=%u intact=%d\n",
		   vbr_bad_names[r.id], vbr_bad_expect[r.id], r.error,
		   r.bad_record, r.frames_discarded, r.used_len,
		   r.block_order, r.intact);
	return 0;
}

static int vbr_malformed_open(struct inode *inode, struct file *file)
{
	return single_open(file, vbr_malformed_show, inode->i_private);
}

static ssize_t vbr_malformed_write(struct file *file, const char __user *ubuf,
				   size_t count, loff_t *ppos)
{
	struct vbr_dev *vb = ((struct seq_file *)file->private_data)->private;
	char buf[24];
	int i, err;

	err = vbr_get_word(ubuf, count, buf, sizeof(buf));
	if (err)
		return err;
	i = sysfs_match_string(vbr_bad_names, buf);
	if (i < 0)
		return i;
	if (mutex_lock_interruptible(&vb->lock))
		return -EINTR;
	err = READ_ONCE(vb->removing) ? -ENODEV : vbr_run_bad(vb, i);
	mutex_unlock(&vb->lock);
	return err ? err : count;
}

static const struct file_operations vbr_malformed_fops = {
	.owner = THIS_MODULE,
	.open = vbr_malformed_open,
	.read = seq_read,
	.write = vbr_malformed_write,
	.llseek = seq_lseek,
	.release = single_release,
};

/*
 * /sys/kernel/debug/vballoon/ (vballoon-<device> for a second device):
 *   encoding      rw  pfn_len | pfn_order | bitmap
 *   bitmap_mode   rw  min_order | per_order
 *   min_order     rw  smallest block order taken (guest pages)
 *   budget_mb     rw  most MiB a pass takes (0: no limit; default 1024)
 *   budget_pct    rw  most percent of free memory a pass takes (1-100; default 50)
 *   report_bytes  rw  largest readable part of a report (64-262144)
 *   batch_reports rw  reports sent with one notification (0: as many as the
 *                     queue holds, its size / 2; the default)
 *   trigger       w   run a pass; returns when it is done
 *   counters      r   sums over all passes
 *   last_pass     r   the last pass alone
 *   info          r   queue and guest facts
 *   malformed     rw  write a case name to send it; read its result
 */
static int vbr_debugfs_init(struct vbr_dev *vb)
{
	struct dentry *dir;
	char name[48];

	dir = debugfs_create_dir("vballoon", NULL);
	if (IS_ERR(dir)) {
		snprintf(name, sizeof(name), "vballoon-%s",
			 dev_name(&vb->vdev->dev));
		dir = debugfs_create_dir(name, NULL);
		if (IS_ERR(dir))
			return PTR_ERR(dir);
	}
	vb->dir = dir;
	debugfs_create_file("encoding", 0644, dir, vb, &vbr_encoding_fops);
	debugfs_create_file("bitmap_mode", 0644, dir, vb,
			    &vbr_bitmap_mode_fops);
	debugfs_create_file_unsafe("min_order", 0644, dir, vb,
				   &vbr_min_order_fops);
	debugfs_create_file_unsafe("budget_mb", 0644, dir, vb,
				   &vbr_budget_mb_fops);
	debugfs_create_file_unsafe("budget_pct", 0644, dir, vb,
				   &vbr_budget_pct_fops);
	debugfs_create_file_unsafe("report_bytes", 0644, dir, vb,
				   &vbr_report_bytes_fops);
	debugfs_create_file_unsafe("batch_reports", 0644, dir, vb,
				   &vbr_batch_reports_fops);
	debugfs_create_file("trigger", 0200, dir, vb, &vbr_trigger_fops);
	debugfs_create_file("counters", 0444, dir, vb, &vbr_counters_fops);
	debugfs_create_file("last_pass", 0444, dir, vb, &vbr_last_pass_fops);
	debugfs_create_file("info", 0444, dir, vb, &vbr_info_fops);
	debugfs_create_file("malformed", 0644, dir, vb, &vbr_malformed_fops);
	return 0;
}

/* ---- driver ---- */

static int vbr_init_vqs(struct vbr_dev *vb)
{
	/* Named though unused, so that range-report gets index 2. */
	struct virtqueue_info info[VBR_NR_VQS] = {
		[VBR_VQ_INFLATE] = { "inflate" },
		[VBR_VQ_DEFLATE] = { "deflate" },
		[VBR_VQ_REPORT] = { "range-report", vbr_report_done },
	};
	struct virtqueue *vqs[VBR_NR_VQS];
	int err;

	err = virtio_find_vqs(vb->vdev, VBR_NR_VQS, vqs, info, NULL);
	if (err)
		return err;
	vb->report_vq = vqs[VBR_VQ_REPORT];
	return 0;
}

static int vbr_validate(struct virtio_device *vdev)
{
	/*
	 * Reports carry guest frame numbers, which mean nothing behind an
	 * IOMMU; and without indirect descriptors a report is always exactly
	 * two ring entries, so a batch size is known in advance.
	 */
	__virtio_clear_bit(vdev, VIRTIO_F_ACCESS_PLATFORM);
	__virtio_clear_bit(vdev, VIRTIO_RING_F_INDIRECT_DESC);
	return 0;
}

static int vbr_probe(struct virtio_device *vdev)
{
	struct vbr_dev *vb;
	int err;

	BUILD_BUG_ON(sizeof(struct vballoon_report_hdr) != VBR_HDR);
	BUILD_BUG_ON(sizeof(struct vballoon_report_status) !=
		     VBALLOON_REPORT_STATUS_SIZE);
	BUILD_BUG_ON(PAGE_SHIFT < VBR_FRAME_SHIFT);
	BUILD_BUG_ON(ARRAY_SIZE(vbr_bad_names) != VBR_NR_BAD);
	BUILD_BUG_ON(ARRAY_SIZE(vbr_bad_expect) != VBR_NR_BAD);

	if (!virtio_has_feature(vdev, VBALLOON_F_RANGE_REPORT)) {
		dev_info(&vdev->dev,
			 "device does not offer range reports (feature bit %u): not binding\n",
			 VBALLOON_F_RANGE_REPORT);
		return -ENODEV;
	}
	if (page_poisoning_enabled_static()) {
		/* A discarded page reads back as zeroes, not the poison. */
		dev_info(&vdev->dev, "page poisoning is on: not binding\n");
		return -ENODEV;
	}

	vb = kzalloc(sizeof(*vb), GFP_KERNEL);
	if (!vb)
		return -ENOMEM;
	vb->vdev = vdev;
	vdev->priv = vb;
	mutex_init(&vb->lock);
	spin_lock_init(&vb->vq_lock);
	spin_lock_init(&vb->stats_lock);
	init_waitqueue_head(&vb->wq);
	INIT_WORK(&vb->reap_work, vbr_reap_work);
	vb->encoding = VBALLOON_ENC_PFN_LEN;
	vb->bitmap_mode = VBR_BITMAP_MIN;
	vb->min_order = pageblock_order;
	/*
	 * A pass holds its blocks until the device returns its reports; if the
	 * device never does (vballoon died: QEMU 11.1 cannot reconnect), the
	 * blocks of the reports still out stay taken for good. So a pass takes
	 * at most half the free memory and at most 1 GiB unless told otherwise.
	 */
	vb->budget_pct = 50;
	vb->budget_mb = 1024;
	vb->report_bytes = VBR_REPORT_MAX_BYTES;

	err = vbr_init_vqs(vb);
	if (err)
		goto err_free;
	vb->capacity = virtqueue_get_vring_size(vb->report_vq) / 2;
	if (!vb->capacity) {
		err = -ENOSPC;
		goto err_del_vqs;
	}

	virtio_device_ready(vdev);

	err = vbr_debugfs_init(vb);
	if (err)
		goto err_reset;

	dev_info(&vdev->dev,
		 "range reports on queue %u: %u reports per notification\n",
		 vb->report_vq->index, vb->capacity);
	if (want_init_on_alloc(0))
		dev_info(&vdev->dev,
			 "init_on_alloc is on: every block a pass takes is zeroed first (init_on_alloc=0 avoids it)\n");
	return 0;

err_reset:
	virtio_reset_device(vdev);
err_del_vqs:
	vdev->config->del_vqs(vdev);
err_free:
	kfree(vb);
	return err;
}

static void vbr_remove(struct virtio_device *vdev)
{
	struct vbr_dev *vb = vdev->priv;

	/* A pass waiting for the device gives up (and is abandoned). */
	WRITE_ONCE(vb->removing, true);
	wake_up_all(&vb->wq);
	/* Waits for every running debugfs handler, so no pass runs after. */
	debugfs_remove_recursive(vb->dir);

	/* After the reset the device touches no buffer and no block. */
	virtio_reset_device(vdev);
	mutex_lock(&vb->lock);
	spin_lock_irq(&vb->vq_lock);
	while (virtqueue_detach_unused_buf(vb->report_vq))
		vb->inflight--;
	spin_unlock_irq(&vb->vq_lock);
	mutex_unlock(&vb->lock);
	vdev->config->del_vqs(vdev);
	cancel_work_sync(&vb->reap_work);

	vbr_pass_free(vb->pass);
	kfree(vb);
}

static int vbr_freeze(struct virtio_device *vdev)
{
	dev_warn(&vdev->dev, "suspend is not supported; unload the module first\n");
	return -EOPNOTSUPP;
}

static const unsigned int vbr_features[] = {
	VBALLOON_F_RANGE_REPORT,
};

static const struct virtio_device_id vbr_id_table[] = {
	{ VIRTIO_ID_BALLOON, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

/*
 * No MODULE_DEVICE_TABLE: the module is loaded by hand in place of
 * virtio_balloon, never automatically next to it.
 */
static struct virtio_driver vbr_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = vbr_id_table,
	.feature_table = vbr_features,
	.feature_table_size = ARRAY_SIZE(vbr_features),
	.validate = vbr_validate,
	.probe = vbr_probe,
	.remove = vbr_remove,
	.freeze = vbr_freeze,
};

module_virtio_driver(vbr_driver);

MODULE_DESCRIPTION("vballoon range reports: batched free-memory reports to the host");
MODULE_LICENSE("GPL");
