//! eBPF programs on `block:block_rq_issue` and `block:block_rq_complete`.
//!
//! Each program reads the request's device, first sector, length and operation string from the
//! tracepoint's raw record, at offsets the loader found in the tracepoint's `format` file (the
//! [`Layout`] globals, set at load time), keeps only watched devices, and reserves one [`Event`]
//! in the `EVENTS` ring buffer without waking the consumer (it polls). The order of reservation is
//! the order userspace reads: a cross-CPU total order without a clock.
//!
//! Nothing is lost silently: a full ring buffer counts the drop and widens a per-CPU lost range
//! ([`Loss`]), which the loader treats as dirty; a program the kernel skipped (its recursion
//! guard) shows in the program's `recursion_misses`, which the loader reads too.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::EbpfContext;
    use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
    use aya_ebpf::helpers::bpf_probe_read_kernel;
    use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
    use aya_ebpf::macros::{btf_tracepoint, map, tracepoint};
    use aya_ebpf::maps::{PerCpuArray, RingBuf};
    use aya_ebpf::programs::{BtfTracePointContext, TracePointContext};
    use drv_ebpf_common::{
        BtfLayout, Event, KIND_COMPLETE, KIND_ISSUE, Layout, Loss, MAX_WATCHED, RING_BYTES, RWBS_BYTES, Watch,
    };

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

    /// Watched devices, set by the loader.
    #[unsafe(no_mangle)]
    static WATCHED: Watch = Watch { count: 0, devs: [0; MAX_WATCHED] };

    #[inline(always)]
    fn watched(dev: u32) -> bool {
        // SAFETY: set by the loader before loading.
        let w = unsafe { core::ptr::read_volatile(&WATCHED) };
        if w.count == 0 {
            return true;
        }
        let mut hit = false;
        for (i, d) in w.devs.iter().enumerate() {
            hit |= (i as u32) < w.count && *d == dev;
        }
        hit
    }

    #[map]
    static LOSS: PerCpuArray<Loss> = PerCpuArray::with_max_entries(1, 0);

    /// Set by the loader before loading (read-only data: the verifier sees the constants).
    #[unsafe(no_mangle)]
    static ISSUE_LAYOUT: Layout = Layout { dev: 0, sector: 0, nr_sector: 0, rwbs: 0, error: u32::MAX };
    #[unsafe(no_mangle)]
    static COMPLETE_LAYOUT: Layout = Layout { dev: 0, sector: 0, nr_sector: 0, rwbs: 0, error: u32::MAX };

    #[unsafe(no_mangle)]
    static BTF_LAYOUT: BtfLayout = BtfLayout {
        rq_q: 0,
        rq_sector: 0,
        rq_data_len: 0,
        rq_cmd_flags: 0,
        q_disk: 0,
        disk_major: 0,
        disk_first_minor: 0,
        fua_bit: 0,
        preflush_bit: 0,
        sync_bit: 0,
    };

    /// `tp_btf` on `block_rq_issue(struct request *rq)`: the kernel guards recursion per
    /// program here, so a completion interrupting an issue on one CPU is not skipped (the classic
    /// tracepoints share one guard per CPU).
    #[btf_tracepoint(function = "block_rq_issue")]
    pub fn drv_btf_rq_issue(ctx: BtfTracePointContext) -> u32 {
        let rq: *const u8 = ctx.arg(0);
        record_btf(&ctx, rq, KIND_ISSUE, 0, None);
        0
    }

    /// `tp_btf` on `block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)`.
    #[btf_tracepoint(function = "block_rq_complete")]
    pub fn drv_btf_rq_complete(ctx: BtfTracePointContext) -> u32 {
        let rq: *const u8 = ctx.arg(0);
        let error: u8 = ctx.arg(1);
        let nr_bytes: u32 = ctx.arg(2);
        record_btf(&ctx, rq, KIND_COMPLETE, i32::from(error), Some(nr_bytes));
        0
    }

    /// Reads a `T` at `base + off` in kernel memory.
    #[inline(always)]
    fn read<T>(base: *const u8, off: u32) -> Option<T> {
        // SAFETY: bpf_probe_read_kernel copies or fails; it cannot fault.
        unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize).cast::<T>()) }.ok()
    }

    #[inline(always)]
    fn record_btf<C: EbpfContext>(ctx: &C, rq: *const u8, kind: u8, error: i32, nr_bytes: Option<u32>) {
        // SAFETY: set by the loader before loading, as the classic layouts.
        let l = unsafe { core::ptr::read_volatile(&BTF_LAYOUT) };
        // The device as the classic tracepoint reports it: the disk's devt, or 0 without a disk.
        let Some(q) = read::<*const u8>(rq, l.rq_q) else { return };
        let disk =
            if q.is_null() { core::ptr::null() } else { read::<*const u8>(q, l.q_disk).unwrap_or(core::ptr::null()) };
        let dev = if disk.is_null() {
            0
        } else {
            let major = read::<u32>(disk, l.disk_major).unwrap_or(0);
            let minor = read::<u32>(disk, l.disk_first_minor).unwrap_or(0);
            (major << 20) | (minor & 0xfffff)
        };
        if !watched(dev) {
            return;
        }
        let sector = read::<u64>(rq, l.rq_sector).unwrap_or(u64::MAX);
        let bytes = match nr_bytes {
            Some(n) => n,
            None => read::<u32>(rq, l.rq_data_len).unwrap_or(0),
        };
        let flags = read::<u32>(rq, l.rq_cmd_flags).unwrap_or(0);
        emit(ctx, dev, sector, bytes >> 9, rwbs_of(flags, &l), error, kind);
    }

    /// The operation string `blk_fill_rwbs` makes (without its readahead and meta letters).
    #[inline(always)]
    fn rwbs_of(flags: u32, l: &BtfLayout) -> [u8; RWBS_BYTES] {
        let mut v: u64 = 0;
        let mut shift = 0u32;
        let mut push = |c: u8| {
            v |= u64::from(c) << shift;
            shift += 8;
        };
        if flags & (1 << (l.preflush_bit & 31)) != 0 {
            push(b'F');
        }
        // REQ_OP_MASK is the low 8 bits: READ 0, WRITE 1, FLUSH 2, DISCARD 3, SECURE_ERASE 5.
        match flags & 0xff {
            0 => push(b'R'),
            1 => push(b'W'),
            2 => push(b'F'),
            3 => push(b'D'),
            5 => {
                push(b'D');
                push(b'E');
            }
            _ => push(b'N'),
        }
        if flags & (1 << (l.fua_bit & 31)) != 0 {
            push(b'F');
        }
        if flags & (1 << (l.sync_bit & 31)) != 0 {
            push(b'S');
        }
        v.to_le_bytes()
    }

    #[tracepoint]
    pub fn drv_rq_issue(ctx: TracePointContext) -> u32 {
        // SAFETY: the loader sets the global before loading; a volatile read keeps the compiler
        // from folding the default.
        let layout = unsafe { core::ptr::read_volatile(&ISSUE_LAYOUT) };
        record(&ctx, &layout, KIND_ISSUE);
        0
    }

    #[tracepoint]
    pub fn drv_rq_complete(ctx: TracePointContext) -> u32 {
        // SAFETY: as above.
        let layout = unsafe { core::ptr::read_volatile(&COMPLETE_LAYOUT) };
        record(&ctx, &layout, KIND_COMPLETE);
        0
    }

    #[inline(always)]
    fn record(ctx: &TracePointContext, l: &Layout, kind: u8) {
        // SAFETY: `read_at` is bpf_probe_read_kernel of the tracepoint's record; a bad offset
        // fails the read, it cannot fault.
        let Ok(dev) = (unsafe { ctx.read_at::<u32>(l.dev as usize) }) else { return };
        if !watched(dev) {
            return;
        }
        let sector = unsafe { ctx.read_at::<u64>(l.sector as usize) }.unwrap_or(u64::MAX);
        let nr_sector = unsafe { ctx.read_at::<u32>(l.nr_sector as usize) }.unwrap_or(u32::MAX);
        let rwbs = unsafe { ctx.read_at::<[u8; RWBS_BYTES]>(l.rwbs as usize) }.unwrap_or([b'?'; RWBS_BYTES]);
        let error = if l.error == u32::MAX { 0 } else { unsafe { ctx.read_at::<i32>(l.error as usize) }.unwrap_or(-1) };
        emit(ctx, dev, sector, nr_sector, rwbs, error, kind);
    }

    #[inline(always)]
    fn emit<C: EbpfContext>(
        ctx: &C,
        dev: u32,
        sector: u64,
        nr_sector: u32,
        rwbs: [u8; RWBS_BYTES],
        error: i32,
        kind: u8,
    ) {
        // Reserve flags must be 0; the no-wakeup flag belongs to submit.
        match EVENTS.reserve::<Event>(0) {
            Some(mut slot) => {
                slot.write(Event {
                    // SAFETY: helpers without preconditions.
                    ts_ns: unsafe { bpf_ktime_get_ns() },
                    sector,
                    nr_sector,
                    dev,
                    cpu: unsafe { bpf_get_smp_processor_id() },
                    kind,
                    _pad0: [0; 3],
                    error,
                    rwbs,
                    _pad1: [0; 4],
                });
                slot.submit(BPF_RB_NO_WAKEUP as u64);
            }
            None => lost(ctx, dev, sector, nr_sector),
        }
    }

    /// Counts a dropped event and widens this CPU's lost range.
    #[inline(always)]
    fn lost<C: EbpfContext>(ctx: &C, dev: u32, sector: u64, nr_sector: u32) {
        let Some(p) = LOSS.get_ptr_mut(0) else { return };
        // SAFETY: a per-CPU slot: only this CPU writes it. A program may interrupt another on
        // the same CPU (tp_btf guards per program): at worst one update of the interrupted run is
        // overwritten; the interrupting run's drop is still counted and its range marked.
        let loss = unsafe { &mut *p };
        loss.reserve_failed += 1;
        if loss.reserve_failed == 1 {
            aya_log_ebpf::warn!(ctx, "drv: event ring buffer full, dropping events (dev {})", dev);
        }
        // A request without data (a flush: its sector is -1) changes nothing: count it only.
        if nr_sector == 0 {
            return;
        }
        let end = sector.saturating_add(nr_sector as u64);
        if loss.hi_sector == 0 {
            loss.dev = dev;
            loss.lo_sector = sector;
            loss.hi_sector = end;
        } else {
            if loss.dev != dev {
                loss.mixed = 1;
            }
            if sector < loss.lo_sector {
                loss.lo_sector = sector;
            }
            if end > loss.hi_sector {
                loss.hi_sector = end;
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
