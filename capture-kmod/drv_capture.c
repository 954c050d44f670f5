// SPDX-License-Identifier: GPL-2.0
/*
 * drv_capture: hold every write to /dev/drvN until drv's agent says staging has it.
 *
 * The interface, the message layout and the held-write state table are in drv_capture.h. This
 * file keeps to the smallest mechanism: hold, publish, release on ack, pass through (and mark
 * dirty) when no agent can take the write. Everything else (epochs, staging, the change map,
 * resync) is the agent's.
 *
 * Locking: one spinlock per device (dev->lock, taken with irqsave: backing completions run in
 * interrupt context) guards the mode, the held-write ring and queues, the counters and the dirty
 * bitmap. Nothing sleeps or copies to/from userspace under it. drv_devs_mutex guards the device
 * table (create, remove, lookups, attach).
 */
#include <linux/module.h>
#include <linux/blkdev.h>
#include <linux/bio.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/bitmap.h>
#include <linux/uaccess.h>
#include <linux/highmem.h>
#include <linux/workqueue.h>
#include <linux/version.h>
#include <linux/wait.h>

#include "drv_capture.h"

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0) || LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
#error "drv_capture is written against the 6.1 block layer API (Debian 12); see the compat shims below"
#endif

#define DRV_MAX_DEVICES 64
/* Held writes per device at most (a power of two: the ring below is indexed by seq). */
#define DRV_RING 4096

static unsigned long max_held_bytes = 64ul << 20;
module_param(max_held_bytes, ulong, 0644);
MODULE_PARM_DESC(max_held_bytes, "Bytes of held writes per device before writers wait (default 64 MiB)");

static unsigned int hold_timeout_ms = 30000;
module_param(hold_timeout_ms, uint, 0644);
MODULE_PARM_DESC(hold_timeout_ms,
		 "A write held longer than this turns the device to pass-through with a dirty bitmap (default 30 s)");

struct drv_dev;

struct drv_held {
	struct list_head node; /* dev->outq while QUEUED or DONE */
	struct drv_dev *dev;
	struct bio *bio;
	u64 seq;
	u64 offset;
	u32 length;
	u32 flags;
	int status;
	enum drv_held_state state;
	unsigned long since; /* jiffies when held */
};

/* One open file of /dev/drv-ctl. */
struct drv_chan {
	struct drv_dev *dev; /* attached device, or NULL */
	bool dead; /* the device dropped this channel (hold timeout, detach) */
};

struct drv_dev {
	int index;
	char name[DRV_NAME_LEN];
	char backing_path[DRV_PATH_LEN];
	struct block_device *backing;
	struct gendisk *disk;
	u64 size_bytes;
	bool removing;

	spinlock_t lock;
	enum drv_mode mode;
	struct drv_chan *chan;
	u64 next_seq;
	struct drv_held *ring[DRV_RING];
	struct list_head outq; /* QUEUED writes and DONE messages, in the order the agent reads them */
	u64 held_writes;
	u64 held_bytes; /* QUEUED/COPYING/PUBLISHED bytes */
	u64 pass_inflight; /* pass-through writes not yet completed */
	int users; /* read()/write() calls using the device (drv_devs_mutex); remove waits for 0 */
	u32 timeouts;
	u64 flush_writes;
	u64 fua_writes;
	unsigned long *dirty;
	u64 blocks;
	u32 block_shift;

	wait_queue_head_t read_wq; /* outq not empty, or channel dead */
	wait_queue_head_t room_wq; /* held bytes below the limit, or pass-through */
	wait_queue_head_t drain_wq; /* pass_inflight == 0, held_writes == 0, users == 0 */
	struct delayed_work watchdog;
};

static DEFINE_MUTEX(drv_devs_mutex);
static struct drv_dev *drv_devs[DRV_MAX_DEVICES];
static struct bio_set drv_bioset;
static struct kmem_cache *drv_held_cache;

/* One step of the held-write lifecycle (the table in drv_capture.h); under dev->lock. An event
 * the table does not allow is a bug: warn and keep the state. */
static enum drv_held_state drv_held_step(struct drv_held *h, enum drv_held_event ev)
{
	enum drv_held_state old = h->state;
	unsigned char next = drv_held_table[old][ev];

	if (WARN_ONCE(next == HELD_INVALID, "drv: held write seq %llu: event %d in state %d\n", h->seq, ev, old))
		return old;
	h->state = next;
	return old;
}

/* ---- 6.1 compat shims: the block layer API changes in 6.5+ (bdev_open_by_path, blk_mode_t) --- */

static struct block_device *drv_open_backing(const char *path, void *holder)
{
	return blkdev_get_by_path(path, FMODE_READ | FMODE_WRITE | FMODE_EXCL, holder);
}

