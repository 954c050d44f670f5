/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * drv_capture: the kernel side of drv's write capture.
 *
 * A stacking block device /dev/drvN over a backing block device. Every write (with FLUSH/FUA as
 * given) is held and published to the attached agent, which sends it to staging; the agent's
 * acknowledgement by sequence number releases it to the backing device. Reads pass through.
 * With no agent attached (never attached, closed, crashed, or too slow: a held write older than
 * the hold timeout), writes pass straight through and their blocks are marked in a dirty bitmap,
 * which the next agent takes (and clears) atomically and resyncs.
 *
 * This header is the whole interface between the module and userspace; the Rust mirror is
 * `agent/src/kmod.rs`, which asserts the same sizes and offsets.
 *
 * Control device: /dev/drv-ctl. Each open file is a channel; ioctls on it:
 *   DRV_IOC_CREATE    create /dev/drvN over a backing device (the module stays loaded while any
 *                     device exists: rmmod is refused)
 *   DRV_IOC_REMOVE    remove a device (refused while it is open, e.g. mounted; an attached agent
 *                     is detached, its read() gets EPIPE)
 *   DRV_IOC_INFO      a device's state, by index or by name
 *   DRV_IOC_ATTACH    make this channel the device's agent: writes are held from now on
 *   DRV_IOC_TAKE_DIRTY  copy and clear the dirty bitmap (attached channel only); waits until no
 *                     pass-through write is in flight, so every block written before the attach is
 *                     either in the copy or on the backing device when it is read
 *   DRV_IOC_DETACH    stop holding: writes pass through, marked dirty
 *
 * Attached channel, read(): a stream of messages, each a struct drv_kmsg, followed for
 * DRV_KMSG_WRITE by `length` data bytes. One read returns whole messages only (as many as fit);
 * a buffer smaller than the next message gets EINVAL (DRV_MAX_WRITE_BYTES + header always fits).
 * After a hold timeout, read() returns EPIPE: the channel is dead, attach again.
 *   DRV_KMSG_WRITE  a held write: seq, offset, length, flags, data
 *   DRV_KMSG_DONE   the backing device completed released write `seq` (status 0 or -errno). A
 *                   DONE precedes every WRITE submitted after that write completed, so the agent
 *                   sees the application's completion order.
 *
 * Attached channel, write(): an array of struct drv_kack, one per published write:
 *   verdict 0       release the write to the backing device (staging has it)
 *   verdict -errno  fail the write with an I/O error (nothing may protect it)
 *
 * Held-write lifecycle (state x event -> state; "-" cannot happen, "x" refused with EINVAL):
 *
 *   state      | read()     | ack 0      | ack -errno | backing done     | agent gone / timeout
 *   -----------+------------+------------+------------+------------------+---------------------
 *   QUEUED     | COPYING    | x          | x          | -                | PASSED (marked dirty)
 *   COPYING    | PUBLISHED  | x          | x          | -                | ORPHAN
 *   ORPHAN     | PASSED(*)  | x          | x          | -                | ORPHAN
 *   PUBLISHED  | -          | SUBMITTED  | DONE (EIO) | -                | PASSED (marked dirty)
 *   SUBMITTED  | -          | x          | x          | DONE (+DONE msg) | SUBMITTED (no msg)
 *   PASSED     | -          | x          | x          | freed            | PASSED
 *   (*) the copying reader releases it, marked dirty, once its copy is done.
 *
 * QUEUED and PUBLISHED writes count against the held-bytes limit; a writer past it waits (task
 * state D) until acks free room, or the device falls back to pass-through.
 */
#ifndef DRV_CAPTURE_H
#define DRV_CAPTURE_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/ioctl.h>
#else
#include <linux/types.h>
#include <sys/ioctl.h>
#endif

#define DRV_CTL_NAME "drv-ctl"
#define DRV_KMSG_MAGIC 0x4b565244u /* "DRVK" little-endian */
#define DRV_ABI_VERSION 2
#define DRV_NAME_LEN 64
#define DRV_PATH_LEN 256
/* The largest held write: the device's max_hw_sectors. */
#define DRV_MAX_WRITE_BYTES (1u << 20)

enum drv_kmsg_type {
	DRV_KMSG_WRITE = 1,
	DRV_KMSG_DONE = 2,
};

/* Flags of a held write (the same bits as drv's record flags). */
#define DRV_F_FLUSH 0x1u /* REQ_PREFLUSH: every earlier completed write is stable first */
#define DRV_F_FUA 0x2u /* REQ_FUA: this write is stable when it completes */

/*
 *  0       4     6     8               16              24      28      32      36      40      48
 *  +-------+-----+-----+---------------+---------------+-------+-------+-------+-------+-------+
 *  | magic | ver | type| seq           | offset (bytes)| length| flags | status| rsvd  | rsvd  |
 *  +-------+-----+-----+---------------+---------------+-------+-------+-------+-------+-------+
 *  little-endian (host order on every architecture drv supports)
 */
struct drv_kmsg {
	__u32 magic;
	__u16 version;
	__u16 type;
	__u64 seq;
	__u64 offset;
	__u32 length;
	__u32 flags;
	__s32 status;
	__u32 reserved0;
	__u64 reserved1;
};

/*  0               8       12      16
 *  +---------------+-------+-------+
 *  | seq           |verdict| rsvd  |
 *  +---------------+-------+-------+
 */
struct drv_kack {
	__u64 seq;
	__s32 verdict;
	__u32 reserved;
};

