// SPDX-License-Identifier: GPL-2.0
/*
 * mdma: a mediated PCI device that DMAs a heartbeat into guest memory.
 *
 * The in-tree mdev samples (mtty, mdpy, mbochs) never touch guest memory.
 * mdma does, from a kernel thread, the way a mediated device with an
 * emulated IOMMU must: every period it pins the target page with
 * vfio_pin_pages(), writes one ring record through the kernel mapping,
 * unpins it, then writes the ring header with vfio_dma_rw().  Every
 * failure is counted, with its errno, in sysfs.  It exists to show what
 * happens to such a device while its user (QEMU) is live-updated.
 *
 * The guest sees a PCI function (vendor 0x1234, device 0xd3a1) with one
 * 4 KiB memory BAR of 32-bit registers:
 *
 *   0x00 ID         RO  0x616d646d ("mdma")
 *   0x04 VERSION    RO  1
 *   0x08 IOVA_LO    RW  target IOVA, 64-byte aligned
 *   0x0c IOVA_HI    RW
 *   0x10 LEN        RW  bytes at IOVA: a header and a ring of records
 *   0x14 PERIOD_MS  RW  1..10000
 *   0x18 CTRL       RW  bit 0: run
 *   0x1c STATUS     RO  bit 0: running, bit 1: last period failed,
 *                       bit 2: configuration rejected
 *   0x20 SEQ        RO  heartbeats written (low 32 bits)
 *   0x24 ERRORS     RO  failed pin/rw attempts (low 32 bits)
 *   0x28 ERRNO      RO  errno of the last failure (positive)
 *
 * Guest memory at IOVA (little endian, all u64):
 *
 *   +0   magic ("MDMAHB01"), seq, ts_ns, period_ns     written by vfio_dma_rw
 *   +64  ring[n] of { seq, ts_ns }, n = (LEN - 64) / 16, record seq at
 *        ring[seq % n]; written through a page pinned by vfio_pin_pages
 *
 * The record is written before the header, so a guest that reads the
 * header's seq finds every record up to it (n back) in the ring.  ts_ns is
 * ktime_get_ns() of this kernel: it keeps running while the guest is
 * paused, so gaps between consecutive records are the device's own.
 *
 * Pins are held only inside one period's work, under the device lock; the
 * dma_unmap callback takes the same lock, so no pin outlives an unmap.
 *
 * Timing.  The worker is a SCHED_FIFO kthread bound to one CPU that sleeps
 * until absolute deadlines (CLOCK_MONOTONIC), so only L1 itself (its vCPU
 * not running, interrupts off) or the DMA path can delay a beat, not the
 * load of ordinary tasks.  Each successful beat is timestamped with
 * ktime_get_ns() when the pin returned and when the header write returned,
 * into a ring the harness reads.  A witness, a hard-irq hrtimer pinned to
 * the same CPU every MDMA_WITNESS_NS, records every interval in which it
 * could not run on time (gap > 2 * MDMA_WITNESS_NS): a late beat inside
 * such an interval is L1's stall, one outside it is the device's.  The
 * witness shares no lock with the DMA path.
 *
 * Fault injection (negative controls): /sys/module/mdma/parameters/stall_ms
 * delays every pin by that many ms.
 *
 * sysfs:   /sys/bus/mdev/devices/<uuid>/vendor/stats (key value per line)
 * debugfs: mdma/<uuid>/beats    "seq pin_ns rw_ns" per successful beat,
 *                               oldest first (the last MDMA_NR_BEATS)
 *          mdma/<uuid>/witness  "key value" lines, then "from_ns to_ns"
 *                               per witness stall (the last MDMA_NR_STALLS)
 */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/highmem.h>
#include <linux/ktime.h>
#include <linux/hrtimer.h>
#include <linux/kthread.h>
#include <linux/sched.h>
#include <linux/delay.h>
#include <linux/debugfs.h>
#include <linux/seq_file.h>
#include <linux/spinlock.h>
#include <linux/cpumask.h>
#include <linux/moduleparam.h>
#include <linux/vfio.h>
#include <linux/iommu.h>
#include <linux/sysfs.h>
#include <linux/mdev.h>
#include <linux/pci.h>
#include <linux/sizes.h>
#include <linux/unaligned.h>

#define MDMA_NAME		"mdma"
#define MDMA_PCI_VENDOR_ID	0x1234
#define MDMA_PCI_DEVICE_ID	0xd3a1
#define MDMA_CONFIG_SIZE	0x100
#define MDMA_BAR0_SIZE		0x1000
#define MDMA_BAR0_OFFSET	0x10000

