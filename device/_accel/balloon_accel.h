/*
 * balloon_accel.h - the C data plane of the vballoon device.
 *
 * This file is the whole interface: cffi parses it as its cdef (so it holds
 * only declarations and plain integer #defines) and balloon_accel.c
 * includes it. Frames are 4 KiB guest frames (gpa >> 12) throughout.
 * No function keeps state between calls; the caller owns every buffer.
 */

/* How a region's memory is given back (chosen by the caller from its backing). */
#define BALLOON_ACCEL_MODE_NONE 0	/* never discard (read-only, fd-less ROM) */
#define BALLOON_ACCEL_MODE_PUNCH_HOLE 1	/* fallocate(PUNCH_HOLE|KEEP_SIZE) on fd */
#define BALLOON_ACCEL_MODE_REMOVE 2	/* madvise(MADV_REMOVE): shared, no fd */
#define BALLOON_ACCEL_MODE_DONTNEED 3	/* madvise(MADV_DONTNEED): private anon */

#define BALLOON_ACCEL_FRAME_SHIFT 12
#define BALLOON_ACCEL_HUGETLBFS_MAGIC 0x958458f6

/**
 * struct balloon_accel_region - one guest RAM region
 * @gpa: guest physical start, 4 KiB aligned
 * @size: bytes, a multiple of @page_size
 * @hva: host address of our mapping of the region
 * @fd_offset: file offset of @gpa in @fd
 * @page_size: backing page size (4 KiB, or 2 MiB on hugetlbfs)
 * @ballooned: bitmap, one bit per frame of the region: set while inflated
 * @fd: backing file, or -1
 * @mode: BALLOON_ACCEL_MODE_*
 */
struct balloon_accel_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t hva;
	uint64_t fd_offset;
	uint64_t page_size;
	uint64_t *ballooned;
	int32_t fd;
	int32_t mode;
};

/* A run of frames. */
struct balloon_accel_extent {
	uint64_t start;
	uint64_t count;
};

/*
 * Map flag: a huge backing page may be completed by frames of earlier
 * inflate requests. Only safe when the driver must wait for the device before
 * reusing a deflated page (VIRTIO_BALLOON_F_MUST_TELL_HOST): otherwise an
 * inflate served before a queued deflate would complete a page the driver
 * is already writing again. Without it, only pages one run covers go back.
 */
#define BALLOON_ACCEL_MAP_ACROSS_REQUESTS 1

/*
 * struct balloon_accel_map - guest RAM as the data plane sees it
 * @regions: sorted by gpa, not overlapping, none reaching 2^64
 * @nregions: entries in @regions
 * @reserved: frame runs that are never the guest's RAM even where a region
 *	covers them (the PC's 640 KiB-1 MiB window: VGA, SMRAM, option ROMs,
 *	BIOS shadow), sorted, disjoint; treated exactly like frames outside
 *	guest RAM: refused, never discarded, never part of a discarded page
 * @nreserved: entries in @reserved
 * @flags: BALLOON_ACCEL_MAP_*
 */
struct balloon_accel_map {
	const struct balloon_accel_region *regions;
	uint32_t nregions;
	uint32_t nreserved;
	const struct balloon_accel_extent *reserved;
	uint32_t flags;
};

/* A guest-physical byte range, as free-page reports carry them. */
struct balloon_accel_gpa_range {
	uint64_t gpa;
	uint64_t len;
};

/* Added to (never reset) by every call that takes them. */
struct balloon_accel_counters {
	uint64_t frames;		/* distinct frames the request named */
	uint64_t frames_changed;	/* frames newly inflated / deflated */
	uint64_t bytes_discarded;	/* bytes covered by successful discards */
	uint64_t syscalls;		/* discard syscalls issued */
	uint64_t refused_ranges;	/* runs outside guest RAM, not discarded */
	uint64_t refused_frames;	/* frames in those runs */
	uint64_t errors;		/* failed syscalls */
	int64_t last_errno;		/* errno of the latest failure */
	uint64_t ns;			/* wall time spent in the call */
};

size_t balloon_accel_compact_pfns(const uint8_t *pfns, size_t count,
				  uint32_t *scratch,
				  struct balloon_accel_extent *out);
void balloon_accel_inflate(const struct balloon_accel_map *map,
			   const uint8_t *pfns, size_t count,
			   uint32_t *scratch,
			   struct balloon_accel_extent *runs,
			   struct balloon_accel_counters *c);
void balloon_accel_deflate(const struct balloon_accel_map *map,
			   const uint8_t *pfns, size_t count,
			   uint32_t *scratch,
			   struct balloon_accel_extent *runs,
			   struct balloon_accel_counters *c);
void balloon_accel_discard_gpa_ranges(const struct balloon_accel_map *map,
				      const struct balloon_accel_gpa_range *ranges,
				      size_t n,
				      struct balloon_accel_extent *scratch,
				      struct balloon_accel_counters *c);
void balloon_accel_discard_extents(const struct balloon_accel_map *map,
				   const struct balloon_accel_extent *ext,
				   size_t n,
				   struct balloon_accel_counters *c);
int balloon_accel_decode_report(const uint8_t *buf, size_t len,
				struct balloon_accel_extent *out,
				size_t max_out, size_t *nout,
				uint32_t *bad_record);
/* balloon_accel_range_report() flag: validate, but discard nothing (page poison). */
#define BALLOON_ACCEL_REPORT_VALIDATE_ONLY 1
int balloon_accel_range_report(const struct balloon_accel_map *map,
			       const uint8_t *buf, size_t len,
			       struct balloon_accel_extent *scratch,
			       size_t max_scratch,
			       struct balloon_accel_counters *c,
			       uint64_t *frames_discarded,
			       uint32_t *bad_record, uint32_t flags);
size_t balloon_accel_report_scratch_extents(size_t len);
void balloon_accel_trim_zero(const struct balloon_accel_map *map,
			     struct balloon_accel_counters *c);
int balloon_accel_fs_info(int fd, uint64_t *fs_magic, uint64_t *block_size);
void balloon_accel_mb(void);
void balloon_accel_rmb(void);
void balloon_accel_wmb(void);