struct drv_create {
	char backing[DRV_PATH_LEN]; /* in: path of the backing block device */
	char name[DRV_NAME_LEN]; /* in: unique name (drv uses the volume name) */
	__u32 dirty_block_bytes; /* in: dirty bitmap granularity, power of two >= 4096 */
	__u32 index; /* out: N of /dev/drvN */
	__u64 size_bytes; /* out */
};

enum drv_mode {
	DRV_MODE_PASSTHROUGH = 0, /* no agent: writes pass through, marked dirty */
	DRV_MODE_HOLD = 1, /* agent attached: writes held until acked */
};

struct drv_info {
	__u32 index; /* in (when name is empty) / out */
	__u32 mode; /* enum drv_mode */
	char name[DRV_NAME_LEN]; /* in: look up by name when not empty / out */
	char backing[DRV_PATH_LEN]; /* out */
	__u64 size_bytes;
	__u64 next_seq; /* the next held write's sequence number */
	__u64 held_writes; /* QUEUED + COPYING + PUBLISHED + SUBMITTED */
	__u64 held_bytes;
	__u64 dirty_blocks;
	__u32 dirty_block_bytes;
	__u32 timeouts; /* hold timeouts since the device was created */
	__u64 flush_writes; /* writes with REQ_PREFLUSH seen (held or passed through) */
	__u64 fua_writes; /* writes with REQ_FUA seen */
};

struct drv_dirty {
	__u64 bitmap; /* in: user pointer to the buffer; bit i (byte i/8, bit i%8) = block i */
	__u64 bitmap_bytes; /* in: its size, at least (blocks + 7) / 8 */
	__u64 blocks; /* out: blocks in the device */
	__u64 dirty_blocks; /* out: bits set in the copy */
	__u32 block_bytes; /* out */
	__u32 reserved;
};

#define DRV_IOC_MAGIC 0xd7
#define DRV_IOC_CREATE _IOWR(DRV_IOC_MAGIC, 1, struct drv_create)
#define DRV_IOC_REMOVE _IOW(DRV_IOC_MAGIC, 2, __u32)
#define DRV_IOC_INFO _IOWR(DRV_IOC_MAGIC, 3, struct drv_info)
#define DRV_IOC_ATTACH _IOW(DRV_IOC_MAGIC, 4, __u32)
#define DRV_IOC_TAKE_DIRTY _IOWR(DRV_IOC_MAGIC, 5, struct drv_dirty)
#define DRV_IOC_DETACH _IO(DRV_IOC_MAGIC, 6)

#ifdef __KERNEL__
/* The held-write lifecycle of the table at the top, as the module runs it (drv_held_step). */
enum drv_held_state {
	HELD_QUEUED, /* waiting for the agent's read() */
	HELD_COPYING, /* a read() is copying its data */
	HELD_ORPHAN, /* copying when the agent went away: the reader releases it */
	HELD_PUBLISHED, /* read by the agent, waiting for its ack */
	HELD_SUBMITTED, /* acked, on its way to the backing device */
	HELD_PASSED, /* released without an ack: marked dirty, on its way to the backing device */
	HELD_DONE, /* completed (a DONE message may wait in the queue) */
	HELD_NSTATES,
	HELD_INVALID = HELD_NSTATES,
};

enum drv_held_event {
	EV_READ_BEGIN, /* read() takes it off the queue */
	EV_READ_END, /* read() copied it */
	EV_READ_FAIL, /* read() could not copy it (EFAULT) */
	EV_ACK_RELEASE, /* verdict 0 */
	EV_ACK_FAIL, /* verdict -errno */
	EV_BACKING_DONE, /* the backing device completed it */
	EV_AGENT_GONE, /* close, detach, remove or hold timeout */
	EV_NEVENTS,
};

#define X HELD_INVALID
static const unsigned char drv_held_table[HELD_NSTATES][EV_NEVENTS] = {
	/*                 READ_BEGIN    READ_END        READ_FAIL    ACK_RELEASE     ACK_FAIL   BACKING_DONE AGENT_GONE */
	[HELD_QUEUED] = { HELD_COPYING, X, X, X, X, X, HELD_PASSED },
	[HELD_COPYING] = { X, HELD_PUBLISHED, HELD_QUEUED, X, X, X, HELD_ORPHAN },
	[HELD_ORPHAN] = { X, HELD_PASSED, HELD_PASSED, X, X, X, HELD_ORPHAN },
	[HELD_PUBLISHED] = { X, X, X, HELD_SUBMITTED, HELD_DONE, X, HELD_PASSED },
	[HELD_SUBMITTED] = { X, X, X, X, X, HELD_DONE, HELD_SUBMITTED },
	[HELD_PASSED] = { X, X, X, X, X, HELD_DONE, HELD_PASSED },
	[HELD_DONE] = { X, X, X, X, X, X, HELD_DONE },
};
#undef X

_Static_assert(sizeof(struct drv_kmsg) == 48, "drv_kmsg is 48 bytes");
_Static_assert(sizeof(struct drv_kack) == 16, "drv_kack is 16 bytes");
_Static_assert(sizeof(struct drv_create) == 336, "drv_create is 336 bytes");
_Static_assert(sizeof(struct drv_info) == 392, "drv_info is 392 bytes");
_Static_assert(sizeof(struct drv_dirty) == 40, "drv_dirty is 40 bytes");
#endif

#endif /* DRV_CAPTURE_H */
