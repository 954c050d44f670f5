//! drv replica server: receives encrypted records from staging, logs them unchanged in its DR log
//! (a WRL, `drv-wrl`), and applies whole epochs in order to the target volume, so the
//! target is always at a crash-consistent point.
//!
//! - `server.rs`: the QUIC server, sequence checks, DR log appends, position reports, status.
//! - `apply.rs`: the epoch-atomic apply loop, the durable applied position, and the one place a
//!   block is about to be overwritten (`OverwriteObserver`, for copy-on-write snapshots).
//! - `media.rs`: media resync (a backup copied onto the target): the blocks changed since
//!   `begin`, which the agent ships at `complete`.
//! - `snapshot.rs`: point-in-time copies of a volume at a unit boundary (`drv snapshot create`).

pub mod apply;
pub mod cow;
pub mod media;
pub mod server;
pub mod snapshot;

pub use server::ReplicaServer;