static void drv_close_backing(struct block_device *bdev)
{
	blkdev_put(bdev, FMODE_READ | FMODE_WRITE | FMODE_EXCL);
}

/* ---- dirty bitmap ------------------------------------------------------------------------- */

static void drv_mark_dirty_locked(struct drv_dev *dev, u64 offset, u64 len)
{
	u64 first, last;

	if (len == 0)
		return;
	first = offset >> dev->block_shift;
	last = (offset + len - 1) >> dev->block_shift;
	if (WARN_ON_ONCE(last >= dev->blocks))
		last = dev->blocks - 1;
	bitmap_set(dev->dirty, first, last - first + 1);
}

/* ---- forwarding to the backing device -------------------------------------------------------- */

static void drv_pass_end_io(struct bio *clone)
{
	struct bio *orig = clone->bi_private;
	struct drv_dev *dev = orig->bi_bdev->bd_disk->private_data;
	unsigned long fl;

	orig->bi_status = clone->bi_status;
	bio_put(clone);
	spin_lock_irqsave(&dev->lock, fl);
	dev->pass_inflight--;
	if (dev->pass_inflight == 0)
		wake_up_all(&dev->drain_wq);
	spin_unlock_irqrestore(&dev->lock, fl);
	bio_endio(orig);
}

static void drv_read_end_io(struct bio *clone)
{
	struct bio *orig = clone->bi_private;

	orig->bi_status = clone->bi_status;
	bio_put(clone);
	bio_endio(orig);
}

/* Clones `orig` onto the backing device; `end_io` gets the clone with bi_private = private. */
static void drv_forward(struct drv_dev *dev, struct bio *orig, bio_end_io_t end_io, void *private)
{
	/* From the bioset's mempool with direct reclaim allowed: never fails. */
	struct bio *clone = bio_alloc_clone(dev->backing, orig, GFP_NOIO, &drv_bioset);

	clone->bi_end_io = end_io;
	clone->bi_private = private;
	submit_bio_noacct(clone);
}

static void drv_held_end_io(struct bio *clone);

/* Releases held writes collected on `list` (linked through node) to the backing device. */
static void drv_submit_list(struct drv_dev *dev, struct list_head *list)
{
	struct drv_held *h, *t;

	list_for_each_entry_safe(h, t, list, node) {
		list_del_init(&h->node);
		drv_forward(dev, h->bio, drv_held_end_io, h);
	}
}

/*
 * The agent is gone (closed, detached or timed out): every write it has not acknowledged is
 * marked dirty and released; later writes pass through. Called with dev->lock held; the writes to
 * release are moved to `release`.
 */
static void drv_drop_agent_locked(struct drv_dev *dev, struct list_head *release)
{
	struct drv_held *h, *t;
	u64 s;

	if (dev->chan) {
		dev->chan->dead = true;
		dev->chan->dev = NULL;
		dev->chan = NULL;
	}
	dev->mode = DRV_MODE_PASSTHROUGH;
	/* DONE messages nobody will read. */
	list_for_each_entry_safe(h, t, &dev->outq, node) {
		if (h->state == HELD_DONE) {
			list_del(&h->node);
			kmem_cache_free(drv_held_cache, h);
		}
	}
	for (s = 0; s < DRV_RING; s++) {
		h = dev->ring[s];
		if (!h)
			continue;
		switch (drv_held_step(h, EV_AGENT_GONE)) {
		case HELD_QUEUED:
			list_del_init(&h->node);
			fallthrough;
		case HELD_PUBLISHED:
			drv_mark_dirty_locked(dev, h->offset, h->length);
			dev->held_bytes -= h->length;
			dev->pass_inflight++;
			list_add_tail(&h->node, release);
			break;
		default: /* COPYING became ORPHAN: its reader releases it; the rest go on */
			break;
		}
	}
	wake_up_all(&dev->room_wq);
	wake_up_all(&dev->read_wq);
}

static void drv_held_end_io(struct bio *clone)
{
	struct drv_held *h = clone->bi_private;
	struct drv_dev *dev = h->dev;
	struct bio *orig = h->bio;
	unsigned long fl;
	bool keep = false;

	orig->bi_status = clone->bi_status;
	bio_put(clone);
	spin_lock_irqsave(&dev->lock, fl);
	WARN_ON_ONCE(dev->ring[h->seq & (DRV_RING - 1)] != h);
	dev->ring[h->seq & (DRV_RING - 1)] = NULL;
	dev->held_writes--;
	if (drv_held_step(h, EV_BACKING_DONE) == HELD_PASSED) {
		dev->pass_inflight--;
	} else if (dev->chan) {
		/* Queued before the original completes: the agent reads this DONE before any write
		 * the application submits after seeing the completion. */
		h->status = blk_status_to_errno(orig->bi_status);
		list_add_tail(&h->node, &dev->outq);
		wake_up(&dev->read_wq);
		keep = true;
	}
	if (dev->pass_inflight == 0 || dev->held_writes == 0)
		wake_up_all(&dev->drain_wq);
	wake_up_all(&dev->room_wq);
	spin_unlock_irqrestore(&dev->lock, fl);
	if (!keep)
		kmem_cache_free(drv_held_cache, h);
	bio_endio(orig);
}