#define MDMA_REG_ID		0x00
#define MDMA_REG_VERSION	0x04
#define MDMA_REG_IOVA_LO	0x08
#define MDMA_REG_IOVA_HI	0x0c
#define MDMA_REG_LEN		0x10
#define MDMA_REG_PERIOD_MS	0x14
#define MDMA_REG_CTRL		0x18
#define MDMA_REG_STATUS		0x1c
#define MDMA_REG_SEQ		0x20
#define MDMA_REG_ERRORS		0x24
#define MDMA_REG_ERRNO		0x28

#define MDMA_ID			0x616d646d
#define MDMA_VERSION		1
#define MDMA_CTRL_RUN		BIT(0)
#define MDMA_STATUS_RUNNING	BIT(0)
#define MDMA_STATUS_FAILED	BIT(1)
#define MDMA_STATUS_REJECTED	BIT(2)

#define MDMA_MAGIC		0x31304248414d444dULL	/* "MDMAHB01" */
#define MDMA_HDR_SIZE		64
#define MDMA_REC_SIZE		16
#define MDMA_MIN_LEN		(MDMA_HDR_SIZE + 2 * MDMA_REC_SIZE)
#define MDMA_MAX_LEN		SZ_1M
#define MDMA_MAX_PERIOD_MS	10000
#define MDMA_NR_ERRNO		134	/* errnos counted one by one */
#define MDMA_NR_BEATS		4096	/* successful beats kept for the harness */
#define MDMA_NR_STALLS		1024	/* witness stalls kept for the harness */
#define MDMA_WITNESS_NS		(5 * NSEC_PER_MSEC)

MODULE_DESCRIPTION("Mediated PCI device writing a DMA heartbeat to guest memory");
MODULE_LICENSE("GPL");

static unsigned int stall_ms;
module_param(stall_ms, uint, 0644);
MODULE_PARM_DESC(stall_ms, "fault injection: delay every pin by this many ms");

struct mdma_hdr {
	__le64 magic;
	__le64 seq;
	__le64 ts_ns;
	__le64 period_ns;
};

struct mdma_rec {
	__le64 seq;
	__le64 ts_ns;
};

/* One successful beat: when its pin and its header write returned. */
struct mdma_beat {
	u64 seq;
	u64 pin_ns;
	u64 rw_ns;
};

/* An interval in which the witness could not run on time. */
struct mdma_stall {
	u64 from_ns;
	u64 to_ns;
};

struct mdma_witness {
	struct hrtimer timer;
	spinlock_t lock;		/* everything below; taken in hard irq */
	u64 last_ns;
	u64 ticks;
	u64 max_gap_ns;
	u64 nr_stalls;			/* ever; ring slot = nr % MDMA_NR_STALLS */
	struct mdma_stall *stalls;
};

struct mdma_stats {
	u64 ticks;
	u64 beats;
	u64 pin_ok;
	u64 pin_err;
	u64 rw_ok;
	u64 rw_err;
	u64 unmap_calls;
	u64 unmap_hits;
	u64 max_gap_ns;
	u64 last_beat_ns;
	int last_errno;
	u64 errno_count[MDMA_NR_ERRNO];	/* [0]: errno out of range */
};

struct mdma_state {
	struct vfio_device vdev;
	struct mdev_device *mdev;
	struct mutex ctl_lock;		/* serialises start and stop */
	struct mutex lock;		/* registers, DMA target, stats, beats */
	struct task_struct *thread;	/* the worker, while running */
	unsigned int cpu;		/* where the worker and witness run */
	struct mdma_beat *beats;	/* ring, slot = seq % MDMA_NR_BEATS */
	struct mdma_witness witness;
	struct dentry *debugfs;
	u8 vconfig[MDMA_CONFIG_SIZE];
	u32 bar_mask;
	u64 iova;
	u32 len;
	u32 period_ms;
	u32 ctrl;
	u32 status;
	bool running;			/* the worker may DMA */
	struct mdma_stats stats;
};

static struct mdev_type mdma_type = {
	.sysfs_name = "1",
	.pretty_name = "mdma DMA heartbeat",
};

static struct mdev_type *mdma_types[] = { &mdma_type };

static const struct class mdma_class = {
	.name = MDMA_NAME,
};

static struct device mdma_dev;
static struct mdev_parent mdma_parent;
static struct dentry *mdma_debugfs_root;
static const struct vfio_device_ops mdma_dev_ops;

