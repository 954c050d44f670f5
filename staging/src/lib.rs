//! drv staging server. For now: the persistent sequential write log (WRL) that every acknowledged
//! write lands in before the agent may write it locally. The network server and the relay to the
//! replicas build on [`wrl::Wrl`].

pub mod relay;
pub mod server;
pub mod storage;
pub mod wrl;

pub use storage::{FileStorage, Storage};
pub use wrl::{AppendRequest, Appended, Wrl, WrlError, WrlOptions};