/* ---- the block device ------------------------------------------------------------------------ */

static u32 drv_bio_flags(struct bio *bio)
{
	u32 f = 0;

	if (bio->bi_opf & REQ_PREFLUSH)
		f |= DRV_F_FLUSH;
	if (bio->bi_opf & REQ_FUA)
		f |= DRV_F_FUA;
	return f;
}

static void drv_submit_bio(struct bio *bio)
{
	struct drv_dev *dev = bio->bi_bdev->bd_disk->private_data;
	struct drv_held *h = NULL;
	unsigned long fl;
	u32 len;

	bio = bio_split_to_limits(bio);
	if (!bio)
		return;
	if (bio_op(bio) == REQ_OP_READ) {
		drv_forward(dev, bio, drv_read_end_io, bio);
		return;
	}
	if (bio_op(bio) != REQ_OP_WRITE) {
		/* Discard and write-zeroes are not advertised; anything else is refused. */
		bio->bi_status = BLK_STS_NOTSUPP;
		bio_endio(bio);
		return;
	}
	len = bio->bi_iter.bi_size;
	for (;;) {
		if (!h)
			h = kmem_cache_zalloc(drv_held_cache, GFP_NOIO | __GFP_NOFAIL);
		spin_lock_irqsave(&dev->lock, fl);
		if (dev->mode != DRV_MODE_HOLD)
			break;
		if ((dev->held_bytes == 0 || dev->held_bytes + len <= max_held_bytes) &&
		    !dev->ring[dev->next_seq & (DRV_RING - 1)])
			break;
		spin_unlock_irqrestore(&dev->lock, fl);
		/* Backpressure: the writer waits (task state D) for acks, or for pass-through. */
		wait_event(dev->room_wq,
			   READ_ONCE(dev->mode) != DRV_MODE_HOLD ||
				   ((READ_ONCE(dev->held_bytes) + len <= max_held_bytes ||
				     READ_ONCE(dev->held_bytes) == 0) &&
				    !READ_ONCE(dev->ring[READ_ONCE(dev->next_seq) & (DRV_RING - 1)])));
	}
	if (bio->bi_opf & REQ_PREFLUSH)
		dev->flush_writes++;
	if (bio->bi_opf & REQ_FUA)
		dev->fua_writes++;
	if (dev->mode == DRV_MODE_HOLD) {
		INIT_LIST_HEAD(&h->node);
		h->dev = dev;
		h->bio = bio;
		h->seq = dev->next_seq++;
		h->offset = bio->bi_iter.bi_sector << SECTOR_SHIFT;
		h->length = len;
		h->flags = drv_bio_flags(bio);
		h->state = HELD_QUEUED;
		h->since = jiffies;
		dev->ring[h->seq & (DRV_RING - 1)] = h;
		dev->held_writes++;
		dev->held_bytes += len;
		list_add_tail(&h->node, &dev->outq);
		wake_up(&dev->read_wq);
		spin_unlock_irqrestore(&dev->lock, fl);
		return;
	}
	/* No agent: straight through, marked dirty first. */
	drv_mark_dirty_locked(dev, bio->bi_iter.bi_sector << SECTOR_SHIFT, len);
	dev->pass_inflight++;
	spin_unlock_irqrestore(&dev->lock, fl);
	kmem_cache_free(drv_held_cache, h);
	drv_forward(dev, bio, drv_pass_end_io, bio);
}

static int drv_bdev_open(struct block_device *bdev, fmode_t mode)
{
	struct drv_dev *dev = bdev->bd_disk->private_data;

	return READ_ONCE(dev->removing) ? -ENODEV : 0;
}

static const struct block_device_operations drv_bdev_ops = {
	.owner = THIS_MODULE,
	.submit_bio = drv_submit_bio,
	.open = drv_bdev_open,
};