static struct mdma_state *to_mdma(struct vfio_device *vdev)
{
	return container_of(vdev, struct mdma_state, vdev);
}

static void mdma_count_error(struct mdma_state *st, int err)
{
	int e = -err;

	st->stats.last_errno = e;
	st->stats.errno_count[e > 0 && e < MDMA_NR_ERRNO ? e : 0]++;
	st->status |= MDMA_STATUS_FAILED;
}

/*
 * Write record @seq into the ring through a page pinned for this write;
 * *@pin_ns is when the pin returned.
 */
static int mdma_write_record(struct mdma_state *st, u64 seq, u64 now,
			     u64 *pin_ns)
{
	unsigned int delay_ms = READ_ONCE(stall_ms);
	u32 slots = (st->len - MDMA_HDR_SIZE) / MDMA_REC_SIZE;
	dma_addr_t iova = st->iova + MDMA_HDR_SIZE +
			  (seq % slots) * MDMA_REC_SIZE;
	struct mdma_rec rec = {
		.seq = cpu_to_le64(seq),
		.ts_ns = cpu_to_le64(now),
	};
	struct page *page;
	void *va;
	int ret;

	if (delay_ms)
		msleep(delay_ms);
	ret = vfio_pin_pages(&st->vdev, ALIGN_DOWN(iova, PAGE_SIZE), 1,
			     IOMMU_READ | IOMMU_WRITE, &page);
	if (ret != 1) {
		st->stats.pin_err++;
		return ret < 0 ? ret : -EFAULT;
	}
	*pin_ns = ktime_get_ns();
	st->stats.pin_ok++;
	va = kmap_local_page(page);
	memcpy(va + offset_in_page(iova), &rec, sizeof(rec));
	kunmap_local(va);
	vfio_unpin_pages(&st->vdev, ALIGN_DOWN(iova, PAGE_SIZE), 1);
	return 0;
}

static int mdma_write_header(struct mdma_state *st, u64 seq, u64 now)
{
	struct mdma_hdr hdr = {
		.magic = cpu_to_le64(MDMA_MAGIC),
		.seq = cpu_to_le64(seq),
		.ts_ns = cpu_to_le64(now),
		.period_ns = cpu_to_le64((u64)st->period_ms * NSEC_PER_MSEC),
	};
	int ret;

	ret = vfio_dma_rw(&st->vdev, st->iova, &hdr, sizeof(hdr), true);
	if (ret) {
		st->stats.rw_err++;
		return ret;
	}
	st->stats.rw_ok++;
	return 0;
}

static void mdma_beat(struct mdma_state *st)
{
	u64 seq = st->stats.beats + 1;
	u64 now = ktime_get_ns();
	u64 pin_ns = 0, rw_ns;
	struct mdma_beat *b;
	int ret;

	st->stats.ticks++;
	ret = mdma_write_record(st, seq, now, &pin_ns);
	if (!ret) {
		/* the record must be visible before the header names it */
		wmb();
		ret = mdma_write_header(st, seq, now);
	}
	if (ret) {
		mdma_count_error(st, ret);
		return;
	}
	rw_ns = ktime_get_ns();
	st->status &= ~MDMA_STATUS_FAILED;
	st->stats.beats = seq;
	b = &st->beats[seq % MDMA_NR_BEATS];
	b->seq = seq;
	b->pin_ns = pin_ns;
	b->rw_ns = rw_ns;
	if (st->stats.last_beat_ns &&
	    rw_ns - st->stats.last_beat_ns > st->stats.max_gap_ns)
		st->stats.max_gap_ns = rw_ns - st->stats.last_beat_ns;
	st->stats.last_beat_ns = rw_ns;
}

static enum hrtimer_restart mdma_witness_tick(struct hrtimer *timer)
{
	struct mdma_witness *w = container_of(timer, struct mdma_witness,
					      timer);
	u64 now = ktime_get_ns();

	spin_lock(&w->lock);
	if (w->last_ns) {
		u64 gap = now - w->last_ns;

		if (gap > w->max_gap_ns)
			w->max_gap_ns = gap;
		if (gap > 2 * MDMA_WITNESS_NS) {
			struct mdma_stall *s;

			s = &w->stalls[w->nr_stalls++ % MDMA_NR_STALLS];
			s->from_ns = w->last_ns;
			s->to_ns = now;
		}
	}
	w->last_ns = now;
	w->ticks++;
	spin_unlock(&w->lock);
	hrtimer_forward_now(timer, ns_to_ktime(MDMA_WITNESS_NS));
	return HRTIMER_RESTART;
}

