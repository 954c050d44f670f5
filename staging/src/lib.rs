//! The drv staging server (`drv staging run`): agents' writes logged in the volume's WRL
//! (`drv-wrl`) and acknowledged once durable (`server.rs`), and relayed to every replica of the
//! volume (`relay.rs`).

#![forbid(unsafe_code)]

pub mod relay;
pub mod server;
