//! cardswitch: an ISO 8583 card switch.
//!
//! The switch: configuration, terminal listeners and sessions, the per-message pipeline and the
//! acquirer links, plus the command line and tester tools. The codec, the routing decisions and
//! the simulators are crates of their own.

pub mod admin;
pub mod cli;
pub mod config;
pub mod dedup;
pub mod demo;
pub mod fraud;
pub mod hsm;
pub mod journal;
pub mod pipeline;
pub mod run;
pub mod saf;
pub mod seal;
pub mod security;
pub mod server;
pub mod settlement;
pub mod sim;
pub mod soak;
pub mod stand_in;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod tools;
pub mod upstream;