/*
 * The worker: one beat per period at absolute deadlines.  It runs bound to
 * st->cpu and arms the witness there; it never exits on its own, only
 * through kthread_stop().
 */
static int mdma_thread(void *data)
{
	struct mdma_state *st = data;
	struct mdma_witness *w = &st->witness;
	ktime_t next = ktime_get();

	spin_lock_irq(&w->lock);
	w->last_ns = 0;
	spin_unlock_irq(&w->lock);
	hrtimer_start(&w->timer, ns_to_ktime(MDMA_WITNESS_NS),
		      HRTIMER_MODE_REL_PINNED_HARD);
	while (!kthread_should_stop()) {
		u32 period_ms;

		mutex_lock(&st->lock);
		if (st->running)
			mdma_beat(st);
		period_ms = st->period_ms;
		mutex_unlock(&st->lock);

		next = ktime_add_ms(next, period_ms);
		if (ktime_before(next, ktime_get()))
			next = ktime_get();	/* late: no burst to catch up */
		set_current_state(TASK_INTERRUPTIBLE);
		if (kthread_should_stop()) {
			__set_current_state(TASK_RUNNING);
			break;
		}
		schedule_hrtimeout(&next, HRTIMER_MODE_ABS);
	}
	hrtimer_cancel(&w->timer);
	return 0;
}

/* Called with st->ctl_lock and st->lock held. */
static void mdma_start(struct mdma_state *st)
{
	struct task_struct *t;

	st->status &= ~MDMA_STATUS_REJECTED;
	if (!IS_ALIGNED(st->iova, 64) || st->len < MDMA_MIN_LEN ||
	    st->len > MDMA_MAX_LEN || !st->period_ms ||
	    st->period_ms > MDMA_MAX_PERIOD_MS) {
		st->status |= MDMA_STATUS_REJECTED;
		return;
	}
	st->cpu = cpumask_first(cpu_online_mask);
	t = kthread_create(mdma_thread, st, "mdma/%s", dev_name(st->vdev.dev));
	if (IS_ERR(t)) {
		mdma_count_error(st, PTR_ERR(t));
		return;
	}
	kthread_bind(t, st->cpu);
	sched_set_fifo_low(t);
	st->thread = t;
	st->running = true;
	st->stats.last_beat_ns = 0;
	dev_info(st->vdev.dev,
		 "heartbeat to iova 0x%llx len %u every %u ms on cpu %u\n",
		 st->iova, st->len, st->period_ms, st->cpu);
	wake_up_process(t);
}

/*
 * Called with st->ctl_lock and st->lock held: mark the device stopped and
 * hand back the worker, which the caller stops with kthread_stop() once it
 * has dropped st->lock (the worker takes it), still under st->ctl_lock.
 */
static struct task_struct *mdma_halt(struct mdma_state *st)
{
	struct task_struct *t = st->thread;

	st->running = false;
	st->thread = NULL;
	return t;
}

/* Stop the worker: after this returns no DMA is in flight or scheduled. */
static void mdma_stop(struct mdma_state *st)
{
	struct task_struct *t;

	mutex_lock(&st->ctl_lock);
	mutex_lock(&st->lock);
	st->ctrl = 0;
	t = mdma_halt(st);
	mutex_unlock(&st->lock);
	if (t)
		kthread_stop(t);
	mutex_unlock(&st->ctl_lock);
}

static u32 mdma_reg_read(struct mdma_state *st, u32 off)
{
	switch (off) {
	case MDMA_REG_ID:
		return MDMA_ID;
	case MDMA_REG_VERSION:
		return MDMA_VERSION;
	case MDMA_REG_IOVA_LO:
		return lower_32_bits(st->iova);
	case MDMA_REG_IOVA_HI:
		return upper_32_bits(st->iova);
	case MDMA_REG_LEN:
		return st->len;
	case MDMA_REG_PERIOD_MS:
		return st->period_ms;
	case MDMA_REG_CTRL:
		return st->ctrl;
	case MDMA_REG_STATUS:
		return st->status | (st->running ? MDMA_STATUS_RUNNING : 0);
	case MDMA_REG_SEQ:
		return lower_32_bits(st->stats.beats);
	case MDMA_REG_ERRORS:
		return lower_32_bits(st->stats.pin_err + st->stats.rw_err);
	case MDMA_REG_ERRNO:
		return st->stats.last_errno;
	}
	return 0;
}