/* The hold timeout: a write held too long means the agent cannot keep up (or hangs). */
static void drv_watchdog(struct work_struct *w)
{
	struct drv_dev *dev = container_of(to_delayed_work(w), struct drv_dev, watchdog);
	unsigned long fl, limit = msecs_to_jiffies(READ_ONCE(hold_timeout_ms));
	LIST_HEAD(release);
	struct drv_held *h;
	bool expired = false;
	u64 s;

	spin_lock_irqsave(&dev->lock, fl);
	if (dev->mode == DRV_MODE_HOLD) {
		for (s = 0; s < DRV_RING && !expired; s++) {
			h = dev->ring[s];
			if (h && h->state <= HELD_PUBLISHED && time_after(jiffies, h->since + limit))
				expired = true;
		}
		if (expired) {
			dev->timeouts++;
			drv_drop_agent_locked(dev, &release);
		}
	}
	spin_unlock_irqrestore(&dev->lock, fl);
	if (expired)
		pr_warn("drv%d (%s): a write was held over %u ms; passing writes through and marking them dirty until the agent attaches again\n",
			dev->index, dev->name, hold_timeout_ms);
	drv_submit_list(dev, &release);
	if (!READ_ONCE(dev->removing))
		schedule_delayed_work(&dev->watchdog, max(1ul, limit / 4));
}

/* ---- create / remove ------------------------------------------------------------------------- */

static struct drv_dev *drv_find_locked(const char *name)
{
	int i;

	for (i = 0; i < DRV_MAX_DEVICES; i++)
		if (drv_devs[i] && !strncmp(drv_devs[i]->name, name, DRV_NAME_LEN))
			return drv_devs[i];
	return NULL;
}

static int drv_create(struct drv_create *c)
{
	struct drv_dev *dev;
	struct gendisk *disk;
	int i, err;
	u64 bitmap_bytes;

	c->backing[DRV_PATH_LEN - 1] = 0;
	c->name[DRV_NAME_LEN - 1] = 0;
	if (!c->name[0] || !c->backing[0])
		return -EINVAL;
	if (c->dirty_block_bytes == 0)
		c->dirty_block_bytes = 65536;
	if (c->dirty_block_bytes < 4096 || !is_power_of_2(c->dirty_block_bytes))
		return -EINVAL;

	mutex_lock(&drv_devs_mutex);
	err = -EEXIST;
	if (drv_find_locked(c->name))
		goto out_unlock;
	err = -ENOSPC;
	for (i = 0; i < DRV_MAX_DEVICES && drv_devs[i]; i++)
		;
	if (i == DRV_MAX_DEVICES)
		goto out_unlock;
	err = -ENOMEM;
	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		goto out_unlock;
	dev->index = i;
	strscpy(dev->name, c->name, DRV_NAME_LEN);
	strscpy(dev->backing_path, c->backing, DRV_PATH_LEN);
	spin_lock_init(&dev->lock);
	INIT_LIST_HEAD(&dev->outq);
	init_waitqueue_head(&dev->read_wq);
	init_waitqueue_head(&dev->room_wq);
	init_waitqueue_head(&dev->drain_wq);
	INIT_DELAYED_WORK(&dev->watchdog, drv_watchdog);
	dev->mode = DRV_MODE_PASSTHROUGH;
	dev->next_seq = 1;

	dev->backing = drv_open_backing(c->backing, dev);
	if (IS_ERR(dev->backing)) {
		err = PTR_ERR(dev->backing);
		goto out_free;
	}
	dev->size_bytes = bdev_nr_bytes(dev->backing);
	dev->block_shift = ilog2(c->dirty_block_bytes);
	dev->blocks = DIV_ROUND_UP(dev->size_bytes, c->dirty_block_bytes);
	bitmap_bytes = BITS_TO_LONGS(dev->blocks) * sizeof(unsigned long);
	err = -ENOMEM;
	dev->dirty = kvzalloc(bitmap_bytes, GFP_KERNEL);
	if (!dev->dirty)
		goto out_backing;
	/* Never attached yet: everything is unknown to the agent until its first resync. */
	disk = blk_alloc_disk(NUMA_NO_NODE);
	if (!disk)
		goto out_bitmap;
	dev->disk = disk;
	disk->fops = &drv_bdev_ops;
	disk->private_data = dev;
	disk->flags |= GENHD_FL_NO_PART;
	snprintf(disk->disk_name, DISK_NAME_LEN, "drv%d", i);
	set_capacity(disk, dev->size_bytes >> SECTOR_SHIFT);
	blk_queue_logical_block_size(disk->queue, bdev_logical_block_size(dev->backing));
	blk_queue_physical_block_size(disk->queue, bdev_physical_block_size(dev->backing));
	blk_queue_io_min(disk->queue, bdev_io_min(dev->backing));
	blk_queue_max_hw_sectors(disk->queue, DRV_MAX_WRITE_BYTES >> SECTOR_SHIFT);
	/* Without this the block layer strips PREFLUSH/FUA before they reach drv_submit_bio. */
	blk_queue_write_cache(disk->queue, true, true);
	err = add_disk(disk);
	if (err)
		goto out_disk;
	__module_get(THIS_MODULE);
	drv_devs[i] = dev;
	c->index = i;
	c->size_bytes = dev->size_bytes;
	schedule_delayed_work(&dev->watchdog, msecs_to_jiffies(1000));
	mutex_unlock(&drv_devs_mutex);
	pr_info("drv%d (%s): over %s, %llu bytes, dirty blocks of %u bytes\n", i, dev->name, dev->backing_path,
		dev->size_bytes, c->dirty_block_bytes);
	return 0;

out_disk:
	put_disk(disk);
out_bitmap:
	kvfree(dev->dirty);
out_backing:
	drv_close_backing(dev->backing);
out_free:
	kfree(dev);
out_unlock:
	mutex_unlock(&drv_devs_mutex);
	return err;
}

