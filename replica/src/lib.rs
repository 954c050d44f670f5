//! drv replica server: receives encrypted records from staging, logs them unchanged in its DR log
//! (a WRL, `drv-wrl`), and applies whole epochs in order to the target volume, so the
//! target is always at a crash-consistent point.
//!
//! - `server.rs`: the QUIC server, sequence checks, DR log appends, position reports, status.
//! - `apply.rs`: the epoch-atomic apply loop, the durable applied position, and the one place the
//!   target is about to be overwritten (`OverwriteObserver::before_apply`, one call per batch).
//! - `media.rs`: media resync (a backup copied onto the target): the blocks changed since
//!   `begin`, which the agent ships at `complete`.
//! - `snapshot.rs`: copy-on-write snapshots of the volumes (`drv snapshot`), the apply step's
//!   observer; `cow.rs`: one volume's snapshot store (index and preserved blocks).

pub mod apply;
pub mod check;
pub mod cow;
pub mod export;
pub mod failover;
pub mod image;
pub mod media;
pub mod mount;
pub mod server;
pub mod snapshot;
pub mod window;

pub use server::ReplicaServer;