/*
 * Called with st->ctl_lock and st->lock held; returns the worker to stop
 * (see mdma_halt()), or NULL.
 */
static struct task_struct *mdma_reg_write(struct mdma_state *st, u32 off,
					  u32 val)
{
	switch (off) {
	case MDMA_REG_IOVA_LO:
		st->iova = (st->iova & GENMASK_ULL(63, 32)) | val;
		break;
	case MDMA_REG_IOVA_HI:
		st->iova = (st->iova & GENMASK_ULL(31, 0)) | ((u64)val << 32);
		break;
	case MDMA_REG_LEN:
		st->len = val;
		break;
	case MDMA_REG_PERIOD_MS:
		st->period_ms = val;
		break;
	case MDMA_REG_CTRL:
		st->ctrl = val & MDMA_CTRL_RUN;
		if (st->ctrl && !st->running)
			mdma_start(st);
		else if (!st->ctrl && st->running)
			return mdma_halt(st);
		break;
	}
	return NULL;
}

static void mdma_cfg_write(struct mdma_state *st, u32 off, u32 val,
			   size_t count)
{
	switch (off) {
	case PCI_COMMAND:
		memcpy(&st->vconfig[off], &val, min_t(size_t, count, 2));
		break;
	case PCI_BASE_ADDRESS_0:
		if (count != 4)
			break;
		if (val == 0xffffffff)
			val &= st->bar_mask;
		else
			val &= PCI_BASE_ADDRESS_MEM_MASK;
		val |= st->vconfig[off] & ~PCI_BASE_ADDRESS_MEM_MASK;
		put_unaligned_le32(val, &st->vconfig[off]);
		break;
	}
}

/* One naturally aligned access of 1, 2 or 4 bytes. */
static int mdma_access(struct mdma_state *st, u32 *val, size_t count,
		       loff_t pos, bool is_write)
{
	struct task_struct *stop = NULL;

	mutex_lock(&st->ctl_lock);
	mutex_lock(&st->lock);
	if (pos >= 0 && pos + count <= MDMA_CONFIG_SIZE) {
		if (is_write)
			mdma_cfg_write(st, pos, *val, count);
		else
			memcpy(val, &st->vconfig[pos], count);
	} else if (pos >= MDMA_BAR0_OFFSET &&
		   pos + count <= MDMA_BAR0_OFFSET + MDMA_BAR0_SIZE) {
		u32 off = pos - MDMA_BAR0_OFFSET;

		if (count != 4) {
			/* registers are 32-bit: other sizes read 0, drop */
			if (!is_write)
				*val = 0;
		} else if (is_write) {
			stop = mdma_reg_write(st, off, *val);
		} else {
			*val = mdma_reg_read(st, off);
		}
	} else {
		mutex_unlock(&st->lock);
		mutex_unlock(&st->ctl_lock);
		return -EINVAL;
	}
	mutex_unlock(&st->lock);
	if (stop)
		kthread_stop(stop);
	mutex_unlock(&st->ctl_lock);
	return 0;
}

static size_t mdma_chunk(size_t count, loff_t pos)
{
	if (count >= 4 && !(pos % 4))
		return 4;
	if (count >= 2 && !(pos % 2))
		return 2;
	return 1;
}

static ssize_t mdma_read(struct vfio_device *vdev, char __user *buf,
			 size_t count, loff_t *ppos)
{
	struct mdma_state *st = to_mdma(vdev);
	size_t done = 0;

	while (count) {
		size_t n = mdma_chunk(count, *ppos);
		u32 val = 0;
		int ret;

		ret = mdma_access(st, &val, n, *ppos, false);
		if (ret)
			return ret;
		if (copy_to_user(buf, &val, n))
			return -EFAULT;
		count -= n;
		done += n;
		*ppos += n;
		buf += n;
	}
	return done;
}

static ssize_t mdma_write(struct vfio_device *vdev, const char __user *buf,
			  size_t count, loff_t *ppos)
{
	struct mdma_state *st = to_mdma(vdev);
	size_t done = 0;

	while (count) {
		size_t n = mdma_chunk(count, *ppos);
		u32 val = 0;
		int ret;

		if (copy_from_user(&val, buf, n))
			return -EFAULT;
		ret = mdma_access(st, &val, n, *ppos, true);
		if (ret)
			return ret;
		count -= n;
		done += n;
		*ppos += n;
		buf += n;
	}
	return done;
}