static int drv_remove(u32 index)
{
	struct drv_dev *dev;
	struct gendisk *disk;
	unsigned long fl;
	LIST_HEAD(release);
	int err = 0;

	if (index >= DRV_MAX_DEVICES)
		return -ENODEV;
	mutex_lock(&drv_devs_mutex);
	dev = drv_devs[index];
	if (!dev) {
		err = -ENODEV;
		goto out;
	}
	disk = dev->disk;
	mutex_lock(&disk->open_mutex);
	if (atomic_read(&disk->part0->bd_openers) > 0) {
		mutex_unlock(&disk->open_mutex);
		err = -EBUSY;
		goto out;
	}
	WRITE_ONCE(dev->removing, true);
	mutex_unlock(&disk->open_mutex);
	/* Not open, so nothing is written any more: an attached agent is let go. */
	spin_lock_irqsave(&dev->lock, fl);
	drv_drop_agent_locked(dev, &release);
	spin_unlock_irqrestore(&dev->lock, fl);
	drv_devs[index] = NULL;
	mutex_unlock(&drv_devs_mutex);
	drv_submit_list(dev, &release);

	cancel_delayed_work_sync(&dev->watchdog);
	del_gendisk(disk);
	wait_event(dev->drain_wq, READ_ONCE(dev->pass_inflight) == 0 && READ_ONCE(dev->held_writes) == 0 &&
					  READ_ONCE(dev->users) == 0);
	put_disk(disk);
	drv_close_backing(dev->backing);
	kvfree(dev->dirty);
	pr_info("drv%u (%s): removed\n", index, dev->name);
	kfree(dev);
	module_put(THIS_MODULE);
	return 0;
out:
	mutex_unlock(&drv_devs_mutex);
	return err;
}

/* ---- the control device ---------------------------------------------------------------------- */

static int drv_ctl_open(struct inode *inode, struct file *f)
{
	struct drv_chan *chan = kzalloc(sizeof(*chan), GFP_KERNEL);

	if (!chan)
		return -ENOMEM;
	f->private_data = chan;
	return 0;
}

/* Detaches `chan` from its device, if any: unacknowledged writes pass through, marked dirty. */
static void drv_detach(struct drv_chan *chan)
{
	struct drv_dev *dev;
	unsigned long fl;
	LIST_HEAD(release);

	mutex_lock(&drv_devs_mutex);
	dev = chan->dev;
	if (dev) {
		spin_lock_irqsave(&dev->lock, fl);
		if (dev->chan == chan)
			drv_drop_agent_locked(dev, &release);
		spin_unlock_irqrestore(&dev->lock, fl);
		drv_submit_list(dev, &release);
	}
	chan->dev = NULL;
	mutex_unlock(&drv_devs_mutex);
}

static int drv_ctl_release(struct inode *inode, struct file *f)
{
	struct drv_chan *chan = f->private_data;

	drv_detach(chan);
	kfree(chan);
	return 0;
}

static void drv_fill_info(struct drv_dev *dev, struct drv_info *in)
{
	unsigned long fl;

	memset(in, 0, sizeof(*in));
	in->index = dev->index;
	strscpy(in->name, dev->name, DRV_NAME_LEN);
	strscpy(in->backing, dev->backing_path, DRV_PATH_LEN);
	in->size_bytes = dev->size_bytes;
	in->dirty_block_bytes = 1u << dev->block_shift;
	spin_lock_irqsave(&dev->lock, fl);
	in->mode = dev->mode;
	in->next_seq = dev->next_seq;
	in->held_writes = dev->held_writes;
	in->held_bytes = dev->held_bytes;
	in->dirty_blocks = bitmap_weight(dev->dirty, dev->blocks);
	in->timeouts = dev->timeouts;
	in->flush_writes = dev->flush_writes;
	in->fua_writes = dev->fua_writes;
	spin_unlock_irqrestore(&dev->lock, fl);
}

