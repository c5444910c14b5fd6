//! cardswitch: an ISO 8583 card switch.
//!
//! This crate holds the command line and the tools built on the codec (`cardswitch-codec`); the
//! switch itself (listeners, routing, acquirer links, journal) builds on the same pieces.

pub mod cli;
pub mod sim;
pub mod tools;
