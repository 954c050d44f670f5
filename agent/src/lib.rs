//! drv host agent: decides the partial write order of a protected volume, holds each write until
//! staging has it durably, and only then lets the local write happen.
//!
//! - `epoch.rs`: the I/O-free epoch rule (and the argument for it), property-tested.
//! - `agent.rs`: the synchronous path to staging, the [`LocalDisk`] a write lands on after the
//!   acknowledgement, and `write_with` for capture paths that perform the local write themselves.
//!   [`Agent::write`] is the in-process capture the demo and the tests use.

pub mod agent;
pub mod epoch;

pub use agent::{Agent, AgentError, AgentOptions, FileDisk, LocalDisk};
pub use epoch::EpochClock;