static long drv_take_dirty(struct drv_chan *chan, struct drv_dirty __user *arg)
{
	struct drv_dirty d;
	struct drv_dev *dev;
	unsigned long fl, *copy;
	u64 need;
	long err = 0;

	if (copy_from_user(&d, arg, sizeof(d)))
		return -EFAULT;
	mutex_lock(&drv_devs_mutex);
	dev = chan->dev;
	if (!dev) {
		mutex_unlock(&drv_devs_mutex);
		return chan->dead ? -EPIPE : -ENOTCONN;
	}
	need = DIV_ROUND_UP(dev->blocks, 8);
	d.blocks = dev->blocks;
	d.block_bytes = 1u << dev->block_shift;
	if (d.bitmap_bytes < need) {
		mutex_unlock(&drv_devs_mutex);
		return -EINVAL;
	}
	copy = kvzalloc(BITS_TO_LONGS(dev->blocks) * sizeof(unsigned long), GFP_KERNEL);
	if (!copy) {
		mutex_unlock(&drv_devs_mutex);
		return -ENOMEM;
	}
	/* Attached: no new pass-through writes start; wait for the ones in flight to land. */
	wait_event(dev->drain_wq, READ_ONCE(dev->pass_inflight) == 0);
	spin_lock_irqsave(&dev->lock, fl);
	bitmap_copy(copy, dev->dirty, dev->blocks);
	bitmap_zero(dev->dirty, dev->blocks);
	spin_unlock_irqrestore(&dev->lock, fl);
	mutex_unlock(&drv_devs_mutex);
	d.dirty_blocks = bitmap_weight(copy, d.blocks);
	/* Little-endian long words are the byte layout the header promises (x86_64). */
	if (copy_to_user(u64_to_user_ptr(d.bitmap), copy, need) || copy_to_user(arg, &d, sizeof(d))) {
		/* The bits are gone from the device: put them back rather than lose them. */
		spin_lock_irqsave(&dev->lock, fl);
		bitmap_or(dev->dirty, dev->dirty, copy, dev->blocks);
		spin_unlock_irqrestore(&dev->lock, fl);
		err = -EFAULT;
	}
	kvfree(copy);
	return err;
}

static long drv_ctl_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	struct drv_chan *chan = f->private_data;
	void __user *uarg = (void __user *)arg;
	struct drv_dev *dev;
	unsigned long fl;
	long err;
	u32 index;

	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	switch (cmd) {
	case DRV_IOC_CREATE: {
		struct drv_create c;

		if (copy_from_user(&c, uarg, sizeof(c)))
			return -EFAULT;
		err = drv_create(&c);
		if (!err && copy_to_user(uarg, &c, sizeof(c)))
			err = -EFAULT;
		return err;
	}
	case DRV_IOC_REMOVE:
		if (get_user(index, (u32 __user *)uarg))
			return -EFAULT;
		return drv_remove(index);
	case DRV_IOC_INFO: {
		struct drv_info in;

		if (copy_from_user(&in, uarg, sizeof(in)))
			return -EFAULT;
		in.name[DRV_NAME_LEN - 1] = 0;
		mutex_lock(&drv_devs_mutex);
		dev = in.name[0] ? drv_find_locked(in.name) : (in.index < DRV_MAX_DEVICES ? drv_devs[in.index] : NULL);
		if (dev)
			drv_fill_info(dev, &in);
		mutex_unlock(&drv_devs_mutex);
		if (!dev)
			return -ENODEV;
		return copy_to_user(uarg, &in, sizeof(in)) ? -EFAULT : 0;
	}
	case DRV_IOC_ATTACH:
		if (get_user(index, (u32 __user *)uarg))
			return -EFAULT;
		if (index >= DRV_MAX_DEVICES)
			return -ENODEV;
		mutex_lock(&drv_devs_mutex);
		dev = drv_devs[index];
		err = 0;
		if (!dev)
			err = -ENODEV;
		else if (chan->dev)
			err = -EISCONN;
		if (!err) {
			spin_lock_irqsave(&dev->lock, fl);
			if (dev->chan) {
				err = -EBUSY;
			} else {
				dev->chan = chan;
				dev->mode = DRV_MODE_HOLD;
				chan->dev = dev;
				chan->dead = false;
			}
			spin_unlock_irqrestore(&dev->lock, fl);
		}
		mutex_unlock(&drv_devs_mutex);
		return err;
	case DRV_IOC_TAKE_DIRTY:
		return drv_take_dirty(chan, uarg);
	case DRV_IOC_DETACH:
		if (!chan->dev)
			return -ENOTCONN;
		drv_detach(chan);
		chan->dead = false;
		return 0;
	default:
		return -ENOTTY;
	}
}

