//! cardswitch: an ISO 8583 card switch.
//!
//! The switch: configuration, terminal listeners and sessions, the per-message pipeline and the
//! acquirer links. The command line lives in the binary (`src/cmd/`); the codec, the routing
//! decisions and the simulators are crates of their own, and this library does not depend on
//! the simulators.

pub(crate) mod admin;
pub mod config;
pub(crate) mod dedup;
pub mod fraud;
pub mod health;
pub mod hsm;
pub mod journal;
pub(crate) mod net;
pub(crate) mod pipeline;
pub(crate) mod saf;
pub(crate) mod seal;
pub(crate) mod security;
pub mod server;
pub mod settlement;
pub(crate) mod stand_in;
pub(crate) mod state;
pub mod telemetry;
pub mod tls;
pub(crate) mod upstream;