static void mdma_create_config_space(struct mdma_state *st)
{
	u8 *c = st->vconfig;

	memset(c, 0, MDMA_CONFIG_SIZE);
	put_unaligned_le16(MDMA_PCI_VENDOR_ID, &c[PCI_VENDOR_ID]);
	put_unaligned_le16(MDMA_PCI_DEVICE_ID, &c[PCI_DEVICE_ID]);
	put_unaligned_le16(MDMA_PCI_VENDOR_ID, &c[PCI_SUBSYSTEM_VENDOR_ID]);
	put_unaligned_le16(MDMA_PCI_DEVICE_ID, &c[PCI_SUBSYSTEM_ID]);
	put_unaligned_le16(PCI_CLASS_SYSTEM_OTHER, &c[PCI_CLASS_DEVICE]);
	c[PCI_CLASS_REVISION] = MDMA_VERSION;
	put_unaligned_le32(PCI_BASE_ADDRESS_SPACE_MEMORY |
			   PCI_BASE_ADDRESS_MEM_TYPE_32,
			   &c[PCI_BASE_ADDRESS_0]);
	st->bar_mask = ~(MDMA_BAR0_SIZE - 1);
}

/* Device reset: stop DMA, clear the registers; the stats stay. */
static void mdma_reset(struct mdma_state *st)
{
	mdma_stop(st);
	mutex_lock(&st->lock);
	st->iova = 0;
	st->len = 0;
	st->period_ms = 0;
	st->status = 0;
	mutex_unlock(&st->lock);
}

static int mdma_get_region_info(struct vfio_device *vdev,
				struct vfio_region_info *info,
				struct vfio_info_cap *caps)
{
	switch (info->index) {
	case VFIO_PCI_CONFIG_REGION_INDEX:
		info->offset = 0;
		info->size = MDMA_CONFIG_SIZE;
		info->flags = VFIO_REGION_INFO_FLAG_READ |
			      VFIO_REGION_INFO_FLAG_WRITE;
		break;
	case VFIO_PCI_BAR0_REGION_INDEX:
		info->offset = MDMA_BAR0_OFFSET;
		info->size = MDMA_BAR0_SIZE;
		info->flags = VFIO_REGION_INFO_FLAG_READ |
			      VFIO_REGION_INFO_FLAG_WRITE;
		break;
	default:
		if (info->index >= VFIO_PCI_NUM_REGIONS)
			return -EINVAL;
		info->offset = 0;
		info->size = 0;
		info->flags = 0;
	}
	return 0;
}

static long mdma_ioctl(struct vfio_device *vdev, unsigned int cmd,
		       unsigned long arg)
{
	struct mdma_state *st = to_mdma(vdev);
	unsigned long minsz;

	switch (cmd) {
	case VFIO_DEVICE_GET_INFO: {
		struct vfio_device_info info;

		minsz = offsetofend(struct vfio_device_info, num_irqs);
		if (copy_from_user(&info, (void __user *)arg, minsz))
			return -EFAULT;
		if (info.argsz < minsz)
			return -EINVAL;
		info.flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET;
		info.num_regions = VFIO_PCI_NUM_REGIONS;
		info.num_irqs = VFIO_PCI_NUM_IRQS;
		if (copy_to_user((void __user *)arg, &info, minsz))
			return -EFAULT;
		return 0;
	}
	case VFIO_DEVICE_GET_IRQ_INFO: {
		struct vfio_irq_info info;

		minsz = offsetofend(struct vfio_irq_info, count);
		if (copy_from_user(&info, (void __user *)arg, minsz))
			return -EFAULT;
		if (info.argsz < minsz || info.index >= VFIO_PCI_NUM_IRQS)
			return -EINVAL;
		info.flags = 0;
		info.count = 0;		/* no interrupts: the guest polls */
		if (copy_to_user((void __user *)arg, &info, minsz))
			return -EFAULT;
		return 0;
	}
	case VFIO_DEVICE_SET_IRQS:
		return -EINVAL;
	case VFIO_DEVICE_RESET:
		mdma_reset(st);
		return 0;
	}
	return -ENOTTY;
}