/* Copies the data of a held write to userspace. Runs without dev->lock (state COPYING). */
static int drv_copy_data(struct drv_held *h, char __user *ubuf)
{
	struct bio_vec bv;
	struct bvec_iter iter;
	size_t off = 0;

	bio_for_each_segment(bv, h->bio, iter) {
		void *p = kmap_local_page(bv.bv_page);
		unsigned long left = copy_to_user(ubuf + off, p + bv.bv_offset, bv.bv_len);

		kunmap_local(p);
		if (left)
			return -EFAULT;
		off += bv.bv_len;
	}
	return 0;
}

/* The attached device of `chan`, kept from removal until drv_put_dev (NULL: not attached). */
static struct drv_dev *drv_get_dev(struct drv_chan *chan)
{
	struct drv_dev *dev;

	mutex_lock(&drv_devs_mutex);
	dev = chan->dev;
	if (dev)
		dev->users++;
	mutex_unlock(&drv_devs_mutex);
	return dev;
}

static void drv_put_dev(struct drv_dev *dev)
{
	mutex_lock(&drv_devs_mutex);
	if (--dev->users == 0)
		wake_up_all(&dev->drain_wq);
	mutex_unlock(&drv_devs_mutex);
}

static ssize_t drv_read_dev(struct drv_chan *chan, struct drv_dev *dev, struct file *f, char __user *ubuf,
			    size_t count);

static ssize_t drv_ctl_read(struct file *f, char __user *ubuf, size_t count, loff_t *ppos)
{
	struct drv_chan *chan = f->private_data;
	struct drv_dev *dev = drv_get_dev(chan);
	ssize_t r;

	if (!dev)
		return chan->dead ? -EPIPE : -ENOTCONN;
	r = drv_read_dev(chan, dev, f, ubuf, count);
	drv_put_dev(dev);
	return r;
}

static ssize_t drv_read_dev(struct drv_chan *chan, struct drv_dev *dev, struct file *f, char __user *ubuf,
			    size_t count)
{
	size_t done = 0;
	unsigned long fl;
	int err;

	for (;;) {
		struct drv_held *h;
		struct drv_kmsg m;
		LIST_HEAD(release);
		size_t need;

		spin_lock_irqsave(&dev->lock, fl);
		if (chan->dev != dev) {
			spin_unlock_irqrestore(&dev->lock, fl);
			return done ? done : -EPIPE;
		}
		if (list_empty(&dev->outq)) {
			spin_unlock_irqrestore(&dev->lock, fl);
			if (done)
				return done;
			if (f->f_flags & O_NONBLOCK)
				return -EAGAIN;
			if (wait_event_interruptible(dev->read_wq,
						     !list_empty(&dev->outq) || READ_ONCE(chan->dev) != dev))
				return -ERESTARTSYS;
			continue;
		}
		h = list_first_entry(&dev->outq, struct drv_held, node);
		need = sizeof(m) + (h->state == HELD_QUEUED ? h->length : 0);
		if (need > count - done) {
			spin_unlock_irqrestore(&dev->lock, fl);
			return done ? done : -EINVAL;
		}
		list_del_init(&h->node);
		memset(&m, 0, sizeof(m));
		m.magic = DRV_KMSG_MAGIC;
		m.version = DRV_ABI_VERSION;
		m.seq = h->seq;
		m.offset = h->offset;
		if (h->state == HELD_DONE) {
			m.type = DRV_KMSG_DONE;
			m.status = h->status;
			spin_unlock_irqrestore(&dev->lock, fl);
			kmem_cache_free(drv_held_cache, h);
			if (copy_to_user(ubuf + done, &m, sizeof(m)))
				return done ? done : -EFAULT;
			done += sizeof(m);
			continue;
		}
		m.type = DRV_KMSG_WRITE;
		m.length = h->length;
		m.flags = h->flags;
		drv_held_step(h, EV_READ_BEGIN);
		spin_unlock_irqrestore(&dev->lock, fl);

		err = copy_to_user(ubuf + done, &m, sizeof(m)) ? -EFAULT : drv_copy_data(h, ubuf + done + sizeof(m));

		spin_lock_irqsave(&dev->lock, fl);
		if (drv_held_step(h, err ? EV_READ_FAIL : EV_READ_END) == HELD_ORPHAN) {
			/* The agent went away meanwhile: release it as the others were. */
			drv_mark_dirty_locked(dev, h->offset, h->length);
			dev->held_bytes -= h->length;
			dev->pass_inflight++;
			list_add_tail(&h->node, &release);
		} else if (err) {
			/* Not delivered: back to the head of the queue. */
			list_add(&h->node, &dev->outq);
		}
		spin_unlock_irqrestore(&dev->lock, fl);
		drv_submit_list(dev, &release);
		if (err)
			return done ? done : err;
		done += need;
	}
}

