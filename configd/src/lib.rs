//! The configuration server's replicated store: the commands of `drv_config` (one change each,
//! applied by `drv_config::command::apply`) are the entries of an openraft log, so every config
//! server applies the same changes in the same order and holds the same configuration. The raft
//! log and vote live in one redb file ([`log_store`]), the state machine (the configuration
//! tables themselves, where the raft position is and the newest snapshot) in another
//! ([`state`]); a snapshot's body is [`snapshot`]'s format. Servers talk HTTPS with mutual TLS
//! ([`network`] sends the RPCs, [`server`] serves them and runs a node); the same listener
//! serves the JSON [`api`], which [`client`] speaks for the command line.
//!
//! Layering: this crate links openraft; staging, replica and agent never do.

// openraft's error types are large by design (its own examples allow this lint too).
#![allow(clippy::result_large_err)]

use serde::{Deserialize, Serialize};

pub mod alerts;
pub mod api;
pub mod auth;
pub mod client;
pub mod digest;
pub mod log_store;
pub mod mail;
pub mod monitor;
pub mod network;
pub mod series;
pub mod server;
pub mod sessions;
pub mod snapshot;
pub mod state;
pub mod web;

pub use drv_config::{Command, Written};

/// A config server's id in the raft group.
pub type NodeId = u64;

/// A config server as the raft group knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// Its name (its certificate's `NAME.config.drv`).
    pub name: String,
    /// Where it listens (`HOST:PORT`).
    pub address: String,
}

impl std::fmt::Display for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.name, self.address)
    }
}

/// Why a command changed nothing: the kind of refusal (`drv_config::ConfigError::code`) and its
/// message, as the client is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: String,
    pub message: String,
}

/// What applying one log entry gave: a command's outcome (`None` for the entries raft itself
/// adds: blank and membership).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The entry's log index.
    pub index: u64,
    pub outcome: Option<Result<Written, Refusal>>,
}

openraft::declare_raft_types!(
    /// The configuration server's raft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// openraft's storage error, as this crate's stores return it.
pub type StorageError = openraft::StorageError<NodeId>;