static void mdma_dma_unmap(struct vfio_device *vdev, u64 iova, u64 length)
{
	struct mdma_state *st = to_mdma(vdev);

	/*
	 * No pin outlives one period's work, which holds st->lock: once we
	 * have the lock nothing of ours is pinned in [iova, iova + length).
	 * Later periods pin again and fail (counted) if the IOVA is gone.
	 */
	mutex_lock(&st->lock);
	st->stats.unmap_calls++;
	if (st->len && iova < st->iova + st->len && st->iova < iova + length)
		st->stats.unmap_hits++;
	mutex_unlock(&st->lock);
}

static void mdma_close_device(struct vfio_device *vdev)
{
	/* vfio_pin_pages() needs an open device: stop before it closes */
	mdma_reset(to_mdma(vdev));
}

static int mdma_init_dev(struct vfio_device *vdev)
{
	struct mdma_state *st = to_mdma(vdev);

	st->beats = kvcalloc(MDMA_NR_BEATS, sizeof(*st->beats), GFP_KERNEL);
	st->witness.stalls = kvcalloc(MDMA_NR_STALLS,
				      sizeof(*st->witness.stalls), GFP_KERNEL);
	if (!st->beats || !st->witness.stalls) {
		kvfree(st->beats);
		kvfree(st->witness.stalls);
		return -ENOMEM;
	}
	st->mdev = to_mdev_device(vdev->dev);
	mutex_init(&st->ctl_lock);
	mutex_init(&st->lock);
	spin_lock_init(&st->witness.lock);
	hrtimer_setup(&st->witness.timer, mdma_witness_tick, CLOCK_MONOTONIC,
		      HRTIMER_MODE_REL_PINNED_HARD);
	mdma_create_config_space(st);
	return 0;
}

static void mdma_release_dev(struct vfio_device *vdev)
{
	struct mdma_state *st = to_mdma(vdev);

	mutex_destroy(&st->lock);
	mutex_destroy(&st->ctl_lock);
	kvfree(st->beats);
	kvfree(st->witness.stalls);
}

