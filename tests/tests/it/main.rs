//! The drv integration-test binary: real files and real processes. The eBPF tests need root (loop
//! devices, BPF): without it they say so and pass, unless `DRV_REQUIRE_ROOT_TESTS=1` (set by
//! `cargo xtask test`, so CI never skips them). The kernel module's tests run in a VM, driven by
//! `cargo xtask vm-test`.

mod agent;
mod configsrv;
mod ebpf;
mod operator;
mod protocol;
mod recovery;
mod relay;
mod snapshots;
mod user;
mod webui;
mod wrl;
mod wrl_crash;
mod wrl_kill;
