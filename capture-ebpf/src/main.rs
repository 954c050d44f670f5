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
    use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
    use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
    use aya_ebpf::macros::{map, tracepoint};
    use aya_ebpf::maps::{HashMap, PerCpuArray, RingBuf};
    use aya_ebpf::programs::TracePointContext;
    use drv_ebpf_common::{Event, KIND_COMPLETE, KIND_ISSUE, Layout, Loss, MAX_WATCHED, RING_BYTES, RWBS_BYTES};

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

    /// Watched devices (kernel device numbers); the value is unused.
    #[map]
    static WATCH: HashMap<u32, u32> = HashMap::with_max_entries(MAX_WATCHED, 0);

    #[map]
    static LOSS: PerCpuArray<Loss> = PerCpuArray::with_max_entries(1, 0);

    /// Set by the loader before loading (read-only data: the verifier sees the constants).
    #[unsafe(no_mangle)]
    static ISSUE_LAYOUT: Layout = Layout { dev: 0, sector: 0, nr_sector: 0, rwbs: 0, error: u32::MAX, watch_all: 0 };
    #[unsafe(no_mangle)]
    static COMPLETE_LAYOUT: Layout = Layout { dev: 0, sector: 0, nr_sector: 0, rwbs: 0, error: u32::MAX, watch_all: 0 };

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
        if l.watch_all == 0 && WATCH.get_ptr(dev).is_none() {
            return;
        }
        let sector = unsafe { ctx.read_at::<u64>(l.sector as usize) }.unwrap_or(u64::MAX);
        let nr_sector = unsafe { ctx.read_at::<u32>(l.nr_sector as usize) }.unwrap_or(u32::MAX);
        let rwbs = unsafe { ctx.read_at::<[u8; RWBS_BYTES]>(l.rwbs as usize) }.unwrap_or([b'?'; RWBS_BYTES]);
        let error = if l.error == u32::MAX { 0 } else { unsafe { ctx.read_at::<i32>(l.error as usize) }.unwrap_or(-1) };
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
    fn lost(ctx: &TracePointContext, dev: u32, sector: u64, nr_sector: u32) {
        let Some(p) = LOSS.get_ptr_mut(0) else { return };
        // SAFETY: a per-CPU slot: only this CPU writes it while this program runs (the program
        // does not nest with itself on one CPU).
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