static int mdma_beats_show(struct seq_file *m, void *v)
{
	struct mdma_state *st = m->private;
	u64 seq, first;

	mutex_lock(&st->lock);
	seq = st->stats.beats;
	first = seq > MDMA_NR_BEATS ? seq - MDMA_NR_BEATS + 1 : 1;
	seq_puts(m, "# seq pin_ns rw_ns\n");
	for (; first <= seq; first++) {
		struct mdma_beat *b = &st->beats[first % MDMA_NR_BEATS];

		seq_printf(m, "%llu %llu %llu\n", b->seq, b->pin_ns, b->rw_ns);
	}
	mutex_unlock(&st->lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(mdma_beats);

static int mdma_witness_show(struct seq_file *m, void *v)
{
	struct mdma_state *st = m->private;
	struct mdma_witness *w = &st->witness;
	u64 n, first;

	spin_lock_irq(&w->lock);
	n = w->nr_stalls;
	first = n > MDMA_NR_STALLS ? n - MDMA_NR_STALLS : 0;
	seq_printf(m, "period_ns %llu\ncpu %u\nticks %llu\nmax_gap_ns %llu\n"
		   "stalls %llu\n", (u64)MDMA_WITNESS_NS, st->cpu, w->ticks,
		   w->max_gap_ns, n);
	for (; first < n; first++) {
		struct mdma_stall *s = &w->stalls[first % MDMA_NR_STALLS];

		seq_printf(m, "%llu %llu\n", s->from_ns, s->to_ns);
	}
	spin_unlock_irq(&w->lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(mdma_witness);

static int mdma_probe(struct mdev_device *mdev)
{
	struct mdma_state *st;
	int ret;

	st = vfio_alloc_device(mdma_state, vdev, &mdev->dev, &mdma_dev_ops);
	if (IS_ERR(st))
		return PTR_ERR(st);
	ret = vfio_register_emulated_iommu_dev(&st->vdev);
	if (ret) {
		vfio_put_device(&st->vdev);
		return ret;
	}
	dev_set_drvdata(&mdev->dev, st);
	st->debugfs = debugfs_create_dir(dev_name(&mdev->dev),
					 mdma_debugfs_root);
	debugfs_create_file("beats", 0444, st->debugfs, st, &mdma_beats_fops);
	debugfs_create_file("witness", 0444, st->debugfs, st,
			    &mdma_witness_fops);
	return 0;
}

static void mdma_remove(struct mdev_device *mdev)
{
	struct mdma_state *st = dev_get_drvdata(&mdev->dev);

	debugfs_remove(st->debugfs);
	vfio_unregister_group_dev(&st->vdev);
	vfio_put_device(&st->vdev);
}

static ssize_t stats_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	struct mdma_state *st = dev_get_drvdata(dev);
	struct mdma_stats *s = &st->stats;
	int n, e;

	mutex_lock(&st->lock);
	n = sysfs_emit(buf,
		       "running %d\niova 0x%llx\nlen %u\nperiod_ms %u\n"
		       "ticks %llu\nbeats %llu\npin_ok %llu\npin_err %llu\n"
		       "rw_ok %llu\nrw_err %llu\nunmap_calls %llu\n"
		       "unmap_hits %llu\nmax_gap_ns %llu\nlast_errno %d\n"
		       "cpu %u\nstall_ms %u\n",
		       st->running, st->iova, st->len, st->period_ms,
		       s->ticks, s->beats, s->pin_ok, s->pin_err, s->rw_ok,
		       s->rw_err, s->unmap_calls, s->unmap_hits, s->max_gap_ns,
		       s->last_errno, st->cpu, READ_ONCE(stall_ms));
	for (e = 0; e < MDMA_NR_ERRNO; e++)
		if (s->errno_count[e])
			n += sysfs_emit_at(buf, n, "errno_%d %llu\n", e,
					   s->errno_count[e]);
	mutex_unlock(&st->lock);
	return n;
}
static DEVICE_ATTR_RO(stats);

static struct attribute *mdma_dev_attrs[] = {
	&dev_attr_stats.attr,
	NULL,
};

static const struct attribute_group mdma_dev_group = {
	.name = "vendor",
	.attrs = mdma_dev_attrs,
};

static const struct attribute_group *mdma_dev_groups[] = {
	&mdma_dev_group,
	NULL,
};

static ssize_t mdma_show_description(struct mdev_type *mtype, char *buf)
{
	return sysfs_emit(buf, "DMA heartbeat into guest memory\n");
}

static const struct vfio_device_ops mdma_dev_ops = {
	.name = "vfio-mdma",
	.init = mdma_init_dev,
	.release = mdma_release_dev,
	.close_device = mdma_close_device,
	.read = mdma_read,
	.write = mdma_write,
	.ioctl = mdma_ioctl,
	.get_region_info_caps = mdma_get_region_info,
	.dma_unmap = mdma_dma_unmap,
	.bind_iommufd = vfio_iommufd_emulated_bind,
	.unbind_iommufd = vfio_iommufd_emulated_unbind,
	.attach_ioas = vfio_iommufd_emulated_attach_ioas,
	.detach_ioas = vfio_iommufd_emulated_detach_ioas,
};

static struct mdev_driver mdma_driver = {
	.device_api = VFIO_DEVICE_API_PCI_STRING,
	.max_instances = 4,
	.driver = {
		.name = MDMA_NAME,
		.owner = THIS_MODULE,
		.mod_name = KBUILD_MODNAME,
		.dev_groups = mdma_dev_groups,
	},
	.probe = mdma_probe,
	.remove = mdma_remove,
	.show_description = mdma_show_description,
};

static void mdma_device_release(struct device *dev)
{
	/* static device */
}

static int __init mdma_init(void)
{
	int ret;

	mdma_debugfs_root = debugfs_create_dir(MDMA_NAME, NULL);
	ret = mdev_register_driver(&mdma_driver);
	if (ret)
		goto err_debugfs;
	ret = class_register(&mdma_class);
	if (ret)
		goto err_driver;
	mdma_dev.class = &mdma_class;
	mdma_dev.release = mdma_device_release;
	dev_set_name(&mdma_dev, "%s", MDMA_NAME);
	ret = device_register(&mdma_dev);
	if (ret)
		goto err_put;
	ret = mdev_register_parent(&mdma_parent, &mdma_dev, &mdma_driver,
				   mdma_types, ARRAY_SIZE(mdma_types));
	if (ret)
		goto err_device;
	return 0;

err_device:
	device_del(&mdma_dev);
err_put:
	put_device(&mdma_dev);
	class_unregister(&mdma_class);
err_driver:
	mdev_unregister_driver(&mdma_driver);
err_debugfs:
	debugfs_remove(mdma_debugfs_root);
	return ret;
}

static void __exit mdma_exit(void)
{
	mdev_unregister_parent(&mdma_parent);
	device_unregister(&mdma_dev);
	mdev_unregister_driver(&mdma_driver);
	class_unregister(&mdma_class);
	debugfs_remove(mdma_debugfs_root);
}

module_init(mdma_init);
module_exit(mdma_exit);
