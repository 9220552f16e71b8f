// SPDX-License-Identifier: GPL-2.0
/*
 * vballoon_hostile - a hostile virtio-balloon driver, for the VM tests only.
 *
 * It binds to the balloon device in place of virtio_balloon (load it by hand;
 * virtio_balloon must not be loaded) and, on request, does what a guest that
 * means harm, or a broken driver, can do to a balloon device: descriptor
 * chains that loop, wrap the address space or point outside guest RAM, an
 * avail index that jumps ahead, PFNs beyond RAM or in the PC's legacy window,
 * and half of a 2 MiB page ballooned before a reboot and the other half
 * after it.
 *
 * Three canaries show whether the host changed memory it had no right to:
 * a 2 MiB range the guest reserved with memmap= (canary_phys) and filled
 * with a pattern; guest page 0 (the BIOS data area); and the BIOS shadow at
 * 768 KiB-1 MiB. The last two are read at probe and compared later.
 *
 * debugfs (/sys/kernel/debug/vballoon_hostile/):
 *   case    w  run a case (names below); returns when the device had time to react
 *   canary  w  "fill": write the pattern into the canary range
 *           r  "canary ok|bad@<offset> page0 ok|bad bios ok|bad"
 *   result  r  what the last case saw: used entries the device returned
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/virtio.h>
#include <linux/virtio_balloon.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>

#define VBH_FRAME_SHIFT	12
#define VBH_CANARY_SIZE	SZ_2M
#define VBH_BIOS_START	0xc0000UL
#define VBH_BIOS_SIZE	0x40000UL
#define VBH_HALF	(VBH_CANARY_SIZE >> VBH_FRAME_SHIFT >> 1)

static unsigned long canary_phys;
module_param(canary_phys, ulong, 0444);
MODULE_PARM_DESC(canary_phys, "A 2 MiB range reserved with memmap= (2 MiB aligned)");

struct vbh_dev {
	struct virtio_device *vdev;
	struct virtqueue *inflate_vq;
	wait_queue_head_t acked;
	struct mutex lock;
	void *canary;
	u8 *page0;		/* page 0 at probe */
	u8 *bios;		/* the BIOS shadow at probe */
	int used_delta;		/* last case: used entries returned */
	struct dentry *dir;
};

static u64 vbh_pattern(unsigned long offset)
{
	return (canary_phys + offset) ^ 0xc0ffee5a5a5a5a5aULL;
}

/* ---- well-formed requests through the virtio API ---- */

static void vbh_acked(struct virtqueue *vq)
{
	struct vbh_dev *vb = vq->vdev->priv;

	wake_up(&vb->acked);
}

