//! The drv integration-test binary: real files and real processes. Tests that need root, BPF or a
//! VM are driven by `cargo xtask`, not from here.

mod agent;
mod protocol;
mod relay;
mod wrl;
mod wrl_crash;
mod wrl_kill;
