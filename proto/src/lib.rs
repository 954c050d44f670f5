//! drv's protocol cores: the rules that decide correctness, as state machines that take events
//! (a frame arrived, an append became durable, an append failed) and return decisions, with no
//! I/O, no clock and no threads of their own. The servers wrap them in tokio, sockets and files;
//! the simulator drives the same code with simulated ones. **Invariant:** nothing here depends on
//! tokio, opens a file or reads the time.
//!
//! - [`epoch`]: partial write order, the agent's epoch rule (and the argument why a replica at any
//!   epoch boundary is a state the application could have seen after a crash).
//! - [`seq`]: the volume sequencer, the gate every write or relayed record of a volume passes at
//!   staging and at the replica (skip what is logged, refuse a gap, refuse an epoch going back,
//!   roll back when the log fails).
//! - [`relay`]: the relay window of one volume to one replica (resume, in order, in-flight bound,
//!   acknowledgements, what the log may trim).
//! - [`agent`]: the agent's order (sequence numbers, epochs, overlaps, the mode machine), its
//!   acknowledgement queue, the activity log's rules and the resync's budget, passes and pace.
//! - [`status`]: the servers' status replies, one serde type each, shared by servers and clients.
//! - [`units`]: the replica's units of apply (an epoch, or a whole resync run) and when one is
//!   complete.
//! - [`nbd`]: the NBD protocol's server side (fixed-newstyle handshake, requests, simple replies)
//!   for exporting recovery points.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cow;
pub mod epoch;
pub mod nbd;
pub mod relay;
pub mod seq;
pub mod status;
pub mod units;

pub use agent::{AckQueue, Activity, Issue, Mode, Order, StagingLost, Stamp};
pub use epoch::EpochClock;
pub use relay::{Offer, RelayRefusal, RelayWindow};
pub use seq::{Admit, Refusal, Sequencer};
pub use units::Units;