/* One inflate buffer of @n PFNs; wait (5 s at most) until the device returns it. */
static int vbh_inflate(struct vbh_dev *vb, const u32 *pfns, unsigned int n)
{
	struct scatterlist sg;
	unsigned int len;
	__le32 *buf;
	unsigned int i;
	int err;

	buf = kmalloc_array(n, sizeof(*buf), GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	for (i = 0; i < n; i++)
		buf[i] = cpu_to_le32(pfns[i]);
	sg_init_one(&sg, buf, n * sizeof(*buf));
	err = virtqueue_add_outbuf(vb->inflate_vq, &sg, 1, buf, GFP_KERNEL);
	if (err)
		goto out;
	virtqueue_kick(vb->inflate_vq);
	if (!wait_event_timeout(vb->acked, virtqueue_get_buf(vb->inflate_vq, &len),
				5 * HZ)) {
		/* The device kept it: it may still read the buffer. */
		return -ETIMEDOUT;
	}
	vb->used_delta = 1;
out:
	kfree(buf);
	return err;
}

static int vbh_inflate_range(struct vbh_dev *vb, u64 first, unsigned int n)
{
	u32 *pfns = kmalloc_array(n, sizeof(*pfns), GFP_KERNEL);
	unsigned int i;
	int err;

	if (!pfns)
		return -ENOMEM;
	for (i = 0; i < n; i++)
		pfns[i] = (u32)(first + i);
	err = vbh_inflate(vb, pfns, n);
	kfree(pfns);
	return err;
}

/* ---- raw writes into the ring, behind the virtio core's back ---- */

static void vbh_desc(struct vbh_dev *vb, struct vring *vr, u16 i, u64 addr,
		     u32 len, u16 flags, u16 next)
{
	vr->desc[i].addr = cpu_to_virtio64(vb->vdev, addr);
	vr->desc[i].len = cpu_to_virtio32(vb->vdev, len);
	vr->desc[i].flags = cpu_to_virtio16(vb->vdev, flags);
	vr->desc[i].next = cpu_to_virtio16(vb->vdev, next);
}

/*
 * Make descriptor @head available (the avail index moves by @step), notify,
 * and give the device half a second; count what it returned.
 */
static void vbh_publish(struct vbh_dev *vb, struct vring *vr, u16 head, u16 step)
{
	u16 idx = virtio16_to_cpu(vb->vdev, vr->avail->idx);
	u16 used = virtio16_to_cpu(vb->vdev, vr->used->idx);

	vr->avail->ring[idx % vr->num] = cpu_to_virtio16(vb->vdev, head);
	virtio_wmb(true);
	vr->avail->idx = cpu_to_virtio16(vb->vdev, idx + step);
	virtio_mb(true);
	virtqueue_notify(vb->inflate_vq);
	msleep(500);
	vb->used_delta = (u16)(virtio16_to_cpu(vb->vdev, vr->used->idx) - used);
}

static int vbh_raw(struct vbh_dev *vb, const char *name)
{
	/* The core hands out a const view; this driver writes what it likes. */
	struct vring *vr = (struct vring *)virtqueue_get_vring(vb->inflate_vq);
	u16 head = vr->num - 1;	/* far from what the core has used */
	u64 buf = virt_to_phys(vb->page0);

	if (!strcmp(name, "loop")) {
		vbh_desc(vb, vr, head, buf, 4, VRING_DESC_F_NEXT, head);
		vbh_publish(vb, vr, head, 1);
	} else if (!strcmp(name, "wrap")) {
		vbh_desc(vb, vr, head, ~0ULL - 0xfff, 0x2000, 0, 0);
		vbh_publish(vb, vr, head, 1);
	} else if (!strcmp(name, "unmapped")) {
		vbh_desc(vb, vr, head, 1ULL << 40, 1024, 0, 0);
		vbh_publish(vb, vr, head, 1);
	} else if (!strcmp(name, "avail_jump")) {
		vbh_desc(vb, vr, head, buf, 4, 0, 0);
		vbh_publish(vb, vr, head, 1000);
	} else {
		return -EINVAL;
	}
	return 0;
}

static int vbh_run_case(struct vbh_dev *vb, const char *name)
{
	static const u32 beyond[] = { 0xffffffff, 0xfffffff0, 0x7fffffff, 0x01000000 };
	u64 canary = canary_phys >> VBH_FRAME_SHIFT;

	vb->used_delta = 0;
	if (!strcmp(name, "pfns_beyond_ram"))
		return vbh_inflate(vb, beyond, ARRAY_SIZE(beyond));
	if (!strcmp(name, "pfns_legacy_window"))
		return vbh_inflate_range(vb, 0xa0, 0x60);
	if (!strcmp(name, "first_2m_page"))	/* page 0 and the window with it */
		return vbh_inflate_range(vb, 0, VBH_CANARY_SIZE >> VBH_FRAME_SHIFT);
	if (!strcmp(name, "half_page_first"))
		return vbh_inflate_range(vb, canary, VBH_HALF);
	if (!strcmp(name, "half_page_second"))
		return vbh_inflate_range(vb, canary + VBH_HALF, VBH_HALF);
	return vbh_raw(vb, name);
}

/* ---- debugfs ---- */

static ssize_t vbh_case_write(struct file *file, const char __user *ubuf,
			      size_t count, loff_t *ppos)
{
	struct vbh_dev *vb = file->private_data;
	char name[32];
	int err;

	if (count >= sizeof(name))
		return -EINVAL;
	if (copy_from_user(name, ubuf, count))
		return -EFAULT;
	name[count] = '\0';
	strim(name);
	mutex_lock(&vb->lock);
	err = vbh_run_case(vb, name);
	mutex_unlock(&vb->lock);
	return err ? err : count;
}

static const struct file_operations vbh_case_fops = {
	.open = simple_open,
	.write = vbh_case_write,
	.llseek = noop_llseek,
};

static ssize_t vbh_canary_write(struct file *file, const char __user *ubuf,
				size_t count, loff_t *ppos)
{
	struct vbh_dev *vb = file->private_data;
	u64 *p = vb->canary;
	unsigned long i;

	for (i = 0; i < VBH_CANARY_SIZE / sizeof(*p); i++)
		p[i] = vbh_pattern(i * sizeof(*p));
	return count;
}

static ssize_t vbh_canary_read(struct file *file, char __user *ubuf,
			       size_t count, loff_t *ppos)
{
	struct vbh_dev *vb = file->private_data;
	const u64 *p = vb->canary;
	unsigned long i, bad = ULONG_MAX;
	char out[96];
	u8 *now;
	bool page0, bios;
	int n;

	for (i = 0; i < VBH_CANARY_SIZE / sizeof(*p); i++) {
		if (p[i] != vbh_pattern(i * sizeof(*p))) {
			bad = i * sizeof(*p);
			break;
		}
	}
	now = memremap(0, PAGE_SIZE, MEMREMAP_WB);
	page0 = now && !memcmp(now, vb->page0 + PAGE_SIZE, PAGE_SIZE);
	if (now)
		memunmap(now);
	now = memremap(VBH_BIOS_START, VBH_BIOS_SIZE, MEMREMAP_WB);
	bios = now && !memcmp(now, vb->bios, VBH_BIOS_SIZE);
	if (now)
		memunmap(now);
	if (bad == ULONG_MAX)
		n = scnprintf(out, sizeof(out), "canary ok");
	else
		n = scnprintf(out, sizeof(out), "canary bad@%#lx", bad);
	n += scnprintf(out + n, sizeof(out) - n, " page0 %s bios %s\n",
		       page0 ? "ok" : "bad", bios ? "ok" : "bad");
	return simple_read_from_buffer(ubuf, count, ppos, out, n);
}

static const struct file_operations vbh_canary_fops = {
	.open = simple_open,
	.read = vbh_canary_read,
	.write = vbh_canary_write,
	.llseek = default_llseek,
};

static int vbh_result_show(struct seq_file *m, void *unused)
{
	struct vbh_dev *vb = m->private;

	seq_printf(m, "used %d\n", vb->used_delta);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vbh_result);

/* ---- the driver ---- */

static int vbh_validate(struct virtio_device *vdev)
{
	/* Raw descriptors hold guest-physical addresses, one per entry. */
	__virtio_clear_bit(vdev, VIRTIO_F_ACCESS_PLATFORM);
	__virtio_clear_bit(vdev, VIRTIO_RING_F_INDIRECT_DESC);
	__virtio_clear_bit(vdev, VIRTIO_RING_F_EVENT_IDX);
	return 0;
}

static int vbh_probe(struct virtio_device *vdev)
{
	struct virtqueue_info info[2] = {
		{ "inflate", vbh_acked },
		{ "deflate" },
	};
	struct virtqueue *vqs[2];
	struct vbh_dev *vb;
	void *snap;
	int err;

	if (!canary_phys || !IS_ALIGNED(canary_phys, VBH_CANARY_SIZE))
		return -EINVAL;
	vb = kzalloc(sizeof(*vb), GFP_KERNEL);
	if (!vb)
		return -ENOMEM;
	vdev->priv = vb;
	vb->vdev = vdev;
	init_waitqueue_head(&vb->acked);
	mutex_init(&vb->lock);
	err = -ENOMEM;
	/* One page of buffer for raw descriptors, then page 0's copy. */
	vb->page0 = kmalloc(2 * PAGE_SIZE, GFP_KERNEL);
	vb->bios = vmalloc(VBH_BIOS_SIZE);
	if (!vb->page0 || !vb->bios)
		goto err_free;
	snap = memremap(0, PAGE_SIZE, MEMREMAP_WB);
	if (!snap)
		goto err_free;
	memcpy(vb->page0 + PAGE_SIZE, snap, PAGE_SIZE);
	memunmap(snap);
	snap = memremap(VBH_BIOS_START, VBH_BIOS_SIZE, MEMREMAP_WB);
	if (!snap)
		goto err_free;
	memcpy(vb->bios, snap, VBH_BIOS_SIZE);
	memunmap(snap);
	vb->canary = memremap(canary_phys, VBH_CANARY_SIZE, MEMREMAP_WB);
	if (!vb->canary)
		goto err_free;

	err = virtio_find_vqs(vdev, 2, vqs, info, NULL);
	if (err)
		goto err_unmap;
	vb->inflate_vq = vqs[0];
	virtio_device_ready(vdev);

	vb->dir = debugfs_create_dir(KBUILD_MODNAME, NULL);
	debugfs_create_file("case", 0200, vb->dir, vb, &vbh_case_fops);
	debugfs_create_file("canary", 0600, vb->dir, vb, &vbh_canary_fops);
	debugfs_create_file("result", 0400, vb->dir, vb, &vbh_result_fops);
	dev_info(&vdev->dev, "hostile balloon driver bound, canary at %#lx\n",
		 canary_phys);
	return 0;

err_unmap:
	memunmap(vb->canary);
err_free:
	vfree(vb->bios);
	kfree(vb->page0);
	kfree(vb);
	return err;
}

static void vbh_remove(struct virtio_device *vdev)
{
	struct vbh_dev *vb = vdev->priv;

	debugfs_remove_recursive(vb->dir);
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
	memunmap(vb->canary);
	vfree(vb->bios);
	kfree(vb->page0);
	kfree(vb);
}

static const unsigned int vbh_features[] = {
	VIRTIO_BALLOON_F_MUST_TELL_HOST,
};

static const struct virtio_device_id vbh_id_table[] = {
	{ VIRTIO_ID_BALLOON, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static struct virtio_driver vbh_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = vbh_id_table,
	.feature_table = vbh_features,
	.feature_table_size = ARRAY_SIZE(vbh_features),
	.validate = vbh_validate,
	.probe = vbh_probe,
	.remove = vbh_remove,
};

module_virtio_driver(vbh_driver);

MODULE_DESCRIPTION("A hostile virtio-balloon driver, for vballoon's VM tests");
MODULE_LICENSE("GPL");
