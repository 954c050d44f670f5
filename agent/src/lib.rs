//! drv host agent: decides the partial write order of a protected volume, holds each write until
//! staging has it durably, and only then lets the local write happen.
//!
//! - the epoch rule (`drv_proto::EpochClock`, I/O-free, with the argument for it).
//! - `agent.rs`: the synchronous path to staging, the [`LocalDisk`] a write lands on after the
//!   acknowledgement, `write_with` for capture paths that perform the local write themselves, and
//!   the change-map mode. [`Agent::write`] is the in-process capture the demo and the tests use.
//!   The rules (order, epochs, overlaps, mode machine, acks, activity, resync budget and passes)
//!   are `drv_proto::agent`'s, I/O-free; the files here are the tokio, link and files around them.
//! - `session.rs`: one session with staging (connect, `OpenVolume`, the ack reader, the ack
//!   timeout watchdog).
//! - `resync.rs`: the reconnect task and the resync passes.
//! - `state.rs`, `activity.rs`: the state directory (lock, change map, activity log, the
//!   writes-in-doubt rule after a crash) and the activity log.
//! - `control.rs`: the control socket through which `drv sync start`, `drv agent status` and
//!   `drv media-resync complete` reach a running agent (`drv agent run`).
//! - `kmod.rs`: the kernel-module capture path (`/dev/drvN` of `capture-kmod/`): the module's
//!   interface mirrored, and the loop that feeds its held writes to the agent.
//! - `detach.rs`: `drv detach` with no agent running (the device a dead agent left).
//! - `user.rs`: the userspace capture path for stock kernels (FUSE file + loop device with direct
//!   I/O): every write of the loop device reaches [`Agent::write`] as a FUSE write.
//! - [`changemap`] (crate `drv-changemap`): the persistent bitmap (format and crash analysis in
//!   its header).

mod activity;
pub mod agent;
pub mod control;
pub mod detach;
pub use drv_changemap as changemap;
pub mod kmod;
mod resync;
mod session;
mod state;
pub mod user;

pub use agent::{
    Agent, AgentDigest, AgentError, AgentOptions, AgentStatus, FULL_MARKER, FileDisk, IssueTap, LocalDisk, Mode,
};
pub use changemap::ChangeMap;
pub use drv_proto::EpochClock;
