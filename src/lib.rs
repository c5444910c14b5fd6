//! cardswitch: an ISO 8583 card switch.
//!
//! The switch: configuration, terminal listeners and sessions, the per-message pipeline and the
//! acquirer links. The command line lives in the binary (`src/cmd/`); the codec, the routing
//! decisions and the simulators are crates of their own, and this library does not depend on
//! the simulators.

pub mod admin;
pub mod config;
pub mod dedup;
pub mod fraud;
pub mod hsm;
pub mod journal;
pub mod net;
pub mod pipeline;
pub mod saf;
pub mod seal;
pub mod security;
pub mod server;
pub mod settlement;
pub mod stand_in;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod upstream;