static ssize_t drv_write_dev(struct drv_chan *chan, struct drv_dev *dev, const char __user *ubuf, size_t count);

static ssize_t drv_ctl_write(struct file *f, const char __user *ubuf, size_t count, loff_t *ppos)
{
	struct drv_chan *chan = f->private_data;
	struct drv_dev *dev;
	ssize_t r;

	if (count % sizeof(struct drv_kack))
		return -EINVAL;
	dev = drv_get_dev(chan);
	if (!dev)
		return chan->dead ? -EPIPE : -ENOTCONN;
	r = drv_write_dev(chan, dev, ubuf, count);
	drv_put_dev(dev);
	return r;
}

static ssize_t drv_write_dev(struct drv_chan *chan, struct drv_dev *dev, const char __user *ubuf, size_t count)
{
	size_t done = 0;
	unsigned long fl;

	for (; done < count; done += sizeof(struct drv_kack)) {
		struct drv_kack a;
		struct drv_held *h;

		if (copy_from_user(&a, ubuf + done, sizeof(a)))
			return done ? done : -EFAULT;
		if (a.verdict > 0 || a.verdict < -MAX_ERRNO)
			return done ? done : -EINVAL;
		spin_lock_irqsave(&dev->lock, fl);
		if (chan->dev != dev) {
			spin_unlock_irqrestore(&dev->lock, fl);
			return done ? done : -EPIPE;
		}
		h = dev->ring[a.seq & (DRV_RING - 1)];
		if (!h || h->seq != a.seq || h->state != HELD_PUBLISHED) {
			spin_unlock_irqrestore(&dev->lock, fl);
			/* An ack for a write that is not waiting for one: the agent is confused. */
			return done ? done : -EINVAL;
		}
		dev->held_bytes -= h->length;
		wake_up_all(&dev->room_wq);
		if (a.verdict == 0) {
			drv_held_step(h, EV_ACK_RELEASE);
			spin_unlock_irqrestore(&dev->lock, fl);
			drv_forward(dev, h->bio, drv_held_end_io, h);
		} else {
			struct bio *bio = h->bio;

			dev->ring[h->seq & (DRV_RING - 1)] = NULL;
			dev->held_writes--;
			drv_held_step(h, EV_ACK_FAIL);
			h->status = a.verdict;
			list_add_tail(&h->node, &dev->outq);
			wake_up(&dev->read_wq);
			if (dev->held_writes == 0)
				wake_up_all(&dev->drain_wq);
			spin_unlock_irqrestore(&dev->lock, fl);
			bio->bi_status = errno_to_blk_status(a.verdict);
			bio_endio(bio);
		}
	}
	return done;
}

static const struct file_operations drv_ctl_fops = {
	.owner = THIS_MODULE,
	.open = drv_ctl_open,
	.release = drv_ctl_release,
	.read = drv_ctl_read,
	.write = drv_ctl_write,
	.unlocked_ioctl = drv_ctl_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice drv_ctl_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = DRV_CTL_NAME,
	.fops = &drv_ctl_fops,
	.mode = 0600,
};

static int __init drv_init(void)
{
	int err;

	drv_held_cache = KMEM_CACHE(drv_held, 0);
	if (!drv_held_cache)
		return -ENOMEM;
	err = bioset_init(&drv_bioset, BIO_POOL_SIZE, 0, 0);
	if (err)
		goto out_cache;
	err = misc_register(&drv_ctl_misc);
	if (err)
		goto out_bioset;
	pr_info("drv_capture: loaded (ABI %d, max_held_bytes %lu, hold_timeout_ms %u)\n", DRV_ABI_VERSION,
		max_held_bytes, hold_timeout_ms);
	return 0;
out_bioset:
	bioset_exit(&drv_bioset);
out_cache:
	kmem_cache_destroy(drv_held_cache);
	return err;
}

static void __exit drv_exit(void)
{
	/* Every device holds a module reference: none exists here. */
	misc_deregister(&drv_ctl_misc);
	bioset_exit(&drv_bioset);
	kmem_cache_destroy(drv_held_cache);
	pr_info("drv_capture: unloaded\n");
}

module_init(drv_init);
module_exit(drv_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("drv: hold block writes until the disaster-recovery staging server has them");
MODULE_AUTHOR("drv developers");
